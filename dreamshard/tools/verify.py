"""`dreamshard verify`: a run directory against the data contract (docs/format.md); every problem named
with its fix."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dreamshard.errors import UserError, one_line
from dreamshard.format.layout import MANIFEST, MARKER_SNAPSHOT, PARTIAL, SIZES, sample_key, shard_counts, shard_marker, shard_parquet, shard_tar
from dreamshard.format.reader import SNAPSHOT_VERSION, BadRunRecord, checked_run_record, committed_shards, manifest_rows, read_marker_snapshot, read_shard
from dreamshard.format.record import JSON_FIELDS, json_fields
from dreamshard.format.store import Store, json_bytes
from dreamshard.logs import StageProgress

# How to mend each problem (every line of verify names its fix).
REPAIR = "`dreamshard repair OUT` un-commits it, then `dreamshard generate` with the run's config makes it again"
CONSOLIDATE = "`dreamshard generate` with the run's config rewrites it (every shard is committed: it makes no image)"
REPAIR_LEFTOVERS = "`dreamshard repair OUT` deletes it"


def remake(shard: int) -> str:
    """The fix for a shard committed with wrong content (its files match its marker, so repair keeps it)."""
    return f"delete {shard_marker(shard)} and run `dreamshard generate` with the run's config: it makes the shard again"


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
        return [f"{exc}; nothing else can be checked without it: `dreamshard repair {out}` restores or rebuilds it"]
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
                problems.append(f"shard {shard}: not committed (no valid {shard_marker(shard)}); `dreamshard generate` with the run's config makes it")
            progress.update(shard + 1, f"{len(problems)} problem(s) so far")
    problems += _verify_consolidated(store, counts, tar_rows, complete=len(committed) >= len(counts))
    problems += _stray_files(store, len(counts), committed)
    return [problem.replace("repair OUT", f"repair {out}") for problem in problems]


def _verify_snapshot(store: Store, committed: dict[int, dict]) -> list[str]:
    """The marker snapshot is a cache that scans use when its digest holds and an entry's size and stamp match
    the marker file's listing: flag a snapshot that is damaged or edited (scans ignore it), and entries that
    would be used but differ from the marker itself."""
    fix = f"it is only a cache: delete {MARKER_SNAPSHOT} or let the next `dreamshard generate` rewrite it"
    try:
        raw = store.read_json(MARKER_SNAPSHOT) if store.exists(MARKER_SNAPSHOT) else None
    except (OSError, ValueError) as exc:
        return [f"{MARKER_SNAPSHOT}: unreadable ({type(exc).__name__}), so scans ignore it; {fix}"]
    if raw is None or (isinstance(raw, dict) and raw.get("version") != SNAPSHOT_VERSION):
        return []  # none, or one of an older version: ignored by scans, not a problem
    snapshot = read_marker_snapshot(store)
    if not snapshot and raw.get("markers"):
        return [f"{MARKER_SNAPSHOT}: its content does not match its digest (edited or damaged), so scans ignore it; {fix}"]
    listing = store.listing("index")
    stale = [
        shard
        for shard, marker in sorted(committed.items())
        if shard in snapshot
        and snapshot[shard]["marker"] != marker
        and listing.get(Path(shard_marker(shard)).name) == (len(json_bytes(snapshot[shard]["marker"])), snapshot[shard]["stamp"])
    ]
    if not stale:
        return []
    return [f"{MARKER_SNAPSHOT}: the cached markers of {len(stale)} shard(s) (first: {stale[0]}) differ from their commit markers; {fix}"]


def _verify_committed(store, shard, marker, count, size, image_format, decode_images, problems, tar_rows, fields_seen) -> None:
    """One committed shard against its marker, the plan and its index file (appends problems, json rows)."""
    if marker["count"] != count:
        problems.append(f"shard {shard}: marker counts {marker['count']} samples, the plan {count}; {remake(shard)}")
    found = _verify_shard(store, shard, marker, image_format, decode_images, problems)
    keys = [key for key, _ in found]
    expected_keys = [sample_key(index) for index in range(shard * size, shard * size + count)]
    if keys != expected_keys:
        problems.append(f"shard {shard}: keys are not {expected_keys[0]}..{expected_keys[-1]} in order ({len(keys)} samples); {remake(shard)}")
    for key, fields in found:
        if not fields_seen:
            fields_seen.append(set(fields))
        if set(fields) != fields_seen[0]:
            problems.append(f"sample {key}: fields {sorted(fields)} differ from {sorted(fields_seen[0])}; {remake(shard)}")
        if key in tar_rows:
            problems.append(f"sample {key}: duplicate key; {remake(shard)}")
        tar_rows[key] = fields.get("json", {})
    try:
        parquet_keys = pq.read_table(store.open(shard_parquet(shard)), columns=["key"]).column("key").to_pylist()
    except (OSError, ValueError, pa.ArrowException) as exc:
        problems.append(f"shard {shard}: {shard_parquet(shard)} unreadable ({one_line(exc, limit=120)}); {REPAIR}")
        return
    if parquet_keys != keys:
        problems.append(f"shard {shard}: {shard_parquet(shard)} lists other keys than the tar; {remake(shard)}")


def _verify_shard(store, shard, marker, image_format, decode_images, problems) -> list[tuple[str, dict]]:
    """Read one shard; returns (key, {field: parsed}) and appends its problems."""
    found = []
    try:
        digest = hashlib.sha256(store.read_bytes(shard_tar(shard))).hexdigest()
        if digest != marker.get("tar_sha256"):
            problems.append(f"shard {shard}: tar sha256 differs from its marker (changed after commit); {REPAIR}")
        for key, raw in read_shard(store, shard):
            fields: dict = dict.fromkeys(raw)
            meta = json.loads(raw["json"]) if "json" in raw else {}
            fields["json"] = meta
            if not isinstance(meta, dict) or tuple(meta) != JSON_FIELDS:
                problems.append(f"sample {key}: json fields {list(meta)} are not the contract's {list(JSON_FIELDS)}; {remake(shard)}")
            elif (meta["key"], meta["shard"]) != (key, shard) or sample_key(meta["index"]) != key:
                problems.append(
                    f"sample {key}: json key/index/shard ({meta['key']}, {meta['index']}, {meta['shard']}) disagree with its place; {remake(shard)}"
                )
            if raw.get("txt", b"").decode() != meta.get("prompt"):
                problems.append(f"sample {key}: txt differs from json prompt; {remake(shard)}")
            if image_format not in raw:
                problems.append(f"sample {key}: no {image_format} image; {remake(shard)}")
            elif decode_images:
                try:
                    Image.open(io.BytesIO(raw[image_format])).load()
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    problems.append(f"sample {key}: image does not decode ({one_line(exc, limit=120)}); {remake(shard)}")
                else:
                    if not (isinstance(meta, dict) and meta.get("nsfw")):  # flagged and kept: a black frame on purpose
                        _check_not_blank(key, raw[image_format], problems)
            found.append((key, fields))
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"shard {shard}: unreadable ({type(exc).__name__}: {one_line(exc, limit=160)}); {REPAIR}")
    return found


def _check_not_blank(key: str, data: bytes, problems: list[str]) -> None:
    """A flat image (every pixel one value, e.g. the black frames of a diverged or censored generation)."""
    image = Image.open(io.BytesIO(data)).convert("L")
    low, high = image.getextrema()  # one band: (min, max)
    assert isinstance(low, (int, float)) and isinstance(high, (int, float))
    if high - low <= 2:
        problems.append(f"sample {key}: the image is blank (every pixel {low}..{high}); check sampling.guidance_scale and the safety checker")


def _verify_consolidated(store: Store, counts: list[int], tar_rows: dict[str, dict], complete: bool) -> list[str]:
    if not complete:
        return []
    problems: list[str] = []
    if not store.exists(MANIFEST):
        return [f"{MANIFEST} missing; {CONSOLIDATE}"]
    try:
        rows = manifest_rows(pq.read_table(store.open(MANIFEST)))
    except (OSError, ValueError, pa.ArrowException) as exc:
        rows = []
        problems.append(f"{MANIFEST} unreadable ({one_line(exc, limit=120)}); {CONSOLIDATE}")
    keys = [row["key"] for row in rows]
    if keys != [sample_key(index) for index in range(sum(counts))]:
        problems.append(f"{MANIFEST}: keys are not unique and contiguous 0..{sum(counts) - 1} ({len(keys)} rows); {CONSOLIDATE}")
    mismatched = [row["key"] for row in rows if tar_rows.get(row["key"]) != json_fields(row)]
    if mismatched:
        problems.append(f"{MANIFEST}: {len(mismatched)} row(s) differ from the tar json, e.g. {mismatched[0]}; {CONSOLIDATE}")
    expected_sizes = {Path(shard_tar(shard)).name: count for shard, count in enumerate(counts)}
    try:
        sizes = store.read_json(SIZES) if store.exists(SIZES) else None
    except (OSError, ValueError):
        sizes = "unreadable"
    if sizes != expected_sizes:
        problems.append(f"{SIZES} missing, unreadable or not equal to the shard counts; {CONSOLIDATE}")
    return problems


def _stray_files(store: Store, num_shards: int, committed: dict[int, dict]) -> list[str]:
    problems = []
    for name in store.list("shards"):
        stem = name.removesuffix(".tar")
        if name.endswith(".tar") and not (stem.isdigit() and int(stem) < num_shards and int(stem) in committed):
            problems.append(f"shards/{name}: a tar without a commit (readers globbing *.tar would read it); {REPAIR_LEFTOVERS}")
    for folder in ("shards", "index"):
        problems += [f"{folder}/{name}: partial file left by an interrupted run; {REPAIR_LEFTOVERS}" for name in store.list(folder) if name.endswith(PARTIAL)]
    return problems
