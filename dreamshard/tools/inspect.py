"""`dreamshard inspect`: samples, shards, bytes, counts per class / template / style axis, the run
statistics (stats.jsonl) and the quality scores of a run directory."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from rich.table import Table

from dreamshard.errors import UserError, one_line
from dreamshard.format.layout import STATS
from dreamshard.format.reader import committed_rows, committed_shards, manifest_rows
from dreamshard.format.store import Store
from dreamshard.tools import open_run


@dataclass
class DatasetInfo:
    out: str
    samples: int  # committed samples
    planned_samples: int
    shards: int  # committed shards
    planned_shards: int
    bytes: int
    image_format: str
    model: dict
    counts: dict[str, Counter] = field(default_factory=dict)  # "class", "template", "style: <axis>" -> counts
    runs: list[dict] = field(default_factory=list)  # OUT/stats.jsonl: one record per generate call
    quality: QualitySummary | None = None  # None: no shard was scored or filtered


@dataclass
class QualitySummary:
    """The quality columns of the committed samples and the redraw tallies of their shard markers."""

    clip_scores: list[float]  # of the samples that have one
    attempts: Counter  # attempts -> samples
    nsfw: Counter  # True / False / None (no checker) -> samples
    draws: int  # images generated for the committed samples (draws >= samples)
    rejected: Counter  # reason -> rejected draws
    dropped: int  # draws made ahead of a verdict and dropped (the sample had passed already)
    exhausted: int  # samples kept after max_attempts without passing

    @classmethod
    def of(cls, rows: list[dict], markers: list[dict]) -> QualitySummary:
        tallies = [marker["quality"] for marker in markers if isinstance(marker.get("quality"), dict)]
        rejected: Counter = Counter()
        for tally in tallies:
            rejected.update(tally.get("rejected", {}))
        return cls(
            clip_scores=[row["clip_score"] for row in rows if row.get("clip_score") is not None],
            attempts=Counter(row.get("attempts", 1) for row in rows),
            nsfw=Counter(row.get("nsfw") for row in rows),
            draws=sum(tally.get("draws", 0) for tally in tallies) or len(rows),
            rejected=rejected,
            dropped=sum(tally.get("dropped", 0) for tally in tallies),
            exhausted=sum(tally.get("exhausted", 0) for tally in tallies),
        )

    def histogram(self, bins: int = 10) -> list[tuple[float, float, int]]:
        """(low, high, count) of `bins` equal-width bins over the CLIP scores (the last bin includes its top)."""
        if not self.clip_scores:
            return []
        low, high = min(self.clip_scores), max(self.clip_scores)
        width = (high - low) / bins or 1.0
        counts = Counter(min(int((score - low) / width), bins - 1) for score in self.clip_scores)
        return [(low + k * width, low + (k + 1) * width, counts[k]) for k in range(bins)]


def inspect_dataset(out: str | Path) -> DatasetInfo:
    store, record = open_run(out)
    committed = committed_shards(store, record["samples_per_shard"])
    try:
        rows = manifest_rows(committed_rows(store, committed))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"{out}: an index file of a committed shard is unreadable ({one_line(exc)}); run `dreamshard verify {out}`") from None
    counts: dict[str, Counter] = {"class": Counter(), "template": Counter()}
    markers = list(committed.values())
    quality = QualitySummary.of(rows, markers) if any("quality" in marker for marker in markers) else None  # scored or filtered runs
    for row in rows:
        counts["class"][row["class_name"] or "(none)"] += 1
        counts["template"][row["template"] or "(none)"] += 1
        for axis, value in row["style"].items():
            counts.setdefault(f"style: {axis}", Counter())[value or "(not in prompt)"] += 1
    return DatasetInfo(
        out=str(out),
        samples=sum(marker["count"] for marker in committed.values()),
        planned_samples=record["num_samples"],
        shards=len(committed),
        planned_shards=record["num_shards"],
        bytes=sum(marker["tar_bytes"] for marker in committed.values()),
        image_format=record["image_format"],
        model=record.get("model", {}),
        counts=counts,
        runs=read_stats(store),
        quality=quality,
    )


def read_stats(store: Store) -> list[dict]:
    """The records of OUT/stats.jsonl; a damaged line is skipped (the statistics never block a tool)."""
    try:
        text = store.read_bytes(STATS).decode() if store.exists(STATS) else ""
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def inspect_json(info: DatasetInfo) -> dict:
    """`inspect --json`: the same facts as the tables, with the keys docs/cli.md lists (stable)."""
    quality = info.quality
    return {
        "out": info.out,
        "samples": info.samples,
        "planned_samples": info.planned_samples,
        "shards": info.shards,
        "planned_shards": info.planned_shards,
        "bytes": info.bytes,
        "image_format": info.image_format,
        "model": info.model,
        "counts": {name: dict(sorted(counter.items(), key=lambda item: (-item[1], item[0]))) for name, counter in info.counts.items()},
        "runs": info.runs,
        "quality": None if quality is None else quality_json(quality),
    }


def quality_json(quality: QualitySummary) -> dict:
    scores = sorted(quality.clip_scores)
    return {
        "draws": quality.draws,
        "rejected": dict(quality.rejected),
        "dropped": quality.dropped,
        "exhausted": quality.exhausted,
        "nsfw": {"flagged": quality.nsfw[True], "checked": quality.nsfw[True] + quality.nsfw[False]},
        "clip_score": {"scored": len(scores), "min": scores[0], "median": scores[len(scores) // 2], "max": scores[-1]} if scores else None,
        "clip_score_histogram": [{"from": low, "to": high, "samples": count} for low, high, count in quality.histogram()],
        "attempts": {str(attempts): count for attempts, count in sorted(quality.attempts.items())},
    }


def inspect_tables(info: DatasetInfo) -> list[Table]:
    """Rich tables: the overview, then one table of counts per class / template / style axis."""
    overview = Table(title=f"dataset {info.out}", show_header=False)
    overview.add_row("samples", f"{info.samples} of {info.planned_samples} planned")
    overview.add_row("shards", f"{info.shards} of {info.planned_shards} committed")
    overview.add_row("bytes", f"{info.bytes:,} ({info.bytes / 2**20:.1f} MiB)")
    overview.add_row("image format", info.image_format)
    overview.add_row("model", f"{info.model.get('id', '?')} (hash {info.model.get('hash', '?')})")
    tables = [overview]
    if info.runs:
        tables += run_tables(info.runs)
    if info.quality is not None:
        tables += quality_tables(info.quality, info.samples)
    total = max(info.samples, 1)
    for name, counter in info.counts.items():
        table = Table(title=name)
        table.add_column(name.split(": ")[-1])
        table.add_column("samples", justify="right")
        table.add_column("share", justify="right")
        for value, count in sorted(counter.items(), key=lambda item: (-item[1], item[0])):
            table.add_row(value, str(count), f"{100 * count / total:.1f}%")
        tables.append(table)
    return tables


def run_tables(runs: list[dict]) -> list[Table]:
    """The generate calls (stats.jsonl), and the workers of the last one: where their time went."""
    calls = Table(title="generate calls (stats.jsonl)")
    columns = (
        "start",
        "end",
        "host",
        "workers",
        "shards made",
        "images made",
        "steady img/s",
        "img/call",
        "busy workers",
        "backups",
        "retries",
        "failed workers",
    )
    for column in columns:
        calls.add_column(column, justify="left" if column in ("start", "end", "host") else "right")
    for run in runs:
        busy = run.get("busy_workers_fraction")
        calls.add_row(
            str(run.get("start", "?")), str(run.get("end", "?")), str(run.get("host", "?")), str(len(run.get("workers", []))),
            str(run.get("shards_made", "?")), str(run.get("images_made", "?")), f"{run.get('steady_images_per_s', 0):.2f}",
            f"{run['images_per_call']:.2f}" if "images_per_call" in run else "-", f"{100 * busy:.0f}%" if busy is not None else "-",
            f"{run.get('backups', 0)} ({run.get('backups_won', 0)} won)" if "backups" in run else "-",
            str(run.get("retries", "?")), str(run.get("failed_workers", "?")),
        )  # fmt: skip
    tables = [calls]
    workers = runs[-1].get("workers", []) if runs else []
    if any("calls" in worker for worker in workers):
        table = Table(title="workers of the last generate call: where their time went")
        for column in ("worker", "host", "shards", "images", "calls", "img/call", "in calls s", "scoring s", "waiting s", "ready s", "busy"):
            table.add_column(column, justify="left" if column in ("worker", "host") else "right")
        for worker in workers:
            table.add_row(
                str(worker.get("name")), str(worker.get("host")), str(worker.get("shards", 0)), str(worker.get("images", 0)),
                str(worker.get("calls", 0)), f"{worker.get('images_per_call', 0):.2f}", f"{worker.get('pipeline_s', 0):.1f}",
                f"{worker.get('scoring_s', 0):.1f}", f"{worker.get('waiting_s', 0):.1f}", f"{worker.get('ready_s', 0):.1f}",
                f"{100 * worker.get('busy_fraction', 0):.0f}%",
            )  # fmt: skip
        tables.append(table)
    return tables


def quality_tables(quality: QualitySummary, samples: int) -> list[Table]:
    """Redraws and rejections, the CLIP score histogram, the attempts per sample."""
    overview = Table(title="quality", show_header=False)
    overview.add_row("draws", f"{quality.draws} for {samples} samples ({quality.draws - samples} redraws)")
    for reason, count in sorted(quality.rejected.items()):
        overview.add_row(f"rejected: {reason}", str(count))
    overview.add_row("drawn ahead and dropped", str(quality.dropped))
    overview.add_row("exhausted (kept after max_attempts)", str(quality.exhausted))
    checked = quality.nsfw[True] + quality.nsfw[False]
    overview.add_row("nsfw", f"{quality.nsfw[True]} flagged of {checked} checked" if checked else "no safety checker")
    if quality.clip_scores:
        ordered = sorted(quality.clip_scores)
        overview.add_row("clip_score", f"min {ordered[0]:.2f}, median {ordered[len(ordered) // 2]:.2f}, max {ordered[-1]:.2f}")
    else:
        overview.add_row("clip_score", "not scored (no quality.clip_model)")
    tables = [overview]
    histogram = quality.histogram()
    if histogram:
        scores = Table(title="clip_score histogram")
        for column in ("from", "to", "samples", ""):
            scores.add_column(column, justify="left" if not column else "right")
        top = max(count for _, _, count in histogram) or 1
        for low, high, count in histogram:
            scores.add_row(f"{low:.2f}", f"{high:.2f}", str(count), "#" * round(30 * count / top))
        tables.append(scores)
    attempts = Table(title="attempts per sample")
    attempts.add_column("attempts", justify="right")
    attempts.add_column("samples", justify="right")
    for value, count in sorted(quality.attempts.items()):
        attempts.add_row(str(value), str(count))
    tables.append(attempts)
    return tables
