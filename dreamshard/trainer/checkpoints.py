"""Training checkpoints: `checkpoints/iter_N/` holds model.safetensors (student), one safetensors file per
method state (e.g. teacher), optimizer.pt (optimiser, scheduler, grad scaler: plain tensors, loaded with
weights_only=True) and state.json. `checkpoints/best/` holds the student weights of the best evaluation so
far (by mIoU) and its metrics in state.json: what `dreamshard eval --checkpoint` takes, not a resume point.
A checkpoint is built under a temporary name and renamed into place, so one that exists is complete."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dreamshard.config import TrainConfig
from dreamshard.errors import RunFailure, UserError, one_line
from dreamshard.format.layout import LEASE, PARTIAL
from dreamshard.format.store import atomic_path, atomic_write_json, numbered_dirs
from dreamshard.identity import changes, describe, flatten
from dreamshard.trainer.methods import unwrap
from dreamshard.trainer.model import Segmenter

STATE = "state.json"
BEST = "best"
BEST_METRICS = ("mIoU", "mIoU16", "mIoU13", "mAcc", "aAcc")
log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything a checkpoint saves and a resume restores."""

    model: Segmenter  # the student, unwrapped
    method: Any  # methods.Method: its own state dicts (teacher)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0
    # Where the data streams are (trainer/streams.py): samples of each domain consumed by all ranks together,
    # the global batch, and per domain its epoch size and catalogue digest. Empty before the first save.
    data: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(folder: Path, state: TrainState, config: TrainConfig) -> Path:
    """Write `iter_N/` atomically, keep the newest `keep_checkpoints`; returns its path. A write that fails
    (a full disk) leaves the checkpoints before it as they were and is one RunFailure line."""
    final = folder / f"iter_{state.iteration:07d}"
    try:
        _write_checkpoint(final, state, config)
    except (OSError, SafetensorError, RuntimeError) as exc:
        full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or disk_full(folder)
        what = "no space left on the device" if full else one_line(exc, limit=160)
        raise RunFailure(
            f"cannot write checkpoint {final} ({what}); {'free space' if full else 'fix the output folder'}, then re-run the same command: "
            "it resumes from the newest complete checkpoint"
        ) from None
    for old in list_checkpoints(folder)[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def disk_full(folder: Path) -> bool:
    """Whether the filesystem of `folder` is (nearly) out of space: how a write error that does not say so
    (safetensors reports a short write) is recognised."""
    try:
        return shutil.disk_usage(folder if folder.exists() else folder.parent).free < 16 * 2**20
    except OSError:
        return False


def _write_checkpoint(final: Path, state: TrainState, config: TrainConfig) -> None:
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(_contiguous(state.model.state_dict()), tmp / "model.safetensors")
        for name, tensors in state.method.state_dicts().items():
            save_file(_contiguous(tensors), tmp / f"{name}.safetensors")
        extra = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict()}
        torch.save(extra, tmp / "optimizer.pt")
        info = {"iteration": state.iteration, "num_classes": config.model.num_classes, "backbone": config.model.backbone, "method": config.method}
        info["data"] = state.data
        (tmp / STATE).write_text(json.dumps(info, indent=2) + "\n")


def save_best(folder: Path, model: torch.nn.Module, iteration: int, metrics: dict, config: TrainConfig) -> Path:
    """Replace `best/` with these weights and metrics (written complete under a temporary name first)."""
    final = folder / BEST
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(_contiguous(unwrap(model).state_dict()), tmp / "model.safetensors")
        info = {"iteration": iteration, **{key: metrics[key] for key in BEST_METRICS if key in metrics}}
        info |= {"num_classes": config.model.num_classes, "backbone": config.model.backbone, "method": config.method}
        (tmp / STATE).write_text(json.dumps(info, indent=2) + "\n")
    return final


