"""Read the state of a run directory, never change it: which shards are committed, the run record, the
manifest and nested subsets of it, and the samples of a shard through the one tar reader every caller uses
(`tar_samples`: webdataset's own tar expander and key grouping). Everything that writes a run directory lives
in `rundir.py`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.tariterators import group_by_keys, tar_file_expander

from dreamshard.format.layout import IMAGE_FORMATS, MANIFEST, MARKER_SNAPSHOT, RUN_RECORD, shard_marker, shard_parquet, shard_tar
from dreamshard.format.record import PARQUET_SCHEMA, table_to_records
from dreamshard.format.store import Store, as_store, json_bytes
from dreamshard.identity import digest

_MARKER_NAME = re.compile(r"^(\d{6,})\.commit\.json$")
SNAPSHOT_VERSION = 2  # 2: each entry carries its marker file's listing stamp, the whole a digest of its content


# --------------------------------------------------------------------------------------- committed shards


def committed_shards(store: Store, samples_per_shard: int, use_snapshot: bool = True) -> dict[int, dict]:
    """Every shard whose marker is present and consistent with its files: {shard: marker}. A marker with
    a wrong first index, or whose tar or index file is missing or has another size, does not commit its
    shard (a truncated or replaced index Parquet makes its shard uncommitted, so it is regenerated).

    Cost: two listings, one read of the marker snapshot (`index/markers.json`), and one batched read
    (concurrent on object stores) of only the markers the snapshot does not vouch for. The snapshot is
    checked, not trusted: it is ignored whole unless its content digest holds (an edited snapshot), and an
    entry vouches for a marker only when the listing shows that marker file with the entry's size and stamp
    (rewritten since: read again). `verify` passes use_snapshot=False."""
    tar_sizes, index_listing = store.sizes("shards"), store.listing("index")
    index_sizes = {name: size for name, (size, _) in index_listing.items()}
    shards = [int(m.group(1)) for m in map(_MARKER_NAME.match, index_listing) if m]
    snapshot = read_marker_snapshot(store) if use_snapshot and Path(MARKER_SNAPSHOT).name in index_listing else {}
    committed = {}
    for shard in shards:
        entry = snapshot.get(shard)
        if entry is not None and index_listing[Path(shard_marker(shard)).name] == (len(json_bytes(entry["marker"])), entry["stamp"]):
            if _consistent(shard, entry["marker"], samples_per_shard, tar_sizes, index_sizes):
                committed[shard] = entry["marker"]
    paths = {store.path(shard_marker(shard)): shard for shard in shards if shard not in committed}
    contents = store.fs.cat(list(paths), on_error="return") if paths else {}
    for path, data in contents.items():
        found = paths.get(path, paths.get(store.fs._strip_protocol(path)))
        marker = _parse_marker(data)
        if found is not None and marker is not None and _consistent(found, marker, samples_per_shard, tar_sizes, index_sizes):
            committed[found] = marker
    return committed


def _consistent(shard: int, marker: dict, samples_per_shard: int, tar_sizes: dict[str, int], index_files: dict[str, int]) -> bool:
    parquet_name = Path(shard_parquet(shard)).name
    count = marker.get("count")
    return (
        marker.get("first_index") == shard * samples_per_shard
        and tar_sizes.get(Path(shard_tar(shard)).name) == marker.get("tar_bytes")
        and parquet_name in index_files
        and marker.get("parquet_bytes", index_files[parquet_name]) == index_files[parquet_name]
        and isinstance(count, int)
        and not isinstance(count, bool)
        and 0 < count <= samples_per_shard
    )


def snapshot_digest(entries: dict[str, Any]) -> str:
    """The content digest a marker snapshot carries (over its entries as canonical JSON)."""
    return digest(entries)


def read_marker_snapshot(store: Store) -> dict[int, dict]:
    """{shard: {"marker": ..., "stamp": ...}} of a snapshot whose digest holds; {} for a missing, damaged,
    edited or older one (the markers themselves are read instead)."""
    try:
        data = store.read_json(MARKER_SNAPSHOT)
        entries = data["markers"]
        if data.get("version") != SNAPSHOT_VERSION or data.get("digest") != snapshot_digest(entries):
            return {}
        return {int(shard): entry for shard, entry in entries.items() if isinstance(entry.get("marker"), dict) and isinstance(entry.get("stamp"), str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _parse_marker(data) -> dict | None:
    if isinstance(data, Exception):
        return None
    try:
        marker = json.loads(data)
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def read_markers(store: Store) -> dict[int, dict]:
    """Every commit marker file that parses as an object, unchecked: {shard: marker} (repair's raw material)."""
    paths = {store.path(f"index/{name}"): int(match.group(1)) for name in store.list("index") if (match := _MARKER_NAME.match(name))}
    contents = store.fs.cat(list(paths), on_error="return") if paths else {}
    markers = {}
    for path, data in contents.items():
        marker, shard = _parse_marker(data), paths.get(path, paths.get(store.fs._strip_protocol(path)))
        if marker is not None and shard is not None:
            markers[shard] = marker
    return markers


def shard_size_of(markers: dict[int, dict]) -> int:
    """samples_per_shard as the markers tell it (shard k starts at sample k x size); ValueError when they
    disagree or say nothing."""
    sizes = {marker.get("first_index", -1) // shard for shard, marker in markers.items() if shard > 0 and isinstance(marker.get("first_index"), int)}
    sizes.discard(0)
    if len(sizes) == 1:
        return sizes.pop()
    if not sizes and isinstance(markers.get(0, {}).get("count"), int):
        return markers[0]["count"]
    raise ValueError(f"the commit markers do not agree on a shard size ({sorted(sizes) or 'none'})")


def committed_prefix(store: Store, samples_per_shard: int) -> int:
    """Samples in the committed prefix of a run (shards 0..k-1 all committed)."""
    committed = committed_shards(store, samples_per_shard)
    total, shard = 0, 0
    while shard in committed:
        total += committed[shard]["count"]
        shard += 1
    return total


# ----------------------------------------------------------------------------------------- run record


class BadRunRecord(ValueError):
    pass


def read_run_record(store: Store) -> dict | None:
    """The run record as stored, or None when there is none; BadRunRecord when it is not a JSON object."""
    if not store.exists(RUN_RECORD):
        return None
    try:
        record = store.read_json(RUN_RECORD)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadRunRecord(f"{store.url_of(RUN_RECORD)} is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(record, dict):
        raise BadRunRecord(f"{store.url_of(RUN_RECORD)} is not a valid run record (a JSON {type(record).__name__}, not an object)")
    return record


def checked_run_record(store: Store) -> dict:
    """The run record with the fields every reader needs, checked: one clear error instead of a KeyError
    deep inside a tool. Raises BadRunRecord (unreadable, wrong shape) or FileNotFoundError (none)."""
    record = read_run_record(store)
    if record is None:
        raise FileNotFoundError(store.url_of(RUN_RECORD))
    problems = record_problems(record)
    if problems:
        raise BadRunRecord(f"{store.url_of(RUN_RECORD)} is not a valid run record ({'; '.join(problems)})")
    return record


def record_problems(record: dict) -> list[str]:
    """What is wrong with a run record's fields every reader needs ([] when nothing)."""
    problems = []
    for name in ("samples_per_shard", "num_samples", "num_shards"):
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "samples_per_shard" else 0):
            problems.append(f"{name} is {value!r}")
    if record.get("image_format") not in IMAGE_FORMATS:
        problems.append(f"image_format is {record.get('image_format')!r}")
    for name in ("fingerprints", "fingerprint_parts", "model", "config"):
        if name in record and not isinstance(record[name], dict):
            problems.append(f"{name} is not an object")
    return problems


# ------------------------------------------------------------------------------------ manifest and index


def read_index(store: Store, shard: int) -> pa.Table:
    return pq.read_table(store.open(shard_parquet(shard)))


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


# ------------------------------------------------------------------------------------------- samples


def reraise(exc: Exception) -> bool:
    raise exc


def tar_samples(streams: Iterable[tuple[str, IO[bytes]]], handler: Callable[[Exception], bool] = reraise) -> Iterator[dict[str, Any]]:
    """The one tar reader: samples (`__key__`, `__url__`, one bytes value per member extension) of each
    (url, open binary stream), in tar order, by WebDataset's key rules (the key is the member name up to the
    first dot of its base name; a repeated member of one key is an error). `handler(exc)` returns True to
    skip what failed and go on (webdataset's handler convention); the default raises."""
    opened = ({"url": url, "stream": stream} for url, stream in streams)
    yield from group_by_keys(tar_file_expander(opened, handler=handler), handler=handler)


def read_shard(store: Store, shard: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of each sample of a committed shard's tar, in tar order (see `tar_samples`)."""
    with store.open(shard_tar(shard)) as stream:
        for sample in tar_samples([(store.url_of(shard_tar(shard)), stream)]):
            yield sample["__key__"], {name: value for name, value in sample.items() if not name.startswith("__")}


# ------------------------------------------------------------------------------------------ subsets


def subset_keys(store: Store, subset: int, order: str = "manifest") -> tuple[list[int], set[str]]:
    """The first `subset` samples of the manifest (in index order, or class-stratified): (their shards,
    their keys). Prefixes nest: subset n is inside subset m > n."""
    by_shard = subset_by_shard(store, subset, order)
    return sorted(by_shard), {key for keys in by_shard.values() for key in keys}


def subset_by_shard(store: Store, subset: int, order: str = "manifest") -> dict[int, list[str]]:
    """The same selection as `subset_keys`, as {shard: its selected keys in tar (index) order}."""
    manifest = read_manifest(store).select(["key", "index", "shard", "class_name"]).sort_by("index")
    if manifest.num_rows < subset:
        raise ValueError(f"subset {subset} is larger than the {manifest.num_rows} samples in the manifest")
    if order == "stratified":
        manifest = manifest.take(stratified_order(manifest.column("class_name").to_pylist()))
    first = manifest.slice(0, subset).to_pydict()
    by_shard: dict[int, list[tuple[int, str]]] = {}
    for key, index, shard in zip(first["key"], first["index"], first["shard"]):
        by_shard.setdefault(shard, []).append((index, key))
    return {shard: [key for _, key in sorted(rows)] for shard, rows in sorted(by_shard.items())}


def stratified_order(class_names: list[str]) -> list[int]:
    """Positions ordered so that every prefix holds the classes as evenly as the data allows: each class's
    k-th sample comes before any class's (k+1)-th, ties by position. One fixed order, so prefixes nest."""
    seen: dict[str, int] = {}
    rank = []
    for name in class_names:
        rank.append(seen.get(name, 0))
        seen[name] = rank[-1] + 1
    return sorted(range(len(class_names)), key=lambda i: (rank[i], i))
