"""Read (and keep up to date) the state of a run directory: which shards are committed, the run record,
the manifest and nested subsets of it, the samples of a shard; plus `consolidate`, which builds
`manifest.parquet` + `shards/sizes.json` from the per-shard files, and `write_dataset` for samples made
elsewhere (toy sets, tests)."""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dreamshard.format.layout import (
    FORMAT_VERSION,
    IMAGE_FORMATS,
    LAYOUT,
    MANIFEST,
    MARKER_SNAPSHOT,
    PARTIAL,
    RUN_RECORD,
    SIZES,
    shard_counts,
    shard_marker,
    shard_parquet,
    shard_tar,
)
from dreamshard.format.record import PARQUET_SCHEMA, table_to_records
from dreamshard.format.shards import ShardSample, write_shard
from dreamshard.format.store import Store, as_store, json_bytes

_MARKER_NAME = re.compile(r"^(\d{6,})\.commit\.json$")


def committed_shards(store: Store, samples_per_shard: int, use_snapshot: bool = True) -> dict[int, dict]:
    """Every shard whose marker is present and consistent with its files: {shard: marker}. A marker with
    a wrong first index, or whose tar or index file is missing or has another size, does not commit its
    shard (a truncated or replaced index Parquet makes its shard uncommitted, so it is regenerated).

    Cost: two listings, one read of the marker snapshot (`index/markers.json`, written by the driver), and
    one batched read (concurrent on object stores) of only the markers the snapshot does not vouch for. A
    snapshot entry stands for a marker when the listing shows that marker file with exactly the snapshot's
    bytes and the entry passes the same checks; anything else is read. `verify` passes use_snapshot=False."""
    tar_sizes, index_files = store.sizes("shards"), store.sizes("index")
    shards = [int(m.group(1)) for m in map(_MARKER_NAME.match, index_files) if m]
    snapshot = read_marker_snapshot(store) if use_snapshot and Path(MARKER_SNAPSHOT).name in index_files else {}
    committed = {}
    for shard in shards:
        marker = snapshot.get(shard)
        if marker is not None and index_files[Path(shard_marker(shard)).name] == len(json_bytes(marker)):
            if _consistent(shard, marker, samples_per_shard, tar_sizes, index_files):
                committed[shard] = marker
    paths = {store.path(shard_marker(shard)): shard for shard in shards if shard not in committed}
    contents = store.fs.cat(list(paths), on_error="return") if paths else {}
    for path, data in contents.items():
        shard = paths.get(path, paths.get(store.fs._strip_protocol(path)))
        marker = _parse_marker(data)
        if shard is not None and marker is not None and _consistent(shard, marker, samples_per_shard, tar_sizes, index_files):
            committed[shard] = marker
    return committed


def _consistent(shard: int, marker: dict, samples_per_shard: int, tar_sizes: dict[str, int], index_files: dict[str, int]) -> bool:
    parquet_name = Path(shard_parquet(shard)).name
    return (
        marker.get("first_index") == shard * samples_per_shard
        and tar_sizes.get(Path(shard_tar(shard)).name) == marker.get("tar_bytes")
        and parquet_name in index_files
        and marker.get("parquet_bytes", index_files[parquet_name]) == index_files[parquet_name]
        and isinstance(marker.get("count"), int)
    )


def write_marker_snapshot(store: Store, committed: dict[int, dict]) -> None:
    """Cache the committed markers in one object, so the next scan reads one file instead of one per shard
    (seconds instead of minutes for 10,000 shards on an object store). Only a cache: a damaged or stale
    snapshot costs marker reads, never a wrong answer."""
    data = {"version": 1, "markers": {str(shard): marker for shard, marker in sorted(committed.items())}}
    store.write_bytes(MARKER_SNAPSHOT, json.dumps(data, separators=(",", ":")).encode())


