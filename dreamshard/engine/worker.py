"""The generation worker: one per GPU (or CPU slot), holding the pipeline, turning whole shards of sample
specs into committed shards. `driver.py` runs `GenerationWorker` as a Ray actor; it is a plain class, so it
also runs in-process (benchmarks, debugging).

Generation and writing overlap: the caller's thread runs the pipeline batch after batch while a writer
thread encodes images and appends them to the tar (a bounded queue between them keeps memory flat).
Shards overlap too: `generate_shard` holds the pipeline only while generating, so on an actor that runs
two of them at once (the driver queues the next shard on it early) the next shard generates while the
previous one flushes and commits.
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from dreamshard.config import GenerateConfig
from dreamshard.engine.conditioned import Conditioner
from dreamshard.engine.generation import SampleStamp, batches, check_scheduler_takes_eta, sampler_arguments, txt2img
from dreamshard.engine.models import load_pipeline
from dreamshard.engine.plan import SampleSpec
from dreamshard.engine.quality import REASONS, QualityJudge, draw_judged
from dreamshard.errors import RunFailure, UserError
from dreamshard.format.shards import ShardSample, ShardWriter
from dreamshard.format.store import Store

# ---------------------------------------------------------------------------------------------- worker


class GenerationWorker:
    """Loads the pipeline once, then generates and commits whole shards."""

    def __init__(
        self,
        config: GenerateConfig,
        out: str,
        name: str,
        model_info: dict,
        torch_threads: int | None = None,
        conditioner: Conditioner | None = None,  # conditioned modes: its generate() is the per-mode function
    ) -> None:
        self.config, self.store, self.name = config, Store(out), f"{name}@{socket.gethostname()}"
        self._progress = (-1, 0)  # (shard being generated, images generated in it), for the driver
        self._pipeline_lock = threading.Lock()  # one shard at a time uses the pipeline (schedulers keep state)
        self._load_error: Exception | None = None
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._generate_batch = conditioner.generate if conditioner else txt2img  # the conditioned modes' sources live in the conditioner
        load_started = time.perf_counter()
        try:
            self.pipe = load_pipeline(config.model, config.mode, speed=config.run)
            check_scheduler_takes_eta(self.pipe.scheduler, config.sampling.eta)
            self._judge = QualityJudge(config, self.pipe.device) if QualityJudge.wanted(config) else None
        except Exception as exc:  # surfaced by ready(): the driver stops instead of restarting a doomed worker
            self._load_error = exc
            return
        self._load_seconds = time.perf_counter() - load_started
        generation = {"scheduler": config.model.scheduler or type(self.pipe.scheduler).__name__, "model": model_info, "mode": config.mode}
        self._stamp = SampleStamp(generation, tuple(config.prompts.styles))
        self._sampler = sampler_arguments(config.sampling.eta)

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

    def generate_shard(self, shard: int, specs: list[SampleSpec]) -> dict:
        """Generate `specs` into shard `shard` and commit it; returns the shard's marker."""
        output = self.config.output
        try:
            with ShardWriter(self.store, shard, output.image_format, output.quality) as writer:
                writer.expect([spec.index for spec in specs])
                pending = _WriterThread(writer, capacity=2 * self.config.run.batch_size)
                tally: Counter = Counter()  # quality: draws, rejections by reason, exhausted samples
                try:
                    with self._pipeline_lock:  # released before the flush and commit: the next shard starts now
                        for sample in self._generate(shard, specs, tally):
                            pending.put(sample)
                finally:
                    pending.close()
                info: dict[str, Any] = {"worker": self.name}
                if self._judge is not None:
                    info["quality"] = {"draws": tally["draws"], "exhausted": tally["exhausted"], "rejected": {r: tally[r] for r in REASONS}}
                return writer.commit(info)
        except OSError as exc:  # full disk, permissions: the user must act, retrying will not help
            message = f"cannot write shard {shard} to {self.store.url}: {exc.strerror or exc}"
            if exc.errno == errno.ENOSPC:
                raise RunFailure(f"{message}; free space or choose another --out, then re-run to resume") from None
            raise UserError(f"{message}; choose a writable output path with --out") from None

    def _generate(self, shard: int, specs: list[SampleSpec], tally: Counter) -> Iterator[ShardSample]:
        generate, done = self._generate_batch, 0
        self._progress = (shard, 0)
        for batch in batches(specs, self.config.run.batch_size):
            started = time.perf_counter()
            if self._judge is None:
                samples = generate(self.pipe, batch, self._stamp, **self._sampler)
            else:  # scored, and rejected samples redrawn from their own seed streams
                samples, batch_tally = draw_judged(generate, self.pipe, batch, self._stamp, self._judge, **self._sampler)
                tally.update(batch_tally)
            seconds = round((time.perf_counter() - started) / len(batch), 4)
            for sample in samples:
                sample.metadata.update(worker=self.name, seconds=seconds)  # run facts: index Parquet only
                yield sample
            done += len(batch)
            self._progress = (shard, done)  # one assignment: progress() never pairs a shard with another's count


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
