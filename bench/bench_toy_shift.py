"""The toy domain shift: mIoU on target val of source-only vs DACS (configs/toy_*.yaml, 150 iterations),
per seed, and per-class IoU for the first seed, on the data `dreamshard toy-data` writes. The proof that
the trainer adapts, printed by a script so the figures in docs/benchmarks.md can be re-made.

    python -m bench.bench_toy_shift [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(method: str, seed: int, toy: dict, out: Path) -> dict:
    from dreamshard.config import TrainConfig, load_config
    from dreamshard.trainer.loop import train

    sets = [
        f"output.path={out}/{method}-s{seed}", f"seed={seed}", "progress=false",
        f"data.source.folder.root={toy['source']}", f"data.val.folder.root={toy['target_val']}",
    ]  # fmt: skip
    if method == "dacs":
        sets.append(f"data.target.shards.path={toy['target']}")
    return train(load_config(CONFIGS / f"toy_{method}.yaml", TrainConfig, sets))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    from dreamshard.trainer.toy import make_toy

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        toy = make_toy(Path(tmp) / "toy")  # what `dreamshard toy-data` writes
        for seed in args.seeds:
            results[seed] = {method: run(method, seed, toy, Path(tmp)) for method in ("source_only", "dacs")}
    print("| seed | source_only | dacs | gain | source_only it/s | dacs it/s |\n| --- | --- | --- | --- | --- | --- |")
    for seed, pair in results.items():
        so, da = pair["source_only"], pair["dacs"]
        print(f"| {seed} | {so['mIoU']:.3f} | {da['mIoU']:.3f} | {da['mIoU'] - so['mIoU']:+.3f} | {so['it_per_s']:.1f} | {da['it_per_s']:.1f} |")
    first = results[args.seeds[0]]
    per_class = ", ".join(
        f"{name} {first['source_only']['per_class_iou'][name]:.2f} → {first['dacs']['per_class_iou'][name]:.2f}" for name in first["dacs"]["per_class_iou"]
    )
    print(f"per class IoU, seed {args.seeds[0]}, source_only → dacs: {per_class}")
    return results


if __name__ == "__main__":
    main()
