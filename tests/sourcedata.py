"""Tiny labelled source datasets in each layout, written byte for byte the way the real ones are stored."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from dreamshard.datasets.labels import CITYSCAPES_ID_TO_TRAIN_ID, SYNTHIA_ID_TO_TRAIN_ID

CITYSCAPES_VALUES = (0, 7, 8, 11, 21, 23, 24, 26, 33)  # unlabeled, road, sidewalk, building, veg, sky, person, car, bicycle
SYNTHIA_VALUES = (0, 1, 2, 3, 8, 10, 12, 17, 22)  # void, sky, building, road, car, pedestrian, motorcycle, rider, lanemarking
TRAIN_VALUES = (0, 1, 2, 10, 13, 18, 255)


def random_label(rng: np.random.Generator, values: tuple[int, ...], height: int, width: int) -> np.ndarray:
    """Blocks of label values (like a layout) with every value present at least once."""
    grid = rng.choice(values, size=(height // 4, width // 4))
    grid.flat[: len(values)] = values
    return np.kron(grid, np.ones((4, 4), dtype=grid.dtype))


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def expected_train_ids(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """The published table applied pixel by pixel (independent of the LUT code under test)."""
    return np.vectorize(lambda v: table.get(int(v), 255), otypes=[np.uint8])(raw)


def write_cityscapes(
    root: Path, n: int = 3, size: tuple[int, int] = (48, 32), seed: int = 0, split: str = "train", values: tuple[int, ...] = CITYSCAPES_VALUES
) -> dict[str, np.ndarray]:
    """Two cities; returns {key: expected train ids}."""
    rng = np.random.default_rng(seed)
    width, height = size
    expected = {}
    for i in range(n):
        city = ("aachen", "bremen")[i % 2]
        base = f"{city}_{i:06d}_000019"
        raw = random_label(rng, values, height, width).astype(np.uint8)
        _save(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", random_image(rng, height, width))
        _save(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", raw)
        expected[base] = expected_train_ids(raw, CITYSCAPES_ID_TO_TRAIN_ID)
        _save(root / "gtFine" / split / city / f"{base}_gtFine_labelTrainIds.png", expected[base])
    return expected


def write_gta5(root: Path, n: int = 3, size: tuple[int, int] = (40, 24), seed: int = 1) -> dict[str, np.ndarray]:
    """GTA5 labels are palette ("P") PNGs whose indices are Cityscapes ids."""
    rng = np.random.default_rng(seed)
    width, height = size
    expected = {}
    for i in range(1, n + 1):
        stem = f"{i:05d}"
        raw = random_label(rng, CITYSCAPES_VALUES, height, width).astype(np.uint8)
        _save(root / "images" / f"{stem}.png", random_image(rng, height, width))
        (root / "labels").mkdir(parents=True, exist_ok=True)
        _palette_image(raw).save(root / "labels" / f"{stem}.png")
        expected[stem] = expected_train_ids(raw, CITYSCAPES_ID_TO_TRAIN_ID)
    return expected


def write_synthia(root: Path, n: int = 3, size: tuple[int, int] = (40, 24), seed: int = 2) -> dict[str, np.ndarray]:
    """SYNTHIA labels: 16-bit 3-channel PNGs, class id in R, instance ids (above 255) in G."""
    rng = np.random.default_rng(seed)
    width, height = size
    expected = {}
    for i in range(n):
        stem = f"{i:07d}"
        raw = random_label(rng, SYNTHIA_VALUES, height, width).astype(np.uint16)
        planes = np.stack([raw, rng.integers(0, 3000, size=raw.shape), np.zeros_like(raw)], axis=-1).astype(np.uint16)
        _save(root / "RGB" / f"{stem}.png", random_image(rng, height, width))
        write_png16(root / "GT" / "LABELS" / f"{stem}.png", planes)
        expected[stem] = expected_train_ids(raw, SYNTHIA_ID_TO_TRAIN_ID)
    return expected


def write_generic(root: Path, n: int = 3, size: tuple[int, int] = (32, 32), seed: int = 3, values: tuple[int, ...] = TRAIN_VALUES) -> dict[str, np.ndarray]:
    """images/<stem>.jpg + labels/<stem>.png holding train ids; returns {key: raw label}."""
    rng = np.random.default_rng(seed)
    width, height = size
    raws = {}
    for i in range(n):
        stem = f"scene_{i}"
        raw = random_label(rng, values, height, width).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(rng, height, width)).save(root / "images" / f"{stem}.jpg")
        _save(root / "labels" / f"{stem}.png", raw)
        raws[stem] = raw
    return raws


def break_generic_item(root: Path, what: str) -> str:
    """Make scene_1 of a `write_generic` dataset (32x32) bad: its label missing, holding an unknown value, or
    the wrong size; returns the text the error must contain."""
    if what == "missing":
        (root / "labels" / "scene_1.png").unlink()
        return "scene_1.jpg"
    if what == "values":
        raw = np.full((32, 32), 2, dtype=np.uint8)
        raw[0, 0] = 77
        Image.fromarray(raw).save(root / "labels" / "scene_1.png")
        return "scene_1.png: label values [77]"
    Image.fromarray(np.zeros((30, 32), dtype=np.uint8)).save(root / "labels" / "scene_1.png")
    return "scene_1.png: label is 32x30 but its image scene_1.jpg is 32x32"


def write_png16(path: Path, planes: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one). Odd rows use the Sub filter so readers must unfilter."""
    height, width, channels = planes.shape
    data = planes.astype(">u2").view(np.uint8).reshape(height, -1)
    rows = []
    bpp = channels * 2
    for y in range(height):
        row = data[y]
        if y % 2:
            filtered = row.copy()
            filtered[bpp:] = (row[bpp:].astype(np.int16) - row[:-bpp]) % 256
            rows.append(b"\x01" + filtered.astype(np.uint8).tobytes())
        else:
            rows.append(b"\x00" + row.tobytes())
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _palette_image(raw: np.ndarray) -> Image.Image:
    image = Image.frombytes("P", (raw.shape[1], raw.shape[0]), raw.tobytes())
    image.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    return image


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
