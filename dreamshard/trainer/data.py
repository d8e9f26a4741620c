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
import torch.nn.functional as F
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
ORDER_DRAW, AUGMENT_DRAW, RCS_DRAW, JITTER_DRAW = 0, 2, 3, 4  # sub-streams of a position's seed
PIL_KERNELS = {"pil": Image.Resampling.BILINEAR, "pil_lanczos": Image.Resampling.LANCZOS}

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
    resize_mode: str = "exact"  # DomainConfig.resize_mode
    kernel: str = "pil"  # DomainConfig.resize_kernel

    @classmethod
    def of(cls, domain: DomainConfig, data: TrainDataConfig, labelled: bool) -> Augment:
        return cls(domain.resize, data.crop_size, data.flip, data.cat_max_ratio if labelled else 1.0, data.decoder, domain.resize_mode, domain.resize_kernel)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize of an image of that size."""
        return resized_size(self.resize, self.resize_mode, height, width)

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded image → resized HWC uint8 RGB. PIL decodes JPEGs at a reduced DCT scale when a PIL-kernel
        resize allows it; torchvision.io decodes into a tensor."""
        if self.decoder == "torchvision":
            return self._decode_torchvision(data)
        image = Image.open(io.BytesIO(data))
        if self.resize and image.format == "JPEG" and self.kernel == "pil":
            image.draft("RGB", pil_size(self.target_size(image.height, image.width)))
        return self.resized(image.convert("RGB"))

    def _decode_torchvision(self, data: bytes) -> np.ndarray:
        from torchvision.io import ImageReadMode, decode_image

        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        return resize_pixels(pixels, self.target_size(*pixels.shape[-2:]), self.kernel).permute(1, 2, 0).numpy()

    def resized(self, image: Image.Image) -> np.ndarray:
        """A PIL image, resized with this kernel, as HWC uint8."""
        size = self.target_size(image.height, image.width)
        if size == (image.height, image.width):
            return np.asarray(image)
        if self.kernel in PIL_KERNELS:
            return np.asarray(image.resize(pil_size(size), PIL_KERNELS[self.kernel]))
        return resize_pixels(torch.from_numpy(np.asarray(image)).permute(2, 0, 1), size, "cv2").permute(1, 2, 0).numpy()

    def __call__(self, pixels: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, focus: int | None = None, min_focus: int = 0):
        """(uint8 CHW image, uint8 HW label or None) from HWC pixels. With `focus`, re-crop until the crop has
        > `min_focus` pixels of that class (RCS)."""
        if label is not None and label.shape != pixels.shape[:2]:
            label = resize_label(label, pixels.shape[:2], self.kernel)
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
        """mmseg's RandomCrop: a window drawn, then up to CROP_TRIES re-draws until no class covers
        `cat_max_ratio` or more of it (and it holds two classes at least); the last draw is kept either way.
        With `focus` (DAFormer's RCS), that whole crop is re-done up to CROP_TRIES times until the window has
        more than `min_focus` pixels of the class, the last one kept either way."""
        origin = self._balanced_origin(size, label, rng)
        if focus is None or label is None:
            return origin
        for _ in range(CROP_TRIES):
            if (self._window(label, origin) == focus).sum() > min_focus:
                break
            origin = self._balanced_origin(size, label, rng)
        return origin

    def _balanced_origin(self, size: tuple[int, int], label: np.ndarray | None, rng: np.random.Generator) -> tuple[int, int]:
        (h, w), (ch, cw) = size, self.crop
        origin = (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)))
        if label is None or self.cat_max_ratio >= 1:
            return origin
        for _ in range(CROP_TRIES):
            if _balanced(self._window(label, origin), self.cat_max_ratio):
                break
            origin = (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)))
        return origin

    def _window(self, label: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
        return label[origin[0] : origin[0] + self.crop[0], origin[1] : origin[1] + self.crop[1]]


def resized_size(resize: tuple[int, int] | None, mode: str, height: int, width: int) -> tuple[int, int]:
    """(height, width) of an image after `resize` in `mode` (see DomainConfig.resize_mode): mmcv's
    rescale_size for keep_ratio (scale = min(long / long side, short / short side), sides int(x * scale + 0.5))."""
    if not resize:
        return (height, width)
    if mode == "exact":
        return (int(resize[0]), int(resize[1]))
    scale = min(max(resize) / max(height, width), min(resize) / min(height, width))
    return (int(height * scale + 0.5), int(width * scale + 0.5))


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int], kernel: str) -> torch.Tensor:
    """CHW uint8 → CHW uint8 at (height, width): bilinear with antialiasing (`pil`), or without it, at the
    half-pixel centres OpenCV's INTER_LINEAR samples (`cv2`)."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    if kernel == "pil":
        import torchvision.transforms.v2.functional as TF

        return TF.resize(pixels, list(size), antialias=True)
    if kernel == "pil_lanczos":
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize(pil_size(size), Image.Resampling.LANCZOS)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)
    out = F.interpolate(pixels[None].float(), size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_label(label: np.ndarray, size: tuple[int, int], kernel: str) -> np.ndarray:
    """Train ids to (height, width), nearest: PIL's (pixel centres) or OpenCV's INTER_NEAREST (floor of
    dst x scale, as mmseg resizes labels)."""
    if kernel in PIL_KERNELS:
        return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.Resampling.NEAREST))
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(label))[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8).numpy()


def pil_size(height_width: tuple[int, int]) -> tuple[int, int]:
    """Config sizes are (height, width); PIL takes (width, height)."""
    return (int(height_width[1]), int(height_width[0]))


def _balanced(window: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's test: at least two classes (255 aside), and the largest below `cat_max_ratio` of the rest."""
    counts = np.bincount(window.ravel(), minlength=256)[:IGNORE_INDEX]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def pad_to(pixels: np.ndarray, label: np.ndarray | None, crop: tuple[int, int]):
    """Pad bottom/right to at least the crop size: image with 0, label with 255 (mmseg's pad values)."""
    h, w = pixels.shape[:2]
    dh, dw = max(0, crop[0] - h), max(0, crop[1] - w)
    if dh or dw:
        pixels = np.pad(pixels, ((0, dh), (0, dw), (0, 0)))
        if label is not None:
            label = np.pad(label, ((0, dh), (0, dw)), constant_values=IGNORE_INDEX)
    return pixels, label


