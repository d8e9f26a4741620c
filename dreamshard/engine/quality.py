"""Quality of what is generated: the scores every sample carries and the filter that redraws rejected ones.

Every image of a pipeline call is judged in one batched forward per model, on the pipeline's device (in half
precision on a GPU), from its uint8 pixels: the CLIP preprocessing (resize of the short side, centre crop,
normalisation) runs there too, with torch's antialiased bicubic resize where CLIPImageProcessor uses PIL's.
- `nsfw`: the pipeline's own safety checker (model.safety_checker), run here rather than inside the pipeline,
  so its verdict is recorded instead of dropped. A flagged image that is kept becomes a black frame, as the
  pipeline would make it; with quality.reject_nsfw it is redrawn instead.
- `clip_score`: 100 x the cosine between the CLIP image and prompt embeddings (quality.clip_model), rounded
  to 4 decimals; the threshold compares the recorded value. This is torchmetrics' CLIPScore without its clamp
  at 0 (a clamp would hide how far below zero a mismatched image lies; above 0 they are the same number).
- blank: a near-constant image (pixel standard deviation below BLANK_STD of 255), judged before any black-out.
A verdict depends on the image's pixels and its prompt; like the images themselves, it can differ by float
rounding between batches of other compositions (a re-run makes the same batches: drawing.py).

Redraws: attempt k of a sample whose plan seed is s draws with `attempt_seed(s, k)` (k = 1: s itself), so the
images a sample tries depend on its plan seed and the attempt number only; engine/drawing.py pools the
redraws of a shard into full calls. The dataset stays exactly num_samples long and prefix-stable. After
max_attempts draws the best one is kept (accepted > not flagged > not blank > higher CLIP score, ties to the
earliest draw) and counted as exhausted. The json `seed` is the seed of the draw that was kept; `attempts`
is how many draws the sample took.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamshard.config import GenerateConfig
from dreamshard.engine.models import load_safety_checker, model_fingerprint
from dreamshard.errors import UserError, one_line

REDRAW_VERSION = 1  # in the dataset fingerprint: bump when attempt_seed or the keep rule changes
BLANK_STD = 2.0  # pixel standard deviation (0-255) below which an image counts as blank
REASONS = ("clip_score", "nsfw", "blank")


def attempt_seed(seed: int, attempt: int) -> int:
    """The generator seed of a sample's `attempt`-th draw (1-based): its plan seed first, then a hash of
    (plan seed, attempt) in [0, 2**63)."""
    if attempt == 1:
        return seed
    digest = hashlib.blake2b(f"dreamshard-redraw/{REDRAW_VERSION}/{seed}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def filtering(config: GenerateConfig) -> bool:
    """Whether any sample can be rejected (and so redrawn)."""
    quality = config.quality
    return quality.min_clip_score is not None or quality.reject_nsfw or quality.reject_blank


def quality_identity(config: GenerateConfig) -> dict:
    """What the scores and the kept images depend on (a part of the dataset fingerprint)."""
    quality = config.quality
    return {
        "redraw_version": REDRAW_VERSION,
        "clip_model": model_fingerprint(quality.clip_model) if quality.clip_model else None,
        "min_clip_score": quality.min_clip_score,
        "reject_nsfw": quality.reject_nsfw,
        "reject_blank": quality.reject_blank,
        "max_attempts": quality.max_attempts if filtering(config) else None,  # no filter: it changes nothing
        "safety_checker": config.model.safety_checker,
    }


def check_clip_model(path: str | None) -> None:
    """One line, before any worker starts, when quality.clip_model is not a local CLIP model directory."""
    if path and not (Path(path).expanduser() / "config.json").is_file():
        raise UserError(
            f"quality.clip_model {path} is not a local CLIP model directory (no config.json); "
            "save one with CLIPModel/CLIPProcessor.save_pretrained, or build a test one with `dreamshard tiny-model OUT --preset tiny-clip`"
        )


@dataclass(frozen=True)
class Verdict:
    nsfw: bool | None
    clip_score: float | None
    blank: bool
    reasons: tuple[str, ...]  # why it is rejected; () = accepted

    def rank(self) -> tuple:
        """Higher is better: accepted, then not flagged, not blank, higher CLIP score."""
        score = self.clip_score if self.clip_score is not None else 0.0
        return (not self.reasons, not self.nsfw, not self.blank, score)


class ClipScorer:
    """100 x cosine(image, prompt) with a local CLIPModel, in batches on its device; prompt embeddings are
    cached."""

    def __init__(self, path: str, device: torch.device | str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        check_clip_model(path)
        self.device = torch.device(device)
        self.dtype = half_precision(self.device)
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=self.dtype).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load quality.clip_model {path}: {one_line(exc)}") from None
        self.inputs = ClipInputs.of(self.processor.image_processor)
        self._texts: dict[str, torch.Tensor] = {}

    def score(self, image: Image.Image, prompt: str) -> float:
        return self.scores(pixels_of(image, self.device), [prompt])[0]

    @torch.no_grad()
    def scores(self, pixels: torch.Tensor, prompts: list[str]) -> list[float]:
        """Scores of uint8 (batch, H, W, 3) images against their prompts, one forward each way."""
        images = self.model.get_image_features(pixel_values=self.inputs(pixels.to(self.device), self.dtype)).pooler_output
        texts = self._text_embeddings(prompts)
        cosines = torch.nn.functional.cosine_similarity(images.float(), texts.float(), dim=1)
        return [round(100.0 * value, 4) for value in cosines.tolist()]

    def _text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(prompt for prompt in prompts if prompt not in self._texts))
        if missing:
            if len(self._texts) + len(missing) > 4096:
                self._texts.clear()
            tokens = self.processor(text=missing, return_tensors="pt", padding=True, truncation=True, max_length=77)
            tokens = {name: value.to(self.device) for name, value in tokens.items()}
            embeddings = self.model.get_text_features(**tokens).pooler_output
            self._texts.update(zip(missing, embeddings))
        return torch.stack([self._texts[prompt] for prompt in prompts])


@dataclass(frozen=True)
class ClipInputs:
    """A CLIP image processor's preprocessing, in torch on the images' device: resize the short side
    (antialiased bicubic), centre crop, rescale to [0, 1], normalise."""

    short_side: int
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, processor) -> ClipInputs:
        size = processor.size.get("shortest_edge") or min(processor.size.get("height", 224), processor.size.get("width", 224))
        crop = processor.crop_size
        return cls(int(size), (int(crop["height"]), int(crop["width"])), tuple(processor.image_mean), tuple(processor.image_std))

    def __call__(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).float() / 255
        height, width = images.shape[-2:]
        scale = self.short_side / min(height, width)
        size = (max(self.crop[0], round(height * scale)), max(self.crop[1], round(width * scale)))
        images = torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        images = images[..., top : top + self.crop[0], left : left + self.crop[1]]
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return ((images - mean) / std).to(dtype)


def half_precision(device: torch.device) -> torch.dtype:
    """The scorers' dtype: float16 on a GPU, float32 elsewhere (CPUs have no fast half matmuls)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def pixels_of(image: Image.Image, device: torch.device | str = "cpu") -> torch.Tensor:
    """A PIL image as uint8 (1, H, W, 3) pixels."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy())[None].to(device)


class QualityJudge:
    """Loaded once per worker: the safety checker and the CLIP scorer that the config asks for."""

    def __init__(self, config: GenerateConfig, device: torch.device | str) -> None:
        self.settings = config.quality
        self.max_attempts = config.quality.max_attempts if filtering(config) else 1
        self.device = torch.device(device)
        self.clip = ClipScorer(config.quality.clip_model, self.device) if config.quality.clip_model else None
        self.checker = None
        if config.model.safety_checker:
            checker, processor = load_safety_checker(config.model, self.device, half_precision(self.device))
            self.checker = (checker, ClipInputs.of(processor))

    @staticmethod
    def wanted(config: GenerateConfig) -> bool:
        return bool(config.quality.clip_model or config.model.safety_checker or filtering(config))

    def judge(self, image: Image.Image, prompt: str) -> Verdict:
        return self.judge_batch(pixels_of(image, self.device), [prompt])[0]

    def judge_batch(self, pixels: torch.Tensor, prompts: list[str]) -> list[Verdict]:
        """Verdicts on uint8 (batch, H, W, 3) images and the prompts they were made from."""
        pixels = pixels.to(self.device)
        nsfw = self._nsfw(pixels) if self.checker is not None else [None] * len(prompts)
        scores = self.clip.scores(pixels, prompts) if self.clip is not None else [None] * len(prompts)
        blank = (pixels.float().flatten(1).std(dim=1, correction=0) < BLANK_STD).tolist()
        return [self._verdict(flagged, score, is_blank) for flagged, score, is_blank in zip(nsfw, scores, blank)]

    def _verdict(self, nsfw: bool | None, score: float | None, blank: bool) -> Verdict:
        quality, reasons = self.settings, []
        if quality.min_clip_score is not None and score is not None and score < quality.min_clip_score:
            reasons.append("clip_score")
        if quality.reject_nsfw and nsfw:
            reasons.append("nsfw")
        if quality.reject_blank and blank:
            reasons.append("blank")
        return Verdict(nsfw, score, blank, tuple(reasons))

    @torch.no_grad()
    def _nsfw(self, pixels: torch.Tensor) -> list[bool]:
        assert self.checker is not None  # called only with a checker
        checker, inputs = self.checker
        placeholder = torch.zeros(len(pixels), 1)  # what the checker blanks; only its verdict is read
        _, flagged = checker(images=placeholder, clip_input=inputs(pixels, checker.dtype))
        return [bool(value) for value in flagged]


def is_blank(image: Image.Image) -> bool:
    return float(np.asarray(image.convert("RGB"), dtype=np.float32).std()) < BLANK_STD
