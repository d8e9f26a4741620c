"""Turning sample specs into images, knowing nothing of Ray: the one pipeline call every mode makes, the
txt2img mode, which specs can share a call, and the sample record each sample carries (built once, from its
spec and the run's generation settings).

A per-mode function takes (pipe, specs that can share one call, stamp, **sampler) and returns a `Drawn`: the
samples in the order of the specs and their pixels on the pipeline's device (for scoring); `sampler` holds
the pipeline arguments that come from the sampling config (`eta`); `conditioned.Conditioner.generate` is the
one of the conditioned modes.

One call takes samples of the same steps and size; their guidance scales may differ (`PerSampleGuidance`: the
classifier-free-guidance step scales each sample's difference by its own value), as long as all of them use
classifier-free guidance (scale > 1) or none does. Images leave the pipeline as tensors and become uint8 on
the device, the same values diffusers' PIL output rounds to, in one copy to the host.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dreamshard.engine.plan import SampleSpec
from dreamshard.errors import UserError
from dreamshard.format.shards import ShardSample


@dataclass(frozen=True)
class SampleStamp:
    """The record fields of a sample that come from how the run generates (scheduler, model, mode), and the
    style axes every record lists (null where the template does not print one: readers that infer a schema
    from the first samples, like HF datasets, would otherwise drop later axes)."""

    fields: dict[str, Any]
    style_axes: tuple[str, ...]

    def __call__(self, spec: SampleSpec, **per_sample: Any) -> dict[str, Any]:
        style = {axis: spec.style.get(axis) for axis in self.style_axes}
        return {**spec.metadata(), **self.fields, "style": style, **per_sample}


@dataclass
class Drawn:
    """One pipeline call's samples (images at generation size, metadata) and their pixels, uint8
    (batch, height, width, 3) on the pipeline's device."""

    samples: list[ShardSample]
    pixels: torch.Tensor


def seeded_generators(specs: list[SampleSpec]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from the plan."""
    return [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]


class PerSampleGuidance(float):
    """The guidance scales of one batch, passed where diffusers takes `guidance_scale`: as a float (the
    largest) for its `> 1` test, and per sample where the classifier-free-guidance step multiplies
    `guidance_scale * (noise_text - noise_uncond)`: each sample's difference by its own scale, in float32 as
    a Python float scale is (so a batch of one scale computes what the plain float computes)."""

    scales: tuple[float, ...]

    def __new__(cls, scales: list[float]) -> PerSampleGuidance:
        value = super().__new__(cls, max(scales))
        value.scales = tuple(scales)
        return value

    def __mul__(self, other):
        if not isinstance(other, torch.Tensor) or other.shape[0] != len(self.scales):
            return float(self) * other
        scales = torch.tensor(self.scales, dtype=torch.float32, device=other.device).view(-1, *([1] * (other.dim() - 1)))
        return (scales * other.float()).to(other.dtype)

    __rmul__ = __mul__


def takes_per_sample_guidance(pipe) -> bool:
    """Guidance-distilled UNets (LCM: time_cond_proj_dim) embed the scale itself: one scale per call there."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and getattr(unet.config, "time_cond_proj_dim", None) is None


def call_key(spec: SampleSpec, per_sample_guidance: bool) -> tuple:
    """What samples must share to go into one pipeline call (the conditioned modes add their strength)."""
    guidance = spec.guidance_scale > 1 if per_sample_guidance else spec.guidance_scale
    return (spec.steps, spec.width, spec.height, guidance)


def guidance_argument(specs: list[SampleSpec]) -> float:
    scales = [spec.guidance_scale for spec in specs]
    return scales[0] if len(set(scales)) == 1 else PerSampleGuidance(scales)


def render(pipe, specs: list[SampleSpec], generators: list[torch.Generator] | None = None, **conditioning) -> torch.Tensor:
    """One pipeline call: each sample draws its noise from its own CPU generator seeded from the plan
    (`generators`, or fresh ones), so its image does not depend on its batch neighbours (and is the same on
    any device). Returns uint8 (batch, height, width, 3) pixels on the pipeline's device."""
    first = specs[0]
    if "width" in inspect.signature(pipe.__call__).parameters:  # img2img pipelines take the size of their image
        conditioning = {"width": first.width, "height": first.height, **conditioning}
    # No negative prompt at all is None: SD 1.x/2.x encode "" either way, SDXL then uses its zero embedding.
    negative = [spec.negative_prompt for spec in specs] if any(spec.negative_prompt for spec in specs) else None
    images = pipe(
        prompt=[spec.prompt for spec in specs],
        negative_prompt=negative,
        num_inference_steps=first.steps,
        guidance_scale=guidance_argument(specs),
        generator=generators or seeded_generators(specs),
        output_type="pt",
        **conditioning,
    ).images
    return to_uint8(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(batch, 3, H, W) in [0, 1] → uint8 (batch, H, W, 3), rounded as diffusers' PIL output is (in float32)."""
    return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """uint8 (batch, H, W, 3) pixels as PIL images, with one copy to the host."""
    return [Image.fromarray(image) for image in pixels.cpu().numpy()]


def call_pipeline(pipe, specs: list[SampleSpec], generators: list[torch.Generator] | None = None, **conditioning) -> list[Image.Image]:
    """`render` as PIL images."""
    return to_pil(render(pipe, specs, generators, **conditioning))


def txt2img(pipe, specs: list[SampleSpec], stamp: SampleStamp, **sampler) -> Drawn:
    pixels = render(pipe, specs, **sampler)
    return Drawn([ShardSample(metadata=stamp(spec), image=image) for spec, image in zip(specs, to_pil(pixels))], pixels)


def sampler_arguments(eta: float) -> dict[str, Any]:
    """The pipeline arguments that come from the sampling config."""
    return {"eta": eta}


def check_scheduler_takes_eta(scheduler, eta: float) -> None:
    """diffusers passes eta only to schedulers whose step takes it (DDIM) and drops it silently otherwise."""
    if eta and "eta" not in inspect.signature(scheduler.step).parameters:
        raise UserError(
            f"sampling.eta = {eta:g} is DDIM's eta, but the pipeline's scheduler is {type(scheduler).__name__}; set model.scheduler: ddim or sampling.eta: 0"
        )
