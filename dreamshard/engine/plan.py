"""The sample plan: global index i → what sample i shows and how it is drawn (`SampleSpec`).

Pure and deterministic. Sample i's spec depends only on (prompts + sampling config, run seed, i): never on
sharding, batch size, worker, retries or `num_samples`, so raising `num_samples` keeps 0..N-1 identical.

Randomness is counter-based, not a sequential RNG stream: the draw for (sample i, purpose p) is
`splitmix64(key(run seed, p) + i * golden)`, the SplitMix64 generator evaluated at position i of a stream
keyed by blake2b(run seed, purpose name). Purposes: the torch seed, template, class, steps, guidance and
one per style axis (by name). So spec(i) needs no other sample, a range of specs is drawn as numpy arrays
at once, and adding a style axis leaves the other draws alone. The one exception is
`balance: least_generated`, which by definition looks at the classes of samples 0..i-1; the plan computes
that sequence once, deterministically, and caches it.

Recipes (`prompts.recipe`):
- `templates` (DATUM, DIDEX): a weighted template per sample, filled with `{token}`, `{cls}` and the style
  axes it names. Classes go round robin (`i mod len(classes)`), by weighted draw, or to the class least
  generated so far relative to its weight (the lowest (count + 1) / weight, ties to the first in `classes`).
  A sample whose template has no `{cls}` records no class (`""`, -1) and is not counted for balancing;
  likewise `style` records only the axes the sample's template prints, so the metadata says what the
  prompt says. An axis no template uses is allowed (and never recorded).
  `pair_items_with: AXIS` replaces that axis's draw by `values[i mod V]`: with the conditioner taking source
  item `i // V` (`source_group`), samples 0..items*V-1 hold every (item, value) pair once, item by item, so
  any prefix of whole items is balanced over the values. `{classes}` stays in the prompt as written; the
  conditioner fills it from the sample's source label (the plan never reads the source).
- `file` (CLOUDS): sample i takes row `i mod len(file)`, verbatim; jsonl/parquet columns other than the
  prompt go to `extra`, with the row number as `extra["file_row"]`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from array import array
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dreamshard.config import PromptsConfig, SamplingConfig
from dreamshard.engine.prompts import (
    CLASSES_PLACEHOLDER,
    LEAST_CLASS_PLACEHOLDER,
    PromptFile,
    Template,
    check_class_words,
    check_classes,
    check_templates,
    read_prompt_file,
)
from dreamshard.errors import UserError

# Bump when the derivation below changes, so old runs' fingerprints no longer match.
PLAN_VERSION = 1
MAX_GUIDANCE = 100.0

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(n) for n in (30, 27, 31, 11))


@dataclass(frozen=True)
class SampleSpec:
    index: int  # global sample index
    prompt: str
    negative_prompt: str
    class_name: str  # "" when the sample has no class
    class_id: int  # index into prompts.classes, -1 when none
    template: str  # the template text before filling ("" for prompt files)
    style: dict[str, str]  # style-axis name -> value ({} when none)
    seed: int  # per-sample torch.Generator seed, 0 <= seed < 2**63, from (run seed, index) only
    steps: int
    guidance_scale: float
    width: int
    height: int
    extra: dict[str, Any]  # extra JSON-serialisable metadata (prompt-file columns); {} if none

    def metadata(self) -> dict:
        """JSON-ready dict of all the fields."""
        return asdict(self)


class Plan:
    """Specs of any sample index, plus the fingerprint of everything that determines them."""

    def __init__(self, prompts: PromptsConfig, sampling: SamplingConfig, seed: int) -> None:
        self.recipe = prompts.recipe
        self.seed = seed
        self.width, self.height = _size(sampling.width, "width"), _size(sampling.height, "height")
        self.steps_range = _steps_range(sampling.steps)
        self.guidance_range = _guidance_range(sampling.guidance_scale)
        self.eta = sampling.eta
        self.negative_prompt = prompts.negative_prompt
        self.file: PromptFile | None = None
        self.templates: list[Template] = []
        if prompts.recipe == "file":
            self.file = read_prompt_file(prompts.file, prompts.file_column)
        else:
            self.templates = check_templates(prompts)
        self.uses_class = any(template.uses_class for template in self.templates)
        self.token = prompts.token
        self.classes = list(prompts.classes)
        self.class_weights = check_classes(prompts) if self.uses_class else []
        self.class_words = check_class_words(prompts)
        self.balance = prompts.balance
        self.styles = {axis: list(values) for axis, values in prompts.styles.items()}
        self.pair_axis = _pair_axis(prompts, self.templates)
        self._template_axes = [tuple(name for name in t.fields if name in self.styles) for t in self.templates]
        self._template_cum = np.cumsum([template.weight for template in self.templates])
        self._class_cum = np.cumsum(self.class_weights)
        self._inputs = self._fingerprint_inputs(prompts)
        self.fingerprint = hashlib.sha256(_canonical(self._inputs).encode()).hexdigest()
        # least_generated state: class ids of samples 0..len-1 (-1: no class), counts, the heap to go on from
        self._balanced_ids = array("i")
        self._balance_counts = [0] * len(self.class_weights)
        self._balance_heap = [(1.0 / w, k) for k, w in enumerate(self.class_weights) if w > 0]
        heapq.heapify(self._balance_heap)

    # ------------------------------------------------------------------------------------- public

    def spec(self, index: int) -> SampleSpec:
        return self.specs(index, index + 1)[0]

    def specs(self, start: int, stop: int) -> list[SampleSpec]:
        """Specs of samples [start, stop)."""
        if start < 0 or stop < start:
            raise ValueError(f"bad sample range [{start}, {stop})")
        if start == stop:
            return []
        index = np.arange(start, stop, dtype=np.uint64)
        common = zip(
            range(start, stop),
            (self._draw("seed", index) >> np.uint64(1)).tolist(),
            self._steps(index),
            self._guidance(index),
        )
        size = dict(width=self.width, height=self.height)
        if self.file is not None:
            prompts, extras = self.file.prompts, self.file.extras
            return [
                SampleSpec(
                    index=i,
                    prompt=prompts[i % len(prompts)],
                    negative_prompt=self.negative_prompt,
                    class_name="",
                    class_id=-1,
                    template="",
                    style={},
                    seed=seed,
                    steps=steps,
                    guidance_scale=guidance,
                    **size,
                    extra={**extras[i % len(prompts)], "file_row": i % len(prompts)},
                )  # fmt: skip
                for i, seed, steps, guidance in common
            ]
        template_ids = self._template_ids(index)
        class_ids = self._class_ids(index, template_ids)
        style_values = {axis: [values[k] for k in self._style_ids(axis, index)] for axis, values in self.styles.items()}
        specs = []
        for n, (i, seed, steps, guidance) in enumerate(common):
            template, class_id = self.templates[template_ids[n]], class_ids[n]
            class_name = self.classes[class_id] if class_id >= 0 else ""
            style = {axis: style_values[axis][n] for axis in self._template_axes[template_ids[n]]}
            words = self.class_words.get(class_name, class_name)
            prompt = template.fill({"token": self.token, "cls": words, **style, "classes": CLASSES_PLACEHOLDER, "least_class": LEAST_CLASS_PLACEHOLDER})
            specs.append(
                SampleSpec(
                    index=i,
                    prompt=prompt,
                    negative_prompt=template.negative_prompt,
                    class_name=class_name,
                    class_id=class_id,
                    template=template.text,
                    style=style,
                    seed=seed,
                    steps=steps,
                    guidance_scale=guidance,
                    **size,
                    extra={},
                )  # fmt: skip
            )
        return specs

    def describe(self) -> dict:
        """JSON-ready summary for dreamshard.json: the recipe as the plan understood it."""
        summary = {"fingerprint": self.fingerprint, **self._inputs}
        if self.file is not None:
            summary["file"] = self.file.path
            summary["file_prompts"] = len(self.file.prompts)
        return summary

    # ------------------------------------------------------------------------------------ draws

    def _draw(self, purpose: str, index: np.ndarray) -> np.ndarray:
        """64-bit draws for `purpose` at each sample index (uint64 arithmetic wraps, as SplitMix64 wants)."""
        key = hashlib.blake2b(f"dreamshard-plan/{PLAN_VERSION}/{self.seed}/{purpose}".encode(), digest_size=8)
        x = index * _GOLDEN + np.uint64(int.from_bytes(key.digest(), "little"))
        x = (x ^ (x >> _S30)) * _MIX1
        x = (x ^ (x >> _S27)) * _MIX2
        return x ^ (x >> _S31)

    def _style_ids(self, axis: str, index: np.ndarray) -> list[int]:
        """Value index of a style axis per sample: drawn, or i mod V for the axis paired with source items."""
        count = np.uint64(len(self.styles[axis]))
        return ((index if axis == self.pair_axis else self._draw(f"style:{axis}", index)) % count).tolist()

    def _steps(self, index: np.ndarray) -> list[int]:
        low, high = self.steps_range
        if low == high:
            return [low] * len(index)
        return (low + self._draw("steps", index) % np.uint64(high - low + 1)).tolist()

    def _guidance(self, index: np.ndarray) -> list[float]:
        low, high = self.guidance_range
        if low == high:
            return [low] * len(index)
        return np.round(low + _unit(self._draw("guidance", index)) * (high - low), 3).tolist()

    def _template_ids(self, index: np.ndarray) -> list[int]:
        if len(self.templates) == 1:
            return [0] * len(index)
        return _pick(self._template_cum, self._draw("template", index)).tolist()

    def _class_ids(self, index: np.ndarray, template_ids: list[int]) -> list[int]:
        """Class id per sample, -1 where its template prints no class."""
        if not self.uses_class:
            return [-1] * len(index)
        if self.balance == "least_generated":
            start, stop = int(index[0]), int(index[-1]) + 1
            self._extend_balanced(stop)
            return self._balanced_ids[start:stop].tolist()
        if self.balance == "round_robin":
            ids = (index % np.uint64(len(self.classes))).tolist()
        else:
            ids = _pick(self._class_cum, self._draw("class", index)).tolist()
        uses = [template.uses_class for template in self.templates]
        return [class_id if uses[t] else -1 for class_id, t in zip(ids, template_ids)]

    def _extend_balanced(self, stop: int) -> None:
        """Cache least_generated class ids up to `stop`: the class with the lowest (count + 1) / weight."""
        ids, heap, counts, weights = self._balanced_ids, self._balance_heap, self._balance_counts, self.class_weights
        if stop <= len(ids):
            return
        uses = [template.uses_class for template in self.templates]
        for t in self._template_ids(np.arange(len(ids), stop, dtype=np.uint64)):
            if not uses[t]:
                ids.append(-1)
                continue
            _, class_id = heapq.heappop(heap)
            counts[class_id] += 1
            heapq.heappush(heap, ((counts[class_id] + 1) / weights[class_id], class_id))
            ids.append(class_id)

    # ---------------------------------------------------------------------------------- fingerprint

    def _fingerprint_inputs(self, prompts: PromptsConfig) -> dict:
        """Everything that determines specs, and nothing else (not num_samples, output, batch, workers)."""
        inputs: dict[str, Any] = {"plan_version": PLAN_VERSION, "recipe": prompts.recipe, "seed": self.seed}
        if self.file is not None:
            inputs |= {
                "file_sha256": self.file.digest,
                "file_column": prompts.file_column,
                "negative_prompt": prompts.negative_prompt,
            }
            if self.file.read_differently:  # a BOM or a line separator inside a line: read as lines end at newlines
                inputs["file_lines"] = "newline"
        else:
            inputs |= {
                "token": prompts.token,
                "templates": [{"text": t.text, "weight": t.weight, "negative_prompt": t.negative_prompt} for t in self.templates],
                "styles": self.styles,
            }
            if self.pair_axis:  # only when set, so the fingerprints of runs made before the option stay valid
                inputs["pair_items_with"] = self.pair_axis
            if self.uses_class:
                inputs |= {"classes": self.classes, "class_weights": self.class_weights, "balance": self.balance}
                if self.class_words:  # only when set, so earlier runs' fingerprints stay valid
                    inputs["class_words"] = self.class_words
        inputs["sampling"] = {
            "width": self.width,
            "height": self.height,
            "steps": list(self.steps_range),
            "guidance_scale": list(self.guidance_range),
        }
        if self.eta:  # likewise: eta 0 was the only value before sampling.eta existed
            inputs["sampling"]["eta"] = self.eta
        return inputs


def build_plan(prompts: PromptsConfig, sampling: SamplingConfig, seed: int) -> Plan:
    """Check the recipe (placeholders, classes, prompt file, sizes, ranges) and return its plan.
    Raises UserError with one line naming the problem; nothing touches a GPU before this passes."""
    return Plan(prompts, sampling, seed)


def source_group(prompts: PromptsConfig) -> int:
    """How many consecutive samples take the same source item (item = (i // group) mod items): the number of
    values of the axis paired with the items, else 1."""
    return len(prompts.styles[prompts.pair_items_with]) if prompts.pair_items_with else 1


# ------------------------------------------------------------------------------------------- helpers


def _pair_axis(prompts: PromptsConfig, templates: list[Template]) -> str | None:
    axis = prompts.pair_items_with
    if axis is None:
        return None
    if prompts.recipe != "templates":
        raise UserError("prompts.pair_items_with needs recipe 'templates' (it pairs source items with a style axis)")
    if axis not in prompts.styles:
        known = ", ".join(prompts.styles) or "(none defined)"
        raise UserError(f"prompts.pair_items_with {axis!r} is not a prompts.styles axis; axes: {known}")
    for number, template in enumerate(templates):
        if template.weight > 0 and axis not in template.fields:
            raise UserError(f"prompts.templates[{number}] {template.text!r} does not print {{{axis}}}; with pair_items_with every template must")
    return axis


MAX_SIDE = 16384  # pixels: 8x SDXL's 2048; past this a typo is likelier than a plan


def _size(value: int, name: str) -> int:
    if value <= 0 or value % 8 or value > MAX_SIDE:
        raise UserError(f"sampling.{name} = {value}: must be a positive multiple of 8 up to {MAX_SIDE}, e.g. 512")
    return value


def _steps_range(steps: int | tuple[int, int]) -> tuple[int, int]:
    low, high = (steps, steps) if isinstance(steps, int) else steps
    if low < 1 or high < low:
        raise UserError(f"sampling.steps = {steps}: need an integer >= 1 or a range [low, high] with 1 <= low <= high")
    return low, high


def _guidance_range(guidance: float | tuple[float, float]) -> tuple[float, float]:
    low, high = (guidance, guidance) if isinstance(guidance, (int, float)) else guidance
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < low or high > MAX_GUIDANCE:
        raise UserError(
            f"sampling.guidance_scale = {guidance}: need a number in [0, {MAX_GUIDANCE}] or a range [low, high] within it "
            "(far above ~20 the images saturate to flat colours)"
        )
    return float(low), float(high)


def _pick(cumulative: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Weighted choice per draw; zero-weight entries are never picked."""
    chosen = np.searchsorted(cumulative, _unit(draws) * cumulative[-1], side="right")
    # float rounding at the top end: the last positive-weight entry
    return np.minimum(chosen, np.searchsorted(cumulative, cumulative[-1], side="left"))


def _unit(draws: np.ndarray) -> np.ndarray:
    """64-bit draws → floats in [0, 1) (the top 53 bits)."""
    return (draws >> _S11).astype(np.float64) * 2.0**-53


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
