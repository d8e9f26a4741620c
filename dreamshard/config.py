"""YAML configs validated by pydantic.

Every schema derives from `Strict` (unknown keys are errors). `load_config` reads a YAML file, applies
`--set dotted.key=value` overrides and validates; any problem becomes one `ConfigError` line naming the
file, the key, what is wrong and what is allowed.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dreamshard.errors import ConfigError


class Strict(BaseModel):
    """Base of every config section: unknown keys are an error, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SchemaT = TypeVar("SchemaT", bound=BaseModel)


# --------------------------------------------------------------------------------------------- model


SchedulerName = Literal["ddim", "pndm", "euler", "euler_a", "dpm++", "dpm++_sde", "lms", "heun", "unipc", "ddpm"]


class ModelConfig(Strict):
    """Which Stable Diffusion pipeline to load and how."""

    path: str = ".cache/tiny-sd"  # local pipeline directory or a hub id ("stable-diffusion-v1-5/...")
    local_files_only: bool = True  # never touch the network unless the user says so
    revision: str | None = None
    scheduler: SchedulerName | None = None  # None keeps the pipeline's own scheduler
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp32 on CPU, fp16 on GPU
    device: str = "auto"  # auto: cuda if available, else cpu
    attention: Literal["sdpa", "default"] = "sdpa"
    lora: str | None = None  # a LoRA safetensors file or directory applied on load
    lora_scale: float = 1.0
    controlnet: str | None = None  # a ControlNetModel directory (conditioned modes)
    safety_checker: bool = False


# ------------------------------------------------------------------------ labelled source datasets


class SourceConfig(Strict):
    """A labelled source dataset on disk (read by `dreamshard.trainer.sources`, shared by engine and trainer).

    Layouts: `cityscapes` (leftImg8bit/{split}/{city}/*_leftImg8bit.png + gtFine/{split}/{city}/*_gtFine_labelIds.png),
    `gta5` (images/*.png + labels/*.png), `synthia` (RGB/*.png + GT/LABELS/*.png, 16-bit), `generic`
    (images/ + labels/ with the same stems). `labels` says what the label files hold; `auto` is the layout's
    own (Cityscapes ids for cityscapes and gta5, SYNTHIA ids for synthia, train ids for generic), `train_ids`
    reads already-converted `*_labelTrainIds.png` files (generic: the label files themselves).
    """

    layout: Literal["cityscapes", "gta5", "synthia", "generic"] = "cityscapes"
    root: str
    split: str = "train"  # cityscapes only
    labels: Literal["auto", "cityscapes_ids", "synthia_ids", "train_ids"] = "auto"
    id_map: dict[int, int] = {}  # generic: raw label value -> train id (unlisted values are errors); overrides `labels`
    num_classes: int = 19
    scan: Literal["full", "sizes"] = "full"  # full: also decode every label to check its values before use
    skip_bad: bool = False  # skip (and count) items with a missing label, unknown values or a size mismatch
    shuffle: bool = False  # a seeded permutation of the sorted items
    seed: int = 0
    limit: int | None = None  # use only the first N items (after shuffling)


class ConditionConfig(Strict):
    """How the conditioned modes (img2img, controlnet_seg) use each sample's source item.

    `strength` is the img2img strength: how far the source image is noised before denoising (img2img needs
    one; DIDEX uses 0.9). In controlnet_seg, None starts from pure noise and a value starts from the noised
    source latent instead (ZoDi: 0.6-0.9 per domain). `strength_by_style` sets it per style value (e.g.
    {"driving at night": 0.9}); a prompt-file column `strength` sets it per row. Generation runs at
    sampling.width x height; the output image is then resized (Lanczos) to the source label's size, so
    `seg.png` holds the source labels exactly, never resized.
    """

    strength: float | None = None
    strength_by_style: dict[str, float] = {}
    controlnet_scale: float = 1.0  # controlnet_conditioning_scale
    palette: str | list[str | tuple[int, int, int]] = "cityscapes"  # colours of the label map shown to ControlNet


# ---------------------------------------------------------------------------------- generate (engine)
# Sections owned by the engine: prompts + sampling (the plan), output + run (the Ray run).


class TemplateConfig(Strict):
    text: str  # placeholders: {token} {cls} and any style axis name, e.g. {weather}; {{ }} for braces
    weight: float = 1.0  # relative chance of this template per sample
    negative_prompt: str | None = None  # None: prompts.negative_prompt


class PromptsConfig(Strict):
    """What each sample shows: the prompt plan (see dreamshard/engine/plan.py for the exact rules).

    recipe `templates` covers DATUM (token + class round robin) and DIDEX (style axes x classes, balanced);
    recipe `file` covers CLOUDS (prompts read from a file, sample i takes row i mod rows).
    """

    recipe: Literal["templates", "file"] = "templates"
    token: str = "sks"  # the personalisation identifier
    classes: list[str] = ["car", "bus", "truck", "person", "rider", "motorcycle", "bicycle", "train"]
    class_weights: dict[str, float] = {}  # class -> weight (1.0 if unlisted); needs weighted/least_generated
    balance: Literal["round_robin", "weighted", "least_generated"] = "round_robin"
    templates: list[TemplateConfig] = [TemplateConfig(text="a photo of a {token} {cls}")]
    styles: dict[str, list[str]] = {}  # DIDEX axes: {weather: [rainy, snowy], time_of_day: [...]}
    negative_prompt: str = ""
    file: str | None = None  # recipe "file": .txt (one prompt a line), .jsonl or .parquet; relative to cwd
    file_column: str = "prompt"  # the prompt's column in .jsonl / .parquet; other columns go to extra


