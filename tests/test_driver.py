"""The driver's scheduling on a local Ray with a trivial shard function and no store: every shard made
once, retries, dead workers replaced, bounded failures. (The generation worker is tested end to end in
test_engine_run.py and test_engine_faults.py.)"""

from __future__ import annotations

import os
import sys
import time

import pytest
from ray import cloudpickle

from dreamshard.engine.driver import Driver, Schedule, WorkerPool

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker class travels by value: tests/ is not importable in Ray workers


class CountingWorker:
    """A worker whose shard task returns a marker with the count it is told to commit; `plan` makes some
    shards fail, kill the worker or sleep, by (shard, attempt)."""

    def __init__(self, name: str, plan: dict) -> None:
        self.name, self.plan, self.attempts = name, plan, {}

    def ready(self) -> dict:
        return {"host": "test", "pid": os.getpid()}

    def progress(self) -> tuple[int, int]:
        return (-1, 0)

    def generate_shard(self, shard: int, count: int, marker_file: str) -> dict:
        with open(marker_file, "a") as fh:  # every attempt that starts, across workers (actors share the disk)
            fh.write(f"{shard}\n")
        attempts = sum(1 for line in open(marker_file) if int(line) == shard)
        action = self.plan.get(f"{shard}/{attempts}", "")
        if action == "die":
            os._exit(1)
        if action == "fail":
            raise RuntimeError(f"shard {shard} failed on purpose")
        if action == "short":
            return {"shard": shard, "count": count - 1}
        if action.startswith("sleep"):
            time.sleep(float(action.removeprefix("sleep")))
        return {"shard": shard, "count": count, "worker": self.name}


def schedule(tmp_path, shards: int, plan: dict | None = None, workers: int = 2, **rules) -> Schedule:
    attempts_file = str(tmp_path / "attempts.txt")
    counts = tuple(3 for _ in range(shards))
    return Schedule(
        shards=tuple(range(shards)),
        counts=counts,
        task=lambda shard: (counts[shard], attempts_file),
        workers=WorkerPool(actor=CountingWorker, arguments=lambda name: (name, plan or {}), options={"num_cpus": 0.1, "max_concurrency": 3}, size=workers),
        **rules,
    )


def attempts(tmp_path) -> list[int]:
    return [int(line) for line in (tmp_path / "attempts.txt").read_text().split()]


def test_every_shard_is_made_once(ray_cluster, tmp_path):
    commits = []
    report = Driver(schedule(tmp_path, 7), on_commit=lambda shard, marker: commits.append(shard)).run()
    assert sorted(report.committed) == list(range(7)) and sorted(commits) == list(range(7))
    assert report.images_committed == 21 and report.retries == 0 and not report.failed
    assert sorted(attempts(tmp_path)) == list(range(7))
    assert {facts.name for facts in report.workers} == {"w0", "w1"} and sum(facts.shards for facts in report.workers) == 7


def test_a_failing_shard_is_retried_and_a_dead_worker_replaced(ray_cluster, tmp_path):
    plan = {"1/1": "fail", "4/1": "die"}
    report = Driver(schedule(tmp_path, 6, plan, max_retries=2)).run()
    assert sorted(report.committed) == list(range(6)) and not report.failed
    assert report.retries >= 2 and report.failed_workers == 1 and "w2" in {facts.name for facts in report.workers}
    assert attempts(tmp_path).count(1) == 2 and attempts(tmp_path).count(4) == 2


def test_a_shard_that_keeps_failing_is_reported_and_the_rest_goes_on(ray_cluster, tmp_path):
    plan = {f"2/{attempt}": "fail" for attempt in range(1, 4)} | {"3/1": "short"}
    report = Driver(schedule(tmp_path, 5, plan, max_retries=2)).run()
    assert sorted(report.committed) == [0, 1, 3, 4] and list(report.failed) == [2]
    assert "failed on purpose" in report.failed[2] and attempts(tmp_path).count(2) == 3
    assert attempts(tmp_path).count(3) == 2  # a short commit is a failure: made again


def test_a_worker_stuck_on_a_shard_is_killed_and_the_shard_retried(ray_cluster, tmp_path):
    report = Driver(schedule(tmp_path, 3, {"0/1": "sleep60"}, workers=1, shard_timeout_s=3.0)).run()
    assert sorted(report.committed) == [0, 1, 2] and report.failed_workers == 1
    assert "timed out after run.shard_timeout_s=3 s" in report.worker_errors[0]["error"]


@pytest.mark.parametrize("workers", [1, 3])
def test_never_more_workers_than_asked_and_all_of_them_work(ray_cluster, tmp_path, workers):
    report = Driver(schedule(tmp_path, 9, {f"{k}/1": "sleep0.3" for k in range(9)}, workers=workers)).run()
    assert len(report.workers) == workers and all(facts.shards > 0 for facts in report.workers)
