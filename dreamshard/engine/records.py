"""What `generate` records about a run, apart from the shards: the run's identity (the parts that must match
for new shards to join old ones), the run record (`dreamshard.json`) and one `stats.jsonl` line per call.
Pure functions of the config, the plan, the weights' identity and the driver's report."""

from __future__ import annotations

import platform
import time
from importlib import metadata

from dreamshard import __version__
from dreamshard.config import GenerateConfig
from dreamshard.engine.driver import DriverReport, WorkerFacts
from dreamshard.engine.modes import mode_for
from dreamshard.engine.plan import Plan
from dreamshard.engine.quality import quality_identity
from dreamshard.errors import UserError
from dreamshard.format.layout import FORMAT_VERSION, LABEL_FIELD, LAYOUT, shard_counts
from dreamshard.format.reader import BadRunRecord, read_run_record
from dreamshard.format.store import Store
from dreamshard.identity import Identity

VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "ray", "pyarrow", "pillow", "webdataset")
MODEL_PARTS = ("hash", "revision", "variant", "config", "loras", "controlnet", "vae")  # of model_identity, in the fingerprint (vae only when set)


TARGET_SHARDS = 256  # auto: shards in a run (a 64-GPU cluster gets 4 rounds)
MAX_AUTO_SHARD = 1000  # auto: samples per shard at most
CALLS_PER_GROUP = 2  # auto: full pipeline calls per call group in a shard at least


MAX_SHARDS = 10_000_000  # a plan past this is a typo (1e15 samples), and its shard list alone would not fit in memory


