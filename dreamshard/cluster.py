"""The one place dreamshard starts or joins Ray.

Embedded default: a local Ray on 127.0.0.1 only (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` before init keeps it
off the machine's routable address; an unauthenticated Ray must never be reachable from the network), and
`address="local"`, since a bare `ray.init()` joins the newest `ray start` cluster recorded on the machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from dreamshard.errors import UserError


def init_local_ray(num_cpus: int | None = None, object_store_memory: int = 256 << 20, **options):
    """Start an embedded local Ray, loopback only; returns ray.init's context (tests and benchmarks too)."""
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
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
    try:
        if address is None:
            init_local_ray()
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = address or "local"
        raise UserError(f"cannot start or join Ray at {where!r} ({exc}); for a cluster run `ray start --head` first, or drop --address") from None
    try:
        yield
    finally:
        ray.shutdown()
