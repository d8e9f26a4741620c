"""Training checkpoints: `checkpoints/iter_N/` holds model.safetensors (student), one safetensors file per
method state (e.g. teacher), optimizer.pt (optimiser, scheduler, grad scaler: plain tensors, loaded with
weights_only=True) and state.json. A checkpoint is built under a temporary name and renamed into place, so
one that exists is complete."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dreamshard.config import TrainConfig
from dreamshard.errors import UserError, one_line
from dreamshard.format.store import atomic_path
from dreamshard.trainer.methods import unwrap
from dreamshard.trainer.model import Segmenter

STATE = "state.json"


@dataclass
class TrainState:
    """Everything a checkpoint saves and a resume restores."""

    model: Segmenter  # the student, unwrapped
    method: Any  # methods.Method: its own state dicts (teacher)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0


def save_checkpoint(folder: Path, state: TrainState, config: TrainConfig) -> Path:
    """Write `iter_N/` atomically, keep the newest `keep_checkpoints`; returns its path."""
    final = folder / f"iter_{state.iteration:07d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(_contiguous(state.model.state_dict()), tmp / "model.safetensors")
        for name, tensors in state.method.state_dicts().items():
            save_file(_contiguous(tensors), tmp / f"{name}.safetensors")
        extra = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict()}
        torch.save(extra, tmp / "optimizer.pt")
        info = {"iteration": state.iteration, "num_classes": config.model.num_classes, "backbone": config.model.backbone, "method": config.method}
        (tmp / STATE).write_text(json.dumps(info, indent=2) + "\n")
    for old in list_checkpoints(folder)[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p for p in folder.glob("iter_*") if (p / STATE).is_file())


def latest_checkpoint(folder: Path) -> Path | None:
    complete = list_checkpoints(folder)
    return complete[-1] if complete else None


def load_checkpoint(path: Path, state: TrainState, num_classes: int) -> None:
    """Restore `state` from a checkpoint (its iteration included)."""
    info = json.loads((path / STATE).read_text())
    if info["num_classes"] != num_classes:
        raise UserError(
            f"checkpoint {path} has {info['num_classes']} classes but model.num_classes is {num_classes}; use a new output directory or set resume: false"
        )
    state.model.load_state_dict(read_weights(path / "model.safetensors", num_classes))
    state.method.load_state_dicts({name: load_file(path / f"{name}.safetensors") for name in state.method.state_dicts()})
    extra = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    state.optimizer.load_state_dict(extra["optimizer"])
    state.scheduler.load_state_dict(extra["scheduler"])
    state.scaler.load_state_dict(extra["scaler"])
    state.iteration = int(info["iteration"])


def read_weights(path: Path, num_classes: int) -> dict[str, torch.Tensor]:
    """Student weights from safetensors, checked against the configured number of classes."""
    try:
        weights = load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise UserError(f"cannot read checkpoint weights {path} ({one_line(exc)}); give a checkpoint directory or its model.safetensors") from None
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
