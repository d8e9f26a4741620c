"""The segmenter: a timm backbone (`features_only`, the last four levels) and a light decode head.

Heads (`lhoyer/DAFormer` `mmseg/models/decode_heads/`): `daformer` (per-level linear projection, upsample to
stride 4, ASPP-like fusion with depthwise-separable dilated convs, bottleneck, dropout, classifier) and
`segformer` (projection, upsample, 1x1 fusion, dropout, classifier). Logits come out at stride 4.
The model takes images in [0, 1] and applies the ImageNet normalisation itself, so augmentations and masks
work on plain images.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from dreamshard.config import TrainModelConfig
from dreamshard.errors import UserError, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DAFORMER_DILATIONS = (1, 6, 12, 18)


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def separable_conv(cin: int, cout: int, dilation: int) -> nn.Sequential:
    """Depthwise 3x3 (dilated) then pointwise 1x1, each with BN + ReLU (mmcv DepthwiseSeparableConvModule)."""
    return nn.Sequential(conv_bn_relu(cin, cin, 3, dilation, groups=cin), conv_bn_relu(cin, cout, 1))


class DecodeHead(nn.Module):
    """Project every level to `embed_dim`, resize to the stride-4 level, fuse, classify."""

    def __init__(self, in_channels: list[int], embed_dim: int, num_classes: int, dropout: float, fusion: str):
        super().__init__()
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)  # linear, no norm/act
        concat = embed_dim * len(in_channels)
        if fusion == "daformer":
            self.aspp = nn.ModuleList(conv_bn_relu(concat, embed_dim, 1) if d == 1 else separable_conv(concat, embed_dim, d) for d in DAFORMER_DILATIONS)
            self.fuse = conv_bn_relu(embed_dim * len(DAFORMER_DILATIONS), embed_dim, 3)
        else:
            self.aspp = None
            self.fuse = conv_bn_relu(concat, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = torch.cat([F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False) for proj, f in zip(self.embed, features)], 1)
        if self.aspp is not None:
            x = torch.cat([branch(x) for branch in self.aspp], 1)
        return self.classifier(self.dropout(self.fuse(x)))


class Segmenter(nn.Module):
    def __init__(self, config: TrainModelConfig):
        super().__init__()
        self.backbone = build_backbone(config.backbone, config.pretrained)
        self.decode_head = DecodeHead(self.backbone.feature_info.channels(), config.embed_dim, config.num_classes, config.dropout, config.decoder)
        self.num_classes = config.num_classes
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of images in [0, 1]."""
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor, with_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits at stride 4 of the input (and the backbone features, for the feature distance)."""
        features = self.features(images)
        logits = self.decode_head(features)
        return (logits, features) if with_features else logits


def build_backbone(name: str, pretrained: str | None) -> nn.Module:
    """timm `features_only` model with the last four levels (strides 4..32 for resnets, convnexts, PVTv2)."""
    if not timm.is_model(name):
        raise UserError(f"model.backbone {name!r} is not a timm model; e.g. resnet50, resnet101, convnext_tiny, pvt_v2_b2")
    kwargs = {}
    if pretrained:
        if not Path(pretrained).is_file():
            raise UserError(f"model.pretrained {pretrained}: file not found; give a local .safetensors/.pth weights file (no hub access)")
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(pretrained)}}
    try:
        return timm.create_model(name, features_only=True, out_indices=(-4, -3, -2, -1), **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"model.backbone {name}: cannot build it with features_only / the weights in {pretrained} ({one_line(exc)})") from None


def head_parameter_groups(model: Segmenter, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
    """AdamW groups: the decode head gets `head_lr_mult` x lr; normalisation weights get no weight decay."""
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        key = (name.startswith("decode_head."), id(param) in norm_params)
        groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": lr * (head_lr_mult if is_head else 1.0), "weight_decay": 0.0 if is_norm else weight_decay}
        for (is_head, is_norm), params in sorted(groups.items())
    ]
