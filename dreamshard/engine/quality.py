"""Quality of what is generated: the scores every sample carries and the filter that redraws rejected ones.

Each image is judged alone (one forward pass per image, so its verdict depends on its own pixels and prompt,
never on its batch neighbours):
- `nsfw`: the pipeline's own safety checker (model.safety_checker), run here rather than inside the pipeline,
  so its verdict is recorded instead of dropped. A flagged image that is kept becomes a black frame, as the
  pipeline would make it; with quality.reject_nsfw it is redrawn instead.
- `clip_score`: 100 x the cosine between the CLIP image and prompt embeddings (quality.clip_model), rounded
  to 4 decimals; the threshold compares the recorded value. This is torchmetrics' CLIPScore without its clamp
  at 0 (a clamp would hide how far below zero a mismatched image lies; above 0 they are the same number).
- blank: a near-constant image (pixel standard deviation below BLANK_STD of 255), judged before any black-out.

Redraws: attempt k of a sample whose plan seed is s draws with `attempt_seed(s, k)` (k = 1: s itself), so the
images a sample tries depend on its plan seed and the attempt number only, never on batching, workers or
other samples; the dataset stays exactly num_samples long and prefix-stable. After max_attempts draws the
best one is kept (accepted > not flagged > not blank > higher CLIP score, ties to the earliest draw) and
counted as exhausted. The json `seed` is the seed of the draw that was kept; `attempts` is how many draws
the sample took.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamshard.config import GenerateConfig
from dreamshard.engine.models import load_safety_checker, model_fingerprint
from dreamshard.engine.plan import SampleSpec
from dreamshard.errors import UserError, one_line
from dreamshard.format.shards import ShardSample

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
    """100 x cosine(image, prompt) with a local CLIPModel; prompt embeddings are cached."""

    def __init__(self, path: str, device: torch.device) -> None:
        from transformers import CLIPModel, CLIPProcessor

        check_clip_model(path)
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load quality.clip_model {path}: {one_line(exc)}") from None
        self.device = device
        self._texts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def score(self, image: Image.Image, prompt: str) -> float:
        pixels = self.processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"].to(self.device)
        image_embedding = self.model.get_image_features(pixel_values=pixels).pooler_output[0]
        cosine = torch.nn.functional.cosine_similarity(image_embedding, self._text(prompt), dim=0)
        return round(100.0 * float(cosine), 4)

    def _text(self, prompt: str) -> torch.Tensor:
        if prompt not in self._texts:
            if len(self._texts) >= 4096:
                self._texts.clear()
            tokens = self.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True, max_length=77)
            tokens = {name: value.to(self.device) for name, value in tokens.items()}
            self._texts[prompt] = self.model.get_text_features(**tokens).pooler_output[0]
        return self._texts[prompt]


class QualityJudge:
    """Loaded once per worker: the safety checker and the CLIP scorer that the config asks for."""

    def __init__(self, config: GenerateConfig, device: torch.device) -> None:
        self.settings = config.quality
        self.max_attempts = config.quality.max_attempts if filtering(config) else 1
        self.clip = ClipScorer(config.quality.clip_model, device) if config.quality.clip_model else None
        self.checker = load_safety_checker(config.model, device, torch.float32) if config.model.safety_checker else None
        self.device = device

    @staticmethod
    def wanted(config: GenerateConfig) -> bool:
        return bool(config.quality.clip_model or config.model.safety_checker or filtering(config))

    def judge(self, image: Image.Image, prompt: str) -> Verdict:
        quality = self.settings
        nsfw = self._nsfw(image) if self.checker is not None else None
        score = self.clip.score(image, prompt) if self.clip is not None else None
        blank = is_blank(image)
        reasons = []
        if quality.min_clip_score is not None and score is not None and score < quality.min_clip_score:
            reasons.append("clip_score")
        if quality.reject_nsfw and nsfw:
            reasons.append("nsfw")
        if quality.reject_blank and blank:
            reasons.append("blank")
        return Verdict(nsfw, score, blank, tuple(reasons))

    @torch.no_grad()
    def _nsfw(self, image: Image.Image) -> bool:
        assert self.checker is not None  # called only with a checker
        checker, processor = self.checker
        rgb = image.convert("RGB")
        clip_input = processor(images=[rgb], return_tensors="pt")["pixel_values"].to(self.device)
        pixels = np.asarray(rgb, dtype=np.float32)[None] / 255.0  # what the checker blanks; we only read the verdict
        _, flagged = checker(images=pixels, clip_input=clip_input)
        return bool(flagged[0])


def is_blank(image: Image.Image) -> bool:
    return float(np.asarray(image.convert("RGB"), dtype=np.float32).std()) < BLANK_STD


def draw_judged(
    generate: Callable[..., list[ShardSample]], pipe, specs: list[SampleSpec], stamp, judge: QualityJudge, **sampler
) -> tuple[list[ShardSample], Counter]:
    """Generate `specs` (one batch; `sampler`: the mode function's sampling arguments), judge every image,
    redraw the rejected ones together (attempt after attempt) and return the kept samples in spec order with
    their quality fields, plus the shard tallies (`draws`, each rejection reason, `exhausted`). The CLIP score
    compares the image with the prompt it was made from (a `{classes}` template filled in)."""
    kept: dict[int, tuple[ShardSample, Verdict]] = {}
    attempts: dict[int, int] = {}
    tally: Counter = Counter()
    todo = list(specs)
    for attempt in range(1, judge.max_attempts + 1):
        drawn = [replace(spec, seed=attempt_seed(spec.seed, attempt)) for spec in todo]
        samples = generate(pipe, drawn, stamp, **sampler)
        tally["draws"] += len(samples)
        retry = []
        for spec, sample in zip(todo, samples):
            verdict = judge.judge(sample.image, sample.metadata.get("prompt", spec.prompt))
            attempts[spec.index] = attempt
            if spec.index not in kept or verdict.rank() > kept[spec.index][1].rank():
                kept[spec.index] = (sample, verdict)
            if verdict.reasons:
                tally.update(verdict.reasons)
                retry.append(spec)
        todo = retry
        if not todo:
            break
    tally["exhausted"] += len(todo)
    results = []
    for spec in specs:
        sample, verdict = kept[spec.index]
        sample.metadata.update(nsfw=verdict.nsfw, clip_score=verdict.clip_score, attempts=attempts[spec.index])
        if verdict.nsfw:  # kept although flagged (reject_nsfw off, or exhausted): a black frame, as the pipeline makes
            sample.image = Image.new("RGB", sample.image.size)
        results.append(sample)
    return results, tally
