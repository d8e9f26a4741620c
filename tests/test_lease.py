"""One driver per output: the lease object on the local disk and on an fsspec store."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from dreamshard.engine.lease import LEASE, OutputLease
from dreamshard.errors import UserError
from dreamshard.format.store import Store


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Store:
    return Store(tmp_path / "run" if request.param == "local" else f"memory://lease-{uuid.uuid4().hex}/run")


def test_a_live_lease_refuses_a_second_driver_and_is_released(store):
    with OutputLease(store):
        assert store.exists(LEASE)
        with pytest.raises(UserError, match=r"being written by another .* heartbeat \d+ s ago"):
            OutputLease(store).acquire()
    assert not store.exists(LEASE)


def test_a_stale_lease_of_another_host_is_taken_over(store, caplog):
    store.makedirs()
    store.write_json(LEASE, {"owner": "someone", "host": "node-7", "pid": 4242, "heartbeat": time.time() - 600})
    lease = OutputLease(store)
    lease.acquire()
    assert json.loads(store.read_bytes(LEASE))["owner"] == lease.record["owner"]
    assert "taking over the lease of host node-7, pid 4242" in caplog.text
    lease.release()


def test_a_fresh_lease_of_another_host_is_respected(store):
    store.makedirs()
    store.write_json(LEASE, {"owner": "someone", "host": "node-7", "pid": 4242, "heartbeat": time.time() - 5})
    with pytest.raises(UserError, match="host node-7, pid 4242"):
        OutputLease(store).acquire()
    assert json.loads(store.read_bytes(LEASE))["owner"] == "someone"  # untouched


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(store):
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.makedirs()
    store.write_json(LEASE, {"owner": "old", "host": socket.gethostname(), "pid": gone.pid, "heartbeat": time.time()})
    with OutputLease(store) as lease:
        assert json.loads(store.read_bytes(LEASE))["owner"] == lease.record["owner"]
