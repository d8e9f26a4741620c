"""The driver's scheduling on a local Ray with a trivial shard function and no store: every shard made
once, retries, dead workers replaced, bounded failures. (The generation worker is tested end to end in
test_engine_run.py and test_engine_faults.py.)"""

from __future__ import annotations

import os
import sys
import time

import pytest
from ray import cloudpickle

from dreamshard.engine.driver import WORKER_CONCURRENCY, Driver, Schedule, WorkerPool

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker class travels by value: tests/ is not importable in Ray workers


class CountingWorker:
    """A worker whose shard task returns a marker with the count it is told to commit; `plan` makes some
    shards fail, kill the worker or sleep, by (shard, attempt number). Copies follow the generation worker's
    protocol: a backup is sealed and waits; abort stops a copy that has not begun to publish."""

    def __init__(self, name: str, plan: dict) -> None:
        self.name, self.plan, self.states = name, plan, {}

    def ready(self) -> dict:
        return {"host": "test", "pid": os.getpid()}

    def progress(self) -> tuple[int, int]:
        return (-1, 0)

    def generate_shard(self, shard: int, count: int, log_file: str, attempt: int = 0, backup: bool = False) -> dict:
        if self.states.setdefault(attempt, "running") == "aborted":
            return {"aborted": True}
        with open(log_file, "a") as fh:  # every attempt that starts, across workers (actors share the disk)
            fh.write(f"{shard} start {self.name}\n")
        starts = sum(1 for line in open(log_file) if line.split()[:2] == [str(shard), "start"])
        action = self.plan.get(f"{shard}/{starts}", "")
        if action == "die":
            os._exit(1)
        if action == "fail":
            raise RuntimeError(f"shard {shard} failed on purpose")
        if action.startswith("sleep"):
            deadline = time.monotonic() + float(action.removeprefix("sleep"))
            while time.monotonic() < deadline and self.states[attempt] != "aborted":
                time.sleep(0.05)
        marker = {"shard": shard, "count": count - 1 if action == "short" else count, "worker": self.name}
        if backup:
            self.states[attempt] = "sealed"
            return {"sealed": True, **marker}
        if self.states[attempt] == "aborted":
            return {"aborted": True}
        self.states[attempt] = "published"
        return self._publish(log_file, shard, marker)

    def abort(self, shard: int, attempt: int) -> bool:
        if self.states.get(attempt) == "published":
            return False
        self.states[attempt] = "aborted"
        return True

    def publish_backup(self, shard: int, attempt: int) -> dict:
        assert self.states[attempt] == "sealed"
        self.states[attempt] = "published"
        return self._publish(self.log_file, shard, {"shard": shard, "count": 3, "worker": self.name})

    def discard_backup(self, shard: int, attempt: int) -> None:
        self.states[attempt] = "aborted"

    def _publish(self, log_file: str, shard: int, marker: dict) -> dict:
        self.log_file = log_file
        with open(log_file, "a") as fh:
            fh.write(f"{shard} commit {self.name}\n")
        return marker


def schedule(tmp_path, shards: int, plan: dict | None = None, workers: int = 2, **rules) -> Schedule:
    attempts_file = str(tmp_path / "attempts.txt")
    counts = tuple(3 for _ in range(shards))
    return Schedule(
        shards=tuple(range(shards)),
        counts=counts,
        task=lambda shard: (counts[shard], attempts_file),
        workers=WorkerPool(
            actor=CountingWorker, arguments=lambda name: (name, plan or {}), options={"num_cpus": 0.1, "max_concurrency": WORKER_CONCURRENCY}, size=workers
        ),
        **rules,
    )


def attempts(tmp_path) -> list[int]:
    return [int(line.split()[0]) for line in (tmp_path / "attempts.txt").read_text().splitlines() if line.split()[1] == "start"]


def commits(tmp_path) -> list[tuple[int, str]]:
    lines = [line.split() for line in (tmp_path / "attempts.txt").read_text().splitlines()]
    return [(int(shard), worker) for shard, what, worker in lines if what == "commit"]


