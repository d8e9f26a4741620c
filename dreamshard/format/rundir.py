"""The life cycle of a run directory, in one place: what it holds now (`classify`: fresh / resume / extend /
complete / refuse, with the reason), getting it ready for new shards (`prepare`), and every file the driver
writes around the shards (run record, marker snapshot, stats, manifest). Workers write the shards
themselves (`shards.py`); everything else that changes a run directory is here, and `generate` and `plan`
both decide through `classify`, so they cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dreamshard.errors import UserError
from dreamshard.format.card import CARD, dataset_card
from dreamshard.format.layout import (
    FORMAT_VERSION,
    LABEL_FIELD,
    LAYOUT,
    LEASE,
    MANIFEST,
    MARKER_SNAPSHOT,
    PARTIAL,
    RECORD_COPY,
    RUN_RECORD,
    SIZES,
    STATS,
    shard_counts,
    shard_marker,
    shard_parquet,
    shard_tar,
)
from dreamshard.format.reader import SNAPSHOT_VERSION, BadRunRecord, checked_run_record, committed_shards, read_run_record, record_problems, snapshot_digest
from dreamshard.format.record import PARQUET_SCHEMA, table_to_records
from dreamshard.format.shards import ShardSample, write_shard
from dreamshard.format.store import Store
from dreamshard.identity import Identity

log = logging.getLogger(__name__)

ACTIONS = ("fresh", "resume", "extend", "complete", "refuse")
ELSEWHERE = "write to another --out, or pass --force-new to write to a new sibling directory"


@dataclass(frozen=True)
class RunState:
    """What an output holds, against the run a command wants to make there."""

    action: str  # one of ACTIONS
    reason: str  # one line: why (for refuse: what is wrong, without the fix)
    committed: dict[int, dict] = field(default_factory=dict)  # every committed shard's marker
    done: dict[int, dict] = field(default_factory=dict)  # the committed shards the run keeps as they are
    record: dict | None = None  # the stored run record
    other_dataset: bool = False  # refuse: the output holds something else (--force-new may go elsewhere)
    fix: str = ""  # refuse: what the user can do

    @property
    def samples(self) -> int:
        return sum(marker["count"] for marker in self.committed.values())


class UnreadableIndex(Exception):
    def __init__(self, shard: int, exc: Exception):
        super().__init__(f"{shard_parquet(shard)} is unreadable ({type(exc).__name__}: {str(exc)[:120]})")
        self.shard = shard


class RunDir:
    """One run directory (a local path or fsspec URL) and everything written around its shards."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def url(self) -> str:
        return self.store.url

    # ---------------------------------------------------------------------------------------- classify

    def classify(self, identity: Identity, counts: list[int], samples_per_shard: int) -> RunState:
        """What the output holds against a run of `counts` shards (of `samples_per_shard`) with `identity`:
        fresh (nothing there), complete (every shard committed), resume or extend (a prefix of this same
        dataset; extend when the run asks for more samples than the record says), or refuse (another
        dataset, not a run directory, unreadable, or more samples than asked for). Only the parts the
        identity names are compared (a plan without the model compares the rest)."""
        conflict, record = self._check(identity)
        if conflict is not None:
            return conflict
        if record is None:
            return RunState("fresh", "a new dataset")
        committed = committed_shards(self.store, samples_per_shard)
        have = sum(marker["count"] for marker in committed.values())
        too_many = sorted(shard for shard, marker in committed.items() if shard >= len(counts) or marker["count"] > counts[shard])
        if too_many:
            asked = sum(counts)
            reason = f"the output already holds {have} samples; num_samples={asked} would drop some (shards {too_many})"
            return RunState("refuse", reason, committed, record=record, fix="raise num_samples or write to another --out")
        done = {shard: marker for shard, marker in committed.items() if marker["count"] == counts[shard]}
        if len(done) == len(counts):
            return RunState("complete", f"all {len(counts)} shards are committed; nothing to generate", committed, done, record)
        action = "extend" if sum(counts) > record.get("num_samples", 0) else "resume"
        reason = f"{len(done)} of {len(counts)} shards committed ({have} samples); {len(counts) - len(done)} to generate"
        return RunState(action, reason, committed, done, record)

    def conflict(self, identity: Identity) -> RunState | None:
        """A refusal when the output holds something other than this dataset (another dataset, files that
        are not a run, an unreadable run record), else None. Reads the run record only (no shard scan)."""
        return self._check(identity)[0]

    def _check(self, identity: Identity) -> tuple[RunState | None, dict | None]:
        """(conflict or None, the stored run record or None)."""
        try:
            record = read_run_record(self.store)
            other_files = record is None and self._holds_other_files()
        except BadRunRecord as exc:
            return RunState("refuse", str(exc), fix=f"`dreamshard repair {self.url}` rebuilds it, or write to another --out"), None
        except OSError as exc:
            return RunState("refuse", f"the output cannot be read ({type(exc).__name__}: {exc})", fix="choose another --out"), None
        if other_files:
            return RunState("refuse", "the output is not a dreamshard run directory (files but no dreamshard.json)", other_dataset=True, fix=ELSEWHERE), None
        if record is None:
            return None, None
        problems = record_problems(record)
        if problems:
            reason = f"the output's {RUN_RECORD} is not a valid run record ({'; '.join(problems)})"
            return RunState("refuse", reason, fix=f"`dreamshard repair {self.url}` rebuilds it, or write to another --out"), None
        digests, parts = record.get("fingerprints"), record.get("fingerprint_parts", {})
        if not isinstance(digests, dict) or not isinstance(parts, dict):
            reason = "the output's dreamshard.json holds no fingerprints (not written by `dreamshard generate`)"
            return RunState("refuse", reason, record=record, other_dataset=True, fix=ELSEWHERE), record
        differs = identity.changes_from(digests, parts)
        if differs:
            reason = f"the output holds a dataset made with a different {' and '.join(differs)}"
            return RunState("refuse", reason, record=record, other_dataset=True, fix=ELSEWHERE), record
        return None, record

    def _holds_other_files(self) -> bool:
        return self.store.fs.isfile(self.store.root) or bool(set(self.store.list("")) - {LEASE})

    # ----------------------------------------------------------------------------------------- prepare

    def prepare(self, state: RunState, counts: list[int], record: dict) -> None:
        """Ready the output for the shards still to make: forget a short shard the run fills up, remove
        leftovers (partial files, tars and index files without a commit) and the manifest of an unfinished
        run, write the run record and the marker snapshot. An unwritable output is one UserError line."""
        try:
            self.store.makedirs()
            for shard in sorted(set(state.committed) - set(state.done)):
                self.uncommit(shard)
            self.clean_partials()
            self.remove_uncommitted(state.done)
            if len(state.done) < len(counts):
                self.remove_consolidated()
            self.write_record(record)
            self.write_snapshot(state.done)
        except OSError as exc:
            raise UserError(f"cannot write to {self.url} ({exc.strerror or exc}); choose a writable output path with --out") from None

    def write_record(self, record: dict) -> None:
        """dreamshard.json, and its copy in index/ (what `dreamshard repair` restores a damaged one from)."""
        self.store.write_json(RUN_RECORD, record)
        self.store.write_json(RECORD_COPY, record)

    def damaged(self, committed: dict[int, dict]) -> dict[int, str]:
        """Committed shards whose files are not what their markers say: {shard: what is wrong}. Reads every
        tar (its sha256) and index file: the full check, that the size check of every scan does not make."""
        problems = {}
        for shard, marker in sorted(committed.items()):
            try:
                if hashlib.sha256(self.store.read_bytes(shard_tar(shard))).hexdigest() != marker.get("tar_sha256"):
                    problems[shard] = "its tar's sha256 differs from its marker"
                elif pq.read_metadata(pa.BufferReader(self.store.read_bytes(shard_parquet(shard)))).num_rows != marker["count"]:
                    problems[shard] = "its index file holds another number of samples"
            except (OSError, ValueError, pa.ArrowException) as exc:
                problems[shard] = f"a file is unreadable ({type(exc).__name__})"
        return problems

    def uncommit(self, shard: int) -> None:
        """Forget a shard (its marker goes first, so a crash half-way leaves it uncommitted, never mixed)."""
        for rel in (shard_marker(shard), shard_parquet(shard), shard_tar(shard)):
            self.store.remove(rel)

    def clean_partials(self) -> list[str]:
        """Remove the `*.partial` files a killed run left behind; returns their paths."""
        removed = []
        for folder in ("shards", "index", ""):
            for name in self.store.list(folder):
                if name.endswith(PARTIAL):
                    rel = f"{folder}/{name}" if folder else name
                    self.store.remove(rel)
                    removed.append(rel)
        return removed

    def remove_uncommitted(self, keep: dict[int, dict] | None = None) -> list[str]:
        """Tar and Parquet files without a commit do not exist for readers of the contract, but a `*.tar`
        glob would still see them: remove them (all but `keep`'s, default: the committed shards); returns
        their paths."""
        keep = keep if keep is not None else committed_shards(self.store, checked_run_record(self.store)["samples_per_shard"])
        removed = []
        for folder, suffix in (("shards", ".tar"), ("index", ".parquet")):
            for name in self.store.list(folder):
                stem = name.removesuffix(suffix)
                if name.endswith(suffix) and stem.isdigit() and int(stem) not in keep:
                    self.store.remove(f"{folder}/{name}")
                    removed.append(f"{folder}/{name}")
        return removed

    def remove_consolidated(self) -> None:
        """Drop manifest and sizes.json while shards change, so no reader takes an unfinished run as complete."""
        self.store.remove(MANIFEST)
        self.store.remove(SIZES)

    # ----------------------------------------------------------------------------------- driver records

    def write_snapshot(self, committed: dict[int, dict]) -> None:
        """Cache the committed markers in one object, so the next scan reads one file instead of one per shard
        (seconds instead of minutes for 10,000 shards on an object store). Each entry carries its marker
        file's listing stamp and the whole its content digest (reader.committed_shards checks both). Only a
        cache: a failure to write it is a warning."""
        try:
            stamps = self.store.listing("index")
            entries = {}
            for shard, marker in sorted(committed.items()):
                listed = stamps.get(Path(shard_marker(shard)).name)
                if listed is not None:
                    entries[str(shard)] = {"marker": marker, "stamp": listed[1]}
            data = {"version": SNAPSHOT_VERSION, "digest": snapshot_digest(entries), "markers": entries}
            self.store.write_bytes(MARKER_SNAPSHOT, json.dumps(data, separators=(",", ":")).encode())
        except OSError as exc:  # the next scan reads the markers themselves
            log.warning(
                "could not write %s (%s: %s); it is only a cache of the commit markers: delete whatever is at that path, the next run rewrites it",
                self.store.url_of(MARKER_SNAPSHOT), type(exc).__name__, exc,
            )  # fmt: skip

    def append_stats(self, record: dict) -> None:
        """Append one line to OUT/stats.jsonl (rewritten whole: object stores cannot append)."""
        try:
            old = self.store.read_bytes(STATS) if self.store.exists(STATS) else b""
            self.store.write_bytes(STATS, old + (json.dumps(record) + "\n").encode())
        except OSError as exc:  # the statistics must never fail a run that produced its shards
            log.warning("could not write %s/%s (%s)", self.url, STATS, exc)

    def consolidate(self, counts: list[int], record: dict | None = None) -> pa.Table:
        """Write `manifest.parquet` (all per-shard rows, in index order), `shards/sizes.json` and, given the run
        record, the dataset card (README.md, format/card.py: what makes `load_dataset(RUN)` work). The index
        files are fetched in one batched read (concurrent on object stores). An unreadable one un-commits its
        shard (a re-run regenerates it) and raises UnreadableIndex."""
        store = self.store
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
                self.uncommit(shard)
                raise UnreadableIndex(shard, exc) from None
        table = pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table()
        with store.scratch_file(MANIFEST) as local:
            pq.write_table(table, local)
            store.put_file(local, MANIFEST)
        store.write_json(SIZES, {Path(shard_tar(shard)).name: count for shard, count in enumerate(counts)})
        if record is not None:
            self.write_card(record, table_to_records(table))
        return table

    def write_card(self, record: dict, rows: list[dict]) -> None:
        """README.md: the dataset card of the samples in `rows` (format/card.py)."""
        self.store.write_bytes(CARD, dataset_card(record, rows).encode())


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
    rundir = RunDir(store)
    full_record = {
        "format_version": FORMAT_VERSION, "num_samples": len(samples), "samples_per_shard": samples_per_shard,
        "num_shards": len(counts), "image_format": image_format, "layout": LAYOUT, "fingerprints": {}, "model": {},
        "label": LABEL_FIELD if any(LABEL_FIELD in sample.files for sample in samples) else None, **(record or {}),
    }  # fmt: skip
    rundir.consolidate(counts, full_record)
    rundir.write_record(full_record)
    return store
