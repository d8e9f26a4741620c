"""Node loss on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and a
worker raylet, all on 127.0.0.1): `generate --address` joins it, the worker node is removed mid-run, and
the dataset still holds every sample exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from dreamshard.config import GenerateConfig
from dreamshard.format.reader import manifest_rows, read_manifest
from dreamshard.tools.verify import verify_dataset

pytestmark = pytest.mark.slow


def test_a_node_removed_mid_run_loses_no_sample(tiny_model, tmp_path):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # every raylet of the test cluster on 127.0.0.1 (see dreamshard.cluster)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node = cluster.add_node(num_cpus=1)
    try:
        out = tmp_path / "run"
        config = GenerateConfig.model_validate({
            "model": {"path": str(tiny_model), "device": "cpu"},
            "prompts": {"classes": ["car", "bus"], "templates": [{"text": "a photo of a {token} {cls}"}]},
            "sampling": {"width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0},
            "output": {"path": str(out), "samples_per_shard": 10},
            "run": {"num_samples": 80, "batch_size": 4, "workers": 2, "max_shard_retries": 3},
        })  # fmt: skip
        config_file = tmp_path / "config.yaml"
        config_file.write_text(json.dumps(config.model_dump(mode="json")))
        assert cluster.address.startswith("127.0.0.1:")
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen([sys.executable, "-m", "dreamshard", "generate", str(config_file), "--address", cluster.address], stdout=log, stderr=log)
            deadline = time.monotonic() + 300
            while not ((out / "index").is_dir() and list((out / "index").glob("*.commit.json"))):
                assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-2000:]
                time.sleep(0.1)
            cluster.remove_node(node)  # its raylet and its worker processes are killed
            driver.wait(timeout=600)
        text = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 0, text[-3000:]
        assert verify_dataset(out) == []
        assert [row["key"] for row in manifest_rows(read_manifest(out))] == [f"{i:09d}" for i in range(80)]
        stats = json.loads((out / "stats.jsonl").read_text().splitlines()[-1])
        print(f"node removed: {stats['failed_workers']} failed worker(s), {stats['retries']} retried shard(s): {stats['worker_errors']}")
    finally:
        cluster.shutdown()
