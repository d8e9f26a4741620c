"""Turning sample specs into samples, knowing nothing of Ray: the one pipeline call every mode makes, the
txt2img mode, batching, and the sample record each sample carries (built once, from its spec and the run's
generation settings).

A per-mode function takes (pipe, specs sharing steps/guidance/size, stamp, **sampler) and returns
ShardSamples in the order of the specs; `sampler` holds the pipeline arguments that come from the sampling
config (`eta`); `conditioned.Conditioner.generate` is the one of the conditioned modes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

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


def seeded_generators(specs: list[SampleSpec]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from the plan."""
    return [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]


def call_pipeline(pipe, specs: list[SampleSpec], generators: list[torch.Generator] | None = None, **conditioning):
    """One pipeline call for specs sharing (steps, guidance, size): each sample draws its noise from its own
    CPU generator seeded from the plan (`generators`, or fresh ones), so its image does not depend on its
    batch neighbours (and is the same on any device). Returns the PIL images."""
    first = specs[0]
    if "width" in inspect.signature(pipe.__call__).parameters:  # img2img pipelines take the size of their image
        conditioning = {"width": first.width, "height": first.height, **conditioning}
    # No negative prompt at all is None: SD 1.x/2.x encode "" either way, SDXL then uses its zero embedding.
    negative = [spec.negative_prompt for spec in specs] if any(spec.negative_prompt for spec in specs) else None
    return pipe(
        prompt=[spec.prompt for spec in specs],
        negative_prompt=negative,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale,
        generator=generators or seeded_generators(specs),
        output_type="pil",
        **conditioning,
    ).images


def txt2img(pipe, specs: list[SampleSpec], stamp: SampleStamp, **sampler) -> list[ShardSample]:
    images = call_pipeline(pipe, specs, **sampler)
    return [ShardSample(metadata=stamp(spec), image=image) for spec, image in zip(specs, images)]


def sampler_arguments(eta: float) -> dict[str, Any]:
    """The pipeline arguments that come from the sampling config."""
    return {"eta": eta}


def check_scheduler_takes_eta(scheduler, eta: float) -> None:
    """diffusers passes eta only to schedulers whose step takes it (DDIM) and drops it silently otherwise."""
    if eta and "eta" not in inspect.signature(scheduler.step).parameters:
        raise UserError(
            f"sampling.eta = {eta:g} is DDIM's eta, but the pipeline's scheduler is {type(scheduler).__name__}; set model.scheduler: ddim or sampling.eta: 0"
        )


def batches(specs: list[SampleSpec], batch_size: int) -> Iterator[list[SampleSpec]]:
    """Batches of specs that one pipeline call can take (same steps, guidance and size), in plan order
    within each group."""
    groups: dict[tuple, list[SampleSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.steps, spec.guidance_scale, spec.width, spec.height), []).append(spec)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]
