"""`dreamshard repair OUT`: bring a damaged run directory back to a state every command reads, without
losing a committed shard that is sound.

- dreamshard.json unreadable or of the wrong shape: restored from its copy (index/run-record.json, written
  with it); with no sound copy, rebuilt from the commit markers as a minimal record (shard size, counts, image
  format): enough for inspect, verify, preview and train. `generate` needs the fingerprints of a full record
  to add shards: `dreamshard repair OUT --config CONFIG` writes the record that config makes, after checking
  that the shards there were made by it.
- committed shards whose tar no longer has its marker's sha256, or whose files are unreadable: un-committed,
  so the next `generate` makes them again (and manifest.parquet / sizes.json go, the run is not complete).
- a marker snapshot that does not read or whose digest fails: deleted (a cache).
- files a killed run left under temporary names: deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

from dreamshard.errors import UserError
from dreamshard.format.layout import FORMAT_VERSION, IMAGE_FORMATS, LAYOUT, MARKER_SNAPSHOT, RECORD_COPY, RUN_RECORD, shard_counts
from dreamshard.format.reader import (
    BadRunRecord,
    checked_run_record,
    committed_shards,
    read_marker_snapshot,
    read_markers,
    read_shard,
    record_problems,
    shard_size_of,
)
from dreamshard.format.rundir import RunDir
from dreamshard.format.store import Store


def repair_run(out: str | Path, record: dict | None = None, check_shards: bool = True) -> list[str]:
    """Repair the run directory `out` (with `record`: the run record a config makes, checked by the caller);
    returns one line per thing done ([] when nothing needed repair)."""
    store = Store(out)
    rundir = RunDir(store)
    if not store.fs.isdir(store.root):
        raise UserError(f"{out} is not a directory; pass a run directory written by `dreamshard generate`")
    done = _repair_record(rundir, record)
    done += [f"removed {path} (left by an interrupted run)" for path in rundir.clean_partials()]
    done += [f"removed {path} (a file without a commit)" for path in rundir.remove_uncommitted()]
    done += _repair_snapshot(store)
    if check_shards:
        done += _repair_shards(rundir)
    return done


def _repair_record(rundir: RunDir, record: dict | None) -> list[str]:
    store = rundir.store
    if record is not None:
        rundir.write_record(record)
        return [f"wrote {RUN_RECORD} from the config"]
    try:
        checked_run_record(store)
        return []
    except (FileNotFoundError, BadRunRecord) as exc:
        problem = "missing" if isinstance(exc, FileNotFoundError) else str(exc)
    copy = _sound_copy(store)
    if copy is not None:
        rundir.write_record(copy)
        return [f"restored {RUN_RECORD} from {RECORD_COPY} (it was {problem})"]
    rundir.write_record(minimal_record(store))
    return [
        f"rebuilt a minimal {RUN_RECORD} from the commit markers (it was {problem}, and no sound copy was there); inspect, verify, preview "
        f"and train read the run again; to let `generate` resume or extend it: dreamshard repair {store.url} --config CONFIG"
    ]


def _sound_copy(store: Store) -> dict | None:
    try:
        copy = store.read_json(RECORD_COPY) if store.exists(RECORD_COPY) else None
    except (OSError, ValueError):
        return None
    return copy if isinstance(copy, dict) and not record_problems(copy) else None


def minimal_record(store: Store) -> dict:
    """A run record from what the shards say of themselves: their markers (first index, count) and a tar's
    image member."""
    markers = read_markers(store)
    if not markers:
        raise UserError(f"{store.url}: no commit marker to rebuild {RUN_RECORD} from; it holds no committed shard: start it again with `dreamshard generate`")
    try:
        size = shard_size_of(markers)
    except ValueError as exc:
        raise UserError(f"{store.url}: {exc}; repair with --config CONFIG") from None
    samples = max(int(marker.get("last_index", -1)) for marker in markers.values()) + 1
    return {
        "format_version": FORMAT_VERSION, "num_samples": samples, "samples_per_shard": size, "num_shards": len(shard_counts(samples, size)),
        "image_format": image_format(store, min(markers)), "layout": LAYOUT, "fingerprints": {}, "model": {}, "rebuilt_by": "dreamshard repair",
    }  # fmt: skip


def image_format(store: Store, shard: int) -> str:
    for _, fields in read_shard(store, shard):
        found = [name for name in fields if name in IMAGE_FORMATS]
        if found:
            return found[0]
    raise UserError(f"shard {shard} of {store.url} holds no image; repair with --config CONFIG")


def _repair_snapshot(store: Store) -> list[str]:
    if not store.exists(MARKER_SNAPSHOT) or store.fs.isdir(store.path(MARKER_SNAPSHOT)):
        return [] if not store.exists(MARKER_SNAPSHOT) else [f"{MARKER_SNAPSHOT} is a directory: remove it by hand (repair deletes files only)"]
    try:
        raw = json.loads(store.read_bytes(MARKER_SNAPSHOT))
    except (OSError, ValueError):
        raw = None
    if isinstance(raw, dict) and raw.get("markers") and not read_marker_snapshot(store) and raw.get("version") == 2:
        raw = None  # its digest does not hold: edited or damaged
    if raw is None:
        store.remove(MARKER_SNAPSHOT)
        return [f"deleted {MARKER_SNAPSHOT} (a damaged cache; the next generate rewrites it)"]
    return []


def _repair_shards(rundir: RunDir) -> list[str]:
    record = checked_run_record(rundir.store)
    damaged = rundir.damaged(committed_shards(rundir.store, record["samples_per_shard"], use_snapshot=False))
    for shard in damaged:
        rundir.uncommit(shard)
    if damaged:
        rundir.remove_consolidated()
    return [f"un-committed shard {shard}: {problem}; `dreamshard generate` with the run's config makes it again" for shard, problem in damaged.items()]
