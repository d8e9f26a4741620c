"""Names of everything in a run directory (docs/format.md is the contract).

dreamshard.json                 run record (config, fingerprints, versions)
shards/000000.tar ...           WebDataset shards, the only `*.tar` files
shards/sizes.json               {"000000.tar": count, ...} (open_clip), written when the run completes
index/000000.parquet            per-sample metadata of shard 0 (json fields + run facts)
index/000000.commit.json        shard 0's commit marker, written LAST
index/markers.json              a cache of the markers (one read instead of one per marker); never required
index/run-record.json           a copy of dreamshard.json (dreamshard repair restores a damaged one from it)
manifest.parquet                all index/*.parquet rows, written when the run completes
README.md                       the dataset card (format/card.py), written when the run completes and by `push`
stats.jsonl                     one record per generate call (run facts, not part of the dataset)
.lease                          while a command writes the run: who holds it (format/lease.py)
"""

from __future__ import annotations

FORMAT_VERSION = 3  # of the run directory layout; 2: worker/seconds left the sample json for the index; 3: nsfw, clip_score, attempts
RUN_RECORD = "dreamshard.json"
RECORD_COPY = "index/run-record.json"  # a copy of dreamshard.json, written with it: what `dreamshard repair` restores
MANIFEST = "manifest.parquet"
SIZES = "shards/sizes.json"
MARKER_SNAPSHOT = "index/markers.json"  # cached copy of the commit markers (see reader.committed_shards)
STATS = "stats.jsonl"  # one record per generate call (run facts; not part of the dataset)
LEASE = ".lease"  # the holder of an output while a command writes it (format/lease.py)
PARTIAL = ".partial"  # suffix of files being written; never read, removed by the next run
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
LABEL_FIELD = "seg.png"  # the label of label-keeping modes: 8-bit mode L train ids, 255 = ignore
FOLDERS = ("", "shards", "index")
LAYOUT = {
    "shards": "shards/{shard:06d}.tar",
    "index": "index/{shard:06d}.parquet",
    "marker": "index/{shard:06d}.commit.json",
    "manifest": MANIFEST,
    "sizes": SIZES,
}


def sample_key(index: int) -> str:
    return f"{index:09d}"


def shard_tar(shard: int) -> str:
    return LAYOUT["shards"].format(shard=shard)


def shard_parquet(shard: int) -> str:
    return LAYOUT["index"].format(shard=shard)


def shard_marker(shard: int) -> str:
    return LAYOUT["marker"].format(shard=shard)


def shard_counts(num_samples: int, samples_per_shard: int) -> list[int]:
    """Samples per shard: shard k holds samples [k*S, min((k+1)*S, N))."""
    full, rest = divmod(num_samples, samples_per_shard)
    return [samples_per_shard] * full + ([rest] if rest else [])
