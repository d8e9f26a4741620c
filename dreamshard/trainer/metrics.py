"""Segmentation metrics from a confusion matrix accumulated over the whole evaluation set.

The confusion matrix is torchmetrics' `MulticlassConfusionMatrix` (pixels with label 255 dropped, summed
across DDP ranks). IoU per class is TP / (TP + FP + FN); a class absent from both prediction and ground
truth has no IoU (NaN) and is left out of the means, as mmseg's `nanmean` does. (torchmetrics'
`average="none"` would report 0 for it and pull the mean down.)

Every rate is in percent (0-100), as the papers' tables are: mIoU 48.22, not 0.4822 — in the summaries, the
eval JSON, metrics.jsonl, TensorBoard, the checkpoints' state and the study's tables alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from dreamshard.datasets.labels import IGNORE_INDEX, NUM_CLASSES, SYNTHIA13, SYNTHIA16


def confusion_metric(num_classes: int) -> MulticlassConfusionMatrix:
    """Rows: ground truth, columns: prediction. Inputs are trusted (argmax predictions), so no validation pass."""
    return MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=IGNORE_INDEX, validate_args=False)


def per_class_iou(confmat: torch.Tensor) -> torch.Tensor:
    """IoU per class (float64), NaN where the class is in neither prediction nor ground truth."""
    confmat = confmat.double()
    tp = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def summarize(confmat: torch.Tensor, class_names: Sequence[str]) -> dict:
    """mIoU over all classes (and over the SYNTHIA 16/13 subsets for the 19 Cityscapes classes), pixel accuracy,
    per-class IoU and accuracy as plain floats in percent (NaN → None, so the dict is valid JSON)."""
    iou = 100 * per_class_iou(confmat)
    confmat = confmat.double()
    gt_pixels = confmat.sum(1)
    acc = torch.where(gt_pixels > 0, 100 * confmat.diagonal() / gt_pixels.clamp(min=1), torch.full_like(gt_pixels, float("nan")))
    total = confmat.sum()
    summary: dict[str, Any] = {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(100 * confmat.diagonal().sum() / total) if total > 0 else None,
        "pixels": int(total),
    }
    if len(class_names) == NUM_CLASSES:
        summary["mIoU16"] = _nanmean(iou[list(SYNTHIA16)])
        summary["mIoU13"] = _nanmean(iou[list(SYNTHIA13)])
    summary["per_class"] = {name: {"iou": _value(i), "acc": _value(a)} for name, i, a in zip(class_names, iou.tolist(), acc.tolist())}
    return summary


def format_table(summary: dict) -> str:
    """A fixed-width per-class table (IoU and accuracy in %) followed by the summary lines."""
    width = max(len(name) for name in summary["per_class"]) + 2
    lines = [f"{'class':<{width}}{'IoU':>8}{'Acc':>8}"]
    for name, row in summary["per_class"].items():
        lines.append(f"{name:<{width}}{_pct(row['iou']):>8}{_pct(row['acc']):>8}")
    lines.append("-" * (width + 16))
    for key in ("mIoU", "mIoU16", "mIoU13", "mAcc", "aAcc"):
        if key in summary:
            lines.append(f"{key:<{width}}{_pct(summary[key]):>8}")
    return "\n".join(lines)


def _nanmean(values: torch.Tensor) -> float | None:
    present = values[~values.isnan()]
    return float(present.mean()) if present.numel() else None


def _value(x: float) -> float | None:
    return None if x != x else float(x)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
