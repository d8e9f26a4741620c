"""Labelled sources: the pre-scan and the per-sample source loading of the conditioned modes.

A synthetic GTA5-layout dataset at GTA5's size (1914x1052; smooth images and block label layouts, so PNG
decoding costs about what real files cost) is written to a temporary directory, then:
- pre-scan: `scan: full` (decodes every label) with 1 thread as the baseline, with the default threads, and
  `scan: sizes` (headers only);
- source loading: `Conditioner.prepare` (decode, map labels, resize to 960x528, colourise for ControlNet)
  one sample after another (baseline) vs `Conditioner.generate`'s thread pool over a batch of 4.

    python -m bench.bench_sources [--items 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (1914, 1052)
CITYSCAPES_IDS = (7, 8, 11, 17, 21, 23, 24, 26, 33)


def write_dataset(root: Path, items: int) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    width, height = SIZE
    for i in range(items):
        coarse = rng.integers(0, 256, size=(height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(SIZE, Image.Resampling.BILINEAR)
        noisy = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, size=(height, width, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i:05d}.png")
        blocks = rng.choice(CITYSCAPES_IDS, size=(height // 32 + 1, width // 32 + 1)).astype(np.uint8)
        label = np.kron(blocks, np.ones((32, 32), dtype=np.uint8))[:height, :width]
        Image.frombytes("P", SIZE, np.ascontiguousarray(label).tobytes()).save(root / "labels" / f"{i:05d}.png")


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    from dreamshard.config import ConditionConfig, PromptsConfig, SamplingConfig, SourceConfig
    from dreamshard.datasets.sources import open_source, scan
    from dreamshard.engine.conditioned import Conditioner
    from dreamshard.engine.plan import build_plan

    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=32)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "gta"
        write_dataset(root, args.items)
        config = SourceConfig(layout="gta5", root=str(root))
        source = open_source(config)
        full_1 = timed(lambda: scan(source, workers=1))
        full_n = timed(lambda: scan(source))
        sizes = timed(lambda: scan(open_source(config.model_copy(update={"scan": "sizes"}))))
        per_item = lambda seconds: f"{1000 * seconds / args.items:.1f} ms/item"  # noqa: E731
        print(f"pre-scan full, 1 thread (baseline): {per_item(full_1)}")
        print(f"pre-scan full, default threads:     {per_item(full_n)}  ({full_1 / full_n:.2f}x)")
        print(f"pre-scan sizes (headers only):      {per_item(sizes)}  ({full_1 / sizes:.0f}x)")

        conditioner = Conditioner("controlnet_seg", source, ConditionConfig(), num_classes=19)
        specs = build_plan(PromptsConfig(), SamplingConfig(width=960, height=528), 0).specs(0, args.items)
        serial = timed(lambda: [conditioner.prepare(spec) for spec in specs])
        with ThreadPoolExecutor(max_workers=4) as pool:  # what Conditioner.generate does per batch
            batched = timed(lambda: [list(pool.map(conditioner.prepare, specs[i : i + 4])) for i in range(0, len(specs), 4)])
        print(f"source loading, serial (baseline):  {per_item(serial)}")
        print(f"source loading, 4 threads / batch:  {per_item(batched)}  ({serial / batched:.2f}x)")


if __name__ == "__main__":
    main()
