"""Personalisation cost: DreamBooth full fine-tuning (DATUM: UNet + text encoder, AdamW) vs LoRA (rank 4 on
the UNet attention) on the `sd15`-shaped random-weight model, a few steps at a small resolution.

Each method runs in its own process so its peak resident memory (ru_maxrss: weights, gradients, optimizer
state, activations, model loading) is its own. Steps/s is the median over the steps after the first (the
first pays one-off allocation). Full fine-tuning is the baseline; LoRA is reported as ratios against it.
The sd15 model (~4 GB) is built once under bench/out/ (git-ignored).

    python -m bench.bench_personalize [--steps 4] [--resolution 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
MODEL = OUT / "sd15"


def build_model() -> None:
    from dreamshard.engine.tiny import build_tiny_model

    if not (MODEL / "model_index.json").is_file():
        shutil.rmtree(MODEL, ignore_errors=True)
        build_tiny_model(MODEL, "sd15")


def train_one(method: str, steps: int, resolution: int) -> dict:
    """Runs in a child process: one personalisation run; returns its figures."""
    from PIL import Image

    from dreamshard.config import PersonalizeConfig, validate
    from dreamshard.personalize.dreambooth import personalize, read_train_log

    work = OUT / f"personalize-{method}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)
    Image.effect_noise((resolution * 3 // 2, resolution), 64).convert("RGB").save(work / "images" / "target.png")
    config = validate(
        PersonalizeConfig,
        {
            "model": {"path": str(MODEL)},
            "instance": {"images": str(work / "images")},
            "train": {"method": method, "max_steps": steps, "resolution": resolution, "train_text_encoder": method == "full"},
            "output": {"path": str(work / "out"), "checkpoint_every": steps},  # no checkpoint: the final save only
        },
    )
    started = time.perf_counter()
    personalize(config)
    wall = time.perf_counter() - started
    seconds = [record["seconds"] for record in read_train_log(work / "out") if "seconds" in record]
    output_bytes = sum(p.stat().st_size for p in (work / "out").rglob("*") if p.is_file() and p.suffix == ".safetensors")
    shutil.rmtree(work, ignore_errors=True)
    return {
        "method": method,
        "steps_per_s": 1.0 / statistics.median(seconds[1:] or seconds),
        "first_step_s": seconds[0],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "wall_s": wall,
        "output_mib": output_bytes / 2**20,
    }


def run_child(method: str, steps: int, resolution: int) -> dict:
    command = [sys.executable, "-m", "bench.bench_personalize", "--child", method, "--steps", str(steps), "--resolution", str(resolution)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(train_one(args.child, args.steps, args.resolution)))
        return {}
    build_model()
    full = run_child("full", args.steps, args.resolution)
    lora = run_child("lora", args.steps, args.resolution)
    result = {"full": full, "lora": lora, "speedup": lora["steps_per_s"] / full["steps_per_s"],
              "memory_ratio": lora["peak_rss_gib"] / full["peak_rss_gib"]}  # fmt: skip
    for run in (full, lora):
        print(f"{run['method']:>4}: {run['steps_per_s']:.3f} steps/s (first step {run['first_step_s']:.1f} s), "
              f"peak RSS {run['peak_rss_gib']:.1f} GiB, output {run['output_mib']:.1f} MiB, wall {run['wall_s']:.0f} s")  # fmt: skip
    print(f"LoRA vs full: {result['speedup']:.2f}x steps/s, {result['memory_ratio']:.2f}x peak memory")
    return result


if __name__ == "__main__":
    main()
