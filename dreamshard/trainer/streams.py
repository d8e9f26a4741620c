"""The training loop's data side: the batch sizes over ranks, one DataLoader per domain starting at the
position the checkpoint recorded, batches on the device, and the optional record of the samples each rank
read (`data.record_samples`: OUTPUT/samples/rank{r}.jsonl, one line per iteration).

The position is the number of samples per domain all ranks consumed together (iterations x global batch);
checkpoints keep it with each domain's epoch size and catalogue digest, so a resume reads on from exactly
there (trainer/order.py), at any number of ranks, and refuses data that changed under it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dreamshard.config import TrainConfig, TrainDataConfig
from dreamshard.errors import UserError, one_line
from dreamshard.format.store import atomic_write
from dreamshard.trainer.checkpoints import TrainState
from dreamshard.trainer.data import FolderSamples, ShardSamples, TwinSamples, domain_samples, train_loader
from dreamshard.trainer.order import ORDER_VERSION, ReadPlan
from dreamshard.trainer.runtime import Runtime
from dreamshard.trainer.shards import DataError

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


@dataclass(frozen=True)
class BatchSizes:
    """Samples per domain: `global_batch` per iteration over all ranks and grad_accum steps, `per_rank` per
    rank and micro-step (global = per_rank x world x accum)."""

    global_batch: int
    per_rank: int
    world: int
    accum: int

    def record(self) -> dict:
        return {"global": self.global_batch, "per_rank": self.per_rank, "world_size": self.world, "grad_accum": self.accum}


def batch_sizes(data: TrainDataConfig, accum: int, world: int) -> BatchSizes:
    """From data.global_batch_size (divided over the ranks and steps) or the per-rank data.batch_size."""
    if data.global_batch_size:
        parts = world * accum
        if data.global_batch_size % parts:
            raise UserError(
                f"data.global_batch_size {data.global_batch_size} does not divide over {world} rank(s) x {accum} grad_accum step(s); use a multiple of {parts}"
            )
        return BatchSizes(data.global_batch_size, data.global_batch_size // parts, world, accum)
    return BatchSizes(data.batch_size * world * accum, data.batch_size, world, accum)


def training_domains(config: TrainConfig) -> dict[str, bool]:
    """Which data streams the method reads, and whether each must carry labels."""
    if config.method in ("dacs", "clouds"):
        return {"source": True, "target": False}
    if config.method == "supervised_synthetic":
        return {"source": True, "target": True} if config.data.source else {"target": True}
    if config.method == "zodi":  # the transferred twins carry their source's label (seg.png)
        return {"source": True, "target": True}
    return {"source": True}


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The torch seed of one iteration on one rank (strong augmentation, ClassMix, MIC masks, dropout): a
    resumed run draws what the uninterrupted one drew."""
    import numpy as np

    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, iteration, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class DataStreams:
    """One DataLoader per domain, from the state's recorded position to max_iters."""

    def __init__(self, config: TrainConfig, rt: Runtime, state: TrainState, sizes: BatchSizes, out: Path):
        self.config, self.rt, self.sizes = config, rt, sizes
        self.samples: dict[str, ShardSamples | FolderSamples | TwinSamples] = {
            name: domain_samples(
                name, getattr(config.data, name), config.data, labelled, config.seed, config.uda.rcs if name == "source" else None,
                Path(config.data.cache_dir) / "rcs",
            )
            for name, labelled in training_domains(config).items()
        }  # fmt: skip
        if config.data.paired:  # the source follows the target: each target sample's real twin
            folder, target = self.samples["source"], self.samples["target"]
            assert isinstance(folder, FolderSamples) and isinstance(target, ShardSamples)  # TrainConfig checks the kinds
            self.samples["source"] = TwinSamples("source", folder, target)
        self.position = self._start(state)
        plan = ReadPlan((config.max_iters - state.iteration) * sizes.accum, sizes.per_rank, self.position, rt.rank, rt.world)
        pin = config.data.pin_memory if config.data.pin_memory is not None else rt.device.type == "cuda"
        loaders = {name: train_loader(samples, config.data, plan, config.seed, config.model.num_classes, pin) for name, samples in self.samples.items()}
        self.iterators = {name: iter(loader) for name, loader in loaders.items()}
        self.problems: set[str] = set()  # shards skipped or cut short (this rank's workers)
        self.substituted = 0  # positions this rank filled with another sample
        self.record = SampleRecord(out, rt, state.iteration) if config.data.record_samples else None
        state.data = self.position_record()

    def _start(self, state: TrainState) -> int:
        """The position to read from: the checkpoint's, checked against the data as it is now."""
        recorded = state.data
        if state.iteration == 0:
            return 0
        if not recorded:
            log.warning(
                "the checkpoint at iteration %d has no loader position (made by an older dreamshard): reading on from iteration x global batch", state.iteration
            )
            return state.iteration * self.sizes.global_batch
        if recorded.get("order") != ORDER_VERSION:
            raise UserError(
                f"the checkpoint at iteration {state.iteration} records another data order (version {recorded.get('order')}); pass --restart to start over"
            )
        for name, samples in self.samples.items():
            then = recorded.get("domains", {}).get(name)
            if then and (then["epoch_samples"] != samples.epoch_samples or then["digest"] != samples.digest()):
                hint = f"shards.subset: {then['epoch_samples']} if the run grew, " if isinstance(samples, ShardSamples) else ""
                raise UserError(
                    f"the {name} data changed since the checkpoint at iteration {state.iteration} ({then['epoch_samples']} samples then, "
                    f"{samples.epoch_samples} now): the rest of its epoch order would differ; train on the same data ({hint}or point the domain back), or pass --restart"
                )
        if recorded.get("global_batch_size") != self.sizes.global_batch:
            log.warning(
                "the global batch changes from %s (at the checkpoint) to %d: set data.global_batch_size to keep it whatever the number of ranks",
                recorded.get("global_batch_size"), self.sizes.global_batch,
            )  # fmt: skip
        return int(recorded["samples_seen"])

    def position_record(self) -> dict:
        """What a checkpoint stores: the position, the batch sizes and each domain's epoch and place in it."""
        domains = {}
        for name, samples in self.samples.items():
            epoch, offset = divmod(self.position, samples.epoch_samples)
            domains[name] = {"epoch_samples": samples.epoch_samples, "digest": samples.digest(), "epoch": epoch, "in_epoch": offset}
        sizes = self.sizes
        return {"order": ORDER_VERSION, "seed": self.config.seed, "samples_seen": self.position, "global_batch_size": sizes.global_batch,
                "batch_per_rank": sizes.per_rank, "world_size": sizes.world, "domains": domains}  # fmt: skip

    def next_batch(self) -> dict[str, torch.Tensor]:
        """One micro-batch per domain on the device: `{domain}_image` float [0, 1], `{domain}_label` long."""
        device, channels_last = self.rt.device, self.config.channels_last
        batch = {}
        for name, iterator in self.iterators.items():
            raw = _next(name, iterator)
            self.problems.update(raw["problems"])
            self.substituted += int(raw["substituted"])
            if self.record is not None:
                self.record.add(name, raw["keys"])
            image = raw["image"].to(device, non_blocking=True).float().div_(255)
            batch[f"{name}_image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
            if "label" in raw:
                batch[f"{name}_label"] = raw["label"].to(device, non_blocking=True).long()
        return batch

    def advance(self, state: TrainState) -> None:
        """After an optimiser step: the global batch is consumed."""
        self.position += self.sizes.global_batch
        state.data = self.position_record()
        if self.record is not None:
            self.record.write(state.iteration)

    def skipped(self) -> tuple[list[str], int]:
        return sorted(self.problems), self.substituted

    def close(self) -> None:
        if self.record is not None:
            self.record.close()


def _next(name: str, iterator) -> dict:
    try:
        return next(iterator)
    except StopIteration:
        raise DataError(f"the {name} data stream ended before max_iters") from None
    except (DataError, UserError) as exc:  # from a DataLoader worker, torch adds the worker's traceback as text: keep the line
        if "Traceback" not in str(exc):
            raise
        line = one_line(exc, last=True)
        for kind in (DataError, UserError):
            line = line.removeprefix(f"{kind.__module__}.{kind.__name__}: ")
        raise type(exc)(line) from None


class SampleRecord:
    """OUTPUT/samples/rank{r}.jsonl: per iteration, the keys this rank trained on per domain. A resumed run
    first drops the lines of iterations after its checkpoint (their work was lost), so the files always
    describe the state the checkpoints hold."""

    def __init__(self, out: Path, rt: Runtime, start: int):
        folder = out / SAMPLES_DIR
        if rt.main:
            folder.mkdir(parents=True, exist_ok=True)
            for path in folder.glob("rank*.jsonl"):
                trim_records(path, start)
        if dist.is_initialized():
            dist.barrier()
        self.rank, self.world = rt.rank, rt.world
        self.file = open(folder / f"rank{rt.rank}.jsonl", "a", encoding="utf-8")
        self.keys: dict[str, list[str]] = {}

    def add(self, name: str, keys: list[str]) -> None:
        self.keys.setdefault(name, []).extend(keys)

    def write(self, iteration: int) -> None:
        self.file.write(json.dumps({"iteration": iteration, "rank": self.rank, "world_size": self.world, **self.keys}) + "\n")
        self.file.flush()
        self.keys = {}

    def close(self) -> None:
        self.file.close()


def trim_records(path: Path, start: int) -> None:
    """Drop the JSON lines of `path` whose iteration is past `start` (all of them at 0); a line cut by a kill
    is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if 0 < json.loads(line)["iteration"] <= start:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, "".join(f"{line}\n" for line in kept))
