"""Load a Stable Diffusion pipeline for generation: local directory or hub id, dtype, device, scheduler,
attention, LoRA, ControlNet. Every user mistake becomes one `UserError` line.

A personalised LoRA output (from `dreamshard personalize`) is a directory holding
`pytorch_lora_weights.safetensors` and `dreamshard_lora.json` (`{"base_model": ..., "weights": ...}`):
pointing `model.path` at it loads the base model and applies the LoRA.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from dreamshard.config import MODES, ModelConfig
from dreamshard.errors import UserError, one_line

log = logging.getLogger(__name__)

LORA_MANIFEST = "dreamshard_lora.json"

# scheduler name -> (diffusers class name, extra config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_pipeline(model: ModelConfig, mode: str = "txt2img", device: str | None = None):
    """The pipeline for `mode`, on its device, ready to call. Raises UserError on bad input."""
    if mode not in MODES:
        raise UserError(f"unknown generation mode {mode!r}; choose one of {', '.join(MODES)}")
    torch_device = resolve_device(device or model.device)
    dtype = resolve_dtype(model.dtype, torch_device)
    base_path, lora_path = resolve_model_path(model)

    pipe = load_base_pipeline(base_path, model, dtype)
    if lora_path:
        _apply_lora(pipe, lora_path, model.lora_scale)
    if model.scheduler:
        pipe.scheduler = make_scheduler(model.scheduler, pipe.scheduler.config)
    _set_attention(pipe, model.attention)
    pipe = _for_mode(pipe, mode, model, dtype)
    pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_model_path(model: ModelConfig) -> tuple[str, str | None]:
    """(base model path or hub id, LoRA weights path or None), following a personalised LoRA manifest."""
    path = Path(model.path).expanduser()
    lora = model.lora
    manifest = path / LORA_MANIFEST
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            base = info["base_model"]
            weights = info.get("weights", "pytorch_lora_weights.safetensors")
            if not isinstance(base, str) or not isinstance(weights, str):
                raise TypeError("base_model and weights must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{manifest} is not a valid LoRA manifest ({one_line(exc)}); re-run `dreamshard personalize` to rewrite it") from None
        return base, lora or str(path / weights)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"model path {path} is not a diffusers pipeline directory (no model_index.json); "
                f"build one with `dreamshard tiny-model {path}` or point model.path at a saved pipeline"
            )
        return str(path), lora
    if _looks_local(model.path):
        raise UserError(
            f"model path {model.path} does not exist; build a tiny model with `dreamshard tiny-model {model.path}` "
            "or set model.path to a pipeline directory or hub id"
        )
    return model.path, lora


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **extra)


def model_fingerprint(path: str | Path) -> str:
    """A content hash of a model: every config file in full, plus each weight file's size and its first and
    last MiB (hashing gigabytes of weights in full would slow every run start; retraining changes weights
    throughout, so a retrained file never keeps both ends). For a pipeline directory only `model_index.json`
    and its component folders count, so checkpoints or logs kept beside them (a personalisation output) do
    not change it. A path that does not exist hashes as its name (see `model_identity` for hub ids)."""
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = _model_files(root)
    else:
        return "hub:" + str(path)
    digest = hashlib.sha256()
    for file in files:
        digest.update((file.relative_to(root).as_posix() if file != root else file.name).encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with file.open("rb") as fh:
            if file.suffix in (".json", ".txt") or size <= 2 << 20:
                digest.update(fh.read())
            else:
                digest.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def model_identity(model: ModelConfig) -> dict:
    """What the generated images depend on, by content: the base pipeline, the LoRA (from model.lora or a
    personalised LoRA directory in model.path) and the ControlNet; hub ids by the content of their snapshot in
    the local cache, with its commit. Stored in every sample's json `model` and in the dataset fingerprint."""
    base, lora = resolve_model_path(model)
    base_hash, revision = _content_hash(base, model.revision, model.local_files_only)
    identity = {"id": model.path, "hash": base_hash, "revision": revision}
    identity["lora"] = model_fingerprint(lora) if lora else None
    identity["controlnet"] = _content_hash(model.controlnet, None, model.local_files_only)[0] if model.controlnet else None
    return identity


def _content_hash(path_or_id: str, revision: str | None, local_files_only: bool) -> tuple[str, str | None]:
    """(content hash, hub commit or None) of a local model, or of a hub id: the content of its snapshot in the
    local HF cache; not cached and the hub allowed: the hub's commit for the revision (itself a content
    address), without downloading gigabytes on the driver."""
    if Path(path_or_id).expanduser().exists() or _looks_local(path_or_id):
        return model_fingerprint(path_or_id), None
    from huggingface_hub import HfApi, snapshot_download

    try:
        snapshot = Path(snapshot_download(path_or_id, revision=revision, local_files_only=True))
        return model_fingerprint(snapshot), snapshot.name
    except Exception:  # noqa: BLE001 - not in the cache (or no such repo)
        if local_files_only:  # the loader then refuses it with one line; nothing is generated
            return f"hub:{path_or_id}@{revision or 'main'}", revision
    try:
        commit = HfApi().model_info(path_or_id, revision=revision).sha
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot look up model {path_or_id!r} on the hub ({one_line(exc)}); check the id and revision, or use a local directory") from None
    return f"hub:{path_or_id}@{commit}", commit


