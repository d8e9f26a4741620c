"""Write a run directory: WebDataset tar shards, per-shard Parquet metadata and commit markers.

Layout (docs/format.md is the contract):
    dreamshard.json                 run record (config, fingerprints, versions)
    shards/000000.tar ...           WebDataset shards, the only `*.tar` files
    shards/sizes.json               {"000000.tar": count, ...} (open_clip), written when the run completes
    index/000000.parquet            per-sample metadata of shard 0
    index/000000.commit.json        shard 0's commit marker, written LAST
    manifest.parquet                all index/*.parquet rows, written when the run completes

Commit protocol of one shard: write the tar under a `*.partial` name, rename it to its final name, write
the Parquet file the same way, then the marker. A shard without a marker does not exist; a marker's count
and tar size must match for the shard to count as committed. On fsspec object stores (s3://, gs://,
memory://) the files are written locally, uploaded whole, marker last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

FORMAT_VERSION = 1  # of the run directory layout (docs/format.md); bump on incompatible change
RUN_RECORD = "dreamshard.json"
MANIFEST = "manifest.parquet"
SIZES = "shards/sizes.json"
PARTIAL = ".partial"
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}

# The json fields of every sample, in this order (DESIGN.md data contract; `extra` holds prompt-file columns).
JSON_FIELDS = (
    "key", "index", "shard", "prompt", "negative_prompt", "seed", "class_name", "class_id", "template", "style",
    "width", "height", "steps", "guidance_scale", "scheduler", "model", "mode", "source_key", "worker", "seconds",
    "extra",
)  # fmt: skip

# Parquet columns: the json fields, dict-valued ones (style, model, extra) as JSON text so every shard has
# the same schema whatever the style axes or prompt-file columns.
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()), ("index", pa.int64()), ("shard", pa.int64()), ("prompt", pa.string()),
        ("negative_prompt", pa.string()), ("seed", pa.int64()), ("class_name", pa.string()),
        ("class_id", pa.int64()), ("template", pa.string()), ("style", pa.string()), ("width", pa.int64()),
        ("height", pa.int64()), ("steps", pa.int64()), ("guidance_scale", pa.float64()),
        ("scheduler", pa.string()), ("model", pa.string()), ("mode", pa.string()), ("source_key", pa.string()),
        ("worker", pa.string()), ("seconds", pa.float64()), ("extra", pa.string()),
    ]
)  # fmt: skip
JSON_TEXT_COLUMNS = ("style", "model", "extra")

# What `write_shard` fills in for fields a caller leaves out (toy shards, tests); the engine sets them all.
DEFAULT_FIELDS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "seed": 0, "class_name": "", "class_id": -1, "template": "", "style": {},
    "steps": 0, "guidance_scale": 0.0, "scheduler": "", "model": {"id": "", "hash": ""}, "mode": "txt2img",
    "source_key": "", "worker": "", "seconds": 0.0, "extra": {},
}  # fmt: skip


def sample_key(index: int) -> str:
    return f"{index:09d}"


def shard_tar(shard: int) -> str:
    return f"shards/{shard:06d}.tar"


def shard_parquet(shard: int) -> str:
    return f"index/{shard:06d}.parquet"


def shard_marker(shard: int) -> str:
    return f"index/{shard:06d}.commit.json"


# --------------------------------------------------------------------------------------------- store


class Store:
    """A run directory on the local disk or any fsspec filesystem; paths are relative to its root."""

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def list(self, folder: str) -> list[str]:
        """File names directly in `folder` ([] if it does not exist)."""
        try:
            return sorted(Path(entry).name for entry in self.fs.ls(self.path(folder), detail=False))
        except FileNotFoundError:
            return []

    def makedirs(self) -> None:
        for folder in ("", "shards", "index"):
            self.fs.makedirs(self.path(folder).rstrip("/"), exist_ok=True)

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm_file(self.path(rel))

    def put_file(self, local: str, rel: str) -> None:
        """Move a finished local file to `rel` atomically (rename on disk, one upload on object stores)."""
        if self.is_local:
            os.replace(local, self.path(rel))
        else:
            self.fs.put_file(local, self.path(rel))
            os.remove(local)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `rel` so readers see the old content or the new, never half of it."""
        with self.scratch_file(rel) as local:
            Path(local).write_bytes(data)
            self.put_file(local, rel)

    def write_json(self, rel: str, data: Any) -> None:
        self.write_bytes(rel, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())

    def scratch_file(self, rel: str) -> "ScratchFile":
        """A local path to build `rel` in: beside it on disk (`*.partial`), in a temp dir for object stores."""
        return ScratchFile(self, rel)


class ScratchFile:
    """A local path to build one file of the store in; removed on cleanup unless already moved."""

    def __init__(self, store: Store, rel: str) -> None:
        unique = f".{uuid.uuid4().hex[:8]}{PARTIAL}"
        self._tmpdir = None if store.is_local else tempfile.mkdtemp(prefix="dreamshard-")
        self.local = store.path(rel) + unique if store.is_local else os.path.join(self._tmpdir, Path(rel).name + unique)

    def __enter__(self) -> str:
        return self.local

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        if os.path.exists(self.local):
            os.remove(self.local)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- shards


@dataclass
class ShardSample:
    """One sample to write: its metadata (json fields; key and shard are filled in), image, extra files
    such as {"seg.png": label image} (the same names in every sample of a dataset)."""

    metadata: dict[str, Any]
    image: Image.Image
    files: dict[str, bytes | Image.Image] = field(default_factory=dict)


