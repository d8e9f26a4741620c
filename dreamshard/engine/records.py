"""What `generate` records about a run, apart from the shards: the run's identity (the parts that must match
for new shards to join old ones), the run record (`dreamshard.json`) and one `stats.jsonl` line per call.
Pure functions of the config, the plan, the weights' identity and the driver's report."""

from __future__ import annotations

import platform
import time
from importlib import metadata

from dreamshard import __version__
from dreamshard.config import GenerateConfig
from dreamshard.engine.driver import DriverReport
from dreamshard.engine.plan import Plan
from dreamshard.engine.quality import quality_identity
from dreamshard.format.layout import FORMAT_VERSION, LAYOUT
from dreamshard.identity import Identity

VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "ray", "pyarrow", "pillow", "webdataset")
MODEL_PARTS = ("hash", "revision", "variant", "config", "loras", "controlnet")  # of model_identity, in the fingerprint


def resolved_config(config: GenerateConfig, out: str | None, num_samples: int | None) -> GenerateConfig:
    """The config with the command line's --out and --num-samples applied (a copy)."""
    config = config.model_copy(deep=True)
    if out is not None:
        config.output.path = str(out)
    if num_samples is not None:
        config.run.num_samples = num_samples
    return config


def fingerprint_parts(config: GenerateConfig, plan: Plan, model_info: dict | None, conditioner=None) -> dict:
    """What must match for new shards to belong with the ones already written: the plan (prompts, sampling,
    seed), the weights by content (base or single-file checkpoint, variant, every LoRA with its scale,
    ControlNet, hub commit) and how they are run, the quality scores and filter, and the shard layout with the
    format version. Not num_samples, workers, batch, output, speed options (compile, attention,
    channels_last, VAE slicing change pixels by float rounding at most) or where the weights lie. Dict-valued
    parts are digested into the fingerprint and kept as they are in the run record, so a refusal can name
    what changed. `model_info` None leaves the model part out (a plan made where the weights are not)."""
    parts: dict = {"plan": plan.fingerprint}
    if model_info is not None:
        parts["model"] = {
            **{name: model_info[name] for name in MODEL_PARTS},
            "scheduler": config.model.scheduler, "dtype": config.model.dtype, "mode": config.mode, "vae_tiling": config.run.vae_tiling,
        }  # fmt: skip
    parts["quality"] = quality_identity(config)
    parts["layout"] = {
        "format_version": FORMAT_VERSION, "samples_per_shard": config.output.samples_per_shard,
        "image_format": config.output.image_format, "quality": config.output.quality,
    }  # fmt: skip
    if conditioner is not None:  # conditioned modes: which source items, and how they condition samples
        parts["source"] = conditioner.fingerprint
    return parts


def run_identity(config: GenerateConfig, plan: Plan, model_info: dict | None, conditioner=None) -> Identity:
    return Identity(fingerprint_parts(config, plan, model_info, conditioner))


def run_record(config: GenerateConfig, plan: Plan, counts: list[int], identity: Identity, model_info: dict, previous: dict | None) -> dict:
    """dreamshard.json (docs/format.md): what the run is and how it was made."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {
        "format_version": FORMAT_VERSION,
        "dreamshard": __version__,
        "created": (previous or {}).get("created", now),
        "updated": now,
        "fingerprint": identity.digest,
        "fingerprints": identity.digests,
        "fingerprint_parts": identity.parts,
        "num_samples": config.run.num_samples,
        "samples_per_shard": config.output.samples_per_shard,
        "num_shards": len(counts),
        "image_format": config.output.image_format,
        "layout": LAYOUT,
        "model": model_info,
        "plan": plan.describe(),
        "config": config.model_dump(mode="json"),
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "dreamshard": __version__}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_stats(report: DriverReport, num_samples: int, started_at: float, shards_skipped: int) -> dict:
    """One `generate` call, as appended to OUT/stats.jsonl (docs/format.md)."""
    end = report.ended or time.perf_counter()
    workers = []
    for worker in report.workers:
        alive = end - worker.ready_at if worker.ready_at else 0.0
        workers.append({
            "name": worker.name, "host": worker.info.get("host"), "gpus": worker.info.get("gpus", []),
            "load_seconds": worker.info.get("load_seconds"), "shards": worker.shards, "images": worker.images,
            "images_per_s": round(worker.images / alive, 3) if alive > 0 else 0.0,
        })  # fmt: skip
    return {
        "start": iso_time(started_at), "end": iso_time(time.time()), "host": platform.node(), "dreamshard": __version__,
        "num_samples": num_samples, "shards_skipped": shards_skipped, "shards_made": len(report.committed),
        "images_made": report.images_committed, "shards_failed": {str(k): v for k, v in report.failed.items()},
        "steady_images_per_s": round(report.steady_images_per_s, 3), "retries": report.retries,
        "failed_workers": report.failed_workers, "worker_errors": report.worker_errors, "workers": workers,
    }  # fmt: skip


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))
