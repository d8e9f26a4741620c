"""Generation engine: overhead against a bare diffusers loop on the same CPU budget, scaling 2 workers vs 1,
resume cost.

- overhead (1 core each side): the whole benchmark process, and so the embedded Ray it starts (driver, raylet,
  worker), is pinned to ONE core with sched_setaffinity. Baseline: a bare diffusers loop in this process
  (same model, batch, steps, resolution, torch threads 1, per-sample generators, images kept in memory as
  PIL). Engine: `generate` with 1 worker (torch threads 1) on that same core: its writer thread, driver and
  Ray share the core with generation. Two ratios: steady state (`RunSummary.steady_images_per_s`: images
  committed from the moment the worker is ready to the end, vs the bare loop's generation rate) and whole
  run (samples ÷ wall seconds of the `generate` call, worker start-up included, vs samples ÷ (model load +
  generation) of the bare loop). Also the worker class run in-process (no Ray), same core: the cost of
  encoding, tar/Parquet writing and commits alone.
- scaling (2 cores): images/s of `generate` with 2 workers ÷ with 1 (torch threads 1 each).
- resume (2 cores): seconds from calling `generate` to its first new image when 9 of 10 shards exist ÷ the
  same for a fresh run (both start their worker on an already running Ray).

    python -m bench.bench_engine [--samples 1200] [--repeats 2] [--sd15-samples 8] [--skip-sd15] [--skip-tiny]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
TINY, SD15 = OUT / "tiny-sd", OUT / "sd15"  # sd15 (~4 GB) is shared with bench_personalize


def build_model(path: Path, preset: str) -> Path:
    from dreamshard.engine.tiny import build_tiny_model

    if not (path / "model_index.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        build_tiny_model(path, preset)
    return path


def make_config(model: Path, size: int, steps: int, batch: int, samples: int, per_shard: int, workers: int):
    from dreamshard.config import GenerateConfig

    return GenerateConfig.model_validate({
        "model": {"path": str(model), "device": "cpu"},
        "sampling": {"width": size, "height": size, "steps": steps, "guidance_scale": 7.5},
        "output": {"samples_per_shard": per_shard},
        "run": {"num_samples": samples, "batch_size": batch, "workers": workers, "torch_threads": 1},
    })  # fmt: skip


def bare_loop(config) -> dict:
    """The plain diffusers loop: images/s of generation (after one warm-up batch), and samples ÷ (load +
    generation) seconds. Images kept in memory."""
    import torch

    from dreamshard.engine.generation import call_pipeline
    from dreamshard.engine.models import load_pipeline
    from dreamshard.engine.plan import build_plan

    torch.set_num_threads(1)
    started = time.perf_counter()
    pipe = load_pipeline(config.model)
    loaded = time.perf_counter() - started
    specs = build_plan(config.prompts, config.sampling, config.run.seed).specs(0, config.run.num_samples)
    batch = config.run.batch_size
    call_pipeline(pipe, specs[:batch])  # warm-up
    images, started = [], time.perf_counter()
    for start in range(0, len(specs), batch):
        images += call_pipeline(pipe, specs[start : start + batch])
    seconds = time.perf_counter() - started
    return {"images_per_s": len(images) / seconds, "whole_images_per_s": len(images) / (loaded + seconds)}


def in_process_worker(config, out: Path) -> float:
    """Images/s of GenerationWorker.generate_shard called in this process (no Ray), after its model load."""
    from dreamshard.engine.plan import build_plan
    from dreamshard.engine.worker import GenerationWorker
    from dreamshard.format.layout import shard_counts

    worker = GenerationWorker(config, str(out), "bench", {"id": str(config.model.path), "hash": ""}, torch_threads=1)
    worker.ready()
    plan, per_shard = build_plan(config.prompts, config.sampling, config.run.seed), config.output.samples_per_shard
    started = time.perf_counter()
    for shard, count in enumerate(shard_counts(config.run.num_samples, per_shard)):
        worker.generate_shard(shard, plan.specs(shard * per_shard, shard * per_shard + count))
    return config.run.num_samples / (time.perf_counter() - started)


def engine(config, out: Path):
    from dreamshard.engine.run import generate

    summary = generate(config, out=str(out), show_progress=False)
    assert summary.ok, summary.failed_shards
    return summary


def one_core_overhead(config, root: Path, repeats: int) -> dict:
    """Bare loop, in-process worker and engine, all on core 0 (alternated; each keeps its best)."""
    import ray

    from dreamshard.cluster import init_local_ray

    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # Ray's processes inherit it
    init_local_ray(num_cpus=1)
    bares, workers, steady, whole = [], [], [], []
    try:
        for repeat in range(repeats):
            bares.append(bare_loop(config))
            workers.append(in_process_worker(config, root / f"inproc{repeat}"))
            run = engine(config, root / f"core1-{repeat}")
            steady.append(run.steady_images_per_s)
            whole.append(config.run.num_samples / run.wall_seconds)
            print(f"1 core, repeat {repeat}: bare {bares[-1]['images_per_s']:.1f} img/s, in-process worker {workers[-1]:.1f}, "
                  f"engine steady {steady[-1]:.1f}, engine whole run {whole[-1]:.1f} (bare whole {bares[-1]['whole_images_per_s']:.1f})", flush=True)  # fmt: skip
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, cores)
    bare = max(b["images_per_s"] for b in bares)
    bare_whole = max(b["whole_images_per_s"] for b in bares)
    return {
        "bare_images_per_s": bare, "bare_whole_images_per_s": bare_whole,
        "in_process_images_per_s": max(workers), "in_process_ratio": max(workers) / bare,
        "engine_images_per_s": max(steady), "steady_ratio": max(steady) / bare,
        "engine_whole_images_per_s": max(whole), "whole_ratio": max(whole) / bare_whole,
    }  # fmt: skip


def two_core_scaling_and_resume(one, root: Path, repeats: int) -> dict:
    import ray

    from dreamshard.cluster import init_local_ray

    init_local_ray(num_cpus=2)
    two_config = one.model_copy(update={"run": one.run.model_copy(update={"workers": 2})})
    try:
        ones, twos = [], []
        for repeat in range(repeats):
            fresh = engine(one, root / f"one{repeat}")
            ones.append(fresh.steady_images_per_s)
            twos.append(engine(two_config, root / f"two{repeat}").steady_images_per_s)
            print(f"2 cores, repeat {repeat}: 1 worker {ones[-1]:.1f}, 2 workers {twos[-1]:.1f} img/s", flush=True)
        last = root / f"one{repeats - 1}"  # made by `fresh`: drop its last commit so 9 of 10 shards exist
        (last / "index" / "000009.commit.json").unlink()
        resumed = engine(one, last)
        assert resumed.shards_generated == 1 and resumed.shards_skipped == 9
    finally:
        ray.shutdown()
    return {
        "one_worker_images_per_s": max(ones), "two_workers_images_per_s": max(twos), "scaling_2_vs_1": max(twos) / max(ones),
        "fresh_first_image_s": fresh.first_image_seconds, "resume_first_image_s": resumed.first_image_seconds,
        "resume_ratio": resumed.first_image_seconds / fresh.first_image_seconds,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1200, help="tiny-model samples per run (64x64)")
    parser.add_argument("--sd15-samples", type=int, default=8, help="sd15-shaped samples per run (128x128)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated repeats of the tiny runs (best kept)")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    result: dict = {}
    try:
        if not args.skip_tiny:
            one = make_config(build_model(TINY, "tiny"), 64, 4, 8, args.samples, args.samples // 10, workers=1)
            result["tiny"] = one_core_overhead(one, root, args.repeats)
            result["tiny"] |= two_core_scaling_and_resume(one, root, args.repeats)
        if not args.skip_sd15:
            config = make_config(build_model(SD15, "sd15"), 128, 4, 2, args.sd15_samples, max(args.sd15_samples // 2, 1), workers=1)
            result["sd15"] = one_core_overhead(config, root, 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    for name, setting in (("tiny", f"64x64, 4 steps, batch 8, {args.samples} samples"), ("sd15", f"128x128, 4 steps, batch 2, {args.sd15_samples} samples")):
        if name not in result:
            continue
        r = result[name]
        print(f"{name} {setting}, 1 core each side: bare loop {r['bare_images_per_s']:.2f} img/s; engine steady {r['engine_images_per_s']:.2f} "
              f"-> ratio {r['steady_ratio']:.3f}; whole run {r['engine_whole_images_per_s']:.2f} vs {r['bare_whole_images_per_s']:.2f} "
              f"-> ratio {r['whole_ratio']:.3f}; worker in-process (no Ray) {r['in_process_images_per_s']:.2f} -> ratio {r['in_process_ratio']:.3f}")  # fmt: skip
    if "tiny" in result:
        r = result["tiny"]
        print(
            f"scaling (2 cores): 1 worker {r['one_worker_images_per_s']:.1f}, 2 workers {r['two_workers_images_per_s']:.1f} img/s -> {r['scaling_2_vs_1']:.2f}x"
        )
        print(f"resume (9/10 shards exist): first new image after {r['resume_first_image_s']:.1f} s vs {r['fresh_first_image_s']:.1f} s fresh "
              f"-> ratio {r['resume_ratio']:.2f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
