"""Images per pipeline call and busy fraction, before and after the engine formed its calls across whole shards
(issue 21): the same scenarios run by the worker class of two versions of dreamshard, in this run.

- before: the engine as it was at BEFORE (a git worktree of this repository at that commit): calls grouped
  per batch by exact guidance value, split by strength, quality judged image by image, redraws in rounds of
  the rejected ones;
- after: the working tree.

Each scenario runs in a fresh process per side, one worker in process (no Ray), one torch thread, tiny models
built once under bench/out: every pipeline call is counted by wrapping the function all modes call
(`call_pipeline` before, `render` after) and timed; busy = seconds inside pipeline calls / seconds of the
shards' `generate_shard`. Scenarios:
- txt2img: a guidance range [3, 9] (DIDEX-style), batch 8, 64 samples in shards of 32;
- controlnet_seg: configs/zodi_controlnet.yaml's five domains and three strengths, stochastic inversion, a
  tiny ControlNet, 16 source images x 5 domains, batch 4, shards of 40;
- filtered: txt2img at guidance 7.5, a tiny CLIP model, min_clip_score at the median of the scores of the
  same samples unfiltered, batch 8, 64 samples in one shard.

    python -m bench.bench_batching [--before COMMIT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
BEFORE = "1a2a596"  # the engine before issue 21
DOMAINS = {"driving at night": 0.9, "driving in snow": 0.65, "driving under rain": 0.65, "driving in fog": 0.6, "driving in a game": 0.6}

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from dreamshard.config import GenerateConfig
from dreamshard.engine import generation, conditioned
from dreamshard.engine.conditioned import conditioner_for
from dreamshard.engine.models import model_identity
from dreamshard.engine.plan import build_plan
from dreamshard.engine.worker import GenerationWorker

config = GenerateConfig.model_validate(json.loads(sys.argv[1]))
name = "render" if hasattr(generation, "render") else "call_pipeline"
calls = []

def counted(function):
    def wrapper(pipe, specs, *args, **kwargs):
        started = time.perf_counter()
        result = function(pipe, specs, *args, **kwargs)
        calls.append((len(specs), time.perf_counter() - started))
        return result
    return wrapper

for module in (generation, conditioned):
    if hasattr(module, name):
        setattr(module, name, counted(getattr(module, name)))
worker = GenerationWorker(config, config.output.path, "bench", model_identity(config.model), torch_threads=1, conditioner=conditioner_for(config))
worker.ready()
plan, size = build_plan(config.prompts, config.sampling, config.run.seed), config.output.samples_per_shard
seconds, scores = 0.0, []
for shard, start in enumerate(range(0, config.run.num_samples, size)):
    specs = plan.specs(start, min(start + size, config.run.num_samples))
    started = time.perf_counter()
    worker.generate_shard(shard, specs)
    seconds += time.perf_counter() - started
import pyarrow.parquet as pq
for shard in range(shard + 1):
    scores += pq.read_table(f"{config.output.path}/index/{shard:06d}.parquet").column("clip_score").to_pylist()
print(json.dumps({"calls": len(calls), "images": sum(n for n, _ in calls), "in_calls_s": sum(s for _, s in calls), "shards_s": seconds, "clip_scores": scores}))
"""


def build_models() -> dict[str, Path]:
    from dreamshard.engine.tiny import build_tiny_model

    models = {}
    for name, preset in (("sd", "tiny"), ("controlnet", "tiny-controlnet"), ("clip", "tiny-clip")):
        path = OUT / f"batching-{preset}"
        if not path.exists():
            build_tiny_model(path, preset)
        models[name] = path
    return models


def write_cityscapes(root: Path, items: int) -> Path:
    """A Cityscapes-layout source: random images, block labels of Cityscapes ids."""
    rng = np.random.default_rng(0)
    values = np.array([7, 8, 11, 21, 23, 24, 26])
    for i in range(items):
        base = f"aachen_{i:06d}_000019"
        label = np.kron(rng.choice(values, size=(12, 24)), np.ones((4, 4), dtype=np.int64)).astype(np.uint8)
        for folder, name, array in (("leftImg8bit", "leftImg8bit", rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)), ("gtFine", "gtFine_labelIds", label)):
            path = root / folder / "train" / "aachen" / f"{base}_{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    return root


