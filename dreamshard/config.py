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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dreamshard.errors import ConfigError, one_line


class Strict(BaseModel):
    """Base of every config section: unknown keys are an error, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SchemaT = TypeVar("SchemaT", bound=BaseModel)

# The generation modes' names (engine/modes holds one object per mode; tests/test_modes.py checks the two agree).
ModeName = Literal["txt2img", "img2img", "controlnet_seg", "depth2img"]
MODES: tuple[str, ...] = typing.get_args(ModeName)


# --------------------------------------------------------------------------------------------- model


SchedulerName = Literal["ddim", "pndm", "euler", "euler_a", "dpm++", "dpm++_sde", "lms", "heun", "unipc", "ddpm"]


class LoraConfig(Strict):
    """One LoRA applied on load, weighted by `scale` (several are combined as peft adapters)."""

    path: str  # a .safetensors file, or a directory holding pytorch_lora_weights.safetensors
    scale: float = 1.0


class ModelConfig(Strict):
    """Which diffusion pipeline to load and how (SD 1.x, SD 2.x, SDXL and other diffusers Auto pipelines)."""

    path: str = ".cache/tiny-sd"  # local pipeline directory, a hub id ("stable-diffusion-v1-5/..."), or a checkpoint file (single_file)
    local_files_only: bool = True  # never touch the network unless the user says so
    revision: str | None = None
    variant: str | None = None  # weight files of this variant, e.g. "fp16" (unet/diffusion_pytorch_model.fp16.safetensors)
    # `path` is one .safetensors checkpoint in the original (A1111 / CompVis) layout, loaded with from_single_file.
    single_file: bool = False
    # single_file: a diffusers pipeline directory (or a hub id in the HF cache) whose component configs describe
    # the checkpoint; None: diffusers infers the model family from the checkpoint and needs that family's
    # configs in the HF cache (or the hub, with local_files_only false).
    single_file_config: str | None = None
    scheduler: SchedulerName | None = None  # None keeps the pipeline's own scheduler
    # auto: fp32 on CPU, fp16 on GPU. SDXL-family VAEs overflow in fp16, so diffusers decodes them in fp32
    # (force_upcast) on every call: bfloat16 needs no upcast, or give an fp16-safe `vae`.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Another VAE (an AutoencoderKL directory or a hub id in the HF cache) in place of the pipeline's own, e.g.
    # madebyollin/sdxl-vae-fp16-fix: SDXL's decoder without its fp16 overflow. Part of the fingerprint by content.
    vae: str | None = None
    device: str = "auto"  # auto: cuda if available, else cpu
    # sdpa: PyTorch scaled_dot_product_attention (flash / memory-efficient kernels); eager: the explicit
    # matmul-softmax-matmul attention (slow, for comparison and debugging).
    attention: Literal["sdpa", "eager"] = "sdpa"
    lora: str | None = None  # a LoRA safetensors file or directory applied on load (weighted by lora_scale)
    lora_scale: float = 1.0
    loras: list[LoraConfig] = []  # more LoRAs, each with its own scale, after `lora`
    controlnet: str | None = None  # a ControlNetModel directory (conditioned modes)
    # Run the pipeline's own safety checker (its safety_checker folder) on every image: the verdict goes into
    # each sample's `nsfw`; flagged images are redrawn (quality.reject_nsfw) or kept as black frames.
    safety_checker: bool = False

    @field_validator("attention", mode="before")
    @classmethod
    def _renamed_attention(cls, value):
        if value == "default":
            raise ValueError("'default' was renamed: it selected the slow non-SDPA attention, now called 'eager'; the default is 'sdpa'")
        return value


# ------------------------------------------------------------------------ labelled source datasets


class SourceConfig(Strict):
    """A labelled source dataset on disk (read by `dreamshard.datasets.sources`, shared by engine and trainer).

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
    """How the conditioned modes (img2img, depth2img, controlnet_seg) use each sample's source item.

    `strength` is the img2img strength: how far the source image is noised before denoising (img2img and
    depth2img need one; DIDEX uses 0.9). In controlnet_seg, None starts from pure noise and a value starts
    from the noised source latent instead (ZoDi: 0.6-0.9 per domain). `strength_by_style` sets it per style
    value (e.g. {"driving at night": 0.9}); a prompt-file column `strength` sets it per row. `init_noise` is
    the noise that takes the source latent to the first denoising timestep: `random` (SDEdit, diffusers'
    img2img) or `stochastic_inversion` (ZoDi: the UNet's own prediction ε_θ(x_t, t, c) at that timestep;
    controlnet_seg and img2img, samples with a strength). Generation runs at sampling.width x height; the
    output image is then resized (Lanczos) to the source label's size, so `seg.png` holds the source labels
    exactly, never resized.
    """

    strength: float | None = None
    strength_by_style: dict[str, float] = {}
    init_noise: Literal["random", "stochastic_inversion"] = "random"
    # Where stochastic_inversion inverts: `first_step`, at the first denoising timestep (diffusers' img2img
    # noising; 851 for 20 DDIM steps at strength 0.9), or `zodi`, at int(strength x 1000) on the training
    # scale as ZoDi's code does (900), the denoising then starting from the schedule's step below it (851).
    inversion_timestep: Literal["first_step", "zodi"] = "first_step"
    controlnet_scale: float = 1.0  # controlnet_conditioning_scale
    # The colours of the label map shown to ControlNet: `cityscapes` (the 19 train ids' colours, other ids
    # black), `cityscapes_color` (cityscapesScripts' 34 label-id colours, the *_gtFine_color.png that ZoDi
    # feeds; needs a source with Cityscapes label ids: cityscapes or gta5), or one colour per train id.
    palette: str | list[str | tuple[int, int, int]] = "cityscapes"


