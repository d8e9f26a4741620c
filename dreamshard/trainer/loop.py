"""The training loop: `train(config) -> summary`, iteration-based, single process or DDP.

Output directory:
    config.yaml            the resolved config
    metrics.jsonl          one line per log interval and per evaluation (rank 0)
    tb/                    TensorBoard events
    checkpoints/iter_N/    see checkpoints.py
    checkpoints/best/      the student weights of the best evaluation (by mIoU) and its metrics
    eval/iter_N.txt|json   per-class IoU tables
    summary.json           final metrics (what `train` returns): the last evaluation's at the top level, and
                           `last` / `best` with their iterations (DATUM reports the best of its evaluations)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dreamshard.config import OptimConfig, TrainConfig, dump_config
from dreamshard.errors import DeferredInterrupts, Interrupted
from dreamshard.format.lease import lease_for
from dreamshard.format.store import Store, atomic_write, atomic_write_json
from dreamshard.logs import StageProgress
from dreamshard.trainer.backbones import require_weights
from dreamshard.trainer.checkpoints import (
    BEST,
    BEST_METRICS,
    TrainState,
    claim_output,
    latest_checkpoint,
    load_checkpoint,
    read_best,
    record_settings,
    save_best,
    save_checkpoint,
    weights_digest,
)
from dreamshard.trainer.data import EvalSet, ShardAccess
from dreamshard.trainer.evaluation import evaluate_and_save
from dreamshard.trainer.hrda import build_segmenter
from dreamshard.trainer.methods import Gradients, build_method
from dreamshard.trainer.model import head_parameter_groups
from dreamshard.trainer.pictures import write_pictures
from dreamshard.trainer.runtime import Runtime, gather, init_distributed, runtime, sync_buffers
from dreamshard.trainer.streams import BatchSizes, DataStreams, batch_sizes, iteration_seed, trim_records

log = logging.getLogger(__name__)


EVAL_METRICS = ("mIoU", "mIoU16", "mIoU13", "mAcc", "aAcc")
SUMMARY = "summary.json"


@dataclass
class TrainSummary:
    """What `train` returns and writes to OUTPUT/summary.json: the last evaluation's metrics at the top level
    (fractions in [0, 1]; None without data.val), `last` and `best` with their iterations, and speed."""

    method: str
    iterations: int
    resumed_from: int
    world_size: int
    mIoU: float | None = None  # the metrics keep their own names, as in every table
    mIoU16: float | None = None
    mIoU13: float | None = None
    mAcc: float | None = None
    aAcc: float | None = None
    pixels: int | None = None
    per_class_iou: dict[str, float | None] = field(default_factory=dict)
    last: dict | None = None
    best: dict | None = None  # iteration, metrics, checkpoint (checkpoints/best)
    wall_s: float = 0.0
    train_s: float = 0.0
    images_per_s: float | None = None  # None: nothing was trained (resumed at max_iters)
    it_per_s: float | None = None
    skipped_shards: int = 0  # distinct shards the data streams skipped (unreadable) or found cut short, over all ranks
    skipped_samples: int = 0  # sample positions filled with another sample of the block (unreadable, undecodable, no label)
    batch: dict = field(default_factory=dict)  # samples per domain: global (per iteration), per_rank (per micro-step), world_size, grad_accum
    data_position: dict = field(default_factory=dict)  # where the streams stopped: samples_seen, and per domain epoch and in_epoch
    weights_sha256: str = ""
    output: str = ""
    ranks: list[dict] = field(default_factory=list)  # per rank: steps and weights digest (equal under DDP)


def train(config: TrainConfig, restart: bool = False) -> TrainSummary:
    """Train, evaluate on `data.val`, and return the summary (mIoU, per-class IoU, wall time, images/s).
    An existing output resumes only with the same result-shaping settings; `restart` moves it aside first."""
    started = time.time()
    require_weights(config.model)  # before anything is read or written
    created_group = init_distributed()
    rt = runtime(config)
    out = Path(config.output.path)
    try:
        val_set = EvalSet(config.data.val, ShardAccess.of(config.data)) if config.data.val else None  # a bad path fails now, not at the end
        with lease_for(Store(out), "train", rt.main) as lease:  # one writer per output: rank 0 holds it
            return _train(config, rt, out, restart, val_set, lease.renew, started)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, rt: Runtime, out: Path, restart: bool, val_set, renew_lease: Callable[..., None], started: float) -> TrainSummary:
    claim_output(out, config, restart, rt.main)
    renew_lease(now=True)  # --restart moved the old output (and the lease in it) aside: hold the new one at once
    if dist.is_initialized():
        dist.barrier()
    state, student = build_state(config, rt, out)
    sizes = batch_sizes(config.data, config.optim.grad_accum, rt.world)
    streams = DataStreams(config, rt, state, sizes, out)  # refuses data that changed under the checkpoint
    if rt.main:  # only once the checkpoint (if any) has loaded: a refused resume leaves the old run's record
        atomic_write(out / "config.yaml", dump_config(config))
        record_settings(out, config)
        trim_records(out / "metrics.jsonl", state.iteration)  # lines past the checkpoint describe lost work
    start = state.iteration
    best = BestEvaluation(out / "checkpoints", rt, config, start)
    logger = MetricsLog(out, rt)
    train_started = time.time()
    try:
        meter = run_iterations(config, rt, state, student, streams, logger, out, val_set, best, renew_lease)
    finally:
        streams.close()
    train_seconds = time.time() - train_started
    sync_buffers(state.model, rt)
    if start < config.max_iters and rt.main:
        save_checkpoint(out / "checkpoints", state, config)
    last_eval = None
    if config.data.val:
        last_eval = evaluate_and_save(config, state.model, rt, out, config.max_iters, val_set)
        logger.write({"iteration": config.max_iters, **_eval_record(last_eval)})
        best.update(last_eval, config.max_iters, state.model)
    speed = Speed(meter.images, config.max_iters - start, train_seconds)
    summary = summarize(config, rt, state, start, last_eval, best, speed, streams, sizes, time.time() - started)
    if summary.skipped_shards or summary.skipped_samples:
        log.warning(
            "skipped %d shard(s) and filled %d sample position(s) with other samples while training (the warnings above name them)",
            summary.skipped_shards, summary.skipped_samples,
        )  # fmt: skip
    if rt.main:
        atomic_write_json(out / SUMMARY, dataclasses.asdict(summary))
    logger.close()
    return summary


@dataclass(frozen=True)
class Speed:
    images: int  # seen by all ranks
    iterations: int  # trained by this call
    seconds: float


def summarize(
    config: TrainConfig, rt: Runtime, state: TrainState, start: int, last_eval: dict | None, best, speed: Speed, streams: DataStreams, sizes: BatchSizes,
    wall: float,
) -> TrainSummary:  # fmt: skip
    """The run's summary (every rank computes it; rank 0 writes it)."""
    evaluated = {k: last_eval[k] for k in (*EVAL_METRICS, "pixels") if k in last_eval} if last_eval else {}
    trained = speed.iterations > 0
    summary = TrainSummary(
        method=config.method,
        iterations=config.max_iters,
        resumed_from=start,
        world_size=rt.world,
        **evaluated,
        per_class_iou={name: row["iou"] for name, row in last_eval["per_class"].items()} if last_eval else {},
        last={"iteration": config.max_iters, **{k: last_eval[k] for k in BEST_METRICS if k in last_eval}} if last_eval else None,
        best=best.record,
        wall_s=wall,
        train_s=speed.seconds,
        images_per_s=speed.images / speed.seconds if trained else None,
        it_per_s=speed.iterations / speed.seconds if trained else None,
        weights_sha256=weights_digest(state.model),
        output=str(config.output.path),
        batch=sizes.record(),
        data_position=state.data,
    )
    # Every rank's own step count and weights (equal when DDP kept the ranks in step) and what its streams skipped.
    problems, substituted = streams.skipped()
    ranks = gather({"steps": speed.iterations, "weights_sha256": summary.weights_sha256, "skipped": problems, "substituted": substituted}, rt)
    summary.skipped_shards = len({url for rank in ranks for url in rank.pop("skipped")})
    summary.skipped_samples = sum(rank.pop("substituted") for rank in ranks)
    summary.ranks = ranks
    return summary