def color_jitter(image: torch.Tensor, config, rng: np.random.Generator) -> torch.Tensor:
    """ZoDi's colour jitter (torchvision's adjust_* in a fixed order) on a CHW uint8 image, factors from `rng`."""
    import torchvision.transforms.v2.functional as TF

    b, c, s = (rng.uniform(max(0.0, 1 - x), 1 + x) for x in (config.brightness, config.contrast, config.saturation))
    hue = rng.uniform(-config.hue, config.hue)
    image = TF.adjust_brightness(image, b)
    image = TF.adjust_contrast(image, c)
    image = TF.adjust_saturation(image, s)
    return TF.adjust_hue(image, hue)


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
    meta: dict | None = None  # a shard sample's json (its source_key pairs it with its twin)


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
        self.augment_stream = stream_id(name)  # whose position seeds its crops and flips
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
            meta = json.loads(sample["json"]) if "json" in sample else None
            loaded = Loaded(self.augment.decode(sample[image_key]), label, str(sample["__key__"]), meta=meta)
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
        self.augment_stream = stream_id(name)
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


class TwinSamples:
    """The source items paired with a shard domain's samples (ZoDi's real image and its transferred twin): the
    sample at a position is the folder item the target sample's json `source_key` names, augmented with the
    target's draws (the same crop window and flip; the images must have one size after the resize)."""

    def __init__(self, name: str, folder: FolderSamples, target: ShardSamples):
        self.name, self.folder, self.target, self.augment = name, folder, target, folder.augment
        self.augment_stream = target.augment_stream
        self.by_key = {item.key: item for item in folder.source.items}

    @property
    def epoch_samples(self) -> int:
        return self.target.epoch_samples

    def digest(self) -> str:
        return hashlib.sha256(f"{self.folder.digest()}|{self.target.digest()}".encode()).hexdigest()[:16]

    def load(self, position: int, rng: np.random.Generator) -> Loaded:
        twin = self.target.load(position, rng)
        key = (twin.meta or {}).get("source_key")
        item = self.by_key.get(key) if isinstance(key, str) else None
        if item is None:
            raise DataError(
                f"{self.name} data: target sample {twin.key} names source item {key!r}, which the source folder does not hold; data.paired needs "
                "the source the shards were made from (its json source_key)"
            )
        image, label = self.folder.source.load(item)
        return Loaded(self.augment.resized(image), label, item.key, twin.substituted)

    def problems(self) -> tuple[str, ...]:
        return self.target.problems()


