"""Where a run lives: the local disk or any fsspec filesystem (s3://, gs://, memory://, ...), and the one
way everything in dreamshard writes a file: build it under a temporary name, then move it into place, so a
reader sees the old content or the new, never half of it.

Listings are never cached: other processes (the workers, a second driver) write the same run, and a stale
listing would hide their files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dreamshard.errors import UserError
from dreamshard.format.layout import FOLDERS, PARTIAL

# fsspec protocol -> the dreamshard install extra that brings its filesystem package
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}

# Deadlines of every object-store request (environment variables override them, in every process): an endpoint
# that refuses connections fails at once, one that accepts them and never answers within about
# STORE_RETRIES x STORE_READ_TIMEOUT_S seconds. A large upload is many requests, each with these deadlines.
STORE_CONNECT_TIMEOUT_S = float(os.environ.get("DREAMSHARD_STORE_CONNECT_TIMEOUT_S", 10))
STORE_READ_TIMEOUT_S = float(os.environ.get("DREAMSHARD_STORE_READ_TIMEOUT_S", 30))
STORE_RETRIES = int(os.environ.get("DREAMSHARD_STORE_RETRIES", 3))


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options that give each request of a protocol a deadline."""
    if protocol in ("s3", "s3a"):
        timeouts = {"connect_timeout": STORE_CONNECT_TIMEOUT_S, "read_timeout": STORE_READ_TIMEOUT_S, "retries": {"max_attempts": 1}}
        return {"config_kwargs": timeouts}  # s3fs retries the request itself (STORE_RETRIES, set on the instance)
    if protocol in ("gs", "gcs"):
        return {"timeout": STORE_CONNECT_TIMEOUT_S + STORE_READ_TIMEOUT_S}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(connect=STORE_CONNECT_TIMEOUT_S, sock_read=STORE_READ_TIMEOUT_S)}}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of a URL or local path, listings cache off, requests with deadlines; a missing
    filesystem package is one line naming the extra to install."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False, **storage_options(protocol))
        if hasattr(fs, "retries"):  # s3fs: its own retry loop around each request
            fs.retries = STORE_RETRIES
        return fs, path
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        extra = EXTRAS.get(protocol)
        fix = f"pip install 'dreamshard[{extra}]'" if extra else f"install the fsspec filesystem package for {protocol}://"
        raise UserError(f"cannot open {url}: {exc}; {fix}") from None
    except ValueError as exc:  # an unknown protocol
        raise UserError(f"cannot open {url}: {exc}") from None


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


class Store:
    """A run directory on the local disk or any fsspec filesystem; paths are relative to its root."""

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self.fs, root = filesystem(self.url)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local and os.path.islink(self.root) and not os.path.exists(self.root):
            raise UserError(f"{self.url} is a symbolic link to {os.readlink(self.root)}, which does not exist; create that directory or choose another path")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        """What other processes and libraries open: a local path, or the full URL (with its protocol)."""
        return self.path(rel) if self.is_local else self.fs.unstrip_protocol(self.path(rel))

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
        return sorted(self.sizes(folder))

    def sizes(self, folder: str) -> dict[str, int]:
        """{file name: bytes} of the files directly in `folder`, from one listing ({} if it does not exist)."""
        return {name: size for name, (size, _) in self.listing(folder).items()}

    def listing(self, folder: str) -> dict[str, tuple[int, str]]:
        """{file name: (bytes, stamp)} of the files directly in `folder` from one listing; the stamp changes
        whenever a file is rewritten (its ETag on object stores, its mtime on disk)."""
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {Path(entry["name"]).name: (entry.get("size"), _stamp(entry)) for entry in entries if entry.get("type") == "file"}

    def makedirs(self) -> None:
        for folder in FOLDERS:
            self.fs.makedirs(self.path(folder), exist_ok=True)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

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
        self.write_bytes(rel, json_bytes(data))

    def scratch_file(self, rel: str) -> ScratchFile:
        """A local path to build `rel` in: beside it on disk (`*.partial`), in a temp dir for object stores."""
        return ScratchFile(self, rel)


class ScratchFile:
    """A local path to build one file of the store in; removed on cleanup unless already moved."""

    def __init__(self, store: Store, rel: str) -> None:
        unique = f".{uuid.uuid4().hex[:8]}{PARTIAL}"
        self._tmpdir: str | None = None
        if store.is_local:
            self.local = store.path(rel) + unique
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="dreamshard-")
            self.local = os.path.join(self._tmpdir, Path(rel).name + unique)

    def __enter__(self) -> str:
        return self.local

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        if os.path.exists(self.local):
            os.remove(self.local)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


STAMP_FIELDS = ("ETag", "etag", "md5Hash", "generation", "LastModified", "updated", "mtime", "ino", "created")  # s3fs, gcsfs, local, memory


def _stamp(entry: dict) -> str:
    """What identifies this version of a listed file: every field of the listing that changes on a rewrite."""
    return "/".join(str(entry[name]) for name in STAMP_FIELDS if entry.get(name) is not None)


# Where the exceptions of object-store clients come from: none of them is an OSError (botocore's connection
# errors, aiohttp's, google-auth's), so they are recognised by module.
STORE_ERROR_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "urllib3", "requests", "fsspec")


def store_error(exc: BaseException) -> str | None:
    """One line for an error of an object store's client (unreachable, silent, refused, a bad bucket name,
    credentials), else None."""
    module = type(exc).__module__ or ""
    if not module.startswith(STORE_ERROR_MODULES) and not isinstance(exc, (TimeoutError, ConnectionError)):
        return None
    s3 = module.startswith(("botocore", "aiobotocore", "s3fs"))
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "S3") if s3 else "the store"
    check = "the endpoint (AWS_ENDPOINT_URL), the bucket name, the credentials" if s3 else "the URL, the credentials"
    text = " ".join(str(exc).split())[:240] or type(exc).__name__
    return f"cannot use {endpoint} ({type(exc).__name__}: {text}); check {check} and the network, then re-run the same command"


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


# ------------------------------------------------------------------------------------ local files


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write a local file under a temporary name beside it, then rename it into place."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, json_bytes(data))


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """A temporary path beside `final` to build a file or directory in; renamed to `final` (replacing
    what was there) when the block ends without error, removed otherwise."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}{PARTIAL}"
    try:
        yield tmp
        if tmp.is_dir() and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def numbered_dirs(folder: Path, prefix: str, complete: Callable[[Path], bool]) -> list[Path]:
    """The directories `folder/{prefix}{number}` that `complete` accepts, by number, oldest first (checkpoints
    of the trainer and of personalisation)."""
    found = [path for path in Path(folder).glob(f"{prefix}*") if path.name.removeprefix(prefix).isdigit() and complete(path)]
    return sorted(found, key=lambda path: int(path.name.removeprefix(prefix)))


def as_store(where: str | Path | Store) -> Store:
    return where if isinstance(where, Store) else Store(where)
