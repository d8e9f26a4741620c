"""The Ray driver: schedules whole shards onto worker actors, and nothing else. It knows no store, no plan
and no config file: a `Schedule` says which shards to make, how many samples each must commit, what a shard
task is given, how workers are made and the retry and timeout rules; the driver starts the workers, hands
out shards (up to SHARDS_IN_FLIGHT per worker), replaces workers that die and re-queues their shards (bounded
retries per shard), kills a worker stuck on one shard, stops when no worker can be started or the cluster is
gone, and reports what happened (`DriverReport`). It only ever waits with a timeout, so a dead actor cannot
hang it.

Stragglers: once the queue is empty, an idle worker takes a backup copy of the slowest shard in flight (at
most one per shard). A backup is sealed but not published; when it is done, the driver asks the original
copy to abort, which it can while it has not begun to publish: then the backup is published, else discarded.
When the original commits first, the backup is aborted. So every shard is committed once, whichever copy
finishes first.

A worker actor provides `ready() -> dict` (raises its load error), `progress() -> (shard, images)`,
`generate_shard(shard, *task(shard), attempt=, backup=) -> marker` (a dict with the committed `count`; a
backup returns {"sealed": True, ...}, an aborted copy {"aborted": True}), `abort(shard, attempt) -> bool`,
`publish_backup(shard, attempt) -> marker` and `discard_backup(shard, attempt)`; `engine/worker.py` is the
generation worker, and tests drive this module with a trivial one.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dreamshard.cluster import ClusterWatchdog
from dreamshard.errors import RunFailure, UserError, one_line

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how long the driver waits for any result before refreshing progress and timeouts
PROGRESS_SECONDS = 0.5  # how often busy workers are asked how far they are in their shard
# Shards queued on one actor at a time. With one, generation stopped at every shard boundary for the commit
# and a driver round trip (~10% of a 3 s tiny-model shard); with two, the actor starts the next shard as
# soon as the previous one releases the pipeline (worker.py), while that one still commits.
SHARDS_IN_FLIGHT = 2
ACTOR_PREFIX = "dreamshard-worker-"
ABORT_TIMEOUT_S = 30.0  # an original copy that does not answer an abort for this long is killed (its backup wins)
WORKER_CONCURRENCY = SHARDS_IN_FLIGHT + 4  # actor threads: shards in flight, a backup's publish, progress, abort


@dataclass(frozen=True)
class WorkerPool:
    """How workers are made: an actor class, its constructor arguments for a worker's name, Ray options
    (resources, concurrency) and how many to keep."""

    actor: type
    arguments: Callable[[str], tuple]
    options: dict
    size: int


@dataclass(frozen=True)
class Schedule:
    """Everything the driver needs to know about a run."""

    shards: tuple[int, ...]  # to make, in this order
    counts: tuple[int, ...]  # samples each planned shard must commit (indexed by shard)
    task: Callable[[int], tuple]  # the arguments after `shard` of one generate_shard call
    workers: WorkerPool
    max_retries: int = 3  # re-runs of a shard whose worker died or whose task failed
    shard_timeout_s: float | None = None  # kill a worker that has not finished a shard for this long
    worker_start_timeout_s: float = 0.0  # stop when no worker has been ready for this long (0: wait forever)
    backups: bool = True  # idle workers copy the slowest shards in flight once the queue is empty


@dataclass
class WorkerFacts:
    """One worker as the run saw it (stats.jsonl's `workers`)."""

    name: str
    info: dict = field(default_factory=dict)  # from ready(): host, GPUs, model load seconds
    ready_at: float | None = None
    shards: int = 0
    images: int = 0
    generation: dict[str, float] = field(default_factory=dict)  # its committed shards' call statistics, summed


@dataclass
class DriverReport:
    committed: dict[int, dict] = field(default_factory=dict)  # shard -> marker, committed by this run
    failed: dict[int, str] = field(default_factory=dict)  # shard -> last error
    retries: int = 0
    failed_workers: int = 0
    worker_errors: list[dict] = field(default_factory=list)  # {worker, host, error}
    workers: list[WorkerFacts] = field(default_factory=list)
    images_committed: int = 0
    first_image_seconds: float | None = None  # since the driver started
    generation_seconds: float = 0.0  # first worker ready -> end
    steady_images_per_s: float = 0.0  # images/s once every worker of the first wave was ready
    ended: float | None = None  # perf_counter at the end
    backups: int = 0  # backup copies started
    backups_won: int = 0  # shards committed by their backup copy
    busy: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, workers with work) at each change
    busy_worker_s: float = 0.0  # the time ready workers had work, summed over workers
    ready_worker_s: float = 0.0  # the time workers were ready, summed over workers


