"""The `dreamshard` command line: one command per pipeline stage. Commands parse and validate, then call
one public function of their stage; user errors print one line and exit non-zero, without a traceback."""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from dreamshard import __version__
from dreamshard.errors import UserError
from dreamshard.logs import console, setup_logging

app = typer.Typer(
    help="Personalised Stable Diffusion data generation at scale (Ray + WebDataset) and UDA segmentation training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SET_HELP = "Override a config value: --set dotted.key=value (repeatable; values parsed as YAML)."


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(func):
    """Turn the errors a user can fix into one line and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; committed work is kept and a re-run resumes it", 130)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                fail(f"no space left on device ({exc.filename or 'output'}); free space or choose another output, then re-run to resume", 1)
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                fail(f"cannot write {exc.filename or 'output'}: {exc.strerror}; choose a writable output path", 2)
            raise

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dreamshard {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging, library messages included."),
) -> None:
    """dreamshard: personalise SD, generate sharded datasets on Ray, train segmenters on them."""
    setup_logging(-1 if quiet else (1 if verbose else 0))


@app.command("tiny-model")
@user_errors
def tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the pipeline (or ControlNet) into."),
    preset: str = typer.Option("tiny", help="tiny (fast tests), sd15 (real SD 1.5 shapes, random weights), tiny-controlnet."),
    seed: int = typer.Option(0, help="Seed of the random weights (same seed, same files)."),
) -> None:
    """Write a random-weight Stable Diffusion pipeline built locally (no download), loadable with
    StableDiffusionPipeline.from_pretrained(OUT)."""
    from dreamshard.engine.tiny import PRESETS, build_tiny_model

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; choose a new directory or remove it first")
    build_tiny_model(out, preset, seed)
    console.print(f"wrote {preset} model to {out}")


@app.command("study")
@user_errors
def study(
    config: Path = typer.Argument(..., help="Study config YAML (see configs/study_toy.yaml)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join ('auto', 'ray://host:10001'); default: an embedded local Ray."),
) -> None:
    """Dataset-size scaling study: train on nested subsets x seeds (Ray tasks), write study.{parquet,csv,md,png}."""
    from dreamshard.config import StudyConfig, load_config
    from dreamshard.trainer.study import run_study

    summary = run_study(load_config(config, StudyConfig, sets), address=address)
    console.print((summary.out / "study.md").read_text(), highlight=False)
    console.print(f"study: {len(summary.trained)} run(s) trained, {len(summary.skipped)} already done; results in {summary.out}")
    if not summary.ok:
        fail(f"{len(summary.failed)} run(s) failed after retries: {', '.join(sorted(summary.failed))}; re-run to retry them", 1)


def run() -> None:  # pragma: no cover - console entry for `python -m dreamshard`
    app(prog_name="dreamshard")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
