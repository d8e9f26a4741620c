"""The generation worker: one per GPU (or CPU slot), holding the pipeline, turning whole shards of sample
specs into committed shards. `driver.py` runs `GenerationWorker` as a Ray actor; it is a plain class, so it
also runs in-process (benchmarks, debugging).

Generation and writing overlap: the caller's thread runs the pipeline call after call (engine/drawing.py)
while a writer thread finishes, encodes and appends samples to the tar (a bounded queue between them keeps
memory flat). Shards overlap too: `generate_shard` holds the pipeline only while generating, so on an actor
that runs two of them at once (the driver queues the next shard on it early) the next shard generates while
the previous one flushes and commits.

Backup copies: the driver may give a straggler's shard to an idle worker too (`backup=True`). A backup copy
is sealed, not published, and waits for the driver: `publish_backup` or `discard_backup`. The driver first
asks the original copy to `abort`, which succeeds only while that copy has not begun to publish; so of two
copies exactly one is published.
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import threading
import time
from collections import Counter
from typing import Any

import torch

from dreamshard.config import GenerateConfig
from dreamshard.engine.conditioned import Conditioner
from dreamshard.engine.drawing import BatchMaker, CallStats, PromptsOnly, ShardDrawer
from dreamshard.engine.generation import SampleStamp, check_scheduler_takes_eta, sampler_arguments
from dreamshard.engine.models import load_pipeline
from dreamshard.engine.plan import SampleSpec
from dreamshard.engine.quality import REASONS, QualityJudge
from dreamshard.engine.records import activation_gib
from dreamshard.errors import RunFailure, UserError
from dreamshard.format.shards import ShardSample, ShardWriter
from dreamshard.format.store import Store, store_error

# A copy's states: running (generating or waiting for the pipeline), sealed (a backup waiting for the
# driver), publishing, published, aborted.
ABORTABLE = ("running", "sealed")


class Aborted(Exception):
    """The driver chose the other copy of this shard."""


class GenerationWorker:
    """Loads the pipeline once, then generates and commits whole shards."""

    def __init__(
        self,
        config: GenerateConfig,
        out: str,
        name: str,
        model_info: dict,
        torch_threads: int | None = None,
        conditioner: Conditioner | None = None,  # conditioned modes: the source and its per-call conditioning
    ) -> None:
        self.config, self.store, self.name = config, Store(out), f"{name}@{socket.gethostname()}"
        self._progress = (-1, 0)  # (shard being generated, samples finished in it), for the driver
        self._pipeline_lock = threading.Lock()  # one shard at a time uses the pipeline (schedulers keep state)
        self._copies: dict[tuple[int, int], str] = {}  # (shard, attempt) -> state, under _copies_lock
        self._copies_lock = threading.Lock()
        self._sealed: dict[tuple[int, int], ShardWriter] = {}  # backups waiting for the driver
        self._load_error: Exception | None = None
        if torch_threads:
            torch.set_num_threads(torch_threads)
        maker: BatchMaker = conditioner if conditioner is not None else PromptsOnly()
        load_started = time.perf_counter()
        try:
            self.pipe = load_pipeline(config.model, config.mode, speed=config.run)
            check_scheduler_takes_eta(self.pipe.scheduler, config.sampling.eta)
            check_fits(config, self.pipe.device)
            self._judge = QualityJudge(config, self.pipe.device) if QualityJudge.wanted(config) else None
        except Exception as exc:  # surfaced by ready(): the driver stops instead of restarting a doomed worker
            self._load_error = exc
            return
        self._load_seconds = time.perf_counter() - load_started
        generation = {"scheduler": config.model.scheduler or type(self.pipe.scheduler).__name__, "model": model_info, "mode": config.mode}
        stamp = SampleStamp(generation, tuple(config.prompts.styles))
        sampler = sampler_arguments(config.sampling.eta)
        self._drawer = ShardDrawer(self.pipe, maker, stamp, config.run.batch_size, self._judge, pad=config.run.compile, sampler=sampler)

    def ready(self) -> dict:
        """Where this worker runs and how long its model took to load (raises the load error, if any)."""
        if self._load_error is not None:
            raise self._load_error
        return {"name": self.name, "host": socket.gethostname(), "gpus": self._gpus(), "load_seconds": round(self._load_seconds, 2)}

    @staticmethod
    def _gpus() -> list[str]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return [gpu for gpu in visible.split(",") if gpu] if torch.cuda.is_available() else []

    def pid(self) -> int:
        return os.getpid()

    def progress(self) -> tuple[int, int]:
        return self._progress

    # ------------------------------------------------------------------------------------------- shards

    def generate_shard(self, shard: int, specs: list[SampleSpec], attempt: int = 0, backup: bool = False) -> dict:
        """Generate `specs` into shard `shard` and commit it; returns the shard's marker. A backup copy is
        sealed and returned as {"sealed": True, ...marker} for the driver to publish or discard; a copy the
        driver aborted returns {"aborted": True, "shard": shard}."""
        copy = (shard, attempt)
        with self._copies_lock:
            if self._copies.setdefault(copy, "running") == "aborted":
                return {"aborted": True, "shard": shard}
        try:
            with ShardWriter(self.store, shard, self.config.output.image_format, self.config.output.quality) as writer:
                writer.expect([spec.index for spec in specs])
                marker = writer.seal(self._make(shard, copy, specs, writer))
                if backup:
                    return self._hold(copy, writer, marker)
                if not self._begin_publishing(copy):
                    writer.abort()
                    return {"aborted": True, "shard": shard}
                return self._publish(copy, writer)
        except Aborted:
            return {"aborted": True, "shard": shard}
        except OSError as exc:  # full disk, permissions: the user must act, retrying will not help
            raise self._write_error(shard, exc) from None

    def abort(self, shard: int, attempt: int) -> bool:
        """Stop this copy of a shard unless it has begun to publish (then False: it will be committed)."""
        with self._copies_lock:
            state = self._copies.get((shard, attempt), "running")
            if state not in ABORTABLE and state != "aborted":
                return False
            self._copies[(shard, attempt)] = "aborted"
        writer = self._sealed.pop((shard, attempt), None)
        if writer is not None:
            writer.abort()
        return True

    def publish_backup(self, shard: int, attempt: int) -> dict:
        """Commit a sealed backup copy (the driver aborted the original first); returns its marker."""
        copy = (shard, attempt)
        if not self._begin_publishing(copy) or copy not in self._sealed:
            raise RuntimeError(f"shard {shard}: backup copy {attempt} is not waiting to be published")
        try:
            return self._publish(copy, self._sealed.pop(copy))
        except OSError as exc:
            raise self._write_error(shard, exc) from None

    def discard_backup(self, shard: int, attempt: int) -> None:
        self.abort(shard, attempt)

    # ------------------------------------------------------------------------------------------ helpers

    def _make(self, shard: int, copy: tuple[int, int], specs: list[SampleSpec], writer: ShardWriter) -> dict:
        """Draw the shard's samples into `writer` (on its writer thread); returns the marker's run facts."""
        pending = _WriterThread(writer, capacity=2 * self.config.run.batch_size)
        tally: Counter = Counter()  # quality: draws, rejections by reason, exhausted samples
        stats = CallStats()
        try:
            with self._pipeline_lock:  # released before the flush and commit: the next shard starts now
                self._progress, done = (shard, 0), 0
                for sample in self._drawer.draw(specs, stats, tally):
                    if self._copies.get(copy) == "aborted":
                        raise Aborted()
                    sample.metadata["worker"] = self.name  # run facts: index Parquet only
                    pending.put(sample)
                    done += 1
                    self._progress = (shard, done)  # one assignment: progress() never pairs a shard with another's count
        finally:
            pending.close()
        info: dict[str, Any] = {"worker": self.name, "generation": stats.as_dict()}
        if self._judge is not None:
            info["quality"] = {
                "draws": tally["draws"], "exhausted": tally["exhausted"], "rejected": {r: tally[r] for r in REASONS}, "dropped": tally["dropped"],
            }  # fmt: skip
        return info

    def _hold(self, copy: tuple[int, int], writer: ShardWriter, marker: dict) -> dict:
        """Keep a sealed backup for the driver's decision (unless the driver aborted it meanwhile)."""
        with self._copies_lock:
            if self._copies.get(copy) == "aborted":
                writer.abort()
                return {"aborted": True, "shard": copy[0]}
            self._copies[copy] = "sealed"
            self._sealed[copy] = writer  # its files stay: the `with` block drops them only on an error
        return {"sealed": True, **marker}

    def _begin_publishing(self, copy: tuple[int, int]) -> bool:
        with self._copies_lock:
            if self._copies.get(copy) == "aborted":
                return False
            self._copies[copy] = "publishing"
            return True

    def _publish(self, copy: tuple[int, int], writer: ShardWriter) -> dict:
        marker = writer.publish()
        with self._copies_lock:
            self._copies[copy] = "published"
        return marker

    def _write_error(self, shard: int, exc: OSError) -> UserError:
        unreachable = store_error(exc)  # an object store that timed out or refused: not a path to change
        if unreachable is not None:
            return RunFailure(f"cannot write shard {shard} to {self.store.url}: {unreachable}")
        message = f"cannot write shard {shard} to {self.store.url}: {exc.strerror or exc}"
        if exc.errno == errno.ENOSPC:
            return RunFailure(f"{message}; free space or choose another --out, then re-run to resume")
        return UserError(f"{message}; choose a writable output path with --out")


