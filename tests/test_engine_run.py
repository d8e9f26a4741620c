"""The generation engine end to end: tiny model, local Ray, real shards read back by webdataset and HF
datasets; determinism, extension, fingerprint refusal and bad input."""

from __future__ import annotations

import glob
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from dreamshard.cli import app
from dreamshard.config import GenerateConfig
from dreamshard.engine.plan import build_plan
from dreamshard.engine.run import choose_output, generate
from dreamshard.errors import UserError
from dreamshard.format.reader import committed_shards, manifest_rows, read_manifest
from dreamshard.format.store import Store
from dreamshard.identity import Identity
from dreamshard.tools.verify import verify_dataset

N, PER_SHARD = 120, 30


def make_config(model: Path, out: Path, **run) -> GenerateConfig:
    return GenerateConfig.model_validate(
        {
            "model": {"path": str(model), "device": "cpu"},
            "prompts": {
                "classes": ["car", "bus", "truck"],
                "templates": [{"text": "a photo of a {token} {cls}"}, {"text": "a {token} {cls} at {time}"}],
                "styles": {"time": ["night", "dawn"]},
            },
            "sampling": {"width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0},
            "output": {"path": str(out), "samples_per_shard": PER_SHARD},
            "run": {"num_samples": N, "batch_size": 8, "workers": 2, "seed": 3, **run},
        }
    )


def read_tars(out: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(glob.glob(f"{out}/shards/*.tar")), shardshuffle=False))


def tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def tar_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "shards").glob("*.tar"))}


@pytest.fixture(scope="module")
def first_run(ray_cluster, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    config = make_config(tiny_model, out)
    return config, out, generate(config, show_progress=False)


@pytest.mark.slow
def test_end_to_end_shards_read_back_with_webdataset_and_datasets(first_run):
    config, out, summary = first_run
    assert summary.ok and summary.samples == N and summary.shards == 4 and summary.shards_generated == 4
    assert summary.images_generated == N and summary.bytes == sum(p.stat().st_size for p in (out / "shards").glob("*.tar"))

    samples = read_tars(out)
    keys = [sample["__key__"] for sample in samples]
    assert keys == [f"{i:09d}" for i in range(N)]  # unique, contiguous, in order
    assert {frozenset(k for k in s if not k.startswith("__")) for s in samples} == {frozenset({"jpg", "txt", "json"})}

    plan = build_plan(config.prompts, config.sampling, config.run.seed)
    for sample in samples:
        meta = json.loads(sample["json"])
        spec = plan.spec(meta["index"]).metadata()
        spec["style"] = {"time": spec["style"].get("time")}  # every axis in every sample, null where unused
        assert {k: meta[k] for k in spec} == spec
        assert meta["key"] == sample["__key__"] and meta["shard"] == meta["index"] // PER_SHARD
        assert sample["txt"].decode() == spec["prompt"]
        assert meta["mode"] == "txt2img" and meta["source_key"] == "" and meta["model"]["id"] == str(config.model.path)
    styles = [json.loads(s["json"])["style"]["time"] for s in samples]
    assert None in styles and {"night", "dawn"} <= set(styles)  # recorded where printed, null elsewhere

    from datasets import load_dataset

    hf = load_dataset(str(out), split="train", cache_dir=str(out.parent / "hf-cache"))  # the run's own card (README.md) says what to read
    assert hf.num_rows == N and sorted(hf["__key__"]) == keys
    assert hf[5]["jpg"].size == (64, 64) and hf[5]["json"]["index"] == 5
    assert [row["style"]["time"] for row in hf["json"]] == styles  # no axis lost to schema inference

    assert json.loads((out / "shards" / "sizes.json").read_text()) == {f"{k:06d}.tar": PER_SHARD for k in range(4)}
    rows = manifest_rows(read_manifest(out))
    assert [row["key"] for row in rows] == keys
    record = json.loads((out / "dreamshard.json").read_text())
    assert record["fingerprints"]["plan"] == plan.fingerprint and record["num_samples"] == N
    assert verify_dataset(out) == []


def pixels(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)), dtype=np.int16)


@pytest.mark.slow
def test_same_config_same_images_and_extension_keeps_existing_shards(first_run, tmp_path):
    config, out_a, _ = first_run
    out_b = tmp_path / "b"
    one_worker = config.model_copy(deep=True)
    one_worker.run.workers = 1  # the worker count must not change any sample
    # 45 samples: shard 0 full, shard 1 short (30..44), filled up by the extension below
    first = generate(one_worker, out=str(out_b), num_samples=45, show_progress=False)
    assert first.ok and first.shards == 2
    reference = {s["__key__"]: s for s in read_tars(out_a)}
    for sample in read_tars(out_b):
        ref = reference[sample["__key__"]]
        assert sample["txt"] == ref["txt"] and json.loads(sample["json"])["seed"] == json.loads(ref["json"])["seed"]
        if int(sample["__key__"]) < PER_SHARD:  # same shard, same batches: the same bytes
            assert sample["jpg"] == ref["jpg"]
        else:  # a short shard batches its tail differently: float rounding only
            assert np.abs(pixels(sample["jpg"]) - pixels(ref["jpg"])).max() <= 3

    before = tar_stats(out_b)
    extended = generate(one_worker, out=str(out_b), num_samples=N, show_progress=False)
    assert extended.ok and extended.shards_skipped == 1 and extended.shards_generated == 3
    after = tar_stats(out_b)
    assert after["000000.tar"] == before["000000.tar"]  # committed full shard untouched
    assert sorted(after) == [f"{k:06d}.tar" for k in range(4)]
    assert [(s["__key__"], s["jpg"]) for s in read_tars(out_b)] == [(k, s["jpg"]) for k, s in reference.items()]
    assert verify_dataset(out_b) == []
    # The marker snapshot the driver leaves is the markers themselves (the refilled short shard included).
    snapshot = json.loads((out_b / "index" / "markers.json").read_text())["markers"]
    assert {int(k): v["marker"] for k, v in snapshot.items()} == committed_shards(Store(out_b), PER_SHARD, use_snapshot=False)
    # Tars are reproducible: another output, worker count and time, the same plan and weights: the same bytes.
    assert tar_digests(out_b) == tar_digests(out_a) and len(tar_digests(out_a)) == 4

    again = generate(one_worker, out=str(out_b), show_progress=False)  # complete already: nothing to do
    assert again.ok and again.shards_generated == 0 and again.shards_skipped == 4 and tar_stats(out_b) == after


