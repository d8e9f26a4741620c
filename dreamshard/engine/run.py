"""`generate`: plan → Ray actors → committed WebDataset shards → manifest. The one public entry point of
the generation engine; the CLI only parses arguments and calls it.

The driver plans every shard up front (shard k = samples [k*S, min((k+1)*S, N))), skips the committed
ones, and hands whole shards to worker actors through a queue, up to SHARDS_IN_FLIGHT per actor. An actor
that dies is replaced and all its in-flight shards re-queued (bounded retries per shard); a shard that
keeps failing is reported and the rest of the run goes on. The driver only ever waits with a timeout, so a
dead actor cannot hang it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from dreamshard import __version__
from dreamshard.cluster import ClusterWatchdog, ray_session
from dreamshard.config import GenerateConfig
from dreamshard.engine.conditioned import conditioner_for
from dreamshard.engine.lease import LEASE, OutputLease
from dreamshard.engine.models import model_identity
from dreamshard.engine.plan import Plan, build_plan
from dreamshard.engine.quality import check_clip_model, quality_identity
from dreamshard.engine.worker import GenerationWorker
from dreamshard.errors import RunFailure, UserError, one_line
from dreamshard.format.layout import FORMAT_VERSION, LAYOUT, STATS, shard_counts
from dreamshard.format.reader import (
    UnreadableIndex,
    clean_partials,
    committed_shards,
    consolidate,
    read_run_record,
    remove_consolidated,
    uncommit,
    write_marker_snapshot,
    write_run_record,
)
from dreamshard.format.store import Store
from dreamshard.logs import StageProgress

log = logging.getLogger(__name__)

SNAPSHOT_SECONDS = 60.0  # how often a running driver refreshes the marker snapshot (index/markers.json)
POLL_SECONDS = 0.25  # how long the driver waits for any result before refreshing progress and timeouts
PROGRESS_SECONDS = 0.5  # how often busy workers are asked how far they are in their shard
# Shards queued on one actor at a time. With one, generation stopped at every shard boundary for the commit
# and a driver round trip (~10% of a 3 s tiny-model shard); with two, the actor starts the next shard as
# soon as the previous one releases the pipeline (worker.py), while that one still commits.
SHARDS_IN_FLIGHT = 2
ACTOR_PREFIX = "dreamshard-worker-"
MAX_SHARDS = 10_000_000  # a plan past this is a typo (1e15 samples), and its shard list alone would not fit in memory
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "ray", "pyarrow", "pillow", "webdataset")


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
) -> RunSummary:
    """Generate (or resume, or extend) the dataset `config` describes into `out` (default
    `config.output.path`). Bad input raises UserError before any worker starts; shards that still fail
    after their retries are listed in the summary's `failed_shards` (and no manifest is written)."""
    started, started_at = time.perf_counter(), time.time()
    config = resolved_config(config, out, num_samples)
    shards = -(-config.run.num_samples // config.output.samples_per_shard)
    if shards > MAX_SHARDS:
        raise UserError(
            f"num_samples {config.run.num_samples} makes {shards} shards of {config.output.samples_per_shard}; at most {MAX_SHARDS:,} "
            "(raise output.samples_per_shard or lower num_samples)"
        )
    plan = build_plan(config.prompts, config.sampling, config.run.seed)
    conditioner = conditioner_for(config)  # conditioned modes: the source is pre-scanned here
    model_info = model_identity(config.model)
    check_clip_model(config.quality.clip_model)
    parts = fingerprint_parts(config, plan, model_info, conditioner)
    fingerprints = fingerprint_digests(parts)
    store = _choose_output(config.output.path, fingerprints, force_new, parts)
    if store.url != config.output.path:
        log.warning("writing to %s (a new directory, --force-new)", store.url)
        config.output.path = store.url
    counts = shard_counts(config.run.num_samples, config.output.samples_per_shard)
    with OutputLease(store) as lease:  # one driver per output, from before anything is cleaned up
        done = _prepare_output(store, config, plan, counts, fingerprints, model_info, parts)
        todo = [shard for shard in range(len(counts)) if shard not in done]
        driver = None
        if todo:
            with ray_session(address):
                driver = _Driver(config, store, plan, counts, todo, model_info, started, conditioner, known=done)
                driver.lease = lease
                skipped = sum(counts[k] for k in done)
                try:
                    with _progress_display(show_progress, config.run.num_samples, skipped, len(counts), len(done)) as progress:
                        driver.run(progress)
                finally:
                    append_stats(store, run_stats(driver, started_at, len(done)))
            clean_partials(store)  # what dead workers left; every worker of this run is gone now
        committed = committed_shards(store, config.output.samples_per_shard)
        if driver is not None:
            _write_snapshot(store, committed)
        summary = _summary(config, counts, committed, done, driver, started)
        if summary.ok:
            try:
                consolidate(store, counts)
            except UnreadableIndex as exc:
                raise RunFailure(f"{store.url}: {exc}; shard {exc.shard} was un-committed, re-run the same command to regenerate it") from None
    return summary


def _summary(config: GenerateConfig, counts: list[int], committed: dict[int, dict], done: dict[int, dict], driver, started: float) -> RunSummary:
    return RunSummary(
        out=config.output.path,
        samples=config.run.num_samples,
        shards=len(counts),
        shards_generated=len(driver.committed) if driver else 0,
        shards_skipped=len(done),
        images_generated=driver.images_committed if driver else 0,
        bytes=sum(marker["tar_bytes"] for shard, marker in committed.items() if shard < len(counts)),
        wall_seconds=time.perf_counter() - started,
        generation_seconds=driver.generation_seconds if driver else 0.0,
        first_image_seconds=driver.first_image_seconds if driver else None,
        steady_images_per_s=driver.steady_images_per_s if driver else 0.0,
        retries=driver.retries if driver else 0,
        failed_workers=driver.failed_workers if driver else 0,
        failed_shards=dict(driver.failed) if driver else {},
    )


# ------------------------------------------------------------------------------------------ run stats


def run_stats(driver: _Driver, started_at: float, shards_skipped: int) -> dict:
    """One `generate` call, as appended to OUT/stats.jsonl (docs/format.md)."""
    end = driver.ended or time.perf_counter()
    workers = []
    for worker in driver.finished_workers:
        alive = end - worker.ready_at if worker.ready_at else 0.0
        workers.append({
            "name": worker.name, "host": worker.info.get("host"), "gpus": worker.info.get("gpus", []),
            "load_seconds": worker.info.get("load_seconds"), "shards": worker.shards_committed, "images": worker.images_committed,
            "images_per_s": round(worker.images_committed / alive, 3) if alive > 0 else 0.0,
        })  # fmt: skip
    return {
        "start": _iso(started_at), "end": _iso(time.time()), "host": platform.node(), "dreamshard": __version__,
        "num_samples": driver.config.run.num_samples, "shards_skipped": shards_skipped, "shards_made": len(driver.committed),
        "images_made": driver.images_committed, "shards_failed": {str(k): v for k, v in driver.failed.items()},
        "steady_images_per_s": round(driver.steady_images_per_s, 3), "retries": driver.retries,
        "failed_workers": driver.failed_workers, "worker_errors": driver.worker_errors, "workers": workers,
    }  # fmt: skip


def append_stats(store: Store, record: dict) -> None:
    """Append one line to OUT/stats.jsonl (rewritten whole: object stores cannot append)."""
    try:
        old = store.read_bytes(STATS) if store.exists(STATS) else b""
        store.write_bytes(STATS, old + (json.dumps(record) + "\n").encode())
    except OSError as exc:  # the statistics must never fail a run that produced its shards
        log.warning("could not write %s/%s (%s)", store.url, STATS, exc)


def _write_snapshot(store: Store, committed: dict[int, dict]) -> None:
    try:
        write_marker_snapshot(store, committed)
    except OSError as exc:  # only a cache: the next scan reads the markers themselves
        log.warning("could not write the marker snapshot on %s (%s)", store.url, exc)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def death_reason(exc: Exception) -> str:
    """Why a worker died, from Ray's error text: its exit detail (OOM, SIGKILL, node gone) when given."""
    text = str(exc)
    for marker in ("exit detail:", "Exit detail:", "The actor died because", "The actor is dead because"):
        if marker in text:
            return text[text.index(marker) :].splitlines()[0][:300]
    return one_line(exc, limit=300)


def fingerprint_digests(parts: dict) -> dict[str, str]:
    """{part: digest}: what the run record stores and compares (string parts as they are)."""
    return {name: value if isinstance(value, str) else _digest(value) for name, value in parts.items()}


def fingerprint_parts(config: GenerateConfig, plan: Plan, model_info: dict, conditioner=None) -> dict:
    """What must match for new shards to belong with the ones already written: the plan (prompts, sampling,
    seed), the weights by content (base or single-file checkpoint, variant, every LoRA with its scale,
    ControlNet, hub commit) and how they are run, the quality scores and filter, and the shard layout with the
    format version. Not num_samples, workers, batch, output, speed options (compile, attention,
    channels_last, VAE slicing change pixels by float rounding at most) or where the weights lie. Dict-valued
    parts are digested into the fingerprint and kept as they are in the run record, so a refusal can name
    what changed."""
    model = config.model
    parts = {
        "plan": plan.fingerprint,
        "model": {"hash": model_info["hash"], "revision": model_info["revision"], "variant": model_info["variant"],
                  "config": model_info["config"], "loras": model_info["loras"], "controlnet": model_info["controlnet"],
                  "scheduler": model.scheduler, "dtype": model.dtype, "mode": config.mode, "vae_tiling": config.run.vae_tiling},
        "quality": quality_identity(config),
        "layout": {"format_version": FORMAT_VERSION, "samples_per_shard": config.output.samples_per_shard,
                   "image_format": config.output.image_format, "quality": config.output.quality},
    }  # fmt: skip
    if conditioner is not None:  # conditioned modes: which source items, and how they condition samples
        parts["source"] = conditioner.fingerprint
    return parts


# -------------------------------------------------------------------------------------- output directory


def resolved_config(config: GenerateConfig, out: str | None, num_samples: int | None) -> GenerateConfig:
    config = config.model_copy(deep=True)
    if out is not None:
        config.output.path = str(out)
    if num_samples is not None:
        config.run.num_samples = num_samples
    return config


def _choose_output(path: str, fingerprints: dict[str, str], force_new: bool, parts: dict | None = None) -> Store:
    """`path` if it is new, empty or holds this same dataset; with force_new, the first sibling `path-2`,
    `path-3`, ... that is. Refuses to mix datasets."""
    differs = differing_parts(Store(path), fingerprints, parts)
    if not differs:
        return Store(path)
    if not force_new:
        raise UserError(
            f"{path} holds a dataset made with a different {' and '.join(differs)}; "
            "write to another --out, or pass --force-new to write to a new sibling directory"
        )
    for number in range(2, 1000):
        candidate = f"{path.rstrip('/')}-{number}"
        if not differing_parts(Store(candidate), fingerprints, parts):
            return Store(candidate)
    raise UserError(f"no free sibling directory for {path}; choose another --out")


def differing_parts(store: Store, fingerprints: dict[str, str], parts: dict | None = None) -> list[str]:
    """Parts of the fingerprint that differ from the run record in `store` ([] if new or the same), naming
    the changed keys where the record keeps the parts (e.g. `model (lora: 3f2a... then, 9c1b... now)`)."""
    try:
        record = read_run_record(store)
        if record is None:
            if store.fs.isfile(store.root) or set(store.list("")) - {LEASE}:  # a lease alone: a driver is starting there
                return ["content (it is not a dreamshard run directory)"]
            return []
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the output {store.url}: {exc}; choose another --out") from None
    stored, stored_parts = record.get("fingerprints", {}), record.get("fingerprint_parts", {})
    differs = []
    for name, value in fingerprints.items():
        if stored.get(name) == value:
            continue
        old, new = stored_parts.get(name), (parts or {}).get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changed = [f"{key}: {old.get(key)} then, {new.get(key)} now" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
            differs.append(f"{name} ({'; '.join(changed)})")
        else:
            differs.append(f"{name} (fingerprint {stored.get(name)} vs {value})")
    return differs


def _prepare_output(
    store: Store, config: GenerateConfig, plan: Plan, counts: list[int], fingerprints: dict, model_info: dict, parts: dict | None = None
) -> dict[int, dict]:
    """Check what is committed, refuse to shrink, clear leftovers, write the run record and the marker
    snapshot; returns the shards that are complete already, with their markers."""
    committed = committed_shards(store, config.output.samples_per_shard)
    too_many = {k: m["count"] for k, m in committed.items() if k >= len(counts) or m["count"] > counts[k]}
    if too_many:
        have = sum(m["count"] for m in committed.values())
        raise UserError(
            f"{store.url} already holds {have} samples; num_samples={config.run.num_samples} would drop some "
            f"(shards {sorted(too_many)}); raise num_samples or write to another --out"
        )
    done = {k: marker for k, marker in committed.items() if marker["count"] == counts[k]}
    try:
        store.makedirs()
        for shard in sorted(set(committed) - set(done)):  # a short last shard the extended run fills up
            uncommit(store, shard)
        clean_partials(store)
        _remove_uncommitted(store, done)
        if len(done) < len(counts):
            remove_consolidated(store)
        previous = read_run_record(store) or {}
        write_run_record(store, _run_record(config, plan, counts, fingerprints, model_info, previous, parts or {}))
        write_marker_snapshot(store, done)
    except OSError as exc:
        raise UserError(f"cannot write to {store.url} ({exc.strerror or exc}); choose a writable output path with --out") from None
    return done


def _remove_uncommitted(store: Store, done: dict[int, dict]) -> None:
    """Tar and Parquet files without a commit do not exist for readers of the contract, but a `*.tar`
    glob would still see them: remove them."""
    for folder, suffix in (("shards", ".tar"), ("index", ".parquet")):
        for name in store.list(folder):
            stem = name.removesuffix(suffix)
            if name.endswith(suffix) and stem.isdigit() and int(stem) not in done:
                store.remove(f"{folder}/{name}")


def _run_record(config, plan, counts, fingerprints, model_info, previous: dict, parts: dict) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {
        "format_version": FORMAT_VERSION,
        "dreamshard": __version__,
        "created": previous.get("created", now),
        "updated": now,
        "fingerprint": _digest(fingerprints),
        "fingerprints": fingerprints,
        "fingerprint_parts": parts,
        "num_samples": config.run.num_samples,
        "samples_per_shard": config.output.samples_per_shard,
        "num_shards": len(counts),
        "image_format": config.output.image_format,
        "layout": LAYOUT,
        "model": model_info,
        "plan": plan.describe(),
        "config": config.model_dump(mode="json"),
        "versions": _versions(),
    }  # fmt: skip


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "dreamshard": __version__}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- driver


@dataclass
class _Worker:
    actor: Any
    name: str
    start_ref: Any = None  # pending until the pipeline is loaded
    tasks: dict[Any, int] = field(default_factory=dict)  # in-flight generate_shard ref -> shard, in dispatch order
    busy_since: float = 0.0  # since when it has had work without finishing a shard (shard_timeout_s)
    progress_ref: Any = None
    progress_asked: float = 0.0
    progress: tuple[int, int] = (-1, 0)  # (shard it is generating, images generated in it) as last reported
    timed_out: bool = False
    info: dict = field(default_factory=dict)  # from ready(): host, GPUs, model load seconds
    ready_at: float | None = None
    images_committed: int = 0
    shards_committed: int = 0

    @property
    def images(self) -> int:
        """Images generated in its in-flight shards and not committed yet."""
        shard, images = self.progress
        return images if shard in self.tasks.values() else 0


class _Driver:
    """Hands shards to workers, replaces dead ones, retries failed shards a bounded number of times."""

    def __init__(self, config: GenerateConfig, store: Store, plan: Plan, counts: list[int], todo: list[int],
                 model_info: dict, started: float, conditioner=None, known: dict[int, dict] | None = None) -> None:  # fmt: skip
        import ray

        self.ray, self.config, self.store, self.plan, self.counts = ray, config, store, plan, counts
        self.model_info, self.started, self.conditioner = model_info, started, conditioner
        self.queue: deque[int] = deque(todo)
        self.todo_count = len(todo)
        self.known = known or {}  # markers of the shards committed before this run (for the marker snapshot)
        self._snapshot_at, self._snapshotted = time.perf_counter(), 0
        self.attempts: dict[int, int] = {}
        self.failed: dict[int, str] = {}
        self.committed: dict[int, dict] = {}
        self.images_committed = self.retries = self.failed_workers = 0
        self.first_image_seconds: float | None = None
        self.generation_started: float | None = None
        self.generation_seconds = 0.0
        self.all_ready: tuple[float, int] | None = None  # (when, images so far) once the first wave is up
        self.steady_images_per_s = 0.0
        self.workers: list[_Worker] = []
        self.finished_workers: list[_Worker] = []  # lost ones, and all of them once the run ends (stats)
        self.worker_errors: list[dict] = []
        self.lease = None  # OutputLease, renewed from the loop
        self.no_worker_since: float | None = None
        self.watchdog: ClusterWatchdog | None = None
        self.ended: float | None = None
        self._names, self._run_id = 0, uuid.uuid4().hex[:8]
        self._options, self._threads, self._size = self._actor_options(len(todo))
        self.restarts_left = self._size * (config.run.max_shard_retries + 1)
        for _ in range(self._size):
            self._start_worker()

    def run(self, progress: _ProgressReport) -> None:
        self.watchdog = ClusterWatchdog(self.ray, lambda: f"{self.todo_count - len(self.committed)} shard(s)")
        self.watchdog.start()
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
                progress.update(self)
                self._refresh_snapshot()
                if self.lease is not None:
                    self.lease.renew()
        finally:
            now = time.perf_counter()
            if self.generation_started is not None:
                self.generation_seconds = now - self.generation_started
            if self.all_ready is not None and now > self.all_ready[0]:
                self.steady_images_per_s = (self.images_committed - self.all_ready[1]) / (now - self.all_ready[0])
            self.watchdog.stop_unless_gone()
            if not self.watchdog.problem:  # with the cluster gone, killing actors would block on the GCS
                for worker in self.workers:
                    self.ray.kill(worker.actor, no_restart=True)
            self.finished_workers += self.workers
            self.ended = now
            self.workers.clear()

    def _refresh_snapshot(self) -> None:
        """Every SNAPSHOT_SECONDS with new commits: the marker snapshot, so a killed driver's resume reads one
        object instead of every marker."""
        now = time.perf_counter()
        if len(self.committed) > self._snapshotted and now - self._snapshot_at >= SNAPSHOT_SECONDS:
            self._snapshot_at, self._snapshotted = now, len(self.committed)
            _write_snapshot(self.store, {**self.known, **self.committed})

    @property
    def images_in_flight(self) -> int:
        return sum(worker.images for worker in self.workers)

    # ------------------------------------------------------------------------------------ workers

    def _actor_options(self, shards: int) -> tuple[dict, int | None, int]:
        """Ray options, torch threads and count of the workers: one per GPU (fractions allowed), or
        `run.workers` single-CPU workers when the cluster has no GPU (or model.device is cpu)."""
        run = self.config.run
        gpus = 0.0 if self.config.model.device == "cpu" else self.ray.cluster_resources().get("GPU", 0.0)
        # Threads: the in-flight shards plus one for progress() and pid() calls.
        options = {"num_cpus": 1, "max_concurrency": SHARDS_IN_FLIGHT + 1, "max_restarts": 0, "max_task_retries": 0}
        if gpus >= run.gpus_per_worker:
            size, threads = int(gpus // run.gpus_per_worker + 1e-9), None
            options["num_gpus"] = run.gpus_per_worker
        else:
            size, threads = run.workers, run.torch_threads
        return options, threads, max(1, min(size, shards))

    def _start_worker(self) -> None:
        name = f"w{self._names}"
        self._names += 1
        # Named so operators (and tests) can find a run's workers: `ray list actors`, ray.get_actor(name).
        options = {**self._options, "name": f"{ACTOR_PREFIX}{self._run_id}-{name}"}
        actor = (
            self.ray.remote(GenerationWorker)
            .options(**options)
            .remote(self.config, self.store.root if self.store.is_local else self.store.url, name, self.model_info, self._threads, self.conditioner)
        )
        self.workers.append(_Worker(actor=actor, name=name, start_ref=actor.ready.remote()))

    def _replace(self) -> bool:
        if self.restarts_left <= 0 or not (self.queue or self.workers):
            return False
        self.restarts_left -= 1
        self._start_worker()
        return True

    def _lose(self, worker: _Worker, reason: str) -> None:
        """A worker died: count it, re-queue each of its in-flight shards once (keeping one it committed just
        before dying), start a replacement if there is work left."""
        self.failed_workers += 1
        self.worker_errors.append({"worker": worker.name, "host": worker.info.get("host"), "error": reason})
        self.finished_workers.append(worker)
        self.workers.remove(worker)
        self.ray.kill(worker.actor, no_restart=True)
        log.warning("worker %s died (%s)", worker.name, reason)
        tasks, worker.tasks = worker.tasks, {}  # its other refs in this round of events are ignored
        for ref, shard in reversed(tasks.items()):  # re-queued at the front in dispatch order
            marker = self._result_if_done(ref)
            if marker is None:
                self._shard_failed(shard, f"worker died: {reason}")
            else:
                self._accept(shard, marker, worker)
        if self.queue:
            self._replace()

    def _result_if_done(self, ref) -> dict | None:
        ready, _ = self.ray.wait([ref], timeout=0)
        try:
            return self.ray.get(ready[0]) if ready else None
        except Exception:  # noqa: BLE001 - the death, or its own failure: either way it is redone
            return None

    # ------------------------------------------------------------------------------------- shards

    def _dispatch(self) -> None:
        for worker in self.workers:
            while worker.start_ref is None and self.queue and self._takes_another(worker):
                shard = self.queue.popleft()
                start = shard * self.config.output.samples_per_shard
                specs = self.plan.specs(start, start + self.counts[shard])
                if not worker.tasks:
                    worker.busy_since = time.perf_counter()
                worker.tasks[worker.actor.generate_shard.remote(shard, specs)] = shard
                self.attempts[shard] = self.attempts.get(shard, 0) + 1

    def _takes_another(self, worker: _Worker) -> bool:
        """An idle worker takes any shard. A busy one takes a second only while there are enough for every
        worker (no idle worker at the end of the run while another has one queued), and never beside a
        retry: a shard that kills its worker takes a healthy one down with it at most once."""
        if not worker.tasks:
            return True
        first_attempts = self.attempts.get(self.queue[0], 0) == 0 and all(self.attempts[s] == 1 for s in worker.tasks.values())
        return len(worker.tasks) < SHARDS_IN_FLIGHT and len(self.queue) >= len(self.workers) and first_attempts

    def _shard_failed(self, shard: int, reason: str) -> None:
        if self.attempts[shard] <= self.config.run.max_shard_retries:
            self.retries += 1
            self.queue.appendleft(shard)
            log.warning("shard %d failed (%s); retry %d of %d", shard, reason, self.attempts[shard], self.config.run.max_shard_retries)
        else:
            self.failed[shard] = reason
            log.error("shard %d failed %d times, giving up (%s)", shard, self.attempts[shard], reason)

    def _fail_queued(self, reason: str) -> None:
        while self.queue:
            self.failed[self.queue.popleft()] = reason

    # ------------------------------------------------------------------------------------- events

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

    def _check_workers_and_cluster(self) -> None:
        """Bounded waiting: stop with one line when no worker has been ready for worker_start_timeout_s, or the
        Ray cluster itself is gone (its GCS does not answer, or no node is alive)."""
        now = time.perf_counter()
        if any(worker.start_ref is None for worker in self.workers):
            self.no_worker_since = None
        elif self.no_worker_since is None:
            self.no_worker_since = now
        limit = self.config.run.worker_start_timeout_s
        left = len(self.queue) + sum(len(w.tasks) for w in self.workers)
        if limit and self.no_worker_since is not None and now - self.no_worker_since > limit:
            raise RunFailure(
                f"no worker could be started for {limit:.0f} s (the cluster may lack the resources asked for: {self._options}; "
                f"check `ray status`); {left} shard(s) left: re-run the same command to resume"
            )
        if self.watchdog is not None and self.watchdog.problem:
            raise RunFailure(self.watchdog.message())

    def _on_started(self, worker: _Worker, ref) -> None:
        from ray.exceptions import RayActorError

        try:
            worker.info = self.ray.get(ref)
        except RayActorError as exc:
            self._lose(worker, death_reason(exc))
            return
        except UserError as exc:
            raise _as_user_error(exc) from None
        except Exception as exc:  # the pipeline failed to load: the same will happen on every worker
            raise UserError(f"worker could not load the model: {one_line(getattr(exc, 'cause', exc))}") from None
        worker.start_ref, worker.ready_at = None, time.perf_counter()
        if self.generation_started is None:
            self.generation_started = time.perf_counter()
        if self.all_ready is None and self._names >= self._size and all(w.start_ref is None for w in self.workers):
            self.all_ready = (time.perf_counter(), self.images_committed + self.images_in_flight)

    def _on_finished(self, worker: _Worker, ref) -> None:
        from ray.exceptions import RayActorError

        try:
            marker = self.ray.get(ref)
        except RayActorError as exc:
            self._lose(
                worker, f"timed out after run.shard_timeout_s={self.config.run.shard_timeout_s:g} s on one shard" if worker.timed_out else death_reason(exc)
            )
            return
        except UserError as exc:  # full disk, unwritable output: stop, the user must act
            raise _as_user_error(exc) from None
        except Exception as exc:
            self._shard_failed(self._take_finished(worker, ref), one_line(getattr(exc, "cause", exc)))
            return
        self._accept(self._take_finished(worker, ref), marker, worker)

    @staticmethod
    def _take_finished(worker: _Worker, ref) -> int:
        """Take a finished shard off its worker (which is making progress again); returns the shard."""
        worker.busy_since = time.perf_counter()
        return worker.tasks.pop(ref)

    def _accept(self, shard: int, marker: dict, worker: _Worker) -> None:
        if marker["count"] != self.counts[shard]:
            self._shard_failed(shard, f"committed {marker['count']} samples, expected {self.counts[shard]}")
            return
        self.committed[shard] = marker
        self.images_committed += marker["count"]
        worker.images_committed += marker["count"]
        worker.shards_committed += 1
        self._saw_image()

    def _check_timeouts(self) -> None:
        limit = self.config.run.shard_timeout_s
        if not limit:
            return
        for worker in self.workers:
            if worker.tasks and not worker.timed_out and time.perf_counter() - worker.busy_since > limit:
                worker.timed_out = True  # killing it makes its task fail with RayActorError, handled as a death
                self.ray.kill(worker.actor, no_restart=True)

    def _poll_progress(self) -> None:
        now = time.perf_counter()
        for worker in self.workers:
            if worker.progress_ref is not None:
                ready, _ = self.ray.wait([worker.progress_ref], timeout=0)
                if ready:
                    try:
                        worker.progress = self.ray.get(worker.progress_ref)
                    except Exception:  # a dying worker; its shard results say what happened
                        pass
                    worker.progress_ref = None
                    if worker.images:
                        self._saw_image()
            elif worker.tasks and now - worker.progress_asked > PROGRESS_SECONDS:
                worker.progress_ref, worker.progress_asked = worker.actor.progress.remote(), now

    def _saw_image(self) -> None:
        if self.first_image_seconds is None:
            self.first_image_seconds = time.perf_counter() - self.started


def _as_user_error(exc: Exception) -> UserError:
    """A worker's UserError (or RunFailure), unwrapped from Ray's task error, its exit code kept."""
    cause = getattr(exc, "cause", exc)
    return type(cause)(str(cause)) if isinstance(cause, UserError) else UserError(str(cause))


# --------------------------------------------------------------------------------------------- progress


class _ProgressReport:
    """Images done/total, rate, ETA, and shards done/total, retries, failed workers (logs.StageProgress: a bar
    on a terminal, plain lines in a log)."""

    def __init__(self, progress: StageProgress, skipped: int, shards_total: int, shards_skipped: int) -> None:
        self.progress, self.skipped, self.shards_total, self.shards_skipped = progress, skipped, shards_total, shards_skipped

    def update(self, driver: _Driver) -> None:
        images = driver.images_committed + driver.images_in_flight
        shards = f"shards {self.shards_skipped + len(driver.committed)}/{self.shards_total}"
        if driver.generation_started is None:
            shards += ", starting workers"
        self.progress.update(self.skipped + images, f"{shards}, {driver.retries} retries, {driver.failed_workers} failed workers")


@contextmanager
def _progress_display(show: bool, total: int, skipped: int, shards_total: int, shards_skipped: int) -> Iterator[_ProgressReport]:
    with StageProgress("generate", total, "images", completed=skipped, enabled=show) as progress:
        yield _ProgressReport(progress, skipped, shards_total, shards_skipped)
