"""The dataset card, README.md at the top of a run directory: what the Hugging Face Hub shows for a pushed run,
and what `datasets` reads to load it. Its `configs` entry points the loader at `shards/*.tar` only, so the
commit markers, the index files and dreamshard.json (JSON and Parquet of other shapes) are not read as data:
`load_dataset(RUN)` and `load_dataset("org/name")` give the samples (the webdataset builder: image, json, txt,
and seg.png where the mode keeps a label). Written by `generate` when a run completes and by `dreamshard
push`, from the run record and the committed samples' rows, so it always says what is there."""

from __future__ import annotations

import json
from collections import Counter

import yaml

from dreamshard.format.layout import LABEL_FIELD
from dreamshard.format.record import JSON_FIELDS

CARD = "README.md"
DATA_FILES = "shards/*.tar"


def labelled(record: dict) -> bool:
    """Whether the samples carry seg.png: the run record's `label` (written by generate from its mode)."""
    return record.get("label") == LABEL_FIELD


def size_category(samples: int) -> str:
    """The Hub's size_categories bucket."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if samples < limit:
            return name
    return "10M<n<100M"


def card_metadata(record: dict, samples: int) -> dict:
    """The card's YAML header (Hub dataset metadata)."""
    config = record.get("config") or {}
    return {
        "license": (config.get("output") or {}).get("license") or "other",
        "pretty_name": f"dreamshard {config.get('mode', 'txt2img')} run {record.get('fingerprint', '')[:12]}".strip(),
        "task_categories": ["image-segmentation"] if labelled(record) else ["text-to-image"],
        "tags": ["dreamshard", "synthetic", "stable-diffusion", "webdataset", "domain-adaptation"],
        "size_categories": [size_category(samples)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
    }


def dataset_card(record: dict, rows: list[dict], repo: str | None = None) -> str:
    """README.md for a run: the YAML header, then how to load it, its features, counts per class and style
    axis, the model and its fingerprint, and the plan. `rows`: the committed samples' metadata rows; `repo`: the
    Hub repository it is pushed to (named in the loading example)."""
    metadata = yaml.safe_dump(card_metadata(record, len(rows)), sort_keys=False, allow_unicode=True)
    image = record.get("image_format", "jpg")
    maker = " ".join(filter(None, ("dreamshard", record.get("dreamshard"))))
    sections = [
        f"---\n{metadata}---\n",
        "# " + card_metadata(record, len(rows))["pretty_name"],
        f"{len(rows)} of {record.get('num_samples', len(rows))} planned samples in WebDataset shards of "
        f"{record.get('samples_per_shard', '?')}, made with Stable Diffusion by {maker} "
        f"(run created {record.get('created', '?')}, updated {record.get('updated', '?')}). The images are synthetic: "
        "their prompts, seeds and the model that drew them are in each sample's metadata.",
        "## Load it\n\n```python\nfrom datasets import load_dataset\n\n"
        f'ds = load_dataset("{repo or "path/to/this/run"}", split="train")  # or streaming=True\n'
        f'ds[0]["{image}"], ds[0]["json"]["prompt"]\n```\n\n'
        f"Or with webdataset / the dreamshard trainer: the tars under `shards/` (`{DATA_FILES}`; `shards/sizes.json` "
        "counts each). The layout is dreamshard's docs/format.md.",
        features_section(image, labelled(record)),
        counts_section(rows),
        model_section(record),
        plan_section(record),
        "## Licence\n\nThe card's `license` is `output.license` of the generation config. Images made by a model carry that "
        "model's licence terms (e.g. CreativeML OpenRAIL-M for SD 1.5, OpenRAIL++ for SDXL); labels copied from a source "
        "dataset (seg.png) carry the source dataset's terms.",
    ]
    return "\n\n".join(section.strip() for section in sections) + "\n"


def features_section(image: str, labelled: bool) -> str:
    lines = ["## Features\n", "| field | type | what |", "| --- | --- | --- |", "| `__key__` | string | the sample's index, 9 digits |"]
    lines.append(f"| `{image}` | image | the generated image |")
    lines.append(f"| `json` | dict | metadata: {', '.join(f'`{name}`' for name in JSON_FIELDS)} |")
    lines.append("| `txt` | string | the prompt |")
    if labelled:
        lines.append(f"| `{LABEL_FIELD}` | image (L) | the source's label, Cityscapes train ids, 255 = ignore |")
    return "\n".join(lines)


def counts_section(rows: list[dict]) -> str:
    total = max(len(rows), 1)
    tables = {"class": Counter(row.get("class_name") or "(none)" for row in rows)}
    for row in rows:
        for axis, value in (row.get("style") or {}).items():
            tables.setdefault(f"style: {axis}", Counter())[value or "(not in prompt)"] += 1
    parts = ["## Counts"]
    for name, counter in tables.items():
        lines = [f"| {name} | samples | share |", "| --- | ---: | ---: |"]
        lines += [f"| {value} | {count} | {100 * count / total:.1f}% |" for value, count in sorted(counter.items(), key=lambda item: (-item[1], item[0]))]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def model_section(record: dict) -> str:
    model = record.get("model") or {}
    lines = ["## Model and fingerprint\n", f"- model: `{model.get('id', '?')}` (weights hash `{model.get('hash', '?')}`)"]
    for lora in model.get("loras") or []:
        lines.append(f"- LoRA: `{lora.get('id', lora.get('path', '?'))}` (hash `{lora.get('hash', '?')}`, scale {lora.get('scale', 1.0)})")
    lines.append(f"- run fingerprint: `{record.get('fingerprint', '?')}` (same fingerprint, same samples; docs/format.md)")
    for part, digest in sorted((record.get("fingerprints") or {}).items()):
        lines.append(f"  - {part}: `{digest}`")
    return "\n".join(lines)


def plan_section(record: dict) -> str:
    plan = record.get("plan") or {}
    sampling = (record.get("config") or {}).get("sampling") or {}
    return (
        "## Plan\n\nWhat was asked for (the run record's `plan`, and its sampling settings); `dreamshard.json` holds the full config.\n\n"
        f"```json\n{json.dumps({'plan': plan, 'sampling': sampling}, indent=2, sort_keys=True, default=str)}\n```"
    )
