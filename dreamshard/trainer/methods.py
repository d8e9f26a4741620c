"""Training methods: one `step` per micro-batch computes the losses and sends each through `Gradients`;
the loop owns the optimiser step. `dacs` follows DAFormer's `mmseg/models/uda/dacs.py`:

1. EMA teacher update (copy at iteration 0), over parameters only (`begin_iteration`, one fused
   `torch._foreach_lerp_` over all of them);
2. supervised CE on the source crop (+ ImageNet feature distance on thing classes) → backward;
3. the teacher pseudo-labels the clean target crop; quality weight q = share of pixels with max prob
   ≥ 0.968, broadcast to every target pixel (or a per-pixel hard mask), zeroed in the ignore margins;
4. ClassMix: half of each source image's classes pasted onto its target image (image, label, weight),
   strong colour jitter + blur on the mixed image, weighted CE → backward;
5. MIC (option): the strongly augmented target with random blocks masked out, trained on the same
   pseudo-labels → backward.
Gradients of all losses accumulate before the single optimiser step. Under DDP only the last backward of an
iteration all-reduces (the others run under `no_sync`), as DAFormer's one-GPU step needs none: one gradient
all-reduce per iteration. Losses come back as device tensors (logged at intervals, so no step waits on the
host), and nothing in a step copies a value to the host.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from timm.layers import DropPath
from torch import nn

from dreamshard.config import CLOUDSConfig, TrainConfig, UDAConfig, ZoDiConfig
from dreamshard.datasets.labels import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
PICTURE_ROWS = 2  # images of a batch shown in the pictures


class Gradients:
    """Where a method's losses go: `backward(loss)` scales for gradient accumulation (and the fp16 grad
    scaler), and `sync(final)` wraps one forward+backward: under DDP only the `final` pass of the last
    micro-step all-reduces; every other pass runs under `no_sync` and its gradients join that one."""

    def __init__(self, model: nn.Module, scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss, accum: int = 1, last_micro: bool = True):
        self.model, self.scale, self.accum, self.last_micro = model, scale, accum, last_micro
        self.passes = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.passes += 1
        self.scale(loss / self.accum).backward()

    def sync(self, final: bool):
        if final and self.last_micro or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """CE on logits upsampled to label size; per-pixel weight, mean over all pixels (ignored ones count as 0)."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (loss * weight).mean() if weight is not None else loss.mean()


def supervised_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None, with_features: bool = False):
    """(loss, features or None): weighted CE of the model's logits, or with HRDA its multi-resolution loss
    (trainer/hrda.py); `with_features`: the backbone features the feature distance compares."""
    from dreamshard.trainer.hrda import HRDASegmenter, hrda_loss

    core = unwrap(model)
    if isinstance(core, HRDASegmenter):
        outputs = model(images, hr_crop=True, with_features=with_features)
        return hrda_loss(core, outputs, labels, weight, weighted_ce), outputs[3]
    if with_features:
        logits, features = model(images, with_features=True)
        return weighted_ce(logits, labels, weight), features
    return weighted_ce(model(images), labels, weight), None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain segmenter inside a DDP and/or torch.compile wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None)
        if inner is None:
            return model
        model = inner


class SourceOnly:
    """Supervised on the labelled source (and, for supervised_synthetic, on label-carrying target shards)."""

    def __init__(self, model: nn.Module, domains: tuple[str, ...] = ("source",)):
        self.model = model
        self.domains = domains
        self.visuals: dict[str, torch.Tensor] = {}

    def begin_iteration(self, iteration: int) -> None:
        pass

    def step(self, batch: Batch, grads: Gradients, visual: bool = False) -> dict[str, torch.Tensor]:
        logs = {}
        for i, domain in enumerate(self.domains):
            with grads.sync(final=i == len(self.domains) - 1):
                loss, _ = supervised_loss(self.model, batch[f"{domain}_image"], batch[f"{domain}_label"])
                grads.backward(loss)
            logs[f"loss_{domain}"] = loss.detach()
        if visual:
            self.visuals = {
                name: batch[f"{domain}_{kind}"][:PICTURE_ROWS].detach()
                for domain in self.domains
                for kind, name in (("image", f"{domain} image"), ("label", f"{domain} label"))
            }
        return logs

    def state_dicts(self) -> dict[str, dict]:
        return {}

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        pass


