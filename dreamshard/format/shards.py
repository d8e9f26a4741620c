"""Write one shard: a WebDataset tar, its index Parquet, then its commit marker (LAST).

Commit protocol: build the tar and the Parquet file in scratch files (`seal`), then, when the shard is
published: remove any old marker, move the tar to its final name, the Parquet file likewise, then write the
marker (`publish`). A shard without a marker does not exist; a marker's first index and tar size must match
for the shard to count as committed. On object stores the files are built locally and uploaded whole,
marker last. Sealing and publishing are separate steps so that of two copies of one shard (a backup made
for a straggler) only the one the driver chooses is published.

Tars are reproducible: members carry a fixed mtime, owner and mode, and the json only the plan's fields,
so the same plan and weights give the same bytes on any worker.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from dreamshard.format.layout import IMAGE_FORMATS, shard_marker, shard_parquet, shard_tar
from dreamshard.format.record import json_fields, records_to_table, sample_record
from dreamshard.format.store import Store, as_store

TAR_MTIME = 0  # every member's mtime: tar bytes must not depend on when they were written
TAR_OWNER = "dreamshard"


@dataclass
class ShardSample:
    """One sample to write: its metadata (record fields; key and shard are filled in), image, extra files
    such as {"seg.png": label image} (the same names in every sample of a dataset), and `finish`, work the
    writer does on the sample before encoding it (a generating thread hands off e.g. resizing to a label)."""

    metadata: dict[str, Any]
    image: Image.Image
    files: dict[str, Any] = field(default_factory=dict)  # bytes or PIL images (or whatever `finish` turns into them)
    finish: Callable[[ShardSample], None] | None = None


class ShardWriter:
    """Streams samples into one shard's tar, then commits it (tar, Parquet, marker last).

    Not thread-safe: one thread adds samples. Use as a context manager so an error removes the partial tar.
    """

    def __init__(self, store: Store, shard: int, image_format: str = "jpg", quality: int = 95) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}")
        self.store, self.shard, self.image_format, self.quality = store, shard, image_format, quality
        store.makedirs()
        self._scratch = store.scratch_file(shard_tar(shard))
        self._parquet = store.scratch_file(shard_parquet(shard))
        self._marker: dict | None = None  # set by seal
        self._file = open(self._scratch.local, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER)
        self._records: list[dict] = []
        self._file_names: tuple[str, ...] | None = None
        self._order: list[int] | None = None  # indexes still to write, next one last
        self._waiting: dict[int, tuple[dict, dict]] = {}
        self._started = time.time()

    def __enter__(self) -> ShardWriter:
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
        if sample.finish is not None:
            sample.finish(sample)
        record = sample_record(sample.metadata, self.shard, sample.image.size)
        names = tuple(sorted(sample.files))
        if self._file_names is None:
            self._file_names = names
        elif names != self._file_names:
            raise ValueError(f"sample {record['key']} has files {names}, others {self._file_names}: every sample needs the same fields")
        members = {
            "__key__": record["key"],
            self.image_format: encode_image(sample.image, self.image_format, self.quality),
            "txt": record["prompt"].encode(),
            "json": json.dumps(json_fields(record), ensure_ascii=False).encode(),
        }
        for name in names:
            data = sample.files[name]
            if isinstance(data, Image.Image):
                data = encode_image(data, Path(name).suffix.lstrip(".") or "png", self.quality)
            members[name] = data
        if self._order is None:
            self._write(record, members)
            return
        self._waiting[record["index"]] = (record, members)
        while self._order and self._order[-1] in self._waiting:
            self._write(*self._waiting.pop(self._order.pop()))

    def commit(self, info: dict | None = None) -> dict:
        """Seal and publish the shard; returns its marker."""
        self.seal(info)
        return self.publish()

    def seal(self, info: dict | None = None) -> dict:
        """Finish the shard's files in scratch space; returns the marker `publish` will write (shard, count,
        first/last index, tar and Parquet bytes, tar sha256, and `info`)."""
        if self._order or self._waiting:
            missing = sorted(set(self._order or ()) | set(self._waiting))
            raise RuntimeError(f"shard {self.shard}: samples {missing[:5]}... missing or out of plan; not committing")
        self._close()
        tar = self._scratch.local
        pq.write_table(records_to_table(self._records), self._parquet.local)
        indexes = [record["index"] for record in self._records]
        self._marker = {
            "shard": self.shard,
            "count": len(self._records),
            "first_index": min(indexes, default=-1),
            "last_index": max(indexes, default=-1),
            "tar": shard_tar(self.shard),
            "tar_bytes": Path(tar).stat().st_size,
            "tar_sha256": sha256_file(tar),
            "parquet": shard_parquet(self.shard),
            "parquet_bytes": Path(self._parquet.local).stat().st_size,
            "seconds": round(time.time() - self._started, 3),
            **(info or {}),
        }
        return dict(self._marker)

    def publish(self) -> dict:
        """Make the sealed shard committed: its old marker (if any) goes first, then tar and Parquet move to
        their final names, and the marker is written last. Returns the marker."""
        if self._marker is None:
            raise RuntimeError(f"shard {self.shard}: publish before seal")
        marker = {**self._marker, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.store.remove(shard_marker(self.shard))  # rewriting a shard un-commits it first
        self.store.put_file(self._scratch.local, shard_tar(self.shard))
        self.store.put_file(self._parquet.local, shard_parquet(self.shard))
        self._scratch.cleanup()
        self._parquet.cleanup()
        self.store.write_json(shard_marker(self.shard), marker)
        return marker

    def abort(self) -> None:
        """Drop the shard's scratch files (an error, or the copy the driver did not choose)."""
        try:
            self._close()
        finally:
            self._scratch.cleanup()
            self._parquet.cleanup()

    def _close(self) -> None:
        if not self._file.closed:
            self._tar.close()
            self._file.close()

    def _write(self, record: dict, members: dict) -> None:
        self._tar.write(members)
        self._records.append(record)


def write_shard(out: str | Path | Store, shard: int, samples: list[ShardSample], image_format: str = "jpg", quality: int = 95) -> dict:
    """Write ONE committed shard (e.g. toy target shards for the trainer); returns its marker. Metadata
    needs `index`; other fields take their defaults. Does not write dreamshard.json, sizes.json or the
    manifest (see `dreamshard.format.rundir.write_dataset`)."""
    store = as_store(out)
    with ShardWriter(store, shard, image_format, quality) as writer:
        for sample in samples:
            writer.add(sample)
        return writer.commit()


def encode_image(image: Image.Image, image_format: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    pil_format = IMAGE_FORMATS.get(image_format, image_format.upper())
    if pil_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    options = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
