"""`generate`: classify the output, plan, drive the workers, record. The one public entry point of the
generation engine; the CLI only parses arguments and calls it.

The plan fixes every sample up front (shard k = samples [k*S, min((k+1)*S, N))); the output's run directory
(format/rundir.py) says which shards are committed already and readies it for the rest; the driver
(driver.py) makes those on Ray worker actors (worker.py), retrying and replacing workers as needed; then the
run is recorded (stats.jsonl, the marker snapshot) and, when every shard is committed, consolidated
(manifest.parquet, sizes.json).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dreamshard.cluster import ray_session
from dreamshard.config import GenerateConfig
from dreamshard.engine.conditioned import Conditioner, conditioner_for
from dreamshard.engine.driver import WORKER_CONCURRENCY, Driver, DriverReport, Schedule, WorkerPool
from dreamshard.engine.models import model_identity
from dreamshard.engine.plan import Plan, build_plan
from dreamshard.engine.quality import check_clip_model
from dreamshard.engine.records import check_memory, checked_counts, resolved_config, run_identity, run_record, run_stats
from dreamshard.engine.worker import GenerationWorker
from dreamshard.errors import RunFailure, UserError
from dreamshard.format.lease import OutputLease
from dreamshard.format.reader import committed_shards
from dreamshard.format.rundir import RunDir, RunState, UnreadableIndex
from dreamshard.format.store import Store
from dreamshard.identity import Identity
from dreamshard.logs import StageProgress

log = logging.getLogger(__name__)

SNAPSHOT_SECONDS = 60.0  # how often a running driver refreshes the marker snapshot (index/markers.json)


@dataclass
class RunSummary:
    out: str
    samples: int  # samples in the dataset
    shards: int
    shards_generated: int
    shards_skipped: int  # already committed before this run
    images_generated: int
    bytes: int  # total tar bytes of the committed shards
    wall_seconds: float
    generation_seconds: float  # first worker ready -> last shard committed
    first_image_seconds: float | None  # call -> first new image generated (None: nothing to do)
    steady_images_per_s: float  # images/s once every worker of the first wave was ready (0: never)
    retries: int
    failed_workers: int
    failed_shards: dict[int, str] = field(default_factory=dict)  # shard -> last error
    action: str = ""  # what the output held: fresh / resume / extend / complete (format/rundir.py's classify)

    @property
    def ok(self) -> bool:
        return not self.failed_shards

    @property
    def images_per_s(self) -> float:
        return self.images_generated / self.generation_seconds if self.generation_seconds > 0 else 0.0


def generate(
    config: GenerateConfig,
    out: str | None = None,
    num_samples: int | None = None,
    address: str | None = None,
    force_new: bool = False,
    show_progress: bool = True,
    worker: type = GenerationWorker,
    verify: bool = False,
) -> RunSummary:
    """Generate (or resume, or extend) the dataset `config` describes into `out` (default
    `config.output.path`). Bad input raises UserError before any worker starts; shards that still fail
    after their retries are listed in the summary's `failed_shards` (and no manifest is written). `worker`:
    the actor class (GenerationWorker, or a subclass of it). `verify`: check every committed shard's tar
    against its marker's sha256 (and its index file) before trusting it; damaged ones are made again."""
    started, started_at = time.perf_counter(), time.time()
    config = resolved_config(config, out, num_samples)
    counts = checked_counts(config)
    check_memory(config)
    plan = build_plan(config.prompts, config.sampling, config.run.seed)
    conditioner = conditioner_for(config)  # conditioned modes: the source is pre-scanned here
    model_info = model_identity(config.model)
    check_clip_model(config.quality.clip_model)
    identity = run_identity(config, plan, model_info, conditioner)
    rundir = choose_output(config.output.path, identity, force_new)
    if rundir.url != config.output.path:
        log.warning("writing to %s (a new directory, --force-new)", rundir.url)
        config.output.path = rundir.url
    with OutputLease(rundir.store, "generate") as lease:  # one writer per output, from before anything is cleaned up
        state = rundir.classify(identity, counts, config.output.shard_size)  # again, under the lease
        if verify and state.done:
            state = remake_damaged(rundir, state, identity, counts, config.output.shard_size)
        if state.action == "refuse":
            raise UserError(f"{rundir.url}: {state.reason}; {state.fix}")
        record = run_record(config, plan, counts, identity, model_info, state.record)
        rundir.prepare(state, counts, record)
        todo = [shard for shard in range(len(counts)) if shard not in state.done]
        report = None
        if todo:
            with ray_session(address):
                report = drive(config, rundir, plan, counts, todo, state, model_info, conditioner, lease, started, show_progress, worker)
                rundir.append_stats(run_stats(report, config.run.num_samples, started_at, len(state.done)))
            rundir.clean_partials()  # what dead workers left; every worker of this run is gone now
        committed = committed_shards(rundir.store, config.output.shard_size)
        if report is not None:
            rundir.write_snapshot(committed)
            check_committed(report, committed)
        summary = summarize(config, counts, committed, state, report, started)
        if summary.ok:
            try:
                rundir.consolidate(counts, record)
            except UnreadableIndex as exc:
                raise RunFailure(f"{rundir.url}: {exc}; shard {exc.shard} was un-committed, re-run the same command to regenerate it") from None
    return summary


