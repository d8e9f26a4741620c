"""Segmenter backbones: four feature levels and their channels, for the decode heads in model.py.

- `mit_b0` … `mit_b5`: SegFormer's Mix Transformer encoder (Xie et al., NeurIPS 2021), built with
  `transformers`' SegformerModel at the paper's sizes (table below). Its four stages come out at strides
  4/8/16/32. The ImageNet weights the SegFormer authors released are on the Hugging Face hub as
  `nvidia/mit-b0` … `nvidia/mit-b5`; DAFormer and DATUM load the same encoder from `pretrained/mit_b5.pth`
  (the original release's key names, which this loader does not translate: use the hub's version).
- `dinov2`, `dinov2_small` … `dinov2_giant`: DINOv2 (Oquab et al., 2023), `transformers`' Dinov2Model, the
  foundation backbone of VFM-UDA. Four of its blocks (evenly spaced, the last included) are layer-normed,
  their patch tokens reshaped to maps at stride 14 and turned into a simple feature pyramid (ViTDet: two
  transposed convs, one, none, a max-pool) at strides 3.5/7/14/28; the input is resized to a multiple of 14
  first. Weights: a model directory or a hub id (facebook/dinov2-small … -giant) in the Hugging Face cache;
  `dinov2` alone takes its size from the weights (the `tiny-dinov2` preset), the sized names check it.
- any timm model with `features_only`: its last four levels (strides 4..32 for resnets, convnexts, PVTv2).
  Under the `deeplabv2` decoder it runs dilated at output stride 8, as DeepLabV2's ResNet does (DAFormer's
  `deeplabv2_r50-d8.py`: strides 1/2/1/1, dilations 1/1/2/4), so its levels are at strides 4/8/8/8.

Weights come only from `model.pretrained`: never from the network unless `model.local_files_only` is false.
`pretrained: none` (written out) builds a random initialisation; leaving it unset is an error, because a
UDA run from a random backbone silently lands tens of mIoU points below the papers.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from dreamshard.config import TrainModelConfig
from dreamshard.errors import UserError, one_line

log = logging.getLogger(__name__)

# MiT sizes (SegFormer paper, Table 6; the same as transformers' nvidia/mit-b* configs and DAFormer's
# mix_transformer.py): per stage hidden size and depth. Heads 1/2/5/8, reduction ratios 8/4/2/1, MLP ratio 4
# and patch embeddings 7/3/3/3 with strides 4/2/2/2 are the same at every size.
MIT_SIZES = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
MIT_HEADS = (1, 2, 5, 8)
MIT_SR_RATIOS = (8, 4, 2, 1)
MIT_DROP_PATH = 0.1  # stochastic depth rate of DAFormer's mit_b* (and transformers' default)
DEEPLAB_OUTPUT_STRIDE = 8
# DINOv2 sizes (transformers' facebook/dinov2-* configs): hidden size, layers, heads.
DINOV2_SIZES = {"dinov2_small": (384, 12, 6), "dinov2_base": (768, 12, 12), "dinov2_large": (1024, 24, 16), "dinov2_giant": (1536, 40, 24)}


def missing_weights_message(model: TrainModelConfig) -> str:
    kinds = (
        f"a .safetensors file, a model directory or a hub id in the Hugging Face cache such as {hub_id(model.backbone)}"
        if from_transformers(model.backbone)
        else "a local .safetensors/.pth file"
    )
    return (
        f"model.pretrained is not set: give the {model.backbone} backbone's ImageNet weights ({kinds}), "
        "or write `model.pretrained: none` to train from a random initialisation"
    )


def require_weights(model: TrainModelConfig) -> None:
    """Before anything is read or written: refuse a training config that says nothing about the backbone's
    weights, or names weights that are not there (a missing file, a hub id absent from the cache)."""
    weights = model.pretrained
    if weights is None or not weights.strip():
        raise UserError(missing_weights_message(model))
    if model.random_init or Path(weights).expanduser().exists():
        return
    if from_transformers(model.backbone) and _is_hub_id(weights):
        if model.local_files_only and not _in_hf_cache(weights):
            raise UserError(
                f"model.pretrained {weights} is not in the Hugging Face cache and model.local_files_only is true: download it first "
                f"(`hf download {weights}` where there is internet, then copy the cache; docs/reproduce.md) or give a local .safetensors file"
            )
        return
    kind = (
        "a local .safetensors file, a model directory or a hub id in the Hugging Face cache"
        if from_transformers(model.backbone)
        else "a local .safetensors/.pth file"
    )
    raise UserError(f"model.pretrained {weights}: file not found; give {kind}, or `none` for a random initialisation")


def is_mit(name: str) -> bool:
    return name in MIT_SIZES


def is_dinov2(name: str) -> bool:
    return name == "dinov2" or name in DINOV2_SIZES


def from_transformers(name: str) -> bool:
    """Backbones whose weights load like a transformers model (a directory or a hub id in the cache)."""
    return is_mit(name) or is_dinov2(name)


def hub_id(name: str) -> str:
    if is_dinov2(name):
        return "facebook/" + name.replace("_", "-") if name != "dinov2" else "facebook/dinov2-large"
    return "nvidia/" + name.replace("_", "-")


def build_backbone(model: TrainModelConfig, load_weights: bool = True) -> tuple[nn.Module, list[int]]:
    """The backbone (called on normalised images, returns four feature maps) and its levels' channels.
    `load_weights=False` builds it randomly initialised, for weights loaded right after (a checkpoint)."""
    if load_weights:
        require_weights(model)
    weights = model.pretrained if load_weights and not model.random_init else None
    if is_mit(model.backbone):
        backbone = build_mit(model.backbone, weights, model.local_files_only)
        return backbone, backbone.channels
    if is_dinov2(model.backbone):
        dino = build_dinov2(model.backbone, weights, model.local_files_only)
        return dino, dino.channels
    output_stride = DEEPLAB_OUTPUT_STRIDE if model.decoder == "deeplabv2" else None
    backbone = build_timm(model.backbone, weights, output_stride)
    return backbone, backbone.feature_info.channels()


# ------------------------------------------------------------------------------------------------ timm


def build_timm(name: str, weights: str | None, output_stride: int | None = None) -> nn.Module:
    """timm `features_only` model with the last four levels, weights from a local file."""
    import timm

    if not timm.is_model(name):
        raise UserError(
            f"model.backbone {name!r} is neither a MiT encoder ({', '.join(MIT_SIZES)}), DINOv2 (dinov2, {', '.join(DINOV2_SIZES)}) nor a timm model; "
            "e.g. mit_b5, dinov2_large, resnet101, convnext_tiny"
        )
    kwargs: dict = {} if output_stride is None else {"output_stride": output_stride}
    if weights:
        if not Path(weights).expanduser().is_file():
            raise UserError(f"model.pretrained {weights}: file not found; a timm backbone takes a local .safetensors/.pth weights file (no hub access)")
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(Path(weights).expanduser())}}
    try:
        return timm.create_model(name, features_only=True, out_indices=(-4, -3, -2, -1), **kwargs)
    except (RuntimeError, ValueError, AssertionError, TypeError) as exc:
        dilated = f" dilated at output stride {output_stride} (the deeplabv2 decoder)" if output_stride else ""
        raise UserError(f"model.backbone {name}: cannot build it with features_only{dilated} / the weights in {weights} ({one_line(exc)})") from None


# ------------------------------------------------------------------------------------------------- MiT


class MiT(nn.Module):
    """A SegFormer MiT encoder: images → its four stages' feature maps, at strides 4, 8, 16 and 32."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.channels = list(encoder.config.hidden_sizes)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.encoder(pixel_values=images, output_hidden_states=True).hidden_states)