def check_fits(config: GenerateConfig, device: torch.device) -> None:
    """One line, before any shard, when a call's activations (records.activation_gib) cannot fit in what the
    device has left after the model (a GPU) or in the machine's memory (a CPU)."""
    if device.type == "cuda":
        free = (torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)) / 2**30
        need, where = activation_gib(config, 2), f"{device} ({free:.0f} GiB free after the model)"
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        need, where = activation_gib(config, 4), f"this machine's {free:.0f} GiB of memory"
    if need > free:
        raise UserError(
            f"sampling {config.sampling.width}x{config.sampling.height} at run.batch_size {config.run.batch_size} needs about {need:.0f} GiB of "
            f"activations, more than {where}; lower run.batch_size or the size, or set run.vae_slicing / run.vae_tiling"
        )


class _WriterThread:
    """Feeds samples to a ShardWriter on a background thread through a bounded queue."""

    def __init__(self, writer: ShardWriter, capacity: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(capacity, 1))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(writer,), name="shard-writer", daemon=True)
        self._thread.start()

    def put(self, sample: ShardSample) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(sample, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until everything queued is written; re-raise the writer's error if it had one."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self, writer: ShardWriter) -> None:
        try:
            for sample in iter(self._queue.get, None):
                writer.add(sample)
        except BaseException as exc:  # noqa: BLE001 - handed to the generating thread
            self._error = exc
            for _ in iter(self._queue.get, None):  # drain so the generating thread never blocks on put
                pass
