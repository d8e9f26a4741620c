"""The published label tables and the lookup-table conversions."""

import numpy as np
import pytest

from dreamshard.datasets import labels
from dreamshard.errors import UserError

# cityscapesScripts labels.py, ids 0..33 → trainId (255 = ignore), written out here independently of the module.
CITYSCAPES_TRAIN_IDS = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18]
# DAFormer convert_datasets/synthia.py, SYNTHIA ids 0..22 → trainId.
SYNTHIA_TRAIN_IDS = [255, 10, 2, 0, 1, 4, 8, 5, 13, 7, 11, 18, 17, 255, 255, 6, 9, 12, 14, 15, 16, 3, 255]


def test_tables_match_the_published_ones():
    assert len(labels.CLASSES) == len(labels.PALETTE) == labels.NUM_CLASSES == 19
    assert labels.CLASSES[13] == "car" and labels.PALETTE[13] == (0, 0, 142)
    assert labels.PALETTE[0] == (128, 64, 128) and labels.PALETTE[18] == (119, 11, 32)
    assert labels.to_train_ids(np.arange(34, dtype=np.uint8), labels.CITYSCAPES_MAP).tolist() == CITYSCAPES_TRAIN_IDS
    assert labels.to_train_ids(np.arange(23, dtype=np.uint8), labels.SYNTHIA_MAP).tolist() == SYNTHIA_TRAIN_IDS
    assert len(labels.SYNTHIA16) == 16 and not {9, 14, 16} & set(labels.SYNTHIA16)
    assert set(labels.SYNTHIA13) == set(labels.SYNTHIA16) - {3, 4, 5}


def test_to_train_ids_handles_any_integer_label_array():
    raw16 = np.array([[26, 7], [300, 65535]], dtype=np.uint16)
    assert labels.to_train_ids(raw16, labels.CITYSCAPES_MAP).tolist() == [[13, 0], [255, 255]]
    raw32 = np.array([-1, 26, 70000], dtype=np.int32)  # license plate (-1) and out-of-range values are ignored
    out = labels.to_train_ids(raw32, labels.CITYSCAPES_MAP)
    assert out.dtype == np.uint8 and out.tolist() == [255, 13, 255]
    assert labels.to_train_ids(np.array([5, 6, 9], dtype=np.uint8), {5: 1, 6: 2}).tolist() == [1, 2, 255]


def test_unknown_values_lists_what_the_map_does_not_know():
    assert labels.CITYSCAPES_MAP.unknown_values(np.array([0, 7, 33], dtype=np.uint8)) == []
    assert labels.CITYSCAPES_MAP.unknown_values(np.array([34, 7, 200, 34], dtype=np.uint8)) == [34, 200]
    train = labels.train_id_map(19)
    assert train.unknown_values(np.array([0, 18, 255], dtype=np.uint8)) == []
    assert train.unknown_values(np.array([19, 254], dtype=np.uint8)) == [19, 254]
    assert labels.to_train_ids(np.array([3, 255], dtype=np.uint8), train).tolist() == [3, 255]


def test_colourise_uses_the_palette_and_black_for_ignore():
    ids = np.array([[0, 13], [255, 18]], dtype=np.uint8)
    rgb = labels.colourise(ids)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[0, 1].tolist() == [0, 0, 142]
    assert rgb[1, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [119, 11, 32]
    custom = labels.colourise(np.array([1], dtype=np.uint8), [(1, 2, 3), (4, 5, 6)])
    assert custom.tolist() == [[4, 5, 6]]


def test_parse_palette():
    assert labels.parse_palette("cityscapes") == labels.PALETTE
    assert labels.parse_palette(["#ff0001", [1, 2, 3]], num_classes=2) == ((255, 0, 1), (1, 2, 3))
    with pytest.raises(UserError, match="unknown palette"):
        labels.parse_palette("ade")
    with pytest.raises(UserError, match="2 colours but there are 19 classes"):
        labels.parse_palette(["#000000", "#ffffff"])
    with pytest.raises(UserError, match="colour 1"):
        labels.parse_palette(["#000000", [1, 2, 300]], num_classes=2)


def test_bad_map_entries_are_user_errors():
    with pytest.raises(UserError, match="train id 256"):
        labels.make_label_map("x", {1: 256}, ())
