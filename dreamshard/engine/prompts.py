"""Prompt text for the plan: class lists, template placeholders, style axes and prompt files.

Pure functions, no randomness: `dreamshard.engine.plan` decides which template / class / style value each
sample gets; this module checks the recipe's text up front and fills it in.

Placeholders are plain `{name}` fields: `{token}` (the personalisation identifier, e.g. `sks`), `{cls}`
(the sample's class), the name of any style axis (e.g. `{weather}`) and `{classes}`, the classes present in
the sample's source label (conditioned modes; the plan leaves it as written and the conditioner fills it
in, see `classes_text`). `{{` and `}}` are literal braces.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dreamshard.config import PromptsConfig
from dreamshard.errors import UserError, one_line

RESERVED_PLACEHOLDERS = ("token", "cls", "classes", "least_class")
CLASSES_PLACEHOLDER = "{classes}"
LEAST_CLASS_PLACEHOLDER = "{least_class}"
LABEL_PLACEHOLDERS = ("classes", "least_class")  # filled per sample from the source labels (conditioned modes)
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Template:
    """One checked template: its text, weight, the placeholders it uses and its negative prompt."""

    text: str
    weight: float
    negative_prompt: str
    fields: tuple[str, ...]  # placeholder names in order of first use

    @property
    def uses_class(self) -> bool:
        return "cls" in self.fields

    @property
    def uses_classes(self) -> bool:
        return "classes" in self.fields

    def fill(self, values: dict[str, str]) -> str:
        return self.text.format_map(values)


@dataclass(frozen=True)
class PromptFile:
    """A prompt file read once at plan time: one prompt per row, the other columns of each row, a digest."""

    path: str
    prompts: tuple[str, ...]
    extras: tuple[dict[str, Any], ...]  # per row: the columns other than the prompt column ({} for .txt)
    digest: str = field(repr=False)  # sha256 of the file's bytes: the content, not the path, fingerprints it
    # True when the file holds what earlier versions of dreamshard read differently (a byte-order mark, a
    # Unicode line separator inside a line): the plan fingerprint then says so, so their runs are not mixed in.
    read_differently: bool = False


# ------------------------------------------------------------------------------------------ templates


def placeholders(text: str, where: str) -> tuple[str, ...]:
    """Placeholder names of a template, in order of first use; only plain `{name}` fields are allowed."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise UserError(f"{where} {text!r}: bad braces ({exc}); write literal braces as {{{{ and }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise UserError(
                f"{where} {text!r}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a plain {{name}}; use e.g. {{cls}} or {{weather}}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def check_templates(prompts: PromptsConfig) -> list[Template]:
    """The configured templates, checked: every placeholder must be {token}, {cls} or a style axis."""
    check_styles(prompts.styles)
    if not prompts.templates:
        raise UserError("prompts.templates is empty; give at least one, e.g. - text: 'a photo of a {token} {cls}'")
    known = [*RESERVED_PLACEHOLDERS, *prompts.styles]
    templates = []
    for number, config in enumerate(prompts.templates):
        where = f"prompts.templates[{number}]"
        fields = placeholders(config.text, where)
        unknown = [name for name in fields if name not in known]
        if unknown:
            raise UserError(
                f"{where} {config.text!r}: unknown placeholder {{{unknown[0]}}}; known placeholders: "
                + ", ".join(f"{{{name}}}" for name in known)
                + " (add a style axis under prompts.styles to define a new one)"
            )
        check_weight(config.weight, f"{where}.weight")
        if "token" in fields and not prompts.token.strip():
            raise UserError(f"{where} uses {{token}} but prompts.token is empty; set it, e.g. prompts.token=sks")
        negative = prompts.negative_prompt if config.negative_prompt is None else config.negative_prompt
        templates.append(Template(config.text, config.weight, negative, fields))
    if not any(template.weight > 0 for template in templates):
        raise UserError("prompts.templates: every weight is 0; give at least one template a positive weight")
    return templates


def check_styles(styles: dict[str, list[str]]) -> None:
    for axis, values in styles.items():
        if not axis.isidentifier() or axis in RESERVED_PLACEHOLDERS:
            raise UserError(
                f"prompts.styles: axis name {axis!r} must be an identifier other than {', '.join(RESERVED_PLACEHOLDERS)}, e.g. weather or time_of_day"
            )
        if not values:
            raise UserError(f"prompts.styles.{axis} is empty; list its values, e.g. [rainy, snowy, foggy]")


def check_classes(prompts: PromptsConfig) -> list[float]:
    """Per-class weights aligned with `prompts.classes` (1.0 where not given), after checking names."""
    classes = prompts.classes
    if not classes:
        raise UserError("prompts.classes is empty but a template uses {cls}; list class names, e.g. [car, bus, person]")
    seen = set()
    for name in classes:
        if not name.strip():
            raise UserError("prompts.classes holds an empty class name; remove it")
        if name in seen:
            raise UserError(f"prompts.classes lists {name!r} twice; each class once (use class_weights to favour it)")
        seen.add(name)
    for name, weight in prompts.class_weights.items():
        if name not in seen:
            raise UserError(f"prompts.class_weights: unknown class {name!r}; valid classes: {', '.join(classes)}")
        check_weight(weight, f"prompts.class_weights.{name}")
    if prompts.class_weights and prompts.balance == "round_robin":
        raise UserError("prompts.class_weights has no effect with balance round_robin; set prompts.balance to weighted or least_generated")
    weights = [float(prompts.class_weights.get(name, 1.0)) for name in classes]
    if not any(weight > 0 for weight in weights):
        raise UserError("prompts.class_weights: every class has weight 0; give at least one a positive weight")
    return weights


def check_class_words(prompts: PromptsConfig) -> dict[str, str]:
    """prompts.class_words, checked: every key a class, every value non-empty text."""
    for name, words in prompts.class_words.items():
        if name not in prompts.classes:
            raise UserError(f"prompts.class_words: unknown class {name!r}; valid classes: {', '.join(prompts.classes)}")
        if not words.strip():
            raise UserError(f"prompts.class_words.{name} is empty; give the words the prompt should use, e.g. {name}s")
    return dict(prompts.class_words)


def present_classes(train_ids, num_classes: int) -> np.ndarray:
    """Which of the classes a label holds (any pixel; 255 ignored), as a bool vector."""
    return np.bincount(np.asarray(train_ids, dtype=np.uint8).ravel(), minlength=256)[:num_classes] > 0


def least_generated_classes(presence: list[np.ndarray], excluded: Sequence[int] = ()) -> list[int]:
    """DIDEX's "least generated class" of each sample in order (GTA5_to_PTD_uni_cls.py): a running count per
    class, raised by one for every class present in the sample's label, then the class with the lowest count
    (ties: the lowest train id) is named and counted once more. `excluded` classes are never named (DIDEX's
    SYNTHIA script starts them at 1e14)."""
    counts = np.zeros(len(presence[0]) if presence else 0, dtype=np.float64)
    counts[list(excluded)] = 1e14
    named = []
    for present in presence:
        counts += present
        least = int(np.argmin(counts))
        counts[least] += 1
        named.append(least)
    return named


def classes_text(train_ids, names) -> str:
    """DIDEX's content prompt: the names of the classes present in a label (any pixel, 255 ignored), in
    train-id order, joined by ", " (e.g. "road, sidewalk, building, car")."""
    counts = np.bincount(np.asarray(train_ids, dtype=np.uint8).ravel(), minlength=256)
    return ", ".join(names[i] for i in np.flatnonzero(counts[: len(names)]))


def check_weight(weight: float, where: str) -> None:
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"{where} = {weight}: weights must be finite and >= 0")


# --------------------------------------------------------------------------------------- prompt files


def read_prompt_file(path: str | None, column: str) -> PromptFile:
    """Read a CLOUDS-style prompt file: .txt (one prompt a line; blank lines and `#` comments skipped),
    .jsonl (one object a line; blank lines and `#` or `//` comments skipped) or .parquet, where `column` holds
    the prompt and other columns become extras. Text is UTF-8, with or without a byte-order mark; lines end at
    newlines only (see `_lines`)."""
    if not path:
        raise UserError("prompts.recipe is 'file' but prompts.file is not set; point it at a .txt, .jsonl or .parquet")
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        supported = ", ".join(PROMPT_FILE_SUFFIXES)
        raise UserError(f"prompts.file {path}: unsupported type {suffix or '(none)'}; use {supported}")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise UserError(f"prompts.file {path}: cannot read it ({exc.strerror or exc}); check the path") from None
    if suffix == ".txt":
        rows = _txt_rows(data, path)
    elif suffix == ".jsonl":
        rows = _jsonl_rows(data, path)
    else:
        rows = _parquet_rows(file)
    if not rows:
        raise UserError(f"prompts.file {path}: holds no prompts; add at least one")
    prompts, extras = [], []
    for number, row in enumerate(rows, start=1):
        prompt = row.pop(column, None) if suffix != ".txt" else row.pop("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            found = f"columns: {', '.join(sorted(row)) or '(none)'}"
            raise UserError(f"prompts.file {path}: row {number} has no text in column {column!r} ({found}); set prompts.file_column to the prompt's column")
        if "file_row" in row:
            raise UserError(f"prompts.file {path}: column 'file_row' is reserved for the row number; rename it")
        prompts.append(prompt.strip())
        extras.append({key: _jsonable(value) for key, value in row.items()})
    return PromptFile(str(path), tuple(prompts), tuple(extras), hashlib.sha256(data).hexdigest(), read_differently=_read_differently(data))


def _lines(data: bytes, path: str) -> list[str]:
    """The file's lines as editors write them: split at newlines (a carriage return before one dropped) and
    nowhere else, so a Unicode line or paragraph separator inside a prompt stays in that prompt."""
    return [line.removesuffix("\r") for line in _decode(data, path).split("\n")]


def _txt_rows(data: bytes, path: str) -> list[dict[str, Any]]:
    return [{"prompt": line.strip()} for line in _lines(data, path) if line.strip() and not line.lstrip().startswith("#")]


def _jsonl_rows(data: bytes, path: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_lines(data, path), start=1):
        if not line.strip() or line.lstrip().startswith(("#", "//")):  # blank and comment lines
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"prompts.file {path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"prompts.file {path}: line {number} is not a JSON object; write one object per line")
        rows.append(row)
    return rows


def _parquet_rows(file: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # only prompt-file recipes need pyarrow at plan time

    try:
        return pq.read_table(file).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
        raise UserError(f"prompts.file {file}: not a readable Parquet file ({one_line(exc)})") from None


LINE_BREAKS_BUT_NEWLINE = ("\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85")  # str.splitlines() splits at these too


def _read_differently(data: bytes) -> bool:
    text = data.decode("utf-8", errors="replace")
    return text.startswith("\ufeff") or any(mark in text for mark in LINE_BREAKS_BUT_NEWLINE)


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors save, is dropped
    except UnicodeDecodeError:
        raise UserError(f"prompts.file {path}: not UTF-8 text; save it as UTF-8") from None


def _jsonable(value: Any) -> Any:
    """Extra columns go into per-sample JSON: values JSON cannot hold (dates, bytes) become strings."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return str(value)
