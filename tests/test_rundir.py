"""The run directory's life cycle: `generate` and `plan` decide through the same classify, so they agree on
every state an output can be in; each state is made for real and both commands are asked."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from dreamshard.config import GenerateConfig
from dreamshard.engine.dryrun import dry_run
from dreamshard.engine.run import generate
from dreamshard.errors import UserError
from dreamshard.format.layout import LEASE
from dreamshard.tools.verify import verify_dataset

N, PER_SHARD = 6, 2


def make_config(model: Path, out: Path, num_samples: int = N) -> GenerateConfig:
    return GenerateConfig.model_validate(
        {
            "model": {"path": str(model), "device": "cpu"},
            "prompts": {"classes": ["car", "bus"]},
            "sampling": {"width": 32, "height": 32, "steps": 1, "guidance_scale": 2.0},
            "output": {"path": str(out), "samples_per_shard": PER_SHARD},
            "run": {"num_samples": num_samples, "batch_size": 2, "workers": 1, "seed": 5},
        }
    )


@pytest.fixture(scope="module")
def complete_run(ray_cluster, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rundir") / "complete"
    assert generate(make_config(tiny_model, out), show_progress=False).ok
    return out


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    from dreamshard.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "tiny-1", "tiny", seed=1)


def fresh(out: Path, complete: Path) -> None:
    pass


def partial(out: Path, complete: Path) -> None:
    shutil.copytree(complete, out)
    (out / "index" / "000002.commit.json").unlink()


def complete(out: Path, complete: Path) -> None:
    shutil.copytree(complete, out)


def corrupt_index(out: Path, complete: Path) -> None:
    shutil.copytree(complete, out)
    (out / "index" / "000001.parquet").write_bytes(b"PAR1 damaged")


def stale_lease(out: Path, complete: Path) -> None:
    partial(out, complete)
    lease = {"command": "generate", "owner": "gone", "host": "node-9", "pid": 4242, "heartbeat": time.time() - 3600}
    (out / LEASE).write_text(json.dumps(lease))


# state, how it is made, num_samples asked for, other weights?, what both commands must decide, shards generate makes
STATES = [
    ("fresh", fresh, N, False, "fresh", 3),
    ("partial", partial, N, False, "resume", 1),
    ("complete", complete, N, False, "complete", 0),
    ("larger", complete, N + PER_SHARD, False, "extend", 1),
    ("smaller", complete, N - PER_SHARD, False, "refuse", 0),
    ("other weights", complete, N, True, "refuse", 0),
    ("corrupt index", corrupt_index, N, False, "resume", 1),
    ("stale lease", stale_lease, N, False, "resume", 1),
]


@pytest.mark.parametrize("name, make, num_samples, other, action, made", STATES, ids=[state[0] for state in STATES])
def test_generate_and_plan_agree_on_every_run_state(complete_run, tiny_model, other_weights, tmp_path, name, make, num_samples, other, action, made):
    out = tmp_path / "out"
    make(out, complete_run)
    config = make_config(other_weights if other else tiny_model, out, num_samples)
    planned = dry_run(config)
    assert planned.action == action, planned.detail
    if action == "refuse":
        with pytest.raises(UserError) as refused:
            generate(config, show_progress=False)
        assert planned.detail in str(refused.value)  # the same reason, word for word
        return
    summary = generate(config, show_progress=False)
    assert summary.ok and summary.action == action and summary.shards_generated == made
    assert verify_dataset(out) == [] and not (out / LEASE).exists()
