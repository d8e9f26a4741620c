"""The sample plan: determinism, independence of chunking and num_samples, balancing, ranges, fingerprint,
bad input, and the recipe configs in configs/."""

from __future__ import annotations

import collections
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dreamshard.config import GenerateConfig, OutputConfig, PromptsConfig, RunConfig, SamplingConfig, load_config
from dreamshard.datasets.labels import CLASSES as CITYSCAPES_CLASSES
from dreamshard.engine.plan import SampleSpec, build_plan
from dreamshard.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["datum_gta2cityscapes", "didex_styles", "clouds_prompts"]

DIDEX_LIKE = dict(
    classes=list(CITYSCAPES_CLASSES),
    balance="least_generated",
    templates=[
        {"text": "a photo; {location}, {cls}, {weather}", "weight": 3},
        {"text": "a photo of a {token} street at {time_of_day}", "weight": 1},  # no class
    ],
    styles={"location": ["europe", "USA"], "weather": ["rain", "fog", "snow"], "time_of_day": ["dusk", "night"]},
)
RANGES = SamplingConfig(steps=(10, 14), guidance_scale=(3.0, 9.0))


def make_plan(seed: int = 0, sampling: SamplingConfig | None = None, **prompts):
    return build_plan(PromptsConfig(**prompts), sampling or SamplingConfig(), seed)


def as_json(specs: list[SampleSpec]) -> str:
    return json.dumps([spec.metadata() for spec in specs], sort_keys=True)


def test_datum_round_robin_and_seeds():
    plan = make_plan(classes=["car", "bus", "person"], token="sks")
    specs = plan.specs(0, 7)
    assert [spec.class_name for spec in specs] == ["car", "bus", "person", "car", "bus", "person", "car"]
    assert [spec.class_id for spec in specs] == [0, 1, 2, 0, 1, 2, 0]
    assert specs[1].prompt == "a photo of a sks bus" and specs[1].template == "a photo of a {token} {cls}"
    assert [spec.index for spec in specs] == list(range(7))
    seeds = [spec.seed for spec in plan.specs(0, 2000)]
    assert len(set(seeds)) == 2000 and all(0 <= seed < 2**63 for seed in seeds)
    assert specs[0].style == {} and specs[0].extra == {} and (specs[0].steps, specs[0].guidance_scale) == (50, 7.5)
    assert make_plan(seed=1, classes=["car", "bus", "person"]).spec(0).seed != specs[0].seed


@pytest.mark.parametrize("balance", ["round_robin", "weighted", "least_generated"])
def test_deterministic_and_independent_of_chunking_and_num_samples(balance):
    config = dict(DIDEX_LIKE, balance=balance)
    whole = make_plan(sampling=RANGES, **config).specs(0, 600)
    assert as_json(whole) == as_json(make_plan(sampling=RANGES, **config).specs(0, 600))
    # shards in any order and size, single specs: the same samples
    for order in (list, reversed):
        chunked = make_plan(sampling=RANGES, **config)
        pieces = {start: chunked.specs(start, min(start + 97, 600)) for start in order(range(0, 600, 97))}
        assert as_json([spec for start in sorted(pieces) for spec in pieces[start]]) == as_json(whole)
    assert make_plan(sampling=RANGES, **config).spec(599) == whole[599]
    # a copy of a plan half-way through (deepcopy rebuilds it through the same reduce protocol Ray's
    # serialiser uses) gives the same samples
    assert as_json(copy.deepcopy(chunked).specs(300, 600)) == as_json(whole[300:])
    # more samples later: the first ones do not move
    assert as_json(make_plan(sampling=RANGES, **config).specs(0, 1200)[:600]) == as_json(whole)


def test_same_specs_and_fingerprint_in_another_process():
    here = make_plan(seed=7, sampling=RANGES, **DIDEX_LIKE)
    code = (
        "import json, sys\n"
        "from dreamshard.config import PromptsConfig, SamplingConfig\n"
        "from dreamshard.engine.plan import build_plan\n"
        "prompts, sampling = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "plan = build_plan(PromptsConfig(**prompts), SamplingConfig(**sampling), 7)\n"
        "print(json.dumps([plan.fingerprint, [s.metadata() for s in plan.specs(100, 140)]]))\n"
    )
    args = [json.dumps(DIDEX_LIKE), RANGES.model_dump_json()]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=REPO)
    fingerprint, specs = json.loads(out.stdout)
    assert fingerprint == here.fingerprint
    assert specs == json.loads(json.dumps([spec.metadata() for spec in here.specs(100, 140)]))