# ---------------------------------------------------------------------------------- generate (engine)
# Sections owned by the engine: prompts + sampling (the plan), output + run (the Ray run).


class TemplateConfig(Strict):
    # Placeholders: {token} {cls}, any style axis name (e.g. {weather}) and, in conditioned modes, {classes}:
    # the classes present in the sample's source label (DIDEX); {{ }} for braces.
    text: str
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
    # The words {cls} stands for in the prompt, per class (unlisted: the class name). DATUM prompts plural nouns
    # ("a photo of sks cars"): {car: cars, ...}. The sample's class_name stays the class, as the trainer names it.
    class_words: dict[str, str] = {}
    # Conditioned modes, the {least_class} placeholder (DIDEX): classes never named there (DIDEX's SYNTHIA
    # script: terrain, truck, train, which SYNTHIA lacks).
    least_class_exclude: list[str] = []
    balance: Literal["round_robin", "weighted", "least_generated"] = "round_robin"
    templates: list[TemplateConfig] = [TemplateConfig(text="a photo of a {token} {cls}")]  # {classes}: see TemplateConfig
    styles: dict[str, list[str]] = {}  # DIDEX axes: {weather: [rainy, snowy], time_of_day: [...]}
    # Conditioned modes: make every source item once with every value of this style axis (ZoDi: each image in
    # each domain). Sample i takes item i // V with value i mod V (V values), so run.num_samples must be
    # items x V; null: the axis is drawn per sample like the others.
    pair_items_with: str | None = None
    negative_prompt: str = ""
    file: str | None = None  # recipe "file": .txt (one prompt a line), .jsonl or .parquet; relative to cwd
    file_column: str = "prompt"  # the prompt's column in .jsonl / .parquet; other columns go to extra


class SamplingConfig(Strict):
    """How each sample is drawn: size, steps and guidance (a fixed value or a [low, high] range per sample)."""

    width: int = 512  # multiples of 8
    height: int = 512
    steps: int | tuple[int, int] = 50  # [low, high]: an integer drawn per sample, both ends included
    guidance_scale: float | tuple[float, float] = 7.5  # [low, high]: drawn per sample, rounded to 0.001
    # DDIM's eta (0: deterministic DDIM, 1: DDPM-like; ZoDi: 1); other than 0 needs a DDIM scheduler (model.scheduler: ddim)
    eta: float = Field(0.0, ge=0, le=1)


class OutputConfig(Strict):
    """Where and how shards are written (layout: docs/format.md)."""

    path: str = "runs/quickstart"  # local directory or fsspec URL (s3://, gs://); shared by all nodes
    # Samples per shard (the last may be short). `auto`: chosen from num_samples when the output is new (about
    # 256 shards, so every GPU of a large cluster has work, at least two full calls per call group and at
    # most 1000 per shard) and recorded in the run, so a resume or an extension on any cluster keeps it.
    samples_per_shard: int | Literal["auto"] = "auto"
    image_format: Literal["jpg", "png", "webp"] = "jpg"  # one image field for the whole dataset
    quality: int = Field(95, ge=1, le=100)  # jpg / webp
    # The dataset card's licence (README.md, `dreamshard push`): a Hub licence id such as creativeml-openrail-m
    # (SD 1.5's images), openrail++ (SDXL's), cc-by-4.0; "other" when unsure. Not part of the run's identity.
    license: str = "other"

    @field_validator("samples_per_shard")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be a positive number of samples, or auto")
        return value

    @property
    def shard_size(self) -> int:
        """samples_per_shard once resolved (engine/records.py resolves `auto` before any work)."""
        if self.samples_per_shard == "auto":
            raise ValueError("output.samples_per_shard is auto: resolve it first (engine.records.resolved_config)")
        return self.samples_per_shard


