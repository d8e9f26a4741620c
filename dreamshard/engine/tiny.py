"""Random-weight diffusion models built locally (no hub): for tests, demos and benchmarks.

Presets:
- `tiny`: a few hundred thousand parameters; a 64x64 image in a few ms per step on one CPU core.
- `sd15`: the Stable Diffusion 1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder: same shapes,
  random weights), so benchmarks measure real compute without the real weights.
- `tiny-sdxl`: the SDXL architecture at tiny width: two text encoders (the second with a projection, whose
  pooled output and the size / crop time ids form the UNet's `text_time` added embedding), SDXL's Euler
  scheduler and VAE scaling; 64x64 images on a CPU.
- `sdxl`: the SDXL 1.0 base shapes (UNet 2.6 B parameters, CLIP ViT-L + OpenCLIP bigG text encoders),
  random weights, stored in float16 (7 GB) for GPU benchmarks.
- `tiny-controlnet`: a `ControlNetModel` directory that matches the `tiny` UNet (conditioned modes).
- `tiny-depth`: a `StableDiffusionDepth2ImgPipeline` with SD-2-depth's layout (a UNet taking 5 input channels:
  4 latent + 1 depth) and its own tiny DPT depth estimator and image processor (mode depth2img).
- `tiny-clip`: a `CLIPModel` + `CLIPProcessor` directory (quality.clip_model in tests).
- `tiny-dinov2`: a `Dinov2Model` directory (4 blocks, 64 wide, patch 8 so toy crops get a useful grid; the
  real ones use 14), the trainer's `model.backbone: dinov2` with `model.pretrained` pointing here.
- `tiny-sam`: a `SamModel` + `SamProcessor` directory at 64x64 input, for `uda.sam.model` (CLOUDS' refinement).

The tokenizer is a real `CLIPTokenizer` whose vocabulary is built here: every byte-level character plus
whole-word tokens (with the merges that form them) for a built-in word list, so common prompt words are
one token each and prompts stay well under 77 tokens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from dreamshard.format.store import atomic_path

PRESETS = ("tiny", "sd15", "tiny-sdxl", "sdxl", "tiny-controlnet", "tiny-depth", "tiny-clip", "tiny-dinov2", "tiny-sam")

# Words that get a single token: prompt vocabulary of the published recipes (classes, styles, templates).
_WORDS = """a an the of in on at with and or photo picture image scene view street city urban road
driving car cars truck bus train motorcycle bicycle rider person people pedestrian building wall fence
pole traffic light sign vegetation tree trees terrain sky sidewalk night day dawn dusk sunset sunrise
morning evening noon rain rainy snow snowy fog foggy cloudy sunny clear overcast storm weather winter
summer spring autumn fall season time lighting bright dark dim lit highway countryside village downtown
suburb tunnel bridge intersection lane parking style painting realistic high quality detailed blurry
low sks zwx dashcam camera from front taken seen germany europe america asia tokyo paris""".split()


def build_tiny_model(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a complete, loadable pipeline (or ControlNet) directory with random weights."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out)
    # Build under a temporary sibling and rename at the end, so an interrupted build never leaves a
    # directory that looks complete (the Makefile checks for model_index.json). Only an empty `out` gets
    # here (the CLI refuses a non-empty one).
    torch.manual_seed(seed)
    with atomic_path(out) as tmp:
        if preset == "tiny-controlnet":
            from diffusers import ControlNetModel

            controlnet = ControlNetModel.from_unet(_unet("tiny"), conditioning_embedding_out_channels=(8, 8, 16, 16))
            controlnet.save_pretrained(tmp, safe_serialization=True)
        elif preset == "tiny-depth":
            with tempfile.TemporaryDirectory() as tokenizer_dir:
                _tiny_depth_pipeline(tokenizer_dir).save_pretrained(tmp, safe_serialization=True)
        elif preset == "tiny-clip":
            _tiny_clip(tmp)
        elif preset == "tiny-dinov2":
            _tiny_dinov2(tmp)
        elif preset == "tiny-sam":
            _tiny_sam(tmp)
        elif preset in ("tiny-sdxl", "sdxl"):
            _sdxl_pipeline(preset, tmp)
        else:
            from diffusers import StableDiffusionPipeline

            with tempfile.TemporaryDirectory() as tokenizer_dir:
                pipe = StableDiffusionPipeline(
                    vae=_vae(preset),
                    text_encoder=_text_encoder(preset),
                    tokenizer=build_tokenizer(tokenizer_dir),
                    unet=_unet(preset),
                    scheduler=_scheduler(),
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
                pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def _sdxl_pipeline(preset: str, out: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer = build_tokenizer(tokenizer_dir)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(preset),
            text_encoder=_text_encoder(preset),
            text_encoder_2=_text_encoder_2(preset),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=_unet(preset),
            scheduler=_sdxl_scheduler(),
        )
        if preset == "sdxl":  # 3.5 B parameters: float16 halves the files (14 -> 7 GB); benchmarks run in fp16
            pipe.to(torch.float16)
        pipe.save_pretrained(out, safe_serialization=True)


def _tiny_clip(out: Path) -> None:
    """A CLIPModel (text and vision towers, 32 wide) and its processor: the tokenizer here, 32x32 images."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    vocab = _vocab()
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **tower)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=32))
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = CLIPProcessor(image_processor=images, tokenizer=build_tokenizer(tokenizer_dir))
        processor.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)


