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

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from rich.table import Table

from dreamshard.errors import UserError
from dreamshard.format.layout import MANIFEST, PARTIAL, SIZES, sample_key, shard_counts, shard_marker, shard_parquet, shard_tar
from dreamshard.format.reader import committed_shards, manifest_rows, read_manifest, read_run_record, read_shard
from dreamshard.format.record import JSON_FIELDS, json_fields
from dreamshard.format.store import Store


def _open_run(out: str | Path) -> tuple[Store, dict]:
    store = Store(out)
    try:
        record = read_run_record(store)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {out}/dreamshard.json: {exc}") from None
    if record is None:
        raise UserError(f"{out} is not a dreamshard run directory (no dreamshard.json); pass the output of `dreamshard generate`")
    return store, record


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


def inspect_dataset(out: str | Path) -> DatasetInfo:
    store, record = _open_run(out)
    committed = committed_shards(store, record["samples_per_shard"])
    rows = manifest_rows(read_manifest(out))
    counts: dict[str, Counter] = {"class": Counter(), "template": Counter()}
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
    )


def inspect_tables(info: DatasetInfo) -> list[Table]:
    """Rich tables: the overview, then one table of counts per class / template / style axis."""
    overview = Table(title=f"dataset {info.out}", show_header=False)
    overview.add_row("samples", f"{info.samples} of {info.planned_samples} planned")
    overview.add_row("shards", f"{info.shards} of {info.planned_shards} committed")
    overview.add_row("bytes", f"{info.bytes:,} ({info.bytes / 2**20:.1f} MiB)")
    overview.add_row("image format", info.image_format)
    overview.add_row("model", f"{info.model.get('id', '?')} (hash {info.model.get('hash', '?')})")
    tables = [overview]
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


# -------------------------------------------------------------------------------------------- verify


def verify_dataset(out: str | Path, decode_images: bool = True) -> list[str]:
    """Every problem found (empty: the run directory is complete and consistent): every planned shard
    committed and readable, counts equal to markers and manifest, keys unique and contiguous, the same
    fields in every sample, json equal to the manifest row, sizes.json right, no stray files."""
    store, record = _open_run(out)
    size, image_format = record["samples_per_shard"], record["image_format"]
    counts = shard_counts(record["num_samples"], size)
    committed = committed_shards(store, size)
    problems: list[str] = []
    expected_fields: set[str] | None = None
    tar_rows: dict[str, dict] = {}
    for shard, count in enumerate(counts):
        if shard not in committed:
            problems.append(f"shard {shard}: not committed (no valid {shard_marker(shard)})")
            continue
        marker = committed[shard]
        if marker["count"] != count:
            problems.append(f"shard {shard}: marker counts {marker['count']} samples, the plan {count}")
        found = _verify_shard(store, shard, marker, image_format, decode_images, problems)
        keys = [key for key, _ in found]
        expected_keys = [sample_key(index) for index in range(shard * size, shard * size + count)]
        if keys != expected_keys:
            problems.append(f"shard {shard}: keys are not {expected_keys[0]}..{expected_keys[-1]} in order ({len(keys)} samples)")
        for key, fields in found:
            expected_fields = expected_fields or set(fields)
            if set(fields) != expected_fields:
                problems.append(f"sample {key}: fields {sorted(fields)} differ from {sorted(expected_fields)}")
            if key in tar_rows:
                problems.append(f"sample {key}: duplicate key")
            tar_rows[key] = fields.get("json", {})
        parquet_keys = pq.read_table(store.open(shard_parquet(shard)), columns=["key"]).column("key").to_pylist()
        if parquet_keys != keys:
            problems.append(f"shard {shard}: {shard_parquet(shard)} lists other keys than the tar")
    problems += _verify_consolidated(store, counts, tar_rows, complete=len(committed) >= len(counts))
    problems += _stray_files(store, len(counts), committed)
    return problems


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
            if tuple(meta) != JSON_FIELDS:
                problems.append(f"sample {key}: json fields {list(meta)} are not the contract's {list(JSON_FIELDS)}")
            elif (meta["key"], meta["shard"]) != (key, shard) or sample_key(meta["index"]) != key:
                problems.append(f"sample {key}: json key/index/shard ({meta['key']}, {meta['index']}, {meta['shard']}) disagree with its place")
            if raw.get("txt", b"").decode() != meta.get("prompt"):
                problems.append(f"sample {key}: txt differs from json prompt")
            if image_format not in raw:
                problems.append(f"sample {key}: no {image_format} image")
            elif decode_images:
                Image.open(io.BytesIO(raw[image_format])).load()
            found.append((key, fields))
    except (OSError, tarfile.TarError, ValueError, KeyError) as exc:
        problems.append(f"shard {shard}: unreadable ({type(exc).__name__}: {exc})")
    return found


def _verify_consolidated(store: Store, counts: list[int], tar_rows: dict[str, dict], complete: bool) -> list[str]:
    if not complete:
        return []
    problems = []
    if not store.exists(MANIFEST):
        return [f"{MANIFEST} missing (re-run `dreamshard generate` with the same config to write it)"]
    rows = manifest_rows(pq.read_table(store.open(MANIFEST)))
    keys = [row["key"] for row in rows]
    if keys != [sample_key(index) for index in range(sum(counts))]:
        problems.append(f"{MANIFEST}: keys are not unique and contiguous 0..{sum(counts) - 1} ({len(keys)} rows)")
    mismatched = [row["key"] for row in rows if tar_rows.get(row["key"]) != json_fields(row)]
    if mismatched:
        problems.append(f"{MANIFEST}: {len(mismatched)} row(s) differ from the tar json, e.g. {mismatched[0]}")
    expected_sizes = {Path(shard_tar(shard)).name: count for shard, count in enumerate(counts)}
    if not store.exists(SIZES) or store.read_json(SIZES) != expected_sizes:
        problems.append(f"{SIZES} missing or not equal to the shard counts")
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
            image = Image.open(io.BytesIO(raw[record["image_format"]])).convert("RGB")
            samples.append((key, raw.get("txt", b"").decode(), image))
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
