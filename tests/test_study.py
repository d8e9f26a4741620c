"""Scaling studies: sizes, results table and plot (unit), and a whole study on the toy domain shift."""

import json
from pathlib import Path

import pytest
import yaml

from dreamshard.config import GenerateConfig, StudyConfig, load_config
from dreamshard.errors import UserError
from dreamshard.study import available_samples, markdown_table, parse_sizes, run_study, write_results


def test_parse_sizes_list_and_log_spaced():
    assert parse_sizes([400, 100, 100]) == [100, 400]
    assert parse_sizes("100..1600x2") == [100, 200, 400, 800, 1600]
    assert parse_sizes("10 .. 100 × 3") == [10, 30, 90]
    assert parse_sizes("1..1x2") == [1]


@pytest.mark.parametrize("bad", ["100-1600", "0..10x2", "10..5x2", "10..100x1", [0, 5]])
def test_parse_sizes_refuses_bad_specs(bad):
    with pytest.raises(UserError):
        parse_sizes(bad)


def rows():
    made = []
    for size, mious in ((10, [20.0, 30.0]), (40, [50.0, 60.0])):
        for seed, miou in enumerate(mious):
            made.append(
                {
                    "run_id": f"n{size}-s{seed}",
                    "size": size,
                    "seed": seed,
                    "miou": miou,
                    "per_class_iou": {"road": miou, "car": None},
                    "wall_seconds": 1.0,
                    "images_per_s": 5.0,
                    "iterations": 3,
                }
            )
    made.append(
        {
            "run_id": "baseline-s0",
            "size": None,
            "seed": 0,
            "miou": 10.0,
            "per_class_iou": {"road": 10.0, "car": None},
            "wall_seconds": 1.0,
            "images_per_s": 5.0,
            "iterations": 3,
        }
    )
    return made


def test_markdown_table_has_mean_and_std_per_size():
    table = markdown_table(rows())
    assert "| 10 | 2 | 25.00 | 7.07 |" in table
    assert "| 40 | 2 | 55.00 | 7.07 |" in table
    assert "baseline (source only) | 1 | 10.00 | 0.00" in table


