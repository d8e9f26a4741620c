"""Dataset-size scaling studies: train on nested prefixes of a generated dataset, several seeds per size,
each (size, seed) run a Ray task, then one table and one plot of mIoU against the number of images.

A run's result is `runs/<run id>/result.json`, written when its training finishes; a re-run of the study
skips every run that has one (and a half-finished run resumes from its own training checkpoints).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from dreamshard.cluster import ClusterWatchdog, fits_a_node, ray_session
from dreamshard.config import GenerateConfig, StudyConfig, TrainConfig, apply_overrides, read_yaml, set_values, validate
from dreamshard.errors import RunFailure, UserError, one_line
from dreamshard.format.layout import RUN_RECORD
from dreamshard.format.reader import BadRunRecord, checked_run_record, committed_prefix, read_run_record
from dreamshard.format.store import Store, atomic_write, atomic_write_json
from dreamshard.identity import digest
from dreamshard.logs import StageProgress

log = logging.getLogger(__name__)

RESULT = "result.json"


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study: a subset size (None for the baseline) and a seed."""

    size: int | None
    seed: int

    @property
    def run_id(self) -> str:
        return f"baseline-s{self.seed}" if self.size is None else f"n{self.size:09d}-s{self.seed}"


@dataclass
class StudySummary:
    out: Path
    rows: list[dict]
    trained: list[str] = field(default_factory=list)  # run ids trained by this call
    skipped: list[str] = field(default_factory=list)  # already finished before
    failed: dict[str, str] = field(default_factory=dict)  # run id -> last error

    @property
    def ok(self) -> bool:
        return not self.failed


def parse_sizes(sizes: list[int] | str) -> list[int]:
    """`[100, 400]` as given (sorted, unique), or `"start..stop x factor"` log-spaced: `"100..1600x2"` →
    100, 200, 400, 800, 1600 (stop included when the factor reaches it; rounded to integers)."""
    if isinstance(sizes, list):
        values = sorted(set(sizes))
    else:
        text = sizes.replace(" ", "").replace("×", "x")
        try:
            span, factor_text = text.split("x")
            start_text, stop_text = span.split("..")
            start, stop, factor = int(start_text), int(stop_text), float(factor_text)
        except ValueError:
            raise UserError(f"study sizes {sizes!r}: expected a list or 'start..stop x factor', e.g. '100..1600x2'") from None
        if start < 1 or stop < start or not math.isfinite(factor) or factor <= 1:
            raise UserError(f"study sizes {sizes!r}: need 1 <= start <= stop and factor > 1")
        values, value = [], float(start)
        while round(value) <= stop * (1 + 1e-9):
            values.append(int(round(value)))
            value *= factor
        values = sorted(set(values))
    if not values or values[0] < 1:
        raise UserError(f"study sizes {sizes!r}: every size must be a positive number of images")
    return values


def run_study(config: StudyConfig, address: str | None = None, show_progress: bool = True) -> StudySummary:
    """Make sure the dataset is large enough, train every (size, seed) not finished yet as a Ray task,
    then write study.parquet / .csv / .md / .png into `config.output.path`."""
    out = Path(config.output.path)
    sizes = parse_sizes(config.sizes)
    train_config = base_train_config(config)
    runs = [StudyRun(size, seed) for size in sizes for seed in config.seeds]
    if config.train.baseline:
        runs += [StudyRun(None, seed) for seed in config.seeds]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study_config.json", config.model_dump(mode="json"))

    # What each run's result depends on: a result made under other settings (iterations, method, subset
    # order, the training config) is stale and the run trains again.
    configs = {run.run_id: run_train_config(config, train_config, run, out) for run in runs}
    expected = {run_id: run_settings(train) for run_id, train in configs.items()}

    def finished(run: StudyRun) -> bool:
        return _stored_settings(out, run) == expected[run.run_id]

    for run in runs:  # a stale result, or a half-trained run under other settings, is cleared (a half-trained one otherwise resumes)
        if _stale(out, run, expected[run.run_id], configs[run.run_id]):
            log.warning("study run %s was trained with other settings; training it again from scratch", run.run_id)
            shutil.rmtree(out / "runs" / run.run_id)
    todo = [run for run in runs if not finished(run)]
    summary = StudySummary(out=out, rows=[], skipped=[run.run_id for run in runs if finished(run)])
    if todo and available_samples(config.data.run) < max(sizes) and not config.data.extend:  # a damaged run: one line, before Ray
        ensure_samples(config, max(sizes), address)  # refuses in one line, before any Ray starts
    if todo:  # a study with nothing left to train starts no Ray at all
        with ray_session(address):
            ensure_samples(config, max(sizes), address)
            _train_all(config, {run.run_id: configs[run.run_id] for run in todo}, todo, out, summary, show_progress)
    summary.rows = [_read_result(out, run) for run in runs if finished(run)]
    write_results(out, summary.rows)
    return summary


