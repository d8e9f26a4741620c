"""`dreamshard plan CONFIG`: what `generate` would do, before paying for GPUs. No Ray, no model load:
the shards and samples, the first prompts with their seeds, counts per class / template / style value,
an estimate of the bytes, and what the output holds already (fresh / resume / extend / refuse)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dreamshard.config import GenerateConfig
from dreamshard.datasets.sources import open_source
from dreamshard.engine.conditioned import check_pairing, check_settings, required_source
from dreamshard.engine.models import model_identity
from dreamshard.engine.modes import mode_for
from dreamshard.engine.plan import build_plan
from dreamshard.engine.records import check_memory, checked_counts, fingerprint_parts, resolved_config
from dreamshard.errors import UserError
from dreamshard.format.layout import RUN_RECORD
from dreamshard.format.rundir import RunDir
from dreamshard.format.store import Store
from dreamshard.identity import Identity

COUNT_LIMIT = 200_000  # samples counted per class/template/style (a prefix of a larger plan)
# Rough bytes per pixel of SD images as encoded by the writer (jpg and webp at quality 95), plus ~1 KB of
# json and txt per sample; the committed shards of an existing output give the real figure instead.
BYTES_PER_PIXEL = {"jpg": 0.45, "png": 1.9, "webp": 0.3}


@dataclass
class PlanReport:
    out: str
    samples: int
    shards: int
    samples_per_shard: int
    action: str  # fresh / resume / extend / complete / refuse
    detail: str
    estimated_bytes: int
    bytes_basis: str
    first: list[dict] = field(default_factory=list)  # index, seed, class, style, prompt
    counts: dict[str, Counter] = field(default_factory=dict)
    counted: int = 0
    workers: str = ""  # with --workers: how busy they would be
    memory_gib: float = 0.0  # activations of one worker's call, roughly (records.activation_gib)


def worker_load(shards_to_make: int, workers: int) -> str:
    """What `workers` workers would do with the shards still to make (whole shards, one at a time each)."""
    if shards_to_make == 0:
        return f"with {workers} workers: nothing to make"
    rounds, last = -(-shards_to_make // workers), shards_to_make % workers or workers
    if shards_to_make < workers:
        return f"with {workers} workers: only {shards_to_make} have a shard to make, {workers - shards_to_make} take backup copies (lower output.samples_per_shard, or auto)"
    return (
        f"with {workers} workers: every worker has work ({shards_to_make} shards in {rounds} round(s); the last round keeps {last} of "
        f"{workers} busy and the idle ones take backup copies of the slowest shards)"
    )


def dry_run(config: GenerateConfig, out: str | None = None, num_samples: int | None = None, first: int = 10, workers: int | None = None) -> PlanReport:
    config = resolved_config(config, out, num_samples)
    plan = build_plan(config.prompts, config.sampling, config.run.seed)
    check_settings(config)
    source_note = _check_source(config)
    counts = checked_counts(config)
    memory = check_memory(config)
    counted = min(config.run.num_samples, COUNT_LIMIT)
    specs = plan.specs(0, counted)
    tallies: dict[str, Counter] = {"class": Counter(), "template": Counter()}
    for spec in specs:
        tallies["class"][spec.class_name or "(none)"] += 1
        tallies["template"][spec.template or "(file)"] += 1
        for axis, value in spec.style.items():
            tallies.setdefault(f"style: {axis}", Counter())[value] += 1
    shown = [
        {"index": s.index, "seed": s.seed, "class": s.class_name, "style": s.style, "prompt": s.prompt, "steps": s.steps, "guidance": s.guidance_scale}
        for s in specs[:first]
    ]
    store = Store(config.output.path)
    action, detail, committed = _what_generate_would_do(config, plan, store, counts)
    estimate, basis = _estimate_bytes(config, committed)
    detail += source_note
    to_make = 0 if action == "refuse" else sum(1 for shard, count in enumerate(counts) if committed.get(shard, {}).get("count") != count)
    return PlanReport(
        out=config.output.path, samples=config.run.num_samples, shards=len(counts), samples_per_shard=config.output.shard_size,
        action=action, detail=detail, estimated_bytes=estimate, bytes_basis=basis, first=shown, counts=tallies, counted=counted,
        workers=worker_load(to_make, workers) if workers else "",
        memory_gib=memory,
    )  # fmt: skip


def _check_source(config: GenerateConfig) -> str:
    """A conditioned mode's source, listed (cheap: file names only) so that a root without the layout's images
    or a num_samples that does not pair every item once (prompts.pair_items_with) fails here as in generate.
    The pre-scan of every label is left to generate; a root that is not on this machine (planning a cluster
    run elsewhere) is skipped with a note."""
    if not mode_for(config.mode).keeps_label:
        return ""
    source_config = required_source(config.source, config.mode)
    if not Path(source_config.root).expanduser().is_dir():
        return f"; the source was not listed (no {source_config.root} here)"
    source = open_source(source_config)
    check_pairing(config, len(source))
    return f"; source: {len(source)} {source_config.layout} items listed (generate pre-scans their labels)"


def _what_generate_would_do(config: GenerateConfig, plan, store: Store, counts: list[int]) -> tuple[str, str, dict]:
    """generate's own decision (RunDir.classify) on what can be known here: parts of the identity that need
    what is not on this machine (the model, a CLIP model) are left out and named in the detail. A new
    output needs no identity (nor a look at the model)."""
    rundir = RunDir(store)
    if rundir.conflict(Identity({})) is None and not store.exists(RUN_RECORD):
        return "fresh", "a new dataset", {}
    notes = ""
    try:
        model_info = model_identity(config.model)
    except UserError as exc:  # no model here (a laptop planning a cluster run): compare the rest
        model_info, notes = None, f"; the model part was not checked ({exc})"
    parts = fingerprint_parts(config, plan, model_info)
    clip_model = config.quality.clip_model
    if clip_model and not Path(clip_model).expanduser().exists():  # not on this machine: compare the rest
        parts.pop("quality")
        notes += f"; the quality part was not checked (no {clip_model} here)"
    # The source of a conditioned mode is not compared here (its pre-scan is left to generate).
    state = rundir.classify(Identity(parts), counts, config.output.shard_size)
    if state.action == "refuse":
        return "refuse", state.reason, state.committed
    return state.action, state.reason + notes, state.committed


def _estimate_bytes(config: GenerateConfig, committed: dict) -> tuple[int, str]:
    samples = sum(marker["count"] for marker in committed.values())
    if samples:
        per_sample = sum(marker["tar_bytes"] for marker in committed.values()) / samples
        return int(per_sample * config.run.num_samples), f"{per_sample / 1024:.0f} KiB per sample in the committed shards"
    pixels = config.sampling.width * config.sampling.height
    per_sample = pixels * BYTES_PER_PIXEL[config.output.image_format] + 1024
    return int(per_sample * config.run.num_samples), f"a rough {per_sample / 1024:.0f} KiB per {config.output.image_format} sample"