def read_marker_snapshot(store: Store) -> dict[int, dict]:
    try:
        data = store.read_json(MARKER_SNAPSHOT)
        return {int(shard): marker for shard, marker in data["markers"].items() if isinstance(marker, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # a damaged cache: read the markers themselves


def _parse_marker(data) -> dict | None:
    if isinstance(data, Exception):
        return None
    try:
        marker = json.loads(data)
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def committed_prefix(store: Store, samples_per_shard: int) -> int:
    """Samples in the committed prefix of a run (shards 0..k-1 all committed)."""
    committed = committed_shards(store, samples_per_shard)
    total, shard = 0, 0
    while shard in committed:
        total += committed[shard]["count"]
        shard += 1
    return total


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


def read_index(store: Store, shard: int) -> pa.Table:
    return pq.read_table(store.open(shard_parquet(shard)))


def consolidate(store: Store, counts: list[int]) -> pa.Table:
    """Write `manifest.parquet` (all per-shard rows, in index order) and `shards/sizes.json`. The index
    files are fetched in one batched read (concurrent on object stores)."""
    paths = [store.path(shard_parquet(shard)) for shard in range(len(counts))]
    contents = store.fs.cat(paths, on_error="return") if paths else {}
    tables = []
    for shard, path in enumerate(paths):
        data = contents.get(path, contents.get(store.fs.unstrip_protocol(path)))
        try:
            if data is None or isinstance(data, Exception):
                raise data or FileNotFoundError(path)
            tables.append(pq.read_table(pa.BufferReader(data)))
        except (OSError, ValueError, pa.ArrowException) as exc:
            uncommit(store, shard)  # a re-run regenerates it instead of failing here again
            raise UnreadableIndex(shard, exc) from None
    table = pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table()
    with store.scratch_file(MANIFEST) as local:
        pq.write_table(table, local)
        store.put_file(local, MANIFEST)
    store.write_json(SIZES, {Path(shard_tar(shard)).name: count for shard, count in enumerate(counts)})
    return table


class UnreadableIndex(Exception):
    def __init__(self, shard: int, exc: Exception):
        super().__init__(f"{shard_parquet(shard)} is unreadable ({type(exc).__name__}: {str(exc)[:120]})")
        self.shard = shard


def remove_consolidated(store: Store) -> None:
    """Drop manifest and sizes.json while shards change, so no reader takes an unfinished run as complete."""
    store.remove(MANIFEST)
    store.remove(SIZES)


def write_dataset(
    out: str | Path,
    samples: list[ShardSample],
    samples_per_shard: int,
    image_format: str = "jpg",
    quality: int = 95,
    record: dict | None = None,
) -> Store:
    """A complete run directory from samples made elsewhere (toy target sets, tests): shards of
    `samples_per_shard`, manifest, sizes.json and a minimal dreamshard.json (plus the entries of `record`).
    Sample i of the list must have metadata index i."""
    store = Store(out)
    counts = shard_counts(len(samples), samples_per_shard)
    for shard in range(len(counts)):
        write_shard(store, shard, samples[shard * samples_per_shard : (shard + 1) * samples_per_shard], image_format, quality)
    consolidate(store, counts)
    write_run_record(store, {
        "format_version": FORMAT_VERSION, "num_samples": len(samples), "samples_per_shard": samples_per_shard,
        "num_shards": len(counts), "image_format": image_format, "layout": LAYOUT, "fingerprints": {}, "model": {},
        **(record or {}),
    })  # fmt: skip
    return store


def read_manifest(where: str | Path | Store) -> pa.Table:
    """The run's manifest.parquet, or (for an unfinished run) the committed shards' rows."""
    store = as_store(where)
    if store.exists(MANIFEST):
        return pq.read_table(store.open(MANIFEST))
    record = read_run_record(store) or {}
    committed = committed_shards(store, record.get("samples_per_shard", 1))
    tables = [read_index(store, shard) for shard in sorted(committed)]
    return pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table()


def manifest_rows(table: pa.Table) -> list[dict]:
    return table_to_records(table)


def read_run_record(store: Store) -> dict | None:
    return store.read_json(RUN_RECORD) if store.exists(RUN_RECORD) else None


class BadRunRecord(ValueError):
    pass


def checked_run_record(store: Store) -> dict:
    """The run record with the fields every reader needs, checked: one clear error instead of a KeyError
    deep inside a tool. Raises BadRunRecord (unreadable, wrong shape) or FileNotFoundError (none)."""
    try:
        record = read_run_record(store)
    except (OSError, ValueError) as exc:
        raise BadRunRecord(f"{store.url_of(RUN_RECORD)} is unreadable ({type(exc).__name__}: {exc})") from None
    if record is None:
        raise FileNotFoundError(store.url_of(RUN_RECORD))
    problems = [] if isinstance(record, dict) else ["not a JSON object"]
    if not problems:
        for name in ("samples_per_shard", "num_samples", "num_shards"):
            value = record.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "samples_per_shard" else 0):
                problems.append(f"{name} is {value!r}")
        if record.get("image_format") not in IMAGE_FORMATS:
            problems.append(f"image_format is {record.get('image_format')!r}")
    if problems:
        raise BadRunRecord(f"{store.url_of(RUN_RECORD)} is not a valid run record ({'; '.join(problems)})")
    return record


def committed_rows(store: Store, committed: dict[int, dict]) -> pa.Table:
    """The metadata rows of the committed shards: the manifest when it holds exactly them, else their
    index files (a manifest left from before shards were un-committed would count samples that are gone)."""
    expected = sum(marker["count"] for marker in committed.values())
    if store.exists(MANIFEST):
        try:
            table = pq.read_table(store.open(MANIFEST))
            if table.num_rows == expected:
                return table
        except (OSError, ValueError, pa.ArrowException):
            pass  # rebuilt from the index files below
    tables = [read_index(store, shard) for shard in sorted(committed)]
    return pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table()


def write_run_record(store: Store, record: dict) -> None:
    store.write_json(RUN_RECORD, record)


def read_shard(store: Store, shard: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of each sample of a shard's tar, in tar order (WebDataset key rules: the key
    is the member name up to the first dot of its base name)."""
    with store.open(shard_tar(shard)) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        key, fields = None, {}
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            member_key, _, ext = name.partition(".")
            if key is not None and (member_key != key or ext in fields):  # a repeated field: a duplicate key
                yield key, fields
                fields = {}
            key = member_key
            fields[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, fields


# ------------------------------------------------------------------------------------------ subsets


def subset_keys(store: Store, subset: int, order: str = "manifest") -> tuple[list[int], set[str]]:
    """The first `subset` samples of the manifest (in index order, or class-stratified): (their shards,
    their keys). Prefixes nest: subset n is inside subset m > n."""
    manifest = read_manifest(store).select(["key", "index", "shard", "class_name"]).sort_by("index")
    if manifest.num_rows < subset:
        raise ValueError(f"subset {subset} is larger than the {manifest.num_rows} samples in the manifest")
    if order == "stratified":
        manifest = manifest.take(stratified_order(manifest.column("class_name").to_pylist()))
    first = manifest.slice(0, subset).to_pydict()
    return sorted(set(first["shard"])), set(first["key"])


def stratified_order(class_names: list[str]) -> list[int]:
    """Positions ordered so that every prefix holds the classes as evenly as the data allows: each class's
    k-th sample comes before any class's (k+1)-th, ties by position. One fixed order, so prefixes nest."""
    seen: dict[str, int] = {}
    rank = []
    for name in class_names:
        rank.append(seen.get(name, 0))
        seen[name] = rank[-1] + 1
    return sorted(range(len(class_names)), key=lambda i: (rank[i], i))
