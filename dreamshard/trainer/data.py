"""Training and evaluation data: engine shards streamed with WebDataset, labelled folder datasets, and the
weak augmentation (resize, random crop, flip). Workers batch uint8 tensors; the loop normalises on device.

Training streams never end: shards are drawn with replacement (`resampled`, the default) or split by node
and worker and repeated, and `with_epoch` fixes how many batches each rank takes, so every DDP rank runs the
same number of steps whatever the shard sizes. A corrupt shard or sample is skipped and counted (each batch
carries its worker's count), never retried or slept on.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from dreamshard.config import DomainConfig, RCSConfig, ShardsConfig, TrainDataConfig
from dreamshard.engine.manifest import committed_shards, read_manifest, read_run_record
from dreamshard.engine.writer import Store, shard_tar
from dreamshard.errors import UserError
from dreamshard.trainer.labels import IGNORE_INDEX
from dreamshard.trainer.sources import LabelledSource, open_source, scan

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
LABEL_KEY = "seg.png"
CROP_TRIES = 10  # mmseg RandomCrop / DAFormer RCS re-crop attempts


# --------------------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Augment:
    """Weak augmentation of one sample: resize, random crop (padded when too small), horizontal flip."""

    resize: tuple[int, int] | None  # (width, height)
    crop: tuple[int, int]  # (height, width)
    flip: bool
    cat_max_ratio: float = 1.0  # labelled crops: re-crop until no class covers more than this

    def decode(self, data: bytes) -> Image.Image:
        """Decode an image; JPEGs decode at a reduced scale (DCT scaling) when the resize allows it."""
        image = Image.open(io.BytesIO(data))
        if self.resize and image.format == "JPEG":
            image.draft("RGB", self.resize)
        return image.convert("RGB")

    def __call__(self, image: Image.Image, label: np.ndarray | None, rng: np.random.Generator, focus: int | None = None, min_focus: int = 0):
        """(uint8 CHW image, uint8 HW label or None). With `focus`, re-crop until the crop has > `min_focus`
        pixels of that class (RCS)."""
        if self.resize and image.size != self.resize:
            image = image.resize(self.resize, Image.BILINEAR)
        if label is not None and label.shape != (image.height, image.width):
            label = np.asarray(Image.fromarray(label).resize(image.size, Image.NEAREST))
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


def collate(samples: list[tuple[torch.Tensor, torch.Tensor | None]], skipped: int = 0) -> dict:
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


def resolve_shards(spec: ShardsConfig) -> tuple[list[str], set[str] | None]:
    """Shard URLs of a run directory (committed shards only), glob, brace pattern, tar file or URL list; and
    for `subset` the keys of the first N manifest samples (None: all samples)."""
    path = spec.path.strip()
    if re.match(r"^(https?|pipe|s3|gs|gcs):", path):
        urls = list(braceexpand.braceexpand(path))
        if spec.subset:
            raise UserError(f"shards.subset needs a run directory (with its manifest), not URLs ({path})")
        return urls, None
    if Path(path).expanduser().is_dir():
        return _run_dir_shards(Path(path).expanduser(), spec.subset, spec.subset_order)
    if spec.subset:
        raise UserError(f"shards.subset needs a run directory (with its manifest), not a pattern ({path})")
    if any(ch in path for ch in "*?["):
        urls = sorted(glob.glob(str(Path(path).expanduser()), recursive=True))
    else:
        urls = [p for p in braceexpand.braceexpand(str(Path(path).expanduser())) if Path(p).is_file()]
    if not urls:
        raise UserError(f"no shards matched {path}; give a run directory, a glob (runs/x/shards/*.tar) or a brace pattern (shards/{{000000..000009}}.tar)")
    return urls, None


def _run_dir_shards(root: Path, subset: int | None, order: str = "manifest") -> tuple[list[str], set[str] | None]:
    store = Store(root)
    record = read_run_record(store)
    if record is None:
        raise UserError(f"{root} is not a dreamshard run directory (no dreamshard.json); pass a glob of its .tar files instead")
    committed = committed_shards(store, int(record.get("samples_per_shard", 1)))
    if not committed:
        raise UserError(f"no shards matched in {root}: no committed shard yet (run `dreamshard generate` first)")
    if subset is None:
        return [str(root / shard_tar(s)) for s in sorted(committed)], None
    manifest = read_manifest(root).select(["key", "index", "shard", "class_name"]).sort_by("index")
    if manifest.num_rows < subset:
        raise UserError(f"shards.subset {subset} is larger than the {manifest.num_rows} samples in {root}'s manifest")
    if order == "stratified":
        manifest = manifest.take(stratified_order(manifest.column("class_name").to_pylist()))
    first = manifest.slice(0, subset).to_pydict()
    shards = sorted(set(first["shard"]))
    missing = [s for s in shards if s not in committed]
    if missing:
        raise UserError(f"{root}: shard {missing[0]} holds manifest samples but is not committed; re-run generate to finish it")
    return [str(root / shard_tar(s)) for s in shards], set(first["key"])


def stratified_order(class_names: list[str]) -> list[int]:
    """Positions ordered so that every prefix holds the classes as evenly as the data allows: each class's
    k-th sample comes before any class's (k+1)-th, ties by position. One fixed order, so prefixes nest."""
    seen: dict[str, int] = {}
    rank = []
    for name in class_names:
        rank.append(seen.get(name, 0))
        seen[name] = rank[-1] + 1
    return sorted(range(len(class_names)), key=lambda i: (rank[i], i))