def _model_files(root: Path) -> list[Path]:
    index = root / "model_index.json"
    if not index.is_file():
        return sorted(p for p in root.rglob("*") if p.is_file())
    components = [name for name, value in json.loads(index.read_text()).items() if isinstance(value, list) and value[0]]
    files = [index]
    for name in components:
        files += sorted(p for p in (root / name).rglob("*") if p.is_file())
    return files


# ------------------------------------------------------------------------------------------- helpers


def _looks_local(path: str) -> bool:
    """A hub id is `name` or `org/name`; anything with ./, ../, ~, a leading / or more parts is a path."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def load_base_pipeline(path: str, model: ModelConfig, dtype: torch.dtype):
    """The txt2img pipeline at `path` as stored (no LoRA, scheduler or attention changes)."""
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    # Loading bars from every worker process would interleave with the run's own progress display.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    kwargs = dict(dtype=dtype, local_files_only=model.local_files_only, revision=model.revision)
    if not model.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return StableDiffusionPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        where = "in the local Hugging Face cache (model.local_files_only is true)" if model.local_files_only else "on the hub"
        raise UserError(
            f"cannot load model {path!r}: not found or incomplete {where} ({one_line(exc)}); "
            "download it on a machine with access or point model.path at a local pipeline directory"
        ) from None


def _apply_lora(pipe, lora_path: str, scale: float) -> None:
    path = Path(lora_path)
    if not path.exists():
        raise UserError(f"LoRA weights {lora_path} not found; set model.lora to a .safetensors file or directory")
    try:
        if path.is_dir():
            pipe.load_lora_weights(str(path))
        else:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot apply LoRA weights {lora_path}: {one_line(exc)}") from None
    # Fusing folds the LoRA into the base weights once, so generation pays nothing per step.
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()


def _set_attention(pipe, attention: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor2_0() if attention == "sdpa" else AttnProcessor()
    pipe.unet.set_attn_processor(processor)
    pipe.vae.set_attn_processor(processor)


def _for_mode(pipe, mode: str, model: ModelConfig, dtype: torch.dtype):
    if mode == "txt2img":
        return pipe
    if mode == "img2img":
        from diffusers import StableDiffusionImg2ImgPipeline

        return StableDiffusionImg2ImgPipeline(**pipe.components)
    if mode == "depth2img":
        return _depth2img(pipe, model, dtype)
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    if not model.controlnet:
        raise UserError("mode controlnet_seg needs model.controlnet (a ControlNet directory or hub id)")
    if _looks_local(model.controlnet) and not Path(model.controlnet).expanduser().exists():
        raise UserError(f"ControlNet {model.controlnet} not found; build one with `dreamshard tiny-model OUT --preset tiny-controlnet`")
    try:
        controlnet = ControlNetModel.from_pretrained(model.controlnet, dtype=dtype, local_files_only=model.local_files_only)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load ControlNet {model.controlnet!r}: {one_line(exc)}") from None
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    return StableDiffusionControlNetPipeline(**components, controlnet=controlnet)


def _depth2img(pipe, model: ModelConfig, dtype: torch.dtype):
    """SD-2-depth's depth-to-image pipeline on the loaded components, with the model's depth estimator (DPT,
    `depth_estimator/`) and its image processor (`feature_extractor/`)."""
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    channels = pipe.unet.config.in_channels
    if channels != 5:
        raise UserError(
            f"mode depth2img needs a depth-to-image model whose UNet takes 4 latent + 1 depth channels (e.g. stabilityai/stable-diffusion-2-depth); "
            f"the UNet of {model.path} takes {channels}"
        )
    base, _ = resolve_model_path(model)
    options = dict(local_files_only=model.local_files_only, revision=model.revision)
    try:
        depth_estimator = DPTForDepthEstimation.from_pretrained(base, subfolder="depth_estimator", dtype=dtype, **options)
        processor = pipe.feature_extractor
        if not isinstance(processor, DPTImageProcessor):
            processor = DPTImageProcessor.from_pretrained(base, subfolder="feature_extractor", **options)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load the depth estimator of {model.path!r} ({one_line(exc)}); mode depth2img needs its depth_estimator/ and feature_extractor/ "
            "(a tiny one: `dreamshard tiny-model OUT --preset tiny-depth`)"
        ) from None
    components = {name: pipe.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    return StableDiffusionDepth2ImgPipeline(**components, depth_estimator=depth_estimator, feature_extractor=processor)
