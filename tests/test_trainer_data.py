"""The trainer's data side on real files: engine shards (written with the engine's writer), run directories,
subsets, the epoch order (each sample once per epoch, whatever the ranks and workers), corrupt shards, label
checks, weak augmentation and rare class sampling."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dreamshard.config import DomainConfig, RCSConfig, ShardsConfig, TrainDataConfig
from dreamshard.errors import ConfigError, UserError
from dreamshard.format.rundir import write_dataset
from dreamshard.format.shards import ShardSample
from dreamshard.trainer.data import Augment, RareClassSampler, batch_stream, check_labels
from dreamshard.trainer.order import EpochOrder, ReadPlan
from dreamshard.trainer.shards import DataError, resolve_shards
from dreamshard.trainer.streams import batch_sizes

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
    # Read by the trainer, one epoch is exactly those samples, each once (image value = sample index).
    domain = DomainConfig(shards=ShardsConfig(path=str(run_dir), subset=20, shuffle_block=8))
    data = TrainDataConfig(crop_size=(8, 8), workers=0, flip=False)
    seen = [value for batch in stream(domain, data, ReadPlan(batches=4, batch_size=5)) for value in batch["image"][:, 0, 0, 0].tolist()]
    assert sorted(seen) == list(range(20))
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


def stream(domain: DomainConfig, data: TrainDataConfig, plan: ReadPlan, labelled: bool = False, seed: int = 0) -> list[dict]:
    return list(batch_stream("target", domain, data, labelled, seed, plan))


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def test_an_epoch_is_every_sample_once_whatever_the_workers_and_ranks(run_dir):
    """50 samples in shards of 16, 16, 16, 2: one epoch of the global order holds each once; ranks take
    slices of each global batch, and their union in order is the one-rank sequence; workers change nothing."""
    domain = DomainConfig(shards=ShardsConfig(path=str(run_dir), shuffle_block=20))
    data = TrainDataConfig(crop_size=(SIZE, SIZE), workers=0)
    one_rank = stream(domain, data, ReadPlan(batches=10, batch_size=5))
    assert sorted(keys_of(one_rank)) == [f"{i:09d}" for i in range(50)]
    assert keys_of(one_rank) != sorted(keys_of(one_rank))  # shuffled
    assert all(b["image"].shape == (5, 3, SIZE, SIZE) and b["image"].dtype == torch.uint8 for b in one_rank)
    with_workers = stream(domain, TrainDataConfig(crop_size=(SIZE, SIZE), workers=2), ReadPlan(batches=10, batch_size=5))
    assert keys_of(with_workers) == keys_of(one_rank)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(one_rank, with_workers))  # augmentation seeded by position
    # Two ranks with 5 each (global batch 10): rank r takes the r-th half of every global batch.
    ranks = [stream(domain, data, ReadPlan(batches=5, batch_size=5, rank=r, world=2)) for r in (0, 1)]
    interleaved = [batch for pair in zip(*ranks) for batch in pair]
    assert keys_of(interleaved) == keys_of(one_rank)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(one_rank, interleaved))
    # The next epoch is another order of the same samples; a stream started at position 50 reads it too.
    two_epochs = stream(domain, data, ReadPlan(batches=20, batch_size=5))
    assert keys_of(two_epochs)[:50] == keys_of(one_rank) and sorted(keys_of(two_epochs)[50:]) == sorted(keys_of(one_rank))
    assert keys_of(two_epochs)[50:] != keys_of(one_rank)
    assert keys_of(stream(domain, data, ReadPlan(batches=2, batch_size=5, start=50))) == keys_of(two_epochs)[50:60]


def test_epoch_order_blocks_shards_and_resumes_at_any_world_size():
    counts = [16, 16, 16, 2, 0, 7]
    order = EpochOrder(counts, seed=3, stream=1, shuffle_block=20)
    for epoch in range(3):
        addresses = [order.address(epoch * order.total + p) for p in range(order.total)]
        assert sorted((a.shard, a.ordinal) for a in addresses) == sorted((s, o) for s, n in enumerate(counts) for o in range(n))
        blocks: dict[int, set[int]] = {}
        for a in addresses:  # a block is whole shards, and its positions are contiguous
            blocks.setdefault(a.block_start, set()).add(a.shard)
        assert all(len(shards & other) == 0 for start, shards in blocks.items() for o, other in blocks.items() if o != start)
        assert all(sum(counts[s] for s in shards) >= 20 or start == max(blocks) for start, shards in blocks.items())
    # Where the positions of a step go: ranks x micro-batches cover the global batch once, in order.
    for world, per_rank in ((1, 4), (2, 2), (4, 1)):
        positions = [p for batch in range(3) for rank in range(world) for p in ReadPlan(12, per_rank, start=8, rank=rank, world=world).positions(batch)]
        assert positions == list(range(8, 8 + 3 * 4))
    assert EpochOrder(counts, 3, 1, 0).address(0).block_size == counts[EpochOrder(counts, 3, 1, 0).address(0).shard]  # no sample shuffle


def test_global_batch_is_divided_over_ranks_and_steps():
    assert batch_sizes(TrainDataConfig(global_batch_size=4), accum=1, world=2).per_rank == 2
    assert batch_sizes(TrainDataConfig(global_batch_size=8), accum=2, world=2).per_rank == 2
    assert batch_sizes(TrainDataConfig(batch_size=3), accum=2, world=2).global_batch == 12
    with pytest.raises(UserError, match="global_batch_size 6 does not divide over 4 rank.*multiple of 4"):
        batch_sizes(TrainDataConfig(global_batch_size=6), accum=1, world=4)


def test_retired_stream_keys_name_the_new_order():
    from dreamshard.config import TrainConfig, validate

    with pytest.raises(ConfigError, match="shuffle_buffer no longer exists.*seeded epoch order"):
        validate(TrainConfig, {"method": "supervised_synthetic", "data": {"target": {"shards": {"path": "x", "shuffle_buffer": 8}}}}, "train.yaml")


def test_corrupt_shard_is_skipped_and_its_positions_filled_the_same_way_everywhere(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    tar = copy / "shards" / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[100:160] = b"\xff" * 60  # its first header's checksum no longer holds; same size, so it stays committed
    tar.write_bytes(bytes(data))
    domain = DomainConfig(shards=ShardsConfig(path=str(copy), shuffle_block=20))
    data_config = TrainDataConfig(crop_size=(SIZE, SIZE), workers=0)
    batches = stream(domain, data_config, ReadPlan(batches=10, batch_size=5))  # one epoch
    assert len(batches) == 10 and str(tar) in batches[-1]["problems"]  # training goes on, the shard named
    assert sum(b["substituted"] for b in batches) == 16 and not {f"{i:09d}" for i in range(16, 32)} & set(keys_of(batches))
    workers = TrainDataConfig(crop_size=(SIZE, SIZE), workers=2)
    ranks = [stream(domain, workers, ReadPlan(5, 5, rank=r, world=2)) for r in (0, 1)]
    assert keys_of([b for pair in zip(*ranks) for b in pair]) == keys_of(batches)  # the same substitutes on every rank and worker
    # Patterns have no markers: an unreadable tar counts no samples, is named, and the rest trains.
    good, empty = run_dir / "shards" / "000000.tar", tmp_path / "empty.tar"
    empty.write_bytes(b"")  # an empty file is not a tar
    batches = stream(DomainConfig(shards=ShardsConfig(path=f"{{{empty},{good}}}")), data_config, ReadPlan(batches=4, batch_size=4))
    assert sorted(keys_of(batches)) == [f"{i:09d}" for i in range(16)] and str(empty) in batches[0]["problems"]
    # Past the budget (more than data.max_bad_fraction of the shards read), the stream stops.
    with pytest.raises(DataError, match=r"target data: \d+ of \d+ shards read failed, more than data.max_bad_fraction \(0.0\)"):
        stream(
            DomainConfig(shards=ShardsConfig(path=str(copy), shuffle_block=0)),
            TrainDataConfig(crop_size=(SIZE, SIZE), workers=0, max_bad_fraction=0.0),
            ReadPlan(30, 5),
        )


def test_every_shard_unreadable_ends_the_stream(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.tar").write_bytes(b"not a tar at all" * 10)
    domain = DomainConfig(shards=ShardsConfig(path=f"{tmp_path}/*.tar"))
    data = TrainDataConfig(crop_size=(SIZE, SIZE), batch_size=4, workers=0)
    with pytest.raises(DataError, match="target data: every shard read failed") as caught:
        stream(domain, data, ReadPlan(batches=30, batch_size=4))
    assert "first error:" in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_labelled_domain_on_shards_without_labels_names_the_fix(run_dir):
    domain = DomainConfig(shards=ShardsConfig(path=str(run_dir)))
    data = TrainDataConfig(crop_size=(8, 8), workers=0)
    with pytest.raises(DataError, match="no sample has seg.png.*label-keeping shards"):
        stream(domain, data, ReadPlan(batches=30, batch_size=4), labelled=True)


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
        "data": {"target": {"shards": {"path": path}}, "crop_size": [8, 8], "batch_size": 2, "workers": 2},
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
    domain = DomainConfig(shards=ShardsConfig(path=str(tmp_path / "ok")))
    data = TrainDataConfig(crop_size=(16, 16), workers=0)
    batch = stream(domain, data, ReadPlan(batches=1, batch_size=2), labelled=True)[0]
    assert batch["label"].shape == (2, 16, 16) and (batch["label"] == 3).all()
    with pytest.raises(UserError, match=r"target data: label ids \[3\] are outside the 3 classes"):  # checked in the workers
        list(batch_stream("target", domain, TrainDataConfig(crop_size=(16, 16), workers=0), True, 0, ReadPlan(1, 2), num_classes=3))
    check_labels(batch["label"], 4, "x")
    with pytest.raises(UserError, match=r"label ids \[3\] are outside the 3 classes"):
        check_labels(batch["label"], 3, "target data")


def test_augment_resizes_crops_pads_and_keeps_image_and_label_aligned():
    rng = np.random.default_rng(0)
    label = np.zeros((30, 40), dtype=np.uint8)
    label[:, 20:] = 1
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 200
    image, crop = Augment(resize=None, crop=(16, 16), flip=True, cat_max_ratio=1.0)(pixels, label, rng)
    assert image.shape == (3, 16, 16) and crop.shape == (16, 16)
    assert torch.equal(image[0] == 200, crop == 1)  # same crop and flip for both
    small = Augment(resize=(8, 10), crop=(12, 12), flip=False)
    image, crop = small(small.resized(Image.fromarray(pixels)), label, rng)
    assert image.shape == (3, 12, 12) and (crop[8:] == 255).all() and (image[:, 8:] == 0).all()  # padded
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    for decoder in ("pil", "torchvision"):  # both decoders resize to (height, width)
        decoded = Augment(resize=(15, 20), crop=(8, 8), flip=False, decoder=decoder).decode(encoded.getvalue())
        assert decoded.shape == (15, 20, 3) and decoded.dtype == np.uint8 and abs(int(decoded[:, 15].mean()) - 200) < 5


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
    shards = {"shards": {"path": str(tmp_path / "synthetic")}}
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


# ------------------------------------------------------------------------------------ paper pipelines


def test_keep_ratio_size_and_cv2_kernels_by_hand():
    from dreamshard.trainer.data import resize_label, resize_pixels, resized_size

    assert resized_size((720, 1280), "keep_ratio", 1052, 1914) == (704, 1280)  # mmcv: sf = min(1280/1914, 720/1052)
    assert resized_size((1440, 2560), "keep_ratio", 1052, 1914) == (1407, 2560)
    assert resized_size((760, 1280), "keep_ratio", 760, 1280) == (760, 1280) and resized_size((512, 1024), "exact", 1, 1) == (512, 1024)
    row = torch.tensor([0, 100, 200, 255], dtype=torch.uint8).view(1, 1, 4).expand(3, 1, 4)
    # cv2.INTER_LINEAR halving: samples at 0.5 and 2.5 (half-pixel centres), no antialiasing: 50 and 227.5 → 228
    assert resize_pixels(row, (1, 2), "cv2")[0, 0].tolist() == [50, 228]
    assert resize_pixels(row, (1, 2), "pil")[0, 0].tolist() != [50, 228]  # PIL's antialiased triangle spans more pixels
    label = np.array([[1, 2, 3, 4, 5, 6]], dtype=np.uint8)
    assert resize_label(label, (1, 3), "cv2").tolist() == [[1, 3, 5]]  # INTER_NEAREST: floor(dst x 2)
    assert resize_label(label, (1, 3), "pil").tolist() == [[2, 4, 6]]  # PIL: the centres, floor((dst + 0.5) x 2)


class ScriptedRng:
    """np.random.Generator's integers/random from a script, for crops decided by hand."""

    def __init__(self, values):
        self.values = list(values)

    def integers(self, low, high):
        value = self.values.pop(0)
        assert low <= value < high
        return value

    def random(self):
        return 0.9  # no flip


