"""Label conventions shared by the engine and the trainer: the published id → train-id tables, the 19
Cityscapes classes and their palette, the SYNTHIA-16 subset, and fast lookup-table conversions.

Tables: `cityscapesScripts/helpers/labels.py` (ids, train ids, colours; identical to DAFormer's
`CityscapesDataset.PALETTE`), DAFormer `tools/convert_datasets/synthia.py` (SYNTHIA → Cityscapes train ids),
MaxSquareLoss `utils/eval.py` (the 16- and 13-class subsets). GTA5 labels use Cityscapes ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dreamshard.errors import UserError

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# cityscapesScripts' colour of each label id 0..33: the colours of its `*_gtFine_color.png` files, which are
# drawn from the same polygons as `*_gtFine_labelIds.png` (license plate, -1, is drawn in neither). The 19
# evaluated classes have their PALETTE colours; the ignored ids keep their own (parking, rail track, guard
# rail, bridge, tunnel, polegroup, caravan, trailer, dynamic, ground; the other void ids are black).
CITYSCAPES_LABEL_COLOURS = (
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0), (81, 0, 81), (128, 64, 128),
    (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
# Palettes by name: `cityscapes` colours train ids, `cityscapes_color` colours Cityscapes label ids.
LABEL_ID_PALETTES = ("cityscapes_color",)

# Cityscapes label ids 0..33 (license plate, -1, never appears in the id PNGs); ids not listed → 255.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_IDS = range(34)

# SYNTHIA-RAND-CITYSCAPES class ids 0..22; terrain (16), truck (18) and train (20) have no pixels.
SYNTHIA_ID_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip
SYNTHIA_IDS = range(23)

# Train ids evaluated for SYNTHIA → Cityscapes: mIoU16 drops terrain, truck, train; mIoU13 also wall, fence, pole.
SYNTHIA16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)

_LUT_SIZE = 1 << 16  # covers 8- and 16-bit label images


@dataclass(frozen=True, eq=False)
class LabelMap:
    """Raw label value → train id as a lookup table, plus which raw values may appear at all."""

    name: str
    lut: np.ndarray  # uint8[65536]: train id per raw value, 255 where ignored or unknown
    known: np.ndarray  # bool[65536]: raw values a label file of this kind may contain

    def unknown_values(self, raw: np.ndarray, limit: int = 5) -> list[int]:
        """Up to `limit` distinct raw values that this map does not know (empty when all are known)."""
        raw = _as_index(raw)
        bad = ~self.known[raw]
        if not bad.any():
            return []
        return [int(v) for v in np.unique(raw[bad])[:limit]]


def make_label_map(name: str, id_to_train_id: Mapping[int, int], known: Iterable[int]) -> LabelMap:
    """A LabelMap from a dict (raw id → train id; raw ids in `known` but not in the dict map to 255)."""
    lut = np.full(_LUT_SIZE, IGNORE_INDEX, dtype=np.uint8)
    mask = np.zeros(_LUT_SIZE, dtype=bool)
    for raw in known:
        _check_range(name, raw, _LUT_SIZE - 1, "raw label value")
        mask[raw] = True
    for raw, train_id in id_to_train_id.items():
        _check_range(name, raw, _LUT_SIZE - 1, "raw label value")
        _check_range(name, train_id, IGNORE_INDEX, "train id")
        lut[raw] = train_id
        mask[raw] = True
    lut.flags.writeable = False
    mask.flags.writeable = False
    return LabelMap(name, lut, mask)


def _check_range(name: str, value: int, high: int, what: str) -> None:
    if not isinstance(value, (int, np.integer)) or not 0 <= value <= high:
        raise UserError(f"label map {name}: {what} {value!r} is outside 0..{high}")


def train_id_map(num_classes: int = NUM_CLASSES) -> LabelMap:
    """Labels that already hold train ids: 0..num_classes-1 and 255."""
    return make_label_map("train_ids", {i: i for i in range(num_classes)}, [IGNORE_INDEX])


CITYSCAPES_MAP = make_label_map("cityscapes_ids", CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_IDS)
SYNTHIA_MAP = make_label_map("synthia_ids", SYNTHIA_ID_TO_TRAIN_ID, SYNTHIA_IDS)


def to_train_ids(raw: np.ndarray, mapping: LabelMap | Mapping[int, int]) -> np.ndarray:
    """Map a raw label array to uint8 train ids with one table lookup; unknown values become 255."""
    if not isinstance(mapping, LabelMap):
        mapping = make_label_map("custom", mapping, ())
    return mapping.lut[_as_index(raw)]


def colourise(train_ids: np.ndarray, palette: Sequence[Sequence[int]] = PALETTE) -> np.ndarray:
    """Train ids (or, with a label-id palette, label ids) (H, W) → RGB uint8 (H, W, 3); ids without a colour
    (255 included) are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[np.asarray(train_ids, dtype=np.uint8)]


def parse_palette(spec: str | Sequence[str | Sequence[int]], num_classes: int = NUM_CLASSES) -> tuple[tuple[int, int, int], ...]:
    """`"cityscapes"` (the 19 train-id colours), `"cityscapes_color"` (cityscapesScripts' 34 label-id colours:
    colours label ids, not train ids), or one colour per class as `"#rrggbb"` or `[r, g, b]` → a tuple of
    RGB triples."""
    if isinstance(spec, str):
        if spec.lower() == "cityscapes":
            return PALETTE
        if spec.lower() == "cityscapes_color":
            return CITYSCAPES_LABEL_COLOURS
        raise UserError(
            f"unknown palette {spec!r}; use 'cityscapes' (train ids), 'cityscapes_color' (Cityscapes label ids) or a list of {num_classes} colours ('#rrggbb' or [r, g, b])"
        )
    colours = tuple(_parse_colour(item, i) for i, item in enumerate(spec))
    if len(colours) < num_classes:
        raise UserError(f"palette has {len(colours)} colours but there are {num_classes} classes; give one colour per class")
    return colours


# ------------------------------------------------------------------------------------------- helpers


def _parse_colour(item: str | Sequence[int], index: int) -> tuple[int, int, int]:
    if isinstance(item, str):
        text = item.strip().lstrip("#")
        if len(text) == 6:
            try:
                return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
            except ValueError:
                pass
    elif len(item) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in item):
        return (int(item[0]), int(item[1]), int(item[2]))
    raise UserError(f"palette colour {index} is {item!r}; write it as '#rrggbb' or [r, g, b] with 0..255 values")


def _as_index(raw: np.ndarray) -> np.ndarray:
    """A non-negative integer array usable as an index into the 65536-entry tables (others → 65535)."""
    raw = np.asarray(raw)
    if raw.dtype in (np.uint8, np.uint16):
        return raw
    if not np.issubdtype(raw.dtype, np.integer):
        raise UserError(f"label array has dtype {raw.dtype}; labels must hold integer ids")
    # 65535 is unknown in every map, so out-of-range values read as unknown rather than wrapping around.
    return np.where((raw < 0) | (raw >= _LUT_SIZE), _LUT_SIZE - 1, raw).astype(np.uint16)
