"""Scaling studies: sizes, results table and plot (unit), and a whole study on the toy domain shift."""

import pytest

from dreamshard.errors import UserError
from dreamshard.trainer.study import markdown_table, parse_sizes, write_results


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
    for size, mious in ((10, [0.2, 0.3]), (40, [0.5, 0.6])):
        for seed, miou in enumerate(mious):
            made.append({"run_id": f"n{size}-s{seed}", "size": size, "seed": seed, "miou": miou,
                         "per_class_iou": {"road": miou, "car": None}, "wall_seconds": 1.0, "images_per_s": 5.0, "iterations": 3})
    made.append({"run_id": "baseline-s0", "size": None, "seed": 0, "miou": 0.1, "per_class_iou": {"road": 0.1, "car": None},
                 "wall_seconds": 1.0, "images_per_s": 5.0, "iterations": 3})
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