def read_best(folder: Path) -> dict | None:
    """The best evaluation's record ({"iteration", "mIoU", ...}), or None when there is none (or unreadable)."""
    try:
        info = json.loads((folder / BEST / STATE).read_text())
        return info if isinstance(info.get("mIoU"), float) and isinstance(info.get("iteration"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return numbered_dirs(folder, "iter_", lambda path: (path / STATE).is_file())


def latest_checkpoint(folder: Path) -> Path | None:
    complete = list_checkpoints(folder)
    return complete[-1] if complete else None


def load_checkpoint(path: Path, state: TrainState, num_classes: int) -> None:
    """Restore `state` from a checkpoint (its iteration included); any file that does not fit is one line
    naming it and the way out (`--restart`)."""
    restart = "start over with `dreamshard train CONFIG --restart` (moves the old output aside) or set output.path to a new directory"
    try:
        info = json.loads((path / STATE).read_text())
        iteration, classes = int(info["iteration"]), int(info["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {path / STATE} is unreadable ({one_line(exc)}); delete {path} to resume from the one before, or {restart}") from None
    if classes != num_classes:
        raise UserError(f"checkpoint {path} has {classes} classes but model.num_classes is {num_classes}; {restart}")
    load_weights(state.model, read_weights(path / "model.safetensors", num_classes, restart), path, restart)
    try:
        state.method.load_state_dicts({name: load_file(path / f"{name}.safetensors") for name in state.method.state_dicts()})
        extra = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        state.optimizer.load_state_dict(extra["optimizer"])
        state.scheduler.load_state_dict(extra["scheduler"])
        state.scaler.load_state_dict(extra["scaler"])
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: torch/safetensors raise many kinds
        raise UserError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: {one_line(exc, limit=160)}); {restart}") from None
    state.iteration = iteration
    state.data = info.get("data") if isinstance(info.get("data"), dict) else {}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path, fix: str) -> None:
    """load_state_dict, with a mismatch (another backbone, decoder or embed_dim) as one line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), one_line(exc))
        raise UserError(f"{path} was trained with another model (model.backbone / decoder / embed_dim differ: {first[:160]}); {fix}") from None


def read_weights(path: Path, num_classes: int, fix: str = "give a checkpoint directory or its model.safetensors") -> dict[str, torch.Tensor]:
    """Student weights from safetensors, checked against the configured number of classes."""
    try:
        weights = load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise UserError(f"cannot read checkpoint weights {path} ({one_line(exc)}); {fix}") from None
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


# ------------------------------------------------------------------------------------ resume check

RUN_SETTINGS = "run_settings.json"
# Settings that do not change what a run learns or reports: where and how it runs and logs. max_iters may
# grow (training continues); everything else must match for a resume.
NOT_RESULT = (
    "output.", "progress", "resume", "log_interval", "eval_interval", "checkpoint_interval", "keep_checkpoints", "device",
    "threads", "data.workers", "data.cache_dir", "eval.workers", "eval.batch_size", "max_iters", "image_interval",
    "data.pin_memory", "data.record_samples", "channels_last", "compile",
)  # fmt: skip


def result_settings(config: TrainConfig) -> dict[str, Any]:
    """Every setting that shapes the result (method, model, data paths and subsets, optimiser, schedule,
    seed, ...), flattened to dotted keys. With data.global_batch_size the per-rank data.batch_size is
    derived (from the number of ranks), so it is not a setting of its own."""
    ignored = NOT_RESULT + (("data.batch_size",) if config.data.global_batch_size else ())
    return {key: value for key, value in flatten(config.model_dump(mode="json")).items() if not key.startswith(ignored)}


def settings_changes(out: Path, config: TrainConfig) -> list[str]:
    """How `config` differs from the settings the run in `out` was trained with ([] when the same, or when
    `out` holds no run, or an unreadable record of one)."""
    try:
        stored = json.loads((out / RUN_SETTINGS).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return changes(stored, result_settings(config)) if isinstance(stored, dict) else []


def claim_output(out: Path, config: TrainConfig, restart: bool, main: bool) -> None:
    """Before anything is written: with `restart`, move an existing output aside; else refuse to resume a
    run whose result-shaping settings differ (one line naming them), or whose checkpoint is past max_iters.
    `record_settings` writes this run's settings once its state is built (a checkpoint that does not load
    must not leave the new settings behind)."""
    if restart and out.exists():
        if main:
            aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(aside)
            (aside / LEASE).unlink(missing_ok=True)  # this run's lease, moved with it: the new output gets its own
            log.warning("--restart: moved the previous output to %s", aside)
    elif config.resume:
        changed = settings_changes(out, config)
        if changed:
            raise UserError(
                f"{out} holds a run trained with other settings ({describe(changed)}); resuming needs the same "
                "settings (only max_iters may grow): pass --restart to move the old output aside and start over, or set output.path"
            )
        latest = latest_checkpoint(out / "checkpoints")
        if latest is not None and int(latest.name.removeprefix("iter_")) > config.max_iters:
            raise UserError(f"{out} already trained past max_iters={config.max_iters} ({latest.name}); raise max_iters, or pass --restart")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "checkpoints", out / "eval"):
            remove_partials(folder)


def remove_partials(folder: Path) -> None:
    """What a killed write left: checkpoints and records still under their temporary names."""
    for partial in folder.glob(f".*{PARTIAL}"):
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
        log.info("removed %s (a checkpoint write that did not finish)", partial)


def record_settings(out: Path, config: TrainConfig) -> None:
    atomic_write_json(out / RUN_SETTINGS, {"settings": result_settings(config)})
