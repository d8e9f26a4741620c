"""Training and evaluation data: engine shards and labelled folder datasets read in the epoch order of
trainer/order.py, the weak augmentation (resize, random crop, flip), and the DataLoaders.

A training loader is map-style: item n is this rank's n-th micro-batch, whose samples are the positions the
ReadPlan gives it. The DataLoader hands items to its workers round-robin and returns them in order, so what a
rank sees depends on (seed, positions) only: not on the number of workers, ranks or restarts. Each sample's
augmentation draws from a generator seeded by its position, and rare-class sampling draws the file the same
way. Workers return uint8 tensors (labels already checked against the classes, so the loop never syncs on
them); the loop normalises on the device.

A sample that cannot be used (its shard unreadable or cut short, its image undecodable, its label missing)
is replaced by the next usable one of its block, counted in the batch (`substituted`), its shard named.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dreamshard.config import DomainConfig, RCSConfig, TrainDataConfig
from dreamshard.datasets.labels import IGNORE_INDEX
from dreamshard.datasets.sources import LabelledSource, open_source, scan
from dreamshard.errors import UserError, one_line
from dreamshard.format.layout import LABEL_FIELD
from dreamshard.format.store import atomic_write
from dreamshard.trainer.order import EpochOrder, ReadPlan, seeded, stream_id
from dreamshard.trainer.shards import (
    DataError,
    ShardAccess,
    ShardCatalogue,
    ShardReader,
    StreamHealth,
    resolve_shards,
    shard_catalogue,
)

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
LABEL_KEY = LABEL_FIELD
CROP_TRIES = 10  # mmseg RandomCrop / DAFormer RCS re-crop attempts
ORDER_DRAW, AUGMENT_DRAW, RCS_DRAW = 0, 2, 3  # sub-streams of a position's seed

__all__ = ["DataError", "ShardAccess", "resolve_shards", "shard_catalogue"]  # re-exported for callers of the old module


# --------------------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Augment:
    """Weak augmentation of one sample: resize, random crop (padded when too small), horizontal flip."""

    resize: tuple[int, int] | None  # (height, width), as every size in dreamshard configs
    crop: tuple[int, int]  # (height, width)
    flip: bool
    cat_max_ratio: float = 1.0  # labelled crops: re-crop until no class covers more than this
    decoder: str = "pil"  # shard samples: data.decoder (folder datasets are read with PIL, EXIF-aware)

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded image → resized HWC uint8 RGB. PIL decodes JPEGs at a reduced DCT scale when the resize
        allows it; torchvision.io decodes into a tensor and resizes with antialiasing."""
        if self.decoder == "torchvision":
            return self._decode_torchvision(data)
        image = Image.open(io.BytesIO(data))
        if self.resize and image.format == "JPEG":
            image.draft("RGB", pil_size(self.resize))
        return self.resized(image.convert("RGB"))

    def _decode_torchvision(self, data: bytes) -> np.ndarray:
        import torchvision.transforms.v2.functional as TF
        from torchvision.io import ImageReadMode, decode_image

        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        if self.resize and tuple(pixels.shape[-2:]) != tuple(self.resize):
            pixels = TF.resize(pixels, list(self.resize), antialias=True)
        return pixels.permute(1, 2, 0).numpy()

    def resized(self, image: Image.Image) -> np.ndarray:
        if self.resize and image.size != pil_size(self.resize):
            image = image.resize(pil_size(self.resize), Image.Resampling.BILINEAR)
        return np.asarray(image)

    def __call__(self, pixels: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, focus: int | None = None, min_focus: int = 0):
        """(uint8 CHW image, uint8 HW label or None) from HWC pixels. With `focus`, re-crop until the crop has
        > `min_focus` pixels of that class (RCS)."""
        if label is not None and label.shape != pixels.shape[:2]:
            label = np.asarray(Image.fromarray(label).resize((pixels.shape[1], pixels.shape[0]), Image.Resampling.NEAREST))
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


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Train ids must be < num_classes or 255: anything else means the label map does not fit the data."""
    bad = (labels != IGNORE_INDEX) & (labels >= num_classes)
    if bad.any():
        values = sorted(set(labels[bad].unique().tolist()))[:5]
        raise UserError(
            f"{where}: label ids {values} are outside the {num_classes} classes (model.num_classes) and not 255; check the label map or num_classes"
        )


# ------------------------------------------------------------------------------------------ samples


@dataclass
class Loaded:
    """One position's sample, decoded: HWC pixels, HW train ids (or None), its key, whether it stands in
    for the position's own sample (which was unusable), and for RCS the class its crop should hold."""

    pixels: np.ndarray
    label: np.ndarray | None
    key: str
    substituted: bool = False
    focus: int | None = None
    min_focus: int = 0


