"""Evaluation: mIoU over a labelled val set (whole-image or sliding-window inference), tables on disk, and
`dreamshard eval` on a saved checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from dreamshard.config import EvalConfig, TrainConfig
from dreamshard.datasets.labels import CLASSES, NUM_CLASSES
from dreamshard.errors import UserError
from dreamshard.format.store import atomic_write, atomic_write_json
from dreamshard.logs import console
from dreamshard.trainer.checkpoints import load_weights, read_weights
from dreamshard.trainer.data import EvalSet, ShardAccess, check_labels
from dreamshard.trainer.hrda import build_segmenter
from dreamshard.trainer.metrics import confusion_metric, format_table, summarize
from dreamshard.trainer.model import Segmenter
from dreamshard.trainer.runtime import Runtime, init_distributed, runtime, sync_buffers


def class_names(config: TrainConfig) -> list[str]:
    names = config.model.class_names
    if names:
        if len(names) != config.model.num_classes:
            raise UserError(f"model.class_names has {len(names)} names but model.num_classes is {config.model.num_classes}")
        return list(names)
    return list(CLASSES) if config.model.num_classes == NUM_CLASSES else [f"class{i}" for i in range(config.model.num_classes)]


@torch.no_grad()
def evaluate(config: TrainConfig, model: Segmenter, rt: Runtime, dataset: EvalSet | None = None) -> dict:
    """Confusion matrix over the whole val set (each rank a slice, summed across ranks) → metrics summary."""
    sync_buffers(model, rt)
    if dataset is None:
        assert config.data.val is not None  # callers evaluate only with a val set
        dataset = EvalSet(config.data.val, ShardAccess.of(config.data))
    loader = dataset.loader(rt.rank, rt.world, config.eval.batch_size, config.eval.workers, pin_memory=rt.device.type == "cuda")
    metric = confusion_metric(config.model.num_classes).to(rt.device)
    was_training = model.training
    model.eval()
    for images, labels in loader:
        check_labels(labels, config.model.num_classes, "val data")
        images = images.to(rt.device, non_blocking=True).float().div_(255)
        with rt.autocast():
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


def evaluate_and_save(config: TrainConfig, model: Segmenter, rt: Runtime, out: Path, iteration: int, dataset: EvalSet | None = None) -> dict:
    summary = evaluate(config, model, rt, dataset)
    if rt.main:
        folder = out / "eval"
        table = format_table(summary)
        atomic_write(folder / f"iter_{iteration:07d}.txt", table + "\n")
        atomic_write_json(folder / f"iter_{iteration:07d}.json", summary)
        console.print(f"evaluation at iteration {iteration}:\n{table}", highlight=False, markup=False)
    return summary


def evaluate_checkpoint(config: TrainConfig, checkpoint: Path) -> dict:
    """`dreamshard eval`: load a checkpoint's student weights and evaluate on `data.val`; the metrics on rank 0,
    {} on the other ranks."""
    if config.data.val is None:
        raise UserError("eval needs data.val (a labelled evaluation set) in the config")
    created_group = init_distributed()
    try:
        rt = runtime(config)
        model = build_segmenter(config.model, load_pretrained=False).to(rt.device)  # the checkpoint holds every weight
        weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
        fix = "evaluate with the config the checkpoint was trained with (its config.yaml)"
        load_weights(model, read_weights(weights, config.model.num_classes), weights, fix)
        summary = evaluate(config, model, rt)
        return summary if rt.main else {}  # rank 0 answers (the metrics are summed over every rank)
    finally:
        if created_group:
            dist.destroy_process_group()
