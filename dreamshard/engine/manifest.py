"""The state of a run directory: which shards are committed, the run record (`dreamshard.json`), and the
consolidated `manifest.parquet` + `shards/sizes.json` built from the per-shard files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dreamshard.engine.writer import (
    FORMAT_VERSION,
    JSON_TEXT_COLUMNS,
    ShardSample,
    MANIFEST,
    PARQUET_SCHEMA,
    PARTIAL,
    RUN_RECORD,
    SIZES,
    Store,
    shard_marker,
    shard_parquet,
    shard_tar,
    write_shard,
)

_MARKER_NAME = re.compile(r"^(\d{6,})\.commit\.json$")


def shard_counts(num_samples: int, samples_per_shard: int) -> list[int]:
    """Samples per shard: shard k holds samples [k*S, min((k+1)*S, N))."""
    full, rest = divmod(num_samples, samples_per_shard)
    return [samples_per_shard] * full + ([rest] if rest else [])


def committed_shards(store: Store, samples_per_shard: int) -> dict[int, dict]:
    """Every shard whose marker is present and consistent with its files: {shard: marker}. A marker with
    a wrong first index, or whose tar is missing or has another size, does not commit its shard."""
    tar_sizes = _sizes(store, "shards")
    index_files = _sizes(store, "index")
    committed = {}
    for name in index_files:
        match = _MARKER_NAME.match(name)
        if not match:
            continue
        shard = int(match.group(1))
        try:
            marker = store.read_json(shard_marker(shard))
        except (OSError, ValueError):
            continue
        tar_name, parquet_name = Path(shard_tar(shard)).name, Path(shard_parquet(shard)).name
        if (
            marker.get("first_index") == shard * samples_per_shard
            and tar_sizes.get(tar_name) == marker.get("tar_bytes")
            and parquet_name in index_files
        ):
            committed[shard] = marker
    return committed


def clean_partials(store: Store) -> list[str]:
    """Remove the `*.partial` files a killed run left behind; returns their paths."""
    removed = []
    for folder in ("shards", "index", ""):
        for name in store.list(folder):
            if name.endswith(PARTIAL):
                rel = f"{folder}/{name}" if folder else name
                store.remove(rel)
                removed.append(rel)
    return removed


def uncommit(store: Store, shard: int) -> None:
    """Forget a shard (its marker goes first, so a crash half-way leaves it uncommitted, never mixed)."""
    for rel in (shard_marker(shard), shard_parquet(shard), shard_tar(shard)):
        store.remove(rel)


def consolidate(store: Store, counts: list[int]) -> pa.Table:
    """Write `manifest.parquet` (all per-shard rows, in index order) and `shards/sizes.json`."""
    tables = [pq.read_table(store.open(shard_parquet(shard))) for shard in range(len(counts))]
    table = pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table()
    with store.scratch_file(MANIFEST) as local:
        pq.write_table(table, local)
        store.put_file(local, MANIFEST)
    store.write_json(SIZES, {Path(shard_tar(shard)).name: count for shard, count in enumerate(counts)})
    return table


def remove_consolidated(store: Store) -> None:
    """Drop manifest and sizes.json while shards change, so no reader takes an unfinished run as complete."""
    store.remove(MANIFEST)
    store.remove(SIZES)


def write_dataset(
    out: str | Path, samples: list[ShardSample], samples_per_shard: int, image_format: str = "jpg", quality: int = 95,
    record: dict | None = None,
) -> Store:
    """A complete run directory in the engine format from samples made elsewhere (toy target sets,
    tests): shards of `samples_per_shard`, manifest, sizes.json and a minimal dreamshard.json (plus the
    entries of `record`). Sample i of the list must have metadata index i."""
    store = Store(out)
    counts = shard_counts(len(samples), samples_per_shard)
    for shard in range(len(counts)):
        write_shard(out, shard, samples[shard * samples_per_shard : (shard + 1) * samples_per_shard], image_format, quality)
    consolidate(store, counts)
    write_run_record(store, {
        "format_version": FORMAT_VERSION, "num_samples": len(samples), "samples_per_shard": samples_per_shard,
        "num_shards": len(counts), "image_format": image_format, "fingerprints": {}, "model": {}, **(record or {}),
    })  # fmt: skip
    return store


def read_manifest(out: str | Path) -> pa.Table:
    """The run's manifest.parquet, or (for an unfinished run) the committed shards' rows."""
    store = Store(out)
    if store.exists(MANIFEST):
        return pq.read_table(store.open(MANIFEST))
    record = read_run_record(store) or {}
    committed = committed_shards(store, record.get("samples_per_shard", 1))
    tables = [pq.read_table(store.open(shard_parquet(shard))) for shard in sorted(committed)]
    return pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table()


def manifest_rows(table: pa.Table) -> list[dict]:
    """Manifest rows as dicts with the JSON text columns (style, model, extra) decoded."""
    rows = table.to_pylist()
    for row in rows:
        for name in JSON_TEXT_COLUMNS:
            row[name] = json.loads(row[name])
    return rows


def read_run_record(store: Store) -> dict | None:
    return store.read_json(RUN_RECORD) if store.exists(RUN_RECORD) else None


def write_run_record(store: Store, record: dict) -> None:
    store.write_json(RUN_RECORD, record)


def _sizes(store: Store, folder: str) -> dict[str, int]:
    try:
        entries = store.fs.ls(store.path(folder), detail=True)
    except FileNotFoundError:
        return {}
    return {Path(entry["name"]).name: entry.get("size") for entry in entries if entry.get("type") == "file"}
