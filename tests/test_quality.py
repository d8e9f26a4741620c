"""Quality metadata and filtering: CLIP scores, the safety checker's verdict, blank images, redraws from each
sample's own seed stream (exactly num_samples, reproducible), the record fields and `inspect`."""

from __future__ import annotations

import hashlib
import io
import statistics

import numpy as np
import pyarrow as pa
import pytest
from modelfiles import with_safety_checker
from PIL import Image
from typer.testing import CliRunner

from dreamshard.cli import app
from dreamshard.config import GenerateConfig, validate
from dreamshard.engine.models import model_identity
from dreamshard.engine.plan import build_plan
from dreamshard.engine.quality import ClipScorer, QualityJudge, attempt_seed
from dreamshard.engine.records import fingerprint_parts
from dreamshard.engine.run import generate
from dreamshard.engine.worker import GenerationWorker
from dreamshard.errors import ConfigError, UserError
from dreamshard.format.layout import FORMAT_VERSION
from dreamshard.format.reader import manifest_rows, read_manifest
from dreamshard.format.record import DEFAULTS, JSON_FIELDS, PARQUET_SCHEMA
from dreamshard.tools.inspect import inspect_dataset
from dreamshard.tools.verify import verify_dataset

N = 12


def config_for(model, out, quality=None, **run) -> GenerateConfig:
    return GenerateConfig.model_validate({
        "model": {"path": str(model), "device": "cpu"},
        "prompts": {"classes": ["car", "bus", "truck"], "templates": [{"text": "a photo of a {cls}"}]},
        "sampling": {"width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0},
        "output": {"path": str(out), "samples_per_shard": 6, "image_format": "png"},
        "run": {"num_samples": N, "batch_size": 3, "workers": 1, "seed": 3, **run},
        "quality": quality or {},
    })  # fmt: skip


def rows_of(out) -> list[dict]:
    return manifest_rows(read_manifest(out))


def images_of(out) -> dict[str, bytes]:
    import glob

    import webdataset as wds

    return {s["__key__"]: s["png"] for s in wds.WebDataset(sorted(glob.glob(f"{out}/shards/*.tar")), shardshuffle=False)}


def test_the_record_and_the_format_version_carry_the_quality_fields(tiny_model):
    assert JSON_FIELDS[JSON_FIELDS.index("source_key") + 1 :][:3] == ("nsfw", "clip_score", "attempts")
    assert PARQUET_SCHEMA.field("nsfw").type == pa.bool_() and PARQUET_SCHEMA.field("clip_score").type == pa.float64()
    assert (DEFAULTS["nsfw"], DEFAULTS["clip_score"], DEFAULTS["attempts"]) == (None, None, 1)
    config = config_for(tiny_model, "unused")
    parts = fingerprint_parts(config, build_plan(config.prompts, config.sampling, 3), model_identity(config.model))
    assert parts["layout"]["format_version"] == FORMAT_VERSION == 3  # a version-2 run is refused, not mixed
    assert parts["quality"]["max_attempts"] is None  # no filter: max_attempts changes nothing, so it does not count


def test_attempt_seeds_are_a_stream_per_sample():
    assert attempt_seed(123, 1) == 123  # the first draw is the plan's
    stream = [attempt_seed(123, k) for k in range(1, 6)]
    assert len(set(stream)) == 5 and all(0 <= seed < 2**63 for seed in stream)
    assert stream == [attempt_seed(123, k) for k in range(1, 6)] and attempt_seed(124, 2) != stream[1]


def test_bad_quality_settings_are_one_line_before_any_work(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="min_clip_score needs quality.clip_model"):
        validate(GenerateConfig, {"quality": {"min_clip_score": 20}})
    with pytest.raises(ValueError, match="reject_nsfw needs model.safety_checker"):
        GenerateConfig.model_validate({"quality": {"reject_nsfw": True}})
    with pytest.raises(UserError, match="quality.clip_model .* is not a local CLIP model directory"):
        generate(config_for(tiny_model, tmp_path / "out", {"clip_model": str(tmp_path / "no-clip")}), show_progress=False)
    assert not (tmp_path / "out").exists()
    checked = config_for(tiny_model, tmp_path / "out")
    checked.model.safety_checker = True  # the tiny pipeline has none
    with pytest.raises(UserError, match="no loadable safety checker"):
        QualityJudge(checked, "cpu")


def test_blank_images_are_rejected_and_scores_are_per_image(tiny_model, tiny_clip):
    judge = QualityJudge(config_for(tiny_model, "unused", {"reject_blank": True}), "cpu")
    flat, noise = Image.new("RGB", (64, 64), (7, 7, 7)), Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert judge.judge(flat, "a car").reasons == ("blank",) and judge.judge(noise, "a car").reasons == ()
    assert judge.judge(noise, "a car").nsfw is None and judge.judge(noise, "a car").clip_score is None
    scorer = ClipScorer(str(tiny_clip), "cpu")
    assert scorer.score(noise, "a photo of a car") == scorer.score(noise, "a photo of a car") != scorer.score(flat, "a photo of a car")


# ------------------------------------------------------------------------------------------ safety checker


def worker_run(config: GenerateConfig, out) -> tuple[list[dict], list[dict], dict[str, bytes]]:
    """Every shard of `config` made by the worker class in this process, as a Ray actor makes them: (index
    rows, markers, png bytes by key)."""
    from dreamshard.format.layout import shard_counts
    from dreamshard.format.reader import read_index, read_shard
    from dreamshard.format.record import table_to_records
    from dreamshard.format.store import Store

    worker = GenerationWorker(config, str(out), "w", model_identity(config.model))
    worker.ready()
    plan, per_shard = build_plan(config.prompts, config.sampling, config.run.seed), config.output.samples_per_shard
    counts = shard_counts(config.run.num_samples, per_shard)
    markers = [worker.generate_shard(k, plan.specs(k * per_shard, k * per_shard + count)) for k, count in enumerate(counts)]
    store = Store(out)
    rows = [row for k in range(len(counts)) for row in table_to_records(read_index(store, k))]
    return rows, markers, {key: raw["png"] for k in range(len(counts)) for key, raw in read_shard(store, k)}


def tar_digests(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def test_the_safety_checkers_verdict_is_recorded_and_flagged_images_are_redrawn(tiny_model, tmp_path):
    model = with_safety_checker(tiny_model, tmp_path / "checked", threshold=0.095)
    config = config_for(model, tmp_path / "a", num_samples=6)
    config.model.safety_checker = True
    rows, [marker], pngs = worker_run(config, tmp_path / "a")
    flagged = {row["key"] for row in rows if row["nsfw"]}
    assert 0 < len(flagged) < 6 and all(row["nsfw"] in (True, False) for row in rows)
    for key, data in pngs.items():  # flagged and kept: a black frame, as the pipeline would make it
        assert (np.asarray(Image.open(io.BytesIO(data))).max() == 0) == (key in flagged)
    assert marker["quality"] == {"draws": 6, "exhausted": 0, "rejected": {"clip_score": 0, "nsfw": 0, "blank": 0}, "dropped": 0}

    config.quality.reject_nsfw, config.quality.max_attempts = True, 30
    redrawn, [marker], redrawn_pngs = worker_run(config, tmp_path / "b")
    assert not any(row["nsfw"] for row in redrawn) and marker["quality"]["exhausted"] == 0
    assert {row["key"] for row in redrawn if row["attempts"] > 1} == flagged  # the same first draws: the same verdicts
    assert marker["quality"]["rejected"]["nsfw"] + marker["quality"]["dropped"] == marker["quality"]["draws"] - 6
    assert all(redrawn_pngs[key] == pngs[key] for key in pngs if key not in flagged)
    for row in redrawn:
        plan_seed = next(r["seed"] for r in rows if r["key"] == row["key"])
        assert row["seed"] == attempt_seed(plan_seed, row["attempts"])


# ------------------------------------------------------------------------------------------------ CLIP filter


@pytest.fixture(scope="module")
def unfiltered(tiny_model, tiny_clip, tmp_path_factory):
    """The plan scored but not filtered (the worker class in this process): (index rows, png bytes)."""
    out = tmp_path_factory.mktemp("quality") / "unfiltered"
    rows, _, pngs = worker_run(config_for(tiny_model, out, {"clip_model": str(tiny_clip)}), out)
    return rows, pngs


def test_clip_scores_are_recorded_for_every_sample(unfiltered, tiny_clip):
    rows, pngs = unfiltered
    assert len(rows) == N and all(row["attempts"] == 1 and row["nsfw"] is None for row in rows)
    scores = [row["clip_score"] for row in rows]
    assert len(set(scores)) == N  # images differ, so do their scores
    scorer = ClipScorer(str(tiny_clip), "cpu")
    for row in rows[:3]:  # png is lossless: the stored image scores what was recorded
        assert scorer.score(Image.open(io.BytesIO(pngs[row["key"]])), row["prompt"]) == row["clip_score"]


@pytest.mark.slow
def test_a_median_clip_threshold_keeps_num_samples_all_above_it_reproducibly(ray_cluster, unfiltered, tiny_model, tiny_clip, tmp_path):
    before, old_pngs = {row["key"]: row for row in unfiltered[0]}, unfiltered[1]
    median = statistics.median(row["clip_score"] for row in before.values())
    quality = {"clip_model": str(tiny_clip), "min_clip_score": median, "max_attempts": 30}
    summary = generate(config_for(tiny_model, tmp_path / "filtered", quality), show_progress=False)
    assert summary.ok and summary.samples == N and verify_dataset(tmp_path / "filtered") == []
    rows, pngs = rows_of(tmp_path / "filtered"), images_of(tmp_path / "filtered")
    assert [row["key"] for row in rows] == sorted(before) and all(row["clip_score"] >= median for row in rows)
    redrawn = [row for row in rows if row["attempts"] > 1]
    assert redrawn and {row["key"] for row in redrawn} == {key for key, row in before.items() if row["clip_score"] < median}
    for row in rows:
        assert row["prompt"] == before[row["key"]]["prompt"]
        assert row["seed"] == attempt_seed(before[row["key"]]["seed"], row["attempts"])
        if row["attempts"] == 1:  # accepted at the first draw: the unfiltered run's very image
            assert pngs[row["key"]] == old_pngs[row["key"]]

    info = inspect_dataset(tmp_path / "filtered")
    assert info.quality.exhausted == 0 and info.quality.rejected["clip_score"] + info.quality.dropped == info.quality.draws - N > 0
    assert sum(count for _, _, count in info.quality.histogram()) == N
    output = CliRunner().invoke(app, ["inspect", str(tmp_path / "filtered")]).output
    assert "clip_score histogram" in output and "rejected: clip_score" in output and "attempts per sample" in output

    # Made again, by another worker (this process instead of a Ray actor): the same shards, byte for byte.
    worker_run(config_for(tiny_model, tmp_path / "again", quality), tmp_path / "again")
    assert tar_digests(tmp_path / "again") == tar_digests(tmp_path / "filtered") and len(tar_digests(tmp_path / "again")) == 2
