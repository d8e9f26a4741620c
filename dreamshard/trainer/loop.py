"""The training loop: `train(config) -> summary`, iteration-based, single process or DDP (torchrun /
accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK; gloo on CPU, nccl on GPU).

Output directory:
    config.yaml            the resolved config
    metrics.jsonl          one line per log interval and per evaluation (rank 0)
    tb/                    TensorBoard events
    checkpoints/iter_N/    model.safetensors (student), teacher.safetensors (dacs), optimizer.pt (optimiser,
                           scheduler, grad scaler: plain tensors, loaded with weights_only=True), state.json
                           (written last: a checkpoint without it does not exist)
    eval/iter_N.txt|json   per-class IoU tables
    summary.json           final metrics (what `train` returns)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from dreamshard.config import EvalConfig, OptimConfig, TrainConfig, dump_config
from dreamshard.errors import UserError
from dreamshard.logs import console
from dreamshard.trainer.data import EvalSet, check_labels, train_loader
from dreamshard.trainer.labels import CLASSES, NUM_CLASSES
from dreamshard.trainer.metrics import confusion_metric, format_table, summarize
from dreamshard.trainer.model import Segmenter, head_parameter_groups
from dreamshard.trainer.uda import build_method, unwrap

log = logging.getLogger(__name__)

STATE = "state.json"


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32

    @property
    def main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------- train


def train(config: TrainConfig) -> dict:
    """Train, evaluate on `data.val`, and return the summary (mIoU, per-class IoU, wall time, images/s)."""
    started = time.time()
    created_group = init_distributed()
    rt = runtime(config)
    out = Path(config.output)
    try:
        if rt.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")

        torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts them)
        model = Segmenter(config.model).to(rt.device)
        student = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.world > 1 else model
        method = build_method(config, student)
        optimizer = torch.optim.AdamW(head_parameter_groups(model, config.optim.lr, config.optim.head_lr_mult, config.optim.weight_decay), betas=config.optim.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.optim, config.max_iters))
        scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16)

        start = 0
        checkpoint = latest_checkpoint(out / "checkpoints") if config.resume else None
        if checkpoint is not None:
            start = load_checkpoint(checkpoint, model, method, optimizer, scheduler, scaler, config.model.num_classes)
            log.info("resumed from %s (iteration %d)", checkpoint, start)
        if rt.main and start == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        torch.manual_seed(config.seed * 1_000_003 + start * 1000 + rt.rank)  # augmentation draws differ per rank

        domains = training_domains(config)
        remaining = (config.max_iters - start) * config.optim.grad_accum
        data_seed = config.seed * 1_000_003 + start  # a resumed run draws new data, not a replay
        loaders = {
            name: train_loader(name, getattr(config.data, name), config.data, labelled, data_seed, remaining, config.uda.rcs if name == "source" else None, Path(config.data.cache_dir) / "rcs")
            for name, labelled in domains.items()
        }
        iterators = {name: iter(loader) for name, loader in loaders.items()}
        skipped: dict[tuple[str, int], int] = {}

        tb = _tensorboard(out) if rt.main else None
        progress = _progress(rt.main and config.progress)
        task = progress.add_task(config.method, total=config.max_iters, completed=start, info="")
        train_started, images, last_eval = time.time(), 0, None
        with progress:
            for iteration in range(start, config.max_iters):
                method.begin_iteration(iteration)
                optimizer.zero_grad(set_to_none=True)
                logs: dict[str, float] = {}
                for micro in range(config.optim.grad_accum):
                    batch = next_batch(iterators, rt.device, config.model.num_classes, skipped)
                    images += sum(t.shape[0] for k, t in batch.items() if k.endswith("_image")) * rt.world
                    last_micro = micro == config.optim.grad_accum - 1
                    sync = contextlib.nullcontext() if last_micro or rt.world == 1 else student.no_sync()
                    with sync, torch.autocast(rt.device.type, dtype=rt.autocast_dtype or torch.float32, enabled=rt.autocast_dtype is not None):
                        step_logs = method.step(batch, lambda loss: scaler.scale(loss / config.optim.grad_accum).backward())
                    for key, value in step_logs.items():
                        logs[key] = logs.get(key, 0.0) + value / config.optim.grad_accum
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()

                done = iteration + 1
                if done % config.log_interval == 0 or done == config.max_iters:
                    elapsed = time.time() - train_started
                    record = {"iteration": done, "lr": optimizer.param_groups[0]["lr"], **logs, "images_per_s": images / max(elapsed, 1e-9), "skipped": sum(skipped.values())}
                    _log(out, tb, rt, record)
                speed = (done - start) / max(time.time() - train_started, 1e-9)
                progress.update(task, completed=done, info=f"{speed:.2f} it/s " + " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in logs.items()))
                if config.eval_interval and done % config.eval_interval == 0 and done < config.max_iters and config.data.val:
                    _log(out, tb, rt, {"iteration": done, **_eval_record(evaluate_and_save(config, model, rt, out, done))})
                if config.checkpoint_interval and done % config.checkpoint_interval == 0 and done < config.max_iters:
                    save_checkpoint(out / "checkpoints", done, model, method, optimizer, scheduler, scaler, config, rt)
        train_seconds = time.time() - train_started
        sync_buffers(model, rt)
        if start < config.max_iters:
            save_checkpoint(out / "checkpoints", config.max_iters, model, method, optimizer, scheduler, scaler, config, rt)
        if config.data.val:
            last_eval = evaluate_and_save(config, model, rt, out, config.max_iters)
            _log(out, tb, rt, {"iteration": config.max_iters, **_eval_record(last_eval)})
        if sum(skipped.values()):
            log.warning("skipped %d corrupt shard(s)/sample(s) while training", sum(skipped.values()))
        summary = {
            "method": config.method,
            "iterations": config.max_iters,
            "resumed_from": start,
            "world_size": rt.world,
            **({k: v for k, v in last_eval.items() if k != "per_class"} if last_eval else {"mIoU": None}),
            "per_class_iou": {name: row["iou"] for name, row in last_eval["per_class"].items()} if last_eval else {},
            "wall_s": time.time() - started,
            "train_s": train_seconds,
            "images_per_s": images / train_seconds if start < config.max_iters else None,
            "it_per_s": (config.max_iters - start) / train_seconds if start < config.max_iters else None,
            "skipped": sum(skipped.values()),
            "weights_sha256": weights_digest(model),
            "output": str(out),
        }
        # Every rank's own step count and weights: equal when DDP kept the ranks in step.
        summary["ranks"] = gather({"steps": config.max_iters - start, "weights_sha256": summary["weights_sha256"]}, rt)
        if rt.main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if tb:
            tb.close()
        return summary
    finally:
        if created_group:
            dist.destroy_process_group()


def training_domains(config: TrainConfig) -> dict[str, bool]:
    """Which data streams the method reads, and whether each must carry labels."""
    if config.method == "dacs":
        return {"source": True, "target": False}
    if config.method == "supervised_synthetic":
        return {"source": True, "target": True} if config.data.source else {"target": True}
    return {"source": True}


def next_batch(iterators: dict, device: torch.device, num_classes: int, skipped: dict) -> dict[str, torch.Tensor]:
    """One batch per domain, on device: `{domain}_image` float [0, 1], `{domain}_label` long."""
    batch = {}
    for name, iterator in iterators.items():
        try:
            raw = next(iterator)
        except StopIteration:
            raise UserError(f"the {name} data stream ended early: no readable samples (all shards or samples corrupt or filtered out?)") from None
        skipped[(name, raw["worker"])] = raw["skipped"]
        batch[f"{name}_image"] = raw["image"].to(device, non_blocking=True).float().div_(255)
        if "label" in raw:
            check_labels(raw["label"], num_classes, f"{name} data")
            batch[f"{name}_label"] = raw["label"].to(device, non_blocking=True).long()
    return batch


def lr_factor(optim: OptimConfig, max_iters: int):
    """Linear warmup from `warmup_ratio`, then poly decay to `min_lr` (mmcv's poly + linear warmup)."""

    def factor(iteration: int) -> float:
        decay = (1 - min(iteration, max_iters) / max_iters) ** optim.power
        value = (1 - optim.min_lr / optim.lr) * decay + optim.min_lr / optim.lr
        if iteration < optim.warmup_iters:
            value *= 1 - (1 - iteration / optim.warmup_iters) * (1 - optim.warmup_ratio)
        return value

    return factor


# ---------------------------------------------------------------------------------------- runtime


def init_distributed() -> bool:
    """Join the process group described by the environment (torchrun / accelerate launch); True if we made it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def runtime(config: TrainConfig) -> Runtime:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if config.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a cuda device; use fp32 or bf16 on cpu")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(rank, world, device, dtype)


def gather(value, rt: Runtime) -> list:
    if rt.world == 1:
        return [value]
    values = [None] * rt.world
    dist.all_gather_object(values, value)
    return values


# ------------------------------------------------------------------------------------------- eval


def class_names(config: TrainConfig) -> list[str]:
    names = config.model.class_names
    if names:
        if len(names) != config.model.num_classes:
            raise UserError(f"model.class_names has {len(names)} names but model.num_classes is {config.model.num_classes}")
        return list(names)
    return list(CLASSES) if config.model.num_classes == NUM_CLASSES else [f"class{i}" for i in range(config.model.num_classes)]


def sync_buffers(model: torch.nn.Module, rt: Runtime) -> None:
    """BN running statistics are updated per rank by the last forward; take rank 0's, as DDP does at each forward."""
    if rt.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


@torch.no_grad()
def evaluate(config: TrainConfig, model: Segmenter, rt: Runtime) -> dict:
    """Confusion matrix over the whole val set (each rank a slice, summed across ranks) → metrics summary."""
    sync_buffers(model, rt)
    dataset = EvalSet(config.data.val)
    part = Subset(dataset, range(rt.rank, len(dataset), rt.world))
    loader = DataLoader(part, batch_size=config.eval.batch_size, num_workers=config.eval.workers)
    metric = confusion_metric(config.model.num_classes).to(rt.device)
    was_training = model.training
    model.eval()
    for images, labels in loader:
        check_labels(labels, config.model.num_classes, "val data")
        images = images.to(rt.device).float().div_(255)
        with torch.autocast(rt.device.type, dtype=rt.autocast_dtype or torch.float32, enabled=rt.autocast_dtype is not None):
            logits = infer(model, images, labels.shape[-2:], config.eval)
        metric.update(logits.argmax(1), labels.to(rt.device).long())
    model.train(was_training)
    return summarize(metric.compute().cpu(), class_names(config))


def infer(model: Segmenter, images: torch.Tensor, size: torch.Size, cfg: EvalConfig) -> torch.Tensor:
    """Logits at label size: whole-image inference, or overlapping sliding windows averaged."""
    if cfg.mode == "whole":
        logits = model(images)
    else:
        logits = slide(model, images, cfg.crop_size, cfg.stride)
    return torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def slide(model: Segmenter, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    (h, w), (ch, cw), (sh, sw) = images.shape[-2:], crop, stride
    ch, cw = min(ch, h), min(cw, w)
    total = images.new_zeros((images.shape[0], model.num_classes, h, w))
    count = images.new_zeros((1, 1, h, w))
    for row in range(math.ceil(max(h - ch, 0) / sh) + 1):
        for col in range(math.ceil(max(w - cw, 0) / sw) + 1):
            y1, x1 = min(row * sh, h - ch), min(col * sw, w - cw)
            window = images[..., y1 : y1 + ch, x1 : x1 + cw]
            logits = torch.nn.functional.interpolate(model(window).float(), size=(ch, cw), mode="bilinear", align_corners=False)
            total[..., y1 : y1 + ch, x1 : x1 + cw] += logits
            count[..., y1 : y1 + ch, x1 : x1 + cw] += 1
    return total / count


def evaluate_and_save(config: TrainConfig, model: Segmenter, rt: Runtime, out: Path, iteration: int) -> dict:
    summary = evaluate(config, model, rt)
    if rt.main:
        folder = out / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        table = format_table(summary)
        (folder / f"iter_{iteration:07d}.txt").write_text(table + "\n")
        (folder / f"iter_{iteration:07d}.json").write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"evaluation at iteration {iteration}:\n{table}", highlight=False)
    return summary


def evaluate_checkpoint(config: TrainConfig, checkpoint: Path) -> dict:
    """`dreamshard eval`: load a checkpoint's student weights and evaluate on `data.val`."""
    if config.data.val is None:
        raise UserError("eval needs data.val (a labelled evaluation set) in the config")
    created_group = init_distributed()
    try:
        rt = runtime(config)
        model = Segmenter(config.model).to(rt.device)
        weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
        model.load_state_dict(read_weights(weights, config.model.num_classes))
        summary = evaluate(config, model, rt)
        if rt.main:
            console.print(format_table(summary), highlight=False)
        return summary
    finally:
        if created_group:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, iteration: int, model: Segmenter, method, optimizer, scheduler, scaler, config: TrainConfig, rt: Runtime) -> None:
    """Write `iter_N/` under a temporary name, rename it into place, keep the newest `keep_checkpoints`."""
    if not rt.main:
        return
    final = folder / f"iter_{iteration:07d}"
    tmp = folder / f".iter_{iteration:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(model.state_dict()), tmp / "model.safetensors")
    for name, state in method.state_dicts().items():
        save_file(_contiguous(state), tmp / f"{name}.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}, tmp / "optimizer.pt")
    state = {"iteration": iteration, "num_classes": config.model.num_classes, "backbone": config.model.backbone, "method": config.method}
    (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in folder.glob("iter_*") if (p / STATE).is_file())[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    complete = sorted(p for p in folder.glob("iter_*") if (p / STATE).is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model: Segmenter, method, optimizer, scheduler, scaler, num_classes: int) -> int:
    state = json.loads((path / STATE).read_text())
    if state["num_classes"] != num_classes:
        raise UserError(f"checkpoint {path} has {state['num_classes']} classes but model.num_classes is {num_classes}; use a new output directory or set resume: false")
    model.load_state_dict(read_weights(path / "model.safetensors", num_classes))
    method.load_state_dicts({name: load_file(path / f"{name}.safetensors") for name in method.state_dicts()})
    extra = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    scaler.load_state_dict(extra["scaler"])
    return int(state["iteration"])


def read_weights(path: Path, num_classes: int) -> dict[str, torch.Tensor]:
    """Student weights from safetensors, checked against the configured number of classes."""
    try:
        weights = load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise UserError(f"cannot read checkpoint weights {path} ({str(exc).splitlines()[0]}); give a checkpoint directory or its model.safetensors") from None
    classifier = weights.get("decode_head.classifier.weight")
    if classifier is not None and classifier.shape[0] != num_classes:
        raise UserError(f"checkpoint {path} predicts {classifier.shape[0]} classes but model.num_classes is {num_classes}; set model.num_classes to match")
    return weights


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names and bytes): equal on every DDP rank when training stayed in sync."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


# ------------------------------------------------------------------------------------------ logging


def _log(out: Path, tb, rt: Runtime, record: dict) -> None:
    if not rt.main:
        return
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    for key, value in record.items():
        if key != "iteration" and isinstance(value, (int, float)):
            tb.add_scalar(key, value, record["iteration"])
    log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def _eval_record(summary: dict) -> dict:
    return {f"val/{k}": v for k, v in summary.items() if k in ("mIoU", "mIoU16", "mIoU13", "mAcc", "aAcc") and v is not None}


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )
