"""Engine shards as the trainer reads them: where they are (a run directory, a glob, a brace pattern, a URL
list), how many samples each holds (the catalogue the epoch order is built over, trainer/order.py), and a
reader that keeps the shards of the block being read in memory.

A shard that cannot be read, or holds fewer samples than its commit marker counts, is skipped and counted;
its samples' positions are filled by the reader's caller (trainer/data.py) with other samples of the same
block, chosen by position alone, so every worker and every rank makes the same choice. Past a budget
(`data.max_bad_fraction` of the shards read, or every shard) the stream stops with DataError: never a busy
loop on a stream that cannot yield a batch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import tarfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import fsspec
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem

from dreamshard.config import ShardsConfig, TrainDataConfig
from dreamshard.errors import RunFailure, UserError, one_line
from dreamshard.format.layout import RUN_RECORD, shard_tar
from dreamshard.format.reader import BadRunRecord, checked_run_record, committed_shards, subset_by_shard, tar_samples
from dreamshard.format.store import Store, filesystem, is_url

log = logging.getLogger(__name__)

OPEN_RETRIES = (0.5, 1.0, 2.0)  # back-off seconds between attempts to open a shard (transient errors)
MIN_SHARD_ATTEMPTS = 8  # shards read before a failure fraction is judged
MAX_UNUSABLE_SAMPLES = 64  # samples read with none usable before the stream gives up
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's member name → (key, extension) rule


class DataError(RunFailure):
    """A training stream that cannot go on: every shard failed, too many did, or no sample is usable."""


@dataclass(frozen=True)
class ShardAccess:
    """How the trainer may open shards: whether `pipe:` URLs (a shell command, webdataset's convention) are
    allowed, and the back-off seconds between attempts to open a shard (transient errors). One object from
    the config, passed wherever a shard is opened."""

    allow_pipe: bool = False
    retries: tuple[float, ...] = OPEN_RETRIES

    @classmethod
    def of(cls, data: TrainDataConfig) -> ShardAccess:
        return cls(allow_pipe=data.allow_pipe)

    def open(self, url: str):
        """A readable binary stream of a shard at a local path or any fsspec URL (s3://, gs://, http(s)://, ...),
        retried with back-off on transient errors."""
        if url.startswith("pipe:"):
            self.check_pipe(url)
            return wds.gopen(url, "rb")
        for delay in (*self.retries, None):
            try:
                return fsspec.open(url, "rb").open()
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                raise
            except OSError:
                if delay is None:
                    raise
                time.sleep(delay)

    def check_pipe(self, url: str) -> None:
        if not self.allow_pipe:
            raise UserError(f"shard URL {url[:60]!r} runs a shell command (webdataset pipe: URL); set data.allow_pipe: true if you mean to")


# ---------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class ShardCatalogue:
    """The shards a domain trains on and the samples each holds, in a fixed order: what the epoch order is
    built over. `keys[i]` lists shard i's selected samples (a `subset`) in tar order; None: all of them."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    keys: tuple[tuple[str, ...] | None, ...]
    unreadable: tuple[str, ...] = ()  # shards whose member list could not be read (counted 0)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def digest(self) -> str:
        """Identifies the order's input (shard names, counts, subset keys), not where the shards are: a run
        copied to an object store keeps its digest."""
        digest = hashlib.sha256()
        for url, count, keys in zip(self.urls, self.counts, self.keys):
            digest.update(f"{url.rsplit('/', 1)[-1]}|{count}|{','.join(keys) if keys is not None else '*'}\n".encode())
        return digest.hexdigest()[:16]


def shard_catalogue(spec: ShardsConfig, access: ShardAccess = ShardAccess(), domain: str = "shards") -> ShardCatalogue:
    """The catalogue of a run directory (committed shards, counts from their markers, a subset's keys), or of
    a glob / brace pattern / URL list (counts read from each tar's member list)."""
    path = _normalised(spec.path)
    store = _run_store(path)
    if store is not None:
        return _run_dir_catalogue(store, spec.subset, spec.subset_order)
    urls = _pattern_urls(path, spec, access)
    counts, unreadable, first_error = [], [], ""
    for url in urls:
        try:
            counts.append(count_samples(url, access))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable tar is skipped and named
            counts.append(0)
            unreadable.append((url, one_line(exc, limit=160)))
            first_error = first_error or f"{type(exc).__name__}: {one_line(exc, limit=160)} in {url}"
    if not any(counts):
        reason = f"first error: {first_error}" if first_error else f"first error: no samples in {urls[0]}"
        raise DataError(f"{domain} data: every shard read failed ({len(unreadable)} of {len(urls)} unreadable, none holds a sample); {reason}")
    for url, error in unreadable:
        log.warning("%s data: skipped shard %s (cannot read its member list: %s)", domain, url, error)
    return ShardCatalogue(tuple(urls), tuple(counts), (None,) * len(urls), tuple(url for url, _ in unreadable))


def resolve_shards(spec: ShardsConfig, access: ShardAccess = ShardAccess()) -> tuple[list[str], set[str] | None]:
    """Shard URLs (committed shards only, for a run directory) and, for `subset`, the keys of the first N
    manifest samples (None: all samples). Evaluation reads these whole."""
    path = _normalised(spec.path)
    store = _run_store(path)
    if store is None:
        return _pattern_urls(path, spec, access), None
    catalogue = _run_dir_catalogue(store, spec.subset, spec.subset_order)
    if spec.subset is None:
        return list(catalogue.urls), None
    return list(catalogue.urls), {key for keys in catalogue.keys for key in keys or ()}


def count_samples(url: str, access: ShardAccess) -> int:
    """Samples in a tar by webdataset's key rule, from its member headers (seeks past the data where the
    stream allows; a pipe is read through)."""
    with access.open(url) as stream:
        seekable = getattr(stream, "seekable", lambda: False)()
        with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar:
            keys, last = 0, None
            for member in tar:
                match = _KEY.match(member.name)
                if member.isfile() and match and match.group(1) != last:
                    keys, last = keys + 1, match.group(1)
            return keys


def _normalised(path: str) -> str:
    path = path.strip()
    return path if is_url(path) or path.startswith("pipe:") else str(Path(path).expanduser())


def _run_store(path: str) -> Store | None:
    """The run directory at `path`, or None for a pattern, a pipe or a single file."""
    if path.startswith("pipe:") or any(ch in path for ch in "*?[{"):
        return None
    store = Store(path)
    return store if store.exists(RUN_RECORD) or store.fs.isdir(store.root) else None


def _pattern_urls(path: str, spec: ShardsConfig, access: ShardAccess) -> list[str]:
    if path.startswith("pipe:"):
        access.check_pipe(path)
    if spec.subset:
        raise UserError(f"shards.subset needs a run directory (with its manifest), not a pattern ({path})")
    if path.startswith(("pipe:", "http://", "https://")):  # no listing over http or a pipe: take the pattern as it is
        return list(braceexpand.braceexpand(path))
    if any(ch in path for ch in "*?["):
        fs, pattern = filesystem(path)
        urls = [_url(fs, match) for match in sorted(fs.glob(pattern))]
    else:
        urls = [p for p in braceexpand.braceexpand(path) if _is_file(p)]
    if not urls:
        raise UserError(f"no shards matched {path}; give a run directory, a glob (runs/x/shards/*.tar) or a brace pattern (shards/{{000000..000009}}.tar)")
    return urls


def _url(fs, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _is_file(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isfile(path)


def _run_dir_catalogue(store: Store, subset: int | None, order: str = "manifest") -> ShardCatalogue:
    root = store.url
    record = _run_record(store)
    committed = committed_shards(store, record["samples_per_shard"])
    if not committed:
        raise UserError(f"no shards matched in {root}: no committed shard yet (run `dreamshard generate` first)")
    markers = sum(1 for name in store.list("index") if name.endswith(".commit.json"))
    if markers > len(committed):
        log.warning(
            "%s: %d of its %d commit markers do not match their files or the run record (samples_per_shard %d); those shards are left out: "
            "`dreamshard verify %s` names them",
            root, markers - len(committed), markers, record["samples_per_shard"], root,
        )  # fmt: skip
    if subset is None:
        shards = sorted(committed)
        return ShardCatalogue(tuple(store.url_of(shard_tar(s)) for s in shards), tuple(committed[s]["count"] for s in shards), (None,) * len(shards))
    try:
        by_shard = subset_by_shard(store, subset, order)
    except ValueError as exc:
        raise UserError(f"shards.subset: {exc} of {root}") from None
    missing = [s for s in by_shard if s not in committed]
    if missing:
        raise UserError(f"{root}: shard {missing[0]} holds manifest samples but is not committed; re-run generate to finish it")
    return ShardCatalogue(
        tuple(store.url_of(shard_tar(s)) for s in by_shard), tuple(len(keys) for keys in by_shard.values()), tuple(tuple(k) for k in by_shard.values())
    )


def _run_record(store: Store) -> dict:
    try:
        return checked_run_record(store)
    except FileNotFoundError:
        raise UserError(f"{store.url} is not a dreamshard run directory (no dreamshard.json); pass a glob of its .tar files instead") from None
    except BadRunRecord as exc:
        raise UserError(f"{exc}; `dreamshard repair {store.url}` restores or rebuilds it") from None


# ------------------------------------------------------------------------------------------- health


class StreamHealth:
    """What one DataLoader worker found unreadable in one domain: bad shards (each named once), shards cut
    short, unusable samples. Raises DataError past the budget: no shard yielded a sample after several
    failed, more than `max_bad_fraction` of the shards read so far failed, or no sample is usable at all."""

    def __init__(self, domain: str, max_bad_fraction: float, num_shards: int, num_samples: int = MAX_UNUSABLE_SAMPLES):
        self.domain, self.max_bad_fraction = domain, max_bad_fraction
        self.judge_after = min(MIN_SHARD_ATTEMPTS, max(num_shards, 1))  # distinct shards read before a fraction is judged
        self.unusable_after = min(MAX_UNUSABLE_SAMPLES, max(num_samples, 1))
        self.missing_labels = False
        self.read: set[str] = set()  # distinct shards read (a shard read again in a later epoch counts once)
        self.bad: set[str] = set()
        self.samples = self.bad_samples = 0
        self.first_error = ""
        self.named: set[str] = set()  # shards skipped or cut short (each warned about once)

    def shard_read(self, url: str, exc: Exception | None = None) -> None:
        """A shard read whole (`exc`: what stopped it early). Judged by distinct shards: past the budget,
        DataError."""
        self.read.add(url)
        if exc is not None:
            self.bad.add(url)
            self._note(exc, url)
        if len(self.read) < self.judge_after:
            return
        if len(self.bad) == len(self.read):
            raise DataError(f"{self.domain} data: every shard read failed ({len(self.bad)} of {len(self.read)}); first error: {self.first_error}")
        if len(self.bad) > self.max_bad_fraction * len(self.read):
            raise DataError(
                f"{self.domain} data: {len(self.bad)} of {len(self.read)} shards read failed, more than data.max_bad_fraction "
                f"({self.max_bad_fraction}); first error: {self.first_error}"
            )

    def shard_short(self, url: str, read: int, expected: int) -> None:
        """A shard that ended cleanly but early (a tar cut at a member boundary): its samples are used."""
        if url not in self.named:
            self.named.add(url)
            log.warning("%s data: shard %s holds %d of the %d samples its commit marker counts (truncated?); using those", self.domain, url, read, expected)

    def sample_usable(self) -> None:
        self.samples += 1

    def sample_failed(self, exc: Exception, missing_label: bool = False) -> None:
        self.bad_samples += 1
        self.missing_labels = self.missing_labels or (missing_label and self.samples == 0)
        text = f"{type(exc).__name__}: {one_line(exc, limit=200)}"
        self.first_error = self.first_error or text
        if self.bad_samples <= 3:
            log.warning("%s data: skipped a sample (%s)", self.domain, text)
        if self.samples == 0 and self.bad_samples >= self.unusable_after:
            raise DataError(f"{self.domain} data: none of the first {self.bad_samples} samples is usable; {self.reason()}")

    def reason(self) -> str:
        if self.missing_labels:
            return "no sample has seg.png: a labelled domain (supervised_synthetic target, shards as source) needs label-keeping shards (img2img / controlnet_seg / depth2img)"
        return f"first error: {self.first_error or 'none recorded'}"

    def _note(self, exc: Exception, url: str) -> None:
        # webdataset appends (stream, url) to the exception's args: name the url, not the stream object.
        text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else one_line(exc, limit=200)
        text = f"{type(exc).__name__}: {text[:200]} in {url}"
        self.first_error = self.first_error or text
        if url not in self.named:
            self.named.add(url)
            log.warning("%s data: skipped shard %s (%s)", self.domain, url, text)


# ------------------------------------------------------------------------------------------- reader


class ShardReader:
    """Samples by (shard, ordinal) for one DataLoader worker: a shard is read whole on first use (one
    sequential read, which suits object stores and http) and kept while its block is read, in an LRU of
    `capacity` shards. A shard's unreadable rest reads as None."""

    def __init__(self, catalogue: ShardCatalogue, access: ShardAccess, health: StreamHealth, capacity: int = 2):
        self.catalogue, self.access, self.health, self.capacity = catalogue, access, health, capacity
        self.cache: OrderedDict[int, list[dict | None]] = OrderedDict()

    def sample(self, shard: int, ordinal: int) -> dict | None:
        samples = self.cache.get(shard)
        if samples is None:
            samples = self.cache[shard] = self._read(shard)
            while len(self.cache) > max(self.capacity, 1):
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(shard)
        return samples[ordinal] if ordinal < len(samples) else None

    def _read(self, shard: int) -> list[dict | None]:
        url, expected, keys = self.catalogue.urls[shard], self.catalogue.counts[shard], self.catalogue.keys[shard]
        failures: list[Exception] = []
        samples: list[dict] = []
        try:
            with self.access.open(url) as stream:
                samples = list(tar_samples([(url, stream)], handler=functools.partial(_keep, failures)))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - counted; StreamHealth stops the stream past its budget
            failures.append(exc)
        self.health.shard_read(url, failures[0] if failures else None)
        if keys is not None:
            by_key = {sample["__key__"]: sample for sample in samples}
            return [by_key.get(key) for key in keys]
        if not failures and len(samples) < expected:
            self.health.shard_short(url, len(samples), expected)
        return list(samples)


def _keep(failures: list[Exception], exc: Exception) -> bool:
    failures.append(exc)
    return True
