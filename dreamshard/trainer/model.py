"""The segmenter: a backbone with four feature levels (backbones.py: SegFormer's MiT encoders or timm
models) and a decode head.

Heads (`lhoyer/DAFormer` `mmseg/models/decode_heads/`): `daformer` (per-level linear projection, upsample to
stride 4, ASPP-like fusion with depthwise-separable dilated convs, bottleneck, dropout, classifier),
`segformer` (projection, upsample, 1x1 fusion, dropout, classifier), both with logits at stride 4; and
`deeplabv2` (DeepLabV2's ASPP classifier, `dlv2_head.py`: parallel dilated 3x3 convs straight to the classes
on the last level, summed, no norm, no dropout), with logits at the last level's stride (8 on a dilated
ResNet); and `deeplabv3plus` (Chen et al., ECCV 2018, as ZoDi trains it: ASPP with image pooling on the
last level, a 48-channel projection of the stride-4 level, two 3x3 convs, classifier; logits at stride 4). The model takes images in [0, 1] and applies the ImageNet normalisation itself, so augmentations and
masks work on plain images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dreamshard.config import TrainModelConfig
from dreamshard.trainer.backbones import build_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DAFORMER_DILATIONS = (1, 6, 12, 18)
DEEPLABV2_DILATIONS = (6, 12, 18, 24)
DEEPLABV3PLUS_DILATIONS = (6, 12, 18)  # at output stride 16 (torchvision's and the paper's); 12/24/36 at 8


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

    def __init__(self, in_channels: list[int], embed_dim: int, num_classes: int, dropout: float, fusion: str, dilations=DAFORMER_DILATIONS):
        super().__init__()
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)  # linear, no norm/act
        concat = embed_dim * len(in_channels)
        if fusion == "daformer":
            self.aspp = nn.ModuleList(conv_bn_relu(concat, embed_dim, 1) if d == 1 else separable_conv(concat, embed_dim, d) for d in dilations)
            self.fuse = conv_bn_relu(embed_dim * len(dilations), embed_dim, 3)
        else:
            self.aspp = None
            self.fuse = conv_bn_relu(concat, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def init_like_mmseg(self) -> None:
        """DAFormer's initialisation (mmcv 1.3 ConvModule and mmseg's BaseDecodeHead): every conv followed by
        BN + ReLU kaiming-normal (fan_out, relu), BN weight 1 and bias 0, the classifier N(0, 0.01) with bias
        0. The embeddings (DAFormer's nn.Linear MLPs, 1x1 convs here) keep PyTorch's default, as there."""
        fusion = [*(self.aspp or []), self.fuse]
        for module in (m for part in fusion for m in part.modules()):
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def embedding(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The fused feature map the classifier reads (before dropout)."""
        size = features[0].shape[-2:]
        x = torch.cat([F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False) for proj, f in zip(self.embed, features)], 1)
        if self.aspp is not None:
            x = torch.cat([branch(x) for branch in self.aspp], 1)
        return self.fuse(x)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.embedding(features)))


class DeepLabV2Head(nn.Module):
    """DeepLabV2's classifier on the last level: one dilated 3x3 conv (with bias) per rate, straight to the
    classes, summed. Weights start from N(0, 0.01) as in DAFormer's config."""

    def __init__(self, in_channels: list[int], num_classes: int, dilations=DEEPLABV2_DILATIONS):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels[-1], num_classes, 3 if d > 1 else 1, padding=d if d > 1 else 0, dilation=d) for d in dilations)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([branch(features[-1]) for branch in self.branches]).sum(0)


