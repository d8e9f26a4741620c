"""Pictures of what training sees and predicts, every `image_interval` iterations (rank 0): one grid per
iteration with a row per image (the first two of the batch) and a column per panel, as DAFormer's debug
images show them. DACS: target image, the student's prediction on it, the teacher's pseudo-label, its
confident pixels (max probability >= uda.pseudo_threshold: white), source image, prediction and label, the
mixed image (after the strong augmentation) and its label. Supervised methods: each domain's image,
prediction and label. Labels in the Cityscapes palette (ignore: black). Written to OUTPUT/images/iter_N.png
and to TensorBoard (tag `pictures`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from dreamshard.datasets.labels import PALETTE, colourise
from dreamshard.format.store import atomic_write

PANEL = 256  # longest side of a panel in the grid
TITLE_HEIGHT = 16


def palette_for(num_classes: int) -> list[tuple[int, int, int]]:
    """The Cityscapes colours, then seeded distinct ones for classes beyond 19."""
    colours = [(int(r), int(g), int(b)) for r, g, b in PALETTE[:num_classes]]
    extra = np.random.default_rng(19).integers(0, 256, size=(max(0, num_classes - len(colours)), 3))
    return colours + [(int(r), int(g), int(b)) for r, g, b in extra]


@torch.no_grad()
def predictions(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Argmax labels of the (unwrapped) student in eval mode, at image size; its train mode is restored, and
    no BN statistics change."""
    was_training = model.training
    model.eval()
    logits = model(images.float())
    model.train(was_training)
    return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False).argmax(1)


def panels(visuals: dict[str, torch.Tensor], model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The method's visuals in order, each image (but the mixed one) followed by the student's prediction."""
    columns = []
    for title, tensor in visuals.items():
        columns.append((title, tensor))
        if title.endswith(" image") and not title.startswith("mixed"):
            columns.append((title.replace(" image", " prediction"), predictions(model, tensor)))
    return columns


def render(tensor: torch.Tensor, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """(N, 3, H, W) float images, (N, H, W) integer labels or boolean masks → (N, H, W, 3) uint8."""
    array = tensor.detach().float().cpu() if tensor.is_floating_point() else tensor.detach().cpu()
    if array.dim() == 4:
        return (array.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if array.dtype == torch.bool:
        return np.repeat((array.numpy().astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return np.stack([colourise(label.numpy().astype(np.uint8), palette) for label in array])


def grid(columns: list[tuple[str, np.ndarray]]) -> Image.Image:
    """A titled grid: columns of panels, each scaled to PANEL pixels on its longest side."""
    rows = min(len(panels) for _, panels in columns)
    h, w = columns[0][1].shape[1:3]
    scale = PANEL / max(h, w)
    ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
    canvas = Image.new("RGB", (pw * len(columns), TITLE_HEIGHT + ph * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (title, images) in enumerate(columns):
        draw.text((c * pw + 3, 2), title[: pw // 6], fill="black")
        for r in range(rows):
            panel = Image.fromarray(images[r]).resize((pw, ph), Image.Resampling.NEAREST)
            canvas.paste(panel, (c * pw, TITLE_HEIGHT + r * ph))
    return canvas


def write_pictures(out: Path, iteration: int, visuals: dict[str, torch.Tensor], model: torch.nn.Module, num_classes: int, tensorboard=None) -> Path:
    """Render and write the grid of one iteration; returns its PNG path."""
    palette = palette_for(num_classes)
    picture = grid([(title, render(tensor, palette)) for title, tensor in panels(visuals, model)])
    path = out / "images" / f"iter_{iteration:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    atomic_write(path, encoded.getvalue())
    if tensorboard is not None:
        tensorboard.add_image("pictures", np.asarray(picture), iteration, dataformats="HWC")
    return path