def checked_counts(config: GenerateConfig) -> list[int]:
    """Samples per shard of the run, refusing a plan too large to list."""
    shards = -(-config.run.num_samples // config.output.shard_size)
    if shards > MAX_SHARDS:
        raise UserError(
            f"num_samples {config.run.num_samples} makes {shards} shards of {config.output.shard_size}; at most {MAX_SHARDS:,} "
            "(raise output.samples_per_shard or lower num_samples)"
        )
    return shard_counts(config.run.num_samples, config.output.shard_size)


def resolved_config(config: GenerateConfig, out: str | None, num_samples: int | None) -> GenerateConfig:
    """The config with the command line's --out and --num-samples applied and `output.samples_per_shard:
    auto` resolved (a copy): to the size recorded in the output's run record when it has one (a resume or an
    extension keeps its shards), else `auto_shard_size`."""
    config = config.model_copy(deep=True)
    if out is not None:
        config.output.path = str(out)
    if num_samples is not None:
        config.run.num_samples = num_samples
    if config.output.samples_per_shard == "auto":
        config.output.samples_per_shard = recorded_shard_size(config.output.path) or auto_shard_size(config)
    return config


def recorded_shard_size(path: str) -> int | None:
    """samples_per_shard of the run record at `path`, if one is there and readable."""
    try:
        record = read_run_record(Store(path))
    except (BadRunRecord, OSError, UserError):
        return None
    size = (record or {}).get("samples_per_shard")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def auto_shard_size(config: GenerateConfig) -> int:
    """About TARGET_SHARDS shards (work for every worker of a large cluster, from num_samples alone: the plan
    does not depend on the cluster), but at least CALLS_PER_GROUP full pipeline calls for each group of
    samples that must share a call (steps values x strengths x guidance on/off) and at most MAX_AUTO_SHARD."""
    least = CALLS_PER_GROUP * config.run.batch_size * call_groups(config)
    return max(1, min(MAX_AUTO_SHARD, max(-(-config.run.num_samples // TARGET_SHARDS), least), config.run.num_samples))


MAX_DEVICE_GIB = 192.0  # more than any single accelerator holds: a plan that needs more is refused outright
VAE_TILE = 512  # diffusers' default VAE tile size (pixels), with run.vae_tiling


def activation_gib(config: GenerateConfig, bytes_per_value: int = 2) -> float:
    """A rough peak of one worker's activations for one call at the plan's size (in half precision, as on a
    GPU): the VAE decoder's full-resolution stage dominates (128 channels, about six tensors alive at once)
    for every image decoded together (one with vae_slicing; tiles with vae_tiling), next to the UNet's widest
    latent-resolution blocks (1280 channels, both guidance branches). Weights are not included."""
    height, width, batch = config.sampling.height, config.sampling.width, config.run.batch_size
    decoded = 1 if config.run.vae_slicing else batch
    if config.run.vae_tiling:
        height, width = min(height, VAE_TILE), min(width, VAE_TILE)
    vae = decoded * height * width * 128 * 6 * bytes_per_value
    unet = batch * 2 * (config.sampling.height // 8) * (config.sampling.width // 8) * 1280 * 10 * bytes_per_value
    return max(vae, unet) / 2**30


def check_memory(config: GenerateConfig) -> float:
    """The activation estimate (GiB); UserError before any worker starts when no accelerator could hold it."""
    need = activation_gib(config)
    if need > MAX_DEVICE_GIB:
        raise UserError(
            f"sampling {config.sampling.width}x{config.sampling.height} at run.batch_size {config.run.batch_size} needs about {need:,.0f} GiB of "
            f"activations per worker, more than any accelerator holds ({MAX_DEVICE_GIB:.0f} GiB); lower the size or the batch, or set run.vae_tiling"
        )
    return need


def call_groups(config: GenerateConfig) -> int:
    """How many groups of samples a shard splits into for its pipeline calls, from the config alone."""
    steps = config.sampling.steps
    steps_values = 1 if isinstance(steps, int) else steps[1] - steps[0] + 1
    guidance = config.sampling.guidance_scale
    guidance_sides = 2 if not isinstance(guidance, (int, float)) and guidance[0] <= 1 < guidance[1] else 1
    condition = config.condition
    strengths = len({*condition.strength_by_style.values(), condition.strength}) if mode_for(config.mode).keeps_label else 1
    return steps_values * guidance_sides * strengths


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
            **{name: model_info[name] for name in MODEL_PARTS if name in model_info},
            "scheduler": config.model.scheduler, "dtype": config.model.dtype, "mode": config.mode, "vae_tiling": config.run.vae_tiling,
        }  # fmt: skip
    parts["quality"] = quality_identity(config)
    parts["layout"] = {
        "format_version": FORMAT_VERSION, "samples_per_shard": config.output.shard_size,
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
        "samples_per_shard": config.output.shard_size,
        "num_shards": len(counts),
        "image_format": config.output.image_format,
        "label": LABEL_FIELD if mode_for(config.mode).keeps_label else None,  # what each sample carries besides its image
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
    workers = [worker_stats(worker, end) for worker in report.workers]
    calls = sum(worker["calls"] for worker in workers)
    return {
        "start": iso_time(started_at), "end": iso_time(time.time()), "host": platform.node(), "dreamshard": __version__,
        "num_samples": num_samples, "shards_skipped": shards_skipped, "shards_made": len(report.committed),
        "images_made": report.images_committed, "shards_failed": {str(k): v for k, v in report.failed.items()},
        "steady_images_per_s": round(report.steady_images_per_s, 3), "retries": report.retries,
        "failed_workers": report.failed_workers, "worker_errors": report.worker_errors,
        "calls": calls, "images_per_call": round(sum(worker["drawn"] for worker in workers) / calls, 3) if calls else 0.0,
        "busy_workers_fraction": round(report.busy_worker_s / report.ready_worker_s, 3) if report.ready_worker_s else 0.0,
        "busy_workers": [list(point) for point in report.busy], "backups": report.backups, "backups_won": report.backups_won,
        "workers": workers,
    }  # fmt: skip


def worker_stats(worker: WorkerFacts, end: float) -> dict:
    """One worker in stats.jsonl: where it ran, what it made, and where its time went (from its committed
    shards' markers): pipeline calls, images per call, seconds inside calls, scoring and waiting for sources,
    and its busy fraction (seconds inside pipeline calls over the seconds it was ready)."""
    alive = end - worker.ready_at if worker.ready_at else 0.0
    generation = worker.generation
    calls, drawn = int(generation.get("calls", 0)), int(generation.get("images", 0))
    return {
        "name": worker.name, "host": worker.info.get("host"), "gpus": worker.info.get("gpus", []),
        "load_seconds": worker.info.get("load_seconds"), "shards": worker.shards, "images": worker.images,
        "images_per_s": round(worker.images / alive, 3) if alive > 0 else 0.0,
        "calls": calls, "drawn": drawn, "images_per_call": round(drawn / calls, 3) if calls else 0.0,
        "padded": int(generation.get("padded", 0)), "pipeline_s": round(generation.get("pipeline_s", 0.0), 3),
        "scoring_s": round(generation.get("scoring_s", 0.0), 3), "waiting_s": round(generation.get("waiting_s", 0.0), 3),
        "ready_s": round(alive, 3), "busy_fraction": round(generation.get("pipeline_s", 0.0) / alive, 3) if alive > 0 else 0.0,
    }  # fmt: skip


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))