class ShardWriter:
    """Streams samples into one shard's tar, then commits it (tar, Parquet, marker last).

    Not thread-safe: one thread adds samples. Use as a context manager so an error removes the partial tar.
    """

    def __init__(self, store: Store, shard: int, image_format: str = "jpg", quality: int = 95) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}")
        self.store, self.shard, self.image_format, self.quality = store, shard, image_format, quality
        store.makedirs()
        store.remove(shard_marker(shard))  # rewriting a shard un-commits it first
        self._scratch = store.scratch_file(shard_tar(shard))
        self._tar = tarfile.open(self._scratch.local, "w", format=tarfile.PAX_FORMAT)
        self._rows: list[dict] = []
        self._file_names: tuple[str, ...] | None = None
        self._order: list[int] | None = None  # indexes still to write, next one last
        self._waiting: dict[int, tuple[dict, list]] = {}
        self._started = time.time()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()

    def expect(self, indexes: list[int]) -> None:
        """Write samples in this index order whatever order they are added in (generation groups samples
        by steps/guidance); commit fails unless all of them arrived."""
        self._order = list(reversed(indexes))

    def add(self, sample: ShardSample) -> None:
        """Encode one sample; it is written now, or once the samples before it (see `expect`) are."""
        meta = sample_json(sample.metadata, self.shard, sample.image)
        names = tuple(sorted(sample.files))
        if self._file_names is None:
            self._file_names = names
        elif names != self._file_names:
            raise ValueError(f"sample {meta['key']} has files {names}, others {self._file_names}: every sample needs the same fields")
        key = meta["key"]
        members = [
            (f"{key}.{self.image_format}", encode_image(sample.image, self.image_format, self.quality)),
            (f"{key}.txt", meta["prompt"].encode()),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode()),
        ]
        for name in names:
            data = sample.files[name]
            if isinstance(data, Image.Image):
                data = encode_image(data, Path(name).suffix.lstrip(".") or "png", self.quality)
            members.append((f"{key}.{name}", data))
        if self._order is None:
            self._write(meta, members)
            return
        self._waiting[meta["index"]] = (meta, members)
        while self._order and self._order[-1] in self._waiting:
            self._write(*self._waiting.pop(self._order.pop()))

    def commit(self, info: dict | None = None) -> dict:
        """Finish the shard; returns its marker (shard, count, first/last index, tar bytes and sha256)."""
        if self._order or self._waiting:
            missing = sorted(set(self._order or ()) | set(self._waiting))
            raise RuntimeError(f"shard {self.shard}: samples {missing[:5]}... missing or out of plan; not committing")
        self._tar.close()
        local = self._scratch.local
        tar_bytes, tar_sha256 = os.path.getsize(local), _sha256_file(local)
        self.store.put_file(local, shard_tar(self.shard))
        self._scratch.cleanup()
        with self.store.scratch_file(shard_parquet(self.shard)) as parquet:
            pq.write_table(rows_to_table(self._rows), parquet)
            self.store.put_file(parquet, shard_parquet(self.shard))
        indexes = [row["index"] for row in self._rows]
        marker = {
            "shard": self.shard,
            "count": len(self._rows),
            "first_index": min(indexes, default=-1),
            "last_index": max(indexes, default=-1),
            "tar": shard_tar(self.shard),
            "tar_bytes": tar_bytes,
            "tar_sha256": tar_sha256,
            "parquet": shard_parquet(self.shard),
            "seconds": round(time.time() - self._started, 3),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(info or {}),
        }
        self.store.write_json(shard_marker(self.shard), marker)
        return marker

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._scratch.cleanup()

    def _write(self, meta: dict, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._rows.append(meta)


def write_shard(
    out: str | Path, shard: int, samples: list[ShardSample], image_format: str = "jpg", quality: int = 95
) -> dict:
    """Write ONE committed shard in the engine format (e.g. toy target shards for the trainer); returns
    its marker. Metadata needs `index`; other json fields default to DEFAULT_FIELDS. Does not write
    dreamshard.json, sizes.json or the manifest (see `dreamshard.engine.manifest.consolidate`)."""
    with ShardWriter(Store(out), shard, image_format, quality) as writer:
        for sample in samples:
            writer.add(sample)
        return writer.commit()


def sample_json(metadata: dict[str, Any], shard: int, image: Image.Image | None = None) -> dict[str, Any]:
    """The json of one sample: every JSON_FIELDS entry, in order; unknown keys are an error."""
    unknown = set(metadata) - set(JSON_FIELDS)
    if unknown:
        raise ValueError(f"unknown sample metadata {sorted(unknown)}; put extra columns under 'extra'")
    if "index" not in metadata:
        raise ValueError("sample metadata needs 'index' (the global sample index)")
    merged = {**DEFAULT_FIELDS, **metadata}
    index = int(merged["index"])
    merged.update(key=sample_key(index), index=index, shard=shard)
    if image is not None:
        merged.setdefault("width", image.width)
        merged.setdefault("height", image.height)
    return {name: merged[name] for name in JSON_FIELDS}


def rows_to_table(rows: list[dict]) -> pa.Table:
    columns = {name: [row[name] for row in rows] for name in PARQUET_SCHEMA.names}
    for name in JSON_TEXT_COLUMNS:
        columns[name] = [json.dumps(value, sort_keys=True, ensure_ascii=False) for value in columns[name]]
    return pa.table(columns, schema=PARQUET_SCHEMA)


def encode_image(image: Image.Image, image_format: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    pil_format = IMAGE_FORMATS.get(image_format, image_format.upper())
    if pil_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    options = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
