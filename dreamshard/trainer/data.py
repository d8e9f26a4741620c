"""Training and evaluation data: engine shards streamed with WebDataset, labelled folder datasets, and the
weak augmentation (resize, random crop, flip). Workers batch uint8 tensors; the loop normalises on device.

Training streams never end: shards are drawn with replacement (`resampled`, the default) or split by node
and worker and repeated, and `with_epoch` fixes how many batches each rank takes, so every DDP rank runs the
same number of steps whatever the shard sizes. A corrupt shard or sample is skipped and counted (each batch
carries its worker's count), never retried or slept on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import fsspec
import numpy as np
import torch
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from dreamshard.config import DomainConfig, RCSConfig, ShardsConfig, TrainDataConfig
from dreamshard.datasets.labels import IGNORE_INDEX
from dreamshard.datasets.sources import LabelledSource, open_source, scan
from dreamshard.errors import RunFailure, UserError, one_line
from dreamshard.format.layout import LABEL_FIELD, RUN_RECORD, shard_tar
from dreamshard.format.reader import BadRunRecord, checked_run_record, committed_shards, subset_keys, tar_samples
from dreamshard.format.store import Store, atomic_write, filesystem, is_url

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
LABEL_KEY = LABEL_FIELD
CROP_TRIES = 10  # mmseg RandomCrop / DAFormer RCS re-crop attempts
OPEN_RETRIES = (0.5, 1.0, 2.0)  # back-off seconds between attempts to open a shard (transient errors)


# --------------------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Augment:
    """Weak augmentation of one sample: resize, random crop (padded when too small), horizontal flip."""

    resize: tuple[int, int] | None  # (height, width), as every size in dreamshard configs
    crop: tuple[int, int]  # (height, width)
    flip: bool
    cat_max_ratio: float = 1.0  # labelled crops: re-crop until no class covers more than this

    def decode(self, data: bytes) -> Image.Image:
        """Decode an image; JPEGs decode at a reduced scale (DCT scaling) when the resize allows it."""
        image = Image.open(io.BytesIO(data))
        if self.resize and image.format == "JPEG":
            image.draft("RGB", pil_size(self.resize))
        return image.convert("RGB")

    def __call__(self, image: Image.Image, label: np.ndarray | None, rng: np.random.Generator, focus: int | None = None, min_focus: int = 0):
        """(uint8 CHW image, uint8 HW label or None). With `focus`, re-crop until the crop has > `min_focus`
        pixels of that class (RCS)."""
        if self.resize and image.size != pil_size(self.resize):
            image = image.resize(pil_size(self.resize), Image.Resampling.BILINEAR)
        if label is not None and label.shape != (image.height, image.width):
            label = np.asarray(Image.fromarray(label).resize(image.size, Image.Resampling.NEAREST))
        pixels = np.asarray(image)
        pixels, label = pad_to(pixels, label, self.crop)
        top, left = self.crop_origin(pixels.shape[:2], label, rng, focus, min_focus)
        ch, cw = self.crop
        pixels = pixels[top : top + ch, left : left + cw]
        label = label[top : top + ch, left : left + cw] if label is not None else None
        if self.flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
            label = label[:, ::-1] if label is not None else None
        image_t = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        # np.array copies: crops of PIL-backed arrays are read-only, and torch must not share them.
        return image_t, (torch.from_numpy(np.array(label)) if label is not None else None)

    def crop_origin(self, size: tuple[int, int], label: np.ndarray | None, rng: np.random.Generator, focus: int | None, min_focus: int) -> tuple[int, int]:
        (h, w), (ch, cw) = size, self.crop
        origin = (0, 0)
        for _ in range(CROP_TRIES):
            origin = (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)))
            if label is None:
                return origin
            window = label[origin[0] : origin[0] + ch, origin[1] : origin[1] + cw]
            if focus is not None:
                if (window == focus).sum() > min_focus:
                    return origin
            elif self.cat_max_ratio >= 1 or _largest_class_share(window) <= self.cat_max_ratio:
                return origin
        return origin


def pil_size(height_width: tuple[int, int]) -> tuple[int, int]:
    """Config sizes are (height, width); PIL takes (width, height)."""
    return (int(height_width[1]), int(height_width[0]))


def _largest_class_share(label: np.ndarray) -> float:
    counts = np.bincount(label.ravel(), minlength=256)[:IGNORE_INDEX]
    return counts.max() / counts.sum() if counts.sum() else 0.0


def pad_to(pixels: np.ndarray, label: np.ndarray | None, crop: tuple[int, int]):
    """Pad bottom/right to at least the crop size: image with 0, label with 255 (mmseg's pad values)."""
    h, w = pixels.shape[:2]
    dh, dw = max(0, crop[0] - h), max(0, crop[1] - w)
    if dh or dw:
        pixels = np.pad(pixels, ((0, dh), (0, dw), (0, 0)))
        if label is not None:
            label = np.pad(label, ((0, dh), (0, dw)), constant_values=IGNORE_INDEX)
    return pixels, label


def collate(samples: list[tuple[torch.Tensor, torch.Tensor | None]], skipped: tuple[int, int] = (0, 0)) -> dict:
    batch = {"image": torch.stack([s[0] for s in samples])}
    if samples[0][1] is not None:
        batch["label"] = torch.stack([s[1] for s in samples])
    info = get_worker_info()
    batch["worker"] = info.id if info else 0
    batch["skipped"] = skipped
    return batch


def worker_rng(seed: int, *parts: int) -> np.random.Generator:
    """A generator distinct per (seed, rank, resume step, ...) and DataLoader worker."""
    info = get_worker_info()
    return np.random.default_rng([seed, *parts, info.id if info else 0])


# ------------------------------------------------------------------------------------------- shards


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


def resolve_shards(spec: ShardsConfig, access: ShardAccess = ShardAccess()) -> tuple[list[str], set[str] | None]:
    """Shard URLs of a run directory (committed shards only), glob, brace pattern, tar file or URL list, on
    the local disk or any fsspec filesystem; and for `subset` the keys of the first N manifest samples
    (None: all samples)."""
    path = spec.path.strip()
    if path.startswith("pipe:"):
        access.check_pipe(path)
        if spec.subset:
            raise UserError(f"shards.subset needs a run directory (with its manifest), not a pipe: URL ({path})")
        return list(braceexpand.braceexpand(path)), None
    if not is_url(path):
        path = str(Path(path).expanduser())
    if not any(ch in path for ch in "*?[{"):
        store = Store(path)
        if store.exists(RUN_RECORD) or store.fs.isdir(store.root):
            return _run_dir_shards(store, spec.subset, spec.subset_order)
    if spec.subset:
        raise UserError(f"shards.subset needs a run directory (with its manifest), not a pattern ({path})")
    if path.startswith(("http://", "https://")):  # no listing over http: take the pattern as it is
        return list(braceexpand.braceexpand(path)), None
    if any(ch in path for ch in "*?["):
        fs, pattern = filesystem(path)
        urls = [_url(fs, match) for match in sorted(fs.glob(pattern))]
    else:
        urls = [p for p in braceexpand.braceexpand(path) if _is_file(p)]
    if not urls:
        raise UserError(f"no shards matched {path}; give a run directory, a glob (runs/x/shards/*.tar) or a brace pattern (shards/{{000000..000009}}.tar)")
    return urls, None


def _url(fs, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _is_file(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isfile(path)


def _run_dir_shards(store: Store, subset: int | None, order: str = "manifest") -> tuple[list[str], set[str] | None]:
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
        return [store.url_of(shard_tar(s)) for s in sorted(committed)], None
    try:
        shards, keys = subset_keys(store, subset, order)
    except ValueError as exc:
        raise UserError(f"shards.subset: {exc} of {root}") from None
    missing = [s for s in shards if s not in committed]
    if missing:
        raise UserError(f"{root}: shard {missing[0]} holds manifest samples but is not committed; re-run generate to finish it")
    return [store.url_of(shard_tar(s)) for s in shards], keys


def _run_record(store: Store) -> dict:
    try:
        return checked_run_record(store)
    except FileNotFoundError:
        raise UserError(f"{store.url} is not a dreamshard run directory (no dreamshard.json); pass a glob of its .tar files instead") from None
    except BadRunRecord as exc:
        raise UserError(f"{exc}; `dreamshard repair {store.url}` restores or rebuilds it") from None


def expected_counts(path: str) -> dict[str, int] | None:
    """{shard url: samples} from a run directory's commit markers (None for globs, patterns and pipes)."""
    path = path.strip()
    if path.startswith("pipe:") or any(ch in path for ch in "*?[{"):
        return None
    store = Store(path if is_url(path) else str(Path(path).expanduser()))
    try:
        record = checked_run_record(store)
    except (FileNotFoundError, BadRunRecord, OSError):
        return None
    return {store.url_of(shard_tar(shard)): marker["count"] for shard, marker in committed_shards(store, record["samples_per_shard"]).items()}


class DataError(RunFailure):
    """A training stream that cannot go on: every shard failed, too many did, or no sample is usable."""


MIN_SHARD_ATTEMPTS = 8  # shards read before a failure fraction is judged
MAX_UNUSABLE_SAMPLES = 64  # samples read with none usable before the stream gives up


class StreamHealth:
    """Webdataset error handler of one domain's stream (per DataLoader worker): a bad shard or sample is
    skipped, counted and logged (each shard once, named), until the budget is spent: no shard yielded a
    sample after several failed, more than `max_bad_fraction` of the shards read so far failed, or no sample
    is usable at all. Then DataError, never a busy loop on a stream that cannot yield a batch. Shards are
    judged as shards (a shard is good once it yields a sample), so samples a shuffle buffer holds back do not
    make a good stream look dead."""

    def __init__(self, domain: str, max_bad_fraction: float, num_shards: int):
        self.domain, self.max_bad_fraction = domain, max_bad_fraction
        self.all_failed_after = min(MIN_SHARD_ATTEMPTS, max(num_shards, 1))  # failures with no good shard: all bad
        self.shards = self.bad_shards = self.good_shards = self.short_shards = self.samples = self.bad_samples = 0
        self.first_error = ""
        self._named: set[str] = set()  # shards already warned about (a resampled stream draws them again)

    @property
    def skipped(self) -> tuple[int, int]:
        """(shards skipped or cut short, samples skipped), reported in each batch."""
        return self.bad_shards + self.short_shards, self.bad_samples

    def shard_opened(self) -> None:
        self.shards += 1

    def shard_good(self) -> None:
        self.good_shards += 1

    def shard_failed(self, exc: Exception, url: str = "") -> bool:
        self.bad_shards += 1
        self.shards = max(self.shards, self.bad_shards)
        self._note(exc, "shard", url)
        if self.good_shards == 0 and self.bad_shards >= self.all_failed_after:
            raise DataError(f"{self.domain} data: every shard read failed ({self.bad_shards} of {self.shards}); first error: {self.first_error}")
        if self.shards >= MIN_SHARD_ATTEMPTS and self.bad_shards > self.max_bad_fraction * self.shards:
            raise DataError(
                f"{self.domain} data: {self.bad_shards} of {self.shards} shards read failed, more than data.max_bad_fraction "
                f"({self.max_bad_fraction}); first error: {self.first_error}"
            )
        return True

    def shard_short(self, url: str, read: int, expected: int) -> None:
        """A shard that ended cleanly but early (a tar cut at a member boundary): its samples are used."""
        self.short_shards += 1
        if url not in self._named:
            self._named.add(url)
            log.warning("%s data: shard %s holds %d of the %d samples its commit marker counts (truncated?); using those", self.domain, url, read, expected)

    def sample_decoded(self) -> None:
        self.samples += 1

    def sample_failed(self, exc: Exception) -> bool:
        self.bad_samples += 1
        self._note(exc, "sample")
        if self.samples == 0 and self.bad_samples >= MAX_UNUSABLE_SAMPLES:
            reason = self.first_error
            if isinstance(exc, MissingLabel):
                reason = f"no sample has {LABEL_KEY}: a labelled domain (supervised_synthetic target, shards as source) needs label-keeping shards (img2img / controlnet_seg / depth2img)"
            raise DataError(f"{self.domain} data: none of the first {self.bad_samples} samples is usable; {reason}")
        return True

    def _note(self, exc: Exception, what: str, url: str = "") -> None:
        # webdataset appends (stream, url) to the exception's args: name the url, not the stream object.
        text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else one_line(exc, limit=200)
        url = url or (exc.args[-1] if len(exc.args) > 1 and isinstance(exc.args[-1], str) else "")
        text = f"{type(exc).__name__}: {text[:200]}" + (f" in {url}" if url else "")
        self.first_error = self.first_error or text
        if what == "shard" and url not in self._named:
            self._named.add(url)
            log.warning("%s data: skipped shard %s (%s)", self.domain, url or "?", text)
        elif what == "sample" and self.bad_samples <= 3:
            log.warning("%s data: skipped a corrupt sample (%s)", self.domain, text)


class MissingLabel(ValueError):
    pass


def shard_samples(urls, health: StreamHealth, access: ShardAccess, expected: dict[str, int] | None = None):
    """Webdataset stage: dicts with `url` → sample dicts (key + fields) of each shard, through fsspec. With
    `expected` ({url: samples}, from a run directory's commit markers) a shard that ends early is named."""
    for item in urls:
        url = item["url"]
        health.shard_opened()
        try:
            stream = access.open(url)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - counted; StreamHealth stops the stream past its budget
            health.shard_failed(exc, url)
            continue
        read, failures = 0, health.bad_shards
        for sample in tar_samples([(url, stream)], handler=functools.partial(health.shard_failed, url=url)):
            read += 1
            if read == 1:
                health.shard_good()
            yield sample
        want = (expected or {}).get(url)
        if want and read < want and health.bad_shards == failures:  # ended early without an error
            health.shard_short(url, read, want)


def shard_pipeline(
    urls: list[str],
    keys: set[str] | None,
    augment: Augment,
    labelled: bool,
    batch_size: int,
    spec: ShardsConfig,
    seed: int,
    domain: str,
    max_bad_fraction: float = 0.5,
    access: ShardAccess = ShardAccess(),
    expected: dict[str, int] | None = None,
) -> wds.DataPipeline:
    """An endless stream of batches from shards (per rank and worker)."""
    health = StreamHealth(domain, max_bad_fraction, len(urls))
    if spec.resampled:
        # rank*1000 + worker (webdataset's worker seed) mixed with our seed: distinct, reproducible streams.
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), _check_split, wds.split_by_node, wds.split_by_worker]
    stages.append(lambda items: shard_samples(items, health, access, expected))
    if keys is not None:
        stages.append(wds.select(lambda sample: sample["__key__"] in keys))
    if spec.shuffle_buffer:
        stages.append(wds.shuffle(spec.shuffle_buffer, initial=min(100, spec.shuffle_buffer), seed=seed))
    stages += [
        wds.map(ShardDecoder(augment, labelled, seed, health), handler=health.sample_failed),
        wds.batched(batch_size, collation_fn=lambda samples: collate(samples, health.skipped), partial=False),
    ]
    pipeline = wds.DataPipeline(*stages)
    return pipeline if spec.resampled else pipeline.repeat()


def _check_split(urls):
    """split_by_node/worker without resampling needs a shard for every worker of every rank."""
    urls = list(urls)
    rank, world, _, workers = wds.utils.pytorch_worker_info()
    if len(urls) < world * workers:
        raise UserError(f"{len(urls)} shards cannot feed {world} ranks x {workers} workers without resampling; set shards.resampled: true")
    yield from urls


class ShardDecoder:
    """Sample dict from a tar → augmented (image, label) tensors. Labels are the mode-L `seg.png` train ids."""

    def __init__(self, augment: Augment, labelled: bool, seed: int, health: StreamHealth | None = None):
        self.augment, self.labelled, self.seed, self.health = augment, labelled, seed, health
        self.rng: np.random.Generator | None = None

    def __call__(self, sample: dict):
        if self.rng is None:
            self.rng = worker_rng(self.seed, wds.utils.pytorch_worker_info()[0])
        rng = self.rng
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"sample {sample.get('__key__')} has no image field")
        image = self.augment.decode(sample[image_key])
        label = None
        if self.labelled:
            if LABEL_KEY not in sample:
                raise MissingLabel(f"sample {sample.get('__key__')} has no {LABEL_KEY}")
            label = np.asarray(Image.open(io.BytesIO(sample[LABEL_KEY])))  # mode L train ids, no conversion
        result = self.augment(image, label, rng)
        if self.health is not None:
            self.health.sample_decoded()
        return result


# ------------------------------------------------------------------------------------------ folders


class FolderStream(IterableDataset):
    """Endless random (image, label) batches from a labelled folder dataset, uniform or rare-class sampled."""

    def __init__(self, source: LabelledSource, augment: Augment, batch_size: int, seed: int, rcs: RareClassSampler | None = None):
        self.source, self.augment, self.batch_size, self.seed, self.rcs = source, augment, batch_size, seed, rcs

    def __iter__(self) -> Iterator[dict]:
        rng = worker_rng(self.seed, wds.utils.pytorch_worker_info()[0])
        while True:
            yield collate([self.sample(rng) for _ in range(self.batch_size)])

    def sample(self, rng: np.random.Generator):
        if self.rcs is None:
            image, label = self.source.load(self.source.items[rng.integers(len(self.source))])
            return self.augment(image, label, rng)
        cls, index = self.rcs.draw(rng)
        image, label = self.source.load(self.source.items[index])
        return self.augment(image, label, rng, focus=cls, min_focus=self.rcs.min_crop_pixels)


class RareClassSampler:
    """DAFormer's RCS: class c ~ softmax((1 - f_c) / T) over the source's class frequencies, then a file with
    more than `min_pixels` pixels of c, then crops re-drawn until they hold enough of c."""

    def __init__(self, stats: list[dict[int, int]], config: RCSConfig):
        totals: dict[int, int] = {}
        for counts in stats:
            for cls, n in counts.items():
                totals[cls] = totals.get(cls, 0) + n
        classes = sorted(c for c in totals if any(counts.get(c, 0) > config.min_pixels for counts in stats))
        if not classes:
            raise UserError(f"rare class sampling: no source image has more than {config.min_pixels} pixels of any class; lower uda.rcs.min_pixels")
        freq = np.array([totals[c] for c in classes], dtype=np.float64) / sum(totals.values())
        logits = (1 - freq) / config.class_temp
        probs = np.exp(logits - logits.max())
        self.classes, self.probs = classes, probs / probs.sum()
        self.files = {c: [i for i, counts in enumerate(stats) if counts.get(c, 0) > config.min_pixels] for c in classes}
        self.min_crop_pixels = int(config.min_pixels * config.min_crop_ratio)

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        cls = self.classes[rng.choice(len(self.classes), p=self.probs)]
        files = self.files[cls]
        return cls, files[rng.integers(len(files))]


