"""Trainer: input pipeline throughput and training speed, before and after the epoch-order loader (issue 23),
measured by the code of two versions of dreamshard in this run:

- before: dreamshard at BEFORE (a git worktree of this repository at that commit): webdataset streams of
  resampled shards through a shuffle buffer (256), batched in the workers, PIL decoding;
- after: the working tree: map-style batches in the epoch order (blocks of 1024), each sample seeded by its
  position; with PIL decoding (`data.decoder: pil`) and with torchvision.io (`torchvision`, the default).

1. Input pipeline (decode + weak augmentation + batch of 8, 2 DataLoader workers, each side in a fresh
   process): engine shards written with the engine's writer, 512x512 smooth scenes with sensor noise (so
   PNG/JPEG sizes are photo-like), the same images for both sides, like for like per format (png vs png, jpg
   vs jpg). Two settings: crop 384 at full size; resize to 256 then crop 224 (where PIL decodes JPEGs at a
   reduced DCT scale). A `torch` DataLoader over the same images as a folder of files (PIL, the same
   augmentation) is printed as a reference.
2. Training it/s on CPU, toy configs (source_only and dacs), each side's own configs and loop.

    python -m bench.bench_trainer [--images 256] [--workers 2] [--batches 48] [--iters 40] [--before COMMIT]
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
BEFORE = "0bf28b1"  # the trainer before issue 23
SIZE = 512
FORMATS = ("png", "jpg")
SETTINGS = ((None, (384, 384)), ((256, 256), (224, 224)))

CHILD = r"""
import json, sys, time
import numpy as np, torch
from pathlib import Path
args = json.loads(sys.argv[1])
from dreamshard.config import DomainConfig, ShardsConfig, TrainDataConfig
import dreamshard.trainer.data as data_module

def throughput(batches, count, warmup=4):
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    started, samples = time.perf_counter(), 0
    for _ in range(count):
        batch = next(iterator)
        samples += (batch["image"] if isinstance(batch, dict) else batch).shape[0]
    return samples / (time.perf_counter() - started)

resize = tuple(args["resize"]) if args["resize"] else None
crop = tuple(args["crop"])
total = args["batches"] + 4
if args["what"] == "folder":
    augment = data_module.Augment(resize, crop, flip=True)
    files = sorted(Path(args["path"]).iterdir())
    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)
        def __getitem__(self, index):
            pixels = augment.decode(files[index].read_bytes())
            if not isinstance(pixels, np.ndarray):  # older Augment.decode returned a PIL image
                pixels = augment.resized(pixels) if hasattr(augment, "resized") else pixels
            return augment(pixels, None, np.random.default_rng(index))[0]
    def forever(loader):
        while True:
            yield from loader
    loader = torch.utils.data.DataLoader(Folder(), batch_size=args["batch_size"], shuffle=True, num_workers=args["workers"], persistent_workers=args["workers"] > 0)
    rate = throughput(forever(loader), args["batches"])
elif hasattr(data_module, "batch_stream"):  # after
    from dreamshard.trainer.order import ReadPlan
    domain = DomainConfig(shards=ShardsConfig(path=args["path"]), resize=resize)
    data = TrainDataConfig(crop_size=crop, workers=args["workers"], decoder=args["decoder"])
    rate = throughput(data_module.batch_stream("target", domain, data, False, 0, ReadPlan(total, args["batch_size"])), args["batches"])
else:  # before
    domain = DomainConfig(shards=ShardsConfig(path=args["path"], shuffle_buffer=256), resize=resize)
    data = TrainDataConfig(crop_size=crop, batch_size=args["batch_size"], workers=args["workers"])
    rate = throughput(data_module.train_loader("target", domain, data, labelled=False, seed=0, batches=total), args["batches"])