def build_state(config: TrainConfig, rt: Runtime, out: Path) -> tuple[TrainState, torch.nn.Module]:
    """Model, method, optimiser, schedule and scaler, resumed from the newest checkpoint when there is one;
    and the student as the loop calls it (DDP-wrapped on several ranks, compiled with train.compile)."""
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = build_segmenter(config.model).to(rt.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    student: torch.nn.Module = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.world > 1 else model
    if config.compile:
        student = torch.compile(student)
    optim = config.optim
    groups = head_parameter_groups(model, optim.lr, optim.head_lr_mult, optim.weight_decay)
    optimizer = torch.optim.SGD(groups, momentum=optim.momentum) if optim.optimizer == "sgd" else torch.optim.AdamW(groups, betas=optim.betas)
    state = TrainState(
        model=model,
        method=build_method(config, student, rt.device),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, config.max_iters)),
        scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16),
    )
    checkpoint = latest_checkpoint(out / "checkpoints") if config.resume else None
    if checkpoint is not None:
        load_checkpoint(checkpoint, state, config.model.num_classes)
        log.info("resumed from %s (iteration %d)", checkpoint, state.iteration)
    return state, student


class Meter:
    """Images seen, and the losses summed on the device over a log interval (read once per interval: the
    iterations in between never wait on the host)."""

    def __init__(self) -> None:
        self.images = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, logs: dict[str, torch.Tensor], weight: float) -> None:
        for key, value in logs.items():
            value = value.detach().float() * weight
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def means(self) -> dict[str, float]:
        """The interval's mean losses (one device-to-host copy), and a new interval."""
        if not self.sums:
            return {}
        values = torch.stack(list(self.sums.values())).cpu().tolist()
        means = {key: value / max(self.steps, 1) for key, value in zip(self.sums, values)}
        self.sums, self.steps = {}, 0
        return means


