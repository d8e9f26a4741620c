"""Load a diffusion pipeline for generation through diffusers' Auto classes (SD 1.x, SD 2.x, SDXL and the
other text-to-image families they know): a local directory, a hub id in the HF cache, or one single-file
checkpoint; dtype, variant, device, scheduler, attention, LoRAs (several, weighted), ControlNet and the speed
options of `run`. Every user mistake becomes one `UserError` line.

A personalised LoRA output (from `dreamshard personalize`) is a directory holding
`pytorch_lora_weights.safetensors` and `dreamshard_lora.json` (`{"base_model": ..., "weights": ...}`):
pointing `model.path` at it loads the base model and applies the LoRA.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch

from dreamshard.config import ModelConfig, RunConfig
from dreamshard.errors import UserError, one_line

log = logging.getLogger(__name__)

LORA_MANIFEST = "dreamshard_lora.json"

# scheduler name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
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


def load_pipeline(model: ModelConfig, mode: str = "txt2img", device: str | None = None, speed: RunConfig | None = None):
    """The pipeline for `mode` (a name in engine/modes' registry), on its device, ready to call; `speed`
    applies run.compile, channels_last and the VAE options. Raises UserError on bad input."""
    from dreamshard.engine.modes import mode_for  # the modes build on this module's loaders

    generation_mode = mode_for(mode)
    torch_device = resolve_device(device or model.device)
    dtype = resolve_dtype(model.dtype, torch_device)
    base_path, _ = resolve_model_path(model)

    pipe = load_base_pipeline(base_path, model, dtype, depth=generation_mode.loads_depth)
    if model.vae:
        pipe.register_modules(vae=load_vae(model, dtype))
    apply_loras(pipe, lora_list(model))
    if model.scheduler:
        pipe.scheduler = make_scheduler(model.scheduler, pipe.scheduler.config)
    _set_attention(pipe, model.attention)
    pipe = generation_mode.build(pipe, model, dtype)  # shares the text-to-image pipeline's components (from_pipe)
    pipe.to(torch_device)
    if speed is not None:
        apply_speed_options(pipe, speed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe):
    """The network called at every step: the UNet, or the transformer of DiT pipelines."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def apply_speed_options(pipe, run: RunConfig) -> None:
    """channels_last, VAE slicing / tiling and torch.compile, in place: modules are shared with the pipelines
    built from this one (from_pipe), so those get them too."""
    controlnet = getattr(pipe, "controlnet", None)
    networks = [module for module in (denoiser(pipe), pipe.vae, controlnet) if module is not None]
    if run.channels_last:
        for module in networks:
            module.to(memory_format=torch.channels_last)
    if run.vae_slicing:
        pipe.vae.enable_slicing()
    if run.vae_tiling:
        pipe.vae.enable_tiling()
    if run.compile:
        # nn.Module.compile keeps the module object (configs, from_pipe, LoRA state stay as they are); the
        # first call of each new input shape compiles, later shapes of the same rank reuse a dynamic graph.
        denoiser(pipe).compile()
        pipe.vae.decoder.compile()
        if controlnet is not None:
            controlnet.compile()


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
    if model.single_file:
        return _single_file_path(model, path), lora
    if path.is_file():
        raise UserError(
            f"model path {path} is a file; set model.single_file: true to load a single-file checkpoint, or point model.path at a pipeline directory"
        )
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


def _single_file_path(model: ModelConfig, path: Path) -> str:
    if not path.is_file():
        raise UserError(f"model.single_file is true but {model.path} is not a file; point model.path at a .safetensors checkpoint")
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: single-file checkpoints must be .safetensors (.ckpt files are pickles, which dreamshard never loads)")
    config = model.single_file_config
    if config and _looks_local(config) and not (Path(config).expanduser() / "model_index.json").is_file():
        raise UserError(f"model.single_file_config {config} is not a diffusers pipeline directory (no model_index.json)")
    return str(path)


def lora_list(model: ModelConfig) -> list[tuple[str, float]]:
    """Every LoRA to apply, in order, with its scale: `model.lora` (or a personalised LoRA directory in
    model.path) at `model.lora_scale`, then each of `model.loras`."""
    _, first = resolve_model_path(model)
    loras = [(first, model.lora_scale)] if first else []
    return loras + [(lora.path, lora.scale) for lora in model.loras]


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
    """What the generated images depend on, by content: the base pipeline (or single-file checkpoint and the
    configs it is read with), its weight variant, every LoRA with its scale and the ControlNet; hub ids by the
    content of their snapshot in the local cache, with its commit. Stored in every sample's json `model` and in
    the dataset fingerprint."""
    base, _ = resolve_model_path(model)
    base_hash, revision = _content_hash(base, model.revision, model.local_files_only)
    config = model.single_file_config if model.single_file else None
    identity = {
        "id": model.path,
        "hash": base_hash,
        "revision": revision,
        "variant": model.variant,
        "config": _content_hash(config, None, model.local_files_only)[0] if config else None,
        "loras": [{"hash": model_fingerprint(path), "scale": scale} for path, scale in lora_list(model)],
        "controlnet": _content_hash(model.controlnet, None, model.local_files_only)[0] if model.controlnet else None,
    }
    if model.vae:  # only when set, so the fingerprints of runs made before the option stay valid
        identity["vae"] = _content_hash(model.vae, None, model.local_files_only)[0]
    return identity


def _content_hash(path_or_id: str, revision: str | None, local_files_only: bool) -> tuple[str, str | None]:
    """(content hash, hub commit or None) of a local model, or of a hub id: the content of its snapshot in the
    local HF cache; not cached and the hub allowed: the hub's commit for the revision (itself a content
    address), without downloading gigabytes on the driver; not cached and the hub not allowed: one line."""
    if Path(path_or_id).expanduser().exists() or _looks_local(path_or_id):
        return model_fingerprint(path_or_id), None
    from huggingface_hub import HfApi, snapshot_download

    try:
        snapshot = Path(snapshot_download(path_or_id, revision=revision, local_files_only=True))
        return model_fingerprint(snapshot), snapshot.name
    except Exception:  # noqa: BLE001 - not in the cache (or no such repo)
        if local_files_only:  # a name alone would let other weights under the same name into the run
            raise UserError(
                f"model {path_or_id!r}{f' at revision {revision}' if revision else ''} is not in this machine's Hugging Face cache "
                "(model.local_files_only is true; the driver hashes the weights before any worker starts): fill the cache "
                "(`hf download`, docs/cluster.md), point it at the cache with HF_HOME, or give a local directory"
            ) from None
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


def load_base_pipeline(path: str, model: ModelConfig, dtype: torch.dtype, depth: bool = False):
    """The text-to-image pipeline at `path` as stored (no LoRA, scheduler or attention changes), without its
    safety checker: dreamshard runs that itself (engine/quality.py), so a verdict is recorded, never dropped.
    `depth`: SD-2-depth's depth-to-image pipeline instead, with the model's own depth estimator (DPT,
    `depth_estimator/`) and image processor (`feature_extractor/`); no Auto class knows that family."""
    import diffusers
    import transformers

    # Loading bars from every worker process would interleave with the run's own progress display.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    where = "in the local Hugging Face cache (model.local_files_only is true)" if model.local_files_only else "on the hub"
    try:
        if model.single_file:
            return _load_single_file(path, model, dtype)
        hub = dict(local_files_only=model.local_files_only, revision=model.revision)
        index = diffusers.DiffusionPipeline.load_config(path, **hub)
        no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        variant = {"variant": model.variant} if model.variant else {}
        if depth:
            _check_depth_model(path, model, hub)
            return diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(path, dtype=dtype, **hub, **variant)
        return diffusers.AutoPipelineForText2Image.from_pretrained(path, dtype=dtype, **hub, **variant, **no_checker)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"cannot load model {path!r}: not found or incomplete {where} ({one_line(exc)}); "
            "download it on a machine with access or point model.path at a local pipeline directory"
        ) from None


