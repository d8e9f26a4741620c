"""How far run.compile moves the images, against what the JPEG codec itself does to them.

The engine's loader and call (load_pipeline + call_pipeline, in process, no Ray) on the tiny model, the
default plan's first --batches x --batch samples, eager and then compiled (run.compile: UNet and VAE decoder).
Per batch it prints:
- lossless: the largest 8-bit difference between eager and compiled images and how many values differ;
- after JPEG: the same comparison after each is encoded at --quality (the shards' default codec);
- JPEG's own error: eager JPEG against eager lossless, the error every JPEG shard carries anyway.

Random-weight images are near noise, the worst case for JPEG: a value that rounding moves by one level can move
a block's quantised DCT coefficients across a step, so the after-JPEG difference is not bounded by the lossless
one. The first compiled call pays the compile (minutes cold on the CPU).

    python -m bench.bench_compile_images [--batches 12] [--batch 4] [--size 64] [--steps 2] [--quality 95]
"""

from __future__ import annotations

import argparse
import io

import numpy as np

from bench.bench_gpu import build_model


def as_pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.int16) for image in images])


def through_jpeg(images, quality: int) -> np.ndarray:
    from PIL import Image

    from dreamshard.format.shards import encode_image

    return as_pixels([Image.open(io.BytesIO(encode_image(image, "jpg", quality))) for image in images])


def generate(config, batches: list[list]) -> list[list]:
    from dreamshard.engine.generation import call_pipeline
    from dreamshard.engine.models import load_pipeline

    pipe = load_pipeline(config.model, speed=config.run)
    return [call_pipeline(pipe, specs) for specs in batches]


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from dreamshard.config import GenerateConfig
    from dreamshard.engine.plan import build_plan

    parser = argparse.ArgumentParser(prog="python -m bench.bench_compile_images")
    for name, default in (("batches", 12), ("batch", 4), ("size", 64), ("steps", 2), ("quality", 95)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    config = GenerateConfig.model_validate({
        "model": {"path": str(build_model("tiny")), "device": "cpu"},
        "sampling": {"width": args.size, "height": args.size, "steps": args.steps, "guidance_scale": 5.0},
        "run": {"num_samples": args.batches * args.batch, "batch_size": args.batch},
    })  # fmt: skip
    specs = build_plan(config.prompts, config.sampling, config.run.seed).specs(0, config.run.num_samples)
    batches = [specs[start : start + args.batch] for start in range(0, len(specs), args.batch)]
    eager = generate(config, batches)
    config.run.compile = True
    compiled = generate(config, batches)
    rows = []
    for index, (plain, fast) in enumerate(zip(eager, compiled)):
        lossless = np.abs(as_pixels(plain) - as_pixels(fast))
        plain_jpeg = through_jpeg(plain, args.quality)
        row = {
            "batch": index, "lossless_max": int(lossless.max()), "lossless_values_differing": int((lossless > 0).sum()),
            "jpeg_max": int(np.abs(plain_jpeg - through_jpeg(fast, args.quality)).max()),
            "jpeg_own_error_max": int(np.abs(plain_jpeg - as_pixels(plain)).max()),
            "jpeg_own_error_mean": float(np.abs(plain_jpeg - as_pixels(plain)).mean()),
        }  # fmt: skip
        rows.append(row)
        print(" ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()), flush=True)
    values = lossless.size
    print(
        f"{len(rows)} batches of {args.batch} ({values:,} values each): lossless max {max(r['lossless_max'] for r in rows)}, "
        f"after JPEG q{args.quality} max {max(r['jpeg_max'] for r in rows)} (median {int(np.median([r['jpeg_max'] for r in rows]))}); "
        f"JPEG's own error max {min(r['jpeg_own_error_max'] for r in rows)}-{max(r['jpeg_own_error_max'] for r in rows)}, "
        f"mean {np.mean([r['jpeg_own_error_mean'] for r in rows]):.1f}",
        flush=True,
    )
    return rows


if __name__ == "__main__":
    main()
