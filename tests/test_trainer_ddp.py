"""Training on several ranks and across interruptions, as users run it: two gloo ranks launched by torchrun
through the real CLI, killed with SIGKILL mid-epoch, resumed with another number of ranks; a killed one-rank
run resumed to the uninterrupted run's exact result; two Ray Train workers on the Ray cluster, shards on S3."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dreamshard.trainer.toy import make_toy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy_dacs.yaml"
SMALL = {"data.crop_size": "[32, 32]", "model.embed_dim": 16, "model.backbone": "test_resnet", "progress": "false", "image_interval": 0}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # Target: 48 samples in shards of 10, 10, 10, 10, 8; source: 16 labelled images.
    return make_toy(tmp_path_factory.mktemp("toy"), seed=3, size=32, num_source=16, num_target=48, num_val=4, samples_per_shard=10)


def toy_sets(toy: dict, out: Path, **extra) -> dict:
    return {
        "output.path": out, "data.source.folder.root": toy["source"], "data.target.shards.path": toy["target"],
        "data.val.folder.root": toy["target_val"], **SMALL, **extra,
    }  # fmt: skip


def command(sets: dict, ranks: int) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable]
    args = [*launch, "-m", "dreamshard", "-q", "train", str(CONFIG)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def run(sets: dict, ranks: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(cwd / "train.log", "w") as log:  # as on a cluster: output to a file, not a terminal
        result = subprocess.run(command(sets, ranks), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=400)
    result.stdout = (cwd / "train.log").read_text()
    return result


def kill_after_checkpoint(sets: dict, ranks: int, cwd: Path, checkpoint: Path) -> None:
    """Start a run, SIGKILL its launcher and every rank once `checkpoint` exists (mid-run, as a preemption).
    torchrun starts each rank in a session of its own, so the ranks are found as the launcher's descendants."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(cwd / "killed.log", "w") as log:
        process = subprocess.Popen(command(sets, ranks), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not checkpoint.is_dir() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        pids = [*descendants(process.pid), process.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
    while time.time() < deadline and any(running(pid) for pid in pids):  # SIGKILL is delivered, not yet done
        time.sleep(0.05)
    assert checkpoint.is_dir(), (cwd / "killed.log").read_text()[-3000:]


def running(pid: int) -> bool:
    """Not yet exited (a zombie, exited but not reaped where nothing reaps orphans, counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def records(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "samples").glob("rank*.jsonl")) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_killed_two_rank_run_resumed_on_one_rank_sees_each_sample_of_the_epoch_once(toy, tmp_path):
    """Global batch 4, 48 target samples: an epoch is 12 iterations. SIGKILL two ranks after the checkpoint
    at iteration 3 (they may have trained further: that work is lost and its record dropped), resume on one
    rank: iterations 1-12 took every target sample exactly once, and every source image three times."""
    from dreamshard.config import TrainConfig, load_config
    from dreamshard.trainer.loop import train

    out = tmp_path / "elastic"
    sets = toy_sets(toy, out, **{"max_iters": 40, "checkpoint_interval": 3, "log_interval": 1, "data.global_batch_size": 4, "data.record_samples": "true"})
    kill_after_checkpoint(sets, 2, tmp_path, out / "checkpoints" / "iter_0000003")
    before = records(out)  # the global batch of 4 split over two ranks: 2 each
    assert {line["world_size"] for line in before} == {2} and all(len(line["target"]) == len(line["source"]) == 2 for line in before)

    resumed = train(load_config(CONFIG, TrainConfig, [f"{k}={v}" for k, v in {**sets, "max_iters": 12}.items()]))
    assert 3 <= resumed.resumed_from < 12 and resumed.world_size == 1
    lines = [line for line in records(out) if line["iteration"] <= 12]
    assert sorted(line["iteration"] for line in lines if line["world_size"] == 1) == list(range(resumed.resumed_from + 1, 13))
    assert all(Counter(line["iteration"] for line in lines if line["world_size"] == 2)[it] == 2 for it in range(1, resumed.resumed_from + 1))
    target = Counter(key for line in lines for key in line["target"])
    assert target == Counter({f"{i:09d}": 1 for i in range(48)})  # each sample of the epoch once, none skipped
    assert set(Counter(key for line in lines for key in line["source"]).values()) == {3}  # 48 draws of 16 images: 3 epochs
    position = json.loads((out / "summary.json").read_text())["data_position"]
    assert position["domains"]["target"] == {**position["domains"]["target"], "epoch": 1, "in_epoch": 0}


@pytest.mark.slow
def test_a_killed_run_resumed_at_the_same_world_size_ends_exactly_as_the_uninterrupted_one(toy, tmp_path):
    from dreamshard.config import TrainConfig, load_config
    from dreamshard.trainer.loop import train

    def sets(out: Path) -> dict:
        return toy_sets(toy, out, **{"max_iters": 30, "checkpoint_interval": 10, "log_interval": 5, "data.workers": 1})

    def config(out: Path) -> TrainConfig:
        return load_config(CONFIG, TrainConfig, [f"{k}={v}" for k, v in sets(out).items()])

    uninterrupted = train(config(tmp_path / "whole"))
    out = tmp_path / "killed"
    kill_after_checkpoint(sets(out), 1, tmp_path, out / "checkpoints" / "iter_0000010")
    resumed = train(config(out))
    assert 10 <= resumed.resumed_from < 30
    for metric in ("mIoU", "mAcc", "aAcc"):
        assert abs(getattr(resumed, metric) - getattr(uninterrupted, metric)) <= 1e-6, metric
    assert resumed.weights_sha256 == uninterrupted.weights_sha256  # bit for bit, on this CPU
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in again] == [r["iteration"] for r in whole]  # the killed run's lost lines were dropped
    losses = [r["loss_mix"] for r in whole if "loss_mix" in r]
    assert [r["loss_mix"] for r in again if "loss_mix" in r] == pytest.approx(losses, abs=1e-6)  # each interval's mean loss


@pytest.mark.slow
def test_train_on_the_ray_cluster_through_ray_train_with_shards_on_s3(toy, ray_cluster, s3_bucket, tmp_path):
    """`dreamshard train --address ADDRESS --workers 2`, as a cluster user runs it (output to a file): two
    Ray Train workers form a gloo group and stream the target shards from S3 (moto's server)."""
    import fsspec

    fsspec.filesystem("s3").put(str(toy["target"]), f"{s3_bucket}/target", recursive=True)
    out = tmp_path / "ray"
    sets = toy_sets(toy, out, **{"max_iters": 4, "data.global_batch_size": 4, "data.target.shards.path": f"{s3_bucket}/target", "data.record_samples": "true"})
    args = command(sets, 1) + ["--address", ray_cluster, "--workers", "2", "--cpus-per-worker", "1"]
    with open(tmp_path / "train.log", "w") as log:
        result = subprocess.run(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, timeout=400)
    output = (tmp_path / "train.log").read_text()
    assert result.returncode == 0, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch"] == {"global": 4, "per_rank": 2, "world_size": 2, "grad_accum": 1}
    assert summary["mIoU"] is not None  # the confusion matrix summed over both ranks' slices of val
    assert [rank["steps"] for rank in summary["ranks"]] == [4, 4] and summary["ranks"][0]["weights_sha256"] == summary["ranks"][1]["weights_sha256"]
    assert summary["data_position"]["samples_seen"] == 16 and summary["data_position"]["domains"]["target"]["in_epoch"] == 16
    assert (out / "checkpoints" / "iter_0000004" / "teacher.safetensors").is_file()
    lines = records(out)
    assert {line["rank"] for line in lines} == {0, 1} and len(Counter(key for line in lines for key in line["target"])) == 16  # 4 x 4 distinct