def _check_depth_model(path: str, model: ModelConfig, hub: dict) -> None:
    """depth2img needs a UNet that takes the depth map as a fifth input channel (SD-2-depth's shapes)."""
    from diffusers import UNet2DConditionModel

    channels = UNet2DConditionModel.load_config(path, subfolder="unet", **hub).get("in_channels")
    if channels != 5:
        raise UserError(
            f"mode depth2img needs a depth-to-image model whose UNet takes 4 latent + 1 depth channels (e.g. stabilityai/stable-diffusion-2-depth); "
            f"the UNet of {model.path} takes {channels}"
        )


def _load_single_file(path: str, model: ModelConfig, dtype: torch.dtype):
    """A single-file checkpoint through its pipeline class's from_single_file. The component configs come from
    model.single_file_config, else from the HF cache snapshot of the family diffusers infers from the
    checkpoint's keys (diffusers itself would go to the hub despite local_files_only; we never let it)."""
    import diffusers

    config = model.single_file_config
    if config:
        index = diffusers.DiffusionPipeline.load_config(config, local_files_only=model.local_files_only)
        cls = getattr(diffusers, index["_class_name"], None)
    else:
        cls, config = _single_file_family(path, model.local_files_only)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise UserError(f"{path}: the pipeline class of model.single_file_config cannot load single-file checkpoints; use a diffusers directory")
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in inspect.signature(cls.__init__).parameters else {}
    return cls.from_single_file(path, config=config, dtype=dtype, local_files_only=model.local_files_only, **no_checker)


