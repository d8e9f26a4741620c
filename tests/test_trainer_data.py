"""The trainer's data side on real files: engine shards (written with the engine's writer), run directories,
subsets, corrupt shards, label checks, weak augmentation and rare class sampling."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dreamshard.config import DomainConfig, RCSConfig, ShardsConfig, TrainDataConfig
from dreamshard.errors import UserError
from dreamshard.format.rundir import write_dataset
from dreamshard.format.shards import ShardSample
from dreamshard.trainer.data import Augment, DataError, RareClassSampler, check_labels, resolve_shards, train_loader

SIZE = 24


def _write_run(root, num_samples: int, per_shard: int, label_value: int | None = None) -> None:
    """A run directory in the engine format; sample i's image is filled with value i (readable back)."""
    samples = []
    for index in range(num_samples):
        image = Image.fromarray(np.full((SIZE, SIZE, 3), index, dtype=np.uint8))
        files = {} if label_value is None else {"seg.png": Image.fromarray(np.full((SIZE, SIZE), label_value, dtype=np.uint8))}
        samples.append(ShardSample({"index": index}, image, files))
    write_dataset(root, samples, per_shard, image_format="png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    _write_run(root, num_samples=50, per_shard=16)  # shards of 16, 16, 16, 2: uneven
    return root


def test_shards_from_run_dir_glob_and_brace(run_dir):
    urls, keys = resolve_shards(ShardsConfig(path=str(run_dir)))
    assert [u.rsplit("/", 1)[1] for u in urls] == ["000000.tar", "000001.tar", "000002.tar", "000003.tar"] and keys is None
    assert resolve_shards(ShardsConfig(path=f"{run_dir}/shards/*.tar"))[0] == urls
    assert resolve_shards(ShardsConfig(path=f"{run_dir}/shards/{{000001..000002}}.tar"))[0] == urls[1:3]


def test_uncommitted_shard_is_not_read(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "index" / "000001.commit.json").unlink()
    urls, _ = resolve_shards(ShardsConfig(path=str(copy)))
    assert not any(u.endswith("000001.tar") for u in urls) and len(urls) == 3


@pytest.mark.parametrize("path", ["{root}/nothing/*.tar", "{root}/shards/{{000007..000009}}.tar", "{root}/shards"])
def test_no_shards_matched_is_a_user_error(run_dir, path):
    with pytest.raises(UserError, match="no shards matched|not a dreamshard run"):
        resolve_shards(ShardsConfig(path=path.format(root=run_dir)))


def test_subset_is_exactly_the_first_n_manifest_samples(run_dir):
    urls, keys = resolve_shards(ShardsConfig(path=str(run_dir), subset=20))
    assert keys == {f"{i:09d}" for i in range(20)}
    assert [u.rsplit("/", 1)[1] for u in urls] == ["000000.tar", "000001.tar"]
    # Streamed through the trainer's reader, only those samples ever appear (image value = sample index).
    domain = DomainConfig(shards=ShardsConfig(path=str(run_dir), subset=20, shuffle_buffer=8))
    data = TrainDataConfig(crop_size=(8, 8), batch_size=5, workers=0, flip=False)
    seen = set()
    for batch in train_loader("target", domain, data, labelled=False, seed=0, batches=40):
        seen.update(batch["image"][:, 0, 0, 0].tolist())
    assert seen == set(range(20))
    with pytest.raises(UserError, match="larger than"):
        resolve_shards(ShardsConfig(path=str(run_dir), subset=51))


def test_stratified_subsets_are_balanced_and_nested(tmp_path):
    from dreamshard.format.reader import stratified_order

    classes = ["car"] * 8 + ["bus"] * 2 + ["train"] * 2  # a plan that made cars first
    image = Image.new("RGB", (8, 8))
    write_dataset(tmp_path / "run", [ShardSample({"index": i, "class_name": name}, image) for i, name in enumerate(classes)], 4)
    picked = {}
    for n in (3, 6, 12):
        _, keys = resolve_shards(ShardsConfig(path=str(tmp_path / "run"), subset=n, subset_order="stratified"))
        picked[n] = keys
        counts = {name: sum(classes[int(k)] == name for k in keys) for name in set(classes)}
        assert max(counts.values()) - min(counts.values()) <= (1 if n <= 6 else 6), (n, counts)
    assert picked[3] < picked[6] < picked[12]  # nested prefixes of one order
    _, plain = resolve_shards(ShardsConfig(path=str(tmp_path / "run"), subset=6))
    assert {classes[int(k)] for k in plain} == {"car"}  # manifest order: the first 6 are all cars
    assert stratified_order(["a", "a", "b"]) == [0, 2, 1]


def test_stream_has_exact_length_with_uneven_shards_and_workers(run_dir):
    domain = DomainConfig(shards=ShardsConfig(path=str(run_dir), shuffle_buffer=0))
    data = TrainDataConfig(crop_size=(SIZE, SIZE), batch_size=4, workers=2)
    batches = list(train_loader("target", domain, data, labelled=False, seed=0, batches=13))
    assert len(batches) == 13
    assert all(b["image"].shape == (4, 3, SIZE, SIZE) and b["image"].dtype == torch.uint8 for b in batches)
    domain = DomainConfig(shards=ShardsConfig(path=str(run_dir), resampled=False, shuffle_buffer=0))
    assert len(list(train_loader("target", domain, data, labelled=False, seed=0, batches=30))) == 30  # shards repeat


def test_corrupt_shard_is_skipped_and_counted(run_dir, tmp_path):
    good = run_dir / "shards" / "000000.tar"
    bad = tmp_path / "bad.tar"
    bad.write_bytes(good.read_bytes()[:5000] + b"\x00garbage" * 100)  # truncated mid-member
    noimage = tmp_path / "noimage.tar"
    noimage.write_bytes(b"")  # an empty file is not a tar
    domain = DomainConfig(shards=ShardsConfig(path=f"{{{bad},{noimage},{good}}}", shuffle_buffer=0))
    data = TrainDataConfig(crop_size=(SIZE, SIZE), batch_size=4, workers=0, max_bad_fraction=0.9)
    batches = list(train_loader("target", domain, data, labelled=False, seed=0, batches=30))
    assert len(batches) == 30  # training goes on
    assert batches[-1]["skipped"][0] > 0  # (shards, samples) skipped
    # With the default budget (half the shards read), two bad shards of three stop the stream instead.
    with pytest.raises(DataError, match=r"target data: \d+ of \d+ shards read failed, more than data.max_bad_fraction \(0.5\)"):
        list(train_loader("target", domain, TrainDataConfig(crop_size=(SIZE, SIZE), batch_size=4, workers=0), labelled=False, seed=0, batches=30))


@pytest.mark.parametrize("resampled", [True, False])
def test_every_shard_unreadable_ends_the_stream(tmp_path, resampled):
    for name in ("a", "b"):
        (tmp_path / f"{name}.tar").write_bytes(b"not a tar at all" * 10)
    domain = DomainConfig(shards=ShardsConfig(path=f"{tmp_path}/*.tar", shuffle_buffer=0, resampled=resampled))
    data = TrainDataConfig(crop_size=(SIZE, SIZE), batch_size=4, workers=0)
    with pytest.raises(DataError, match="target data: every shard read failed") as caught:
        list(train_loader("target", domain, data, labelled=False, seed=0, batches=30))
    assert "first error:" in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_labelled_domain_on_shards_without_labels_names_the_fix(run_dir):
    domain = DomainConfig(shards=ShardsConfig(path=str(run_dir), shuffle_buffer=0))
    data = TrainDataConfig(crop_size=(8, 8), batch_size=4, workers=0)
    with pytest.raises(DataError, match="no sample has seg.png.*label-keeping shards"):
        list(train_loader("target", domain, data, labelled=True, seed=0, batches=30))


@pytest.mark.parametrize("case, message", [("txt2img shards", "no sample has seg.png"), ("unreadable shards", "every shard read failed")])
def test_train_on_unusable_target_is_one_line_exit_1(run_dir, tmp_path, case, message):
    """Through the CLI with DataLoader worker processes, as a user runs it: no hang, no traceback."""
    import json
    import time

    from typer.testing import CliRunner

    from dreamshard.cli import app

    path = str(run_dir)
    if case == "unreadable shards":
        for index in range(3):
            (tmp_path / f"{index:06d}.tar").write_bytes(b"\x00garbage" * 64)
        path = f"{tmp_path}/*.tar"
    config = {
        "method": "supervised_synthetic", "output": {"path": str(tmp_path / "out")}, "max_iters": 5, "progress": False,
        "data": {"target": {"shards": {"path": path, "shuffle_buffer": 0}}, "crop_size": [8, 8], "batch_size": 2, "workers": 2},
        "model": {"backbone": "test_resnet", "pretrained": "none", "embed_dim": 8, "num_classes": 3},
    }  # fmt: skip
    (tmp_path / "train.yaml").write_text(json.dumps(config))
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", str(tmp_path / "train.yaml")])
    print(f"train on {case} ended after {time.perf_counter() - started:.1f} s")  # reported, not asserted (see the note in the docs)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_labelled_shards_and_label_range_check(tmp_path):
    _write_run(tmp_path / "ok", num_samples=6, per_shard=6, label_value=3)
    domain = DomainConfig(shards=ShardsConfig(path=str(tmp_path / "ok"), shuffle_buffer=0))
    data = TrainDataConfig(crop_size=(16, 16), batch_size=2, workers=0)
    batch = next(iter(train_loader("target", domain, data, labelled=True, seed=0, batches=1)))
    assert batch["label"].shape == (2, 16, 16) and (batch["label"] == 3).all()
    check_labels(batch["label"], 4, "x")
    with pytest.raises(UserError, match=r"label ids \[3\] are outside the 3 classes"):
        check_labels(batch["label"], 3, "target data")


def test_augment_resizes_crops_pads_and_keeps_image_and_label_aligned():
    rng = np.random.default_rng(0)
    label = np.zeros((30, 40), dtype=np.uint8)
    label[:, 20:] = 1
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 200
    image, crop = Augment(resize=None, crop=(16, 16), flip=True, cat_max_ratio=1.0)(Image.fromarray(pixels), label, rng)
    assert image.shape == (3, 16, 16) and crop.shape == (16, 16)
    assert torch.equal(image[0] == 200, crop == 1)  # same crop and flip for both
    image, crop = Augment(resize=(8, 10), crop=(12, 12), flip=False)(Image.fromarray(pixels), label, rng)
    assert image.shape == (3, 12, 12) and (crop[8:] == 255).all() and (image[:, 8:] == 0).all()  # padded
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG")
    assert Augment(resize=(15, 20), crop=(8, 8), flip=False).decode(encoded.getvalue()).size[0] >= 20  # draft never undershoots


def test_rare_class_sampling_favours_rare_classes():
    stats = [{0: 1000, 1: 10}] * 50 + [{0: 1000, 2: 200}] * 2  # class 2 is rare overall
    sampler = RareClassSampler(stats, RCSConfig(enabled=True, class_temp=0.01, min_pixels=50, min_crop_ratio=0.5))
    assert sampler.classes == [0, 2]  # class 1 never has more than min_pixels in a file
    rng = np.random.default_rng(0)
    draws = [sampler.draw(rng) for _ in range(200)]
    assert sum(cls == 2 for cls, _ in draws) > 150
    assert all(index >= 50 for cls, index in draws if cls == 2)
    assert sampler.min_crop_pixels == 25


@pytest.mark.slow
def test_supervised_synthetic_on_labelled_shards_evaluated_on_shards(tmp_path):
    from dreamshard.config import TrainConfig
    from dreamshard.trainer.loop import train

    _write_run(tmp_path / "synthetic", num_samples=8, per_shard=4, label_value=2)
    shards = {"shards": {"path": str(tmp_path / "synthetic"), "shuffle_buffer": 0}}
    config = TrainConfig(
        method="supervised_synthetic", output={"path": str(tmp_path / "out")}, max_iters=2, progress=False,
        data={"target": shards, "val": shards, "crop_size": (16, 16), "batch_size": 2, "workers": 0},
        model={"backbone": "test_resnet", "pretrained": "none", "decoder": "segformer", "embed_dim": 8, "num_classes": 3},
        optim={"warmup_iters": 0, "grad_accum": 2},
    )  # fmt: skip
    summary = train(config)
    assert summary.pixels == 8 * SIZE * SIZE  # every val pixel of every sample, at label size
    assert summary.per_class_iou["class2"] is not None and summary.per_class_iou["class0"] is None


def test_backbone_loads_local_pretrained_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    from dreamshard.config import TrainModelConfig
    from dreamshard.trainer.model import Segmenter

    torch.manual_seed(5)
    reference = timm.create_model("test_resnet", pretrained=False)
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained=str(tmp_path / "w.safetensors"), num_classes=3))
    loaded, expected = model.backbone.state_dict(), reference.state_dict()
    shared = [name for name in loaded if name in expected]
    assert len(shared) == len(loaded) and all(torch.equal(loaded[name], expected[name]) for name in shared)
    with pytest.raises(UserError, match="file not found"):
        Segmenter(TrainModelConfig(backbone="test_resnet", pretrained=str(tmp_path / "missing.safetensors")))


def test_toy_data_command_writes_engine_shards_and_folders(tmp_path):
    from typer.testing import CliRunner

    from dreamshard.cli import app
    from dreamshard.format.reader import read_manifest

    result = CliRunner().invoke(app, ["toy-data", str(tmp_path / "toy"), "--size", "16"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "toy" / "target").num_rows == 256  # a run directory in the engine format
    assert len(resolve_shards(ShardsConfig(path=str(tmp_path / "toy" / "target")))[0]) == 4
    assert len(list((tmp_path / "toy" / "source" / "labels").glob("*.png"))) == 256
    again = CliRunner().invoke(app, ["toy-data", str(tmp_path / "toy")])
    assert again.exit_code == 2 and "not empty" in again.output