class DeepLabV3PlusHead(nn.Module):
    """DeepLabv3+'s decoder as ZoDi builds it (`models/segmentation/_deeplabv3.py`): ASPP on the last level (a
    1x1 branch, one 3x3 branch per rate 6/12/18, image pooling; BN + ReLU each) projected to `embed_dim` with
    dropout 0.5; the stride-4 level projected to 48 channels; both concatenated at stride 4, one 3x3
    conv-BN-ReLU, a 1x1 classifier. Difference: the pooling branch has no BatchNorm (so batches of one train;
    torchvision's has one). ZoDi runs it on an undilated ResNet (output stride 32), as timm's resnets are here."""

    def __init__(self, in_channels: list[int], embed_dim: int, num_classes: int, dilations=DEEPLABV3PLUS_DILATIONS):
        super().__init__()
        top = in_channels[-1]
        self.aspp = nn.ModuleList([conv_bn_relu(top, embed_dim, 1), *(conv_bn_relu(top, embed_dim, 3, d) for d in dilations)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(top, embed_dim, 1, bias=False), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(embed_dim * (len(dilations) + 2), embed_dim, 1), nn.Dropout(0.5))
        self.low_level = conv_bn_relu(in_channels[0], 48, 1)
        self.fuse = conv_bn_relu(embed_dim + 48, embed_dim, 3)
        self.dropout = nn.Identity()  # DeepLabv3+'s decoder has none before its classifier
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def embedding(self, features: list[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        pooled = self.pool(top).expand(-1, -1, *top.shape[-2:])  # BN-free pooled branch: batches of one train too
        x = self.project(torch.cat([branch(top) for branch in self.aspp] + [pooled], 1))
        x = F.interpolate(x, size=features[0].shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, self.low_level(features[0])], 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.embedding(features)))


def build_head(config: TrainModelConfig, channels: list[int]) -> nn.Module:
    if config.decoder == "deeplabv3plus":
        return DeepLabV3PlusHead(channels, config.embed_dim, config.num_classes, config.dilations or DEEPLABV3PLUS_DILATIONS)
    if config.decoder == "deeplabv2":
        return DeepLabV2Head(channels, config.num_classes, config.dilations or DEEPLABV2_DILATIONS)
    head = DecodeHead(channels, config.embed_dim, config.num_classes, config.dropout, config.decoder, config.dilations or DAFORMER_DILATIONS)
    if config.head_init == "daformer":
        head.init_like_mmseg()
    return head


class Segmenter(nn.Module):
    """Backbone + decode head. `load_pretrained=False` skips `model.pretrained` (random weights, e.g. to load
    a checkpoint into)."""

    def __init__(self, config: TrainModelConfig, load_pretrained: bool = True):
        super().__init__()
        self.backbone, channels = build_backbone(config, load_pretrained)
        self.feature_channels = list(channels)
        self.decode_head = build_head(config, channels)
        self.num_classes = config.num_classes
        self.frozen_backbone = config.freeze_backbone
        if self.frozen_backbone:
            for param in self.backbone.parameters():
                param.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Segmenter:
        """A frozen backbone stays in eval mode (its normalisation statistics are kept as loaded)."""
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def context_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the backbone sees for the features the feature distance compares (HRDA: a smaller view)."""
        return images

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of images in [0, 1]."""
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor, with_features: bool = False, with_embedding: bool = False):
        """Logits at the head's stride (see the module docstring) and, for the feature distance, the backbone
        features; `with_embedding`: (logits, the head's feature map before its classifier) instead (ZoDi's
        similarity loss; the decoders with one: daformer, segformer, deeplabv3plus). Through forward, so DDP
        sees one pass."""
        features = self.features(images)
        if with_embedding:
            embedding = self.decode_head.embedding(features)
            return self.decode_head.classifier(self.decode_head.dropout(embedding)), embedding
        logits = self.decode_head(features)
        return (logits, features) if with_features else logits


def head_parameter_groups(model: Segmenter, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
    """Optimiser groups (AdamW or SGD): the decode head (and HRDA's attention head) get `head_lr_mult` x lr;
    normalisation weights get no weight decay."""
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # a frozen backbone (model.freeze_backbone)
            continue
        key = (name.startswith(("decode_head.", "scale_attention.")), id(param) in norm_params)
        groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": lr * (head_lr_mult if is_head else 1.0), "weight_decay": 0.0 if is_norm else weight_decay}
        for (is_head, is_norm), params in sorted(groups.items())
    ]