def class_stats(source: LabelledSource, cache_dir: Path) -> list[dict[int, int]]:
    """Pixels per train id of every source label (full resolution), computed once and cached as JSON."""
    digest = hashlib.sha256()
    for item in source.items:
        stat = item.label.stat()
        digest.update(f"{item.label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(source.label_map.lut.tobytes())
    cache = cache_dir / f"rcs_{digest.hexdigest()[:16]}.json"
    if cache.is_file():
        return [{int(k): v for k, v in counts.items()} for counts in json.loads(cache.read_text())]
    stats = []
    for item in source.items:
        counts = np.bincount(source.load_label(item).ravel(), minlength=256)
        stats.append({int(c): int(counts[c]) for c in np.nonzero(counts[:IGNORE_INDEX])[0]})
    atomic_write(cache, json.dumps(stats))
    return stats


# ------------------------------------------------------------------------------------------ loaders


def open_folder(domain: DomainConfig) -> LabelledSource:
    assert domain.folder is not None  # DomainConfig holds a folder or shards
    return scan(open_source(domain.folder))


def train_loader(
    name: str, domain: DomainConfig, data: TrainDataConfig, labelled: bool, seed: int, batches: int, rcs: RCSConfig | None = None, cache_dir: Path | None = None
) -> wds.WebLoader:
    """A loader that yields exactly `batches` batches on this rank (dict: image uint8 BCHW, label uint8 BHW)."""
    augment = Augment(domain.resize, data.crop_size, data.flip, data.cat_max_ratio if labelled else 1.0)
    if domain.shards is not None:
        access = ShardAccess.of(data)
        urls, keys = resolve_shards(domain.shards, access)
        expected = expected_counts(domain.shards.path)
        dataset = shard_pipeline(urls, keys, augment, labelled, data.batch_size, domain.shards, seed, name, data.max_bad_fraction, access, expected)
    else:
        source = open_folder(domain)
        sampler = RareClassSampler(class_stats(source, cache_dir or Path(data.cache_dir)), rcs) if rcs is not None and rcs.enabled else None
        dataset = FolderStream(source, augment, data.batch_size, seed, sampler)
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=data.workers, persistent_workers=False)
    return loader.with_epoch(batches)