class RankBatches(Dataset):
    """Item n: this rank's n-th micro-batch of one domain (dict: image uint8 BCHW, label uint8 BHW, keys,
    substituted, problems)."""

    def __init__(self, samples: ShardSamples | FolderSamples | TwinSamples, plan: ReadPlan, seed: int, num_classes: int | None, jitter=None):
        self.samples, self.plan, self.seed, self.num_classes, self.jitter = samples, plan, seed, num_classes, jitter
        self.stream = stream_id(samples.name)

    def __len__(self) -> int:
        return self.plan.batches

    def __getitem__(self, batch: int) -> dict:
        images, labels, keys, substituted = [], [], [], 0
        for position in self.plan.positions(batch):
            rng = seeded(self.seed, self.samples.augment_stream, position, AUGMENT_DRAW)
            loaded = self.samples.load(position, rng)
            image, label = self.samples.augment(loaded.pixels, loaded.label, rng, focus=loaded.focus, min_focus=loaded.min_focus)
            if self.jitter is not None:
                image = color_jitter(image, self.jitter, seeded(self.seed, self.stream, position, JITTER_DRAW))
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
    augment = Augment.of(domain, data, labelled)
    if domain.shards is not None:
        access = ShardAccess.of(data)
        catalogue = shard_catalogue(domain.shards, access, name)
        return ShardSamples(name, catalogue, domain.shards.shuffle_block, seed, labelled, augment, access, data.max_bad_fraction)
    source = open_folder(domain)
    sampler = RareClassSampler(class_stats(source, cache_dir or Path(data.cache_dir)), rcs) if rcs is not None and rcs.enabled else None
    return FolderSamples(name, source, seed, sampler, augment)


def train_loader(
    samples: ShardSamples | FolderSamples | TwinSamples,
    data: TrainDataConfig,
    plan: ReadPlan,
    seed: int,
    num_classes: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """This rank's micro-batches of one domain, `plan.batches` of them, in order."""
    workers = data.workers
    return DataLoader(
        RankBatches(samples, plan, seed, num_classes, data.color_jitter),
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
        self.augment = Augment(domain.resize, (1, 1), False, resize_mode=domain.resize_mode, kernel=domain.resize_kernel)  # its resize only
        self.resize_labels = domain.resize_labels
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
        pixels = self.augment.resized(image)
        if self.resize_labels and label.shape != pixels.shape[:2]:
            label = resize_label(np.asarray(label), pixels.shape[:2], "pil")  # nearest, as ZoDi's PIL NEAREST
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), torch.from_numpy(np.array(label))

    def loader(self, rank: int, world: int, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
        """This rank's slice, batched; made once and kept, its workers alive between evaluations."""
        from torch.utils.data import Subset

        key = (rank, world, batch_size, workers, pin_memory)
        if key not in self._loaders:
            part = Subset(self, range(rank, len(self), world))
            self._loaders[key] = DataLoader(part, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory)
        return self._loaders[key]