class RunConfig(Strict):
    """How many samples, and how the Ray workers generate them."""

    seed: int = 0  # the run seed: with prompts + sampling it fixes every sample's prompt and noise
    num_samples: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)  # samples per pipeline call
    workers: int = Field(2, ge=1)  # CPU actors when no GPU is visible (GPU clusters: one per gpus_per_worker)
    gpus_per_worker: float = Field(1.0, gt=0)  # fractions put several small-model workers on one GPU
    torch_threads: int = Field(1, ge=1)  # per CPU worker
    max_shard_retries: int = Field(3, ge=0)  # re-runs of a shard whose worker died or failed
    # Once every shard is handed out, idle workers make a backup copy of the slowest shards in flight; the
    # first copy to finish is committed, the other discarded (a slow GPU or node no longer sets the tail).
    backups: bool = True
    # Kill and retry a worker that has not finished a shard for this long (a hung GPU); raise it for shards
    # that take longer (1,000 images of a slow model); null: never.
    shard_timeout_s: float | None = Field(3600.0, gt=0)
    # Stop (exit 1, resumable) when no worker is ready and none could be started for this long (no resources,
    # every model load failing, nodes gone); 0: wait forever (autoscaling clusters).
    worker_start_timeout_s: float = Field(300.0, ge=0)
    # Speed options (docs/benchmarks.md measures each). They change pixels by float rounding at most, like
    # batch_size, except vae_tiling (tile seams are blended), which is part of the dataset fingerprint.
    compile: bool = False  # torch.compile the UNet (or transformer) and the VAE decoder; the first batches pay the compile
    channels_last: bool = False  # UNet / VAE / ControlNet in channels-last memory format (faster convolutions on GPUs)
    vae_slicing: bool = False  # decode a batch one image at a time: less peak memory
    vae_tiling: bool = False  # decode (and encode) large images in overlapping tiles: far less memory at 1024+ pixels


class QualityConfig(Strict):
    """Scores attached to every sample and the filter that redraws rejected ones (engine/quality.py).

    A rejected sample is redrawn with the next seed of its own seed stream (from its plan seed and the attempt
    number only), so the dataset stays exactly num_samples long and reproducible. After max_attempts draws
    the best one is kept (not flagged, not blank, highest CLIP score; ties to the earliest) and counted as
    exhausted in its shard's marker (`dreamshard inspect` shows it).
    """

    clip_model: str | None = None  # a local CLIPModel directory (with its processor): every image gets a clip_score
    min_clip_score: float | None = None  # redraw images scoring below (100 x cosine of image and prompt embeddings)
    reject_nsfw: bool = False  # redraw images the safety checker flags (needs model.safety_checker)
    reject_blank: bool = False  # redraw near-constant images (pixel standard deviation below 2 of 255)
    max_attempts: int = Field(5, ge=1)  # draws per sample at most


class GenerateConfig(Strict):
    mode: ModeName = "txt2img"
    model: ModelConfig = ModelConfig()
    prompts: PromptsConfig = PromptsConfig()
    sampling: SamplingConfig = SamplingConfig()
    output: OutputConfig = OutputConfig()
    run: RunConfig = RunConfig()
    source: SourceConfig | None = None  # img2img / depth2img / controlnet_seg: the labelled source dataset
    condition: ConditionConfig = ConditionConfig()  # conditioned modes: strength, initial noise, ControlNet scale, palette
    quality: QualityConfig = QualityConfig()  # scores in every sample's json; which samples are redrawn

    @model_validator(mode="after")
    def _quality_needs(self) -> GenerateConfig:
        if self.quality.min_clip_score is not None and not self.quality.clip_model:
            raise ValueError("quality.min_clip_score needs quality.clip_model (a local CLIP model directory)")
        if self.quality.reject_nsfw and not self.model.safety_checker:
            raise ValueError("quality.reject_nsfw needs model.safety_checker: true (the checker's verdict is what it rejects)")
        return self