def test_random_crop_cat_max_ratio_and_rcs_as_mmseg_and_daformer():
    """Labels of 4 rows, 4x4 crops at column offsets drawn by hand (ScriptedRng gives top, then left)."""
    label = np.zeros((4, 8), dtype=np.uint8)
    label[:, 4:] = 1  # columns 0-3 class 0, 4-7 class 1
    augment = Augment(resize=None, crop=(4, 4), flip=False, cat_max_ratio=0.75)
    # offsets 0 and 4 hold one class (redrawn); 2 is half and half (< 0.75): kept
    assert augment.crop_origin((4, 8), label, ScriptedRng([0, 0, 0, 4, 0, 2]), None, 0) == (0, 2)
    # 3 is 12/16 = 0.75 class 1: not below 0.75 (mmseg's strict test), redrawn
    assert augment.crop_origin((4, 8), label, ScriptedRng([0, 3, 0, 2]), None, 0) == (0, 2)
    # ten failed re-draws: mmseg keeps the eleventh draw unchecked
    scripted = ScriptedRng([0, 0] * 11)
    assert augment.crop_origin((4, 8), label, scripted, None, 0) == (0, 0) and scripted.values == []
    # RCS (DAFormer): columns 0-3 class 0, 4-7 class 1, 8-11 class 2; focus class 2, more than 4 pixels.
    three = np.repeat(np.arange(3, dtype=np.uint8), 4)[None].repeat(4, axis=0)
    # 4 is one class (cat_max redraw) → 2 balanced but no class 2 (RCS redo) → 7 is 3/4 class 2 (redraw) → 6 balanced with 8 px: kept
    scripted = ScriptedRng([0, 4, 0, 2, 0, 7, 0, 6])
    assert augment.crop_origin((4, 12), three, scripted, 2, 4) == (0, 6) and scripted.values == []
    # before: cat_max_ratio was skipped under RCS, so the first crop with class 2 (7) would have been kept