def remake_damaged(rundir: RunDir, state: RunState, identity: Identity, counts: list[int], shard_size: int) -> RunState:
    """--verify: un-commit the committed shards whose files are not what their markers say; the run then
    makes them again."""
    damaged = rundir.damaged(state.done)
    for shard, problem in damaged.items():
        log.warning("shard %d is damaged (%s); it is made again", shard, problem)
        rundir.uncommit(shard)
    return rundir.classify(identity, counts, shard_size) if damaged else state


def check_committed(report: DriverReport, committed: dict[int, dict]) -> None:
    """The store is the truth: a shard the driver accepted but that does not read as committed (a write
    that did not land, a copy published twice by a worker presumed dead) fails, so no manifest is written and
    a re-run makes it again."""
    for shard in sorted(set(report.committed) - set(committed)):
        report.failed[shard] = "accepted by the driver but not committed on the store; re-run the same command to make it again"


def choose_output(path: str, identity: Identity, force_new: bool) -> RunDir:
    """`path` unless it holds another dataset; with force_new, the first sibling `path-2`, `path-3`, ... that
    is new or holds this same dataset. Refuses to mix datasets."""
    state = RunDir(Store(path)).conflict(identity)
    if state is None:
        return RunDir(Store(path))
    if not force_new:
        raise UserError(f"{path}: {state.reason}; {state.fix}")
    for number in range(2, 1000):
        candidate = RunDir(Store(f"{path.rstrip('/')}-{number}"))
        if candidate.conflict(identity) is None:
            return candidate
    raise UserError(f"no free sibling directory for {path}; choose another --out")


def drive(
    config: GenerateConfig, rundir: RunDir, plan: Plan, counts: list[int], todo: list[int], state: RunState,
    model_info: dict, conditioner: Conditioner | None, lease: OutputLease, started: float, show_progress: bool,
    worker: type = GenerationWorker,
) -> DriverReport:  # fmt: skip
    """Make the shards `todo` on Ray workers, keeping the lease and the marker snapshot fresh."""
    samples_per_shard = config.output.shard_size
    schedule = Schedule(
        shards=tuple(todo),
        counts=tuple(counts),
        task=lambda shard: (plan.specs(shard * samples_per_shard, shard * samples_per_shard + counts[shard]),),
        workers=worker_pool(config, rundir.store, model_info, conditioner, len(todo), worker),
        max_retries=config.run.max_shard_retries,
        shard_timeout_s=config.run.shard_timeout_s,
        worker_start_timeout_s=config.run.worker_start_timeout_s,
        backups=config.run.backups,
    )
    snapshot = SnapshotRefresh(rundir, state.done)
    skipped = sum(counts[shard] for shard in state.done)
    with progress_display(config.run.num_samples, skipped, len(counts), len(state.done), show_progress) as progress:

        def tick(driver: Driver) -> None:
            progress.update(driver)
            snapshot.refresh()
            lease.renew()

        return Driver(schedule, on_commit=snapshot.commit, tick=tick, started=started).run()