def test_weighted_classes_and_templates_follow_their_weights():
    plan = make_plan(
        classes=["car", "bus", "truck"],
        class_weights={"car": 6, "bus": 3, "truck": 0},
        balance="weighted",
        templates=[{"text": "{cls} one", "weight": 3}, {"text": "{cls} two", "weight": 1}],
    )
    specs = plan.specs(0, 9000)
    classes = collections.Counter(spec.class_name for spec in specs)
    assert classes["truck"] == 0
    assert 0.63 < classes["car"] / 9000 < 0.70  # 2/3
    templates = collections.Counter(spec.template for spec in specs)
    assert 0.72 < templates["{cls} one"] / 9000 < 0.78  # 3/4


def test_least_generated_keeps_counts_within_one():
    plan = make_plan(**DIDEX_LIKE)
    counts = collections.Counter()
    for spec in plan.specs(0, 3000):
        if spec.class_id >= 0:
            counts[spec.class_name] += 1
            per_class = [counts[name] for name in CITYSCAPES_CLASSES]
            assert max(per_class) - min(per_class) <= 1
        else:  # a template without {cls}: no class, not counted
            assert spec.class_name == "" and "{cls}" not in spec.template
    assert 0 < sum(counts.values()) < 3000


def test_least_generated_with_weights_is_proportional():
    plan = make_plan(classes=["car", "bus"], class_weights={"car": 2}, balance="least_generated")
    names = [spec.class_name for spec in plan.specs(0, 300)]
    assert names[:6] == ["car", "car", "bus", "car", "car", "bus"]
    assert collections.Counter(names) == {"car": 200, "bus": 100}


def test_styles_record_only_what_the_template_prints():
    plan = make_plan(sampling=RANGES, **DIDEX_LIKE)
    seen = collections.defaultdict(set)
    for spec in plan.specs(0, 500):
        if spec.class_id >= 0:
            assert set(spec.style) == {"location", "weather"}
            assert spec.prompt == f"a photo; {spec.style['location']}, {spec.class_name}, {spec.style['weather']}"
        else:
            assert set(spec.style) == {"time_of_day"} and spec.prompt.endswith(spec.style["time_of_day"])
        for axis, value in spec.style.items():
            seen[axis].add(value)
    assert {axis: sorted(values) for axis, values in seen.items()} == {axis: sorted(values) for axis, values in DIDEX_LIKE["styles"].items()}


def test_steps_and_guidance_within_ranges():
    specs = make_plan(sampling=RANGES, **DIDEX_LIKE).specs(0, 2000)
    steps = {spec.steps for spec in specs}
    guidance = [spec.guidance_scale for spec in specs]
    assert steps == {10, 11, 12, 13, 14}
    assert all(3.0 <= value <= 9.0 for value in guidance)
    assert min(guidance) < 3.5 and max(guidance) > 8.5
    fixed = make_plan(sampling=SamplingConfig(width=64, height=128, steps=7, guidance_scale=2)).spec(3)
    assert (fixed.steps, fixed.guidance_scale, fixed.width, fixed.height) == (7, 2.0, 64, 128)


def test_file_recipe_cycles_rows_and_keeps_columns(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "tag": 1}\n{"prompt": "b", "tag": 2}\n{"prompt": "c", "tag": 3}\n')
    plan = make_plan(recipe="file", file=str(path), negative_prompt="blurry")
    specs = plan.specs(0, 7)
    assert [spec.prompt for spec in specs] == ["a", "b", "c", "a", "b", "c", "a"]
    assert specs[4].extra == {"tag": 2, "file_row": 1}
    assert (specs[0].class_name, specs[0].class_id, specs[0].template, specs[0].style) == ("", -1, "", {})
    assert specs[0].negative_prompt == "blurry"
    assert plan.describe()["file_prompts"] == 3
    json.dumps(plan.describe())