@pytest.mark.slow
def test_different_dataset_is_refused_before_any_work(first_run, tmp_path):
    config, out, _ = first_run
    before = tar_stats(out)
    other = config.model_copy(deep=True)
    other.run.seed = 99
    with pytest.raises(UserError, match="different plan"):
        generate(other, show_progress=False)
    other_layout = config.model_copy(deep=True)
    other_layout.output.image_format = "png"
    with pytest.raises(UserError, match="different layout"):
        generate(other_layout, show_progress=False)
    with pytest.raises(UserError, match="would drop"):
        generate(config, num_samples=50, show_progress=False)
    assert tar_stats(out) == before and verify_dataset(out) == []

    # --force-new: the first sibling that is new or holds this same dataset, so a re-run resumes there
    parts = json.loads((out / "dreamshard.json").read_text())["fingerprint_parts"]
    changed = Identity({**parts, "plan": "0" * 64})
    assert choose_output(str(out), Identity(parts), force_new=False).url == str(out)
    assert choose_output(str(out), changed, force_new=True).url == f"{out}-2"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("someone else's files")
    with pytest.raises(UserError, match="not a dreamshard run directory"):
        choose_output(str(tmp_path / "x"), Identity(parts), force_new=False)


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output  # stdout and stderr as a terminal shows them


@pytest.mark.parametrize(
    "problem, sets, match",
    [
        ("missing model", ["model.path=./no/such/model"], "does not exist"),
        ("unknown placeholder", ["prompts.templates=[{text: 'a {colour} car'}]"], "colour"),
        ("unknown class weight", ["prompts.balance=weighted", "prompts.class_weights={spaceship: 2}"], "spaceship"),
        ("zero samples", ["run.num_samples=0"], "num_samples"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_model, tmp_path, problem, sets, match):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(make_config(tiny_model, tmp_path / "out").model_dump(mode="json")))
    args = ["generate", str(config)] + [arg for item in sets for arg in ("--set", item)]
    code, output = run_cli(*args)
    assert code == 2, output
    assert match in output and "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written before the input is known good


def test_unwritable_output_is_one_line_exit_2(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(make_config(tiny_model, blocker / "out").model_dump(mode="json")))
    code, output = run_cli("generate", str(config))
    assert code == 2 and "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    assert "a-file" in output


@pytest.mark.slow
def test_shard_with_an_unreadable_index_is_regenerated(first_run, tmp_path):
    import shutil

    config, out, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "index" / "000001.parquet").write_bytes(b"PAR1 damaged")  # its marker's parquet_bytes no longer match
    summary = generate(config, out=str(copy), show_progress=False)
    assert summary.ok and summary.shards_skipped == 3 and summary.shards_generated == 1
    assert verify_dataset(copy) == [] and tar_digests(copy) == tar_digests(out)

    # A tar damaged at the same size passes the size check of every scan; `--verify` checks its sha256.
    tar = copy / "shards" / "000002.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:700] + bytes(255 - b for b in data[700:1300]) + data[1300:])
    assert generate(config, out=str(copy), show_progress=False).shards_generated == 0  # trusted by size
    assert any("tar sha256 differs" in problem and "dreamshard repair" in problem for problem in verify_dataset(copy))
    summary = generate(config, out=str(copy), show_progress=False, verify=True)
    assert summary.ok and summary.shards_generated == 1 and summary.shards_skipped == 3
    assert verify_dataset(copy) == [] and tar_digests(copy) == tar_digests(out)


def test_plan_says_what_generate_would_do_without_ray_or_model(first_run, tmp_path):
    config, out, _ = first_run
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    code, output = run_cli("plan", str(config_file), "-n", "3")
    assert code == 0 and "generate would: complete" in output and f"{N} samples in 4 shards" in output, output
    code, output = run_cli("plan", str(config_file), "--num-samples", str(N + PER_SHARD))
    assert code == 0 and "generate would: extend" in output and "4 of 5 shards committed" in output, output
    code, output = run_cli("plan", str(config_file), "--set", "run.seed=99")
    assert code == 2 and "generate would: refuse" in output and "different plan" in output, output
    # No model here (planning a cluster run on a laptop): the recipe config as shipped, model absent.
    code, output = run_cli("plan", str(Path(__file__).resolve().parents[1] / "configs/datum_gta2cityscapes.yaml"), "--out", str(tmp_path / "new"))
    assert code == 0 and "generate would: fresh" in output and "sks" in output, output
