"""Trainer: input pipeline throughput and toy training speed.

1. Input pipeline (decode + weak augmentation + batch): the trainer's streaming shard reader
   (`dreamshard.trainer.data.train_loader` over engine shards written with the engine's writer) vs the
   usual baseline, a `torch` DataLoader over the same images as a folder of files (one file per image,
   PIL decode, the same `Augment`, default collation), with the same workers and batch size, and like for
   like: each format's shards against a folder of the SAME format and bytes (png vs png, jpg vs jpg). Images
   are 512x512 (SD's size) smooth scenes with sensor noise, so PNG/JPEG sizes are photo-like. Two settings:
   crop 384 at full size, and resize to 256 then crop 224 (where JPEG decodes at reduced scale, on both
   sides: the folder baseline uses the same `Augment.decode`).
2. Training it/s on CPU for the toy models (source_only and dacs steps).

    python -m bench.bench_trainer [--images 256] [--workers 2] [--batches 48] [--iters 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 512


def scene(rng: np.random.Generator) -> Image.Image:
    coarse = rng.integers(0, 256, size=(SIZE // 32 + 1, SIZE // 32 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BILINEAR)).astype(np.int16)
    noisy = smooth + rng.integers(-6, 7, size=smooth.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_data(root: Path, count: int, per_shard: int) -> None:
    from dreamshard.format.rundir import write_dataset
    from dreamshard.format.shards import ShardSample, encode_image

    rng = np.random.default_rng(0)
    images = [scene(rng) for _ in range(count)]
    for fmt in FORMATS:
        (root / f"folder_{fmt}").mkdir(parents=True)
        for i, image in enumerate(images):  # the same encoder and quality as the shards: the same bytes
            (root / f"folder_{fmt}" / f"{i:06d}.{fmt}").write_bytes(encode_image(image, fmt))
        write_dataset(root / f"shards_{fmt}", [ShardSample({"index": i}, image) for i, image in enumerate(images)], per_shard, image_format=fmt)


FORMATS = ("png", "jpg")


class Folder(torch.utils.data.Dataset):
    def __init__(self, folder: Path, augment):
        self.files, self.augment = sorted(folder.iterdir()), augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.augment.decode(self.files[index].read_bytes())
        return self.augment(image, None, np.random.default_rng(index))[0]


def forever(loader):
    while True:  # a finite DataLoader restarts its epoch (persistent workers); the stream never ends anyway
        yield from loader


def throughput(loader, batches: int, warmup: int = 4) -> float:
    iterator = forever(loader)
    for _ in range(warmup):
        next(iterator)
    started, samples = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(iterator)
        samples += (batch["image"] if isinstance(batch, dict) else batch).shape[0]
    return samples / (time.perf_counter() - started)


def bench_input(root: Path, workers: int, batches: int, batch_size: int) -> list[tuple[str, float]]:
    from dreamshard.config import DomainConfig, ShardsConfig, TrainDataConfig
    from dreamshard.trainer.data import Augment, train_loader

    rows = []
    for resize, crop in ((None, (384, 384)), ((256, 256), (224, 224))):
        setting = f"crop {crop[0]}" if resize is None else f"resize {resize[0]} + crop {crop[0]}"
        augment = Augment(resize, crop, flip=True)
        data = TrainDataConfig(crop_size=crop, batch_size=batch_size, workers=workers, flip=True)
        for fmt in FORMATS:
            files = Folder(root / f"folder_{fmt}", augment)
            folder = torch.utils.data.DataLoader(files, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
            rows.append((f"{setting}: DataLoader over {fmt} files (baseline)", throughput(folder, batches)))
            domain = DomainConfig(shards=ShardsConfig(path=str(root / f"shards_{fmt}"), shuffle_buffer=256), resize=resize)
            rate = throughput(train_loader("target", domain, data, labelled=False, seed=0, batches=batches + 8), batches)
            rows.append((f"{setting}: streaming {fmt} shards", rate))
    return rows


def bench_training(iters: int) -> list[tuple[str, float]]:
    from dreamshard.config import TrainConfig, load_config
    from dreamshard.trainer.loop import train
    from dreamshard.trainer.toy import make_toy

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        toy = make_toy(Path(tmp) / "toy", num_source=64, num_target=64, num_val=16)
        for method in ("source_only", "dacs"):
            sets = [
                f"output.path={tmp}/{method}",
                f"max_iters={iters}",
                "progress=false",
                f"data.source.folder.root={toy['source']}",
                f"data.val.folder.root={toy['target_val']}",
            ]
            if method == "dacs":
                sets.append(f"data.target.shards.path={toy['target']}")
            summary = train(load_config(Path(__file__).parents[1] / "configs" / f"toy_{method}.yaml", TrainConfig, sets))
            rows.append((f"toy {method} (configs/toy_{method}.yaml)", summary.it_per_s))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp), args.images, per_shard=64)
        rows = bench_input(Path(tmp), args.workers, args.batches, args.batch_size)
    print(f"\ninput pipeline, {args.workers} workers, batch {args.batch_size}, {SIZE}x{SIZE} images:")
    print("| what | samples/s | vs baseline |\n| --- | --- | --- |")
    base = None
    for name, rate in rows:
        base = rate if "baseline" in name else base
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    print("\ntoy training on CPU:\n| what | it/s |\n| --- | --- |")
    for name, rate in bench_training(args.iters):
        print(f"| {name} | {rate:.2f} |")


if __name__ == "__main__":
    main()
