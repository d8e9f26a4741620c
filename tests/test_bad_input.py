"""The standard for bad input, as a table: each case → its documented exit code (2 bad input or config,
1 runtime failure or problems found), one line (verify: its list of problems, then one line), no traceback,
and nothing already written lost. Commands run through the CLI, as users run them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from dreamshard.cli import app
from dreamshard.format.rundir import write_dataset
from dreamshard.format.shards import ShardSample

REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good") / "run"
    rng = np.random.default_rng(0)
    samples = [ShardSample({"index": i, "prompt": f"p{i}"}, Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))) for i in range(12)]
    write_dataset(root, samples, samples_per_shard=4)
    return root


def damage(run: Path, case: str) -> None:
    if case == "index parquet":
        (run / "index" / "000001.parquet").write_bytes(b"PAR1 not really")
    elif case == "manifest":
        (run / "manifest.parquet").write_bytes(b"garbage")
    elif case == "sizes.json":
        (run / "shards" / "sizes.json").write_text("{not json")
    elif case == "marker shape":
        (run / "index" / "000002.commit.json").write_text("[1, 2, 3]")
    elif case == "record {}":
        (run / "dreamshard.json").write_text("{}")
    elif case == "record []":
        (run / "dreamshard.json").write_text("[]")
    elif case == "image":
        tar = run / "shards" / "000000.tar"
        data = tar.read_bytes()
        start = data.index(b"\xff\xd8\xff")  # the first JPEG in the tar: overwrite its body, same size
        tar.write_bytes(data[:start] + b"\x00" * 600 + data[start + 600 :])


VERIFY_CASES = ["index parquet", "manifest", "sizes.json", "marker shape", "record {}", "record []", "image"]


@pytest.mark.parametrize("case", VERIFY_CASES)
def test_verify_lists_the_problem_exit_1(good_run, tmp_path, case):
    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    damage(run_dir, case)
    before = digest(run_dir)
    code, lines = run("verify", run_dir)
    assert code == 1 and lines[-1].startswith("error:") and "problem(s) found" in lines[-1], lines
    assert len(lines) >= 2 and all(line.startswith("- ") for line in lines[:-1]), lines
    fixes = ("dreamshard repair", "dreamshard generate", "delete ", "check ")
    problems = " ".join(lines[:-1]).split("- ")[1:]  # wrapped lines joined again
    assert all(any(fix in problem for fix in fixes) for problem in problems), problems  # every problem names its fix
    assert digest(run_dir) == before  # a checking tool changes nothing


@pytest.mark.parametrize("command", ["inspect", "preview"])
@pytest.mark.parametrize("case", ["record {}", "record []", "index parquet", "image"])
def test_inspect_and_preview_give_one_line(good_run, tmp_path, case, command):
    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    damage(run_dir, case)
    if case == "index parquet":
        (run_dir / "manifest.parquet").unlink()  # so inspect has to read the index files
    args = [command, run_dir] + (["-o", tmp_path / "grid.png"] if command == "preview" else [])
    code, lines = run(*args)
    if case.startswith("record") or (command, case) == ("preview", "image"):
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    elif case == "index parquet":  # its size no longer matches its marker: the shard counts as uncommitted
        assert code == 0 and (command == "preview" or any("8 of 12" in line for line in lines)), lines
    else:  # inspect reads no image
        assert code == 0, lines


def test_inspect_counts_only_committed_samples_next_to_a_stale_manifest(good_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    (run_dir / "index" / "000002.commit.json").unlink()  # shard 2 un-committed; the manifest still lists it
    code, lines = run("inspect", run_dir)
    assert code == 0 and any("8 of 12" in line for line in lines), lines
    assert any("(none)" in line and "8" in line for line in lines), lines  # the class table counts 8, not 12


@pytest.mark.parametrize(
    "sets, match",
    [
        (["sampling.guidance_scale=1e300"], "guidance_scale"),
        (["sampling.guidance_scale=[1, .nan]"], "guidance_scale"),
        (["run.num_samples=1000000000000000"], "at most 10,000,000"),
    ],
)
def test_generate_bounds_are_one_line_exit_2(tmp_path, sets, match):
    from dreamshard.engine.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", "tiny")
    args = ["generate", REPO / "configs/quickstart.yaml", "--set", f"model.path={model}", "--set", f"output.path={tmp_path / 'out'}"]
    for item in sets:
        args += ["--set", item]
    code, lines = run(*args)
    assert code == 2 and len(lines) == 1 and match in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_malformed_lora_manifest_is_one_line(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "dreamshard_lora.json").write_text('{"weights": 3}')
    code, lines = run("generate", REPO / "configs/quickstart.yaml", "--set", f"model.path={lora}", "--set", f"output.path={tmp_path / 'out'}")
    assert code == 2 and len(lines) == 1 and "not a valid LoRA manifest" in lines[0], lines


@pytest.mark.parametrize("sizes", ["100..1600xnan", "100..1600xinf", "100..1600x1"])
def test_study_size_factors_are_checked(tmp_path, sizes):
    from dreamshard.errors import UserError
    from dreamshard.study import parse_sizes

    with pytest.raises(UserError, match="factor"):
        parse_sizes(sizes)


# ---------------------------------------------------------------------------------------------- training


def toy_train_config(tmp_path: Path, toy: dict, **changes) -> Path:
    data = yaml.safe_load((REPO / "configs/toy_source_only.yaml").read_text())
    data["data"]["source"]["folder"]["root"] = str(toy["source"])
    data["data"]["val"]["folder"]["root"] = str(toy["target_val"])
    data["data"].update(batch_size=2, crop_size=[32, 32])
    data["model"]["embed_dim"] = 8
    data.update(max_iters=2, progress=False, output={"path": str(tmp_path / "train")})
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    path = tmp_path / f"train-{len(list(tmp_path.glob('train-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dreamshard.trainer.toy import make_toy

    root = tmp_path_factory.mktemp("trained")
    toy = make_toy(root / "toy", size=32, num_source=8, num_target=8, num_val=4, samples_per_shard=8)
    config = toy_train_config(root, toy)
    code, lines = run("train", config)
    assert code == 0, lines
    return root, toy, config


def copy_run(trained, tmp_path) -> Path:
    root, toy, _ = trained
    shutil.copytree(root / "train", tmp_path / "train")
    return tmp_path / "train"


@pytest.mark.parametrize("change, changed_key", [({"optim.lr": 0.01}, "optim.lr"), ({"seed": 7}, "seed"), ({"method": "dacs"}, "method")])
def test_resume_with_other_settings_is_refused_then_restart_runs_fresh(trained, tmp_path, change, changed_key):
    root, toy, _ = trained
    out = copy_run(trained, tmp_path)
    before = digest(out)
    extra = {"data.target": {"shards": {"path": str(toy["target"]), "shuffle_block": 8}}} if change.get("method") == "dacs" else {}
    config = toy_train_config(tmp_path, toy, **change, **extra, max_iters=3)
    code, lines = run("train", config)
    assert code == 2 and len(lines) == 1 and changed_key in lines[0] and "--restart" in lines[0], lines
    assert digest(out) == before  # nothing of the old run touched
    code, lines = run("train", config, "--restart")
    assert code == 0, lines
    assert list(tmp_path.glob("train.old-*")) and json.loads((out / "summary.json").read_text())["resumed_from"] == 0


def test_resume_with_more_iterations_continues(trained, tmp_path):
    root, toy, _ = trained
    copy_run(trained, tmp_path)
    code, lines = run("train", toy_train_config(tmp_path, toy, max_iters=4))
    assert code == 0, lines
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["resumed_from"] == 2


@pytest.mark.parametrize("broken", ["optimizer.pt", "state.json", "model.safetensors"])
def test_resume_from_a_corrupt_checkpoint_is_one_line(trained, tmp_path, broken):
    root, toy, _ = trained
    out = copy_run(trained, tmp_path)
    (next((out / "checkpoints").glob("iter_*")) / broken).write_bytes(b"\x00garbage")
    code, lines = run("train", toy_train_config(tmp_path, toy, max_iters=4))
    assert code == 2 and len(lines) == 1 and "checkpoint" in lines[0] and "--restart" in lines[0], lines


def test_eval_with_another_model_and_output_into_a_new_folder(trained, tmp_path):
    root, toy, config = trained
    checkpoint = next((root / "train" / "checkpoints").glob("iter_*"))
    code, lines = run("eval", config, "--checkpoint", checkpoint, "--set", "model.embed_dim=16")
    assert code == 2 and len(lines) == 1 and "another model" in lines[0], lines
    code, lines = run("eval", config, "--checkpoint", checkpoint, "-o", tmp_path / "new" / "folder" / "metrics.json")
    assert code == 0 and json.loads((tmp_path / "new" / "folder" / "metrics.json").read_text())["mIoU"] is not None


def test_wrong_val_path_is_reported_before_training(trained, tmp_path):
    root, toy, _ = trained
    code, lines = run("train", toy_train_config(tmp_path, toy, **{"data.val.folder.root": str(tmp_path / "missing")}))
    assert code == 2 and len(lines) == 1 and "missing" in lines[0], lines
    assert not (tmp_path / "train" / "checkpoints").exists()  # no iteration ran


@pytest.mark.parametrize("command", ["train", "study"])
def test_a_run_record_of_the_wrong_shape_is_one_line_naming_repair(good_run, trained, tmp_path, command):
    root, toy, _ = trained
    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    (run_dir / "dreamshard.json").write_text('{"samples_per_shard": "four"}')
    if command == "train":
        config = toy_train_config(tmp_path, toy, method="dacs", **{"data.target": {"shards": {"path": str(run_dir)}}})
    else:
        config = tmp_path / "study.yaml"
        config.write_text(
            yaml.safe_dump({"data": {"run": str(run_dir), "extend": False}, "train": {"config": str(toy_train_config(tmp_path, toy))}, "sizes": [4]})
        )
    code, lines = run(command, config)
    assert code == 2 and len(lines) == 1 and "not a valid run record" in lines[0] and "dreamshard repair" in lines[0], lines


def test_pipe_urls_need_allow_pipe(tmp_path):
    from dreamshard.config import ShardsConfig
    from dreamshard.errors import UserError
    from dreamshard.trainer.data import ShardAccess, resolve_shards

    with pytest.raises(UserError, match="data.allow_pipe"):
        resolve_shards(ShardsConfig(path=f"pipe:touch {tmp_path}/ran"))
    assert not (tmp_path / "ran").exists()
    assert resolve_shards(ShardsConfig(path="pipe:cat a.tar"), ShardAccess(allow_pipe=True))[0] == ["pipe:cat a.tar"]


def test_progress_lines_when_the_output_is_a_log(good_run, trained, tmp_path, monkeypatch):
    """Not a terminal (as under SLURM or `> log`): plain progress lines, the last one at 100%."""
    import dreamshard.logs

    monkeypatch.setattr(dreamshard.logs, "LOG_EVERY", dreamshard.logs.LOG_EVERY)  # --log-every sets it; restored after
    code, lines = run("verify", good_run, "--log-every", "0")
    assert code == 0 and lines[-2].startswith("verify: 3/3 shards (100%)") and lines[-1].endswith(": ok"), lines
    root, toy, _ = trained
    copy_run(trained, tmp_path)
    code, lines = run("train", toy_train_config(tmp_path, toy, max_iters=4, progress=True), "--log-every", "0")
    progress = [line for line in lines if line.startswith("train source_only: ")]
    assert code == 0 and len(progress) >= 2 and progress[-1].startswith("train source_only: 4/4 iterations (100%)"), lines
