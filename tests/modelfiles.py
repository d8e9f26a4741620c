"""Model files the way users bring them, made from the tiny random-weight pipelines: LoRA weights as diffusers
writes them, a single-file checkpoint in the original (CompVis / A1111) layout, and a pipeline that carries
a safety checker."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def write_random_lora(base: Path, out: Path, seed: int, rank: int = 4) -> Path:
    """A LoRA on the base UNet's attention projections with random (non-zero) A and B, saved as
    `pytorch_lora_weights.safetensors` in `out`, as `dreamshard personalize` would (SDXL bases: as diffusers'
    SDXL DreamBooth LoRA script writes it)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    out.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    sdxl = json.loads((base / "model_index.json").read_text())["_class_name"].startswith("StableDiffusionXL")
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        out, unet_lora_layers=layers, weight_name="pytorch_lora_weights.safetensors", safe_serialization=True
    )
    return out / "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------------ single-file checkpoints
# The original Stable Diffusion layout, written from the diffusers names (SD 1.x UNet, VAE and CLIP text
# encoder); diffusers' from_single_file converts it back, so a round trip checks both directions.


def _unet_names(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs of the UNet's blocks."""
    layers = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]  # fmt: skip
    for level in range(levels):
        for j in range(layers):
            block = 1 + level * (layers + 1) + j
            pairs += [(f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{block}.0."), (f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{block}.1.")]
        if level < levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{(level + 1) * (layers + 1)}.0.op."))
        for j in range(layers + 1):
            block = level * (layers + 1) + j
            pairs += [(f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{block}.0."), (f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{block}.1.")]
    return pairs


_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]  # fmt: skip


def _unet_to_original(state: dict, config: dict) -> dict:
    layers, levels = config["layers_per_block"], len(config["block_out_channels"])
    pairs = _unet_names(config)
    out = {}
    for name, tensor in state.items():
        upsampler = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", name)
        if upsampler:  # after the level's last resnet, at position 2 when the level has attention (1 otherwise)
            level = int(upsampler.group(1))
            has_attention = any(key.startswith(f"up_blocks.{level}.attentions.") for key in state)
            new = f"output_blocks.{level * (layers + 1) + layers}.{2 if has_attention else 1}.{upsampler.group(2)}"
        else:
            prefix, original = max(((p, o) for p, o in pairs if name.startswith(p)), key=lambda item: len(item[0]))
            rest = name[len(prefix) :]
            if ".resnets." in prefix:
                rest = next((o + rest[len(d) :] for d, o in _RESNET if rest.startswith(d)), rest)
            new = original + rest
        out["model.diffusion_model." + new] = tensor
    assert levels and len(out) == len(state)
    return out


def _vae_to_original(state: dict, config: dict) -> dict:
    levels = len(config["block_out_channels"])
    out = {}
    for name, tensor in state.items():
        new = name.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}", new)
        new = re.sub(r"decoder\.up\.(\d+)\.resnets\.", r"decoder.up.\1.block.", new)
        new = re.sub(r"decoder\.up\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for diffusers_name, original in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
                new = new.replace(diffusers_name, original)
            if tensor.ndim == 2:  # linear in diffusers, 1x1 convolution in the original
                tensor = tensor[:, :, None, None]
        out["first_stage_model." + new] = tensor
    return out


def write_single_file(pipeline: Path, out: Path) -> Path:
    """An SD 1.x pipeline directory as one .safetensors checkpoint in the original layout."""
    from safetensors.torch import load_file, save_file

    def component(name: str) -> tuple[dict, dict]:
        folder = pipeline / name
        weights = next(folder.glob("*.safetensors"))
        return load_file(weights), json.loads((folder / "config.json").read_text())

    unet, unet_config = component("unet")
    vae, vae_config = component("vae")
    text, _ = component("text_encoder")
    checkpoint = _unet_to_original(unet, unet_config) | _vae_to_original(vae, vae_config)
    for name, tensor in text.items():
        checkpoint["cond_stage_model.transformer.text_model." + name.removeprefix("text_model.")] = tensor
    save_file({name: tensor.contiguous() for name, tensor in checkpoint.items()}, out)
    return out


# --------------------------------------------------------------------------------------- a safety checker


def with_safety_checker(base: Path, out: Path, seed: int = 0, threshold: float = 0.0) -> Path:
    """A copy of a pipeline directory with a random-weight StableDiffusionSafetyChecker and its feature
    extractor, listed in model_index.json. One of its concept embeddings is random with the given threshold,
    the others unreachable (threshold 2 > any cosine), so it flags an image when the image embedding's
    cosine with that one concept exceeds `threshold`: some images, not all."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    shutil.copytree(base, out)
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=tower, vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=32)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(checker.concept_embeds.shape))
        checker.concept_embeds_weights.fill_(2.0)
        checker.concept_embeds_weights[0] = threshold
        checker.special_care_embeds.copy_(torch.randn(checker.special_care_embeds.shape))
        checker.special_care_embeds_weights.fill_(1.0)  # never "special care": no adjustment
    checker.save_pretrained(out / "safety_checker", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out / "feature_extractor")
    index = json.loads((out / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], feature_extractor=["transformers", "CLIPImageProcessor"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