def test_fingerprint_tracks_what_changes_specs(tmp_path):
    base = dict(DIDEX_LIKE)
    reference = make_plan(sampling=RANGES, **base).fingerprint
    changed = [
        make_plan(seed=1, sampling=RANGES, **base),
        make_plan(sampling=RANGES, **dict(base, token="xyz")),
        make_plan(sampling=RANGES, **dict(base, classes=list(reversed(CITYSCAPES_CLASSES)))),
        make_plan(sampling=RANGES, **dict(base, class_weights={"car": 2})),
        make_plan(sampling=RANGES, **dict(base, balance="weighted")),
        make_plan(sampling=RANGES, **dict(base, negative_prompt="ugly")),
        make_plan(sampling=RANGES, **dict(base, styles={**base["styles"], "weather": ["rain", "fog"]})),
        make_plan(sampling=RANGES.model_copy(update={"steps": (10, 15)}), **base),
        make_plan(sampling=RANGES.model_copy(update={"width": 256}), **base),
    ]
    fingerprints = [plan.fingerprint for plan in changed]
    assert reference not in fingerprints and len(set(fingerprints)) == len(fingerprints)
    # not part of the plan: output, run size, workers; nor the order style axes are listed in
    config = GenerateConfig(prompts=PromptsConfig(**base), sampling=RANGES)
    other = config.model_copy(update={"output": OutputConfig(path="x"), "run": RunConfig(num_samples=5, workers=9)})
    assert build_plan(other.prompts, other.sampling, other.run.seed).fingerprint == reference
    reordered = dict(base, styles=dict(reversed(list(base["styles"].items()))))
    assert make_plan(sampling=RANGES, **reordered).fingerprint == reference
    # prompt files: the content counts, not the path
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("a\nb\n")
    two.write_text("a\nb\n")
    same = [make_plan(recipe="file", file=str(path)).fingerprint for path in (one, two)]
    two.write_text("a\nc\n")
    assert same[0] == same[1] != make_plan(recipe="file", file=str(two)).fingerprint


@pytest.mark.parametrize(
    "prompts, sampling, needle",
    [
        ({"templates": [{"text": "a {cls} in {wether}"}]}, {}, "{wether}"),
        ({"classes": ["car"], "class_weights": {"buss": 1}, "balance": "weighted"}, {}, "'buss'"),
        ({"classes": []}, {}, "prompts.classes is empty"),
        ({"recipe": "file", "file": "no/such/prompts.txt"}, {}, "no/such/prompts.txt"),
        ({"recipe": "file"}, {}, "prompts.file is not set"),
        ({}, {"width": 500}, "sampling.width"),
        ({}, {"height": 0}, "sampling.height"),
        ({}, {"steps": (30, 20)}, "sampling.steps"),
        ({}, {"steps": 0}, "sampling.steps"),
        ({}, {"guidance_scale": (9.0, 3.0)}, "sampling.guidance_scale"),
        ({}, {"guidance_scale": -1}, "sampling.guidance_scale"),
    ],
)
def test_bad_input_is_one_user_error_naming_it(prompts, sampling, needle):
    with pytest.raises(UserError) as err:
        build_plan(PromptsConfig(**prompts), SamplingConfig(**sampling), 0)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_templates_without_cls_ignore_classes():
    plan = make_plan(classes=[], templates=[{"text": "a photo of a {token} urban scene"}])
    spec = plan.spec(3)
    assert (spec.prompt, spec.class_name, spec.class_id) == ("a photo of a sks urban scene", "", -1)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_configs_load_and_plan(name, monkeypatch):
    monkeypatch.chdir(REPO)  # prompt files are relative to the working directory
    config = load_config(REPO / "configs" / f"{name}.yaml", GenerateConfig)
    plan = build_plan(config.prompts, config.sampling, config.run.seed)
    specs = plan.specs(0, 50)
    assert all(spec.prompt.strip() for spec in specs)
    json.dumps(plan.describe())
    json.dumps([spec.metadata() for spec in specs])
    assert len({spec.prompt for spec in specs}) >= 10
    if name.startswith("datum"):
        # DATUM's wording: no article, plural noun (class_words); the class name stays singular
        assert specs[0].prompt == "a photo of sks traffic lights" and specs[10].class_name == "traffic light"