class DACS:
    def __init__(self, model: nn.Module, config: UDAConfig, num_classes: int):
        self.model = model  # the student, possibly DDP-wrapped
        self.config = config
        self.num_classes = num_classes
        self.teacher = freeze(copy.deepcopy(unwrap(model)))
        # FD compares against the backbone as it was before training (ImageNet weights when pretrained).
        self.imnet = freeze(copy.deepcopy(unwrap(model).backbone)).eval() if config.fd.enabled else None
        self.visuals: dict[str, torch.Tensor] = {}

    def state_dicts(self) -> dict[str, dict]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        self.teacher.load_state_dict(states["teacher"])

    @torch.no_grad()
    def begin_iteration(self, iteration: int) -> None:
        """EMA update of the teacher with the student after the previous optimiser step (copy at iteration 0)."""
        student = unwrap(self.model)
        if iteration == 0:
            self.teacher.load_state_dict(student.state_dict())
            return
        alpha = min(1 - 1 / (iteration + 1), self.config.alpha)
        teacher = list(self.teacher.parameters())
        torch._foreach_lerp_(teacher, [p.detach() for p in student.parameters()], 1 - alpha)

    def step(self, batch: Batch, grads: Gradients, visual: bool = False) -> dict[str, torch.Tensor]:
        cfg = self.config
        src_img, src_lbl, tgt_img = batch["source_image"], batch["source_label"], batch["target_image"]
        logs = {}

        # Source CE (+ FD on the same forward, so DDP sees one backward per forward).
        with grads.sync(final=False):
            loss_src, features = supervised_loss(self.model, src_img, src_lbl, with_features=self.imnet is not None)
            loss_src_total = loss_src
            if features is not None:
                loss_fd = self.feature_distance(features[-1], src_img, src_lbl)
                logs["loss_fd"] = loss_fd.detach()
                loss_src_total = loss_src + loss_fd
            grads.backward(loss_src_total)
        logs["loss_source"] = loss_src.detach()

        pseudo_label, pseudo_weight, quality = self.pseudo_label(tgt_img)
        logs["pseudo_quality"] = quality

        masks = class_mix_masks(src_lbl, self.num_classes)
        mixed_img = masks[:, None] * src_img + (1 - masks[:, None]) * tgt_img
        mixed_lbl = torch.where(masks.bool(), src_lbl, pseudo_label)
        mixed_weight = masks + (1 - masks) * pseudo_weight
        mixed_img = strong_augment(mixed_img, cfg)
        with grads.sync(final=not cfg.mic.enabled):
            loss_mix, _ = supervised_loss(self.model, mixed_img, mixed_lbl, mixed_weight)
            grads.backward(loss_mix)
        logs["loss_mix"] = loss_mix.detach()

        if cfg.mic.enabled:
            masked = mask_blocks(strong_augment(tgt_img, cfg), cfg.mic.mask_ratio, cfg.mic.block_size, unwrap(self.model).mean)
            with grads.sync(final=True):
                loss_mic = cfg.mic.weight * supervised_loss(self.model, masked, pseudo_label, pseudo_weight)[0]
                grads.backward(loss_mic)
            logs["loss_mic"] = loss_mic.detach()
        if visual:
            rows = slice(0, PICTURE_ROWS)
            self.visuals = {
                "target image": tgt_img[rows], "pseudo-label": pseudo_label[rows], "confident (>= threshold)": self._confidence[rows],
                "source image": src_img[rows], "source label": src_lbl[rows], "mixed image": mixed_img[rows].detach(), "mixed label": mixed_lbl[rows],
            }  # fmt: skip
        return logs

    @torch.no_grad()
    def pseudo_label(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher argmax on the clean target, its per-pixel weight and the quality q (share of confident pixels)."""
        cfg = self.config
        # DAFormer leaves the teacher in train mode (BN on batch statistics) but switches off dropout and
        # stochastic depth (timm's DropPath; transformers' MiT has its own SegformerDropPath).
        self.teacher.train()
        for module in self.teacher.modules():
            if isinstance(module, (nn.modules.dropout._DropoutNd, DropPath)) or type(module).__name__ == "SegformerDropPath":
                module.training = False
        logits = F.interpolate(self.teacher(target), size=target.shape[-2:], mode="bilinear", align_corners=False)
        max_prob, label = torch.softmax(logits.float(), dim=1).max(dim=1)
        confident = max_prob >= cfg.pseudo_threshold
        self._confidence = confident
        quality = confident.float().mean()  # a device scalar: no host sync
        if cfg.pseudo_weight == "threshold_uniform":
            weight = quality.expand_as(max_prob).clone()
        elif cfg.pseudo_weight == "threshold":
            weight = confident.float()
        else:
            weight = torch.ones_like(max_prob)
        if cfg.ignore_top:
            weight[:, : cfg.ignore_top] = 0
        if cfg.ignore_bottom:
            weight[:, -cfg.ignore_bottom :] = 0
        return label, weight, quality

    def feature_distance(self, features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """λ · mean L2 distance to the frozen initial backbone's last-level features, on thing-class pixels."""
        fd = self.config.fd
        assert self.imnet is not None  # built when fd is enabled
        core = unwrap(self.model)
        with torch.no_grad():  # the frozen backbone sees what the student's compared features saw (HRDA: the context)
            imnet_features = self.imnet((core.context_input(images) - core.mean) / core.std)[-1]
        distance = torch.norm(features.float() - imnet_features.float(), dim=1)
        scale = labels.shape[-1] // features.shape[-1]
        small = downscale_labels(labels, scale, fd.scale_min_ratio, self.num_classes)
        things = torch.isin(small, torch.tensor(fd.thing_classes, device=small.device)).to(distance.dtype)
        # The mean over thing pixels, written so that a batch without any is 0 (graph kept) with no host sync.
        return fd.weight * (distance * things).sum() / things.sum().clamp(min=1)


def freeze(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def class_mix_masks(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Per image, a {0, 1} float mask of the pixels of a random half (rounded up) of its source classes.
    All on the device: each present class gets a random score, and the classes whose score ranks in the
    lower half (rounded up) of the image's present classes are chosen (no per-image `unique`, no sync)."""
    b, classes = labels.shape[0], num_classes or IGNORE_INDEX  # without num_classes: any id below 255
    flat = labels.reshape(b, -1).long()
    bins = torch.where(flat == IGNORE_INDEX, torch.full_like(flat, classes), flat.clamp(max=classes))
    present = torch.zeros(b, classes + 1, device=labels.device).scatter_(1, bins, 1.0)[:, :classes].bool()
    scores = torch.rand(b, classes, device=labels.device).masked_fill(~present, 2.0)  # absent classes rank last
    rank = scores.argsort(dim=1).argsort(dim=1)
    chosen = present & (rank < (present.sum(dim=1, keepdim=True) + 1) // 2)
    chosen = torch.cat([chosen, torch.zeros(b, 1, dtype=torch.bool, device=labels.device)], dim=1)  # ignore: never
    return chosen.gather(1, bins).reshape(labels.shape).float()


def strong_augment(images: torch.Tensor, config: UDAConfig) -> torch.Tensor:
    """DACS's strong augmentation as DAFormer draws it (`mmseg/models/utils/dacs_transforms.py`): one draw
    per batch decides colour jitter (with probability color_jitter_p) and one blur (with probability 0.5);
    each image then gets its own jitter factors and order, and its own blur sigma. The jitter has kornia
    0.5.8's semantics (uda.strong_augment: daformer) or torchvision's."""
    s = config.color_jitter_strength
    if s > 0 and torch.rand(()) < config.color_jitter_p:
        transform = jitter if config.strong_augment == "daformer" else torchvision_jitter
        images = torch.stack([transform(image, *draw_jitter(s)) for image in images.float()]).to(images.dtype)
    if config.blur and torch.rand(()) < 0.5:
        kernel = [blur_kernel_size(images.shape[-2]), blur_kernel_size(images.shape[-1])]
        sigmas = torch.empty(images.shape[0]).uniform_(0.15, 1.15).tolist()
        images = torch.stack([TF.gaussian_blur(image, kernel_size=kernel[::-1], sigma=[sigma, sigma]) for image, sigma in zip(images, sigmas)])
    return images


def draw_jitter(strength: float) -> tuple[tuple[float, float, float, float], list[int]]:
    """kornia 0.5.8 ColorJitter(s, s, s, s)'s draws: brightness, contrast and saturation factors from
    U(max(0, 1 - s), 1 + s), hue from U(-min(s, 0.5), min(s, 0.5)) (a fraction of the colour circle), and a
    random order of the four operations."""
    low = max(0.0, 1 - strength)
    b, c, sat = (low + torch.rand(3) * (1 + strength - low)).tolist()
    hue = float((torch.rand(()) * 2 - 1) * min(strength, 0.5))
    return (b, c, sat, hue), torch.randperm(4).tolist()


def jitter(image: torch.Tensor, factors: tuple[float, float, float, float], order: list[int]) -> torch.Tensor:
    """One image in [0, 1] through kornia 0.5.8's operations, in `order` (0 brightness, 1 contrast, 2
    saturation, 3 hue): brightness adds b - 1, contrast multiplies by c (no mean), saturation scales S in HSV,
    hue turns H by hue x 2π; each result clamped to [0, 1] (S too)."""
    b, c, sat, hue = factors
    for op in order:
        if op == 0:
            image = (image + (b - 1)).clamp(0, 1)
        elif op == 1:
            image = (image * c).clamp(0, 1)
        else:
            h, s, v = rgb_to_hsv(image)
            if op == 2:
                s = (s * sat).clamp(0, 1)
            else:
                h = torch.fmod(h + hue * 2 * math.pi, 2 * math.pi)
            image = hsv_to_rgb(h, s, v)
    return image


def torchvision_jitter(image: torch.Tensor, factors: tuple[float, float, float, float], order: list[int]) -> torch.Tensor:
    """The same draws through torchvision's adjust_* (multiplicative brightness, contrast and saturation
    blended with grey) in a fixed order (uda.strong_augment: torchvision)."""
    b, c, sat, hue = factors
    image = TF.adjust_contrast(TF.adjust_brightness(image, b), c)
    return TF.adjust_hue(TF.adjust_saturation(image, sat), hue)


def rgb_to_hsv(image: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kornia's RGB → HSV: H in [0, 2π), S = (max - min) / (V + eps), V = max."""
    maximum, argmax = image.max(dim=0)
    delta = maximum - image.min(dim=0).values
    saturation = delta / (maximum + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = maximum - image
    hue = torch.stack([bc - gc, 2 * delta + rc - bc, 4 * delta + gc - rc]).gather(0, argmax[None])[0] / delta
    return 2 * math.pi * ((hue / 6) % 1), saturation, maximum


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """kornia's HSV → RGB."""
    h = hue / (2 * math.pi) * 6
    sector = torch.floor(h) % 6
    f = h % 6 - sector
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
    table = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    out = torch.zeros((3, *hue.shape), dtype=hue.dtype, device=hue.device)
    for k, channels in enumerate(table):
        out = torch.where(sector == k, torch.stack(channels), out)
    return out


def blur_kernel_size(size: int) -> int:
    """DAFormer's Gaussian kernel: floor(ceil(0.1 d) - 0.5 + ceil(0.1 d) mod 2), i.e. ceil(0.1 d) when odd, one
    less when even (51 for 512)."""
    k = math.ceil(0.1 * size)
    return int(math.floor(k - 0.5 + k % 2))


def mask_blocks(images: torch.Tensor, ratio: float, block: int, fill: torch.Tensor) -> torch.Tensor:
    """MIC masking: a grid of `block`-pixel patches, each kept with probability 1 - ratio; masked patches get
    the mean colour (0 after normalisation)."""
    b, _, h, w = images.shape
    grid = (torch.rand(b, 1, math.ceil(h / block), math.ceil(w / block), device=images.device) > ratio).to(images.dtype)
    keep = F.interpolate(grid, scale_factor=block, mode="nearest")[..., :h, :w]
    return images * keep + fill.to(images.dtype) * (1 - keep)


def downscale_labels(labels: torch.Tensor, scale: int, min_ratio: float, num_classes: int) -> torch.Tensor:
    """Majority label per `scale`x`scale` block; 255 where the majority covers less than `min_ratio`."""
    labels = labels.clone()
    labels[labels == IGNORE_INDEX] = num_classes
    onehot = F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()
    pooled = F.avg_pool2d(onehot, scale)
    ratio, small = pooled.max(dim=1)
    small[(small == num_classes) | (ratio < min_ratio)] = IGNORE_INDEX
    return small


class ZoDi:
    """ZoDi's model adaptation (`model_adaptation/utils/routines.py`, `models/segmentation/_utils.py`): each
    batch holds real source crops and their transferred twins (same window, flip and labels; data.paired).
    Loss = CE(real) + CE(twin) + sim_weight x -(q * z).sum(1).mean(), where q and z are the real image's and
    its twin's last backbone level, global-average-pooled and L2-normalised (zodi.features/pool/normalize
    choose other variants); no detach, so both halves get the similarity's gradient, as in ZoDi.
    Difference: one forward over both halves (one DDP pass, one all-reduce), so BatchNorm normalises real and
    twin together; ZoDi makes two passes (real with the similarity, then the twin) and BN sees each alone."""

    def __init__(self, model: nn.Module, config: ZoDiConfig):
        self.model, self.config = model, config
        self.visuals: dict[str, torch.Tensor] = {}

    def begin_iteration(self, iteration: int) -> None:
        pass

    def step(self, batch: Batch, grads: Gradients, visual: bool = False) -> dict[str, torch.Tensor]:
        real, twin, label = batch["source_image"], batch["target_image"], batch["source_label"]
        twin_label = batch.get("target_label", label)
        with grads.sync(final=True):
            images = torch.cat([real, twin])
            if self.config.features == "decoder":
                logits, features = self.model(images, with_embedding=True)
            else:
                logits, levels = self.model(images, with_features=True)
                features = levels[-1]
            loss_ce = weighted_ce(logits, torch.cat([label, twin_label]))
            q, z = features.float().chunk(2)
            if self.config.pool:
                q, z = q.mean(dim=(2, 3)), z.mean(dim=(2, 3))
            if self.config.normalize:
                q, z = F.normalize(q, dim=1), F.normalize(z, dim=1)
            loss_sim = -(q * z).sum(1).mean()
            grads.backward(loss_ce + self.config.sim_weight * loss_sim)
        if visual:
            rows = slice(0, PICTURE_ROWS)
            self.visuals = {"source image": real[rows], "transferred twin": twin[rows], "label": label[rows]}
        return {"loss_ce": loss_ce.detach(), "loss_sim": loss_sim.detach()}

    def state_dicts(self) -> dict[str, dict]:
        return {}

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        pass


class CLOUDS:
    """CLOUDS' training (yasserben/CLOUDS `clouds/clouds.py`) with this trainer's per-pixel segmenter:

    1. source CE on every iteration; for the first clouds.warmup_iters only that (CLOUDS' warm-up run);
    2. after it, each generated (target) image is pseudo-labelled by the teacher: the student's backbone
       (frozen in CLOUDS, model.freeze_backbone) under an EMA copy of the decode head, argmax with no
       threshold, refined by SAM (trainer/sam.py) when clouds.sam.model is set; the student trains on a
       strongly augmented view of the image (DACS's colour jitter and blur, uda.*) against it;
    3. the teacher head is a copy at iteration 0 and takes one EMA step (clouds.ema_alpha, no ramp) every
       clouds.ema_every iterations.
    Differences from CLOUDS' code: a per-pixel decode head and cross-entropy (CLOUDS: Mask2Former's decoder
    and set loss; pixels SAM leaves uncovered are ignored here); each iteration holds a source and a target
    batch of equal size (CLOUDS samples one mixed stream with generated images repeated twice); one run holds
    warm-up and joint training; DACS's augmentation stands in for detectron2's ColorAugSSD."""

    def __init__(self, model: nn.Module, config: CLOUDSConfig, uda: UDAConfig, device: torch.device, seed: int):
        self.model, self.config, self.uda = model, config, uda
        self.teacher_head = freeze(copy.deepcopy(unwrap(model).decode_head))
        self.iteration = 0
        self.sam = None
        if config.sam.enabled:
            from dreamshard.trainer.sam import SAMRefiner

            self.sam = SAMRefiner(config.sam, device)
        self.seed, self.generator = seed, torch.Generator()  # SAM's prompt points
        self.visuals: dict[str, torch.Tensor] = {}

    def state_dicts(self) -> dict[str, dict]:
        return {"teacher_head": self.teacher_head.state_dict()}

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        self.teacher_head.load_state_dict(states["teacher_head"])

    @torch.no_grad()
    def begin_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        self.generator.manual_seed(self.seed * 1_000_003 + iteration)  # a resumed run draws the same prompt points
        student = unwrap(self.model).decode_head
        if iteration == 0:
            self.teacher_head.load_state_dict(student.state_dict())
        elif iteration % self.config.ema_every == 0:
            torch._foreach_lerp_(list(self.teacher_head.parameters()), [p.detach() for p in student.parameters()], 1 - self.config.ema_alpha)

    def step(self, batch: Batch, grads: Gradients, visual: bool = False) -> dict[str, torch.Tensor]:
        joint = self.iteration >= self.config.warmup_iters
        with grads.sync(final=not joint):
            loss_src, _ = supervised_loss(self.model, batch["source_image"], batch["source_label"])
            grads.backward(loss_src)
        logs = {"loss_source": loss_src.detach()}
        rows = slice(0, PICTURE_ROWS)
        if visual:
            self.visuals = {"source image": batch["source_image"][rows], "source label": batch["source_label"][rows]}
        if not joint:
            return logs
        target = batch["target_image"]
        pseudo = self.pseudo_label(target)
        refined = self.sam.refine(target, pseudo, self.generator) if self.sam is not None else pseudo
        logs["refined_changed"] = (refined != pseudo).float().mean()  # share of pixels SAM relabelled or dropped
        augmented = strong_augment(target, self.uda)
        with grads.sync(final=True):
            loss_tgt, _ = supervised_loss(self.model, augmented, refined)
            grads.backward(loss_tgt)
        logs["loss_target"] = loss_tgt.detach()
        if visual:
            self.visuals |= {
                "target image": target[rows],
                "teacher label": pseudo[rows],
                "SAM-refined": refined[rows],
                "student view": augmented[rows].detach(),
            }
        return logs

    @torch.no_grad()
    def pseudo_label(self, target: torch.Tensor) -> torch.Tensor:
        """The teacher head on the student's backbone features of the clean image: argmax at image size."""
        core = unwrap(self.model)
        self.teacher_head.train()  # BN on batch statistics, as the DACS teacher; dropout off
        for module in self.teacher_head.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.training = False
        logits = self.teacher_head(core.features(target))
        return F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)


def build_method(config: TrainConfig, model: nn.Module, device: torch.device | None = None) -> SourceOnly | DACS | ZoDi | CLOUDS:
    if config.method == "zodi":
        return ZoDi(model, config.zodi)
    if config.method == "clouds":
        return CLOUDS(model, config.clouds, config.uda, device or torch.device("cpu"), config.seed)
    if config.method == "dacs":
        return DACS(model, config.uda, config.model.num_classes)
    if config.method == "supervised_synthetic":
        return SourceOnly(model, ("source", "target") if config.data.source else ("target",))
    return SourceOnly(model)
