"""Faults: a worker SIGKILLed mid-run, a shard that keeps failing, a driver SIGKILLed and re-run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner
from waiting import wait_for

from dreamshard.cli import app
from dreamshard.config import GenerateConfig
from dreamshard.engine.driver import ACTOR_PREFIX
from dreamshard.engine.run import generate
from dreamshard.format.reader import manifest_rows, read_manifest
from dreamshard.tools.verify import verify_dataset

pytestmark = pytest.mark.slow


def make_config(model: Path, out: Path, num_samples: int, per_shard: int, **run) -> GenerateConfig:
    return GenerateConfig.model_validate(
        {
            "model": {"path": str(model), "device": "cpu"},
            "prompts": {"classes": ["car", "bus"], "templates": [{"text": "a photo of a {token} {cls}"}]},
            "sampling": {"width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0},
            "output": {"path": str(out), "samples_per_shard": per_shard},
            "run": {"num_samples": num_samples, "batch_size": 4, "workers": 2, **run},
        }
    )


def markers(out: Path) -> list[Path]:
    return sorted((out / "index").glob("*.commit.json")) if (out / "index").is_dir() else []


def worker_names(all_namespaces: bool = False) -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=all_namespaces)
    names = [entry["name"] if isinstance(entry, dict) else entry for entry in names]
    return [name for name in names if name.startswith(ACTOR_PREFIX)]


def assert_every_sample_once(out: Path, num_samples: int) -> None:
    assert verify_dataset(out) == []
    keys = [row["key"] for row in manifest_rows(read_manifest(out))]
    assert keys == [f"{i:09d}" for i in range(num_samples)]


def generate_killing_a_worker(config: GenerateConfig, out: Path):
    """Run `config`, SIGKILLing one worker as soon as the first shard is committed."""
    killed: list[int] = []

    def kill_one_worker() -> None:
        wait_for(lambda: markers(out), 300, "a first committed shard")
        name = wait_for(worker_names, 30, "a named worker")[0]
        pid = ray.get(ray.get_actor(name).pid.remote(), timeout=30)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    summary = generate(config, show_progress=False)
    killer.join(timeout=5)
    assert killed, "the test did not get to kill a worker"
    return summary


def test_worker_killed_mid_run_is_replaced_and_its_shard_redone(ray_cluster, tiny_model, tmp_path):
    out = tmp_path / "run"
    summary = generate_killing_a_worker(make_config(tiny_model, out, num_samples=80, per_shard=10, max_shard_retries=2), out)
    assert summary.ok and summary.failed_workers >= 1 and summary.shards_generated == 8 and summary.images_generated == 80
    assert_every_sample_once(out, 80)


def test_lone_worker_killed_with_its_next_shard_queued_redoes_both(ray_cluster, tiny_model, tmp_path):
    # One worker always holds two shards (one generating, the next queued on it): both come back, once each.
    out = tmp_path / "run"
    summary = generate_killing_a_worker(make_config(tiny_model, out, num_samples=120, per_shard=20, workers=1, max_shard_retries=1), out)
    assert summary.ok and summary.failed_workers == 1 and 1 <= summary.retries <= 2
    assert summary.shards_generated == 6 and summary.images_generated == 120
    assert_every_sample_once(out, 120)


def test_shard_that_keeps_failing_is_reported_and_exits_1(ray_cluster, tiny_model, tmp_path):
    out = tmp_path / "run"
    # A shard time limit far below what one shard takes: the attempt is killed, no retries allowed.
    config = make_config(tiny_model, out, num_samples=20, per_shard=20, workers=1, max_shard_retries=0, shard_timeout_s=0.05)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["generate", str(config_file)])  # reuses this process's Ray
    assert result.exit_code == 1, result.output
    assert "shard 0" in result.output and "timed out" in result.output and "Traceback" not in result.output
    assert not (out / "manifest.parquet").exists() and not list((out / "shards").glob("*.tar"))
    assert any("not committed" in problem for problem in verify_dataset(out))


def test_driver_terminated_then_killed_each_resumes_without_redoing_committed_shards(ray_cluster, tiny_model, tmp_path):
    """SIGTERM (a scheduler's cancel): one line, exit 143. The re-run SIGKILLed in turn (no handler runs). The
    third run completes, and no shard committed by the first two is made again."""
    out = tmp_path / "run"
    config = make_config(tiny_model, out, num_samples=60, per_shard=10, workers=1)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    command = [sys.executable, "-m", "dreamshard", "-q", "generate", str(config_file), "--address", ray_cluster]
    stats: dict[int, os.stat_result] = {}
    for stop in (signal.SIGTERM, signal.SIGKILL):
        log = tmp_path / f"driver-{stop.name}.log"  # as under a scheduler: output to a file, not a terminal
        with open(log, "w") as fh:
            driver = subprocess.Popen(command, stdout=fh, stderr=fh)
            try:
                wait_for(lambda driver=driver: len(markers(out)) > len(stats) or driver.poll() is not None, 300, "a new committed shard")
            finally:
                driver.send_signal(stop)
                driver.wait(timeout=120)
        text = log.read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        if stop == signal.SIGTERM:
            assert driver.returncode == 143, text[-2000:]
            assert "Traceback" not in text and len(lines) == 1 and "terminated (SIGTERM)" in lines[-1], text[-2000:]
        else:
            assert driver.returncode == -signal.SIGKILL, text[-2000:]
        # Ray stops a gone driver's workers; wait, so none commits a shard behind the snapshot below.
        wait_for(lambda: not worker_names(all_namespaces=True), 60, "the driver's workers to exit")
        for marker in markers(out):
            shard = json.loads(marker.read_text())["shard"]
            stats.setdefault(shard, (out / "shards" / f"{shard:06d}.tar").stat())
    assert 2 <= len(stats) < 6

    summary = generate(config, show_progress=False)

    assert summary.ok and summary.shards_skipped == len(stats) and summary.shards_generated == 6 - len(stats)
    for shard, stat in stats.items():  # committed shards were not regenerated
        now = (out / "shards" / f"{shard:06d}.tar").stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert not list(out.rglob("*.partial"))
    assert_every_sample_once(out, 60)


def test_cluster_gone_mid_run_ends_in_one_line_and_a_rerun_completes(ray_cluster, tiny_model, tmp_path):
    """The whole embedded cluster SIGKILLed mid-run (raylet, GCS and workers: what an OOM kill of a node
    does): `generate` must not wait forever. (The raylet alone killed does not stop a run here: the leased
    workers go on and the run completes.)"""
    import psutil

    out = tmp_path / "run"
    config = make_config(tiny_model, out, num_samples=40, per_shard=10, workers=1)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    log = tmp_path / "driver.log"
    command = [sys.executable, "-m", "dreamshard", "-q", "generate", str(config_file)]  # its own embedded Ray, killed below
    with open(log, "w") as fh:
        driver = subprocess.Popen(command, stdout=fh, stderr=fh)
        try:
            wait_for(lambda: markers(out) or driver.poll() is not None, 300, "a committed shard")
            cluster = psutil.Process(driver.pid).children(recursive=True)  # raylet, gcs_server, workers, agents
            assert any(p.name() == "raylet" for p in cluster), [p.name() for p in cluster]
            killed = time.monotonic()
            for process in cluster:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
    seconds = time.monotonic() - killed
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    print(f"driver ended {seconds:.0f} s after its raylet was killed")  # the bound is 180 s
    assert driver.returncode == 1 and "Traceback" not in text, text[-3000:]
    assert lines and "the Ray cluster is gone" in lines[-1] and "re-run the same command to resume" in lines[-1], text[-3000:]
    # The re-run (here on this test session's cluster: the killed one is gone) finds the dead driver's lease
    # (its process is gone) and completes the dataset.
    summary = generate(config, show_progress=False)
    assert summary.ok and summary.shards_skipped >= 1
    assert_every_sample_once(out, 40)


def test_second_driver_on_the_same_output_is_refused_while_the_first_runs(ray_cluster, tiny_model, tmp_path):
    out = tmp_path / "run"
    config = make_config(tiny_model, out, num_samples=60, per_shard=10, workers=1)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    with open(tmp_path / "first.log", "w") as fh:
        command = [sys.executable, "-m", "dreamshard", "generate", str(config_file), "--address", ray_cluster, "--log-every", "0.5"]
        first = subprocess.Popen(command, stdout=fh, stderr=fh)  # a log file, as under a scheduler
        try:
            wait_for(lambda: (out / ".lease").exists() or first.poll() is not None, 120, "the first driver's lease")
            started = time.monotonic()
            second = CliRunner().invoke(app, ["generate", str(config_file)])
            print(f"second driver refused after {time.monotonic() - started:.1f} s")
            assert second.exit_code == 2 and "Traceback" not in second.output, second.output
            assert "being written by `dreamshard generate`" in second.output and f"pid {first.pid}" in second.output, second.output
            assert len(second.output.strip().splitlines()) == 1, second.output
            first.wait(timeout=600)
        finally:
            if first.poll() is None:
                first.kill()
    text = (tmp_path / "first.log").read_text()
    assert first.returncode == 0, text[-2000:]
    assert not (out / ".lease").exists()  # released
    # Progress for logs: plain `shards D/T` lines at least every --log-every seconds, no terminal escapes.
    progress = [line for line in text.splitlines() if line.startswith("generate: ") and re.search(r"shards \d+/6", line)]
    assert len(progress) >= 2 and "\x1b[" not in text, text[-2000:]
    assert re.search(r"generate: 60/60 images \(100%\).*shards 6/6", progress[-1]), progress[-1]
    assert_every_sample_once(out, 60)
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 1 and stats[0]["images_made"] == 60 and stats[0]["shards_made"] == 6
    assert stats[0]["workers"] and stats[0]["workers"][0]["images"] == 60 and stats[0]["workers"][0]["load_seconds"] > 0
