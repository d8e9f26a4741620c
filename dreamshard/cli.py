"""The `dreamshard` command line: one command per pipeline stage. Commands parse and validate, then call
one public function of their stage; user errors print one line and exit non-zero, without a traceback."""

from __future__ import annotations

import errno
import functools
import json
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from dreamshard import __version__
from dreamshard.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Interrupted, Terminated, UserError, on_sigterm_raise, terminated
from dreamshard.format.store import store_error
from dreamshard.logs import console, results, set_log_every, setup_logging

# Results go to stdout (`results`), logs, progress and error lines to stderr (`console`); `--json` on
# inspect, plan, verify and eval prints one JSON document with the keys listed in docs/cli.md.
app = typer.Typer(
    help="Personalised Stable Diffusion data generation at scale (Ray + WebDataset) and UDA segmentation training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Override a config value: --set dotted.key=value (repeatable; values parsed as YAML)."
LOG_EVERY_OPTION = typer.Option(
    None, "--log-every", min=0, help="When the output is not a terminal (a log file), print a progress line at least this often (seconds; default 30)."
)


def say(text: str) -> None:
    """One result line on stdout, as it is (no markup, no highlighting, never wrapped)."""
    results.print(text, markup=False, highlight=False, soft_wrap=True)


def print_json(document: object) -> None:
    """A command's --json answer: one JSON document on stdout."""
    typer.echo(json.dumps(document, indent=2, default=str))


JSON_OPTION = typer.Option(False, "--json", help="Print the result as one JSON document on stdout (keys: docs/cli.md).")


def fail(message: str, code: int = 2) -> None:
    # The message as it is: text like `[low, high]` must not be read as rich markup.
    console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


RESUMES = "committed shards are kept and a re-run of the same command resumes"
NOTHING = "nothing was changed"


def user_errors(func=None, *, kept: str = RESUMES):
    """Turn the errors a user can fix into one line and an exit code, never a traceback. `kept`: what an
    interruption leaves for a re-run (a command that saves its work on the way out says it itself)."""
    if func is None:
        return functools.partial(user_errors, kept=kept)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM turned into Terminated
            sigterm = exc.sigterm if isinstance(exc, Interrupted) else isinstance(exc, Terminated) or terminated()
            left = exc.kept if isinstance(exc, Interrupted) else kept
            if sigterm:
                fail(f"terminated (SIGTERM); {left}", EXIT_TERMINATED)
            fail(f"interrupted; {left}", EXIT_INTERRUPTED)
        except OSError as exc:
            fail(*os_error(exc))
        except Exception as exc:
            message = store_error(exc)
            if message is None:
                raise
            fail(message, 1)

    return wrapper


def os_error(exc: OSError) -> tuple[str, int]:
    """One line and an exit code for an operating-system error that reached the command line."""
    where = exc.filename or "the output"
    if exc.errno == errno.ENOSPC:
        return f"no space left on device ({where}); free space or choose another output, then re-run to resume", 1
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"cannot write {where}: {exc.strerror}; choose a writable output path", 2
    message = store_error(exc)
    if message is not None:
        return message, 1
    return f"{where}: {exc.strerror or type(exc).__name__} ({' '.join(str(exc).split())[:160]}); check the path, then re-run", 1


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
    on_sigterm_raise()


@app.command("tiny-model")
@user_errors(kept="the output may be incomplete: remove it and re-run")
def tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the pipeline (or ControlNet) into."),
    preset: str = typer.Option(
        "tiny",
        help="tiny (fast tests), sd15 / sdxl (real SD 1.5 / SDXL shapes, random weights), tiny-sdxl, tiny-controlnet, tiny-depth (depth2img, with a tiny DPT), tiny-clip.",
    ),
    seed: int = typer.Option(0, help="Seed of the random weights (same seed, same files)."),
) -> None:
    """Write a random-weight model built locally (no download): a pipeline loadable with
    DiffusionPipeline.from_pretrained(OUT), a ControlNet, or a CLIP model."""
    from dreamshard.engine.tiny import PRESETS, build_tiny_model

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; choose a new directory or remove it first")
    build_tiny_model(out, preset, seed)
    say(f"wrote {preset} model to {out}")