def mit_config(name: str):
    from transformers import SegformerConfig

    hidden_sizes, depths = MIT_SIZES[name]
    return SegformerConfig(
        hidden_sizes=list(hidden_sizes), depths=list(depths), num_attention_heads=list(MIT_HEADS), sr_ratios=list(MIT_SR_RATIOS),
        drop_path_rate=MIT_DROP_PATH,
    )  # fmt: skip


def build_mit(name: str, weights: str | None, local_files_only: bool = True) -> MiT:
    from transformers import SegformerModel

    config = mit_config(name)
    if weights is None:
        return MiT(SegformerModel(config))
    return MiT(load_mit(name, config, weights, local_files_only))


def load_mit(name: str, config, weights: str, local_files_only: bool) -> nn.Module:
    """SegformerModel at `config`'s size with the weights from a .safetensors file (a SegformerModel or
    SegformerForImageClassification state dict, as the hub's nvidia/mit-b* hold), a model directory or a
    hub id. transformers translates the key names of older releases; the size must match exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import SegformerModel

    path = Path(weights).expanduser()
    fix = (
        f"give SegFormer {name} encoder weights in Hugging Face format, e.g. {hub_id(name)} (its directory, its model.safetensors, or the hub id in the cache)"
    )
    try:
        with _quiet_transformers():
            if path.is_file():
                if path.suffix != ".safetensors":
                    raise UserError(f"model.pretrained {weights}: a {name} weights file must be .safetensors (no pickles); {fix}")
                encoder, info = SegformerModel.from_pretrained(None, config=config, state_dict=load_file(path), dtype=torch.float32, output_loading_info=True)
            elif path.is_dir() or _is_hub_id(weights):
                source = str(path) if path.is_dir() else weights
                encoder, info = SegformerModel.from_pretrained(
                    source, config=config, local_files_only=local_files_only, dtype=torch.float32, output_loading_info=True
                )
            else:
                raise UserError(f"model.pretrained {weights} does not exist; {fix}")
    except (SafetensorError, OSError) as exc:
        where = "the Hugging Face cache (model.local_files_only is true: download it first, see docs/reproduce.md)" if local_files_only else "the hub"
        raise UserError(f"cannot load model.pretrained {weights} from {where}: {one_line(exc, limit=160)}") from None
    except RuntimeError as exc:  # transformers refuses tensors of another size
        raise UserError(
            f"model.pretrained {weights} does not fit model.backbone {name} (weights of another MiT size? {one_line(exc, limit=120)}); {fix}"
        ) from None
    missing = sorted(info["missing_keys"])
    if missing:
        raise UserError(f"model.pretrained {weights} lacks {len(missing)} of the {name} encoder's tensors (e.g. {missing[0]}); {fix}")
    unexpected = sorted(key for key in info["unexpected_keys"] if not key.startswith("classifier."))
    if unexpected:  # e.g. a decode head: segmentation weights, maybe trained on the target domain itself
        log.warning(
            "model.pretrained %s also holds %d tensors the encoder does not use (e.g. %s); were these meant to be ImageNet weights?",
            weights,
            len(unexpected),
            unexpected[0],
        )
    return encoder


# ---------------------------------------------------------------------------------------------- DINOv2


class DINOv2(nn.Module):
    """A DINOv2 ViT as four feature levels: blocks L/4, L/2, 3L/4 and L (layer-normed patch tokens, stride 14)
    through a simple feature pyramid (x4 and x2 transposed convs with C/4 and C/2 channels, identity, max-pool)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        config = encoder.config
        width, depth, self.patch = config.hidden_size, config.num_hidden_layers, config.patch_size
        self.layers = sorted({max(1, round(depth * k / 4)) for k in (1, 2, 3, 4)})
        if len(self.layers) < 4:
            raise UserError(f"model.backbone dinov2: the weights have {depth} blocks; four feature levels need at least 4")
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(width, width // 2, 2, stride=2), nn.GroupNorm(1, width // 2), nn.GELU(), nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2)
        )
        self.up2 = nn.ConvTranspose2d(width, width // 2, 2, stride=2)
        self.down2 = nn.MaxPool2d(2)
        self.channels = [width // 4, width // 2, width, width]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, w = (-(-size // self.patch) * self.patch for size in images.shape[-2:])  # the next multiple of the patch
        if (h, w) != tuple(images.shape[-2:]):
            images = torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        states = self.encoder(pixel_values=images, output_hidden_states=True).hidden_states
        maps = []
        for layer in self.layers:
            tokens = self.encoder.layernorm(states[layer])[:, 1:]  # drop the class token
            maps.append(tokens.transpose(1, 2).reshape(images.shape[0], -1, h // self.patch, w // self.patch))
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


def build_dinov2(name: str, weights: str | None, local_files_only: bool = True) -> DINOv2:
    from transformers import Dinov2Config, Dinov2Model

    if weights is None:
        width, depth, heads = DINOV2_SIZES.get(name, DINOV2_SIZES["dinov2_small"])
        return DINOv2(Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, use_swiglu_ffn=width == 1536)))
    path = Path(weights).expanduser()
    fix = f"give DINOv2 weights in Hugging Face format: a model directory or a hub id in the cache such as {hub_id(name)}"
    if not (path.is_dir() or _is_hub_id(weights)):
        raise UserError(f"model.pretrained {weights}: not a model directory or hub id; {fix}")
    try:
        with _quiet_transformers():
            encoder = Dinov2Model.from_pretrained(str(path) if path.is_dir() else weights, local_files_only=local_files_only, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        where = "the Hugging Face cache (model.local_files_only is true: download it first, see docs/reproduce.md)" if local_files_only else "the hub"
        raise UserError(f"cannot load model.pretrained {weights} from {where}: {one_line(exc, limit=160)}; {fix}") from None
    if name in DINOV2_SIZES and encoder.config.hidden_size != DINOV2_SIZES[name][0]:
        raise UserError(
            f"model.pretrained {weights} is a DINOv2 of width {encoder.config.hidden_size}, not {name}; use model.backbone: dinov2 or the matching size"
        )
    return DINOv2(encoder)


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _is_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None and not Path(text).expanduser().exists()


@contextlib.contextmanager
def _quiet_transformers():
    """No load report tables or progress bars: a problem becomes one UserError line instead."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