def scenarios(models: dict[str, Path], tmp: Path) -> dict[str, dict]:
    base = {"model": {"path": str(models["sd"]), "device": "cpu"}, "sampling": {"width": 64, "height": 64, "steps": 4, "guidance_scale": 7.5}}
    zodi = {
        "mode": "controlnet_seg", "model": {**base["model"], "controlnet": str(models["controlnet"]), "scheduler": "ddim"},
        "source": {"layout": "cityscapes", "root": str(write_cityscapes(tmp / "cityscapes", 16))},
        "condition": {"init_noise": "stochastic_inversion", "strength_by_style": DOMAINS},
        "prompts": {"templates": [{"text": "{domain}, best quality"}], "styles": {"domain": list(DOMAINS)}, "pair_items_with": "domain"},
        "sampling": {"width": 64, "height": 32, "steps": 4, "guidance_scale": 9.0, "eta": 1.0},
        "output": {"samples_per_shard": 40}, "run": {"num_samples": 80, "batch_size": 4, "seed": 42},
    }  # fmt: skip
    return {
        "txt2img": {
            **base,
            "sampling": {**base["sampling"], "guidance_scale": [3.0, 9.0]},
            "output": {"samples_per_shard": 32},
            "run": {"num_samples": 64, "batch_size": 8},
        },
        "controlnet_seg": zodi,
        "filtered": {**base, "quality": {"clip_model": str(models["clip"])}, "output": {"samples_per_shard": 64}, "run": {"num_samples": 64, "batch_size": 8}},
    }


def run_side(root: Path, config: dict, out: Path) -> dict:
    config = json.loads(json.dumps(config))
    config.setdefault("output", {})["path"] = str(out)
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], env=env, capture_output=True, text=True, cwd=tmp_cwd(), check=False)
    if done.returncode:
        raise RuntimeError(f"{root}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tmp_cwd() -> str:
    return tempfile.gettempdir()  # not the repository: the child imports dreamshard from PYTHONPATH only


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="the commit whose engine is 'before'")
    args = parser.parse_args(argv)
    models = build_models()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before], check=True, capture_output=True)
        try:
            configs = scenarios(models, tmp)
            scored = run_side(REPO, configs["filtered"], tmp / "scored")  # the median of the unfiltered scores
            configs["filtered"]["quality"] |= {"min_clip_score": float(np.median(scored["clip_scores"])), "max_attempts": 30}
            for name, config in configs.items():
                results[name] = {side: run_side(root, config, tmp / f"{name}-{side}") for side, root in (("before", before), ("after", REPO))}
                print(name, {side: {k: v for k, v in r.items() if k != "clip_scores"} for side, r in results[name].items()}, flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False, capture_output=True)
    print(table(results, configs))
    return results


def table(results: dict, configs: dict) -> str:
    lines = [
        "| scenario | batch | images per call before | after | busy before | after | images drawn before / after | img/s before | after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, sides in results.items():
        cells = {side: r for side, r in sides.items()}
        per_call = {side: r["images"] / r["calls"] for side, r in cells.items()}
        busy = {side: r["in_calls_s"] / r["shards_s"] for side, r in cells.items()}
        rate = {side: configs[name]["run"]["num_samples"] / r["shards_s"] for side, r in cells.items()}
        lines.append(
            f"| {name} | {configs[name]['run']['batch_size']} | {per_call['before']:.2f} | **{per_call['after']:.2f}** | {100 * busy['before']:.0f}% | "
            f"**{100 * busy['after']:.0f}%** | {cells['before']['images']} / {cells['after']['images']} | {rate['before']:.2f} | {rate['after']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
