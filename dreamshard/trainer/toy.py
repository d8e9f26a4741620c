"""A toy domain shift to prove the trainer learns (`dreamshard toy-data OUT`).

Scenes of five classes with the same kinds of layout in both domains — sky above a horizon, ground below,
buildings standing on the horizon, cars on the ground, poles — rendered in two appearances:
- source: clean flat colours, labelled (a generic folder dataset: images/ + labels/);
- target: the same layouts under a colour shift (hue rotated, darker, less saturated), sensor noise and
  texture. Target train is unlabelled engine shards (written with the data contract's own `write_dataset`, so
  they are exactly what `dreamshard generate` writes); target val is a labelled folder.
A model trained on the source alone relies on the source colours and partly fails on the target;
DACS' mixing, strong augmentation and self-training on the target close much of the gap.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreamshard.format.rundir import write_dataset
from dreamshard.format.shards import ShardSample

TOY_CLASSES = ("ground", "sky", "building", "car", "pole")
SOURCE_COLOURS = ((100, 100, 100), (110, 170, 235), (170, 110, 70), (210, 40, 40), (240, 210, 50))


def toy_layout(rng: np.random.Generator, size: int) -> np.ndarray:
    """A label map (uint8 train ids) of one random scene."""
    label = np.zeros((size, size), dtype=np.uint8)
    horizon = int(size * rng.uniform(0.35, 0.6))
    label[:horizon] = 1
    for _ in range(rng.integers(1, 4)):  # buildings standing on the horizon
        w, h = int(size * rng.uniform(0.12, 0.3)), int(size * rng.uniform(0.15, 0.35))
        x = int(rng.integers(0, size - w))
        label[max(0, horizon - h) : horizon, x : x + w] = 2
    for _ in range(rng.integers(1, 4)):  # cars on the ground
        w, h = int(size * rng.uniform(0.15, 0.28)), int(size * rng.uniform(0.08, 0.14))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(horizon, size - h))
        label[y : y + h, x : x + w] = 3
    for _ in range(rng.integers(1, 3)):  # thin poles crossing the horizon
        w, h = max(2, int(size * 0.05)), int(size * rng.uniform(0.3, 0.5))
        x = int(rng.integers(0, size - w))
        top = max(0, horizon - h // 2)
        label[top : top + h, x : x + w] = 4
    return label


def render(label: np.ndarray, rng: np.random.Generator, colours: np.ndarray, noise: float, texture: float) -> np.ndarray:
    """RGB uint8: per-class colour with a small per-image jitter, stripe texture and Gaussian noise."""
    base = colours[label].astype(np.float32) * rng.uniform(0.9, 1.1)
    if texture:
        yy, xx = np.mgrid[: label.shape[0], : label.shape[1]]
        base += texture * np.sin((xx + yy * rng.uniform(0.5, 1.5)) * rng.uniform(0.6, 1.2))[..., None]
    base += rng.normal(0, noise, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def shifted_colours(colours: tuple, hue: float, value: float, saturation: float) -> np.ndarray:
    """The target palette: each source colour's hue rotated, value and saturation scaled."""
    out = []
    for r, g, b in colours:
        h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        r2, g2, b2 = colorsys.hsv_to_rgb((h + hue) % 1.0, min(1.0, s * saturation), min(1.0, v * value))
        out.append((r2 * 255, g2 * 255, b2 * 255))
    return np.array(out, dtype=np.float32)


def make_toy(
    out: str | Path,
    seed: int = 0,
    size: int = 64,
    num_source: int = 256,
    num_target: int = 256,
    num_val: int = 128,
    samples_per_shard: int = 64,
    hue_shift: float = 0.12,
    twins: bool = True,
) -> dict[str, Path]:
    """Write source/ (labelled folder), target/ (unlabelled run directory of shards), target_val/ (labelled
    folder) and, with `twins`, target_twins/ (a run directory: each source item's layout rendered in the target
    style, its label as seg.png and json source_key naming the item: what a ZoDi transfer makes, for
    configs/toy_zodi.yaml) under `out`; returns their paths."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    source_colours = np.array(SOURCE_COLOURS, dtype=np.float32)
    target_colours = shifted_colours(SOURCE_COLOURS, hue_shift, value=0.75, saturation=0.7)
    target_style: dict[str, Any] = {"colours": target_colours, "noise": 14.0, "texture": 18.0}
    paths = {"source": out / "source", "target": out / "target", "target_val": out / "target_val"}

    source_labels = []
    for i in range(num_source):
        label = toy_layout(rng, size)
        source_labels.append(label)
        _write_pair(paths["source"], f"{i:05d}", render(label, rng, source_colours, noise=3.0, texture=0.0), label)
    for i in range(num_val):
        label = toy_layout(rng, size)
        _write_pair(paths["target_val"], f"{i:05d}", render(label, rng, **target_style), label)

    samples = []
    for index in range(num_target):
        image = render(toy_layout(rng, size), rng, **target_style)
        samples.append(ShardSample({"index": index, "prompt": "a toy street scene", "mode": "toy", "width": size, "height": size}, Image.fromarray(image)))
    write_dataset(paths["target"], samples, samples_per_shard, image_format="png", record={"kind": "toy", "seed": seed, "classes": list(TOY_CLASSES)})
    if twins:  # drawn last, from their own generator: the other folders stay as they were without them
        paths["target_twins"] = out / "target_twins"
        twin_rng = np.random.default_rng([seed, 1])
        made = [
            ShardSample({"index": i, "prompt": "a toy street scene, transferred", "mode": "toy", "source_key": f"{i:05d}", "width": size, "height": size},
                        Image.fromarray(render(label, twin_rng, **target_style)), {"seg.png": Image.fromarray(label)})
            for i, label in enumerate(source_labels)
        ]  # fmt: skip
        write_dataset(
            paths["target_twins"], made, samples_per_shard, image_format="png", record={"kind": "toy twins", "seed": seed, "classes": list(TOY_CLASSES)}
        )
    return paths


def _write_pair(root: Path, stem: str, image: np.ndarray, label: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(label).save(root / "labels" / f"{stem}.png")
