"""`dreamshard preview`: a contact sheet of a run's samples with their prompts."""

from __future__ import annotations

import io
import math
import tarfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dreamshard.errors import UserError, one_line
from dreamshard.format.reader import committed_shards, read_shard
from dreamshard.tools import open_run


def shard_samples(store, shard: int, image_format: str, count: int, out) -> list[tuple[str, str, Image.Image]]:
    """Up to `count` (key, prompt, RGB image) of one shard; a damaged shard or image is one UserError line."""
    found = []
    try:
        for key, raw in read_shard(store, shard):
            try:
                image = Image.open(io.BytesIO(raw[image_format])).convert("RGB")
            except (KeyError, OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(
                    f"{out}: sample {key} has no readable {image_format} image ({one_line(exc, limit=80)}); run `dreamshard verify {out}`"
                ) from None
            found.append((key, raw.get("txt", b"").decode(errors="replace"), image))
            if len(found) >= count:
                break
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise UserError(
            f"{out}: shard {shard} is unreadable ({type(exc).__name__}: {one_line(exc, limit=80)}); `dreamshard repair {out}` un-commits it "
            "so that `dreamshard generate` makes it again"
        ) from None
    return found


def preview_grid(out: str | Path, count: int = 64, output: str | Path = "grid.png", tile: int = 160) -> Path:
    """A contact sheet of the first `count` samples, each captioned with its key and prompt."""
    store, record = open_run(out)
    samples: list[tuple[str, str, Image.Image]] = []
    for shard in sorted(committed_shards(store, record["samples_per_shard"])):
        samples += shard_samples(store, shard, record["image_format"], count - len(samples), out)
        if len(samples) >= count:
            break
    if not samples:
        raise UserError(f"{out} has no committed samples to preview yet")
    font = ImageFont.load_default(size=11)
    line_height, lines = 13, 4
    columns = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / columns)
    cell_height = tile + lines * line_height + 4
    sheet = Image.new("RGB", (columns * tile, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for number, (key, prompt, image) in enumerate(samples):
        x, y = (number % columns) * tile, (number // columns) * cell_height
        sheet.paste(image.resize((tile, tile)), (x, y))
        caption = textwrap.wrap(f"{key}: {prompt}", width=tile // 6)[:lines]
        for line_number, text in enumerate(caption):
            draw.text((x + 2, y + tile + 2 + line_number * line_height), text, fill="black", font=font)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output)
    return output
