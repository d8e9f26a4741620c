"""The command line as a user meets it: help, version, one-line errors with exit codes."""

import json
import subprocess
import sys

import pytest

from dreamshard import __version__


def dreamshard(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dreamshard", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_the_commands():
    out = dreamshard("--help")
    assert out.returncode == 0
    for command in ("tiny-model", "generate", "inspect", "verify", "preview", "personalize", "train", "eval", "study"):
        assert command in out.stdout, command


def test_short_help_and_shell_completion():
    short = dreamshard("inspect", "-h")
    assert short.returncode == 0 and "--json" in short.stdout
    top = dreamshard("-h")
    assert top.returncode == 0 and "--install-completion" in top.stdout and "--show-completion" in top.stdout


def test_plan_in_a_pipe_is_whole_and_json_is_the_same_plan(tmp_path):
    """Written to a file (a pipe or a log, not a terminal), tables are not cut at 80 columns."""
    config = tmp_path / "c.yaml"
    prompt = "a photo of a sks car on a long and winding road through a rainy city at dusk, seen from far away"
    config.write_text(f"run: {{num_samples: 12, seed: 123456789}}\noutput: {{path: {tmp_path / 'out'}, samples_per_shard: 4}}\n"
                      f"prompts: {{recipe: templates, templates: [{{text: '{prompt}'}}]}}\n")  # fmt: skip
    with open(tmp_path / "plan.txt", "w") as stdout, open(tmp_path / "plan.log", "w") as stderr:
        assert subprocess.run([sys.executable, "-m", "dreamshard", "plan", str(config)], stdout=stdout, stderr=stderr, timeout=300).returncode == 0
    text = (tmp_path / "plan.txt").read_text()
    assert text.count(prompt) == 11 and "12 samples in 3 shards" in text  # whole in 10 rows and the template table, on stdout
    as_json = dreamshard("plan", str(config), "--json")
    report = json.loads(as_json.stdout)
    assert (report["samples"], report["shards"], report["action"]) == (12, 3, "fresh")
    assert [row["prompt"] for row in report["first"]] == [prompt] * 10 and all(str(row["seed"]) in text for row in report["first"])


def test_version():
    out = dreamshard("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"dreamshard {__version__}"


@pytest.mark.slow  # builds a pipeline
def test_tiny_model_command_and_refusal_to_overwrite(tmp_path):
    out = dreamshard("tiny-model", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
    again = dreamshard("tiny-model", str(tmp_path / "m"))
    assert again.returncode == 2
    assert "not empty" in again.stderr and "Traceback" not in again.stderr


def test_unknown_preset_is_one_line(tmp_path):
    out = dreamshard("tiny-model", str(tmp_path / "m"), "--preset", "huge")
    assert out.returncode == 2
    assert "unknown preset 'huge'" in out.stderr
    assert "Traceback" not in out.stderr


def test_misspelled_config_key_exits_2_with_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("run:\n  sede: 1\n")
    out = dreamshard("generate", str(config))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "run.sede" in lines[0] and str(config) in lines[0]
