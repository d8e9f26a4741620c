"""What an outside fault probe found (issue 22), each case made for real: an S3 endpoint that goes silent or
refuses (a fault-injecting proxy in front of moto), two trainings on one output, SIGTERM during training,
damaged runs repaired, streams with a broken or truncated shard, images as cameras and scanners save them,
a full disk under a checkpoint. Every command ends in one line and an exit code, never a traceback, and
nothing committed is lost."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from faultproxy import FaultProxy
from PIL import Image
from typer.testing import CliRunner
from waiting import wait_for

from dreamshard.cli import app
from dreamshard.format.rundir import write_dataset
from dreamshard.format.shards import ShardSample

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env: dict | None = None, timeout: float = 300, cwd=None) -> tuple[int, list[str], float]:
    """The command as a cluster user runs it: a process of its own, its output to a file."""
    started = time.monotonic()
    with open(os.devnull, "w") as null:
        done = subprocess.run(
            [sys.executable, "-m", "dreamshard", *map(str, args)], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=null, text=True, timeout=timeout, cwd=cwd,
        )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert "Traceback" not in done.stdout, done.stdout[-3000:]
    return done.returncode, lines, time.monotonic() - started


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("error:")]


def samples(n: int, size: int = 16) -> list[ShardSample]:
    rng = np.random.default_rng(0)
    return [ShardSample({"index": i, "prompt": f"p{i}"}, Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))) for i in range(n)]


# ------------------------------------------------------------------------------------------- object store

FAST_DEADLINES = {"DREAMSHARD_STORE_CONNECT_TIMEOUT_S": "1", "DREAMSHARD_STORE_READ_TIMEOUT_S": "1", "DREAMSHARD_STORE_RETRIES": "2"}


@pytest.fixture
def proxy(s3_endpoint):
    fault = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    yield fault
    fault.stop()


@pytest.mark.parametrize("mode", ["silent", "refuse"])
def test_a_silent_or_refusing_endpoint_is_one_line_within_its_deadlines(s3_bucket, proxy, mode):
    url = f"{s3_bucket}/run"
    write_dataset(url, samples(8), samples_per_shard=4)  # through moto itself
    env = {**FAST_DEADLINES, "AWS_ENDPOINT_URL": proxy.url}
    code, lines, _ = cli("inspect", url, env=env)
    assert code == 0, lines  # through the proxy while it passes
    proxy.set(mode)
    for command in (["inspect", url], ["verify", url], ["preview", url, "-o", "/tmp/unused.png"]):
        code, lines, seconds = cli(*command, env=env)
        assert code == 1 and len(errors(lines)) == 1 and proxy.url in errors(lines)[0], lines
        assert seconds < 30, seconds  # deadlines of 1 s, 2 tries: seconds, not the minutes of a hang


@pytest.mark.slow
def test_generate_on_an_endpoint_that_goes_silent_stops_in_one_line_and_resumes(s3_bucket, proxy, tiny_model, tmp_path):
    url = f"{s3_bucket}/gen"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model), "device": "cpu"}, "sampling": {"width": 32, "height": 32, "steps": 2},
        "output": {"path": url, "samples_per_shard": 4}, "run": {"num_samples": 48, "batch_size": 4, "workers": 1},
    }))  # fmt: skip
    env = {**FAST_DEADLINES, "AWS_ENDPOINT_URL": proxy.url, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dreamshard", "generate", str(config)], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    import fsspec

    moto = fsspec.filesystem("s3", use_listings_cache=False)
    wait_for(lambda: moto.glob(f"{url}/index/*.commit.json") or process.poll() is not None, 180, "a first committed shard")
    proxy.set("silent")
    started = time.monotonic()
    code = process.wait(timeout=240)
    text = (tmp_path / "log").read_text()
    assert code == 1 and "Traceback" not in text and proxy.url in [line for line in text.splitlines() if line.startswith("error:")][-1], text[-3000:]
    assert time.monotonic() - started < 120
    proxy.set("pass")
    code, lines, _ = cli("generate", config, env=env)
    assert code == 0, lines
    code, lines, _ = cli("verify", url, env=env)
    assert code == 0, lines


def test_an_invalid_bucket_and_a_closed_ftp_port_are_one_line(s3_endpoint):
    for url in ("s3://Not_A_Valid_Bucket!/run", "ftp://127.0.0.1:9/run"):
        code, lines = run_cli("inspect", url)
        assert code in (1, 2) and len(errors(lines)) == 1, lines


# -------------------------------------------------------------------------------------------- training


def toy_config(toy: dict, out: Path, **changes) -> dict:
    data = yaml.safe_load((REPO / "configs/toy_source_only.yaml").read_text())
    data["data"]["source"]["folder"]["root"] = str(toy["source"])
    data["data"]["val"]["folder"]["root"] = str(toy["target_val"])
    data["data"].update(batch_size=2, crop_size=[32, 32], workers=0)
    data["model"]["embed_dim"] = 8
    data.update({"max_iters": 4, "progress": False, "eval_interval": 0, "checkpoint_interval": 0, "output": {"path": str(out)}, **changes})
    return data


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from dreamshard.trainer.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "toy", size=32, num_source=8, num_target=8, num_val=4, samples_per_shard=4)


@pytest.mark.slow
def test_a_second_train_on_one_output_is_refused_and_sigterm_leaves_a_checkpoint(toy, tmp_path):
    """The first training holds the output's lease: a second one is refused in one line. SIGTERM stops the
    first after the iteration it is in, with a checkpoint there (checkpoint_interval 0 writes none before the
    end), and a re-run resumes from it."""
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(toy_config(toy, tmp_path / "out", max_iters=100000)))
    with open(tmp_path / "log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "dreamshard", "train", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    wait_for(lambda: list((tmp_path / "out").glob("metrics.jsonl")) or first.poll() is not None, 120, "the first training's iterations")
    code, lines, _ = cli("train", config, cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and "being written by `dreamshard train`" in lines[0], lines
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 143
    last = [line for line in (tmp_path / "log").read_text().splitlines() if line.startswith("error:")][-1]
    assert "terminated (SIGTERM); stopped after iteration" in last and "resumes from it" in last, last
    stopped = int(last.split("stopped after iteration ")[1].split()[0])
    assert (tmp_path / "out" / "checkpoints" / f"iter_{stopped:07d}").is_dir() and not (tmp_path / "out" / ".lease").exists()
    config.write_text(yaml.safe_dump(toy_config(toy, tmp_path / "out", max_iters=stopped + 2)))
    code, lines, _ = cli("train", config, cwd=tmp_path)
    assert code == 0 and json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_from"] == stopped, lines


def test_a_killed_checkpoint_write_is_cleaned_up_on_resume(toy, tmp_path):
    from dreamshard.config import TrainConfig, validate
    from dreamshard.trainer.loop import train

    config = validate(TrainConfig, toy_config(toy, tmp_path / "out", max_iters=2))
    train(config)
    partial = tmp_path / "out" / "checkpoints" / ".iter_0000003.1a2b3c4d.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    train(validate(TrainConfig, toy_config(toy, tmp_path / "out", max_iters=3)))
    assert not partial.exists() and (tmp_path / "out" / "checkpoints" / "iter_0000003").is_dir()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a real full disk (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # still busy (a file held open): detach it now


def test_a_full_disk_under_a_checkpoint_is_one_line_and_keeps_the_last_one(toy, small_disk, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(toy_config(toy, small_disk / "out", max_iters=2, checkpoint_interval=1)))
    code, lines = run_cli("train", config)
    assert code == 1 and len(lines) == 1 and "no space left" in lines[0] and "resumes from the newest complete checkpoint" in lines[0], lines
    assert not list((small_disk / "out" / "checkpoints").glob(".*partial"))


# ------------------------------------------------------------------------------------------- streams


@pytest.fixture
def five_shards(tmp_path) -> Path:
    write_dataset(tmp_path / "run", samples(20, size=32), samples_per_shard=4, image_format="png")
    return tmp_path / "run"


def stream(run: Path, batches: int = 12, **shards):
    from dreamshard.config import DomainConfig, ShardsConfig, TrainDataConfig
    from dreamshard.trainer.data import batch_stream
    from dreamshard.trainer.order import ReadPlan

    domain = DomainConfig(shards=ShardsConfig(path=str(run), **shards))
    return list(batch_stream("target", domain, TrainDataConfig(crop_size=(32, 32), workers=0), False, 0, ReadPlan(batches, 2)))


def test_one_broken_shard_among_five_is_skipped_and_named_and_its_positions_filled(five_shards, caplog):
    tar = five_shards / "shards" / "000002.tar"
    data = bytearray(tar.read_bytes())
    data[100:160] = b"\xff" * 60  # its first header's checksum no longer holds; same size, so it stays committed
    tar.write_bytes(bytes(data))
    batches = stream(five_shards, batches=10, shuffle_block=8)  # one epoch: 20 positions
    assert len(batches) == 10 and any(str(tar) in batch["problems"] for batch in batches)
    assert sum(batch["substituted"] for batch in batches) == 4  # the broken shard's four positions
    keys = [key for batch in batches for key in batch["keys"]]
    assert not {f"{i:09d}" for i in range(8, 12)} & set(keys)  # none of its samples, each position filled from its block
    assert "skipped shard" in caplog.text and "000002.tar" in caplog.text


def test_a_shard_cut_at_a_member_boundary_is_named_and_counted(five_shards, caplog):
    tar = five_shards / "shards" / "000001.tar"
    with tarfile.open(tar) as whole:
        members = [(member, whole.extractfile(member).read()) for member in whole.getmembers()]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as cut:  # the first two samples only, a well-formed tar
        for member, payload in members[: 2 * 3]:
            cut.addfile(member, io.BytesIO(payload))
    marker = five_shards / "index" / "000001.commit.json"
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "tar_bytes": tar.stat().st_size}))  # as if the marker had been written for it
    batches = stream(five_shards, batches=10)
    assert any(str(tar) in batch["problems"] for batch in batches) and sum(batch["substituted"] for batch in batches) == 2
    assert "holds 2 of the 4 samples its commit marker counts" in caplog.text


def test_shards_left_out_by_a_wrong_shard_size_are_named(five_shards, caplog):
    record = json.loads((five_shards / "dreamshard.json").read_text())
    (five_shards / "dreamshard.json").write_text(json.dumps({**record, "samples_per_shard": 5}))
    stream(five_shards, batches=2)
    assert "4 of its 5 commit markers do not match their files or the run record (samples_per_shard 5)" in caplog.text


# ---------------------------------------------------------------------------------------------- repair


def test_a_damaged_record_is_restored_or_rebuilt_and_damaged_shards_uncommitted(five_shards):
    (five_shards / "dreamshard.json").write_text('{"num_samples": "twenty"}')  # valid JSON, wrong shape
    code, lines = run_cli("inspect", five_shards)
    assert code == 2 and "not a valid run record" in lines[0] and "dreamshard repair" in lines[0], lines
    code, lines = run_cli("repair", five_shards)
    assert code == 0 and any("restored dreamshard.json from index/run-record.json" in line for line in lines), lines
    assert run_cli("verify", five_shards)[0] == 0

    (five_shards / "dreamshard.json").unlink()
    (five_shards / "index" / "run-record.json").write_text("[]")  # no sound copy either
    tar = five_shards / "shards" / "000003.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:700] + bytes(255 - b for b in data[700:1300]) + data[1300:])  # same size, other bytes
    code, lines = run_cli("repair", five_shards)
    assert code == 0 and any("rebuilt a minimal dreamshard.json" in line for line in lines), lines
    assert any("un-committed shard 3" in line for line in lines), lines
    code, lines = run_cli("inspect", five_shards)
    assert code == 0 and any("16 of 20 planned" in line for line in lines), lines
    assert "nothing to repair" in " ".join(run_cli("repair", five_shards)[1])


# ----------------------------------------------------------------------------------------------- images


def test_images_are_read_upright_and_at_their_bit_depth(tmp_path):
    from dreamshard.datasets.images import read_rgb_image
    from dreamshard.errors import UserError

    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :20] = 255  # left half white
    rotated = Image.fromarray(wide).rotate(90, expand=True)  # stored sideways, as a camera does
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    rotated.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=100)
    upright = np.asarray(read_rgb_image(tmp_path / "photo.jpg"))
    assert upright.shape == (20, 40, 3) and upright[:, :15].mean() > 200 and upright[:, 25:].mean() < 50

    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000 of 65535
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    scaled = np.asarray(read_rgb_image(tmp_path / "grey16.png"))[..., 0]
    assert scaled.max() == round(63000 * 255 / 65535) and scaled.min() == 0  # not clipped to white

    rgba = np.full((8, 8, 4), 255, dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert read_rgb_image(tmp_path / "opaque.png").mode == "RGB"
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "transparent.png")
    with pytest.raises(UserError, match="transparent pixels"):
        read_rgb_image(tmp_path / "transparent.png")


# --------------------------------------------------------------------------------------------- the rest


def test_an_out_that_is_a_dangling_symlink_is_one_line(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    for command in (["plan", REPO / "configs/quickstart.yaml", "--out"], ["inspect"], ["repair"]):
        code, lines = run_cli(*command, tmp_path / "out")
        assert code == 2 and len(lines) == 1 and "symbolic link" in lines[0] and "gone" in lines[0], lines


def test_absurd_sizes_are_refused_by_plan(tmp_path):
    code, lines = run_cli("plan", REPO / "configs/quickstart.yaml", "--set", "sampling.width=100000", "--out", tmp_path / "x")
    assert code == 2 and len(lines) == 1 and "sampling.width = 100000" in lines[0], lines
    code, lines = run_cli("plan", REPO / "configs/quickstart.yaml", "--set", "sampling.width=16384", "--set", "sampling.height=16384", "--out", tmp_path / "x")
    assert code == 2 and len(lines) == 1 and "more than any accelerator holds" in lines[0], lines


def test_a_directory_in_place_of_the_marker_snapshot_is_named_as_a_cache(five_shards, caplog):
    from dreamshard.format.reader import committed_shards
    from dreamshard.format.rundir import RunDir
    from dreamshard.format.store import Store

    snapshot = five_shards / "index" / "markers.json"
    snapshot.unlink(missing_ok=True)
    snapshot.mkdir()
    store = Store(five_shards)
    assert len(committed_shards(store, 4)) == 5  # ignored by scans
    RunDir(store).write_snapshot(committed_shards(store, 4))
    assert "index/markers.json" in caplog.text and "only a cache" in caplog.text and "delete" in caplog.text


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]