def test_write_results_writes_four_files(tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    write_results(tmp_path, rows())
    table = pq.read_table(tmp_path / "study.parquet")
    assert table.num_rows == 5
    assert {"size", "seed", "miou", "iou_road", "iou_car", "wall_seconds", "images_per_s"} <= set(table.column_names)
    assert pacsv.read_csv(tmp_path / "study.csv").num_rows == 5
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mIoU mean" in (tmp_path / "study.md").read_text()


def test_plot_title_states_method_iterations_and_seeds_and_one_seed_has_no_band(tmp_path, monkeypatch):
    import matplotlib.figure

    from dreamshard.study import plot, plot_title

    made = [{**row, "method": "dacs" if row["size"] else "source_only"} for row in rows()]
    assert plot_title(made) == "mIoU vs generated images: dacs, 3 iterations, seeds 0, 1"
    one_seed = [row for row in made if row["seed"] == 0]
    assert plot_title(one_seed).endswith("dacs, 3 iterations, seed 0")
    shown = []
    original = matplotlib.figure.Figure.legend

    def legend(figure, *args, **kwargs):  # the labels the figure's legend shows
        shown.append(figure.axes[0].get_legend_handles_labels()[1])
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", legend)
    plot(one_seed, tmp_path / "one.png")
    plot(made, tmp_path / "two.png")
    assert "min–max over seeds" not in shown[0] and "mIoU" in shown[0] and "min–max over seeds" in shown[1]


# ------------------------------------------------------------------------------ end to end (local Ray)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from dreamshard.trainer.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy"), num_source=24, num_target=16, num_val=8, samples_per_shard=8)


def train_yaml(tmp_path, toy, method="dacs"):
    """The toy training config, pointed at this test's data, shrunk to seconds."""
    data = yaml.safe_load((REPO / f"configs/toy_{method}.yaml").read_text())
    data["data"]["source"]["folder"]["root"] = str(toy["source"])
    data["data"]["val"]["folder"]["root"] = str(toy["target_val"])
    if "target" in data["data"]:
        data["data"]["target"]["shards"]["path"] = str(toy["target"])
    data["data"]["batch_size"] = 2
    data["progress"] = False
    path = tmp_path / f"train_{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def study_config(tmp_path, train_config, run, sizes, **extra) -> StudyConfig:
    data = {
        "data": {"run": str(run), **extra.pop("data", {})},
        "train": {"config": str(train_config), **extra.pop("train", {})},
        "sizes": sizes,
        "seeds": [0, 1],
        "iterations": 2,
        "output": {"path": str(tmp_path / "study")},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, StudyConfig)


def result_stamps(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}


@pytest.mark.slow
def test_study_runs_every_size_and_seed_once_and_resumes(tmp_path, toy, ray_cluster):
    config = study_config(
        tmp_path, train_yaml(tmp_path, toy), toy["target"], [4, 8, 16], stratified=True, train={"baseline": str(train_yaml(tmp_path, toy, "source_only"))}
    )
    first = run_study(config, show_progress=False)
    assert first.ok, first.failed
    assert len(first.trained) == 8  # 3 sizes x 2 seeds + baseline x 2 seeds
    out = Path(config.output.path)
    import pyarrow.parquet as pq

    table = pq.read_table(out / "study.parquet").to_pylist()
    assert sorted((r["size"], r["seed"]) for r in table if r["size"]) == [(s, k) for s in (4, 8, 16) for k in (0, 1)]
    assert all(0 <= r["miou"] <= 100 for r in table)
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 16 | 2 |" in (out / "study.md").read_text() and "baseline" in (out / "study.md").read_text()
    assert len((out / "study.csv").read_text().strip().splitlines()) == 1 + 8
    # each run trained on its own exact subset with its own seed
    run_config = yaml.safe_load((out / "runs" / "n000000008-s1" / "train" / "config.yaml").read_text())
    assert run_config["data"]["target"]["shards"]["subset"] == 8 and run_config["seed"] == 1
    assert run_config["data"]["target"]["shards"]["subset_order"] == "stratified"

    stamps = result_stamps(out)
    again = run_study(config, show_progress=False)
    assert again.trained == [] and len(again.skipped) == 8
    assert result_stamps(out) == stamps  # nothing retrained

    # Other settings (here the iterations, for the sized runs only): their results are stale and retrained.
    changed = study_config(
        tmp_path, train_yaml(tmp_path, toy), toy["target"], [4, 8, 16], stratified=True, iterations=3,
        train={"baseline": str(train_yaml(tmp_path, toy, "source_only"))},
    )  # fmt: skip
    third = run_study(changed, show_progress=False)
    assert third.ok and len(third.trained) == 8 and third.skipped == []
    assert all(json.loads((out / "runs" / run / "result.json").read_text())["iterations"] == 3 for run in result_stamps(out))


def test_study_refuses_sizes_beyond_the_data_when_extend_is_off(tmp_path, toy):
    config = study_config(tmp_path, train_yaml(tmp_path, toy), toy["target"], [8, 32], data={"extend": False})
    with pytest.raises(UserError, match="exceeds the 16 samples"):
        run_study(config, show_progress=False)


def test_study_without_a_node_that_fits_its_runs_stops_in_one_line(tmp_path, toy, ray_cluster):
    """Bounded waiting: runs asking for a GPU on a CPU-only cluster never start; the study stops, resumable."""
    from dreamshard.errors import RunFailure

    config = study_config(tmp_path, train_yaml(tmp_path, toy), toy["target"], [4], seeds=[0], resources={"num_gpus": 1, "start_timeout_s": 1})
    with pytest.raises(RunFailure, match=r"resources.num_gpus=1\) for 1 s; 1 run\(s\) left"):
        run_study(config, show_progress=False)
    assert not list((tmp_path / "study" / "runs").glob("*/result.json"))


@pytest.mark.slow
def test_study_extends_the_dataset_with_only_the_missing_shards(tmp_path, toy, tiny_model, ray_cluster):
    from dreamshard.engine.run import generate

    gen = load_config(
        REPO / "configs/quickstart.yaml",
        GenerateConfig,
        [f"model.path={tiny_model}", "run.num_samples=16", "output.samples_per_shard=8", "run.workers=1", "sampling.steps=2"],
    )
    run_dir = tmp_path / "generated"
    assert generate(gen, out=str(run_dir), show_progress=False).ok
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "shards").glob("*.tar")}
    assert len(before) == 2

    config = study_config(tmp_path, train_yaml(tmp_path, toy), run_dir, [8, 24])
    summary = run_study(config, show_progress=False)
    assert summary.ok and len(summary.trained) == 4
    assert available_samples(str(run_dir)) == 24
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "shards").glob("*.tar")}
    assert set(after) == set(before) | {"000002.tar"}
    assert all(after[name] == stamp for name, stamp in before.items())  # existing shards untouched