def read_all_samples(urls: list[str], access: ShardAccess = ShardAccess()) -> list[dict]:
    """Every sample of the shards, in order; an unreadable shard is an error (an evaluation must be whole)."""
    samples: list[dict] = []
    for url in urls:
        try:
            with access.open(url) as stream:
                samples += tar_samples([(url, stream)])
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise UserError(f"cannot read evaluation shard {url} ({one_line(exc)}); fix or remove it") from None
    return samples


class EvalSet(Dataset):
    """Whole labelled images for evaluation: (uint8 CHW image at the model's input size, uint8 HW label)."""

    def __init__(self, domain: DomainConfig, access: ShardAccess = ShardAccess()):
        self.resize = domain.resize
        self.source: LabelledSource | None = None
        if domain.folder is not None:
            self.source = open_folder(domain)
            self.items: list = list(self.source.items)
        else:
            assert domain.shards is not None  # DomainConfig holds a folder or shards
            urls, keys = resolve_shards(domain.shards, access)
            self.items = [s for s in read_all_samples(urls, access) if keys is None or s["__key__"] in keys]
            if any(LABEL_KEY not in s for s in self.items):
                raise UserError(f"evaluation shards {domain.shards.path} have samples without {LABEL_KEY}; evaluate on labelled data")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[index]
        if self.source is not None:
            image, label = self.source.load(item)
        else:
            image_key = next(k for k in IMAGE_KEYS if k in item)
            image = Image.open(io.BytesIO(item[image_key])).convert("RGB")
            label = np.asarray(Image.open(io.BytesIO(item[LABEL_KEY])))
        if self.resize and image.size != pil_size(self.resize):
            image = image.resize(pil_size(self.resize), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), torch.from_numpy(np.array(label))


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Train ids must be < num_classes or 255: anything else means the label map does not fit the data."""
    bad = (labels != IGNORE_INDEX) & (labels >= num_classes)
    if bad.any():
        values = sorted(set(labels[bad].unique().tolist()))[:5]
        raise UserError(
            f"{where}: label ids {values} are outside the {num_classes} classes (model.num_classes) and not 255; check the label map or num_classes"
        )
