"""Label-preserving generation: the `img2img`, `depth2img` (DIDEX) and `controlnet_seg` (ZoDi) modes.

Sample i takes source item `(i // group) mod len(source)` (the source's own order: sorted keys, or a seeded
shuffle; group = 1, or the number of values of the style axis paired with the items, see
`prompts.pair_items_with`), its prompt and seed from the plan, and its strength from the `condition` config.
A template's `{classes}` becomes the classes present in the item's label (DIDEX's wording, see
`prompts.classes_text`). Generation runs at the plan's width x height: the source image is resized to it
(bicubic) for img2img and depth2img (whose pipeline estimates depth from it), the colour-coded label map
(nearest neighbour: a label is never interpolated) for ControlNet. The generated image is then resized
(Lanczos) back to the source label's size, so each sample's `seg.png` is the source label exactly (the json
`width`/`height` stay the generation size, as in every mode: how the sample was drawn).

Where this differs from the papers' code. ZoDi (`image_transfer.py`): it resizes the label's colour image
and the source image with cv2.INTER_AREA (Cityscapes 2048x1024 → 1024x512: colours averaged at class
borders), here nearest for the map and bicubic for the image; it resets seed 42 for every image, here each
sample has its own seed from the plan; its inversion timestep, see `inversion.py`. DIDEX (`dataset_creation/GTA5_to_PTD_*.py`, SD-2 depth img2img through the Stability-AI
code): it halves GTA5 and edge-pads it to a multiple of 64, then resizes the padded output back without
cropping the pad; here the image is resized to sampling.width x height (no pad) and back. It resets seed 0
for every image, here per-sample seeds; its DDIM noises to the schedule step above the first one it
denoises (ldm's img2img), here both are the same step (diffusers).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamshard.config import ConditionConfig, GenerateConfig, PromptsConfig, SourceConfig
from dreamshard.datasets.labels import CITYSCAPES_MAP, CLASSES, LABEL_ID_PALETTES, NUM_CLASSES, colourise, parse_palette
from dreamshard.datasets.sources import LabelledSource, open_source, scan
from dreamshard.engine.generation import Drawn, SampleStamp, render, seeded_generators, to_pil
from dreamshard.engine.inversion import stochastic_inversion
from dreamshard.engine.models import denoiser
from dreamshard.engine.modes import REGISTRY, Mode, conditioned_names, mode_for
from dreamshard.engine.plan import SampleSpec, source_group
from dreamshard.engine.prompts import LABEL_PLACEHOLDERS, classes_text, least_generated_classes, placeholders, present_classes
from dreamshard.errors import UserError
from dreamshard.format.layout import LABEL_FIELD
from dreamshard.format.shards import ShardSample
from dreamshard.identity import digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSample:
    """What one generated sample takes from its source item."""

    key: str  # the source item's key (`source_key` in the sample's json)
    image: Image.Image  # the source RGB image at generation size
    control: Image.Image | None  # the colour-coded label map at generation size (controlnet_seg)
    train_ids: np.ndarray  # the source label at its own size: what seg.png stores
    strength: float | None
    spec: SampleSpec  # the plan's spec, its prompt's {classes} filled from this item's label


class Conditioner:
    """Turns sample specs into pipeline calls for a conditioned mode, and results into (image, seg.png)."""

    def __init__(
        self, mode: str, source: LabelledSource, condition: ConditionConfig, num_classes: int, prompts: PromptsConfig | None = None, num_samples: int = 0
    ) -> None:
        self.mode: Mode = mode_for(mode)
        if not self.mode.keeps_label:
            raise ValueError(f"{mode!r} is not a conditioned mode")
        prompts = prompts or PromptsConfig()
        self.source = source
        self.condition = condition
        self.palette = parse_palette(condition.palette, num_classes)
        # cityscapes_color colours the label ids as stored (34 classes), the others the train ids
        self.colours_label_ids = isinstance(condition.palette, str) and condition.palette.lower() in LABEL_ID_PALETTES
        if self.colours_label_ids and self.mode.shows_label_map and source.label_map is not CITYSCAPES_MAP:
            raise UserError(
                f"condition.palette {condition.palette} colours Cityscapes label ids, but this source's labels are read as {source.label_map.name}; "
                "use a cityscapes or gta5 source with source.labels auto, or palette cityscapes"
            )
        _check_strengths(self.mode, condition)
        self.token = prompts.token
        self.group = source_group(prompts)  # consecutive samples that take the same source item
        self.classes_templates = _classes_templates(prompts)
        if self.classes_templates and num_classes != NUM_CLASSES:
            raise UserError(
                f"{{classes}} and {{least_class}} name train ids with the {NUM_CLASSES} Cityscapes classes, but source.num_classes is {num_classes}; "
                "remove them from the templates"
            )
        self.least_classes = self._least_classes(prompts, num_samples)
        self.fingerprint = _fingerprint(source, condition)
        self._variants: dict[tuple, Any] = {}  # the mode's variant pipelines, built on first use (pipeline_for)

    def _least_classes(self, prompts: PromptsConfig, num_samples: int) -> list[int]:
        """With {least_class} in a template: DIDEX's least generated class of samples 0..num_samples-1, from
        the labels of the items they take, in sample order (prefix-stable: a larger run keeps the first
        ones). Every label of the items used is read once, here, in the driver."""
        uses = prompts.recipe == "templates" and any("least_class" in placeholders(t.text, "prompts.templates") for t in prompts.templates)
        if not uses or not num_samples:
            return []
        unknown = [name for name in prompts.least_class_exclude if name not in CLASSES]
        if unknown:
            raise UserError(f"prompts.least_class_exclude: unknown class {unknown[0]!r}; the classes are the 19 Cityscapes ones: {', '.join(CLASSES)}")
        positions = sorted({self.item_index(i) % len(self.source) for i in range(num_samples)})
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            present = dict(zip(positions, pool.map(lambda k: present_classes(self.source.load_label(self.source.items[k]), NUM_CLASSES), positions)))
        presence = [present[self.item_index(i) % len(self.source)] for i in range(num_samples)]
        return least_generated_classes(presence, [CLASSES.index(name) for name in prompts.least_class_exclude])

    def strength(self, spec: SampleSpec) -> float | None:
        """A prompt-file `strength` column, else the first style value listed in strength_by_style, else
        condition.strength."""
        if "strength" in spec.extra:
            return _valid_strength(spec.extra["strength"], f"prompt-file row {spec.extra.get('file_row', '?')} column 'strength'")
        for value in spec.style.values():
            if value in self.condition.strength_by_style:
                return self.condition.strength_by_style[value]
        return self.condition.strength

    def item_index(self, index: int) -> int:
        """The source position sample `index` takes (the source cycles when there are more)."""
        return index // self.group

    def prepare(self, spec: SampleSpec) -> SourceSample:
        item = self.source.item_for(self.item_index(spec.index))
        image, raw, train_ids = self.source.load_with_raw(item)
        size = (spec.width, spec.height)
        strength = self.strength(spec)
        control = None
        if self.mode.shows_label_map:
            ids = raw if self.colours_label_ids else train_ids
            control = self.mode.control_image(Image.fromarray(colourise(ids, self.palette)).resize(size, Image.Resampling.NEAREST))
        if spec.template in self.classes_templates:
            least = CLASSES[self.least_classes[spec.index]] if spec.index < len(self.least_classes) else ""
            values = {"token": self.token, "cls": spec.class_name, **spec.style, "classes": classes_text(train_ids, CLASSES), "least_class": least}
            spec = replace(spec, prompt=spec.template.format_map(values))
        return SourceSample(item.key, image.resize(size, Image.Resampling.BICUBIC), control, train_ids, strength, spec)

    def pipeline_kwargs(self, samples: Sequence[SourceSample]) -> dict:
        """The conditioning arguments of one pipeline call over `samples` (all with the same strength)."""
        strength = samples[0].strength
        if any(sample.strength != strength for sample in samples):
            raise ValueError("one pipeline call needs one strength; group samples by strength")
        return self.mode.pipeline_kwargs([sample.image for sample in samples], [sample.control for sample in samples], strength, self.condition)

    def inverts(self, samples: Sequence[SourceSample]) -> bool:
        """Whether these samples start from ZoDi's stochastic inversion (samples without a strength start
        from pure noise: there is no source latent to invert)."""
        return self.mode.supports_inversion and self.condition.init_noise == "stochastic_inversion" and samples[0].strength is not None

    def pipeline_for(self, pipe, samples: Sequence[SourceSample]):
        """The pipeline to call: the loaded one, or the mode's variant on the same components for these samples'
        strength and start (built on first use and kept while the components stay the same)."""
        strength, inverting = samples[0].strength, self.inverts(samples)
        key = (strength is None, inverting)
        cached = self._variants.get(key)
        if cached is None or cached[0] is not denoiser(pipe):
            self._variants[key] = (denoiser(pipe), self.mode.variant(pipe, strength, inverting))
        return self._variants[key][1] or pipe

    def key(self, spec: SampleSpec) -> tuple:
        """What samples must share, beyond steps, size and guidance, to go into one call: the strength."""
        return (self.strength(spec),)

    def generate(self, pipe, specs: list[SampleSpec], prepared: list[SourceSample], stamp: SampleStamp, **sampler) -> Drawn:
        """The draw loop's call (drawing.BatchMaker): `specs` (sharing steps, size, guidance use and strength,
        each with the seed of its draw) from their prepared sources → samples with `seg.png`, finished (resized
        to the label's size, encoded) on the writer thread. Each sample's noise comes from its own CPU
        generator, as in txt2img (with stochastic inversion, the inversion draws from it first)."""
        filled = [replace(source.spec, seed=spec.seed) for spec, source in zip(specs, prepared)]  # {classes} filled in
        pixels = self.call(pipe, prepared, filled, **sampler)
        samples = [
            ShardSample(metadata=stamp(spec, source_key=source.key), image=image, files={LABEL_FIELD: source.train_ids}, finish=finish_label)
            for spec, source, image in zip(filled, prepared, to_pil(pixels))
        ]
        return Drawn(samples, pixels)

    def call(self, pipe, samples: Sequence[SourceSample], specs: list[SampleSpec], **sampler) -> torch.Tensor:
        """One pipeline call over samples sharing a strength; returns their uint8 pixels on the device."""
        pipe = self.pipeline_for(pipe, samples)
        generators = seeded_generators(specs)
        kwargs = self.pipeline_kwargs(samples)
        if self.inverts(samples):
            control = kwargs.get("control_image")
            kwargs["latents"] = stochastic_inversion(
                pipe, kwargs["image"], [spec.prompt for spec in specs], generators, specs[0].steps, samples[0].strength,
                control=control, controlnet_scale=self.condition.controlnet_scale, at=self.condition.inversion_timestep,
            )  # fmt: skip
        return render(pipe, specs, generators=generators, **kwargs, **sampler)


def finish_label(sample: ShardSample) -> None:
    """On the writer thread: the generated image resized (Lanczos) to its source label's size, the label
    (train ids) encoded as seg.png."""
    train_ids = sample.files[LABEL_FIELD]
    height, width = train_ids.shape
    if sample.image.size != (width, height):
        sample.image = sample.image.resize((width, height), Image.Resampling.LANCZOS)
    sample.files[LABEL_FIELD] = seg_png(train_ids)


def conditioner_for(config: GenerateConfig) -> Conditioner | None:
    """The Conditioner of a conditioned run (its source listed and pre-scanned), None for txt2img."""
    check_settings(config)
    if not mode_for(config.mode).keeps_label:
        return None
    source_config = required_source(config.source, config.mode)
    source = open_checked_source(source_config, config.mode)
    check_pairing(config, len(source))
    return Conditioner(config.mode, source, config.condition, source_config.num_classes, config.prompts, config.run.num_samples)


def check_settings(config: GenerateConfig) -> None:
    """Settings that only some modes or schedulers take, checked before any work (`dreamshard plan` too)."""
    mode, prompts = mode_for(config.mode), config.prompts
    if config.sampling.eta and config.model.scheduler not in (None, "ddim"):
        raise UserError(
            f"sampling.eta = {config.sampling.eta:g} is DDIM's eta, but model.scheduler is {config.model.scheduler}; set model.scheduler: ddim or sampling.eta: 0"
        )
    conditioned = conditioned_names()
    if not mode.keeps_label and prompts.pair_items_with:
        raise UserError(f"prompts.pair_items_with pairs source items with a style axis: it needs a conditioned mode ({conditioned}), not {mode.name}")
    if not mode.keeps_label and _classes_templates(prompts):
        raise UserError(
            f"{{classes}} and {{least_class}} name classes of each sample's source label: they need a conditioned mode ({conditioned}), not {mode.name}"
        )
    if config.condition.init_noise == "stochastic_inversion" and not mode.supports_inversion:
        inverting = " and ".join(name for name, other in REGISTRY.items() if other.supports_inversion)
        raise UserError(f"condition.init_noise stochastic_inversion works in modes {inverting}, not {mode.name}; set it to random")
    mode.check(config)
    if mode.keeps_label:
        _check_strength_settings(config)


def required_source(config: SourceConfig | None, mode: str) -> SourceConfig:
    if config is None:
        raise UserError(f"mode {mode} needs a labelled source: set source.layout and source.root (see configs/zodi_controlnet.yaml)")
    return config


def open_checked_source(config: SourceConfig | None, mode: str) -> LabelledSource:
    """List and pre-scan the source of a conditioned mode: every problem surfaces before generation starts."""
    config = required_source(config, mode)
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
    dataset still matches), how labels are read, and the condition settings (init_noise only when not
    random, so runs made before it existed keep their fingerprint). Which item a sample takes also depends
    on prompts.pair_items_with, which the plan fingerprint holds."""
    settings = source.config.model_dump(mode="json", exclude={"root", "scan"})
    exclude = {"init_noise"} if condition.init_noise == "random" else set()
    if condition.inversion_timestep == "first_step" or condition.init_noise == "random":
        exclude.add("inversion_timestep")  # likewise: first_step was the only rule before the option
    content = {"source": settings, "keys": [item.key for item in source.items], "condition": condition.model_dump(mode="json", exclude=exclude or None)}
    return digest(content)


def _check_strengths(mode: Mode, condition: ConditionConfig) -> None:
    if condition.strength is not None:
        _valid_strength(condition.strength, "condition.strength")
    for value, strength in condition.strength_by_style.items():
        _valid_strength(strength, f"condition.strength_by_style[{value!r}]")
    if mode.needs_strength and condition.strength is None:
        raise UserError(f"mode {mode.name} needs condition.strength (how far to noise the source, e.g. 0.75; DIDEX uses 0.9)")


def check_pairing(config: GenerateConfig, items: int) -> None:
    """With prompts.pair_items_with, num_samples must be items x values (each pair once); `plan` checks it too."""
    axis = config.prompts.pair_items_with
    if axis is None:
        return
    values = len(config.prompts.styles.get(axis, ())) or 1
    if config.run.num_samples != items * values:
        raise UserError(
            f"run.num_samples is {config.run.num_samples}, but prompts.pair_items_with {axis} makes every one of the {items} source items once with each of "
            f"the {values} values: set run.num_samples to {items * values} (or change source.limit)"
        )


def _classes_templates(prompts: PromptsConfig) -> frozenset[str]:
    """The template texts that print {classes} or {least_class} (filled per sample from the source labels)."""
    if prompts.recipe != "templates":
        return frozenset()
    return frozenset(t.text for n, t in enumerate(prompts.templates) if set(LABEL_PLACEHOLDERS) & set(placeholders(t.text, f"prompts.templates[{n}]")))


def _check_strength_settings(config: GenerateConfig) -> None:
    """Catch, before any work, strength_by_style keys that match no style value (a typo would silently change
    the mode) and strengths so low that img2img would denoise for zero steps (int(steps x strength) < 1)."""
    _check_strengths(mode_for(config.mode), config.condition)
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