# ----------------------------------------------------------------------------------------------- dataset


def available_samples(run_dir: str) -> int:
    """Samples in the committed prefix of a generated run (shards 0..k-1 all committed and full); 0 when there
    is no run yet. A damaged run record is one UserError line."""
    store = Store(run_dir)
    try:
        record = checked_run_record(store)
    except FileNotFoundError:
        return 0
    except BadRunRecord as exc:
        raise UserError(f"data.run: {exc}; `dreamshard repair {run_dir}` restores or rebuilds it") from None
    return committed_prefix(store, record["samples_per_shard"])


def ensure_samples(config: StudyConfig, needed: int, address: str | None) -> None:
    """Extend the generated dataset with the engine (same plan, only new shards) when the largest subset
    needs more samples than it has, or refuse when `data.extend` is false."""
    from dreamshard.engine.run import generate

    have = available_samples(config.data.run)
    if have >= needed:
        return
    if not config.data.extend:
        raise UserError(
            f"the largest study size ({needed}) exceeds the {have} samples in {config.data.run}; "
            "lower the sizes, or set data.extend: true to generate the missing samples"
        )
    gen_config = _generate_config(config)
    log.info("extending %s from %d to %d samples", config.data.run, have, needed)
    result = generate(gen_config, out=config.data.run, num_samples=needed, address=address)
    if not result.ok:
        raise UserError(f"extending {config.data.run} failed for shards {sorted(result.failed_shards)}; re-run the study to retry")


def _generate_config(config: StudyConfig) -> GenerateConfig:
    """The generation config: the one given, else the one recorded in the run's dreamshard.json."""
    if config.data.generate_config:
        return validate(GenerateConfig, read_yaml(config.data.generate_config), config.data.generate_config)
    store = Store(config.data.run)
    record = read_run_record(store) or {}
    record_path = store.url_of(RUN_RECORD)
    if "config" not in record:
        raise UserError(
            f"{config.data.run} was not made by `dreamshard generate`, so it cannot be extended; "
            "set data.generate_config, or lower the sizes with data.extend: false"
        )
    return validate(GenerateConfig, record["config"], str(record_path))


# ----------------------------------------------------------------------------------------------- training


def base_train_config(config: StudyConfig) -> dict:
    """The training config every run starts from (file + study overrides), validated once up front."""
    data = apply_overrides(read_yaml(config.train.config), config.train.overrides)
    validate(TrainConfig, data, config.train.config)
    return data


def run_train_config(config: StudyConfig, base: dict, run: StudyRun, out: Path) -> TrainConfig:
    """The full training config of one run: its subset, seed, iterations and output directory, set as
    values (a path like `123` or `on` stays a string)."""
    baseline = config.train.baseline or ""  # the baseline run exists only when one is configured
    if run.size is None:
        data = apply_overrides(read_yaml(baseline), config.train.overrides)
    else:
        order = "stratified" if config.stratified else "manifest"
        subset = {"data.target.shards.path": config.data.run, "data.target.shards.subset": run.size, "data.target.shards.subset_order": order}
        data = set_values(copy.deepcopy(base), subset.items())
    settings = {"seed": run.seed, "output.path": str(out / "runs" / run.run_id / "train")}
    iterations = _iterations(config, data, run.size)
    if iterations:
        settings["max_iters"] = iterations
    data = set_values(data, settings.items())
    return validate(TrainConfig, data, baseline if run.size is None else config.train.config)