print(json.dumps({"rate": rate}))
"""

TRAIN_CHILD = r"""
import json, sys
from pathlib import Path
args = json.loads(sys.argv[1])
from dreamshard.config import TrainConfig, load_config
from dreamshard.trainer.loop import train
sets = [f"output.path={args['out']}", f"max_iters={args['iters']}", "progress=false", f"data.source.folder.root={args['source']}",
        f"data.val.folder.root={args['val']}", "eval_interval=0", "checkpoint_interval=0"]
if args["method"] == "dacs":
    sets.append(f"data.target.shards.path={args['target']}")
if "image_interval" in TrainConfig.model_fields:
    sets.append("image_interval=0")  # pictures are not what this measures
summary = train(load_config(Path(args["configs"]) / f"toy_{args['method']}.yaml", TrainConfig, sets))
print(json.dumps({"rate": summary.it_per_s}))
"""


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


def child(code: str, root: Path, args: dict) -> float:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(), check=False)
    if done.returncode:
        raise RuntimeError(f"{root}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rate"]


def bench_input(before: Path, data: Path, workers: int, batches: int, batch_size: int) -> list[tuple[str, str, float]]:
    rows = []
    for resize, crop in SETTINGS:
        setting = f"crop {crop[0]}" if resize is None else f"resize {resize[0]} + crop {crop[0]}"
        common = {"resize": resize, "crop": crop, "workers": workers, "batches": batches, "batch_size": batch_size, "decoder": "pil"}
        for fmt in FORMATS:
            shards = {**common, "what": "shards", "path": str(data / f"shards_{fmt}")}
            rows.append(
                (setting, f"{fmt}: DataLoader over files (reference)", child(CHILD, REPO, {**common, "what": "folder", "path": str(data / f"folder_{fmt}")}))
            )
            rows.append((setting, f"{fmt}: before (webdataset stream)", child(CHILD, before, shards)))
            rows.append((setting, f"{fmt}: after, PIL decode", child(CHILD, REPO, shards)))
            rows.append((setting, f"{fmt}: after, torchvision decode (default)", child(CHILD, REPO, {**shards, "decoder": "torchvision"})))
    return rows


def bench_training(before: Path, iters: int, tmp: Path) -> list[tuple[str, float, float]]:
    from dreamshard.trainer.toy import make_toy

    toy = make_toy(tmp / "toy", num_source=64, num_target=64, num_val=16)
    rows = []
    for method in ("source_only", "dacs"):
        rates = []
        for side, root in (("before", before), ("after", REPO)):
            args = {
                "method": method,
                "iters": iters,
                "out": str(tmp / f"{side}_{method}"),
                "configs": str(root / "configs"),
                **{k: str(v) for k, v in toy.items()},
            }
            args["val"] = args.pop("target_val")
            rates.append(child(TRAIN_CHILD, root, args))
        rows.append((f"toy {method} (configs/toy_{method}.yaml)", rates[0], rates[1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--before", default=BEFORE)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before], check=True, capture_output=True)
        try:
            write_data(tmp / "data", args.images, per_shard=64)
            inputs = bench_input(before, tmp / "data", args.workers, args.batches, args.batch_size)
            training = bench_training(before, args.iters, tmp)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False, capture_output=True)

    print(f"\ninput pipeline, {args.workers} workers, batch {args.batch_size}, {SIZE}x{SIZE} images, samples/s (ratio: against before, same format):")
    print("| setting | what | samples/s | vs before |\n| --- | --- | --- | --- |")
    base = {}
    for setting, what, rate in inputs:
        fmt = what.split(":")[0]
        if "before" in what:
            base[(setting, fmt)] = rate
    for setting, what, rate in inputs:
        ratio = rate / base[(setting, what.split(":")[0])]
        print(f"| {setting} | {what} | {rate:.1f} | {ratio:.2f}x |")
    print("\ntoy training on CPU, iterations/s:\n| what | before | after | after / before |\n| --- | --- | --- | --- |")
    for name, before_rate, after_rate in training:
        print(f"| {name} | {before_rate:.2f} | {after_rate:.2f} | {after_rate / before_rate:.2f}x |")


if __name__ == "__main__":
    main()
