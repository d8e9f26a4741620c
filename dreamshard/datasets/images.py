"""Reading an input image as users' files come: turned upright by its EXIF orientation (cameras and phones
store portrait photos sideways with a rotation tag), 16-bit and 32-bit grey scaled to 8 bits instead of
clipped, palette, grey and CMYK images converted, an alpha channel dropped when it is fully opaque; an image
with transparent pixels, or of a kind that has no sensible RGB reading, is one UserError line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dreamshard.errors import UserError

WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit and 32-bit integer grey


def read_rgb_image(path: Path | str) -> Image.Image:
    """The image at `path` as 8-bit RGB, upright; UserError naming the file when it cannot be read as one."""
    try:
        with Image.open(path) as opened:
            return to_rgb(ImageOps.exif_transpose(opened), Path(path))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path} ({type(exc).__name__}: {str(exc)[:120]}); replace or remove it") from None


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    mode = image.mode
    if mode in WIDE_GREY:
        values = np.asarray(image, dtype=np.float64)
        full = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(values * 255.0 / full), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise UserError(f"{path}: a floating-point image (mode F) has no 8-bit reading; save it as an 8- or 16-bit PNG")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            raise UserError(f"{path}: has transparent pixels; flatten it onto a background (RGB) first, so nothing decides its colour for you")
    return image.convert("RGB")