class SamplingConfig(Strict):
    """How each sample is drawn: size, steps and guidance (a fixed value or a [low, high] range per sample)."""

    width: int = 512
    height: int = 512
    steps: int | tuple[int, int] = 50
    guidance_scale: float | tuple[float, float] = 7.5


class OutputConfig(Strict):
    path: str = "runs/quickstart"  # local directory or fsspec URL (s3://, gs://)
    samples_per_shard: int = 1000
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = 95


class RunConfig(Strict):
    seed: int = 0
    num_samples: int = 1000
    batch_size: int = 4
    workers: int = 2  # CPU actors when no GPU is visible
    gpus_per_worker: float = 1.0
    torch_threads: int = 1  # per CPU worker
    max_shard_retries: int = 3


class GenerateConfig(Strict):
    mode: Literal["txt2img", "img2img", "controlnet_seg"] = "txt2img"
    model: ModelConfig = ModelConfig()
    prompts: PromptsConfig = PromptsConfig()
    sampling: SamplingConfig = SamplingConfig()
    output: OutputConfig = OutputConfig()
    run: RunConfig = RunConfig()


# ------------------------------------------------------------------------------------- personalize
# DreamBooth personalisation (`dreamshard personalize`), owned by dreamshard.engine.personalize.
# Output layout: OUT/ is the final model (a full pipeline directory, or a LoRA directory with
# dreamshard_lora.json), OUT/checkpoint-{step}/ every `output.checkpoint_every` steps before the last is the
# same kind of loadable output, OUT/train_log.jsonl the per-step log, OUT/class_images/ the prior images.


class InstanceConfig(Strict):
    """The target image(s) and the prompt that names them with the identifier token."""

    images: str | list[str] = "data/one_shot_image"  # a folder of images, or a list of image files
    prompt: str = "a photo of a sks urban scene"


class PriorPreservationConfig(Strict):
    """Class images generated by the base model keep the class prior while the instance is learnt."""

    enabled: bool = False
    class_prompt: str = "a photo of an urban scene"
    num_images: int = Field(200, gt=0)  # generated once, cached under OUT/class_images/
    loss_weight: float = 1.0
    steps: int = Field(50, gt=0)  # sampling steps per class image
    guidance_scale: float = 7.5


class PersonalizeTrainConfig(Strict):
    method: Literal["full", "lora"] = "full"
    max_steps: int = Field(1000, gt=0)  # optimizer steps
    lr: float | None = None  # None: 5e-6 for full fine-tuning, 1e-4 for LoRA
    batch_size: int = Field(1, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    resolution: int = Field(512, gt=0, multiple_of=8)  # square crop size (SD's VAE downsamples 8x)
    resize: int | None = Field(None, gt=0)  # shorter side before the random crop; None: = resolution
    flip: bool = False  # random horizontal flip
    train_text_encoder: bool = True  # full: fine-tune it too; lora: add LoRA layers to it too
    lora_rank: int = Field(4, gt=0)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, none on CPU
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 0


class PersonalizeOutputConfig(Strict):
    path: str = "runs/personalize"
    checkpoint_every: int = Field(200, gt=0)  # also the resume points


class PersonalizeConfig(Strict):
    model: ModelConfig = ModelConfig()  # the base model (a full pipeline; path, device, dtype for class images)
    instance: InstanceConfig = InstanceConfig()
    prior: PriorPreservationConfig = PriorPreservationConfig()
    train: PersonalizeTrainConfig = PersonalizeTrainConfig()
    output: PersonalizeOutputConfig = PersonalizeOutputConfig()


# ---------------------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[list[str], Any]]:
    """`["a.b=1", "c=[x, y]"]` → `[(["a","b"], 1), (["c"], ["x","y"])]`; values are parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set output.path=runs/x")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({_first_line(exc)})") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set each dotted key in a nested dict (creating sections as needed); returns the dict."""
    for parts, value in parse_overrides(overrides):
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {'.'.join(parts)}: '{where}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (pass the path of a YAML file, e.g. configs/quickstart.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def validate(schema: type[SchemaT], data: dict, source: str = "config") -> SchemaT:
    """Validate a dict against a schema; the first problem becomes one ConfigError line."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_error(schema, exc, source)) from None


def load_config(path: str | Path, schema: type[SchemaT], overrides: list[str] | tuple[str, ...] = ()) -> SchemaT:
    """Read YAML, apply `--set` overrides, validate against `schema`."""
    data = apply_overrides(read_yaml(path), overrides)
    return validate(schema, data, str(path))


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what runs write next to their outputs)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------ error messages


def describe_error(schema: type[BaseModel], exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc) or "(top level)"
    extra = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(schema, loc[:-1])
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"{source}: unknown key '{key}'{hint}{extra}"
    if err["type"] == "missing":
        return f"{source}: key '{key}' is required{extra}"
    return f"{source}: key '{key}': {err['msg']} (got {_short(err.get('input'))}){extra}"


def _allowed_keys(schema: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the (nested) model reached by following `loc` from `schema`."""
    model: Any = schema
    for part in loc:
        model = _model_in(model.model_fields[part].annotation) if part in getattr(model, "model_fields", {}) else None
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation like `Foo`, `Foo | None`, `list[Foo]`, `dict[str, Foo]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
