"""Label-preserving generation: the `img2img` (DIDEX) and `controlnet_seg` (ZoDi) modes.

Sample i takes source item `i mod len(source)` (the source's own order: sorted keys, or a seeded shuffle),
its prompt and seed from the plan, and its strength from the `condition` config. Generation runs at the
plan's width x height: the source image is resized to it (bicubic) for img2img, the colour-coded label map
(nearest neighbour: a label is never interpolated) for ControlNet. The generated image is then resized
(Lanczos) back to the source label's size, so each sample's `seg.png` is the source label exactly (the json
`width`/`height` stay the generation size, as in every mode: how the sample was drawn).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dreamshard.config import CONDITIONED_MODES, ConditionConfig, GenerateConfig, SourceConfig
from dreamshard.datasets.labels import colourise, parse_palette
from dreamshard.datasets.sources import LabelledSource, open_source, scan
from dreamshard.engine.generation import SampleStamp, call_pipeline
from dreamshard.engine.plan import SampleSpec
from dreamshard.errors import UserError
from dreamshard.format.layout import LABEL_FIELD
from dreamshard.format.shards import ShardSample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSample:
    """What one generated sample takes from its source item."""

    key: str  # the source item's key (`source_key` in the sample's json)
    image: Image.Image  # the source RGB image at generation size
    control: Image.Image | None  # the colour-coded label map at generation size (controlnet_seg)
    train_ids: np.ndarray  # the source label at its own size: what seg.png stores
    strength: float | None


class Conditioner:
    """Turns sample specs into pipeline calls for a conditioned mode, and results into (image, seg.png)."""

    def __init__(self, mode: str, source: LabelledSource, condition: ConditionConfig, num_classes: int) -> None:
        if mode not in CONDITIONED_MODES:
            raise ValueError(f"{mode!r} is not a conditioned mode")
        self.mode = mode
        self.source = source
        self.condition = condition
        self.palette = parse_palette(condition.palette, num_classes)
        _check_strengths(mode, condition)
        self.fingerprint = _fingerprint(source, condition)
        self._img2img_pipe = None  # controlnet_seg with a strength: built by pipeline_for on first use
        self._loaders: ThreadPoolExecutor | None = None  # decodes a batch's source files in parallel (in the worker)

    def strength(self, spec: SampleSpec) -> float | None:
        """A prompt-file `strength` column, else the first style value listed in strength_by_style, else
        condition.strength."""
        if "strength" in spec.extra:
            return _valid_strength(spec.extra["strength"], f"prompt-file row {spec.extra.get('file_row', '?')} column 'strength'")
        for value in spec.style.values():
            if value in self.condition.strength_by_style:
                return self.condition.strength_by_style[value]
        return self.condition.strength

    def prepare(self, spec: SampleSpec) -> SourceSample:
        item = self.source.item_for(spec.index)
        image, train_ids = self.source.load(item)
        size = (spec.width, spec.height)
        strength = self.strength(spec)
        control = None
        if self.mode == "controlnet_seg":
            control = Image.fromarray(colourise(train_ids, self.palette)).resize(size, Image.Resampling.NEAREST)
        return SourceSample(item.key, image.resize(size, Image.Resampling.BICUBIC), control, train_ids, strength)

    def pipeline_kwargs(self, samples: Sequence[SourceSample]) -> dict:
        """The conditioning arguments of one pipeline call over `samples` (all with the same strength)."""
        strength = samples[0].strength
        if any(sample.strength != strength for sample in samples):
            raise ValueError("one pipeline call needs one strength; group samples by strength")
        images = [sample.image for sample in samples]
        if self.mode == "img2img":
            return {"image": images, "strength": strength}
        kwargs = {"controlnet_conditioning_scale": self.condition.controlnet_scale}
        controls = [sample.control for sample in samples]
        if strength is None:
            return kwargs | {"image": controls}
        return kwargs | {"image": images, "control_image": controls, "strength": strength}

    def pipeline_for(self, pipe, samples: Sequence[SourceSample]):
        """The pipeline to call: the loaded one, or for controlnet_seg with a strength its img2img variant
        (same components, built on first use: starts from the noised source latent, as ZoDi does)."""
        if self.mode != "controlnet_seg" or samples[0].strength is None:
            return pipe
        if self._img2img_pipe is None or self._img2img_pipe.unet is not pipe.unet:
            from diffusers import AutoPipelineForImage2Image

            self._img2img_pipe = AutoPipelineForImage2Image.from_pipe(pipe)  # the family's ControlNet img2img class
            self._img2img_pipe.set_progress_bar_config(disable=True)
        return self._img2img_pipe

    def generate(self, pipe, specs: list[SampleSpec], stamp: SampleStamp) -> list[ShardSample]:
        """The worker's per-mode function: specs sharing (steps, guidance, size) → samples with `seg.png`.
        Specs with different strengths go to separate pipeline calls; each sample's noise comes from its
        own CPU generator seeded from the plan, as in txt2img."""
        by_strength: dict[float | None, list[SampleSpec]] = {}
        for spec in specs:
            by_strength.setdefault(self.strength(spec), []).append(spec)
        done: dict[int, ShardSample] = {}
        if self._loaders is None:
            # PIL releases the GIL while decoding: a batch of full-size source images loads in about the time of one
            self._loaders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="source-loader")
        for group in by_strength.values():
            samples = list(self._loaders.map(self.prepare, group))
            images = call_pipeline(self.pipeline_for(pipe, samples), group, **self.pipeline_kwargs(samples))
            for spec, sample, image in zip(group, samples, images):
                image, seg = self.finish(image, sample)
                done[spec.index] = ShardSample(metadata=stamp(spec, source_key=sample.key), image=image, files={LABEL_FIELD: seg})
        return [done[spec.index] for spec in specs]

    @staticmethod
    def finish(image: Image.Image, sample: SourceSample) -> tuple[Image.Image, bytes]:
        """(the generated image at the label's size, seg.png bytes)."""
        height, width = sample.train_ids.shape
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return image, seg_png(sample.train_ids)


def conditioner_for(config: GenerateConfig) -> Conditioner | None:
    """The Conditioner of a conditioned run (its source listed and pre-scanned), None for txt2img."""
    if config.mode not in CONDITIONED_MODES:
        return None
    _check_strength_settings(config)
    source = open_checked_source(config.source, config.mode)
    return Conditioner(config.mode, source, config.condition, config.source.num_classes)


def open_checked_source(config: SourceConfig | None, mode: str) -> LabelledSource:
    """List and pre-scan the source of a conditioned mode: every problem surfaces before generation starts."""
    if config is None:
        raise UserError(f"mode {mode} needs a labelled source: set source.layout and source.root (see configs/zodi_controlnet.yaml)")
    source = scan(open_source(config))
    log.info("source: %d %s item(s) under %s, passed the pre-scan (%s)", len(source), config.layout, config.root, config.scan)
    if source.skipped:
        log.warning("source: skipped %d bad item(s) of %d (skip_bad), e.g. %s", len(source.skipped), len(source) + len(source.skipped), source.skipped[0])
    return source


def seg_png(train_ids: np.ndarray) -> bytes:
    """A label as PNG bytes: 8-bit, mode L, train ids (255 = ignore)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(train_ids, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _fingerprint(source: LabelledSource, condition: ConditionConfig) -> str:
    """What decides each sample's source item and conditioning: the items in order (by key, so a moved
    dataset still matches), how labels are read, and the condition settings."""
    settings = source.config.model_dump(mode="json", exclude={"root", "scan"})
    content = {"source": settings, "keys": [item.key for item in source.items], "condition": condition.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _check_strengths(mode: str, condition: ConditionConfig) -> None:
    if condition.strength is not None:
        _valid_strength(condition.strength, "condition.strength")
    for value, strength in condition.strength_by_style.items():
        _valid_strength(strength, f"condition.strength_by_style[{value!r}]")
    if mode == "img2img" and condition.strength is None:
        raise UserError("mode img2img needs condition.strength (how far to noise the source, e.g. 0.75; DIDEX uses 0.9)")


def _check_strength_settings(config: GenerateConfig) -> None:
    """Catch, before any work, strength_by_style keys that match no style value (a typo would silently change
    the mode) and strengths so low that img2img would denoise for zero steps (int(steps x strength) < 1)."""
    _check_strengths(config.mode, config.condition)
    style_values = {value for values in config.prompts.styles.values() for value in values}
    for value in config.condition.strength_by_style:
        if value not in style_values:
            raise UserError(f"condition.strength_by_style key {value!r} is not a value of any prompts.styles axis; use the exact style text")
    steps = config.sampling.steps if isinstance(config.sampling.steps, int) else config.sampling.steps[0]
    strengths = [s for s in (config.condition.strength, *config.condition.strength_by_style.values()) if s is not None]
    if strengths and int(steps * min(strengths)) < 1:
        raise UserError(f"sampling.steps {steps} x strength {min(strengths)} is below one denoising step; raise sampling.steps or the strength")


def _valid_strength(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise UserError(f"{where} = {value!r}: strength must be a number in (0, 1]")
    return float(value)