class MissingLabel(ValueError):
    pass


class ShardSamples:
    """A shard domain's samples by position (epoch order over the catalogue), with substitution."""

    def __init__(
        self,
        name: str,
        catalogue: ShardCatalogue,
        shuffle_block: int,
        seed: int,
        labelled: bool,
        augment: Augment,
        access: ShardAccess,
        max_bad_fraction: float,
    ):
        self.name, self.catalogue, self.labelled, self.augment, self.access = name, catalogue, labelled, augment, access
        self.order = EpochOrder(list(catalogue.counts), seed, stream_id(name), shuffle_block)
        self.health = StreamHealth(name, max_bad_fraction, len(catalogue.urls), catalogue.total)
        self.health.named.update(catalogue.unreadable)
        self._reader: ShardReader | None = None  # made in the worker process that uses it
        self._unusable: set[tuple[int, int]] = set()  # (shard, ordinal) found unusable: not decoded or counted twice

    @property
    def epoch_samples(self) -> int:
        return self.order.total

    def digest(self) -> str:
        return self.catalogue.digest()

    def load(self, position: int, rng: np.random.Generator) -> Loaded:
        """The sample at `position`, or the next usable one of its block (then of the blocks after it)."""
        address = self.order.address(position)
        epoch_end = (address.epoch + 1) * self.order.total
        offset = position - address.block_start
        for tries in range(self.order.total):
            if tries < address.block_size:
                candidate = address.block_start + (offset + tries) % address.block_size
            else:  # the whole block is unusable: the samples after it, through the epoch
                candidate = address.block_start + address.block_size + tries - address.block_size
                candidate = candidate if candidate < epoch_end else candidate - self.order.total
            loaded = self._usable(candidate)
            if loaded is not None:
                loaded.substituted = tries > 0
                return loaded
        raise DataError(f"{self.name} data: no usable sample in any shard; {self.health.reason()}")

    def _usable(self, position: int) -> Loaded | None:
        address = self.order.address(position)
        if (address.shard, address.ordinal) in self._unusable:
            return None
        reader = self.reader()
        reader.capacity = max(reader.capacity, self.order.max_block_shards + 1)
        sample = reader.sample(address.shard, address.ordinal)
        if sample is None:
            self._unusable.add((address.shard, address.ordinal))
            return None
        try:
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            if image_key is None:
                raise ValueError(f"sample {sample.get('__key__')} has no image field")
            if self.labelled and LABEL_KEY not in sample:
                raise MissingLabel(f"sample {sample.get('__key__')} has no {LABEL_KEY}")
            label = np.asarray(Image.open(io.BytesIO(sample[LABEL_KEY]))) if self.labelled else None  # mode L train ids
            loaded = Loaded(self.augment.decode(sample[image_key]), label, str(sample["__key__"]))
        except Exception as exc:  # noqa: BLE001 - an undecodable sample is skipped like an unreadable one
            self._unusable.add((address.shard, address.ordinal))
            self.health.sample_failed(exc, isinstance(exc, MissingLabel))
            return None
        self.health.sample_usable()
        return loaded

    def reader(self) -> ShardReader:
        if self._reader is None:
            self._reader = ShardReader(self.catalogue, self.access, self.health)
        return self._reader

    def problems(self) -> tuple[str, ...]:
        """Shards skipped or cut short so far (in this worker)."""
        return tuple(sorted(self.health.named))


class FolderSamples:
    """A labelled folder dataset's samples by position: a permutation of its items per epoch, or with rare
    class sampling a (class, file) drawn from the position's own generator."""

    def __init__(self, name: str, source: LabelledSource, seed: int, rcs: RareClassSampler | None, augment: Augment):
        self.name, self.source, self.rcs, self.augment = name, source, rcs, augment
        self.order = EpochOrder([len(source)], seed, stream_id(name), shuffle_block=len(source))

    @property
    def epoch_samples(self) -> int:
        return self.order.total

    def digest(self) -> str:
        return hashlib.sha256("\n".join(item.key for item in self.source.items).encode()).hexdigest()[:16]

    def load(self, position: int, rng: np.random.Generator) -> Loaded:
        focus = None
        if self.rcs is None:
            index = self.order.address(position).ordinal
        else:
            focus, index = self.rcs.draw(rng)
        item = self.source.items[index]
        image, label = self.source.load(item)
        return Loaded(self.augment.resized(image), label, item.key, focus=focus, min_focus=self.rcs.min_crop_pixels if self.rcs else 0)

    def problems(self) -> tuple[str, ...]:
        return ()


