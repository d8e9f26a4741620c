"""bench/bench_gpu.py stays runnable where there is no GPU: its --smoke run on the CPU (tiny shapes) measures
every figure the GPU run reports (not a speed test: nothing is asserted about speed)."""

import pytest

from bench import bench_gpu


@pytest.mark.slow
def test_smoke_run_measures_every_figure(ray_cluster, tmp_path, capsys):
    argv = ["--smoke", "--shapes", "tiny", "--peak-tflops", "1", "--json", str(tmp_path / "r.json"), "--models", str(tmp_path)]
    results = bench_gpu.main(argv)
    result = results["tiny"]
    entry = result["compile"]["off"]
    assert entry["bare_images_per_s"] > 0 and entry["engine_images_per_s"] > 0 and entry["engine_in_calls_images_per_s"] > 0
    assert entry["ratio"] == entry["engine_images_per_s"] / entry["bare_images_per_s"] and 0 < entry["engine_busy"] <= 1
    assert entry["engine_images_per_call"] == 2.0 and entry["bare_gpu_util"] is None  # full calls; no GPU to sample here
    assert result["flops_per_image"] > 1e6 and 0 < entry["mfu"] < 1  # against a 1 TFLOP/s "peak"
    assert set(result["options"]) == set(bench_gpu.OPTIONS) and all(o["images_per_s"] > 0 for o in result["options"].values())
    report = capsys.readouterr().out
    assert "| tiny 64² | off |" in report and "| tiny 64² | vae_tiling |" in report and (tmp_path / "r.json").is_file()