def worker_pool(
    config: GenerateConfig, store: Store, model_info: dict, conditioner: Conditioner | None, shards: int, worker: type = GenerationWorker
) -> WorkerPool:
    """The generation workers: one per GPU (fractions allowed), or `run.workers` single-CPU workers when the
    cluster has no GPU (or model.device is cpu); never more than there are shards to make."""
    import ray

    run = config.run
    gpus = 0.0 if config.model.device == "cpu" else ray.cluster_resources().get("GPU", 0.0)
    options: dict[str, float] = {"num_cpus": 1, "max_concurrency": WORKER_CONCURRENCY, "max_restarts": 0, "max_task_retries": 0}
    if gpus >= run.gpus_per_worker:
        size, threads = int(gpus // run.gpus_per_worker + 1e-9), None
        options["num_gpus"] = run.gpus_per_worker
    else:
        size, threads = run.workers, run.torch_threads
    out = store.root if store.is_local else store.url
    return WorkerPool(
        actor=worker,
        arguments=lambda name: (config, out, name, model_info, threads, conditioner),
        options=options,
        size=max(1, min(size, shards)),
    )


def summarize(
    config: GenerateConfig, counts: list[int], committed: dict[int, dict], state: RunState, report: DriverReport | None, started: float
) -> RunSummary:
    report = report or DriverReport()
    return RunSummary(
        out=config.output.path,
        samples=config.run.num_samples,
        shards=len(counts),
        shards_generated=len(report.committed),
        shards_skipped=len(state.done),
        images_generated=report.images_committed,
        bytes=sum(marker["tar_bytes"] for shard, marker in committed.items() if shard < len(counts)),
        wall_seconds=time.perf_counter() - started,
        generation_seconds=report.generation_seconds,
        first_image_seconds=report.first_image_seconds,
        steady_images_per_s=report.steady_images_per_s,
        retries=report.retries,
        failed_workers=report.failed_workers,
        failed_shards=dict(report.failed),
        action=state.action,
    )


class SnapshotRefresh:
    """Every SNAPSHOT_SECONDS with new commits: the marker snapshot, so a killed driver's resume reads one
    object instead of every marker."""

    def __init__(self, rundir: RunDir, known: dict[int, dict]) -> None:
        self.rundir, self.markers = rundir, dict(known)
        self.written_at, self.written = time.perf_counter(), len(known)

    def commit(self, shard: int, marker: dict) -> None:
        self.markers[shard] = marker

    def refresh(self) -> None:
        now = time.perf_counter()
        if len(self.markers) > self.written and now - self.written_at >= SNAPSHOT_SECONDS:
            self.written_at, self.written = now, len(self.markers)
            self.rundir.write_snapshot(self.markers)


# --------------------------------------------------------------------------------------------- progress


class ProgressReport:
    """Images done/total, rate, ETA, and shards done/total, retries, failed workers (logs.StageProgress: a bar
    on a terminal, plain lines in a log)."""

    def __init__(self, progress: StageProgress, skipped: int, shards_total: int, shards_skipped: int) -> None:
        self.progress, self.skipped, self.shards_total, self.shards_skipped = progress, skipped, shards_total, shards_skipped

    def update(self, driver: Driver) -> None:
        report = driver.report
        images = report.images_committed + driver.images_in_flight
        shards = f"shards {self.shards_skipped + len(report.committed)}/{self.shards_total}"
        if driver.generation_started is None:
            shards += ", starting workers"
        self.progress.update(self.skipped + images, f"{shards}, {report.retries} retries, {report.failed_workers} failed workers")


@contextmanager
def progress_display(total: int, skipped: int, shards_total: int, shards_skipped: int, show: bool) -> Iterator[ProgressReport]:
    with StageProgress("generate", total, "images", completed=skipped, enabled=show) as progress:
        yield ProgressReport(progress, skipped, shards_total, shards_skipped)
