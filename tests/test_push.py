"""Publishing: the dataset card that makes `load_dataset(RUN)` work, `dreamshard push` (dry run, a local
folder as the repository, an unreachable Hub), the model card of a personalised output. The Hub itself is
not reachable here: everything up to the upload call runs for real, the upload goes to a local folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import DatasetCard, ModelCard
from test_tools import samples
from typer.testing import CliRunner

from dreamshard.cli import app
from dreamshard.config import PersonalizeConfig
from dreamshard.format.rundir import write_dataset
from dreamshard.personalize.card import hub_id, model_card


@pytest.fixture()
def run(tmp_path):
    record = {"config": {"mode": "img2img", "output": {"license": "cc-by-4.0"}}, "fingerprint": "f" * 16, "model": {"id": "org/sd", "hash": "abc"}}
    write_dataset(tmp_path / "run", samples(25, seg=True), samples_per_shard=10, image_format="png", record=record)
    return tmp_path / "run"


def load(path, tmp_path):
    from datasets import load_dataset

    return load_dataset(str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))


def test_a_complete_run_has_a_card_and_load_dataset_reads_it(run, tmp_path):
    card = DatasetCard.load(run / "README.md")
    assert card.data.task_categories == ["image-segmentation"]  # its samples carry seg.png (the record's `label`)
    assert card.data.license == "cc-by-4.0" and card.data.configs[0]["data_files"] == [{"split": "train", "path": "shards/*.tar"}]
    assert "| car | 9 | 36.0% |" in card.text and "| rainy | 12 | 48.0% |" in card.text and "`org/sd`" in card.text
    ds = load(run, tmp_path)
    assert ds.num_rows == 25 and {"png", "json", "txt", "seg.png"} <= set(ds.column_names)
    assert sorted(ds["__key__"]) == [f"{i:09d}" for i in range(25)] and ds[3]["json"]["class_name"] == "car"
    (run / "README.md").unlink()  # without the card the builder reads the markers and dreamshard.json as data
    with pytest.raises(Exception):  # noqa: B017 - datasets' error type varies (CastError, DatasetGenerationError)
        load(run, tmp_path / "again")


def test_push_dry_run_lists_the_files_and_writes_a_valid_card(run):
    result = CliRunner().invoke(app, ["push", str(run), "org/name", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["files"] == [
        "README.md",
        "dreamshard.json",
        "shards/000000.tar",
        "shards/000001.tar",
        "shards/000002.tar",
        "manifest.parquet",
        "shards/sizes.json",
    ]
    assert (report["kind"], report["samples"], report["complete"], report["uploaded"]) == ("dataset", 25, True, False)
    assert 'load_dataset("org/name"' in (run / "README.md").read_text()  # the card names where it is pushed


def test_push_takes_only_committed_shards_and_the_copy_loads(run, tmp_path):
    (run / "index" / "000001.commit.json").unlink()  # shard 1 un-committed (as if still being written)
    (run / "index" / "markers.json").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["push", str(run), str(tmp_path / "repo")])
    assert result.exit_code == 0 and "not complete" in result.stdout, result.output
    copied = sorted(str(path.relative_to(tmp_path / "repo")) for path in (tmp_path / "repo").rglob("*") if path.is_file())
    assert copied == ["README.md", "dreamshard.json", "shards/000000.tar", "shards/000002.tar"]  # no manifest of every shard
    assert load(tmp_path / "repo", tmp_path).num_rows == 15
    assert "15 of 25 planned samples" in (tmp_path / "repo" / "README.md").read_text()


def test_an_unreachable_hub_is_one_line_exit_1(run, tmp_path):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}
    out = subprocess.run([sys.executable, "-m", "dreamshard", "push", str(run), "org/name"], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "push to org/name failed" in lines[0] and "re-run" in lines[0]


def test_model_card_and_a_personalised_output_pushes_weights_not_checkpoints(tmp_path):
    config = PersonalizeConfig.model_validate({"train": {"method": "lora", "max_steps": 20}, "instance": {"prompt": "a photo of sks street"}})
    text = model_card(config, "org/sd-base", 20)
    card = ModelCard(text)
    assert card.data.base_model == "org/sd-base" and card.data.instance_prompt == "a photo of sks street" and "lora" in card.data.tags
    assert yaml.safe_load(text.split("---")[1])["library_name"] == "diffusers"
    assert hub_id(str(tmp_path)) is None and "base_model" not in ModelCard(model_card(config, str(tmp_path), 20)).data.to_dict()
    out = tmp_path / "lora"
    for name in (
        "pytorch_lora_weights.safetensors",
        "dreamshard_lora.json",
        "train_log.jsonl",
        "checkpoint-10/pytorch_lora_weights.safetensors",
        "class_images/0.png",
        ".lease",
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (out / "README.md").write_text(text)
    result = CliRunner().invoke(app, ["push", str(out), str(tmp_path / "repo"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == ["README.md", "dreamshard_lora.json", "pytorch_lora_weights.safetensors", "train_log.jsonl"]