def run_iterations(
    config: TrainConfig, rt: Runtime, state: TrainState, student, streams: DataStreams, logger: MetricsLog, out: Path, val_set=None, best=None,
    renew_lease: Callable[..., None] = lambda now=False: None,
) -> Meter:  # fmt: skip
    """Iterations state.iteration .. max_iters: steps, logging, pictures, periodic evaluation and checkpoints."""
    start, meter = state.iteration, Meter()
    started = time.time()
    show = rt.main and config.progress
    with DeferredInterrupts() as interrupts, StageProgress(f"train {config.method}", config.max_iters, "iterations", completed=start, enabled=show) as progress:
        for iteration in range(start, config.max_iters):
            visual = rt.main and bool(config.image_interval) and (iteration + 1) % config.image_interval == 0
            train_step(config, rt, state, student, streams, meter, visual)
            done = state.iteration
            renew_lease()
            elapsed = max(time.time() - started, 1e-9)
            if done % config.log_interval == 0 or done == config.max_iters:
                lr = state.optimizer.param_groups[0]["lr"]
                logger.write({"iteration": done, "lr": lr, **meter.means(), "images_per_s": meter.images / elapsed, "substituted": streams.substituted})
            progress.update(done, f"{(done - start) / elapsed:.2f} it/s")
            if visual:
                write_pictures(out, done, state.method.visuals, state.model, config.model.num_classes, logger.tb)
            periodic_work(config, rt, state, out, val_set, best, logger, done)
            if stop_requested(interrupts, rt, done, config.log_interval):
                raise stopped_at(done, state, config, out, rt, interrupts.sigterm)
    return meter


def train_step(config: TrainConfig, rt: Runtime, state: TrainState, student, streams: DataStreams, meter: Meter, visual: bool = False) -> None:
    """One iteration: grad_accum micro-steps of the method, one optimiser step, the position moved on. The
    torch seed is set per iteration and rank, so a resumed run repeats the uninterrupted one's draws."""
    torch.manual_seed(iteration_seed(config.seed, state.iteration, rt.rank))
    state.method.begin_iteration(state.iteration)
    state.optimizer.zero_grad(set_to_none=True)
    accum = config.optim.grad_accum
    for micro in range(accum):
        batch = streams.next_batch()
        grads = Gradients(student, state.scaler.scale, accum, last_micro=micro == accum - 1)
        with rt.autocast():
            logs = state.method.step(batch, grads, visual=visual and micro == 0)
        meter.add(logs, 1 / accum)
    meter.steps += 1
    meter.images += streams.sizes.global_batch * len(streams.samples)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.iteration += 1
    streams.advance(state)


