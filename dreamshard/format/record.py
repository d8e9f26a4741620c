"""The sample record: one definition from which the json fields, the Parquet schema and the defaults
are derived (docs/format.md is the contract).

Every sample's `json` in a tar holds the fields with `in_json`, in this order; the per-shard index Parquet
and the manifest hold them all. Run-dependent facts (which worker, how long) are index-only, so a tar's
bytes depend only on the plan and the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dreamshard.format.layout import sample_key

REQUIRED = object()  # no default: the writer fills it in (key, shard) or the caller must (index)


@dataclass(frozen=True)
class Field:
    name: str
    arrow: pa.DataType
    default: Any = REQUIRED
    in_json: bool = True  # False: run-dependent, in the index Parquet only
    json_text: bool = False  # dict-valued: stored in Parquet as JSON text, so every shard has one schema


SAMPLE_FIELDS = (
    Field("key", pa.string()),
    Field("index", pa.int64()),
    Field("shard", pa.int64()),
    Field("prompt", pa.string(), ""),
    Field("negative_prompt", pa.string(), ""),
    Field("seed", pa.int64(), 0),
    Field("class_name", pa.string(), ""),
    Field("class_id", pa.int64(), -1),
    Field("template", pa.string(), ""),
    Field("style", pa.string(), {}, json_text=True),
    Field("width", pa.int64()),  # default: the image's size
    Field("height", pa.int64()),
    Field("steps", pa.int64(), 0),
    Field("guidance_scale", pa.float64(), 0.0),
    Field("scheduler", pa.string(), ""),
    Field("model", pa.string(), {"id": "", "hash": ""}, json_text=True),
    Field("mode", pa.string(), "txt2img"),
    Field("source_key", pa.string(), ""),
    # Quality (engine/quality.py): the safety checker's verdict (null: no checker ran), 100 x the CLIP cosine of
    # image and prompt (null: no clip_model), and how many draws the sample took (1: its first was kept).
    Field("nsfw", pa.bool_(), None),
    Field("clip_score", pa.float64(), None),
    Field("attempts", pa.int64(), 1),
    Field("extra", pa.string(), {}, json_text=True),  # prompt-file columns and the like
    Field("worker", pa.string(), "", in_json=False),
    Field("seconds", pa.float64(), 0.0, in_json=False),
)

FIELD_NAMES = tuple(field.name for field in SAMPLE_FIELDS)
JSON_FIELDS = tuple(field.name for field in SAMPLE_FIELDS if field.in_json)
INDEX_ONLY_FIELDS = tuple(field.name for field in SAMPLE_FIELDS if not field.in_json)
JSON_TEXT_COLUMNS = tuple(field.name for field in SAMPLE_FIELDS if field.json_text)
PARQUET_SCHEMA = pa.schema([(field.name, field.arrow) for field in SAMPLE_FIELDS])
DEFAULTS = {field.name: field.default for field in SAMPLE_FIELDS if field.default is not REQUIRED}


def sample_record(metadata: dict[str, Any], shard: int, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The full record of one sample (every field, in order) from what the caller knows; `size` is the
    image's (width, height), the default of those fields. Unknown keys are an error."""
    unknown = set(metadata) - set(FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown sample metadata {sorted(unknown)}; put extra columns under 'extra'")
    if "index" not in metadata:
        raise ValueError("sample metadata needs 'index' (the global sample index)")
    merged = {**DEFAULTS, **metadata}
    index = int(merged["index"])
    merged.update(key=sample_key(index), index=index, shard=shard)
    if size is not None:
        merged.setdefault("width", size[0])
        merged.setdefault("height", size[1])
    return {name: merged[name] for name in FIELD_NAMES}


def json_fields(record: dict[str, Any]) -> dict[str, Any]:
    """What a sample's `json` member holds: the record without its index-only fields."""
    return {name: record[name] for name in JSON_FIELDS}


def records_to_table(records: list[dict]) -> pa.Table:
    columns = {name: [record[name] for record in records] for name in FIELD_NAMES}
    for name in JSON_TEXT_COLUMNS:
        columns[name] = [json.dumps(value, sort_keys=True, ensure_ascii=False) for value in columns[name]]
    return pa.table(columns, schema=PARQUET_SCHEMA)


def table_to_records(table: pa.Table) -> list[dict]:
    """Rows as dicts with the JSON text columns (style, model, extra) decoded."""
    rows = table.to_pylist()
    for row in rows:
        for name in JSON_TEXT_COLUMNS:
            if name in row:
                row[name] = json.loads(row[name])
    return rows
