"""Every worker busy, every call full, read from what the runs record (stats.jsonl): ZoDi's per-domain
strengths with a tiny ControlNet, a CLIP filter at the median, more workers than shards used to allow, and
a straggler finished by a backup copy; re-runs give the same bytes."""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import sourcedata
from ray import cloudpickle

from dreamshard.config import GenerateConfig, load_config
from dreamshard.engine.run import generate
from dreamshard.engine.worker import GenerationWorker
from dreamshard.format.reader import manifest_rows, read_manifest
from dreamshard.tools.verify import verify_dataset

REPO = Path(__file__).resolve().parents[1]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the slow worker class travels by value


def last_stats(out: Path) -> dict:
    return json.loads((out / "stats.jsonl").read_text().splitlines()[-1])


def tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory) -> Path:
    from dreamshard.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("cn") / "cn", "tiny-controlnet")


def zodi_config(model: Path, controlnet: Path, source: Path, out: Path) -> GenerateConfig:
    """configs/zodi_controlnet.yaml as shipped, on tiny weights and 24 source images: its five domains, three
    strengths, stochastic inversion and 20 DDIM steps cut to 4; the shard size `auto` picks for its 14,875."""
    return load_config(
        REPO / "configs/zodi_controlnet.yaml",
        GenerateConfig,
        [f"model.path={model}", f"model.controlnet={controlnet}", f"source.root={source}", f"output.path={out}", "output.samples_per_shard=59",
         "sampling.width=64", "sampling.height=32", "sampling.steps=4", "run.num_samples=120", "run.workers=2", "condition.palette=cityscapes"],
    )  # fmt: skip


@pytest.mark.slow
def test_zodis_strengths_fill_every_call_and_rerun_is_byte_identical(ray_cluster, tiny_model, controlnet, tmp_path):
    source = tmp_path / "cityscapes"
    sourcedata.write_cityscapes(source, n=24, size=(96, 48))
    config = zodi_config(tiny_model, controlnet, source, tmp_path / "zodi")
    assert config.run.batch_size == 4 and len(set(config.condition.strength_by_style.values())) == 3
    summary = generate(config, show_progress=False)
    assert summary.ok and verify_dataset(tmp_path / "zodi") == []
    stats = last_stats(tmp_path / "zodi")
    assert stats["images_per_call"] >= 0.9 * config.run.batch_size, stats  # before: 2.8 calls of 1.43 images per batch of 4
    assert all(worker["calls"] > 0 and worker["pipeline_s"] > 0 for worker in stats["workers"])
    again = generate(config, out=str(tmp_path / "again"), show_progress=False)
    assert again.ok and tar_digests(tmp_path / "again") == tar_digests(tmp_path / "zodi")


def filtered_config(model: Path, clip: Path, out: Path, median: float | None = None) -> GenerateConfig:
    quality = {"clip_model": str(clip)} | ({"min_clip_score": median, "max_attempts": 40} if median is not None else {})
    return GenerateConfig.model_validate({
        "model": {"path": str(model), "device": "cpu"},
        "prompts": {"classes": ["car", "bus", "truck"], "templates": [{"text": "a photo of a {cls}"}]},
        "sampling": {"width": 32, "height": 32, "steps": 2, "guidance_scale": [3.0, 9.0]},
        "output": {"path": str(out), "samples_per_shard": 64},
        "run": {"num_samples": 64, "batch_size": 4, "workers": 1, "seed": 11},
        "quality": quality,
    })  # fmt: skip


@pytest.mark.slow
def test_a_median_clip_filter_redraws_in_full_calls(ray_cluster, tiny_model, tiny_clip, tmp_path):
    scored = generate(filtered_config(tiny_model, tiny_clip, tmp_path / "scored"), show_progress=False)
    assert scored.ok and last_stats(tmp_path / "scored")["images_per_call"] == 4.0  # a guidance range, still full calls
    median = statistics.median(row["clip_score"] for row in manifest_rows(read_manifest(tmp_path / "scored")))
    config = filtered_config(tiny_model, tiny_clip, tmp_path / "filtered", median)
    assert generate(config, show_progress=False).ok
    rows = manifest_rows(read_manifest(tmp_path / "filtered"))
    assert len(rows) == 64 and all(row["clip_score"] >= median for row in rows) and any(row["attempts"] > 1 for row in rows)
    stats = last_stats(tmp_path / "filtered")
    assert stats["images_per_call"] >= 0.75 * 4, stats  # before: redraws in rounds of the one or two rejected
    assert generate(config, out=str(tmp_path / "again"), show_progress=False).ok
    assert tar_digests(tmp_path / "again") == tar_digests(tmp_path / "filtered")


class SlowOnShardZero(GenerationWorker):
    """The generation worker on a slow GPU: 1.5 s more per shard (so the run outlasts every worker's start, on a
    loaded machine too), and 60 s more on the first copy of shard 0 (a straggler)."""

    def generate_shard(self, shard, specs, attempt=0, backup=False):
        deadline = time.monotonic() + (60 if shard == 0 and not backup else 1.5)
        while time.monotonic() < deadline and self._copies.get((shard, attempt)) != "aborted":
            time.sleep(0.1)
        return super().generate_shard(shard, specs, attempt, backup)


@pytest.mark.slow
def test_more_workers_than_the_old_shard_count_all_work_and_a_straggler_is_backed_up(ray_cluster, tiny_model, tmp_path):
    config = GenerateConfig.model_validate({
        "model": {"path": str(tiny_model), "device": "cpu"},
        "sampling": {"width": 48, "height": 48, "steps": 3, "guidance_scale": 2.0},
        "output": {"path": str(tmp_path / "run")},  # samples_per_shard: auto (it was 1000: one shard, one worker)
        "run": {"num_samples": 96, "batch_size": 4, "workers": 3, "seed": 2},
    })  # fmt: skip
    summary = generate(config, show_progress=False, worker=SlowOnShardZero)
    assert summary.ok and summary.shards == 12 and verify_dataset(tmp_path / "run") == []
    keys = [row["key"] for row in manifest_rows(read_manifest(tmp_path / "run"))]
    assert keys == [f"{index:09d}" for index in range(96)]  # every sample exactly once
    stats = last_stats(tmp_path / "run")
    assert len(stats["workers"]) == 3 and all(worker["shards"] > 0 for worker in stats["workers"]), stats["workers"]
    assert stats["backups_won"] == 1 and max(busy for _, busy in stats["busy_workers"]) == 3
    marker = json.loads((tmp_path / "run" / "index" / "000000.commit.json").read_text())
    assert summary.wall_seconds < 60 and marker["count"] == 8  # the backup, not the straggler, committed shard 0