def _tiny_dinov2(out: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, patch_size=8, image_size=64)
    Dinov2Model(config).save_pretrained(out, safe_serialization=True)


def _tiny_sam(out: Path) -> None:
    """SAM's three parts at toy width: a 2-block ViT image encoder on 64x64 inputs (patch 8: an 8x8 embedding
    grid), the prompt encoder and the two-way mask decoder; with the processor that resizes to 64."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    vision = dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                  global_attn_indexes=[1], window_size=4, mlp_dim=64, num_pos_feats=16)  # fmt: skip
    config = SamConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32),
    )
    SamModel(config).save_pretrained(out, safe_serialization=True)
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16}))
    processor.save_pretrained(out)


# ----------------------------------------------------------------------------------------- components


def _tiny_depth_pipeline(tokenizer_dir: str):
    """SD-2-depth's components at tiny size: the `tiny` VAE, text encoder, tokenizer and scheduler, a UNet
    whose input is the latent plus the depth map (5 channels), and a small DPT (ViT, not SD-2's DPT-Hybrid)
    with the image processor the pipeline feeds it through."""
    from diffusers import StableDiffusionDepth2ImgPipeline, UNet2DConditionModel
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    unet = UNet2DConditionModel.from_config(_unet("tiny").config, in_channels=5)
    depth = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return StableDiffusionDepth2ImgPipeline(
        vae=_vae("tiny"),
        text_encoder=_text_encoder("tiny"),
        tokenizer=build_tokenizer(tokenizer_dir),
        unet=unet,
        scheduler=_scheduler(),
        depth_estimator=DPTForDepthEstimation(depth),
        feature_extractor=processor,
    )


def _unet(preset: str):
    from diffusers import UNet2DConditionModel

    if preset == "sd15":  # runwayml/stable-diffusion-v1-5 unet/config.json
        return UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    if preset == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        return UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled text
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
    if preset == "tiny-sdxl":
        return UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            cross_attention_dim=64,  # the two text encoders' hidden states side by side (32 + 32)
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids (sizes, crop) x 8 + the pooled projection
            norm_num_groups=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def _vae(preset: str):
    from diffusers import AutoencoderKL

    if preset in ("sd15", "sdxl"):
        return AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024 if preset == "sdxl" else 512,
            scaling_factor=0.13025 if preset == "sdxl" else 0.18215,
            force_upcast=preset == "sdxl",
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    # Four blocks keep SD's 8x downsampling (64x64 image -> 8x8 latent) at tiny width.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025 if preset == "tiny-sdxl" else 0.18215,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _text_encoder(preset: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = _vocab()
    vocab_size = len(vocab)
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    if preset in ("sd15", "sdxl"):  # openai/clip-vit-large-patch14 text tower
        config = CLIPTextConfig(
            vocab_size=max(vocab_size, 49408),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            **special,
        )
    else:
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            **special,
        )
    return CLIPTextModel(config)


def _text_encoder_2(preset: str):
    """SDXL's second text encoder: with a projection (its pooled output feeds the UNet's added embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = _vocab()
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    if preset == "sdxl":  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower
        config = CLIPTextConfig(vocab_size=max(len(vocab), 49408), hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, **special)  # fmt: skip
    else:
        config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=77, projection_dim=32, **special)  # fmt: skip
    return CLIPTextModelWithProjection(config)


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # Stable Diffusion XL base 1.0's scheduler config.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _scheduler():
    from diffusers import PNDMScheduler

    # Stable Diffusion 1.5's scheduler config.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


# ------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(out: str | Path):
    """A `CLIPTokenizer` from a locally built vocabulary (see the module docstring)."""
    from transformers import CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab(), _merges()
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)


def _byte_chars() -> list[str]:
    """The printable stand-ins GPT-2/CLIP byte-level BPE uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _merges() -> list[tuple[str, str]]:
    """Left-to-right merges that assemble each word of `_WORDS` into one `word</w>` token."""
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in sorted(set(_WORDS)):
        if len(word) < 2:
            continue
        left = word[0]
        for i, char in enumerate(word[1:], start=1):
            right = char + "</w>" if i == len(word) - 1 else char
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
    return merges


def _vocab() -> dict[str, int]:
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    for left, right in _merges():
        tokens.append(left + right)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab
