"""The toy domain shift: mIoU on target val of source-only vs each adaptation method (configs/toy_*.yaml:
dacs, zodi on the toy twins, clouds), per seed and per backbone/decoder, and per-class IoU for the first seed,
on the data `dreamshard toy-data` writes. The proof that the trainer adapts, printed by a script so the
figures in docs/benchmarks.md can be re-made. A model is BACKBONE:DECODER[:ITERATIONS][:hrda] (default 150,
the toy configs' budget; `hrda`: HRDA's multi-resolution training and inference, a detail crop of half the
crop); the toy configs' own model is test_resnet:segformer; the backbone `dinov2-tiny` is the tiny-dinov2
preset's random weights. Every model here starts from a random initialisation (no pretrained weights).

    python -m bench.bench_toy_shift [--seeds 0 1] [--methods dacs zodi clouds] [--models test_resnet:segformer mit_b0:daformer]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# DeepLabV2's linear classifier on the last stage learns the toy task more slowly than the fusing heads:
# at 150 iterations DACS gains only a few points over source-only there (docs/benchmarks.md).
MODELS = ["test_resnet:segformer", "mit_b0:daformer", "test_resnet:deeplabv2:400"]


def run(method: str, seed: int, model: str, toy: dict, out: Path, size: int = 64) -> dict:  # noqa: C901 - one branch per option
    from dreamshard.config import TrainConfig, load_config
    from dreamshard.trainer.loop import train

    backbone, decoder, *rest = model.split(":")
    iterations = [part for part in rest if part.isdigit()]
    sets = [
        f"output.path={out}/{method}-{model.replace(':', '-')}-s{seed}", f"seed={seed}", "progress=false", "image_interval=0",
        f"model.decoder={decoder}", f"max_iters={iterations[0] if iterations else 150}",
        f"data.source.folder.root={toy['source']}", f"data.val.folder.root={toy['target_val']}",
    ]  # fmt: skip
    if backbone == "dinov2-tiny":  # the tiny-dinov2 preset: random weights through the real loading code
        sets += ["model.backbone=dinov2", f"model.pretrained={toy['dinov2']}"]
    else:
        sets.append(f"model.backbone={backbone}")
    if size != 64:  # larger toy images: crops of the whole image
        sets.append(f"data.crop_size=[{size}, {size}]")
    if "hrda" in rest:  # HRDA: the context at half the crop, a detail crop of half its side
        sets += ["model.hrda.enabled=true", f"model.hrda.hr_crop_size=[{size // 2}, {size // 2}]"]
    if method in ("dacs", "clouds"):
        sets.append(f"data.target.shards.path={toy['target']}")
    if method == "zodi":
        sets.append(f"data.target.shards.path={toy['target_twins']}")
    return train(load_config(CONFIGS / f"toy_{method}.yaml", TrainConfig, sets))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", default=MODELS, help="BACKBONE:DECODER[:ITERATIONS][:hrda]")
    parser.add_argument("--size", type=int, default=64, help="toy image side (and crop): 64 as `dreamshard toy-data`")
    parser.add_argument("--methods", nargs="+", default=["dacs"], choices=["dacs", "zodi", "clouds"], help="held against source_only")
    args = parser.parse_args(argv)
    from dreamshard.trainer.toy import make_toy

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        toy = make_toy(Path(tmp) / "toy", size=args.size)  # what `dreamshard toy-data` writes (at --size)
        if any(model.startswith("dinov2-tiny") for model in args.models):
            from dreamshard.engine.tiny import build_tiny_model

            toy["dinov2"] = build_tiny_model(Path(tmp) / "dinov2", "tiny-dinov2")
        methods = ["source_only", *args.methods]
        for model in args.models:
            for seed in args.seeds:
                results[model, seed] = {method: run(method, seed, model, toy, Path(tmp), args.size) for method in methods}
                print(f"{model} seed {seed}: " + ", ".join(f"{m} {r.mIoU:.1f}" for m, r in results[model, seed].items()), flush=True)
    print_tables(results, args.models, args.seeds, methods)
    return results


def print_tables(results: dict, models: list[str], seeds: list[int], methods: list[str]) -> None:
    adapted = methods[1:]
    print("| backbone:decoder[:iterations] | seed | " + " | ".join(methods) + " | " + " | ".join(f"{m} gain" for m in adapted) + " | it/s |")
    print("| --- " * (3 + 2 * len(adapted)) + "| --- |")
    for (model, seed), runs in results.items():
        so = runs["source_only"].mIoU
        speeds = "/".join(f"{runs[m].it_per_s:.1f}" for m in methods)
        print(
            f"| {model} | {seed} | "
            + " | ".join(f"{runs[m].mIoU:.1f}" for m in methods)
            + " | "
            + " | ".join(f"{runs[m].mIoU - so:+.1f}" for m in adapted)
            + f" | {speeds} |"
        )
    for model in models:
        first = results[model, seeds[0]]
        for method in adapted:
            per_class = ", ".join(
                f"{name} {first['source_only'].per_class_iou[name]:.1f} → {first[method].per_class_iou[name]:.1f}" for name in first[method].per_class_iou
            )
            print(f"{model}, per class IoU, seed {seeds[0]}, source_only → {method}: {per_class}")


if __name__ == "__main__":
    main()
