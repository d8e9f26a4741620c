"""Prompt text: placeholders, template / class / style checks, prompt files (txt, jsonl, parquet)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dreamshard.config import PromptsConfig, TemplateConfig
from dreamshard.datasets.labels import CLASSES as CITYSCAPES_CLASSES
from dreamshard.engine.prompts import (
    check_classes,
    check_templates,
    placeholders,
    read_prompt_file,
)
from dreamshard.errors import UserError


def test_cityscapes_classes_in_train_id_order():
    assert len(CITYSCAPES_CLASSES) == 19
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[11] == "person"
    assert CITYSCAPES_CLASSES[13] == "car" and CITYSCAPES_CLASSES[18] == "bicycle"
    assert len(set(CITYSCAPES_CLASSES)) == 19


def test_placeholders_in_order_of_first_use_and_literal_braces():
    assert placeholders("{cls} in {weather}, {cls} {{not}} {token}", "t") == ("cls", "weather", "token")
    assert placeholders("no fields", "t") == ()


@pytest.mark.parametrize("text", ["a {} b", "a {0}", "a {cls.upper}", "a {cls!r}", "a {cls:>9}", "a {cls", "a }"])
def test_non_plain_placeholders_are_user_errors(text):
    with pytest.raises(UserError, match="prompts.templates"):
        placeholders(text, "prompts.templates[0]")


def test_templates_fill_and_negative_prompt_fallback():
    prompts = PromptsConfig(
        negative_prompt="blurry",
        templates=[TemplateConfig(text="{token} {cls} at {time}"), TemplateConfig(text="x", negative_prompt="ugly")],
        styles={"time": ["night"]},
    )
    first, second = check_templates(prompts)
    assert first.fill({"token": "sks", "cls": "car", "time": "night"}) == "sks car at night"
    assert first.uses_class and not second.uses_class
    assert (first.negative_prompt, second.negative_prompt) == ("blurry", "ugly")


def test_unknown_placeholder_names_template_and_known_ones():
    prompts = PromptsConfig(templates=[TemplateConfig(text="a {cls} in {wether}")], styles={"weather": ["rain"]})
    with pytest.raises(UserError) as err:
        check_templates(prompts)
    message = str(err.value)
    assert "{wether}" in message and "a {cls} in {wether}" in message and "{weather}" in message


@pytest.mark.parametrize(
    "prompts, needle",
    [
        (PromptsConfig(templates=[]), "prompts.templates is empty"),
        (PromptsConfig(templates=[TemplateConfig(text="{cls}", weight=0)]), "every weight is 0"),
        (PromptsConfig(templates=[TemplateConfig(text="{cls}", weight=-1)]), "prompts.templates[0].weight"),
        (PromptsConfig(styles={"weather": []}), "prompts.styles.weather is empty"),
        (PromptsConfig(styles={"cls": ["x"]}), "'cls'"),
        (PromptsConfig(styles={"time of day": ["x"]}), "'time of day'"),
        (PromptsConfig(token=" "), "prompts.token is empty"),
    ],
)
def test_bad_templates_and_styles(prompts, needle):
    with pytest.raises(UserError, match=None) as err:
        check_templates(prompts)
    assert needle in str(err.value)


def test_class_weights_align_with_classes():
    prompts = PromptsConfig(classes=["car", "bus", "truck"], class_weights={"bus": 3}, balance="weighted")
    assert check_classes(prompts) == [1.0, 3.0, 1.0]


@pytest.mark.parametrize(
    "prompts, needles",
    [
        (
            PromptsConfig(classes=["car", "bus"], class_weights={"buss": 2}, balance="weighted"),
            ["'buss'", "car, bus"],
        ),
        (PromptsConfig(classes=[]), ["prompts.classes is empty"]),
        (PromptsConfig(classes=["car", "car"]), ["'car' twice"]),
        (PromptsConfig(classes=["car", ""]), ["empty class name"]),
        (PromptsConfig(classes=["car"], class_weights={"car": 2}), ["round_robin"]),
        (PromptsConfig(classes=["car"], class_weights={"car": 0}, balance="weighted"), ["weight 0"]),
        (PromptsConfig(classes=["car"], class_weights={"car": float("nan")}, balance="weighted"), ["car"]),
    ],
)
def test_bad_classes(prompts, needles):
    with pytest.raises(UserError) as err:
        check_classes(prompts)
    for needle in needles:
        assert needle in str(err.value)


def test_txt_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\nfirst prompt\n  # indented comment\n  second prompt  \n\n", encoding="utf-8")
    file = read_prompt_file(str(path), "prompt")
    assert file.prompts == ("first prompt", "second prompt")
    assert file.extras == ({}, {})
    assert len(file.digest) == 64


def test_jsonl_and_parquet_keep_other_columns(tmp_path):
    rows = [
        {"text": "a rainy street", "source": "llm", "score": 0.5},
        {"text": "a snowy road", "source": "me", "score": 1},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        file = read_prompt_file(str(path), "text")
        assert file.prompts == ("a rainy street", "a snowy road")
        assert [extra["source"] for extra in file.extras] == ["llm", "me"]
        assert "text" not in file.extras[0]
        json.dumps(file.extras)  # JSON-ready


def test_digest_follows_content_not_path(tmp_path):
    one, two = tmp_path / "a.txt", tmp_path / "b.txt"
    one.write_text("x\ny\n")
    two.write_text("x\ny\n")
    assert read_prompt_file(str(one), "prompt").digest == read_prompt_file(str(two), "prompt").digest
    two.write_text("x\nz\n")
    assert read_prompt_file(str(one), "prompt").digest != read_prompt_file(str(two), "prompt").digest


@pytest.mark.parametrize(
    "name, content, column, needle",
    [
        ("missing.txt", None, "prompt", "cannot read"),
        ("empty.txt", "# only a comment\n\n", "prompt", "no prompts"),
        ("p.csv", "a\n", "prompt", "unsupported type .csv"),
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "prompt", "line 2 is not valid JSON"),
        ("p.jsonl", '["a list"]\n', "prompt", "not a JSON object"),
        ("p.jsonl", '{"text": "ok"}\n', "prompt", "column 'prompt'"),
        ("p.jsonl", '{"prompt": "ok", "file_row": 3}\n', "prompt", "file_row"),
        ("p.parquet", "not parquet", "prompt", "not a readable Parquet file"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, column, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_prompt_file(str(path), column)
    assert needle in str(err.value) and name in str(err.value)


def test_file_recipe_without_file_is_user_error():
    with pytest.raises(UserError, match="prompts.file is not set"):
        read_prompt_file(None, "prompt")


def test_prompt_files_as_editors_save_them(tmp_path):
    """A byte-order mark, comment lines, Windows line ends, and Unicode line separators inside a prompt (which
    str.splitlines would break on, shifting every later prompt): lines end at newlines only."""
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeff# scenes\r\nfirst\u2028still the first\r\nsecond\x85x\n\n# done\nthird\n".encode())
    read = read_prompt_file(str(txt), "prompt")
    assert read.prompts == ("first\u2028still the first", "second\x85x", "third") and read.read_differently
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes('\ufeff// made by hand\n{"prompt": "a\u2029b"}\n# skipped\n{"prompt": "c"}\n'.encode())
    assert read_prompt_file(str(jsonl), "prompt").prompts == ("a\u2029b", "c")
    plain = tmp_path / "plain.txt"
    plain.write_text("first\nsecond\n")
    assert not read_prompt_file(str(plain), "prompt").read_differently  # ordinary files keep their plan fingerprint