class SkipCounter:
    """Exception handler for webdataset stages: skip the shard/sample, count it, log only the first few."""

    def __init__(self, domain: str):
        self.domain, self.count = domain, 0

    def __call__(self, exc: Exception) -> bool:
        self.count += 1
        if self.count <= 3:
            log.warning("%s data: skipped a corrupt shard or sample (%s)", self.domain, str(exc).splitlines()[0][:200])
        return True


def shard_pipeline(urls: list[str], keys: set[str] | None, augment: Augment, labelled: bool, batch_size: int, spec: ShardsConfig, seed: int, domain: str) -> wds.DataPipeline:
    """An endless stream of batches from shards (per rank and worker)."""
    skips = SkipCounter(domain)
    if spec.resampled:
        # rank*1000 + worker (webdataset's worker seed) mixed with our seed: distinct, reproducible streams.
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), _check_split, wds.split_by_node, wds.split_by_worker]
    stages += [wds.tarfile_to_samples(handler=skips)]
    if keys is not None:
        stages.append(wds.select(lambda sample: sample["__key__"] in keys))
    if spec.shuffle_buffer:
        stages.append(wds.shuffle(spec.shuffle_buffer, initial=min(100, spec.shuffle_buffer), seed=seed))
    decode = ShardDecoder(augment, labelled, seed)
    stages += [
        wds.map(decode, handler=skips),
        wds.batched(batch_size, collation_fn=lambda samples: collate(samples, skips.count), partial=False),
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

    def __init__(self, augment: Augment, labelled: bool, seed: int):
        self.augment, self.labelled, self.seed, self.rng = augment, labelled, seed, None

    def __call__(self, sample: dict):
        if self.rng is None:
            self.rng = worker_rng(self.seed, wds.utils.pytorch_worker_info()[0])
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"sample {sample.get('__key__')} has no image field")
        image = self.augment.decode(sample[image_key])
        label = None
        if self.labelled:
            if LABEL_KEY not in sample:
                raise ValueError(f"sample {sample.get('__key__')} has no {LABEL_KEY}")
            label = np.asarray(Image.open(io.BytesIO(sample[LABEL_KEY])))  # mode L train ids, no conversion
        return self.augment(image, label, self.rng)


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
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".partial")
    tmp.write_text(json.dumps(stats))
    tmp.replace(cache)
    return stats


# ------------------------------------------------------------------------------------------ loaders


def open_folder(domain: DomainConfig) -> LabelledSource:
    return scan(open_source(domain.folder))


def train_loader(name: str, domain: DomainConfig, data: TrainDataConfig, labelled: bool, seed: int, batches: int, rcs: RCSConfig | None = None, cache_dir: Path | None = None) -> wds.WebLoader:
    """A loader that yields exactly `batches` batches on this rank (dict: image uint8 BCHW, label uint8 BHW)."""
    augment = Augment(domain.resize, tuple(data.crop_size), data.flip, data.cat_max_ratio if labelled else 1.0)
    if domain.shards is not None:
        urls, keys = resolve_shards(domain.shards)
        dataset = shard_pipeline(urls, keys, augment, labelled, data.batch_size, domain.shards, seed, name)
    else:
        source = open_folder(domain)
        sampler = RareClassSampler(class_stats(source, cache_dir), rcs) if rcs is not None and rcs.enabled else None
        dataset = FolderStream(source, augment, data.batch_size, seed, sampler)
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=data.workers, persistent_workers=False)
    return loader.with_epoch(batches)


class EvalSet(Dataset):
    """Whole labelled images for evaluation: (uint8 CHW image at the model's input size, uint8 HW label)."""

    def __init__(self, domain: DomainConfig):
        self.resize = domain.resize
        if domain.folder is not None:
            self.source = open_folder(domain)
            self.items: list = list(self.source.items)
        else:
            urls, keys = resolve_shards(domain.shards)
            self.source = None
            self.items = [s for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if keys is None or s["__key__"] in keys]
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
        if self.resize and image.size != tuple(self.resize):
            image = image.resize(tuple(self.resize), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), torch.from_numpy(np.array(label))


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Train ids must be < num_classes or 255: anything else means the label map does not fit the data."""
    bad = (labels != IGNORE_INDEX) & (labels >= num_classes)
    if bad.any():
        values = sorted(set(labels[bad].unique().tolist()))[:5]
        raise UserError(f"{where}: label ids {values} are outside the {num_classes} classes (model.num_classes) and not 255; check the label map or num_classes")

