"""Labelled source datasets on disk (Cityscapes, GTA5, SYNTHIA, generic), read the same way by the engine's
conditioned modes and by the trainer.

`open_source(config)` lists the items (sorted by key, then optionally a seeded shuffle and a limit);
`scan(source)` checks every item before any work starts (label present, sizes equal, label values known to
the map) and either raises one `UserError` naming the first bad file or, with `skip_bad`, drops the bad
items and records why; `source.load(item)` gives (RGB image, uint8 train ids).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from dreamshard.config import SourceConfig
from dreamshard.datasets.images import read_rgb_image
from dreamshard.datasets.labels import CITYSCAPES_MAP, SYNTHIA_MAP, LabelMap, make_label_map, to_train_ids, train_id_map
from dreamshard.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TRAIN_ID_SUFFIX = "_labelTrainIds.png"  # what cityscapesScripts / DAFormer's converters write


@dataclass(frozen=True)
class SourceItem:
    key: str  # stable name of the item within its dataset (e.g. "aachen_000000_000019", "00001")
    image: Path
    label: Path


@dataclass(frozen=True)
class LabelledSource:
    config: SourceConfig
    label_map: LabelMap
    items: tuple[SourceItem, ...]
    skipped: tuple[str, ...] = ()  # one line per item dropped by `scan` (skip_bad)

    def __len__(self) -> int:
        return len(self.items)

    def item_for(self, index: int) -> SourceItem:
        """The item a generated sample `index` uses: items cycle when there are more samples than items."""
        return self.items[index % len(self.items)]

    def load(self, item: SourceItem) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, uint8 train ids of the same size); a bad file raises UserError naming it."""
        image, _, train_ids = self.load_with_raw(item)
        return image, train_ids

    def load_with_raw(self, item: SourceItem) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        """(RGB image, the label's values as stored, uint8 train ids), all of the same size."""
        image = read_rgb(item.image)
        raw = self.load_raw_label(item)
        if raw.shape != (image.height, image.width):
            raise UserError(_size_problem(item, image.size, (raw.shape[1], raw.shape[0])))
        return image, raw, to_train_ids(raw, self.label_map)

    def load_label(self, item: SourceItem) -> np.ndarray:
        return to_train_ids(self.load_raw_label(item), self.label_map)

    def load_raw_label(self, item: SourceItem) -> np.ndarray:
        """The label's values as stored (e.g. Cityscapes label ids), checked against the label map."""
        raw = read_label(item.label, first_channel=self.config.layout == "synthia")
        unknown = self.label_map.unknown_values(raw)
        if unknown:
            raise UserError(_value_problem(item, unknown, self.label_map))
        return raw


def open_source(config: SourceConfig) -> LabelledSource:
    """List a source dataset's items (not checked yet: call `scan`)."""
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise UserError(f"source.root {config.root} is not a directory; point it at the {config.layout} dataset root")
    items = _LISTERS[config.layout](root, config)
    if not items:
        raise UserError(f"no images found for source layout {config.layout!r} under {root} ({_LAYOUT_HINT[config.layout]})")
    items.sort(key=lambda item: item.key)
    if config.shuffle:
        order = np.random.default_rng(config.seed).permutation(len(items))
        items = [items[i] for i in order]
    if config.limit is not None:
        items = items[: config.limit]
    return LabelledSource(config, resolve_label_map(config), tuple(items))


def scan(source: LabelledSource, workers: int | None = None) -> LabelledSource:
    """Check every item (label exists, same size as the image, values known to the map) before any work.

    Raises UserError naming the first bad file; with `skip_bad` returns the source without the bad items and
    their reasons in `skipped`. `scan: sizes` reads only file headers (fast); `full` also decodes each label.
    """
    check = _check_item if source.config.scan == "full" else _check_header
    workers = workers or min(8, os.cpu_count() or 1)
    # PIL releases the GIL while decoding, so threads scan labels in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(lambda item: check(source, item), source.items))
    bad = [(item, problem) for item, problem in zip(source.items, problems) if problem]
    if not bad:
        return source
    if not source.config.skip_bad:
        more = f" (and {len(bad) - 1} more bad item(s))" if len(bad) > 1 else ""
        raise UserError(f"{bad[0][1]}{more}; fix the data or set source.skip_bad: true to skip bad items")
    kept = tuple(item for item, problem in zip(source.items, problems) if not problem)
    if not kept:
        raise UserError(f"every item of the source under {source.config.root} is bad, e.g. {bad[0][1]}")
    return replace(source, items=kept, skipped=tuple(problem for _, problem in bad))


def resolve_label_map(config: SourceConfig) -> LabelMap:
    if config.id_map:
        return make_label_map("id_map", config.id_map, ())
    kind: str = config.labels
    if kind == "auto":
        kind = {"cityscapes": "cityscapes_ids", "gta5": "cityscapes_ids", "synthia": "synthia_ids"}.get(config.layout, "train_ids")
    if kind == "train_ids":
        return train_id_map(config.num_classes)
    return CITYSCAPES_MAP if kind == "cityscapes_ids" else SYNTHIA_MAP


def read_rgb(path: Path) -> Image.Image:
    """An item's image as 8-bit RGB, upright (datasets/images.py)."""
    return read_rgb_image(path)


