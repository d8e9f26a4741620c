"""Object stores end to end, against a real S3 API (moto's server on 127.0.0.1): generate into s3://, the
driver SIGKILLed mid-run, resume, extend, verify/inspect/preview, `train` streaming from s3://, and a study
whose data.run is on s3:// (extended by it). Commands run the way users run them: CLI, output not a terminal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner
from waiting import wait_for

from dreamshard.cli import app
from dreamshard.config import GenerateConfig, StudyConfig, load_config
from dreamshard.engine.driver import ACTOR_PREFIX
from dreamshard.format.reader import committed_shards, manifest_rows, read_manifest
from dreamshard.format.store import Store
from dreamshard.tools.verify import verify_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 8


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))  # in this process: reuses its Ray
    assert "Traceback" not in result.output, result.output
    return result


def live_workers() -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return [n["name"] if isinstance(n, dict) else n for n in names if (n["name"] if isinstance(n, dict) else n).startswith(ACTOR_PREFIX)]


def etags(store: Store, shards) -> dict[int, str]:
    return {shard: store.fs.info(store.path(f"shards/{shard:06d}.tar"))["ETag"] for shard in shards}


def test_s3_generate_kill_resume_extend_verify_train_and_study(ray_cluster, tiny_model, s3_bucket, tmp_path):
    url = f"{s3_bucket}/runs/gen"
    config = GenerateConfig.model_validate({
        "model": {"path": str(tiny_model), "device": "cpu"},
        "prompts": {"classes": ["car", "bus"], "templates": [{"text": "a photo of a {token} {cls}"}]},
        "sampling": {"width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0},
        "output": {"path": url, "samples_per_shard": PER_SHARD},
        "run": {"num_samples": 40, "batch_size": 4, "workers": 1},
    })  # fmt: skip
    config_file = tmp_path / "gen.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    store = Store(url)

    # 1. A driver on the cluster, its output to a file, SIGKILLed once a shard is committed on S3.
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "dreamshard", "generate", str(config_file), "--address", ray_cluster], stdout=log, stderr=log)
        try:
            wait_for(lambda: committed_shards(store, PER_SHARD) or driver.poll() is not None, 300, "a shard committed on s3")
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-2000:]
    wait_for(lambda: not live_workers(), 60, "the killed driver's workers to exit")
    done = committed_shards(store, PER_SHARD)
    assert 1 <= len(done) < 5
    before = etags(store, done)

    # 2. Resume: the same command finishes the run, committed shards untouched.
    result = cli("generate", str(config_file))
    assert result.exit_code == 0, result.output
    assert etags(store, done) == before
    assert verify_dataset(url) == []

    # 3. Extend (this crashed on a stale listing in consolidate): only new shards, then verify/inspect/preview.
    result = cli("generate", str(config_file), "--num-samples", "56")
    assert result.exit_code == 0, result.output
    assert etags(store, done) == before
    assert [row["key"] for row in manifest_rows(read_manifest(url))] == [f"{i:09d}" for i in range(56)]
    assert cli("verify", url).exit_code == 0
    inspected = cli("inspect", url)
    assert inspected.exit_code == 0 and "56 of 56" in inspected.output
    assert cli("preview", url, "-n", "4", "-o", str(tmp_path / "grid.png")).exit_code == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"

    # 4. train streams its target from s3 (DataLoader worker processes open it through fsspec).
    from dreamshard.trainer.toy import make_toy

    toy = make_toy(tmp_path / "toy", num_source=16, num_target=8, num_val=8, samples_per_shard=8)
    train_file = tmp_path / "train.yaml"
    train = yaml.safe_load((REPO / "configs/toy_dacs.yaml").read_text())
    train["data"]["source"]["folder"]["root"] = str(toy["source"])
    train["data"]["val"]["folder"]["root"] = str(toy["target_val"])
    train["data"]["target"]["shards"]["path"] = url
    train["data"].update(batch_size=2, workers=1)
    train.update(max_iters=20, progress=False, output={"path": str(tmp_path / "train")})
    train_file.write_text(yaml.safe_dump(train))
    result = cli("train", str(train_file))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["iterations"] == 20 and summary["skipped_shards"] == summary["skipped_samples"] == 0

    # 5. A study on the s3 run: subsets from its manifest on s3, and an extension by the engine to 64.
    from dreamshard.study import available_samples, run_study

    train["data"]["workers"] = 0
    train_file.write_text(yaml.safe_dump(train))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "data": {"run": url}, "train": {"config": str(train_file)}, "sizes": [16, 64], "seeds": [0], "iterations": 2,
        "output": {"path": str(tmp_path / "study")},
    }))  # fmt: skip
    study = run_study(load_config(study_file, StudyConfig), show_progress=False)
    assert study.ok and len(study.trained) == 2
    assert available_samples(url) == 64 and etags(store, done) == before
    run_config = yaml.safe_load((tmp_path / "study" / "runs" / "n000000016-s0" / "train" / "config.yaml").read_text())
    assert run_config["data"]["target"]["shards"] == {**run_config["data"]["target"]["shards"], "path": url, "subset": 16}
    assert verify_dataset(url) == []


def test_missing_filesystem_package_names_the_extra(tmp_path):
    result = CliRunner().invoke(app, ["inspect", "gcs://some-bucket/run"])
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    assert result.exit_code == 2 and "dreamshard[gcs]" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
