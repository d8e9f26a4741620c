"""Shard writer and dataset tools without Ray: commit protocol, fsspec stores, inspect / verify / preview."""

from __future__ import annotations

import io
import json
import shutil
import uuid

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from dreamshard.cli import app
from dreamshard.errors import UserError
from dreamshard.format.reader import committed_shards, manifest_rows, read_manifest, read_shard
from dreamshard.format.record import JSON_FIELDS
from dreamshard.format.rundir import RunDir, write_dataset
from dreamshard.format.shards import ShardSample, ShardWriter, write_shard
from dreamshard.format.store import Store
from dreamshard.tools.inspect import inspect_dataset
from dreamshard.tools.preview import preview_grid
from dreamshard.tools.verify import verify_dataset

CLASSES = ["car", "bus", "truck"]


def samples(n: int, seg: bool = False) -> list[ShardSample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
        meta = {"index": i, "prompt": f"a photo of a {CLASSES[i % 3]}", "class_name": CLASSES[i % 3], "class_id": i % 3,
                "template": "a photo of a {cls}", "style": {"weather": "rainy" if i % 2 else "sunny"}, "seed": 1000 + i}  # fmt: skip
        files = {"seg.png": Image.fromarray(np.full((32, 48), i % 19, dtype=np.uint8), mode="L")} if seg else {}
        out.append(ShardSample(meta, image, files))
    return out


@pytest.fixture()
def dataset(tmp_path):
    write_dataset(tmp_path / "ds", samples(25, seg=True), samples_per_shard=10, image_format="png")
    return tmp_path / "ds"


def test_written_dataset_is_complete_and_readable(dataset):
    assert verify_dataset(dataset) == []
    read = list(wds.WebDataset(sorted(str(p) for p in (dataset / "shards").glob("*.tar")), shardshuffle=False))
    assert [s["__key__"] for s in read] == [f"{i:09d}" for i in range(25)]
    first = json.loads(read[0]["json"])
    assert tuple(first) == JSON_FIELDS and first["shard"] == 0 and first["width"] == 48 and first["height"] == 32
    assert Image.open(io.BytesIO(read[3]["seg.png"])).mode == "L"
    assert json.loads((dataset / "shards" / "sizes.json").read_text()) == {"000000.tar": 10, "000001.tar": 10, "000002.tar": 5}
    rows = manifest_rows(read_manifest(dataset))
    assert [r["index"] for r in rows] == list(range(25)) and rows[1]["style"] == {"weather": "rainy"}


def test_inspect_counts_classes_templates_and_style_axes(dataset):
    info = inspect_dataset(dataset)
    assert (info.samples, info.shards, info.planned_shards) == (25, 3, 3)
    assert info.counts["class"] == {"car": 9, "bus": 8, "truck": 8}
    assert info.counts["style: weather"] == {"sunny": 13, "rainy": 12}
    assert info.bytes == sum(p.stat().st_size for p in (dataset / "shards").glob("*.tar"))
    assert info.quality is None  # nothing was scored: no quality tables
    result = CliRunner().invoke(app, ["inspect", str(dataset)])
    assert result.exit_code == 0 and "truck" in result.output and "weather" in result.output and "clip_score" not in result.output


def test_preview_writes_a_captioned_grid(dataset, tmp_path):
    grid = Image.open(preview_grid(dataset, count=9, output=tmp_path / "grid.png", tile=64, label="none"))
    assert grid.height > 3 * 43  # 3 rows of 64x43 panels (48x32 kept) plus caption lines
    result = CliRunner().invoke(app, ["preview", str(dataset), "-n", "4", "-o", str(tmp_path / "g2.png")])
    assert result.exit_code == 0 and (tmp_path / "g2.png").is_file()
    assert result.stdout.strip() == f"wrote {tmp_path / 'g2.png'}"  # the result on stdout


def wide_run(tmp_path):
    """A 1024x512-like run (ZoDi's shape, scaled): 64x32 images, each half of one colour, labels 0 and 13."""
    made = []
    for i in range(4):
        pixels = np.zeros((32, 64, 3), dtype=np.uint8)
        pixels[:, :32] = (200, 30, 30)
        pixels[:, 32:] = (30, 30, 200)
        label = np.zeros((32, 64), dtype=np.uint8)
        label[:, 32:] = 13  # car
        meta = {"index": i, "prompt": f"street {i}", "class_name": CLASSES[i % 3], "class_id": i % 3, "seed": i}
        made.append(ShardSample(meta, Image.fromarray(pixels), {"seg.png": Image.fromarray(label, mode="L")}))
    write_dataset(tmp_path / "wide", made, samples_per_shard=2, image_format="png")
    return tmp_path / "wide"


def test_a_wide_preview_keeps_its_aspect_ratio_and_shows_the_label(tmp_path):
    from dreamshard.datasets.labels import PALETTE

    sheet = np.asarray(Image.open(preview_grid(wide_run(tmp_path), count=1, output=tmp_path / "g.png", tile=128)).convert("RGB")).astype(int)
    image, label = sheet[:64, :128], sheet[:64, 132:260]  # a 128x64 panel (2:1 kept), a 4 px gap, the label panel
    assert (abs(image[:, 4:60] - (200, 30, 30)).max(), abs(image[:, 68:124] - (30, 30, 200)).max()) == (0, 0)  # not squashed: halves at halves
    assert (label[:, :60] == PALETTE[0]).all() and (label[:, 68:] == PALETTE[13]).all()  # road | car in the Cityscapes palette
    overlay = np.asarray(Image.open(preview_grid(wide_run(tmp_path / "o"), count=1, output=tmp_path / "o.png", tile=128, label="overlay")))
    assert overlay.shape[1] < sheet.shape[1] and abs(overlay[10, 10].astype(int) - (np.array((200, 30, 30)) + PALETTE[0]) // 2).max() <= 1


def test_preview_picks_random_per_class_per_style_and_lowest_clip():
    from dreamshard.tools.preview import pick_rows

    rows = [{"index": i, "class_name": CLASSES[i % 3] if i < 20 else "car", "style": {"weather": "rainy" if i % 5 == 0 else "sunny"},
             "clip_score": float((i * 7) % 30)} for i in range(30)]  # fmt: skip
    assert [row["index"] for row in pick_rows(rows, "first", 4, 0, "run")] == [0, 1, 2, 3]
    drawn = pick_rows(rows, "random", 5, 1, "run")
    assert drawn == pick_rows(rows, "random", 5, 1, "run") and drawn != pick_rows(rows, "random", 5, 2, "run") and drawn != rows[:5]
    assert sorted(row["class_name"] for row in pick_rows(rows, "class", 6, 0, "run")) == ["bus", "bus", "car", "car", "truck", "truck"]
    assert {row["style"]["weather"] for row in pick_rows(rows, "style:weather", 2, 0, "run")} == {"rainy", "sunny"}
    assert [row["clip_score"] for row in pick_rows(rows, "clip", 3, 0, "run")] == [0.0, 1.0, 2.0]
    with pytest.raises(UserError, match="choose one of first, random, class, clip or style:AXIS"):
        pick_rows(rows, "colour", 3, 0, "run")
    with pytest.raises(UserError, match="no CLIP scores"):
        pick_rows([{**row, "clip_score": None} for row in rows], "clip", 3, 0, "run")


def test_inspect_plan_verify_answer_on_stdout_and_in_json(dataset, tmp_path):
    runner = CliRunner()
    table = runner.invoke(app, ["inspect", str(dataset)])
    assert table.exit_code == 0 and "truck" in table.stdout and table.stderr == ""  # the data on stdout, nothing on stderr
    info = json.loads(runner.invoke(app, ["inspect", str(dataset), "--json"]).stdout)
    assert (info["samples"], info["shards"], info["planned_shards"], info["image_format"]) == (25, 3, 3, "png")
    assert info["counts"]["class"] == {"car": 9, "bus": 8, "truck": 8} and info["quality"] is None
    checked = runner.invoke(app, ["verify", str(dataset), "--json"])
    assert checked.exit_code == 0 and json.loads(checked.stdout) == {"out": str(dataset), "ok": True, "problems": []}
    (dataset / "index" / "000001.commit.json").unlink()
    broken = runner.invoke(app, ["verify", str(dataset), "--json"])
    report = json.loads(broken.stdout)
    assert broken.exit_code == 1 and not report["ok"] and any("shard 1: not committed" in p for p in report["problems"])
    assert "problem(s) found" in broken.stderr  # the error line stays on stderr


@pytest.mark.parametrize("damage, expected", [
    ("drop_marker", "shard 1: not committed"),
    ("append_to_tar", "shard 2: not committed"),
    ("stray_tar", "a tar without a commit"),
    ("partial", "partial file"),
    ("drop_manifest", "manifest.parquet missing"),
    ("edit_manifest_sizes", "sizes.json"),
])  # fmt: skip
def test_verify_names_each_problem_and_the_cli_exits_1(dataset, damage, expected):
    shards, index = dataset / "shards", dataset / "index"
    if damage == "drop_marker":
        (index / "000001.commit.json").unlink()
    elif damage == "append_to_tar":
        with open(shards / "000002.tar", "ab") as fh:
            fh.write(b"\0" * 512)
    elif damage == "stray_tar":
        shutil.copy(shards / "000000.tar", shards / "000007.tar")
    elif damage == "partial":
        (shards / "000001.tar.abcd.partial").write_bytes(b"half")
    elif damage == "drop_manifest":
        (dataset / "manifest.parquet").unlink()
    else:
        (shards / "sizes.json").write_text('{"000000.tar": 3}')
    problems = verify_dataset(dataset)
    assert any(expected in problem for problem in problems), problems
    result = CliRunner().invoke(app, ["verify", str(dataset)])
    assert result.exit_code == 1 and expected in result.output


def test_verify_catches_duplicate_and_misplaced_keys(tmp_path):
    items = samples(6)
    items[4].metadata["index"] = 3  # a duplicate key inside shard 0
    write_dataset(tmp_path / "dup", items, samples_per_shard=6)
    problems = verify_dataset(tmp_path / "dup")
    assert any("duplicate" in p for p in problems) and any("in order" in p for p in problems)


def test_a_failed_rewrite_leaves_the_committed_shard_and_no_partial_files(tmp_path):
    store = Store(tmp_path / "ds")
    write_shard(store.url, 0, samples(3))
    before = committed_shards(store, 3)[0]
    with pytest.raises(ValueError, match="same fields"), ShardWriter(store, 0) as writer:
        for sample in samples(2) + samples(1, seg=True):  # the field set changes mid-shard
            writer.add(sample)
    # nothing was published: the shard committed before is untouched, and the scratch files are gone
    assert committed_shards(store, 3) == {0: before} and not list((tmp_path / "ds").rglob("*.partial"))
    # a sealed shard is not committed until it is published (its old marker goes first, the new one last)
    writer = ShardWriter(store, 0)
    for sample in samples(3):
        writer.add(sample)
    sealed = writer.seal({"worker": "w"})
    assert committed_shards(store, 3) == {0: before} and sealed["count"] == 3 and "committed_at" not in sealed
    published = writer.publish()
    assert committed_shards(store, 3) == {0: published} and published["worker"] == "w"


def test_writer_reorders_to_the_expected_index_order(tmp_path):
    store = Store(tmp_path / "ds")
    items = samples(4)
    with ShardWriter(store, 0) as writer:
        writer.expect([0, 1, 2, 3])
        for i in (2, 0, 3, 1):
            writer.add(items[i])
        writer.commit()
    assert [key for key, _ in read_shard(store, 0)] == [f"{i:09d}" for i in range(4)]


def test_memory_url_run_is_written_verified_and_read_back(tmp_path):
    url = f"memory://dreamshard-test-{uuid.uuid4().hex}/run"
    store = write_dataset(url, samples(12), samples_per_shard=5)
    assert not store.is_local and sorted(committed_shards(store, 5)) == [0, 1, 2]
    assert verify_dataset(url) == []
    assert [key for key, _ in read_shard(store, 2)] == [f"{i:09d}" for i in (10, 11)]
    assert inspect_dataset(url).samples == 12
    store.fs.rm(store.root, recursive=True)


def test_marker_snapshot_is_a_cache_checked_against_the_listing(dataset):
    store = Store(dataset)
    committed = committed_shards(store, 10, use_snapshot=False)
    RunDir(store).write_snapshot(committed)
    snapshot = json.loads((dataset / "index" / "markers.json").read_text())
    assert snapshot["version"] == 2 and set(snapshot["markers"]) == {"0", "1", "2"}
    assert committed_shards(store, 10) == committed
    marker0 = dataset / "index" / "000000.commit.json"
    # The same bytes rewritten (a new version of the file): the snapshot no longer vouches for it, it is read.
    marker0.write_bytes(marker0.read_bytes())
    assert committed_shards(store, 10) == committed
    # Same size, unreadable: rewritten too, so it is read and fails, snapshot or not.
    marker0.write_bytes(b" " * marker0.stat().st_size)
    assert sorted(committed_shards(store, 10)) == [1, 2] and sorted(committed_shards(store, 10, use_snapshot=False)) == [1, 2]
    # A marker gone is gone whatever the snapshot says; a damaged snapshot costs reads, not answers.
    (dataset / "index" / "000002.commit.json").unlink()
    (dataset / "index" / "markers.json").write_bytes(b"\x00 not json")
    assert sorted(committed_shards(store, 10)) == [1]


def test_an_edited_snapshot_is_ignored_and_flagged(dataset):
    """An edit that keeps every size (a count 10 -> 19) would make generate un-commit a good shard if the
    snapshot were trusted; its digest no longer holds, so scans read the markers and verify names it."""
    store = Store(dataset)
    committed = committed_shards(store, 10, use_snapshot=False)
    RunDir(store).write_snapshot(committed)
    path = dataset / "index" / "markers.json"
    text = path.read_text()
    assert '"count":10' in text
    path.write_text(text.replace('"count":10', '"count":19', 1))
    assert committed_shards(store, 10) == committed  # the markers themselves
    problems = verify_dataset(dataset)
    assert len(problems) == 1 and "markers.json" in problems[0] and "digest" in problems[0] and "delete" in problems[0], problems


def test_verify_flags_a_snapshot_entry_that_would_be_trusted_but_differs(dataset):
    store = Store(dataset)
    committed = committed_shards(store, 10, use_snapshot=False)
    stale = {**committed, 1: {**committed[1], "tar_sha256": "0" * 64}}  # same length, other content
    RunDir(store).write_snapshot(stale)
    problems = verify_dataset(dataset)
    assert len(problems) == 1 and "markers.json" in problems[0] and "shard(s) (first: 1)" in problems[0], problems
    RunDir(store).write_snapshot(committed)
    assert verify_dataset(dataset) == []
