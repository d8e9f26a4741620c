"""Reading a run with Ray Data (docs/format.md, "Reading"): `read_webdataset` on the `shards/` folder needs
`file_extensions=["tar"]`, since `sizes.json` sits beside the tars and is not one."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamshard.format.layout import LABEL_FIELD, sample_key
from dreamshard.format.record import JSON_FIELDS
from dreamshard.format.rundir import write_dataset
from dreamshard.format.shards import ShardSample

NUM_SAMPLES, PER_SHARD, SIZE = 5, 2, 8  # three shards, the last one short


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A complete run in the engine's format (the project's own writer): jpg, json, txt and a seg.png label."""
    out = tmp_path_factory.mktemp("ray-data") / "run"
    samples = [
        ShardSample(
            {"index": i, "prompt": f"a street, take {i}", "mode": "img2img"},
            Image.new("RGB", (SIZE, SIZE), (10 * i, 0, 0)),
            {LABEL_FIELD: Image.new("L", (SIZE, SIZE), i)},
        )
        for i in range(NUM_SAMPLES)
    ]
    write_dataset(out, samples, PER_SHARD)
    return out


@pytest.fixture
def quiet_ray_data(ray_cluster, monkeypatch):
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "enable_progress_bars", False)
    return ray.data


def test_ray_data_reads_a_run_with_file_extensions_tar(run, quiet_ray_data):
    record = json.loads((run / "dreamshard.json").read_text())
    sizes = json.loads((run / "shards" / "sizes.json").read_text())
    assert sorted(path.name for path in (run / "shards").iterdir()) == ["000000.tar", "000001.tar", "000002.tar", "sizes.json"]

    ds = quiet_ray_data.read_webdataset(str(run / "shards"), file_extensions=["tar"])
    rows = sorted(ds.take_all(), key=lambda row: row["__key__"])

    assert len(rows) == record["num_samples"] == sum(sizes.values()) == NUM_SAMPLES
    assert set(ds.schema().names) == {"__key__", "__url__", "jpg", "json", "txt", LABEL_FIELD}
    for index, row in enumerate(rows):
        assert row["__key__"] == sample_key(index)
        assert Path(row["__url__"]).name == f"{index // PER_SHARD:06d}.tar"
        assert list(row["json"]) == list(JSON_FIELDS)  # decoded to a dict: every field, in the format's order
        assert (row["json"]["key"], row["json"]["index"], row["json"]["shard"]) == (sample_key(index), index, index // PER_SHARD)
        assert row["txt"] == row["json"]["prompt"] == f"a street, take {index}"
        assert row["jpg"].shape == (SIZE, SIZE, 3)  # images decoded to uint8 arrays (Ray Data's default decoder)
        assert row[LABEL_FIELD].dtype == np.uint8 and row[LABEL_FIELD].shape == (SIZE, SIZE)
        assert np.all(row[LABEL_FIELD] == index)


def test_ray_data_without_file_extensions_fails_on_sizes_json(run, quiet_ray_data):
    with pytest.raises(tarfile.ReadError):  # Ray opens every file of the folder as a tar
        quiet_ray_data.read_webdataset(str(run / "shards")).count()
