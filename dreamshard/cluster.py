"""The one place dreamshard starts or joins Ray.

Embedded default: a local Ray on 127.0.0.1 only (an unauthenticated Ray must never be reachable from the
network), and `address="local"`, since a bare `ray.init()` joins the newest `ray start` cluster recorded on
the machine. Ray reads `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` once, when `ray` is first imported, so setting it
later (after any module imported ray) is not enough: `init_local_ray` also sets the constant Ray derived.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dreamshard.errors import UserError


def init_local_ray(num_cpus: int | None = None, object_store_memory: int = 256 << 20, **options):
    """Start an embedded local Ray, loopback only; returns ray.init's context (tests and benchmarks too)."""
    import ray
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for processes started from here
    # Ray read that variable when it was first imported (maybe before this call): set what it decided.
    # Without this a local Ray listens on the machine's routable address (seen with Ray 2.60; ray.init's
    # _node_ip_address does not change it). tests/test_architecture.py checks the result.
    ray_constants.ENABLE_RAY_CLUSTER = False
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING, **options}
    return ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, **options)


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the Ray already initialised in this process; else join `address` (or the cluster of a
    `ray job submit` job); else start an embedded local Ray and stop it afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray's job supervisor
        address = "auto"
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address is None:
            init_local_ray()
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = address or "local"
        raise UserError(f"cannot start or join Ray at {where!r} ({exc}); for a cluster run `ray start --head` first, or drop --address") from None
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # ours (errors.on_sigterm_raise), not the one ray.init installed
    try:
        yield
    finally:
        ray.shutdown()