# ------------------------------------------------------------------------------------- personalize
# DreamBooth personalisation (`dreamshard personalize`), owned by dreamshard.personalize.dreambooth.
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
    lr: float | None = Field(None, gt=0)  # None: 5e-6 for full fine-tuning, 1e-4 for LoRA
    batch_size: int = Field(1, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    resolution: int = Field(512, gt=0, multiple_of=8)  # square crop size (SD's VAE downsamples 8x)
    resize: int | None = Field(None, gt=0)  # instance images: shorter side before the random crop; None: = resolution (class images: native size)
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
    # The model card's licence (OUT/README.md): the base model's, e.g. creativeml-openrail-m for SD 1.5.
    license: str = "other"


class PersonalizeConfig(Strict):
    model: ModelConfig = ModelConfig()  # the base model (a full pipeline; path, device, dtype for class images)
    instance: InstanceConfig = InstanceConfig()
    prior: PriorPreservationConfig = PriorPreservationConfig()
    train: PersonalizeTrainConfig = PersonalizeTrainConfig()
    output: PersonalizeOutputConfig = PersonalizeOutputConfig()


# ------------------------------------------------------------------------------------------- train
# Sections owned by the trainer (`dreamshard train` / `eval`): data, model, method (DACS options), optimiser.


class ShardsConfig(Strict):
    """Engine shards: a run directory (committed shards only), a glob or a brace pattern, on the local disk or
    any fsspec URL (s3://, gs://, http(s)://, ...); `pipe:` URLs only with data.allow_pipe."""

    path: str
    subset: int | None = Field(None, ge=1)  # the first N samples of the run's manifest (scaling studies)
    # The order `subset` takes its first N from: the manifest's, or class-stratified (every class's k-th
    # sample before any class's (k+1)-th; ties by index), so each prefix is as balanced as the data allows.
    subset_order: Literal["manifest", "stratified"] = "manifest"
    # The epoch order (trainer/order.py): shards in a seeded order per epoch, grouped into blocks of whole
    # shards holding at least this many samples, samples shuffled within a block. Larger mixes more; each
    # DataLoader worker holds one or two blocks' encoded samples in memory. 0: samples in shard order.
    shuffle_block: int = Field(1024, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, values: Any) -> Any:
        retired = [key for key in ("resampled", "shuffle_buffer") if isinstance(values, dict) and key in values]
        if retired:
            raise ValueError(
                f"{' and '.join(retired)} no longer exist{'s' if len(retired) == 1 else ''}: the trainer reads shards in a seeded epoch order "
                "that resumes exactly at any number of ranks (see docs/cluster.md); remove them (shuffle_block sets how far samples mix)"
            )
        return values


class DomainConfig(Strict):
    """One domain's images: a labelled folder dataset (`folder`) or engine shards (`shards`), and its resize."""

    folder: SourceConfig | None = None
    shards: ShardsConfig | None = None
    resize: tuple[int, int] | None = None  # (height, width) before cropping; None keeps the stored size
    # `exact`: to height x width; `keep_ratio`: mmseg's Resize(keep_ratio=True), the largest size whose long
    # and short sides fit resize's long and short sides, each rounded (GTA5's 1914x1052 at [720, 1280] → 704x1280).
    resize_mode: Literal["exact", "keep_ratio"] = "exact"
    # The image kernel: `pil` (bilinear with antialiasing), `pil_lanczos` (ZoDi) or `cv2` (OpenCV's
    # INTER_LINEAR, as mmseg's pipelines resize: no antialiasing; labels then as cv2's INTER_NEAREST), the
    # latter computed with torch (OpenCV's fixed-point rounding can differ by one grey level).
    resize_kernel: Literal["pil", "pil_lanczos", "cv2"] = "pil"
    # Evaluation: score at the resized image's size, the labels resized to it (nearest) as ZoDi does (its ACDC
    # at 512x1024); default: the logits resized to the labels' full resolution (DAFormer, mmseg).
    resize_labels: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> DomainConfig:
        if (self.folder is None) == (self.shards is None):
            raise ValueError("give exactly one of 'folder' (a dataset on disk) or 'shards' (engine shards)")
        return self


class ColorJitterConfig(Strict):
    """Colour jitter in the weak augmentation (ZoDi's, torchvision semantics, every image): brightness,
    contrast and saturation factors from U(1 - x, 1 + x), hue from U(-h, h) (a fraction of the colour circle),
    applied in that order, each image its own draws."""

    brightness: float = Field(0.5, ge=0)
    contrast: float = Field(0.5, ge=0)
    saturation: float = Field(0.5, ge=0)
    hue: float = Field(0.3, ge=0, le=0.5)


class TrainDataConfig(Strict):
    source: DomainConfig | None = None  # labelled source (GTA5, SYNTHIA, ... or shards carrying seg.png)
    target: DomainConfig | None = None  # pseudo-target: unlabelled for dacs, seg.png for supervised_synthetic
    val: DomainConfig | None = None  # labelled target evaluation set
    crop_size: tuple[int, int] = (512, 512)  # (height, width)
    flip: bool = True
    cat_max_ratio: float = Field(0.75, gt=0, le=1)  # source crops: re-crop (10 tries) until no class covers more
    # Samples per iteration and domain: `global_batch_size` over all ranks and grad_accum steps together, so
    # N GPUs run a fixed recipe N times faster; or `batch_size` per rank and step (the global batch then
    # grows with the ranks). global_batch_size wins when both are set.
    batch_size: int = Field(2, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    workers: int = Field(4, ge=0)  # DataLoader workers per domain and rank
    pin_memory: bool | None = None  # None: on when training on cuda (host-to-device copies then overlap compute)
    # Image decoding of shard samples in the workers: torchvision.io (libjpeg-turbo / libpng / libwebp into
    # tensors, antialiased resize) or PIL (JPEGs decode at a reduced DCT scale when the resize shrinks them).
    # bench/bench_trainer.py measured torchvision as fast or faster in every setting (docs/benchmarks.md).
    decoder: Literal["torchvision", "pil"] = "torchvision"
    record_samples: bool = False  # write each rank's sample keys per iteration to OUTPUT/samples/rank{r}.jsonl
    color_jitter: ColorJitterConfig | None = None  # weak colour jitter on every training image (ZoDi); None: none
    # Source images as the twins of the target samples (ZoDi): for each target sample, the source item its
    # json `source_key` names, cropped and flipped with the same window (the two must have one size after the
    # resize). The source then follows the target's epoch order.
    paired: bool = False
    cache_dir: str = ".cache/dreamshard"  # rare-class-sampling statistics, computed once per source dataset
    # Shard streams skip bad shards and samples, but stop (one line, exit 1) when more than this share of the
    # shards read so far failed, or every one did.
    max_bad_fraction: float = Field(0.5, ge=0, le=1)
    allow_pipe: bool = False  # `pipe:` shard URLs run a shell command; off unless you mean it


class HRDAConfig(Strict):
    """HRDA's multi-resolution training and inference (Hoyer et al., ECCV 2022; lhoyer/HRDA, lhoyer/MIC seg/):
    a low-resolution context (the whole crop at `lr_scale`) and a high-resolution detail crop (`hr_crop_size`
    at full resolution, its corner on a grid of `crop_divisible`) through one backbone and one head, fused by a
    learned scale attention from the context features. Inference: the context over the whole input, the detail
    in overlapping sliding windows of `hr_crop_size` (stride half of it), the attention everywhere."""

    enabled: bool = False
    lr_scale: float = Field(0.5, gt=0, lt=1)
    hr_crop_size: tuple[int, int] = (512, 512)  # (height, width) of the detail crop at full resolution
    crop_divisible: int = Field(8, ge=1)  # HRDA: 8 (the context logits' stride: 4 / 0.5)
    attention_embed_dim: int = Field(256, ge=8)
    attention_classwise: bool = True  # one attention map per class (HRDA's default) or one for all
    hr_loss_weight: float = Field(0.1, ge=0, le=1)  # the detail crop's own loss; the fused one gets 1 - this
    fixed_attention: float | None = Field(None, ge=0, le=1)  # an ablation: a constant attention instead of the learned one
    hr_slide_overlapping: bool = True  # inference windows at a stride of half the detail crop (else the crop)


class TrainModelConfig(Strict):
    """The segmenter: a backbone (a SegFormer MiT encoder `mit_b0`..`mit_b5`, or any timm model with
    features_only: resnet*, convnext*, pvt_v2_*) and a decode head.

    `pretrained` must be given: the backbone's (ImageNet) weights, or the word `none` for a random
    initialisation (the toy configs; UDA results from random backbones are far below the papers'). Weights:
    a local file (.safetensors; timm backbones also .pth), or for mit_* a model directory or a hub id in the
    Hugging Face cache (e.g. nvidia/mit-b5; the hub itself only with local_files_only: false).
    """

    backbone: str = "resnet101"
    pretrained: str | None = None  # weights file / directory / hub id, or "none"; unset is an error at train time
    local_files_only: bool = True  # mit_* hub ids: read the Hugging Face cache only, never the network
    decoder: Literal["daformer", "segformer", "deeplabv2", "deeplabv3plus"] = "daformer"
    # ASPP rates; None: the decoder's own (daformer 1/6/12/18, deeplabv2 6/12/18/24, deeplabv3plus 6/12/18). DAFormer's and DATUM's
    # DeepLabV2 ("dlv2red") keeps only [6, 12], as earlier UDA work did.
    dilations: list[int] | None = None
    embed_dim: int = Field(256, ge=8)  # daformer / segformer / deeplabv3plus channels (deeplabv2 classifies the last stage directly)
    dropout: float = Field(0.1, ge=0, lt=1)
    num_classes: int = Field(19, ge=2, le=255)
    class_names: list[str] = []  # empty: the 19 Cityscapes classes, or class0..N-1
    # The daformer / segformer heads' initialisation: `pytorch` (its defaults) or `daformer` (mmcv's: kaiming-
    # normal fan_out for the BN-ReLU convs, a N(0, 0.01) classifier), which the paper configs use. On the
    # toy shift from a random backbone `daformer` trains worse (docs/benchmarks.md).
    head_init: Literal["pytorch", "daformer"] = "pytorch"
    # Train the decode head only, the backbone kept as loaded (CLOUDS freezes its CLIP ConvNeXt; its
    # BatchNorm/LayerNorm statistics stay too).
    freeze_backbone: bool = False
    hrda: HRDAConfig = HRDAConfig()

    @property
    def random_init(self) -> bool:
        return self.pretrained is not None and self.pretrained.strip().lower() == "none"

    @model_validator(mode="after")
    def _dilations_fit(self) -> TrainModelConfig:
        if self.dilations is not None:
            if self.decoder == "segformer":
                raise ValueError("dilations apply to the daformer, deeplabv2 and deeplabv3plus decoders only (segformer fuses with a 1x1 conv)")
            if not self.dilations or min(self.dilations) < 1:
                raise ValueError("dilations must be a non-empty list of rates >= 1, e.g. [6, 12, 18, 24]")
        return self


class RCSConfig(Strict):
    """Rare Class Sampling of source images (DAFormer)."""

    enabled: bool = False
    class_temp: float = Field(0.01, gt=0)
    min_pixels: int = Field(3000, ge=0)  # a file counts for class c when it has more pixels of c
    min_crop_ratio: float = Field(0.5, ge=0)  # re-crop until the crop has > min_pixels * ratio pixels of c


class FDConfig(Strict):
    """ImageNet Feature Distance on thing classes: keeps the last backbone stage close to the pretrained
    backbone's features, so it needs `model.pretrained` weights (refused with `pretrained: none`)."""

    enabled: bool = False
    weight: float = 0.005
    thing_classes: list[int] = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    scale_min_ratio: float = 0.75


class MICConfig(Strict):
    """Masked Image Consistency on the target (MIC)."""

    enabled: bool = False
    mask_ratio: float = Field(0.7, ge=0, lt=1)
    block_size: int = Field(32, ge=1)  # 32 for 512 crops, 64 for HRDA's 1024 crops
    weight: float = 1.0


class UDAConfig(Strict):
    """The DACS step (DAFormer defaults)."""

    alpha: float = Field(0.999, ge=0, le=1)  # EMA teacher: alpha_t = min(1 - 1/(t+1), alpha)
    pseudo_threshold: float = 0.968
    pseudo_weight: Literal["threshold_uniform", "threshold", "none"] = "threshold_uniform"
    ignore_top: int = Field(0, ge=0)  # target rows without pseudo-label weight (DAFormer on Cityscapes: 15)
    ignore_bottom: int = Field(0, ge=0)  # (DAFormer on Cityscapes: 120)
    color_jitter_strength: float = Field(0.2, ge=0)
    color_jitter_p: float = Field(0.8, ge=0, le=1)
    # The colour jitter's semantics: `daformer` (kornia 0.5.8 as DAFormer uses it: additive brightness,
    # contrast without the mean, a random order per image) or `torchvision` (its adjust_* functions in order).
    strong_augment: Literal["daformer", "torchvision"] = "daformer"
    blur: bool = True
    rcs: RCSConfig = RCSConfig()
    fd: FDConfig = FDConfig()
    mic: MICConfig = MICConfig()


class ZoDiConfig(Strict):
    """ZoDi's model adaptation (azuma164/ZoDi model_adaptation/): supervised on each real source image and its
    transferred twin (data.paired), plus a similarity loss between their features. Defaults are ZoDi's."""

    sim_weight: float = Field(0.1, ge=0)  # the similarity loss's weight (ZoDi's --sim_weight)
    # The compared features: `backbone` (its last level, ZoDi's layer4) or `decoder` (the head's map before
    # the classifier); `pool`: global-average-pooled to one vector per image first (ZoDi) or per pixel.
    features: Literal["backbone", "decoder"] = "backbone"
    pool: bool = True
    normalize: bool = True  # L2-normalise over channels (a cosine similarity), as ZoDi


class SAMConfig(Strict):
    """CLOUDS' refinement of the teacher's pseudo-labels with SAM (trainer/sam.py)."""

    model: str = "none"  # a transformers SAM directory or hub id in the HF cache (facebook/sam-vit-base); none: no refinement
    local_files_only: bool = True
    min_area: int = Field(5000, ge=0)  # components of more pixels become prompts (CLOUDS: 5000 on 768x768 crops)
    points: int = Field(5, ge=1)  # random positive points per component (CLOUDS: 5)
    remove_overlaps: bool = True  # pixels of several kept masks are dropped (CLOUDS' RM_INTERSECTION)

    @property
    def enabled(self) -> bool:
        return self.model.strip().lower() != "none"


class CLOUDSConfig(Strict):
    """CLOUDS' training (yasserben/CLOUDS): a source warm-up, then source + generated images, the generated
    ones pseudo-labelled by an EMA teacher of the decode head (refined by SAM); the backbone frozen
    (model.freeze_backbone)."""

    warmup_iters: int = Field(0, ge=0)  # source-only iterations first (CLOUDS: a separate 40k-iteration run)
    ema_alpha: float = Field(0.999, ge=0, le=1)  # the teacher head's EMA momentum (no ramp, as CLOUDS)
    ema_every: int = Field(100, ge=1)  # iterations between EMA updates (CLOUDS: 100)
    sam: SAMConfig = SAMConfig()


class OptimConfig(Strict):
    """AdamW (DAFormer) or SGD with momentum (DeepLab, ZoDi) + linear warmup + poly decay, by iteration."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    lr: float = Field(6e-5, gt=0)
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = Field(1500, ge=0)
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    grad_accum: int = Field(1, ge=1)


class EvalConfig(Strict):
    mode: Literal["whole", "slide"] = "whole"  # input size: data.val.resize; logits go back to label size
    crop_size: tuple[int, int] = (512, 512)  # slide: window (height, width)
    stride: tuple[int, int] = (341, 341)  # slide: step (height, width)
    batch_size: int = Field(1, ge=1)
    workers: int = Field(2, ge=0)


class TrainOutputConfig(Strict):
    path: str = "runs/train"  # checkpoints, metrics, eval tables, summary.json


class TrainConfig(Strict):
    method: Literal["dacs", "source_only", "supervised_synthetic", "zodi", "clouds"] = "dacs"
    output: TrainOutputConfig = TrainOutputConfig()
    seed: int = 0
    max_iters: int = Field(40000, ge=1)
    log_interval: int = Field(50, ge=1)
    eval_interval: int = Field(4000, ge=0)  # 0: evaluate only at the end; the best evaluation is kept in checkpoints/best
    checkpoint_interval: int = Field(4000, ge=0)  # 0: checkpoint only at the end
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = True  # continue from the newest checkpoint in output/checkpoints
    device: str = "auto"  # auto: the local cuda device if available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    threads: int | None = Field(None, ge=1)  # torch CPU threads per rank; None: torch's default (one per core)
    progress: bool = True
    image_interval: int = Field(1000, ge=0)  # pictures (image, prediction, pseudo-label, mixed) every N iterations; 0: none
    channels_last: bool = False  # the segmenter and its inputs in channels_last memory format (faster convs on GPUs)
    compile: bool = False  # torch.compile the segmenter (the first iterations pay the compile time)
    data: TrainDataConfig = TrainDataConfig()
    model: TrainModelConfig = TrainModelConfig()
    uda: UDAConfig = UDAConfig()
    zodi: ZoDiConfig = ZoDiConfig()
    clouds: CLOUDSConfig = CLOUDSConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        data = self.data
        if self.method in ("dacs", "clouds") and (data.source is None or data.target is None):
            raise ValueError(f"method {self.method} needs data.source (labelled) and data.target (pseudo-target)")
        if self.method == "clouds" and self.model.hrda.enabled:
            raise ValueError("method clouds does not combine with model.hrda")
        if self.method == "source_only" and data.source is None:
            raise ValueError("method source_only needs data.source")
        if self.method == "zodi" and not data.paired:
            raise ValueError(
                "method zodi trains on pairs (a real source image and its transfer): set data.paired: true with data.source.folder and data.target.shards"
            )
        if self.method == "zodi" and (self.model.decoder == "deeplabv2" and self.zodi.features == "decoder" or self.model.hrda.enabled):
            raise ValueError(
                "method zodi: zodi.features decoder needs model.decoder deeplabv3plus, daformer or segformer (deeplabv2 has no feature map), and no model.hrda"
            )
        if self.method == "supervised_synthetic" and data.target is None:
            raise ValueError("method supervised_synthetic needs data.target (shards carrying seg.png)")
        if data.paired and not (data.source is not None and data.source.folder is not None and data.target is not None and data.target.shards is not None):
            raise ValueError("data.paired pairs target shards with their source items: it needs data.source.folder and data.target.shards")
        if self.method == "dacs" and self.uda.fd.enabled and self.model.random_init:
            raise ValueError(
                "uda.fd.enabled needs pretrained backbone weights (model.pretrained), but it is 'none': the feature distance would pull "
                "toward random features; give model.pretrained or set uda.fd.enabled: false"
            )
        # Folder datasets holding train ids accept exactly the model's classes unless told otherwise.
        for domain in (data.source, data.target, data.val):
            if domain and domain.folder and "num_classes" not in domain.folder.model_fields_set:
                domain.folder.num_classes = self.model.num_classes
        return self


# ------------------------------------------------------------------------------------------- study
# `dreamshard study`: nested subsets of a generated run x seeds, each run a Ray task.


class StudyDataConfig(Strict):
    run: str  # the generated run directory whose manifest prefixes are the subsets
    generate_config: str | None = None  # config to extend it; default: the one recorded in run/dreamshard.json
    extend: bool = True  # generate missing samples when the largest size exceeds what exists


class StudyTrainConfig(Strict):
    config: str  # the training config every run starts from
    overrides: list[str] = []  # dotted.key=value settings applied to every run (as --set)
    baseline: str | None = None  # a source-only training config, trained per seed and drawn as a line


class StudyResources(Strict):
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)  # 1 on a GPU cluster: one run per GPU
    # Stop (exit 1, resumable) when no node of the cluster has these resources for this long; 0: wait forever
    # (an autoscaling cluster adds the nodes).
    start_timeout_s: float = Field(300.0, ge=0)


class StudyOutputConfig(Strict):
    path: str = "runs/study"  # study.{parquet,csv,md,png} and runs/<run id>/


class StudyConfig(Strict):
    data: StudyDataConfig
    train: StudyTrainConfig
    sizes: list[int] | str  # [100, 400, 1600] or log-spaced "100..1600x2"
    seeds: list[int] = Field([0], min_length=1)
    stratified: bool = False  # class-stratified nested subsets instead of plain manifest prefixes
    fixed: Literal["iterations", "epochs"] = "iterations"  # same compute at every size, or same epochs
    iterations: int | None = Field(None, ge=1)  # fixed: iterations (default: the training config's max_iters)
    epochs: float | None = Field(None, gt=0)  # fixed: epochs
    output: StudyOutputConfig = StudyOutputConfig()
    resources: StudyResources = StudyResources()
    max_retries: int = Field(1, ge=0)  # per run, then it is reported as failed

    @model_validator(mode="after")
    def _epochs_given(self) -> StudyConfig:
        if self.fixed == "epochs" and self.epochs is None:
            raise ValueError("fixed: epochs needs 'epochs' (passes over each subset)")
        return self


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
            value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({one_line(exc)})") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set each `--set dotted.key=value` (values parsed as YAML) in a nested dict; returns the dict."""
    return set_values(data, parse_overrides(overrides))


def set_values(data: dict, values) -> dict:
    """Set each (dotted key or its parts, value) in a nested dict (creating sections as needed), values as
    given (no parsing); returns the dict."""
    for parts, value in values:
        parts = parts.split(".") if isinstance(parts, str) else parts
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


MAX_YAML_ALIASES = 100  # alias references in one config (`*name`): configs use a few; an alias bomb uses thousands
MAX_YAML_NODES = 200_000  # values in a config once its aliases are expanded


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader with two checks a config needs: a key written twice in one mapping is an error (the
    safe loader keeps the last, silently replacing a whole earlier section), and aliases are bounded (an
    alias bomb, a few lines that expand to billions of values, is refused before anything reads them)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name): an alias bomb? write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                continue  # an unhashable or odd key: the safe constructor says what is wrong with it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (lines {seen[key] + 1} and {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value, limit: int) -> int:
    """Values in `value` with aliases expanded, counting stops just past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def parse_yaml(text: str, source: str):
    """A YAML document, with ConfigLoader's checks; any problem is one ConfigError line naming `source`."""
    try:
        data = yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({one_line(exc).removeprefix('while constructing a mapping ')})") from None
    if _expanded_size(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(f"{source}: more than {MAX_YAML_NODES:,} values once its aliases are expanded (an alias bomb?); write the config out plainly")
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (pass the path of a YAML file, e.g. configs/quickstart.yaml)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # editors may save a byte-order mark
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    data = parse_yaml(text, str(path))
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
    if err["type"] == "value_error" and not loc:  # a check across sections: its message names the keys
        return f"{source}: {err['msg'].removeprefix('Value error, ')}{extra}"
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
