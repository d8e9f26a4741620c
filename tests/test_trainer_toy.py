"""End to end on the toy domain shift: the trainer learns and DACS adapts; resume, eval and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dreamshard.cli import app
from dreamshard.config import TrainConfig, load_config
from dreamshard.errors import UserError
from dreamshard.trainer.loop import train
from dreamshard.trainer.toy import make_toy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"), seed=0)


def toy_sets(toy: dict, out: Path, method: str, **extra) -> list[str]:
    sets = {"output.path": out, "progress": "false", "data.source.folder.root": toy["source"], "data.val.folder.root": toy["target_val"], **extra}
    if method in ("dacs", "clouds"):
        sets["data.target.shards.path"] = toy["target"]
    if method == "zodi":
        sets["data.target.shards.path"] = toy["target_twins"]
    return [f"{key}={value}" for key, value in sets.items()]


def toy_config(toy: dict, out: Path, method: str, **extra) -> TrainConfig:
    return load_config(ROOT / "configs" / f"toy_{method}.yaml", TrainConfig, toy_sets(toy, out, method, **extra))


@pytest.fixture(scope="module")
def source_only(toy, tmp_path_factory):
    """The baseline every method on the toy shift is held against: same model, data and 150 iterations."""
    return train(toy_config(toy, tmp_path_factory.mktemp("train") / "source_only", "source_only"))


@pytest.mark.slow
def test_dacs_beats_source_only_on_the_toy_domain_shift(toy, source_only, tmp_path):
    dacs = train(toy_config(toy, tmp_path / "dacs", "dacs"))
    # Measured at 150 iterations (docs/benchmarks.md, mIoU in percent as everywhere): seed 0 source_only
    # about 37, dacs about 62. Chance level on five classes is about 10.
    assert source_only.mIoU > 30  # it learns, but the colour shift costs it buildings and cars
    assert dacs.mIoU > source_only.mIoU + 15  # and adapting to the target clearly helps
    for summary in (source_only, dacs):
        out = Path(summary.output)
        assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
        assert list((out / "tb").iterdir()) and (out / "eval" / f"iter_{summary.iterations:07d}.txt").is_file()
        assert set(summary.per_class_iou) == {"ground", "sky", "building", "car", "pole"}
        assert summary.images_per_s > 0 and summary.wall_s > 0
        assert sorted(p.name for p in (out / "images").iterdir()) == ["iter_0000075.png", "iter_0000150.png"]
    # The DACS grid: a title row and two image rows, nine panels of 64x64 crops scaled to 256.
    from PIL import Image

    from dreamshard.trainer.pictures import PANEL, TITLE_HEIGHT

    with Image.open(Path(dacs.output) / "images" / "iter_0000150.png") as grid:
        assert grid.format == "PNG" and grid.size == (9 * PANEL, TITLE_HEIGHT + 2 * PANEL)
        pixels = np.asarray(grid.convert("RGB"))
    assert len(np.unique(pixels[TITLE_HEIGHT:, PANEL : 2 * PANEL].reshape(-1, 3), axis=0)) >= 2  # a prediction, not a blank panel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(dacs.output) / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("pictures")] == [75, 150]


@pytest.mark.slow
def test_resume_checkpoint_eval_and_bad_input(toy, tmp_path):
    out = tmp_path / "run"
    small = {"model.backbone": "test_resnet", "model.embed_dim": 16, "data.batch_size": 2, "checkpoint_interval": 1, "log_interval": 1}
    first = train(toy_config(toy, out, "dacs", max_iters=2, **small))
    assert first.resumed_from == 0 and (out / "checkpoints" / "iter_0000002" / "teacher.safetensors").is_file()
    second = train(toy_config(toy, out, "dacs", max_iters=3, **small))
    assert second.resumed_from == 2 and second.ranks[0]["steps"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "iter_0000002", "iter_0000003"]  # keep 2, and the best evaluation
    logged = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[:2] == [1, 2] and 3 in logged

    with pytest.raises(UserError, match="trained with other settings .*model.num_classes: 5 then, 6 now"):
        train(toy_config(toy, out, "dacs", max_iters=4, **{**small, "model.num_classes": 6, "model.class_names": "[]"}))
    # The checkpoint's own check stays behind it (a run directory made before settings were recorded).
    (out / "run_settings.json").unlink()
    with pytest.raises(UserError, match="has 5 classes but model.num_classes is 6"):
        train(toy_config(toy, out, "dacs", max_iters=4, **{**small, "model.num_classes": 6, "model.class_names": "[]"}))
    train(toy_config(toy, out, "dacs", max_iters=3, **small))  # records the settings again (nothing left to train)

    runner = CliRunner()
    config = str(ROOT / "configs" / "toy_dacs.yaml")
    sets = [arg for item in toy_sets(toy, out, "dacs", **{k: v for k, v in small.items() if k.startswith("model.")}) for arg in ("--set", item)]
    result = runner.invoke(app, ["eval", config, "--checkpoint", str(out / "checkpoints" / "iter_0000003"), "-o", str(tmp_path / "m.json"), *sets])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["mIoU"] == pytest.approx(second.mIoU)  # same weights, same data

    result = runner.invoke(
        app, ["eval", config, "--checkpoint", str(out / "checkpoints" / "iter_0000003"), *sets, "--set", "model.num_classes=6", "--set", "model.class_names=[]"]
    )
    assert result.exit_code == 2 and "predicts 5 classes" in result.output and "Traceback" not in result.output

    result = runner.invoke(app, ["train", config, *sets, "--set", f"data.target.shards.path={tmp_path}/missing/*.tar", "--set", f"output.path={tmp_path}/x"])
    assert result.exit_code == 2 and "no shards matched" in result.output

    result = runner.invoke(app, ["train", config, *sets, "--set", "model.num_classes=3", "--set", "model.class_names=[]", "--set", f"output.path={tmp_path}/y"])
    assert result.exit_code == 2 and "not in the train_ids map" in result.output  # toy labels hold ids 0..4


def val_mious(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["val/mIoU"] for r in records if "val/mIoU" in r}


@pytest.mark.slow
@pytest.mark.parametrize("backbone, decoder", [("mit_b0", "daformer"), ("test_resnet", "deeplabv2")])
def test_backbone_and_decoder_train_evaluate_and_keep_the_best(toy, tmp_path, backbone, decoder):
    """A cheap train + evaluate smoke per new backbone / decoder (the DACS-vs-source-only margins for them are
    measured by bench/bench_toy_shift.py, docs/benchmarks.md); the best of several evaluations is kept next to
    the last, survives a resume and is what `dreamshard eval` reads back."""
    out = tmp_path / "run"
    small = {"model.backbone": backbone, "model.decoder": decoder, "model.embed_dim": 16, "data.batch_size": 2, "data.crop_size": "[32, 32]"}
    small |= {"eval_interval": 2, "checkpoint_interval": 2, "log_interval": 1, "data.val.folder.limit": 16}
    first = train(toy_config(toy, out, "dacs", max_iters=4, **small))
    summary = train(toy_config(toy, out, "dacs", max_iters=6, **small))  # resumed at 4: one more evaluation
    assert summary.resumed_from == 4 and first.best["iteration"] in (2, 4)
    mious = val_mious(out)
    assert sorted(mious) == [2, 4, 6] and all(0 <= value <= 100 for value in mious.values())
    best_iteration = max(mious, key=lambda it: (mious[it], -it))  # ties keep the earlier evaluation
    assert summary.best["iteration"] == best_iteration and summary.best["mIoU"] == pytest.approx(mious[best_iteration])
    assert summary.last == {**summary.last, "iteration": 6, "mIoU": summary.mIoU} and summary.mIoU == pytest.approx(mious[6])
    assert json.loads((out / "summary.json").read_text())["best"] == summary.best
    best = Path(summary.best["checkpoint"])
    assert json.loads((best / "state.json").read_text())["iteration"] == best_iteration
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("iter_")] == ["best"]

    config = str(ROOT / "configs" / "toy_dacs.yaml")
    shaping = {k: v for k, v in small.items() if k.startswith(("model.", "data.val."))}
    sets = [arg for item in toy_sets(toy, out, "dacs", **shaping) for arg in ("--set", item)]
    result = CliRunner().invoke(app, ["eval", config, "--checkpoint", str(best), "-o", str(tmp_path / "best.json"), *sets])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "best.json").read_text())["mIoU"] == pytest.approx(summary.best["mIoU"])


@pytest.mark.slow
def test_channels_last_and_compiled_student_train_and_save_plain_weights(toy, tmp_path, monkeypatch):
    """train.channels_last and train.compile (torch.compile with its eager backend here: Dynamo's tracing and
    wrapping, without the minutes a C++ compile takes on CPU): the teacher, the checkpoint and `eval` see the
    plain segmenter."""
    import functools

    import torch
    from safetensors.torch import load_file

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    small = {"model.embed_dim": 16, "data.batch_size": 2, "data.crop_size": "[32, 32]", "data.val.folder.limit": 8, "image_interval": 2}
    summary = train(toy_config(toy, tmp_path / "run", "dacs", max_iters=2, channels_last="true", compile="true", **small))
    assert summary.mIoU is not None and summary.ranks[0]["steps"] == 2
    weights = load_file(tmp_path / "run" / "checkpoints" / "iter_0000002" / "model.safetensors")
    teacher = load_file(tmp_path / "run" / "checkpoints" / "iter_0000002" / "teacher.safetensors")
    assert set(weights) == set(teacher) and not any("_orig_mod" in name or name.startswith("module.") for name in weights)
    assert (tmp_path / "run" / "images" / "iter_0000002.png").is_file()


@pytest.mark.slow
def test_hrda_trains_with_mic_evaluates_with_sliding_windows_and_eval_reads_it_back(toy, tmp_path):
    """DACS + MIC with HRDA on the toy (64x64 crops: a 32x32 context and detail), through the CLI as a user
    runs it; the checkpoint holds the attention head, and `dreamshard eval` (multi-resolution, sliding
    windows) reproduces the run's own final evaluation."""
    out = tmp_path / "hrda"
    sets = {**dict(item.split("=", 1) for item in toy_sets(toy, out, "dacs")), "max_iters": 4, "image_interval": 4, "model.embed_dim": 16}
    sets |= {"model.hrda.enabled": "true", "model.hrda.hr_crop_size": "[32, 32]", "uda.mic.enabled": "true", "uda.mic.block_size": 8}
    sets |= {"eval.mode": "slide", "eval.crop_size": "[48, 48]", "eval.stride": "[16, 16]", "data.val.folder.limit": 8}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["train", str(ROOT / "configs" / "toy_dacs.yaml"), *args])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mIoU"] is not None and summary["ranks"][0]["steps"] == 4
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoints" / "iter_0000004" / "model.safetensors")
    assert any(name.startswith("scale_attention.") for name in weights)
    assert (out / "images" / "iter_0000004.png").is_file()
    checked = CliRunner().invoke(
        app, ["eval", str(ROOT / "configs" / "toy_dacs.yaml"), "--checkpoint", str(out / "checkpoints" / "iter_0000004"), "-o", str(tmp_path / "m.json"), *args]
    )
    assert checked.exit_code == 0, checked.output
    assert json.loads((tmp_path / "m.json").read_text())["mIoU"] == pytest.approx(summary["mIoU"])