def read_label(path: Path, first_channel: bool = False) -> np.ndarray:
    """A label PNG as an integer array: single-channel 8/16-bit as stored; with `first_channel`, channel 0
    of a multi-channel image (SYNTHIA's 16-bit RGB labels hold the class id in R)."""
    try:
        with _open_image(path) as image:
            if image.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(image)
            if not first_channel:
                raise UserError(f"label {path} is a {image.mode} colour image; expected single-channel label ids (e.g. *_labelIds.png)")
            tiles = getattr(image, "tile", None)  # ImageFile's decoder tiles (a PNG's)
            rawmode = tiles[0].args if tiles else None
            rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
            if isinstance(rawmode, str) and rawmode.endswith(";16B"):
                return _first_channel_16bit(path, rawmode)
            return np.asarray(image)[..., 0]
    except OSError as exc:
        raise UserError(f"{path}: cannot decode label ({exc})") from None


# ------------------------------------------------------------------------------------------- layouts


def _cityscapes(root: Path, config: SourceConfig) -> list[SourceItem]:
    image_dir = root / "leftImg8bit" / config.split
    if not image_dir.is_dir():
        raise UserError(f"{image_dir} not found; a cityscapes source needs leftImg8bit/{config.split}/<city>/*_leftImg8bit.png under source.root")
    suffix = TRAIN_ID_SUFFIX.replace("_label", "_gtFine_label") if _wants_train_ids(config) else "_gtFine_labelIds.png"
    items = []
    for image in image_dir.glob("*/*_leftImg8bit.png"):
        base = image.name.removesuffix("_leftImg8bit.png")
        label = root / "gtFine" / config.split / image.parent.name / f"{base}{suffix}"
        items.append(SourceItem(base, image, label))
    return items


def _flat(image_dir: str, label_dir: str) -> Callable[[Path, SourceConfig], list[SourceItem]]:
    """A layout with `{image_dir}/*.png` and `{label_dir}/<same stem>.png` (GTA5, SYNTHIA)."""

    def lister(root: Path, config: SourceConfig) -> list[SourceItem]:
        suffix = TRAIN_ID_SUFFIX if _wants_train_ids(config) else ".png"
        return [SourceItem(p.stem, p, root / label_dir / f"{p.stem}{suffix}") for p in (root / image_dir).glob("*.png")]

    return lister


def _generic(root: Path, config: SourceConfig) -> list[SourceItem]:
    image_dir = root / "images"
    items = []
    for image in image_dir.rglob("*"):
        if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file():
            stem = image.relative_to(image_dir).with_suffix("")
            items.append(SourceItem(stem.as_posix(), image, root / "labels" / stem.with_suffix(".png")))
    return items


_LISTERS = {
    "cityscapes": _cityscapes,
    "gta5": _flat("images", "labels"),
    "synthia": _flat("RGB", "GT/LABELS"),
    "generic": _generic,
}
_LAYOUT_HINT = {
    "cityscapes": "expected leftImg8bit/<split>/<city>/*_leftImg8bit.png",
    "gta5": "expected images/*.png and labels/*.png",
    "synthia": "expected RGB/*.png and GT/LABELS/*.png",
    "generic": "expected images/* and labels/<same stem>.png",
}


def _wants_train_ids(config: SourceConfig) -> bool:
    """Cityscapes/GTA5/SYNTHIA with `labels: train_ids` read the converted `*_labelTrainIds.png` files."""
    return config.labels == "train_ids" and not config.id_map


# -------------------------------------------------------------------------------------------- checks


def _check_header(source: LabelledSource, item: SourceItem) -> str | None:
    """The problem with an item, from file headers only (None when fine)."""
    if not item.label.is_file():
        return f"{item.image}: no label file (expected {item.label})"
    try:
        with Image.open(item.image) as image, Image.open(item.label) as label:
            if image.size != label.size:
                return _size_problem(item, image.size, label.size)
    except OSError as exc:
        return f"{item.image} or its label {item.label}: cannot read ({exc})"
    return None


def _check_item(source: LabelledSource, item: SourceItem) -> str | None:
    """`_check_header` plus the label's values (decodes the label)."""
    problem = _check_header(source, item)
    if problem:
        return problem
    try:
        raw = read_label(item.label, first_channel=source.config.layout == "synthia")
    except UserError as exc:
        return str(exc)
    unknown = source.label_map.unknown_values(raw)
    return _value_problem(item, unknown, source.label_map) if unknown else None


def _size_problem(item: SourceItem, image_size: tuple[int, int], label_size: tuple[int, int]) -> str:
    return f"{item.label}: label is {label_size[0]}x{label_size[1]} but its image {item.image.name} is {image_size[0]}x{image_size[1]}"


def _value_problem(item: SourceItem, unknown: list[int], label_map: LabelMap) -> str:
    return f"{item.label}: label values {unknown} are not in the {label_map.name} map (check source.layout / source.labels / source.id_map)"


# ------------------------------------------------------------------------------------------- reading


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None


def _first_channel_16bit(path: Path, rawmode: str) -> np.ndarray:
    """Channel 0 of a 16-bit multi-channel PNG, exact. PIL keeps only the high byte of such PNGs; decoding
    a second time with the little-endian rawmode (";16L") makes its unpacker keep the low byte instead."""
    planes = []
    for mode in (rawmode, rawmode.replace(";16B", ";16L")):
        with Image.open(path) as image:
            image.tile = [tile._replace(args=(mode, *tile.args[1:]) if isinstance(tile.args, tuple) else mode) for tile in image.tile]
            planes.append(np.asarray(image)[..., 0].astype(np.uint16))
    high, low = planes
    return (high << 8) | low