class RankBatches(Dataset):
    """Item n: this rank's n-th micro-batch of one domain (dict: image uint8 BCHW, label uint8 BHW, keys,
    substituted, problems)."""

    def __init__(self, samples: ShardSamples | FolderSamples, plan: ReadPlan, seed: int, num_classes: int | None):
        self.samples, self.plan, self.seed, self.num_classes = samples, plan, seed, num_classes
        self.stream = stream_id(samples.name)

    def __len__(self) -> int:
        return self.plan.batches

    def __getitem__(self, batch: int) -> dict:
        images, labels, keys, substituted = [], [], [], 0
        for position in self.plan.positions(batch):
            rng = seeded(self.seed, self.stream, position, AUGMENT_DRAW)
            loaded = self.samples.load(position, rng)
            image, label = self.samples.augment(loaded.pixels, loaded.label, rng, focus=loaded.focus, min_focus=loaded.min_focus)
            images.append(image)
            labels.append(label)
            keys.append(loaded.key)
            substituted += loaded.substituted
        batch_out = {"image": torch.stack(images), "keys": keys, "substituted": substituted, "problems": self.samples.problems()}
        if labels[0] is not None:
            batch_out["label"] = torch.stack(labels)
            if self.num_classes is not None:
                check_labels(batch_out["label"], self.num_classes, f"{self.samples.name} data")
        return batch_out


# ------------------------------------------------------------------------------------------ folders


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


def domain_samples(
    name: str, domain: DomainConfig, data: TrainDataConfig, labelled: bool, seed: int, rcs: RCSConfig | None = None, cache_dir: Path | None = None
) -> ShardSamples | FolderSamples:
    """One domain's samples in the epoch order of `seed`."""
    augment = Augment(domain.resize, data.crop_size, data.flip, data.cat_max_ratio if labelled else 1.0, data.decoder)
    if domain.shards is not None:
        access = ShardAccess.of(data)
        catalogue = shard_catalogue(domain.shards, access, name)
        return ShardSamples(name, catalogue, domain.shards.shuffle_block, seed, labelled, augment, access, data.max_bad_fraction)
    source = open_folder(domain)
    sampler = RareClassSampler(class_stats(source, cache_dir or Path(data.cache_dir)), rcs) if rcs is not None and rcs.enabled else None
    return FolderSamples(name, source, seed, sampler, augment)


def train_loader(
    samples: ShardSamples | FolderSamples, data: TrainDataConfig, plan: ReadPlan, seed: int, num_classes: int | None = None, pin_memory: bool = False
) -> DataLoader:
    """This rank's micro-batches of one domain, `plan.batches` of them, in order."""
    workers = data.workers
    return DataLoader(
        RankBatches(samples, plan, seed, num_classes),
        batch_size=None,
        sampler=range(plan.batches),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )


def batch_stream(name: str, domain: DomainConfig, data: TrainDataConfig, labelled: bool, seed: int, plan: ReadPlan, **options) -> DataLoader:
    """`domain_samples` + `train_loader` in one call (tests, benchmarks)."""
    samples = domain_samples(name, domain, data, labelled, seed, options.pop("rcs", None), options.pop("cache_dir", None))
    return train_loader(samples, data, plan, seed, **options)


# --------------------------------------------------------------------------------------- evaluation


def read_all_samples(urls: list[str], access: ShardAccess = ShardAccess()) -> list[dict]:
    """Every sample of the shards, in order; an unreadable shard is an error (an evaluation must be whole)."""
    from dreamshard.format.reader import tar_samples

    samples: list[dict] = []
    for url in urls:
        try:
            with access.open(url) as stream:
                samples += tar_samples([(url, stream)])
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read evaluation shard {url} ({one_line(exc)}); fix or remove it") from None
    return samples


class EvalSet(Dataset):
    """Whole labelled images for evaluation: (uint8 CHW image at the model's input size, uint8 HW label)."""

    def __init__(self, domain: DomainConfig, access: ShardAccess = ShardAccess()):
        self.resize = domain.resize
        self.source: LabelledSource | None = None
        self._loaders: dict[tuple, DataLoader] = {}
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

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaders": {}}  # what a worker process gets: not the loaders themselves

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

    def loader(self, rank: int, world: int, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
        """This rank's slice, batched; made once and kept, its workers alive between evaluations."""
        from torch.utils.data import Subset

        key = (rank, world, batch_size, workers, pin_memory)
        if key not in self._loaders:
            part = Subset(self, range(rank, len(self), world))
            self._loaders[key] = DataLoader(part, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory)
        return self._loaders[key]
