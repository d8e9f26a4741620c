"""Shared fixtures: one tiny model and one local Ray cluster per test session (each costs seconds); and the
test tiers: a test that starts Ray or builds or loads a diffusion pipeline (through one of HEAVY_FIXTURES, or
marked by hand) is `slow`, so `make test-fast` (-m "not slow") is the unit tier."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

# Fixtures that start Ray or build a diffusion model: every test that uses one (directly or through another
# fixture) belongs to the slow tier.
HEAVY_FIXTURES = {"ray_cluster", "tiny_model", "tiny_sdxl", "tiny_clip", "s3_endpoint", "tiny", "assets", "models", "unfiltered", "hub_cache"}


def pytest_collection_modifyitems(items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A `tiny` random-weight pipeline directory (64x64 images), built once."""
    from dreamshard.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("shared-models") / "tiny-sd", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A `tiny-sdxl` random-weight pipeline (SDXL architecture, 64x64 images), built once."""
    from dreamshard.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("shared-models") / "tiny-sdxl", "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A `tiny-clip` random-weight CLIPModel + processor directory (quality.clip_model), built once."""
    from dreamshard.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("shared-models") / "tiny-clip", "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API: moto's server on 127.0.0.1 (a free port), with dummy credentials in the environment,
    set before any Ray worker starts so workers inherit them (AWS_ENDPOINT_URL is honoured by botocore, so
    s3fs in every process talks to it). Tests make their own bucket (`s3_bucket`)."""
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines in the test output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket on the moto server: its s3:// URL."""
    import uuid

    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint) -> str:
    """A local Ray (loopback only, no dashboard, small object store) shared by every test that asks for
    it; yields the GCS address, so subprocesses can join it with `--address`. 4 logical CPUs on purpose:
    two 1-CPU workers plus room for a replacement or a test's own task on a 2-core machine."""
    import ray

    from dreamshard.cluster import init_local_ray

    if ray.is_initialized():  # started by a test module of its own: share it, leave its shutdown to it
        yield ray.get_runtime_context().gcs_address
        return
    context = init_local_ray(num_cpus=4, object_store_memory=128 << 20)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests share 2 cores with Ray workers and DataLoader processes; torch's default of one OpenMP thread
    per core oversubscribes them and runs tiny models many times slower than a single thread does."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
