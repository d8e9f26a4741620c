"""Generation engine: overhead against a bare diffusers loop, scaling 2 workers vs 1, resume cost.

- overhead: images/s of `generate` with 1 CPU worker (torch threads 1) ÷ images/s of a bare loop in this
  process (same model, batch, steps, resolution, threads 1; `pipe(...)` with per-sample generators, images
  kept in memory). The engine's images/s is `RunSummary.steady_images_per_s`: images committed from the
  moment all its workers are ready (models loaded) to the end of the run, over that time; encoding,
  tar/Parquet writing, commits and scheduling are all inside it, worker start-up is not.
- scaling: images/s of `generate` with 2 workers ÷ with 1 (torch threads 1 each).
- resume: seconds from calling `generate` to its first new image when 9 of 10 shards exist ÷ the same for
  a fresh run (both on an already running Ray; both include starting the worker).

    python -m bench.bench_engine [--samples 240] [--repeats 2] [--sd15-samples 8] [--skip-sd15] [--skip-tiny]
"""

from __future__ import annotations

import argparse
import logging
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


def bare_loop(config) -> float:
    """Images/s of the plain diffusers loop (after one warm-up batch), images kept in memory."""
    import torch

    from dreamshard.engine.models import load_pipeline
    from dreamshard.engine.plan import build_plan

    torch.set_num_threads(1)
    pipe = load_pipeline(config.model)
    specs = build_plan(config.prompts, config.sampling, config.run.seed).specs(0, config.run.num_samples)
    batch = config.run.batch_size

    def call(chunk):
        return pipe(
            prompt=[s.prompt for s in chunk], negative_prompt=[s.negative_prompt for s in chunk],
            num_inference_steps=chunk[0].steps, guidance_scale=chunk[0].guidance_scale,
            width=chunk[0].width, height=chunk[0].height,
            generator=[torch.Generator("cpu").manual_seed(s.seed) for s in chunk], output_type="pil",
        ).images  # fmt: skip

    call(specs[:batch])
    images, started = [], time.perf_counter()
    for start in range(0, len(specs), batch):
        images += call(specs[start : start + batch])
    return len(images) / (time.perf_counter() - started)


def engine(config, out: Path):
    from dreamshard.engine.run import generate

    summary = generate(config, out=str(out), show_progress=False)
    assert summary.ok, summary.failed_shards
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1200, help="tiny-model samples per run (64x64)")
    parser.add_argument("--sd15-samples", type=int, default=8, help="sd15-shaped samples per run (128x128)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated repeats of the tiny runs (best kept)")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args(argv)

    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    logging.getLogger("ray").setLevel(logging.WARNING)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    result: dict = {}
    try:
        if not args.skip_tiny:
            tiny = build_model(TINY, "tiny")
            one = make_config(tiny, 64, 4, 8, args.samples, args.samples // 10, workers=1)
            two_config = one.model_copy(update={"run": one.run.model_copy(update={"workers": 2})})
            # Alternate the measurements and keep each one's best: other jobs on the machine only ever slow a run down.
            bares, ones, twos = [], [], []
            for repeat in range(args.repeats):
                bares.append(bare_loop(one))
                fresh = engine(one, root / f"one{repeat}")
                ones.append(fresh.steady_images_per_s)
                twos.append(engine(two_config, root / f"two{repeat}").steady_images_per_s)
                print(f"repeat {repeat}: bare {bares[-1]:.1f}, engine 1 worker {ones[-1]:.1f}, 2 workers {twos[-1]:.1f} img/s", flush=True)
            bare, engine_one, engine_two = max(bares), max(ones), max(twos)
            result["tiny"] = {"bare_images_per_s": bare, "engine_images_per_s": engine_one, "overhead_ratio": engine_one / bare,
                              "two_workers_images_per_s": engine_two, "scaling_2_vs_1": engine_two / engine_one}  # fmt: skip

            # resume: drop the last shard's commit so 9 of 10 shards exist
            last = root / f"one{args.repeats - 1}"  # made by `fresh`
            (last / "index" / "000009.commit.json").unlink()
            started = time.perf_counter()
            resumed = engine(one, last)
            assert resumed.shards_generated == 1 and resumed.shards_skipped == 9
            result["resume"] = {"fresh_first_image_s": fresh.first_image_seconds, "resume_first_image_s": resumed.first_image_seconds,
                                "ratio": resumed.first_image_seconds / fresh.first_image_seconds,
                                "resume_wall_s": time.perf_counter() - started}  # fmt: skip

        if not args.skip_sd15:
            sd15 = build_model(SD15, "sd15")
            config = make_config(sd15, 128, 4, 2, args.sd15_samples, max(args.sd15_samples // 2, 1), workers=1)
            bare = bare_loop(config)
            print(f"sd15 bare loop: {bare:.3f} img/s", flush=True)
            run = engine(config, root / "sd15")
            result["sd15"] = {"bare_images_per_s": bare, "engine_images_per_s": run.steady_images_per_s,
                              "overhead_ratio": run.steady_images_per_s / bare}  # fmt: skip
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    if "tiny" in result:
        tiny_r, resume = result["tiny"], result["resume"]
        print(f"tiny 64x64, 4 steps, batch 8, {args.samples} samples: bare {tiny_r['bare_images_per_s']:.1f} img/s, "
              f"engine 1 worker {tiny_r['engine_images_per_s']:.1f} img/s -> overhead ratio {tiny_r['overhead_ratio']:.3f}")  # fmt: skip
        print(f"scaling: 2 workers {tiny_r['two_workers_images_per_s']:.1f} img/s -> {tiny_r['scaling_2_vs_1']:.2f}x of 1 worker")
        print(f"resume (9/10 shards exist): first new image after {resume['resume_first_image_s']:.1f} s vs "
              f"{resume['fresh_first_image_s']:.1f} s fresh -> ratio {resume['ratio']:.2f}")  # fmt: skip
    if "sd15" in result:
        sd = result["sd15"]
        print(f"sd15 128x128, 4 steps, batch 2, {args.sd15_samples} samples: bare {sd['bare_images_per_s']:.3f} img/s, "
              f"engine {sd['engine_images_per_s']:.3f} img/s -> overhead ratio {sd['overhead_ratio']:.3f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