def _iterations(config: StudyConfig, train_data: dict, size: int | None) -> int | None:
    """fixed: iterations → the same number for every size; fixed: epochs → epochs over the subset."""
    if config.fixed == "iterations" or size is None:
        return config.iterations
    train = TrainConfig.model_validate(train_data)  # a study's runs are one process each: the global batch is per step
    batch = train.data.global_batch_size or train.data.batch_size * train.optim.grad_accum
    assert config.epochs is not None  # StudyConfig requires it with fixed: epochs
    return max(1, math.ceil(config.epochs * size / batch))


def _train_all(config: StudyConfig, configs: dict[str, TrainConfig], todo: list[StudyRun], out: Path, summary: StudySummary, show_progress: bool) -> None:
    import ray

    resources = {"num_cpus": config.resources.num_cpus, "num_gpus": config.resources.num_gpus}
    task = ray.remote(max_retries=config.max_retries, retry_exceptions=True, **resources)(train_one)
    pending = {}
    for run in todo:
        ref = task.remote(configs[run.run_id], str(out / "runs" / run.run_id / RESULT), run.size, run.seed)
        pending[ref] = run
    total, best = len(todo), None
    watchdog = ClusterWatchdog(ray, lambda: f"{len(pending)} training run(s)")  # a cluster gone: one line, not a hang
    watchdog.start()
    unfit_since: float | None = None
    try:
        with StageProgress("study", total, "runs", enabled=show_progress) as progress:
            while pending:
                if watchdog.problem:
                    raise RunFailure(watchdog.message())
                unfit_since = _check_resources(ray, config.resources, unfit_since, len(pending))
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    run = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a failed run is reported, the others go on
                        summary.failed[run.run_id] = one_line(exc, last=True)
                        log.error("study run %s failed after %d retries: %s", run.run_id, config.max_retries, summary.failed[run.run_id])
                    else:
                        summary.trained.append(run.run_id)
                        if run.size is not None and row["miou"] is not None and (best is None or row["miou"] > best[1]):
                            best = (run.run_id, row["miou"])
                    progress.update(total - len(pending), f"best so far {best[0]} mIoU {best[1]:.2f}" if best else "")
                progress.update(total - len(pending), progress.info)  # a line in a log every --log-every s while runs train
    except BaseException:
        if not watchdog.problem:  # runs that never started would wait in the cluster for this gone driver
            for ref in pending:
                ray.cancel(ref, force=True)
        raise
    finally:
        watchdog.stop_unless_gone()


def _check_resources(ray, resources, unfit_since: float | None, left: int) -> float | None:
    """Bounded waiting: RunFailure when no node of the cluster has had the resources one run asks for during
    resources.start_timeout_s (0: wait forever, for autoscaling clusters); returns since when none has."""
    if not resources.start_timeout_s or fits_a_node(ray, resources.num_cpus, resources.num_gpus):
        return None
    now = time.monotonic()
    if unfit_since is not None and now - unfit_since > resources.start_timeout_s:
        raise RunFailure(
            f"no node of the Ray cluster has had the resources one study run asks for (resources.num_cpus={resources.num_cpus:g}, "
            f"resources.num_gpus={resources.num_gpus:g}) for {resources.start_timeout_s:g} s; {left} run(s) left: lower `resources`, "
            "add nodes, or set resources.start_timeout_s: 0 to wait for an autoscaler, then re-run the same command to resume"
        )
    return unfit_since if unfit_since is not None else now


def run_settings(config: TrainConfig) -> str:
    """A digest of everything one run's result depends on (its iterations included)."""
    from dreamshard.trainer.checkpoints import result_settings

    return digest({**result_settings(config), "max_iters": config.max_iters})


def _stale(out: Path, run: StudyRun, expected: str, train_config: TrainConfig) -> bool:
    """A result made under other settings, or a half-trained run under other settings (it would resume)."""
    from dreamshard.trainer.checkpoints import settings_changes

    if (out / "runs" / run.run_id / RESULT).is_file():
        return _stored_settings(out, run) != expected
    return bool(settings_changes(Path(train_config.output.path), train_config))


