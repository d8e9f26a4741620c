"""Labelled source datasets in each layout: listing, exact train ids, and the pre-scan of bad items."""

import numpy as np
import pytest
import sourcedata
from PIL import Image

from dreamshard.config import SourceConfig
from dreamshard.datasets.sources import open_source, scan
from dreamshard.errors import UserError


def _load_all(config: SourceConfig) -> dict:
    source = scan(open_source(config))
    loaded = {}
    for item in source.items:
        image, train_ids = source.load(item)
        assert image.mode == "RGB" and train_ids.dtype == np.uint8
        assert train_ids.shape == (image.height, image.width)
        loaded[item.key] = train_ids
    return loaded


def _assert_same(loaded: dict, expected: dict) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, train_ids in loaded.items():
        np.testing.assert_array_equal(train_ids, expected[key], err_msg=key)


def test_cityscapes_label_ids_and_train_ids(tmp_path):
    expected = sourcedata.write_cityscapes(tmp_path, n=3)
    _assert_same(_load_all(SourceConfig(layout="cityscapes", root=str(tmp_path))), expected)
    _assert_same(_load_all(SourceConfig(layout="cityscapes", root=str(tmp_path), labels="train_ids")), expected)
    assert {13, 0, 255} <= set(np.unique(np.concatenate([v.ravel() for v in expected.values()])).tolist())


def test_gta5_palette_labels(tmp_path):
    expected = sourcedata.write_gta5(tmp_path, n=3)
    assert Image.open(tmp_path / "labels" / "00001.png").mode == "P"
    _assert_same(_load_all(SourceConfig(layout="gta5", root=str(tmp_path))), expected)


def test_synthia_16bit_labels_use_the_first_channel(tmp_path):
    expected = sourcedata.write_synthia(tmp_path, n=3)
    loaded = _load_all(SourceConfig(layout="synthia", root=str(tmp_path)))
    _assert_same(loaded, expected)
    assert {0, 13, 10, 17} <= set(np.unique(loaded["0000000"]).tolist())  # road, car, sky, motorcycle


def test_synthia_class_above_255_is_an_unknown_value(tmp_path):
    sourcedata.write_synthia(tmp_path, n=1)
    planes = np.zeros((24, 40, 3), dtype=np.uint16)
    planes[..., 0] = 3
    planes[5, 5, 0] = 256 + 3  # would read as road (3) if only the low byte were kept
    sourcedata.write_png16(tmp_path / "GT" / "LABELS" / "0000000.png", planes)
    with pytest.raises(UserError, match=r"0000000.png: label values \[259\]"):
        scan(open_source(SourceConfig(layout="synthia", root=str(tmp_path))))


def test_generic_train_ids_and_id_map(tmp_path):
    raws = sourcedata.write_generic(tmp_path, n=3)
    _assert_same(_load_all(SourceConfig(layout="generic", root=str(tmp_path))), raws)
    raws = sourcedata.write_generic(tmp_path / "mapped", n=2, values=(1, 2, 9))
    id_map = {1: 5, 2: 255, 9: 0}
    loaded = _load_all(SourceConfig(layout="generic", root=str(tmp_path / "mapped"), id_map=id_map))
    _assert_same(loaded, {k: sourcedata.expected_train_ids(v, id_map) for k, v in raws.items()})


def test_order_shuffle_limit_and_cycling(tmp_path):
    sourcedata.write_generic(tmp_path, n=6, size=(16, 16))
    keys = [item.key for item in open_source(SourceConfig(layout="generic", root=str(tmp_path))).items]
    assert keys == sorted(keys) and len(keys) == 6
    shuffled = [i.key for i in open_source(SourceConfig(layout="generic", root=str(tmp_path), shuffle=True, seed=3)).items]
    again = [i.key for i in open_source(SourceConfig(layout="generic", root=str(tmp_path), shuffle=True, seed=3)).items]
    other = [i.key for i in open_source(SourceConfig(layout="generic", root=str(tmp_path), shuffle=True, seed=4)).items]
    assert shuffled == again and sorted(shuffled) == keys and (shuffled != keys or other != keys)
    source = open_source(SourceConfig(layout="generic", root=str(tmp_path), limit=4))
    assert len(source) == 4 and source.item_for(9).key == keys[1]


@pytest.mark.parametrize("what", ["missing", "values", "size"])
def test_bad_items_fail_the_scan_or_are_skipped(tmp_path, what):
    sourcedata.write_generic(tmp_path, n=3)
    named = sourcedata.break_generic_item(tmp_path, what)
    with pytest.raises(UserError, match="skip_bad") as err:
        scan(open_source(SourceConfig(layout="generic", root=str(tmp_path))))
    assert named in str(err.value)
    source = scan(open_source(SourceConfig(layout="generic", root=str(tmp_path), skip_bad=True)))
    assert [item.key for item in source.items] == ["scene_0", "scene_2"]
    assert len(source.skipped) == 1 and named in source.skipped[0]


def test_header_only_scan_leaves_value_errors_to_load(tmp_path):
    sourcedata.write_generic(tmp_path, n=3)
    sourcedata.break_generic_item(tmp_path, "values")
    source = scan(open_source(SourceConfig(layout="generic", root=str(tmp_path), scan="sizes")))
    assert len(source) == 3
    with pytest.raises(UserError, match=r"scene_1.png: label values \[77\]"):
        source.load(source.items[1])


def test_bad_roots_and_colour_labels(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        open_source(SourceConfig(layout="gta5", root=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no images found"):
        open_source(SourceConfig(layout="gta5", root=str(tmp_path)))
    with pytest.raises(UserError, match="leftImg8bit/val"):
        open_source(SourceConfig(layout="cityscapes", root=str(tmp_path), split="val"))
    sourcedata.write_generic(tmp_path, n=1)
    Image.new("RGB", (32, 32)).save(tmp_path / "labels" / "scene_0.png")
    with pytest.raises(UserError, match="RGB colour image"):
        scan(open_source(SourceConfig(layout="generic", root=str(tmp_path))))
