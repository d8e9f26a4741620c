"""`dreamshard preview`: a contact sheet of a run's samples, captioned with key and prompt.

Pictures that tell the truth: every image keeps its aspect ratio (letterboxed in its cell, never squashed);
a sample with a label (`seg.png`, the conditioned modes) shows it beside the image in the Cityscapes palette,
or over it (`label="overlay"`). Which samples: the first ones, a seeded random draw, an even spread over the
classes or a style axis's values, or the lowest CLIP scores (what a quality filter would look at first).
"""

from __future__ import annotations

import io
import math
import random
import tarfile
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont, ImageOps

from dreamshard.datasets.labels import colourise
from dreamshard.errors import UserError, one_line
from dreamshard.format.reader import committed_rows, committed_shards, manifest_rows, read_shard
from dreamshard.tools import open_run

PICKS = ("first", "random", "class", "clip")  # and "style:AXIS"
LABEL_VIEWS = ("side", "overlay", "none")
LABEL_FILE = "seg.png"


@dataclass
class Picked:
    key: str
    caption: str
    image: Image.Image
    label: Image.Image | None  # RGB, in the palette


def pick_rows(rows: list[dict], pick: str, count: int, seed: int, out) -> list[dict]:
    """The manifest rows to show, in display order."""
    if pick == "first":
        return rows[:count]
    if pick == "random":
        return sorted(random.Random(seed).sample(rows, min(count, len(rows))), key=lambda row: row["index"])
    if pick == "clip":
        scored = [row for row in rows if row.get("clip_score") is not None]
        if not scored:
            raise UserError(f"{out} has no CLIP scores (generated without quality.clip_model); use --pick first, random or class")
        return sorted(scored, key=lambda row: row["clip_score"])[:count]
    return spread(rows, group_of(pick, out), count)


def group_of(pick: str, out):
    if pick == "class":
        return lambda row: row["class_name"] or "(none)"
    if pick.startswith("style:") and pick[6:]:
        axis = pick[6:]
        return lambda row: row["style"].get(axis) or "(not in prompt)"
    raise UserError(f"unknown --pick {pick!r}; choose one of first, random, class, clip or style:AXIS (an axis of {out}'s styles)")


def spread(rows: list[dict], group, count: int) -> list[dict]:
    """The first samples of each group, round robin over the groups (sorted), so every value shows."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[group(row)].append(row)
    ordered: list[dict] = []
    depth = 0
    while len(ordered) < count and any(depth < len(members) for members in groups.values()):
        ordered += [groups[name][depth] for name in sorted(groups) if depth < len(groups[name])][: count - len(ordered)]
        depth += 1
    return sorted(ordered, key=lambda row: (group(row), row["index"]))


def read_picked(store, rows: list[dict], image_format: str, out) -> list[Picked]:
    """Decode the picked samples, reading each shard that holds one once."""
    wanted: dict[int, set[str]] = defaultdict(set)
    for row in rows:
        wanted[row["shard"]].add(row["key"])
    found: dict[str, dict[str, bytes]] = {}
    for shard, keys in sorted(wanted.items()):
        try:
            for key, raw in read_shard(store, shard):
                if key in keys:
                    found[key] = raw
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise UserError(
                f"{out}: shard {shard} is unreadable ({type(exc).__name__}: {one_line(exc, limit=80)}); `dreamshard repair {out}` un-commits it "
                "so that `dreamshard generate` makes it again"
            ) from None
    return [decode(row, found.get(row["key"], {}), image_format, out) for row in rows]


def decode(row: dict, raw: dict[str, bytes], image_format: str, out) -> Picked:
    try:
        image = Image.open(io.BytesIO(raw[image_format])).convert("RGB")
        label = None
        if LABEL_FILE in raw:
            ids = np.asarray(Image.open(io.BytesIO(raw[LABEL_FILE])))
            label = Image.fromarray(colourise(ids)).resize(image.size, Image.Resampling.NEAREST)
    except (KeyError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{out}: sample {row['key']} has no readable {image_format} image ({one_line(exc, limit=80)}); run `dreamshard verify {out}`") from None
    score = f" [clip {row['clip_score']:.1f}]" if row.get("clip_score") is not None else ""
    return Picked(row["key"], f"{row['key']}{score}: {row['prompt']}", image, label)


def preview_grid(
    out: str | Path, count: int = 64, output: str | Path = "grid.png", pick: str = "first", seed: int = 0, label: str = "side", tile: int = 192
) -> Path:
    """A contact sheet of `count` samples chosen by `pick` (first, random, class, style:AXIS, clip)."""
    if label not in LABEL_VIEWS:
        raise UserError(f"unknown --label {label!r}; choose one of {', '.join(LABEL_VIEWS)}")
    store, record = open_run(out)
    committed = committed_shards(store, record["samples_per_shard"])
    try:
        rows = sorted(manifest_rows(committed_rows(store, committed)), key=lambda row: row["index"])
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"{out}: an index file of a committed shard is unreadable ({one_line(exc)}); run `dreamshard verify {out}`") from None
    if not rows:
        raise UserError(f"{out} has no committed samples to preview yet")
    picked = read_picked(store, pick_rows(rows, pick, count, seed, out), record["image_format"], out)
    sheet = contact_sheet(picked, label, tile)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output)
    return output


def contact_sheet(picked: list[Picked], label: str, tile: int) -> Image.Image:
    """Cells of one shape (the first image's aspect ratio, longer side `tile`); each image is fitted into
    its cell keeping its own ratio; with labels side by side a cell holds two panels."""
    width, height = picked[0].image.size
    panel = (tile, max(1, round(tile * height / width))) if width >= height else (max(1, round(tile * width / height)), tile)
    panels = 2 if label == "side" and any(item.label is not None for item in picked) else 1
    font = ImageFont.load_default(size=11)
    line_height, lines, gap = 13, 3, 4
    cell = (panels * panel[0] + (panels - 1) * gap, panel[1] + lines * line_height + 4)
    columns = math.ceil(math.sqrt(len(picked) * cell[1] / cell[0]))  # a roughly square sheet
    rows = math.ceil(len(picked) / columns)
    sheet = Image.new("RGB", (columns * (cell[0] + gap), rows * cell[1]), "white")
    draw = ImageDraw.Draw(sheet)
    for number, item in enumerate(picked):
        x, y = (number % columns) * (cell[0] + gap), (number // columns) * cell[1]
        image = item.image
        if label == "overlay" and item.label is not None:
            image = Image.blend(image, item.label, 0.5)
        sheet.paste(fitted(image, panel), (x, y))
        if panels == 2 and item.label is not None:
            sheet.paste(fitted(item.label, panel, Image.Resampling.NEAREST), (x + panel[0] + gap, y))
        caption = textwrap.wrap(item.caption, width=max(cell[0] // 6, 8))[:lines]
        for line_number, text in enumerate(caption):
            draw.text((x + 2, y + panel[1] + 2 + line_number * line_height), text, fill="black", font=font)
    return sheet


def fitted(image: Image.Image, box: tuple[int, int], resample=Image.Resampling.BICUBIC) -> Image.Image:
    """`image` scaled to fit `box` with its aspect ratio kept, centred on a grey letterbox."""
    canvas = Image.new("RGB", box, (128, 128, 128))
    scaled = ImageOps.contain(image, box, method=resample)
    canvas.paste(scaled, ((box[0] - scaled.width) // 2, (box[1] - scaled.height) // 2))
    return canvas
