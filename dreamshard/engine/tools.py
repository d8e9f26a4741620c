"""Dataset tools on a run directory (local path or fsspec URL): inspect, verify, preview."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from rich.table import Table

from dreamshard.errors import UserError, one_line
from dreamshard.format.layout import MANIFEST, MARKER_SNAPSHOT, PARTIAL, SIZES, STATS, sample_key, shard_counts, shard_marker, shard_parquet, shard_tar
from dreamshard.format.reader import (
    BadRunRecord,
    checked_run_record,
    committed_rows,
    committed_shards,
    manifest_rows,
    read_marker_snapshot,
    read_shard,
)
from dreamshard.format.record import JSON_FIELDS, json_fields
from dreamshard.format.store import Store, json_bytes
from dreamshard.logs import StageProgress


def _open_run(out: str | Path) -> tuple[Store, dict]:
    """The run directory and its checked record; a problem is one UserError line."""
    store = Store(out)
    try:
        return store, checked_run_record(store)
    except FileNotFoundError:
        raise UserError(f"{out} is not a dreamshard run directory (no dreamshard.json); pass the output of `dreamshard generate`") from None
    except BadRunRecord as exc:
        raise UserError(f"{exc}; it was changed by hand or damaged: re-run `dreamshard generate` with the run's config to rewrite it") from None


# ------------------------------------------------------------------------------------------- inspect


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
    store, record = _open_run(out)
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
        runs = Table(title="generate calls (stats.jsonl)")
        for column in ("start", "end", "host", "workers", "shards made", "images made", "steady img/s", "retries", "failed workers"):
            runs.add_column(column, justify="right" if column not in ("start", "end", "host") else "left")
        for run in info.runs:
            runs.add_row(
                str(run.get("start", "?")), str(run.get("end", "?")), str(run.get("host", "?")), str(len(run.get("workers", []))),
                str(run.get("shards_made", "?")), str(run.get("images_made", "?")), f"{run.get('steady_images_per_s', 0):.2f}",
                str(run.get("retries", "?")), str(run.get("failed_workers", "?")),
            )  # fmt: skip
        tables.append(runs)
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


def quality_tables(quality: QualitySummary, samples: int) -> list[Table]:
    """Redraws and rejections, the CLIP score histogram, the attempts per sample."""
    overview = Table(title="quality", show_header=False)
    overview.add_row("draws", f"{quality.draws} for {samples} samples ({quality.draws - samples} redraws)")
    for reason, count in sorted(quality.rejected.items()):
        overview.add_row(f"rejected: {reason}", str(count))
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


# -------------------------------------------------------------------------------------------- verify


def verify_dataset(out: str | Path, decode_images: bool = True) -> list[str]:
    """Every problem found (empty: the run directory is complete and consistent): every planned shard
    committed and readable, counts equal to markers and manifest, keys unique and contiguous, the same
    fields in every sample, json equal to the manifest row, sizes.json right, no stray files. A damaged
    run record is reported as a problem too (nothing else can be checked without it)."""
    store = Store(out)
    try:
        record = checked_run_record(store)
    except FileNotFoundError:
        raise UserError(f"{out} is not a dreamshard run directory (no dreamshard.json); pass the output of `dreamshard generate`") from None
    except BadRunRecord as exc:
        return [f"{exc}; nothing else can be checked without it: re-run `dreamshard generate` with the run's config to rewrite it"]
    size, image_format = record["samples_per_shard"], record["image_format"]
    counts = shard_counts(record["num_samples"], size)
    committed = committed_shards(store, size, use_snapshot=False)  # every marker read: verify trusts no cache
    problems: list[str] = _verify_snapshot(store, committed)
    fields_seen: list[set[str]] = []  # the first sample's fields: every sample must have the same
    tar_rows: dict[str, dict] = {}
    with StageProgress("verify", len(counts), "shards") as progress:
        for shard, count in enumerate(counts):
            if shard in committed:
                _verify_committed(store, shard, committed[shard], count, size, image_format, decode_images, problems, tar_rows, fields_seen)
            else:
                problems.append(f"shard {shard}: not committed (no valid {shard_marker(shard)})")
            progress.update(shard + 1, f"{len(problems)} problem(s) so far")
    problems += _verify_consolidated(store, counts, tar_rows, complete=len(committed) >= len(counts))
    problems += _stray_files(store, len(counts), committed)
    return problems


def _verify_snapshot(store: Store, committed: dict[int, dict]) -> list[str]:
    """The marker snapshot is a cache that scans trust when a marker file has the cached size: flag entries
    that would be trusted but differ from the marker itself."""
    snapshot = read_marker_snapshot(store)
    stale = [
        shard
        for shard, marker in sorted(committed.items())
        if shard in snapshot and snapshot[shard] != marker and len(json_bytes(snapshot[shard])) == len(json_bytes(marker))
    ]
    if not stale:
        return []
    return [
        f"{MARKER_SNAPSHOT}: the cached markers of {len(stale)} shard(s) (first: {stale[0]}) differ from their commit markers; delete {MARKER_SNAPSHOT} (a cache) and re-run generate"
    ]


def _verify_committed(store, shard, marker, count, size, image_format, decode_images, problems, tar_rows, fields_seen) -> None:
    """One committed shard against its marker, the plan and its index file (appends problems, json rows)."""
    if marker["count"] != count:
        problems.append(f"shard {shard}: marker counts {marker['count']} samples, the plan {count}")
    found = _verify_shard(store, shard, marker, image_format, decode_images, problems)
    keys = [key for key, _ in found]
    expected_keys = [sample_key(index) for index in range(shard * size, shard * size + count)]
    if keys != expected_keys:
        problems.append(f"shard {shard}: keys are not {expected_keys[0]}..{expected_keys[-1]} in order ({len(keys)} samples)")
    for key, fields in found:
        if not fields_seen:
            fields_seen.append(set(fields))
        if set(fields) != fields_seen[0]:
            problems.append(f"sample {key}: fields {sorted(fields)} differ from {sorted(fields_seen[0])}")
        if key in tar_rows:
            problems.append(f"sample {key}: duplicate key")
        tar_rows[key] = fields.get("json", {})
    try:
        parquet_keys = pq.read_table(store.open(shard_parquet(shard)), columns=["key"]).column("key").to_pylist()
    except (OSError, ValueError, pa.ArrowException) as exc:
        problems.append(f"shard {shard}: {shard_parquet(shard)} unreadable ({one_line(exc, limit=120)}); delete its marker and re-run generate")
        return
    if parquet_keys != keys:
        problems.append(f"shard {shard}: {shard_parquet(shard)} lists other keys than the tar")


def _verify_shard(store, shard, marker, image_format, decode_images, problems) -> list[tuple[str, dict]]:
    """Read one shard; returns (key, {field: parsed}) and appends its problems."""
    found = []
    try:
        digest = hashlib.sha256(store.read_bytes(shard_tar(shard))).hexdigest()
        if digest != marker.get("tar_sha256"):
            problems.append(f"shard {shard}: tar sha256 differs from its marker (changed after commit?)")
        for key, raw in read_shard(store, shard):
            fields: dict = dict.fromkeys(raw)
            meta = json.loads(raw["json"]) if "json" in raw else {}
            fields["json"] = meta
            if not isinstance(meta, dict) or tuple(meta) != JSON_FIELDS:
                problems.append(f"sample {key}: json fields {list(meta)} are not the contract's {list(JSON_FIELDS)}")
            elif (meta["key"], meta["shard"]) != (key, shard) or sample_key(meta["index"]) != key:
                problems.append(f"sample {key}: json key/index/shard ({meta['key']}, {meta['index']}, {meta['shard']}) disagree with its place")
            if raw.get("txt", b"").decode() != meta.get("prompt"):
                problems.append(f"sample {key}: txt differs from json prompt")
            if image_format not in raw:
                problems.append(f"sample {key}: no {image_format} image")
            elif decode_images:
                try:
                    Image.open(io.BytesIO(raw[image_format])).load()
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    problems.append(f"sample {key}: image does not decode ({one_line(exc, limit=120)})")
                else:
                    if not (isinstance(meta, dict) and meta.get("nsfw")):  # flagged and kept: a black frame on purpose
                        _check_not_blank(key, raw[image_format], problems)
            found.append((key, fields))
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"shard {shard}: unreadable ({type(exc).__name__}: {one_line(exc, limit=160)})")
    return found


def _check_not_blank(key: str, data: bytes, problems: list[str]) -> None:
    """A flat image (every pixel one value, e.g. the black frames of a diverged or censored generation)."""
    image = Image.open(io.BytesIO(data)).convert("L")
    low, high = image.getextrema()
    if high - low <= 2:
        problems.append(f"sample {key}: the image is blank (every pixel {low}..{high}); check sampling.guidance_scale and the safety checker")


def _verify_consolidated(store: Store, counts: list[int], tar_rows: dict[str, dict], complete: bool) -> list[str]:
    if not complete:
        return []
    problems: list[str] = []
    if not store.exists(MANIFEST):
        return [f"{MANIFEST} missing (re-run `dreamshard generate` with the same config to write it)"]
    try:
        rows = manifest_rows(pq.read_table(store.open(MANIFEST)))
    except (OSError, ValueError, pa.ArrowException) as exc:
        rows = []
        problems.append(f"{MANIFEST} unreadable ({one_line(exc, limit=120)}); delete it and re-run `dreamshard generate` with the same config")
    keys = [row["key"] for row in rows]
    if keys != [sample_key(index) for index in range(sum(counts))]:
        problems.append(f"{MANIFEST}: keys are not unique and contiguous 0..{sum(counts) - 1} ({len(keys)} rows)")
    mismatched = [row["key"] for row in rows if tar_rows.get(row["key"]) != json_fields(row)]
    if mismatched:
        problems.append(f"{MANIFEST}: {len(mismatched)} row(s) differ from the tar json, e.g. {mismatched[0]}")
    expected_sizes = {Path(shard_tar(shard)).name: count for shard, count in enumerate(counts)}
    try:
        sizes = store.read_json(SIZES) if store.exists(SIZES) else None
    except (OSError, ValueError):
        sizes = "unreadable"
    if sizes != expected_sizes:
        problems.append(f"{SIZES} missing, unreadable or not equal to the shard counts")
    return problems


def _stray_files(store: Store, num_shards: int, committed: dict[int, dict]) -> list[str]:
    problems = []
    for name in store.list("shards"):
        stem = name.removesuffix(".tar")
        if name.endswith(".tar") and not (stem.isdigit() and int(stem) < num_shards and int(stem) in committed):
            problems.append(f"shards/{name}: a tar without a commit (readers globbing *.tar would read it)")
    for folder in ("shards", "index"):
        problems += [f"{folder}/{name}: partial file left by an interrupted run" for name in store.list(folder) if name.endswith(PARTIAL)]
    return problems


# ------------------------------------------------------------------------------------------- preview


def preview_grid(out: str | Path, count: int = 64, output: str | Path = "grid.png", tile: int = 160) -> Path:
    """A contact sheet of the first `count` samples, each captioned with its key and prompt."""
    store, record = _open_run(out)
    samples = []
    for shard in sorted(committed_shards(store, record["samples_per_shard"])):
        for key, raw in read_shard(store, shard):
            try:
                image = Image.open(io.BytesIO(raw[record["image_format"]])).convert("RGB")
            except (KeyError, OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(
                    f"{out}: sample {key} has no readable {record['image_format']} image ({one_line(exc, limit=80)}); run `dreamshard verify {out}`"
                ) from None
            samples.append((key, raw.get("txt", b"").decode(errors="replace"), image))
            if len(samples) >= count:
                break
        if len(samples) >= count:
            break
    if not samples:
        raise UserError(f"{out} has no committed samples to preview yet")
    font = ImageFont.load_default(size=11)
    line_height, lines = 13, 4
    columns = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / columns)
    cell_height = tile + lines * line_height + 4
    sheet = Image.new("RGB", (columns * tile, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for number, (key, prompt, image) in enumerate(samples):
        x, y = (number % columns) * tile, (number // columns) * cell_height
        sheet.paste(image.resize((tile, tile)), (x, y))
        caption = textwrap.wrap(f"{key}: {prompt}", width=tile // 6)[:lines]
        for line_number, text in enumerate(caption):
            draw.text((x + 2, y + tile + 2 + line_number * line_height), text, fill="black", font=font)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output)
    return output