@pytest.mark.slow
def test_zodi_through_the_cli_beats_source_only(toy, source_only, tmp_path):
    """ZoDi's adaptation on the toy twins (each source layout rendered in the target style, paired by json
    source_key), through the command line, at the baseline's 150 iterations."""
    args = ["train", str(ROOT / "configs" / "toy_zodi.yaml")] + [arg for pair in toy_sets(toy, tmp_path / "zodi", "zodi") for arg in ("--set", pair)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "zodi" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "zodi" / "metrics.jsonl").read_text().splitlines()]
    sims = [record["loss_sim"] for record in records if "loss_sim" in record]
    assert len(sims) == 6 and all(-1 <= sim < 0 for sim in sims)  # a negative cosine, logged every 25 iterations
    # Measured (docs/benchmarks.md): seed 0 source_only 37.2, zodi 62.2 mIoU.
    assert summary["method"] == "zodi" and summary["mIoU"] > source_only.mIoU + 15


@pytest.mark.slow
def test_clouds_through_the_cli_with_a_tiny_sam(toy, tmp_path):
    """CLOUDS' schedule in miniature: 2 warm-up iterations, then teacher labels refined by a real (tiny,
    random) SAM; the margin over source-only is measured in docs/benchmarks.md (SAM off on the toy)."""
    from dreamshard.engine.tiny import build_tiny_model

    sam = build_tiny_model(tmp_path / "sam", "tiny-sam")
    extra = {"max_iters": 6, "image_interval": 0, "log_interval": 2, "clouds.warmup_iters": 2, "clouds.sam.model": sam, "clouds.sam.min_area": 50}
    args = ["train", str(ROOT / "configs" / "toy_clouds.yaml")] + [
        arg for pair in toy_sets(toy, tmp_path / "clouds", "clouds", **extra) for arg in ("--set", pair)
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "clouds" / "metrics.jsonl").read_text().splitlines()]
    changed = [record["refined_changed"] for record in records if "refined_changed" in record]
    assert len(changed) == 2 and all(0 < share <= 1 for share in changed)  # from iteration 3 on, SAM relabelled pixels
    assert "loss_target" not in records[0] and "loss_target" in records[-2]


@pytest.mark.slow
def test_dinov2_backbone_trains_dacs_with_mic_through_the_cli(toy, tmp_path):
    """The tiny-dinov2 preset through the real loading code (a model directory), DACS + MIC, a few iterations."""
    from dreamshard.engine.tiny import build_tiny_model

    weights = build_tiny_model(tmp_path / "dinov2", "tiny-dinov2")
    extra = {"max_iters": 4, "image_interval": 0, "log_interval": 2, "model.backbone": "dinov2", "model.pretrained": weights, "model.decoder": "daformer",
             "uda.mic.enabled": "true", "uda.mic.block_size": 8}  # fmt: skip
    args = ["train", str(ROOT / "configs" / "toy_dacs.yaml")] + [arg for pair in toy_sets(toy, tmp_path / "dino", "dacs", **extra) for arg in ("--set", pair)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "dino" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_mic" in record for record in records[:2]) and json.loads((tmp_path / "dino" / "summary.json").read_text())["mIoU"] is not None
