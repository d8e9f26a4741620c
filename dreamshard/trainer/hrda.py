"""HRDA: multi-resolution training and inference (Hoyer et al., "HRDA: Context-Aware High-Resolution Domain-
Adaptive Semantic Segmentation", ECCV 2022), after lhoyer/MIC `seg/mmseg/models/segmentors/
hrda_encoder_decoder.py` and `decode_heads/hrda_head.py`.

Training on a crop (say 1024x1024):
- context: the whole crop bilinearly resized by `lr_scale` (0.5), no antialiasing → backbone → head (logits
  at stride 4 of the context, 8 of the crop) and → the scale attention head (sigmoid; per class or one map);
- detail: a `hr_crop_size` (512) window of the crop at full resolution, its corner drawn on a grid of
  `crop_divisible` (8) pixels, one window per forward shared by the batch → the same backbone and head;
- fusion at the detail's stride: the attention is zeroed outside the window (before upsampling), the
  context logits weighted by (1 - attention); both upsampled x 1 / lr_scale; the detail logits inserted at
  the window; fused = up(att) · detail + up((1 - att) · context). Outside the window the fused logits are the
  context's.
- losses: (1 - hr_w) · CE(fused, label) + hr_w · CE(detail, label in the window), hr_w = 0.1 (HRDA's
  lr_loss_weight, 0 in its configs, is not implemented).
Inference (teacher pseudo-labels, evaluation, pictures): the context over the whole input; the detail in
sliding windows of `hr_crop_size` (stride half of it with `hr_slide_overlapping`), all windows through the
backbone and head in one batch, their logits averaged where they overlap; the attention unmasked.

The feature distance uses the context's features (HRDA's feature_scale 0.5), and the frozen ImageNet
backbone sees the same downscaled input (`context_input`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dreamshard.config import HRDAConfig, TrainModelConfig
from dreamshard.errors import UserError
from dreamshard.trainer.model import DecodeHead, Segmenter, build_head


class HRDASegmenter(Segmenter):
    """A Segmenter (backbone + head) with HRDA's scale attention; `forward(images)` is multi-resolution
    inference, `forward(images, hr_crop=True)` the training forward (see the module docstring)."""

    def __init__(self, config: TrainModelConfig, load_pretrained: bool = True):
        super().__init__(config, load_pretrained)
        self.hrda: HRDAConfig = config.hrda
        check_grid(config)
        outputs = config.num_classes if self.hrda.attention_classwise else 1
        # HRDA's attention head: a DAFormer-style head whose fusion is one 1x1 conv + BN + ReLU (sigmoid applied
        # in `attention`); none with a fixed attention (an ablation), whose parameters would get no gradient.
        self.scale_attention = None
        if self.hrda.fixed_attention is None:
            self.scale_attention = DecodeHead(self.feature_channels, self.hrda.attention_embed_dim, outputs, config.dropout, "segformer")
            if config.head_init == "daformer":
                self.scale_attention.init_like_mmseg()

    # ------------------------------------------------------------------------------------ inputs

    def context_input(self, images: torch.Tensor) -> torch.Tensor:
        """The context view: the images at lr_scale (bilinear, no antialiasing, as HRDA's resize)."""
        return F.interpolate(images, scale_factor=self.hrda.lr_scale, mode="bilinear", align_corners=False)

    def draw_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of a detail crop in full-resolution pixels, corners on the grid."""
        ch, cw = min(self.hrda.hr_crop_size[0], height), min(self.hrda.hr_crop_size[1], width)
        step = self.hrda.crop_divisible
        # HRDA's get_crop_bbox: offset = randint(0, (margin + 1) // step) * step (the last `step` pixels of the
        # margin are never a corner). Drawn from torch's generator, seeded per iteration.
        top = int(torch.randint(0, max((height - ch + 1) // step, 1), ()).item()) * step
        left = int(torch.randint(0, max((width - cw + 1) // step, 1), ()).item()) * step
        return top, top + ch, left, left + cw

    # ------------------------------------------------------------------------------------ forward

    def attention(self, context_features: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        if self.scale_attention is None:
            return torch.full_like(context[:, :1], float(self.hrda.fixed_attention or 0.0))
        return torch.sigmoid(self.scale_attention(context_features))

    def forward(self, images: torch.Tensor, with_features: bool = False, hr_crop: bool = False):
        if hr_crop:
            return self.forward_train(images, with_features)
        logits = self.infer(images)
        return (logits, self.features(self.context_input(images))) if with_features else logits

    def forward_train(self, images: torch.Tensor, with_features: bool = False):
        """(fused logits at the detail's stride over the whole crop, detail logits, box, context features or
        None)."""
        context_features = self.features(self.context_input(images))
        context = self.decode_head(context_features)
        attention = self.attention(context_features, context)
        box = self.draw_box(*images.shape[-2:])
        top, bottom, left, right = box
        detail = self.decode_head(self.features(images[..., top:bottom, left:right]))
        fused = self.fuse(context, attention, detail, box, images.shape[-2:])
        return fused, detail, torch.tensor(box), (context_features if with_features else None)

    def fuse(self, context: torch.Tensor, attention: torch.Tensor, detail: torch.Tensor, box, size) -> torch.Tensor:
        """fused = up(att_in_box) · detail_inserted + up((1 - att_in_box) · context), at the detail's stride."""
        top, bottom, left, right = box
        context_stride = size[0] // context.shape[-2]
        detail_stride = (bottom - top) // detail.shape[-2]
        mask = torch.zeros_like(attention[:, :1])
        mask[..., top // context_stride : bottom // context_stride, left // context_stride : right // context_stride] = 1
        attention = attention * mask
        context = (1 - attention) * context
        out = (size[0] // detail_stride, size[1] // detail_stride)
        context = F.interpolate(context, size=out, mode="bilinear", align_corners=False)
        attention = F.interpolate(attention, size=out, mode="bilinear", align_corners=False)
        inserted = torch.zeros_like(context)
        inserted[..., top // detail_stride : bottom // detail_stride, left // detail_stride : right // detail_stride] = detail
        return attention * inserted + context

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-resolution inference: context over the whole input, detail in sliding windows, fused."""
        context_features = self.features(self.context_input(images))
        context = self.decode_head(context_features)
        attention = self.attention(context_features, context)
        detail = self.slide_detail(images)
        size = detail.shape[-2:]
        context = F.interpolate((1 - attention) * context, size=size, mode="bilinear", align_corners=False)
        attention = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
        return attention * detail + context

    def slide_detail(self, images: torch.Tensor) -> torch.Tensor:
        """Detail logits over the whole input: windows of hr_crop_size, all in one batch, averaged."""
        (h, w), batch = images.shape[-2:], images.shape[0]
        ch, cw = min(self.hrda.hr_crop_size[0], h), min(self.hrda.hr_crop_size[1], w)
        sh, sw = (ch // 2, cw // 2) if self.hrda.hr_slide_overlapping else (ch, cw)
        boxes = [(min(r * sh, h - ch), min(c * sw, w - cw)) for r in range(max(h - ch + sh - 1, 0) // sh + 1) for c in range(max(w - cw + sw - 1, 0) // sw + 1)]
        windows = torch.cat([images[..., y : y + ch, x : x + cw] for y, x in boxes])
        logits = self.decode_head(self.features(windows))
        stride = ch // logits.shape[-2]
        total = logits.new_zeros((batch, logits.shape[1], h // stride, w // stride))
        count = logits.new_zeros((1, 1, h // stride, w // stride))
        for i, (y, x) in enumerate(boxes):
            ys, xs = slice(y // stride, (y + ch) // stride), slice(x // stride, (x + cw) // stride)
            total[..., ys, xs] += logits[i * batch : (i + 1) * batch]
            count[..., ys, xs] += 1
        return total / count


def check_grid(config: TrainModelConfig) -> None:
    """The detail crop's corners and size must fall on the context logits' pixels (stride head / lr_scale)."""
    hrda = config.hrda
    head_stride = 8 if config.decoder == "deeplabv2" else 4
    context_stride = head_stride / hrda.lr_scale
    if context_stride != int(context_stride) or hrda.crop_divisible % int(context_stride) or any(side % int(context_stride) for side in hrda.hr_crop_size):
        raise UserError(
            f"model.hrda: the context logits have a stride of {context_stride:g} pixels ({config.decoder} head at lr_scale {hrda.lr_scale}); "
            f"crop_divisible ({hrda.crop_divisible}) and hr_crop_size {list(hrda.hr_crop_size)} must be multiples of it"
        )


def hrda_loss(model: HRDASegmenter, outputs, labels: torch.Tensor, weight: torch.Tensor | None, ce) -> torch.Tensor:
    """HRDA's loss: fused on the whole label, detail on the label in its window (with the weight there)."""
    fused, detail, box, _ = outputs
    config = model.hrda
    top, bottom, left, right = (int(v) for v in box.tolist())
    loss = (1 - config.hr_loss_weight) * ce(fused, labels, weight)
    if config.hr_loss_weight:
        window = (..., slice(top, bottom), slice(left, right))
        loss = loss + config.hr_loss_weight * ce(detail, labels[window], weight[window] if weight is not None else None)
    return loss


def build_segmenter(config: TrainModelConfig, load_pretrained: bool = True) -> nn.Module:
    """The configured segmenter: HRDA's multi-resolution one with model.hrda.enabled."""
    if config.hrda.enabled:
        return HRDASegmenter(config, load_pretrained)
    return Segmenter(config, load_pretrained)


__all__ = ["HRDASegmenter", "build_head", "build_segmenter", "hrda_loss"]
