"""DDP on CPU: two gloo ranks launched by torchrun through the real CLI, on target shards of uneven sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreamshard.trainer.toy import make_toy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_ranks_take_the_same_steps_and_end_with_identical_weights(tmp_path):
    toy = make_toy(tmp_path / "toy", seed=3, size=32, num_source=16, num_target=40, num_val=4, samples_per_shard=32)  # shards of 32 and 8
    out = tmp_path / "ddp"
    sets = {
        "output.path": out,
        "max_iters": 4,
        "log_interval": 2,
        "progress": "false",
        "data.source.folder.root": toy["source"],
        "data.target.shards.path": toy["target"],
        "data.val.folder.root": toy["target_val"],
        "data.crop_size": "[32, 32]",
        "data.batch_size": 2,
        "model.embed_dim": 16,
        "model.backbone": "test_resnet",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dreamshard",
        "-q",
        "train",
        str(ROOT / "configs" / "toy_dacs.yaml"),
    ]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    ranks = summary["ranks"]
    assert len(ranks) == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert (out / "checkpoints" / "iter_0000004" / "teacher.safetensors").is_file()
    assert summary["mIoU"] is not None  # the confusion matrix was summed over both ranks' slices of val
