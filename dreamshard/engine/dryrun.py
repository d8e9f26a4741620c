"""`dreamshard plan CONFIG`: what `generate` would do, before paying for GPUs. No Ray, no model load:
the shards and samples, the first prompts with their seeds, counts per class / template / style value,
an estimate of the bytes, and what the output holds already (fresh / resume / extend / refuse)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dreamshard.config import CONDITIONED_MODES, GenerateConfig
from dreamshard.datasets.sources import open_source
from dreamshard.engine.conditioned import check_pairing, check_settings, required_source
from dreamshard.engine.models import model_identity
from dreamshard.engine.plan import build_plan
from dreamshard.engine.run import differing_parts, fingerprint_digests, fingerprint_parts, resolved_config
from dreamshard.errors import UserError
from dreamshard.format.layout import shard_counts
from dreamshard.format.reader import committed_shards, read_run_record
from dreamshard.format.store import Store

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


def dry_run(config: GenerateConfig, out: str | None = None, num_samples: int | None = None, first: int = 10) -> PlanReport:
    config = resolved_config(config, out, num_samples)
    plan = build_plan(config.prompts, config.sampling, config.run.seed)
    check_settings(config)
    source_note = _check_source(config)
    counts = shard_counts(config.run.num_samples, config.output.samples_per_shard)
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
    return PlanReport(
        out=config.output.path, samples=config.run.num_samples, shards=len(counts), samples_per_shard=config.output.samples_per_shard,
        action=action, detail=detail, estimated_bytes=estimate, bytes_basis=basis, first=shown, counts=tallies, counted=counted,
    )  # fmt: skip


def _check_source(config: GenerateConfig) -> str:
    """A conditioned mode's source, listed (cheap: file names only) so that a root without the layout's images
    or a num_samples that does not pair every item once (prompts.pair_items_with) fails here as in generate.
    The pre-scan of every label is left to generate; a root that is not on this machine (planning a cluster
    run elsewhere) is skipped with a note."""
    if config.mode not in CONDITIONED_MODES:
        return ""
    source_config = required_source(config.source, config.mode)
    if not Path(source_config.root).expanduser().is_dir():
        return f"; the source was not listed (no {source_config.root} here)"
    source = open_source(source_config)
    check_pairing(config, len(source))
    return f"; source: {len(source)} {source_config.layout} items listed (generate pre-scans their labels)"


def _what_generate_would_do(config: GenerateConfig, plan, store: Store, counts: list[int]) -> tuple[str, str, dict]:
    try:
        record = read_run_record(store)
    except (OSError, ValueError) as exc:
        return "refuse", f"the output's dreamshard.json is unreadable ({exc})", {}
    if record is None:
        return "fresh", "a new dataset", {}
    try:
        model_info = model_identity(config.model)
        model_note = ""
    except UserError as exc:  # no model here (a laptop planning a cluster run): compare the rest
        model_info, model_note = None, f"; the model part was not checked ({exc})"
    unknown = dict.fromkeys(("hash", "revision", "variant", "config", "loras", "controlnet"))
    parts = fingerprint_parts(config, plan, model_info or unknown, None)
    if model_info is None:
        parts.pop("model")
    clip_model = config.quality.clip_model
    if clip_model and not Path(clip_model).expanduser().exists():  # not on this machine: compare the rest
        parts.pop("quality")
        model_note += f"; the quality part was not checked (no {clip_model} here)"
    # The source of a conditioned mode is not listed here (no pre-scan in a dry run): only what is compared.
    fingerprints = fingerprint_digests(parts)
    differs = differing_parts(store, fingerprints, parts)
    if differs:
        return "refuse", f"the output holds a dataset made with a different {' and '.join(differs)}", {}
    committed = committed_shards(store, config.output.samples_per_shard)
    have = sum(marker["count"] for marker in committed.values())
    done = sum(1 for shard, marker in committed.items() if shard < len(counts) and marker["count"] == counts[shard])
    if any(shard >= len(counts) or marker["count"] > counts[shard] for shard, marker in committed.items()):
        return "refuse", f"the output holds {have} samples, more than num_samples={config.run.num_samples}", committed
    if done == len(counts):
        return "complete", f"all {len(counts)} shards are committed; nothing to generate{model_note}", committed
    kind = "extend" if config.run.num_samples > record.get("num_samples", 0) else "resume"
    return kind, f"{done} of {len(counts)} shards committed ({have} samples); {len(counts) - done} to generate{model_note}", committed


def _estimate_bytes(config: GenerateConfig, committed: dict) -> tuple[int, str]:
    samples = sum(marker["count"] for marker in committed.values())
    if samples:
        per_sample = sum(marker["tar_bytes"] for marker in committed.values()) / samples
        return int(per_sample * config.run.num_samples), f"{per_sample / 1024:.0f} KiB per sample in the committed shards"
    pixels = config.sampling.width * config.sampling.height
    per_sample = pixels * BYTES_PER_PIXEL[config.output.image_format] + 1024
    return int(per_sample * config.run.num_samples), f"a rough {per_sample / 1024:.0f} KiB per {config.output.image_format} sample"
