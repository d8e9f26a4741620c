"""Study overhead: the same training runs through `run_study` (Ray tasks) vs a plain in-process loop.

Both sides train the same (size, seed) runs on the toy domain shift. The Ray side gets a 1-CPU local
cluster, so runs go one at a time as in the loop: the ratio is the cost of Ray (start, task dispatch,
worker imports, result files), not a parallel speed-up. A second Ray measurement with 2 CPUs shows what
spreading the runs buys on this machine.

    python -m bench.bench_study [--iterations 20]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def prepare(root: Path, iterations: int) -> tuple[Path, Path, dict]:
    from dreamshard.trainer.toy import make_toy

    toy = make_toy(root / "toy", num_source=64, num_target=64, num_val=16, samples_per_shard=16)
    train = yaml.safe_load((REPO / "configs/toy_dacs.yaml").read_text())
    train["data"]["source"]["folder"]["root"] = str(toy["source"])
    train["data"]["target"]["shards"]["path"] = str(toy["target"])
    train["data"]["val"]["folder"]["root"] = str(toy["target_val"])
    train["progress"] = False
    train_path = root / "train.yaml"
    train_path.write_text(yaml.safe_dump(train))
    study = {
        "data": {"run": str(toy["target"]), "extend": False},
        "train": {"config": str(train_path)},
        "sizes": [16, 32, 64],
        "seeds": [0, 1],
        "iterations": iterations,
    }
    return toy["target"], train_path, study


def study_with_ray(study: dict, out: Path, cpus: int) -> float:
    import ray

    from dreamshard.cluster import init_local_ray
    from dreamshard.config import StudyConfig, validate
    from dreamshard.study import run_study

    config = validate(StudyConfig, {**study, "output": {"path": str(out)}})
    started = time.perf_counter()
    init_local_ray(num_cpus=cpus)
    try:
        summary = run_study(config, show_progress=False)
    finally:
        ray.shutdown()
    assert summary.ok, summary.failed
    return time.perf_counter() - started


def plain_loop(study: dict, out: Path) -> float:
    import torch

    from dreamshard.config import StudyConfig, validate
    from dreamshard.study import StudyRun, base_train_config, run_train_config, train_one

    config = validate(StudyConfig, {**study, "output": {"path": str(out)}})
    torch.set_num_threads(1)  # what a 1-CPU Ray task gets
    started = time.perf_counter()
    base = base_train_config(config)
    for size in config.sizes:
        for seed in config.seeds:
            run = StudyRun(size, seed)
            (out / "runs" / run.run_id).mkdir(parents=True, exist_ok=True)
            train_one(run_train_config(config, base, run, out), str(out / "runs" / run.run_id / "result.json"), size, seed)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-study-"))
    try:
        _, _, study = prepare(root, args.iterations)
        loop_s = plain_loop(study, root / "loop")
        ray1_s = study_with_ray(study, root / "ray1", cpus=1)
        ray2_s = study_with_ray(study, root / "ray2", cpus=2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "runs": 6,
        "iterations": args.iterations,
        "plain_loop_s": loop_s,
        "ray_1cpu_s": ray1_s,
        "ray_2cpu_s": ray2_s,
        "overhead_ratio": ray1_s / loop_s,
        "speedup_2cpu": loop_s / ray2_s,
    }
    print(
        f"study, 6 runs x {args.iterations} it: plain loop {loop_s:.1f} s | Ray 1 CPU {ray1_s:.1f} s "
        f"(ratio {ray1_s / loop_s:.2f}) | Ray 2 CPUs {ray2_s:.1f} s (speed-up {loop_s / ray2_s:.2f}x)"
    )
    return result


if __name__ == "__main__":
    main()