@app.command("generate")
@user_errors
def generate(
    config: Path = typer.Argument(..., help="Generation config YAML (configs/quickstart.yaml, configs/datum_*.yaml, ...)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    log_every: Optional[float] = LOG_EVERY_OPTION,
    out: Optional[str] = typer.Option(None, "--out", help="Output directory or fsspec URL (s3://, gs://); default: output.path."),
    num_samples: Optional[int] = typer.Option(
        None, "--num-samples", min=1, help="Samples in the dataset; default: run.num_samples. Raising it extends a finished run."
    ),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join ('auto', 'ray://host:10001'); default: an embedded local Ray."),
    force_new: bool = typer.Option(
        False, "--force-new", help="If OUT holds a different dataset, write to a new sibling OUT-2, OUT-3, ... instead of refusing."
    ),
    verify: bool = typer.Option(
        False, "--verify", help="Check every committed shard (its tar's sha256, its index file) before trusting it; damaged ones are made again."
    ),
) -> None:
    """Generate a WebDataset dataset with Ray workers. Re-running the same command resumes (committed
    shards are kept); a higher --num-samples extends it. Layout: docs/format.md; clusters: docs/cluster.md."""
    set_log_every(log_every)
    from dreamshard.cluster import ClusterWatchdog
    from dreamshard.config import GenerateConfig, load_config
    from dreamshard.engine.run import generate as run_generate

    ClusterWatchdog.hard_exit = True  # a lost cluster ends this process with one line, even if a Ray call blocks
    summary = run_generate(load_config(config, GenerateConfig, sets), out, num_samples, address, force_new, verify=verify)
    say(
        f"{summary.out}: {summary.samples} samples in {summary.shards} shards ({summary.bytes / 2**20:.1f} MiB); "
        f"generated {summary.images_generated} images in {summary.shards_generated} shards "
        f"({summary.shards_skipped} already done) at {summary.images_per_s:.1f} images/s; "
        f"{summary.retries} retries, {summary.failed_workers} failed workers; wall time {summary.wall_seconds:.1f} s"
    )
    if not summary.ok:
        failed = "; ".join(f"shard {shard}: {reason}" for shard, reason in sorted(summary.failed_shards.items()))
        fail(f"{len(summary.failed_shards)} shard(s) could not be generated after retries ({failed}); re-run the same command to retry them", 1)


@app.command("plan")
@user_errors(kept=NOTHING)
def plan(
    config: Path = typer.Argument(..., help="Generation config YAML (same as for `generate`)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[str] = typer.Option(None, "--out", help="Output directory or fsspec URL; default: output.path."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", min=1, help="Samples in the dataset; default: run.num_samples."),
    first: int = typer.Option(10, "-n", "--first", min=0, help="How many of the first prompts to show."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Say how busy this many workers (GPUs) would be."),
    as_json: bool = JSON_OPTION,
) -> None:
    """What `generate` would do, without Ray or the model: shards, the first prompts and seeds, counts per
    class / template / style value, estimated bytes, and fresh / resume / extend / refuse for the output."""
    from dreamshard.config import GenerateConfig, load_config
    from dreamshard.engine.dryrun import dry_run

    report = dry_run(load_config(config, GenerateConfig, sets), out, num_samples, first, workers)
    if as_json:
        print_json(plan_json(report))
    else:
        print_plan(report)
    if report.action == "refuse":
        raise typer.Exit(2)


@app.command("inspect")
@user_errors(kept=NOTHING)
def inspect(out: str = typer.Argument(..., help="A run directory (or fsspec URL) written by `dreamshard generate`."), as_json: bool = JSON_OPTION) -> None:
    """Samples, shards, bytes and counts per class / template / style axis, the generate calls' statistics
    and the quality scores."""
    from dreamshard.tools.inspect import inspect_dataset, inspect_json, inspect_tables

    info = inspect_dataset(out)
    if as_json:
        print_json(inspect_json(info))
        return
    for table in inspect_tables(info):
        results.print(table)


@app.command("verify")
@user_errors(kept=NOTHING)
def verify(
    out: str = typer.Argument(..., help="A run directory (or fsspec URL) written by `dreamshard generate`."),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Decode every image (slower, catches corrupt images)."),
    log_every: Optional[float] = LOG_EVERY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Check a run directory against the data contract; exit 1 listing the problems."""
    set_log_every(log_every)
    from dreamshard.tools.verify import verify_dataset

    problems = verify_dataset(out, decode_images=decode)
    if as_json:
        print_json({"out": out, "ok": not problems, "problems": problems})
    else:
        for problem in problems:
            say(f"- {problem}")
    if problems:
        fail(f"{out}: {len(problems)} problem(s) found", 1)
    if not as_json:
        say(f"{out}: ok")


@app.command("repair")
@user_errors(kept="a re-run of the same command goes on where it stopped")
def repair(
    out: str = typer.Argument(..., help="A run directory (or fsspec URL) written by `dreamshard generate`."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="The run's generation config: rewrites dreamshard.json from it (after checking the shards are its own)."
    ),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    shards: bool = typer.Option(True, "--shards/--no-shards", help="Check every committed shard and un-commit damaged ones (reads every tar)."),
) -> None:
    """Bring a damaged run directory back: restore or rebuild dreamshard.json (from its copy, the commit
    markers, or --config), un-commit damaged shards so `generate` makes them again, delete a damaged marker
    snapshot and partial files. Sound committed shards are kept as they are."""
    from dreamshard.tools.repair import repair_run

    record = None
    if config is not None:
        from dreamshard.config import GenerateConfig, load_config
        from dreamshard.engine.recover import record_for

        record = record_for(load_config(config, GenerateConfig, sets), out)
    done = repair_run(out, record, check_shards=shards)
    for line in done:
        say(f"- {line}")
    say(f"{out}: {'repaired' if done else 'nothing to repair'}")


@app.command("preview")
@user_errors(kept=NOTHING)
def preview(
    out: str = typer.Argument(..., help="A run directory (or fsspec URL) written by `dreamshard generate`."),
    count: int = typer.Option(64, "-n", "--count", min=1, help="How many samples."),
    output: Path = typer.Option(Path("grid.png"), "-o", "--output", help="The contact sheet to write (PNG)."),
    pick: str = typer.Option(
        "first", "--pick", help="Which samples: first, random (seeded by --seed), class (spread over the classes), style:AXIS, clip (lowest CLIP scores)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of --pick random."),
    label: str = typer.Option("side", "--label", help="Samples with a label (seg.png): side (beside the image), overlay, none."),
    tile: int = typer.Option(192, "--tile", min=32, help="Longer side of each image in pixels (aspect ratio kept)."),
) -> None:
    """A contact sheet of samples with their prompts as captions; images keep their aspect ratio, labels
    (conditioned modes) show in the Cityscapes palette."""
    from dreamshard.tools.preview import preview_grid

    say(f"wrote {preview_grid(out, count, output, pick=pick, seed=seed, label=label, tile=tile)}")


@app.command("push")
@user_errors(kept="a re-run of the same command resumes the upload (files already on the Hub are skipped)")
def push(
    source: str = typer.Argument(..., help="A run directory (`generate`) or a personalised output (`personalize`), on this machine."),
    repo: str = typer.Argument(..., help="Hub repository id (org/name), or a local folder (./dir, /abs/dir) to receive a copy of the same files."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write and check the card, list what would be uploaded; no network."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (default: main)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Publish a run as a Hub dataset (card README.md with `configs: data_files: shards/*.tar`, so
    `load_dataset("org/name")` and the viewer work; committed shards only), or a personalised output as a Hub
    model with its model card. Token: `hf auth login` or HF_TOKEN. Details: docs/cli.md."""
    from dataclasses import asdict

    from dreamshard.tools.push import is_local_target
    from dreamshard.tools.push import push as run_push

    report = run_push(source, repo, dry_run=dry_run, private=private, revision=revision)
    if as_json:
        print_json(asdict(report))
        return
    verb = "would upload" if dry_run else ("copied" if is_local_target(repo) else "pushed")
    missing = "" if report.complete else " (the run is not complete: committed shards only; push again when it is)"
    say(f"{report.source} → {report.target}: {verb} {len(report.files)} files, {report.bytes / 2**20:.1f} MiB{missing}")
    if dry_run:
        for name in report.files:
            say(f"  {name}")
    elif report.url:
        say(report.url)


@app.command("personalize")
@user_errors(kept="its checkpoints are kept (every output.checkpoint_every steps): a re-run of the same command resumes from the newest")
def personalize(
    config: Path = typer.Argument(..., help="Personalisation config YAML (configs/personalize_datum.yaml, configs/personalize_lora.yaml)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    log_every: Optional[float] = LOG_EVERY_OPTION,
) -> None:
    """DreamBooth fine-tuning (full or LoRA) on target image(s). OUT (output.path) is the final model: use it
    with `dreamshard generate --set model.path=OUT`; OUT/checkpoint-STEP/ are earlier steps, loadable the same
    way. Re-running the same command resumes from the newest checkpoint. Multi-GPU: `accelerate launch -m
    dreamshard personalize ...`."""
    set_log_every(log_every)
    from dreamshard.config import PersonalizeConfig, load_config
    from dreamshard.personalize.dreambooth import personalize as run_personalize

    run_personalize(load_config(config, PersonalizeConfig, sets))


@app.command("train")
@user_errors(kept="a re-run of the same command resumes from the newest checkpoint, if one was written")
def train(
    config: Path = typer.Argument(..., help="Training config YAML (configs/train_dacs.yaml, configs/toy_dacs.yaml, ...)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    log_every: Optional[float] = LOG_EVERY_OPTION,
    restart: bool = typer.Option(False, "--restart", help="Move an existing output aside (OUTPUT.old-<time>) and train from scratch."),
    address: Optional[str] = typer.Option(
        None, help="Run as a DDP job on this Ray cluster through Ray Train ('auto': the cluster of `ray start`); output.path must be shared."
    ),
    workers: Optional[int] = typer.Option(None, min=1, help="Ray Train workers (DDP ranks); default with --address: one per GPU of the cluster, else 1."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Ray Train workers take a GPU each (default: when the cluster has enough)."),
    cpus_per_worker: float = typer.Option(1.0, min=0.0, help="Ray CPUs reserved per Ray Train worker (its DataLoader workers run there too)."),
) -> None:
    """Train a segmenter (dacs, source_only or supervised_synthetic) on shards and/or folder datasets, then
    evaluate on data.val. Re-running resumes from the newest checkpoint in output.path, if the settings that
    shape the result are the same (only max_iters may grow); --restart starts over. Multi-GPU / multi-node:
    `torchrun --nproc_per_node N -m dreamshard train ...`, or on a Ray cluster `--address auto [--workers N]`
    (docs/cluster.md)."""
    set_log_every(log_every)
    from dreamshard.config import TrainConfig, load_config
    from dreamshard.trainer.loop import train as run_train

    train_config = load_config(config, TrainConfig, sets)
    if address is not None or workers is not None:
        from dreamshard.trainer.launch import train_on_ray

        summary = train_on_ray(train_config, address, workers, gpu, cpus_per_worker, restart)
    else:
        summary = run_train(train_config, restart=restart)
    if summary.mIoU is not None:
        best = summary.best
        best_text = f"; best {best['mIoU']:.2f} at iteration {best['iteration']} ({best['checkpoint']})" if best else ""
        say(f"{summary.output}: mIoU {summary.mIoU:.2f} % after {summary.iterations} iterations{best_text} ({summary.wall_s:.0f} s)")
    else:
        say(f"{summary.output}: trained {summary.iterations} iterations, no evaluation (no data.val) ({summary.wall_s:.0f} s)")


@app.command("eval")
@user_errors(kept=NOTHING)
def evaluate(
    config: Path = typer.Argument(..., help="The training config (its model and data.val sections are used)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint directory (OUTPUT/checkpoints/iter_N) or its model.safetensors."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write the metrics (per-class IoU) to this JSON file."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Evaluate a checkpoint on data.val: per-class IoU, mIoU (and mIoU16/13 for the 19 classes), accuracy,
    all in percent."""
    from dreamshard.config import TrainConfig, load_config
    from dreamshard.format.store import atomic_write_json
    from dreamshard.trainer.evaluation import evaluate_checkpoint
    from dreamshard.trainer.metrics import format_table

    summary = evaluate_checkpoint(load_config(config, TrainConfig, sets), checkpoint)
    if output is not None:
        atomic_write_json(output, summary)
    if as_json:
        print_json(summary)
    elif summary:  # ranks other than 0 answer nothing
        say(format_table(summary))


@app.command("toy-data")
@user_errors(kept="the output may be incomplete: remove it and re-run")
def toy_data(
    out: Path = typer.Argument(..., help="Directory to write source/, target/ (shards) and target_val/ into."),
    seed: int = typer.Option(0, help="Seed of the scenes (same seed, same files)."),
    size: int = typer.Option(64, min=16, help="Image size in pixels (square)."),
) -> None:
    """Write the toy domain shift used to check that training adapts: a labelled source folder, unlabelled
    target shards in the engine format, a labelled target val folder (configs/toy_*.yaml read it)."""
    from dreamshard.trainer.toy import make_toy

    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; choose a new directory or remove it first")
    paths = make_toy(out, seed=seed, size=size)
    say(f"wrote toy data to {out}: " + ", ".join(f"{name}/" for name in paths))


@app.command("study")
@user_errors(kept="finished runs are kept: a re-run of the same command trains the rest")
def study(
    config: Path = typer.Argument(..., help="Study config YAML (see configs/study_toy.yaml)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    log_every: Optional[float] = LOG_EVERY_OPTION,
    address: Optional[str] = typer.Option(None, help="Ray cluster to join ('auto', 'ray://host:10001'); default: an embedded local Ray."),
) -> None:
    """Dataset-size scaling study: train on nested subsets x seeds (Ray tasks), write study.{parquet,csv,md,png}."""
    set_log_every(log_every)
    from dreamshard.cluster import ClusterWatchdog
    from dreamshard.config import StudyConfig, load_config
    from dreamshard.study import run_study

    ClusterWatchdog.hard_exit = True
    summary = run_study(load_config(config, StudyConfig, sets), address=address)
    say((summary.out / "study.md").read_text().rstrip("\n"))
    say(f"study: {len(summary.trained)} run(s) trained, {len(summary.skipped)} already done; results in {summary.out}")
    if not summary.ok:
        fail(f"{len(summary.failed)} run(s) failed after retries: {', '.join(sorted(summary.failed))}; re-run to retry them", 1)


def plan_json(report) -> dict:
    """`plan --json`: the PlanReport's fields (docs/cli.md); counts as {value: samples}, most first."""
    from dataclasses import fields

    document = {item.name: getattr(report, item.name) for item in fields(report)}
    document["counts"] = {name: dict(counter.most_common()) for name, counter in report.counts.items()}
    return document


def print_plan(report) -> None:
    from rich.table import Table

    say(
        f"{report.out}: {report.samples} samples in {report.shards} shards of {report.samples_per_shard}; "
        f"about {report.estimated_bytes / 2**30:.2f} GiB ({report.bytes_basis})"
    )
    say(f"generate would: {report.action} — {report.detail}")
    say(f"each worker needs about {report.memory_gib:.1f} GiB for one call's activations (half precision), besides the model")
    if report.workers:
        say(report.workers)
    prompts = Table(title=f"the first {len(report.first)} samples")
    for column in ("index", "seed", "class", "style", "steps", "guidance", "prompt"):
        prompts.add_column(column)
    for row in report.first:
        style = ", ".join(f"{k}={v}" for k, v in row["style"].items())
        prompts.add_row(str(row["index"]), str(row["seed"]), row["class"], style, str(row["steps"]), f"{row['guidance']:g}", row["prompt"])
    results.print(prompts)
    for name, counter in report.counts.items():
        table = Table(title=f"{name} (first {report.counted} samples)")
        table.add_column(name.split(": ")[-1])
        table.add_column("samples", justify="right")
        for value, count in sorted(counter.items(), key=lambda item: (-item[1], item[0])):
            table.add_row(value, str(count))
        results.print(table)


def run() -> None:  # pragma: no cover - console entry for `python -m dreamshard`
    app(prog_name="dreamshard")


if __name__ == "__main__":  # pragma: no cover
    run()
