"""The command line as a user meets it: help, version, one-line errors with exit codes."""

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