def periodic_work(config: TrainConfig, rt: Runtime, state: TrainState, out: Path, val_set, best, logger: MetricsLog, done: int) -> None:
    """Evaluation and checkpoints at their intervals (the last iteration's are the caller's)."""
    if config.eval_interval and done % config.eval_interval == 0 and done < config.max_iters and config.data.val:
        evaluation = evaluate_and_save(config, state.model, rt, out, done, val_set)
        logger.write({"iteration": done, **_eval_record(evaluation)})
        if best is not None:
            best.update(evaluation, done, state.model)
    if config.checkpoint_interval and done % config.checkpoint_interval == 0 and done < config.max_iters and rt.main:
        save_checkpoint(out / "checkpoints", state, config)


def stop_requested(interrupts: DeferredInterrupts, rt: Runtime, done: int, every: int) -> bool:
    """Whether a Ctrl-C or SIGTERM arrived: at once on one process; under DDP every `every` iterations, agreed
    by all ranks (an all-reduce), so they all stop after the same iteration."""
    if rt.world == 1:
        return interrupts.received is not None
    if done % every:
        return False
    flag = torch.tensor([1 if interrupts.received is not None else 0], device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stopped_at(done: int, state: TrainState, config: TrainConfig, out: Path, rt: Runtime, sigterm: bool) -> Interrupted:
    """Save a checkpoint at the iteration just finished (rank 0), and say so."""
    if rt.main and latest_checkpoint(out / "checkpoints") != out / "checkpoints" / f"iter_{done:07d}":
        save_checkpoint(out / "checkpoints", state, config)
    return Interrupted(f"stopped after iteration {done} and wrote a checkpoint there: a re-run of the same command resumes from it", sigterm)


def lr_factor(optim: OptimConfig, max_iters: int):
    """Linear warmup from `warmup_ratio`, then poly decay to `min_lr` (mmcv's poly + linear warmup)."""

    def factor(iteration: int) -> float:
        decay = (1 - min(iteration, max_iters) / max_iters) ** optim.power
        value = (1 - optim.min_lr / optim.lr) * decay + optim.min_lr / optim.lr
        if iteration < optim.warmup_iters:
            value *= 1 - (1 - iteration / optim.warmup_iters) * (1 - optim.warmup_ratio)
        return value

    return factor


class BestEvaluation:
    """The best evaluation so far by mIoU (ties keep the earlier), its weights kept in checkpoints/best/ (rank
    0 writes them). A run resumed at iteration `start` keeps the record its earlier part left, unless that
    came from iterations after `start` (work lost with the interruption, retrained now)."""

    def __init__(self, folder: Path, rt: Runtime, config: TrainConfig, start: int):
        self.folder, self.main, self.config = folder, rt.main, config
        previous = read_best(folder)
        if previous is not None and previous["iteration"] > start:
            previous = None
        if previous is None and rt.main and (folder / BEST).exists():
            shutil.rmtree(folder / BEST)
        self.record = self._with_path(previous)

    def update(self, evaluation: dict, iteration: int, model: torch.nn.Module) -> None:
        if evaluation.get("mIoU") is None or (self.record is not None and evaluation["mIoU"] <= self.record["mIoU"]):
            return
        if self.main:
            save_best(self.folder, model, iteration, evaluation, self.config)
        self.record = self._with_path({"iteration": iteration, **{k: evaluation[k] for k in BEST_METRICS if k in evaluation}})

    def _with_path(self, record: dict | None) -> dict | None:
        keep = ("iteration", *BEST_METRICS)
        return None if record is None else {**{k: record[k] for k in keep if k in record}, "checkpoint": str(self.folder / BEST)}


# ------------------------------------------------------------------------------------------ logging


class MetricsLog:
    """metrics.jsonl, TensorBoard and the log, on rank 0 only."""

    def __init__(self, out: Path, rt: Runtime) -> None:
        self.out, self.main = out, rt.main
        self.tb = _tensorboard(out) if rt.main else None  # rank 0 only, as write() is

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if self.tb is not None and key != "iteration" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["iteration"])
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def _eval_record(summary: dict) -> dict:
    return {f"val/{k}": v for k, v in summary.items() if k in EVAL_METRICS and v is not None}


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))