@dataclass(frozen=True)
class _Task:
    shard: int
    attempt: int  # a token naming this copy of the shard (abort, publish_backup)
    kind: str  # make (commits itself) / backup (sealed, waits) / publish (a backup's commit)


@dataclass
class _Worker:
    actor: Any
    facts: WorkerFacts
    start_ref: Any = None  # pending until the worker is ready
    tasks: dict[Any, _Task] = field(default_factory=dict)  # in-flight task ref -> task, in dispatch order
    busy_since: float = 0.0  # since when it has had work without finishing a shard (shard_timeout_s)
    progress_ref: Any = None
    progress_asked: float = 0.0
    progress: tuple[int, int] = (-1, 0)  # (shard it is generating, images generated in it) as last reported
    timed_out: bool = False

    @property
    def images(self) -> int:
        """Images generated in its in-flight shards and not committed yet (backup copies not counted)."""
        shard, images = self.progress
        return images if any(task.shard == shard and task.kind == "make" for task in self.tasks.values()) else 0


class Driver:
    """Runs one Schedule on the Ray this process is connected to."""

    def __init__(
        self,
        schedule: Schedule,
        on_commit: Callable[[int, dict], None] | None = None,
        tick: Callable[[Driver], None] | None = None,
        started: float | None = None,  # perf_counter the first image is timed from (default: now)
    ) -> None:
        import ray

        self.ray, self.schedule = ray, schedule
        self.on_commit, self.tick = on_commit, tick
        self.report = DriverReport()
        self.queue: deque[int] = deque(schedule.shards)
        self.attempts: dict[int, int] = {}
        self.workers: list[_Worker] = []
        self.started = started if started is not None else time.perf_counter()
        self.generation_started: float | None = None
        self._all_ready: tuple[float, int] | None = None  # (when, images so far) once the first wave is up
        self._no_worker_since: float | None = None
        self._watchdog: ClusterWatchdog | None = None
        self._names, self._run_id = 0, uuid.uuid4().hex[:8]
        self._restarts_left = schedule.workers.size * (schedule.max_retries + 1)
        self._tokens = 0  # attempt tokens handed out
        self._backed_up: set[int] = set()  # shards given a backup copy
        self._last_tick: float | None = None

    # ---------------------------------------------------------------------------------------------- run

    def run(self) -> DriverReport:
        """Make every shard of the schedule (or give up on it after its retries); returns the report."""
        for _ in range(self.schedule.workers.size):
            self._start_worker()
        self._watchdog = ClusterWatchdog(self.ray, lambda: f"{len(self.schedule.shards) - len(self.report.committed)} shard(s)")
        self._watchdog.start()
        try:
            while self.queue or any(worker.tasks for worker in self.workers):
                self._dispatch()
                if not self.workers and not self._replace():
                    self._fail_queued("no worker left (they kept dying; see the Ray logs in /tmp/ray/session_latest/logs)")
                    break
                self._wait_and_handle()
                self._check_timeouts()
                self._check_workers_and_cluster()
                self._poll_progress()
                self._count_busy()
                if self.tick is not None:
                    self.tick(self)
        finally:
            self._finish()
        return self.report

    def _finish(self) -> None:
        now = time.perf_counter()
        report = self.report
        if self.generation_started is not None:
            report.generation_seconds = now - self.generation_started
        if self._all_ready is not None and now > self._all_ready[0]:
            report.steady_images_per_s = (report.images_committed - self._all_ready[1]) / (now - self._all_ready[0])
        if self._watchdog is not None:
            self._watchdog.stop_unless_gone()
        if self._watchdog is None or not self._watchdog.problem:  # with the cluster gone, killing actors would block on the GCS
            for worker in self.workers:
                self.ray.kill(worker.actor, no_restart=True)
        report.workers += [worker.facts for worker in self.workers]
        report.ended = now
        self.workers.clear()

    @property
    def images_in_flight(self) -> int:
        return sum(worker.images for worker in self.workers)

    @property
    def shards_left(self) -> int:
        return len(self.queue) + sum(len(worker.tasks) for worker in self.workers)

    # -------------------------------------------------------------------------------------------- workers

    def _start_worker(self) -> None:
        name = f"w{self._names}"
        self._names += 1
        pool = self.schedule.workers
        # Named so operators (and tests) can find a run's workers: `ray list actors`, ray.get_actor(name).
        options = {**pool.options, "name": f"{ACTOR_PREFIX}{self._run_id}-{name}"}
        actor = self.ray.remote(pool.actor).options(**options).remote(*pool.arguments(name))
        self.workers.append(_Worker(actor=actor, facts=WorkerFacts(name), start_ref=actor.ready.remote()))

    def _replace(self) -> bool:
        if self._restarts_left <= 0 or not (self.queue or self.workers):
            return False
        self._restarts_left -= 1
        self._start_worker()
        return True

    def _lose(self, worker: _Worker, reason: str) -> None:
        """A worker died: count it, re-queue each of its in-flight shards once (keeping one it committed just
        before dying), start a replacement if there is work left."""
        report = self.report
        report.failed_workers += 1
        report.worker_errors.append({"worker": worker.facts.name, "host": worker.facts.info.get("host"), "error": reason})
        report.workers.append(worker.facts)
        self.workers.remove(worker)
        self.ray.kill(worker.actor, no_restart=True)
        log.warning("worker %s died (%s)", worker.facts.name, reason)
        tasks, worker.tasks = worker.tasks, {}  # its other refs in this round of events are ignored
        for ref, task in reversed(tasks.items()):  # re-queued at the front in dispatch order
            result = self._result_if_done(ref)
            if result is None or result.get("aborted") or result.get("sealed"):  # a sealed backup dies with its worker
                self._copy_failed(task, f"worker died: {reason}")
            else:
                self._accept(task.shard, result, worker)
        if self.queue:
            self._replace()

    def _result_if_done(self, ref) -> dict | None:
        ready, _ = self.ray.wait([ref], timeout=0)
        try:
            return self.ray.get(ready[0]) if ready else None
        except Exception:  # noqa: BLE001 - the death, or its own failure: either way it is redone
            return None

    # --------------------------------------------------------------------------------------------- shards

    def _dispatch(self) -> None:
        for worker in self.workers:
            while worker.start_ref is None and self.queue and self._takes_another(worker):
                shard = self.queue.popleft()
                self.attempts[shard] = self.attempts.get(shard, 0) + 1
                self._send(worker, shard, "make")
        if self.schedule.backups and not self.queue:
            for worker in self.workers:
                if worker.start_ref is None and not worker.tasks:
                    straggler = self._slowest(worker)
                    if straggler is None:
                        break
                    self._backed_up.add(straggler)
                    self.report.backups += 1
                    log.info("shard %d: a backup copy on worker %s (the queue is empty)", straggler, worker.facts.name)
                    self._send(worker, straggler, "backup")

    def _send(self, worker: _Worker, shard: int, kind: str) -> None:
        if not worker.tasks:
            worker.busy_since = time.perf_counter()
        self._tokens += 1
        ref = worker.actor.generate_shard.remote(shard, *self.schedule.task(shard), attempt=self._tokens, backup=kind == "backup")
        worker.tasks[ref] = _Task(shard, self._tokens, kind)

    def _copies(self, shard: int) -> list[tuple[_Worker, _Task]]:
        """The live copies of a shard being made (originals and backups), with their workers."""
        return [(worker, task) for worker in self.workers for task in worker.tasks.values() if task.shard == shard and task.kind != "publish"]

    def _slowest(self, idle: _Worker) -> int | None:
        """The shard in flight on another worker, not backed up yet, that is least far along (a queued one
        before a started one; then the earliest sent)."""
        candidates = []
        for worker in self.workers:
            for order, task in enumerate(worker.tasks.values()):
                if worker is idle or task.kind != "make" or task.shard in self._backed_up or task.shard in self.report.committed:
                    continue
                shard, images = worker.progress
                done = images / max(self.schedule.counts[task.shard], 1) if shard == task.shard else 0.0
                candidates.append((done, -order, task.attempt, task.shard))
        return min(candidates)[3] if candidates else None

    def _takes_another(self, worker: _Worker) -> bool:
        """An idle worker takes any shard. A busy one takes a second only while there are enough for every
        worker (no idle worker at the end of the run while another has one queued), and never beside a
        retry: a shard that kills its worker takes a healthy one down with it at most once."""
        if not worker.tasks:
            return True
        first_attempts = self.attempts.get(self.queue[0], 0) == 0 and all(self.attempts[task.shard] == 1 for task in worker.tasks.values())
        return len(worker.tasks) < SHARDS_IN_FLIGHT and len(self.queue) >= len(self.workers) and first_attempts

    def _copy_failed(self, task: _Task, reason: str) -> None:
        """One copy of a shard failed: the shard is retried unless another copy of it is still being made."""
        if task.shard in self.report.committed or self._copies(task.shard):
            log.warning("shard %d: a copy failed (%s); the other copy goes on", task.shard, reason)
            return
        self._shard_failed(task.shard, reason)

    def _shard_failed(self, shard: int, reason: str) -> None:
        if self.attempts[shard] <= self.schedule.max_retries:
            self.report.retries += 1
            self.queue.appendleft(shard)
            log.warning("shard %d failed (%s); retry %d of %d", shard, reason, self.attempts[shard], self.schedule.max_retries)
        else:
            self.report.failed[shard] = reason
            log.error("shard %d failed %d times, giving up (%s)", shard, self.attempts[shard], reason)

    def _fail_queued(self, reason: str) -> None:
        while self.queue:
            self.report.failed[self.queue.popleft()] = reason

    def _accept(self, shard: int, marker: dict, worker: _Worker) -> None:
        if shard in self.report.committed:  # never: only one copy is published (see the module docstring)
            log.error("shard %d committed twice (the second by %s); keeping the first record", shard, worker.facts.name)
            return
        for other, task in self._copies(shard):  # the other copy stops early (or, sealed, is discarded)
            other.actor.abort.remote(shard, task.attempt)
        expected = self.schedule.counts[shard]
        if marker.get("count") != expected:
            self._shard_failed(shard, f"committed {marker.get('count')} samples, expected {expected}")
            return
        report = self.report
        report.committed[shard] = marker
        report.images_committed += marker["count"]
        worker.facts.images += marker["count"]
        worker.facts.shards += 1
        for name, value in (marker.get("generation") or {}).items():
            worker.facts.generation[name] = worker.facts.generation.get(name, 0) + value
        self._saw_image()
        if self.on_commit is not None:
            self.on_commit(shard, marker)

    # --------------------------------------------------------------------------------------------- events

    def _wait_and_handle(self) -> None:
        pending = {}
        for worker in self.workers:
            if worker.start_ref is not None:
                pending[worker.start_ref] = worker
            pending.update(dict.fromkeys(worker.tasks, worker))
        if not pending:
            return
        ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
        if ready:
            ready, _ = self.ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            worker = pending[ref]
            if ref is worker.start_ref:
                self._on_started(worker, ref)
            elif ref in worker.tasks:  # not if the worker was lost meanwhile (_lose handled it)
                self._on_finished(worker, ref)

    def _check_timeouts(self) -> None:
        limit = self.schedule.shard_timeout_s
        if not limit:
            return
        for worker in self.workers:
            if worker.tasks and not worker.timed_out and time.perf_counter() - worker.busy_since > limit:
                worker.timed_out = True  # killing it makes its task fail with RayActorError, handled as a death
                self.ray.kill(worker.actor, no_restart=True)

    def _check_workers_and_cluster(self) -> None:
        """Bounded waiting: stop with one line when no worker has been ready for worker_start_timeout_s, or the
        Ray cluster itself is gone (its GCS does not answer, or no node is alive)."""
        now = time.perf_counter()
        if any(worker.start_ref is None for worker in self.workers):
            self._no_worker_since = None
        elif self._no_worker_since is None:
            self._no_worker_since = now
        limit = self.schedule.worker_start_timeout_s
        if limit and self._no_worker_since is not None and now - self._no_worker_since > limit:
            raise RunFailure(
                f"no worker could be started for {limit:.0f} s (the cluster may lack the resources asked for: {self.schedule.workers.options}; "
                f"check `ray status`); {self.shards_left} shard(s) left: re-run the same command to resume"
            )
        if self._watchdog is not None and self._watchdog.problem:
            raise RunFailure(self._watchdog.message())

    def _on_started(self, worker: _Worker, ref) -> None:
        from ray.exceptions import RayActorError

        try:
            worker.facts.info = self.ray.get(ref)
        except RayActorError as exc:
            self._lose(worker, death_reason(exc))
            return
        except UserError as exc:
            raise _as_user_error(exc) from None
        except Exception as exc:  # the pipeline failed to load: the same will happen on every worker
            raise UserError(f"worker could not load the model: {one_line(getattr(exc, 'cause', exc))}") from None
        worker.start_ref, worker.facts.ready_at = None, time.perf_counter()
        if self.generation_started is None:
            self.generation_started = time.perf_counter()
        if self._all_ready is None and self._names >= self.schedule.workers.size and all(w.start_ref is None for w in self.workers):
            self._all_ready = (time.perf_counter(), self.report.images_committed + self.images_in_flight)

    def _on_finished(self, worker: _Worker, ref) -> None:
        from ray.exceptions import RayActorError

        try:
            result = self.ray.get(ref)
        except RayActorError as exc:
            timeout = f"timed out after run.shard_timeout_s={self.schedule.shard_timeout_s:g} s on one shard" if worker.timed_out else None
            self._lose(worker, timeout or death_reason(exc))
            return
        except UserError as exc:  # full disk, unwritable output: stop, the user must act
            raise _as_user_error(exc) from None
        except Exception as exc:
            self._copy_failed(self._take_finished(worker, ref), one_line(getattr(exc, "cause", exc)))
            return
        task = self._take_finished(worker, ref)
        if result.get("aborted"):
            return  # the other copy of this shard is the one committed
        if result.get("sealed"):
            self._decide_backup(worker, task)
            return
        self._accept(task.shard, result, worker)
        if task.kind == "publish":
            self.report.backups_won += 1

    def _decide_backup(self, worker: _Worker, task: _Task) -> None:
        """A backup copy is sealed: publish it if the original can still be stopped, else discard it."""
        if task.shard in self.report.committed or not all(self._aborted(other, original) for other, original in self._copies(task.shard)):
            worker.actor.discard_backup.remote(task.shard, task.attempt)
            return
        worker.tasks[worker.actor.publish_backup.remote(task.shard, task.attempt)] = _Task(task.shard, task.attempt, "publish")
        log.info("shard %d: its backup copy on %s finished first and is committed", task.shard, worker.facts.name)

    def _aborted(self, worker: _Worker, task: _Task) -> bool:
        """Ask a copy to abort: True once it will never publish (it stopped, or its worker is gone or killed
        for not answering), False when it has begun to publish."""
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return bool(self.ray.get(worker.actor.abort.remote(task.shard, task.attempt), timeout=ABORT_TIMEOUT_S))
        except RayActorError:
            return True
        except GetTimeoutError:
            log.warning("worker %s did not answer an abort in %.0f s; killing it", worker.facts.name, ABORT_TIMEOUT_S)
            self.ray.kill(worker.actor, no_restart=True)
            return True

    @staticmethod
    def _take_finished(worker: _Worker, ref) -> _Task:
        """Take a finished task off its worker (which is making progress again)."""
        worker.busy_since = time.perf_counter()
        return worker.tasks.pop(ref)

    def _poll_progress(self) -> None:
        now = time.perf_counter()
        for worker in self.workers:
            if worker.progress_ref is not None:
                ready, _ = self.ray.wait([worker.progress_ref], timeout=0)
                if ready:
                    try:
                        worker.progress = self.ray.get(worker.progress_ref)
                    except Exception:  # noqa: BLE001 - a dying worker; its shard results say what happened
                        pass
                    worker.progress_ref = None
                    if worker.images:
                        self._saw_image()
            elif worker.tasks and now - worker.progress_asked > PROGRESS_SECONDS:
                worker.progress_ref, worker.progress_asked = worker.actor.progress.remote(), now

    def _count_busy(self) -> None:
        """How many ready workers have work, over time (stats.jsonl: the workers' busy fraction)."""
        now = time.perf_counter()
        ready = [worker for worker in self.workers if worker.start_ref is None]
        busy = sum(1 for worker in ready if worker.tasks)
        if self._last_tick is not None:
            self.report.busy_worker_s += busy * (now - self._last_tick)
            self.report.ready_worker_s += len(ready) * (now - self._last_tick)
        self._last_tick = now
        if not self.report.busy or self.report.busy[-1][1] != busy:
            self.report.busy.append((round(now - self.started, 3), busy))

    def _saw_image(self) -> None:
        if self.report.first_image_seconds is None:
            self.report.first_image_seconds = time.perf_counter() - self.started


def death_reason(exc: Exception) -> str:
    """Why a worker died, from Ray's error text: its exit detail (OOM, SIGKILL, node gone) when given."""
    text = str(exc)
    for marker in ("exit detail:", "Exit detail:", "The actor died because", "The actor is dead because"):
        if marker in text:
            return text[text.index(marker) :].splitlines()[0][:300]
    return one_line(exc, limit=300)


def _as_user_error(exc: Exception) -> UserError:
    """A worker's UserError (or RunFailure), unwrapped from Ray's task error, its exit code kept."""
    cause = getattr(exc, "cause", exc)
    return type(cause)(str(cause)) if isinstance(cause, UserError) else UserError(str(cause))