def test_colour_jitter_is_zodis_torchvision_order_per_image():
    from dreamshard.config import ColorJitterConfig
    from dreamshard.trainer.data import color_jitter

    grey = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    config = ColorJitterConfig(brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0)
    rng = np.random.default_rng(0)
    factor = np.random.default_rng(0).uniform(0.5, 1.5)
    assert torch.equal(color_jitter(grey, config, rng), torch.full_like(grey, int(100 * factor)))  # multiplicative, truncated (torchvision on uint8)


def test_paired_source_items_are_their_twins_cropped_alike(tmp_path):
    """Target shard i holds source item k's image + 40 and its label, json source_key = k: with data.paired
    the source batch holds each target sample's own item, through the same crop window and flip."""
    from dreamshard.config import TrainConfig
    from dreamshard.trainer.data import FolderSamples, RankBatches, TwinSamples, domain_samples

    rng = np.random.default_rng(1)
    images, labels, samples = {}, {}, []
    for k in range(5):
        stem = f"{k:03d}"
        images[stem] = rng.integers(0, 200, size=(24, 32, 3), dtype=np.uint8)
        labels[stem] = rng.integers(0, 3, size=(24, 32), dtype=np.uint8)
        (tmp_path / "source" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "source" / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[stem]).save(tmp_path / "source" / "images" / f"{stem}.png")
        Image.fromarray(labels[stem]).save(tmp_path / "source" / "labels" / f"{stem}.png")
    for index in range(10):
        stem = f"{(index * 3) % 5:03d}"
        twin = Image.fromarray(images[stem] + 40)
        samples.append(ShardSample({"index": index, "source_key": stem}, twin, {"seg.png": Image.fromarray(labels[stem])}))
    write_dataset(tmp_path / "twins", samples, 4, image_format="png")
    config = TrainConfig(
        method="supervised_synthetic",
        data={"source": {"folder": {"layout": "generic", "root": str(tmp_path / "source"), "num_classes": 3}},
              "target": {"shards": {"path": str(tmp_path / "twins"), "shuffle_block": 4}}, "crop_size": (16, 16), "paired": True, "workers": 0},
        model={"num_classes": 3, "pretrained": "none"},
    )  # fmt: skip
    target = domain_samples("target", config.data.target, config.data, True, 0)
    folder = domain_samples("source", config.data.source, config.data, True, 0)
    assert isinstance(folder, FolderSamples)
    plan = ReadPlan(batches=5, batch_size=2)
    for n in range(5):
        twin_batch = RankBatches(TwinSamples("source", folder, target), plan, 0, 3)[n]
        target_batch = RankBatches(target, plan, 0, 3)[n]
        assert torch.equal(target_batch["image"].int() - twin_batch["image"].int(), torch.full_like(twin_batch["image"], 40).int())
        assert torch.equal(target_batch["label"], twin_batch["label"])
    with pytest.raises(ConfigError, match="data.paired .* needs data.source.folder and data.target.shards"):
        from dreamshard.config import validate

        validate(TrainConfig, {"method": "source_only", "data": {"source": {"folder": {"root": "x"}}, "paired": True}}, "train.yaml")


def test_evaluation_labels_at_the_input_size_as_zodi(tmp_path):
    from dreamshard.trainer.data import EvalSet

    label = np.zeros((24, 32), dtype=np.uint8)
    label[:, 16:] = 2
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(label).save(tmp_path / "labels" / "a.png")
    folder = {"layout": "generic", "root": str(tmp_path), "num_classes": 3}
    full = EvalSet(DomainConfig(folder=folder, resize=(12, 16), resize_kernel="pil_lanczos"))[0]
    resized = EvalSet(DomainConfig(folder=folder, resize=(12, 16), resize_kernel="pil_lanczos", resize_labels=True))[0]
    assert full[0].shape == resized[0].shape == (3, 12, 16) and full[1].shape == (24, 32)
    assert resized[1].shape == (12, 16) and (resized[1][:, :8] == 0).all() and (resized[1][:, 8:] == 2).all()