def _stored_settings(out: Path, run: StudyRun) -> str | None:
    try:
        return json.loads((out / "runs" / run.run_id / RESULT).read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def train_one(config: TrainConfig, result_path: str, size: int | None, seed: int) -> dict:
    """One study run (a Ray task): train, evaluate, write result.json last (atomic rename)."""
    from dreamshard.trainer.loop import train

    started = time.perf_counter()
    result = train(config)
    row = {
        "size": size,
        "seed": seed,
        "miou": result.mIoU,  # percent, as every mIoU dreamshard writes
        "method": config.method,
        "per_class_iou": result.per_class_iou,
        "wall_seconds": time.perf_counter() - started,
        "images_per_s": result.images_per_s,
        "iterations": config.max_iters,
        "settings": run_settings(config),
    }
    atomic_write_json(result_path, row)
    return row


def _read_result(out: Path, run: StudyRun) -> dict:
    row = json.loads((out / "runs" / run.run_id / RESULT).read_text())
    row["run_id"] = run.run_id
    return row


# ----------------------------------------------------------------------------------------------- results


def write_results(out: Path, rows: list[dict]) -> None:
    """study.parquet + study.csv (one row per run), study.md (mean ± std per size), study.png."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    flat = [_flat_row(row) for row in sorted(rows, key=lambda r: (r["size"] is None, r["size"] or 0, r["seed"]))]
    table = pa.Table.from_pylist(flat)
    pq.write_table(table, out / "study.parquet")
    pacsv.write_csv(table, out / "study.csv")
    atomic_write(out / "study.md", markdown_table(rows))
    plot(rows, out / "study.png")


def _flat_row(row: dict) -> dict:
    flat = {key: row.get(key) for key in ("run_id", "size", "seed", "method", "miou", "wall_seconds", "images_per_s", "iterations")}
    flat.update({f"iou_{name}": value for name, value in row["per_class_iou"].items()})
    return flat


def by_size(rows: list[dict]) -> dict[int, list[float]]:
    groups: dict[int, list[float]] = {}
    for row in rows:
        if row["size"] is not None and row["miou"] is not None:
            groups.setdefault(row["size"], []).append(row["miou"])
    return dict(sorted(groups.items()))


def baseline(rows: list[dict]) -> list[float]:
    return [row["miou"] for row in rows if row["size"] is None and row["miou"] is not None]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| images | runs | mIoU mean | mIoU std |", "| ---: | ---: | ---: | ---: |"]
    for size, values in by_size(rows).items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {size} | {len(values)} | {statistics.mean(values):.2f} | {std:.2f} |")
    if baseline(rows):
        values = baseline(rows)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| baseline (source only) | {len(values)} | {statistics.mean(values):.2f} | {std:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """mIoU (%) against the subset size (log scale): mean and every seed's point, the min-max band when there
    are several seeds, the source-only baseline; the title says method, iterations and seeds. The legend sits
    below the axes, where no line can be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_size(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120, layout="constrained")
    if groups:
        sizes = list(groups)
        if max(len(v) for v in groups.values()) > 1:
            lows, highs = [min(v) for v in groups.values()], [max(v) for v in groups.values()]
            ax.fill_between(sizes, lows, highs, alpha=0.25, label="min–max over seeds")
        ax.plot(sizes, [statistics.mean(v) for v in groups.values()], marker="o", label="mean mIoU" if len(seeds_of(rows)) > 1 else "mIoU")
        for size, values in groups.items():
            ax.scatter([size] * len(values), values, s=10, color="black", alpha=0.6)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(size) for size in sizes])  # the studied sizes, not powers of ten
        ax.minorticks_off()
    if baseline(rows):
        ax.axhline(statistics.mean(baseline(rows)), linestyle="--", color="gray", label="source only (no generated images)")
    ax.set_xlabel("generated images used (log scale)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(plot_title(rows), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.savefig(path)
    plt.close(fig)


def seeds_of(rows: list[dict]) -> list[int]:
    return sorted({row["seed"] for row in rows if row["size"] is not None})


def plot_title(rows: list[dict]) -> str:
    """e.g. 'mIoU vs generated images: dacs, 4000 iterations, seeds 0, 1, 2'."""
    studied = [row for row in rows if row["size"] is not None] or rows
    methods = sorted({str(row.get("method", "?")) for row in studied})
    iterations = sorted({int(row["iterations"]) for row in studied if row.get("iterations")})
    budget = f"{iterations[0]} iterations" if len(iterations) == 1 else f"{'/'.join(map(str, iterations))} iterations (fixed epochs)"
    seeds = seeds_of(rows)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    return f"mIoU vs generated images: {', '.join(methods)}, {budget}, {seed_text}"


# ------------------------------------------------------------------------------------------------ helpers
