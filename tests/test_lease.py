"""One writer per output: the lease object on the local disk and on an fsspec store, whatever it holds."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from dreamshard.errors import UserError
from dreamshard.format.layout import LEASE
from dreamshard.format.lease import OutputLease
from dreamshard.format.store import Store


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch):
    """The pause between writing a lease and reading it back matters between two processes, not here."""
    monkeypatch.setattr("dreamshard.format.lease.SETTLE_S", 0.01)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Store:
    return Store(tmp_path / "run" if request.param == "local" else f"memory://lease-{uuid.uuid4().hex}/run")


def test_a_live_lease_refuses_a_second_driver_and_is_released(store):
    with OutputLease(store):
        assert store.exists(LEASE)
        with pytest.raises(UserError, match=r"being written by `dreamshard generate` on host .*heartbeat \d+ s ago"):
            OutputLease(store).acquire()
    assert not store.exists(LEASE)


def test_a_stale_lease_of_another_host_is_taken_over(store, caplog):
    store.makedirs()
    store.write_json(LEASE, {"owner": "someone", "host": "node-7", "pid": 4242, "heartbeat": time.time() - 600})
    lease = OutputLease(store)
    lease.acquire()
    assert json.loads(store.read_bytes(LEASE))["owner"] == lease.record["owner"]
    assert "taking over the lease of `dreamshard generate` on host node-7, pid 4242" in caplog.text
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


@pytest.mark.parametrize(
    "content",
    [
        {"owner": "x", "host": "node-7", "pid": 1, "heartbeat": "yesterday"},
        {"owner": "x", "host": "node-7", "pid": 1, "heartbeat": None},
        {"owner": "x", "host": "node-7", "pid": 1, "heartbeat": float("nan")},
        {"owner": "x", "pid": 1},
        ["not", "an", "object"],
        "just text",
    ],
    ids=["string heartbeat", "null heartbeat", "nan heartbeat", "no heartbeat", "a list", "a string"],
)
def test_a_lease_that_does_not_read_as_one_is_taken_over_with_a_warning(store, content, caplog):
    store.makedirs()
    store.write_bytes(LEASE, json.dumps(content).encode())
    with OutputLease(store, "train") as lease:
        assert json.loads(store.read_bytes(LEASE))["owner"] == lease.record["owner"]
        assert json.loads(store.read_bytes(LEASE))["command"] == "train"
    assert "taking over the unreadable lease" in caplog.text


def test_a_lease_of_this_host_with_an_impossible_pid_is_taken_over(store):
    import socket

    store.makedirs()
    for pid in (2**80, -5, 0):
        store.write_json(LEASE, {"owner": "old", "host": socket.gethostname(), "pid": pid, "heartbeat": time.time()})
        with OutputLease(store) as lease:
            assert json.loads(store.read_bytes(LEASE))["owner"] == lease.record["owner"]


def test_a_heartbeat_from_the_future_names_the_clock_skew(store):
    store.makedirs()
    store.write_json(LEASE, {"owner": "x", "command": "train", "host": "node-7", "pid": 7, "heartbeat": time.time() + 3600})
    with pytest.raises(UserError, match=r"`dreamshard train` on host node-7.*in the future .*NTP") as err:
        OutputLease(store).acquire()
    assert "-" not in str(err.value).split("heartbeat is")[1].split("s in")[0]  # no negative age


def test_a_directory_in_place_of_the_lease_is_one_line_naming_it(tmp_path):
    store = Store(tmp_path / "run")
    store.makedirs()
    (tmp_path / "run" / LEASE).mkdir()
    with pytest.raises(UserError, match=r"\.lease is a directory, not a lease file; remove it"):
        OutputLease(store).acquire()
