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
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.text import Text

from dreamshard.errors import UserError, one_line
from dreamshard.logs import console


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


# ------------------------------------------------------------------------------------ cluster health

HEALTH_SECONDS = 5.0  # how often the watchdog asks whether the Ray cluster is still there
HEALTH_TIMEOUT_S = 15.0  # a GCS that does not answer this long fails a probe (Ray itself aborts the driver at 60 s)
EXIT_GRACE_S = 10.0  # time the driver's loop gets to stop by itself once the cluster is gone


def cluster_problem(ray) -> str | None:
    """None while the cluster answers and has a live node; else what is wrong. The query runs in a thread:
    a GCS that is gone can make it block."""
    result: list = []

    def ask() -> None:
        try:
            result.append(sum(1 for node in ray.nodes() if node.get("Alive")))
        except Exception as exc:  # noqa: BLE001 - any failure to reach the GCS means the same
            result.append(exc)

    thread = threading.Thread(target=ask, daemon=True, name="ray-health")
    thread.start()
    thread.join(HEALTH_TIMEOUT_S)
    if not result:
        return f"its GCS did not answer for {HEALTH_TIMEOUT_S:.0f} s"
    if isinstance(result[0], Exception):
        return f"its GCS is unreachable: {one_line(result[0], limit=160)}"
    return None if result[0] else "no node is alive"


class ClusterWatchdog(threading.Thread):
    """Asks the GCS every HEALTH_SECONDS whether the cluster is there. When it is gone, the driver's loop
    stops with one line; but a Ray call of the loop (killing or creating an actor) can block on the missing
    GCS, so if the loop has not stopped EXIT_GRACE_S later, the watchdog prints that line itself and ends
    the process (exit 1). Committed shards are safe either way (markers are written last); the lease of a
    dead driver is taken over by the next run."""

    hard_exit = False  # set by the CLI: a library caller (tests, notebooks) gets the RunFailure, never an exit
    probes = 2  # failed probes in a row before the cluster counts as gone (a slow GCS is not a lost one)

    def __init__(self, ray, left: Callable[[], str]) -> None:
        super().__init__(daemon=True, name="cluster-watchdog")
        self.ray, self.left, self._stop = ray, left, threading.Event()
        self.problem: str | None = None

    def message(self) -> str:
        return f"the Ray cluster is gone ({self.problem}); {self.left()} left: re-run the same command to resume"

    def stop_unless_gone(self) -> None:
        """The loop is done. With the cluster gone, keep the exit deadline: Ray's shutdown may block too."""
        if not self.problem:
            self._stop.set()

    def run(self) -> None:
        failures = 0
        while not self._stop.wait(HEALTH_SECONDS):
            problem = cluster_problem(self.ray)
            failures = failures + 1 if problem else 0
            if failures >= self.probes:
                self.problem = problem
                break
        if self.problem and self.hard_exit and not self._stop.wait(EXIT_GRACE_S):
            console.print(Text.assemble(("error: ", "bold red"), self.message()), highlight=False, soft_wrap=True)
            os._exit(1)


def fits_a_node(ray, num_cpus: float, num_gpus: float) -> bool:
    """Whether some live node of the cluster has at least these resources in total (free or not)."""
    for node in ray.nodes():
        have = node.get("Resources", {}) if node.get("Alive") else {}
        if have.get("CPU", 0.0) >= num_cpus and have.get("GPU", 0.0) >= num_gpus:
            return True
    return False