class _CheckpointHeader:
    """Names and shapes of a safetensors file, read from its header: what diffusers' family inference reads."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as checkpoint:
            self._shapes = {key: torch.Size(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.empty(self._shapes[key], device="meta")

    def keys(self):
        return self._shapes.keys()


def _single_file_family(path: str, local_files_only: bool):
    """(pipeline class, config location) of a checkpoint without model.single_file_config: SDXL-family
    checkpoints (by diffusers' own marker keys) load as StableDiffusionXLPipeline, others as
    StableDiffusionPipeline; the configs are those of the family's reference repo, from the HF cache."""
    import diffusers
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, fetch_diffusers_config
    from huggingface_hub import snapshot_download

    header = _CheckpointHeader(path)
    xl_markers = (CHECKPOINT_KEY_NAMES["xl_base"], CHECKPOINT_KEY_NAMES["xl_refiner"], CHECKPOINT_KEY_NAMES["playground-v2-5"])
    cls = diffusers.StableDiffusionXLPipeline if any(key in header for key in xl_markers) else diffusers.StableDiffusionPipeline
    repo = fetch_diffusers_config(header)["pretrained_model_name_or_path"]
    try:
        return cls, snapshot_download(repo, local_files_only=local_files_only, allow_patterns=["*.json", "*/*.json", "*/*.txt"])
    except Exception as exc:  # noqa: BLE001 - not cached (offline), or the hub refused
        raise UserError(
            f"{path} looks like a {repo} checkpoint, whose component configs are not in the HF cache ({one_line(exc)}); "
            "set model.single_file_config to a local diffusers pipeline of the same family (or allow the hub: model.local_files_only: false)"
        ) from None


def load_safety_checker(model: ModelConfig, device: torch.device, dtype: torch.dtype):
    """(StableDiffusionSafetyChecker, its CLIP image processor) from the model's `safety_checker` and
    `feature_extractor` folders (the single-file config's for a checkpoint)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    base, _ = resolve_model_path(model)
    where = model.single_file_config if model.single_file else base
    if not where:
        raise UserError("model.safety_checker with a single-file checkpoint needs model.single_file_config (a pipeline with a safety_checker folder)")
    hub = dict(local_files_only=model.local_files_only, revision=None if model.single_file else model.revision)
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(where, subfolder="safety_checker", dtype=dtype, **hub)
        processor = CLIPImageProcessor.from_pretrained(where, subfolder="feature_extractor", **hub)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.safety_checker is true but {where} has no loadable safety checker ({one_line(exc)}); "
            "SDXL and many fine-tunes ship none: set model.safety_checker: false"
        ) from None
    logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)  # we record verdicts; no per-image warning
    return checker.to(device).eval(), processor


def apply_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Load each LoRA as a peft adapter, weight them (set_adapters), then fuse them into the base weights once,
    so generation pays nothing per step (and torch.compile sees plain layers)."""
    if not loras:
        return
    names = []
    for number, (lora_path, _) in enumerate(loras):
        path = Path(lora_path).expanduser()
        if not path.exists():
            raise UserError(f"LoRA weights {lora_path} not found; set model.lora / model.loras[].path to a .safetensors file or directory")
        name = f"lora{number}"
        try:
            if path.is_dir():
                pipe.load_lora_weights(str(path), adapter_name=name)
            else:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"cannot apply LoRA weights {lora_path}: {one_line(exc)}") from None
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def _set_attention(pipe, attention: str) -> None:
    """sdpa: torch's scaled_dot_product_attention (AttnProcessor2_0); eager: explicit matmul + softmax
    (AttnProcessor). UNet-family networks only: transformer pipelines keep their own (SDPA) processors."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor2_0() if attention == "sdpa" else AttnProcessor()
    for module in (getattr(pipe, "unet", None), pipe.vae):
        if module is not None:
            module.set_attn_processor(processor)


def load_vae(model: ModelConfig, dtype: torch.dtype):
    """model.vae: an AutoencoderKL (directory or hub id in the cache) in place of the pipeline's own."""
    from diffusers import AutoencoderKL

    assert model.vae is not None
    if _looks_local(model.vae) and not Path(model.vae).expanduser().exists():
        raise UserError(f"model.vae {model.vae} not found; give an AutoencoderKL directory or a hub id in the Hugging Face cache")
    try:
        return AutoencoderKL.from_pretrained(model.vae, dtype=dtype, local_files_only=model.local_files_only)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model.vae {model.vae!r}: {one_line(exc)}") from None


def load_controlnet(model: ModelConfig, dtype: torch.dtype):
    from diffusers import ControlNetModel

    if not model.controlnet:
        raise UserError("mode controlnet_seg needs model.controlnet (a ControlNet directory or hub id)")
    if _looks_local(model.controlnet) and not Path(model.controlnet).expanduser().exists():
        raise UserError(f"ControlNet {model.controlnet} not found; build one with `dreamshard tiny-model OUT --preset tiny-controlnet`")
    try:
        return ControlNetModel.from_pretrained(model.controlnet, dtype=dtype, local_files_only=model.local_files_only)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load ControlNet {model.controlnet!r}: {one_line(exc)}") from None