def test_every_shard_is_made_once(ray_cluster, tmp_path):
    committed = []
    report = Driver(schedule(tmp_path, 7, backups=False), on_commit=lambda shard, marker: committed.append(shard)).run()
    assert sorted(report.committed) == list(range(7)) and sorted(committed) == list(range(7))
    assert report.images_committed == 21 and report.retries == 0 and not report.failed
    assert sorted(attempts(tmp_path)) == list(range(7))
    assert {facts.name for facts in report.workers} == {"w0", "w1"} and sum(facts.shards for facts in report.workers) == 7


def test_a_failing_shard_is_retried_and_a_dead_worker_replaced(ray_cluster, tmp_path):
    plan = {"1/1": "fail", "4/1": "die"}
    report = Driver(schedule(tmp_path, 6, plan, max_retries=2, backups=False)).run()
    assert sorted(report.committed) == list(range(6)) and not report.failed
    assert report.retries >= 2 and report.failed_workers == 1 and "w2" in {facts.name for facts in report.workers}
    assert attempts(tmp_path).count(1) == 2 and attempts(tmp_path).count(4) == 2


def test_a_shard_that_keeps_failing_is_reported_and_the_rest_goes_on(ray_cluster, tmp_path):
    plan = {f"2/{attempt}": "fail" for attempt in range(1, 4)} | {"3/1": "short"}
    report = Driver(schedule(tmp_path, 5, plan, max_retries=2, backups=False)).run()
    assert sorted(report.committed) == [0, 1, 3, 4] and list(report.failed) == [2]
    assert "failed on purpose" in report.failed[2] and attempts(tmp_path).count(2) == 3
    assert attempts(tmp_path).count(3) == 2  # a short commit is a failure: made again


def test_a_worker_stuck_on_a_shard_is_killed_and_the_shard_retried(ray_cluster, tmp_path):
    report = Driver(schedule(tmp_path, 3, {"0/1": "sleep60"}, workers=1, shard_timeout_s=3.0, backups=False)).run()
    assert sorted(report.committed) == [0, 1, 2] and report.failed_workers == 1
    assert "timed out after run.shard_timeout_s=3 s" in report.worker_errors[0]["error"]


@pytest.mark.parametrize("workers", [1, 3])
def test_never_more_workers_than_asked_and_all_of_them_work(ray_cluster, tmp_path, workers):
    report = Driver(schedule(tmp_path, 9, {f"{k}/1": "sleep0.3" for k in range(9)}, workers=workers)).run()
    assert len(report.workers) == workers and all(facts.shards > 0 for facts in report.workers)
    assert report.ready_worker_s > 0 and 0 < report.busy_worker_s <= report.ready_worker_s * 1.001
    assert report.busy[0][1] <= workers and max(busy for _, busy in report.busy) == workers


def test_a_straggler_is_finished_by_a_backup_copy_and_committed_once(ray_cluster, tmp_path):
    """Shard 0's first copy is slow; once the queue is empty the idle worker copies it, the backup finishes
    first and is committed, the original is aborted: every shard is committed exactly once."""
    report = Driver(schedule(tmp_path, 4, {"0/1": "sleep30"}, workers=2)).run()
    assert sorted(report.committed) == [0, 1, 2, 3] and not report.failed
    assert report.backups >= 1 and report.backups_won == 1
    assert sorted(shard for shard, _ in commits(tmp_path)) == [0, 1, 2, 3]  # once each
    slow = next(line.split()[2] for line in (tmp_path / "attempts.txt").read_text().splitlines() if line.startswith("0 start"))
    assert dict(commits(tmp_path))[0] != slow  # the backup's worker committed it


def test_a_backup_that_loses_is_discarded(ray_cluster, tmp_path):
    """A backup that is slower than its original (here: the backup copy sleeps) is aborted when the original
    commits; nothing is committed twice."""
    report = Driver(schedule(tmp_path, 3, {"0/1": "sleep2", "0/2": "sleep30"}, workers=2)).run()
    assert sorted(report.committed) == [0, 1, 2] and report.backups >= 1 and report.backups_won == 0
    assert sorted(shard for shard, _ in commits(tmp_path)) == [0, 1, 2]


def test_without_backups_no_copy_is_made(ray_cluster, tmp_path):
    report = Driver(schedule(tmp_path, 3, {"0/1": "sleep1"}, workers=2, backups=False)).run()
    assert sorted(report.committed) == [0, 1, 2] and report.backups == 0 and attempts(tmp_path).count(0) == 1
