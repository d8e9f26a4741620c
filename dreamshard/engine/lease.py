"""One driver per output: a lease object `OUT/.lease` (owner, host, pid, heartbeat), renewed while the
driver runs. A second `generate` on a leased output refuses in seconds, naming the owner; a lease whose
heartbeat is older than the timeout (its driver was killed or its node lost), or whose process on this same
host no longer exists, is taken over with a warning.

Works on the local disk and on object stores (S3 and GCS read their own writes): the lease is written
whole, then read back after a short pause, so of two drivers that start at the same moment at most one
goes on. Heartbeats are wall-clock times of the writing host: keep the nodes' clocks in sync (NTP); the
timeout leaves minutes of room.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from dreamshard.errors import RunFailure, UserError
from dreamshard.format.store import Store

log = logging.getLogger(__name__)

LEASE = ".lease"
HEARTBEAT_S = 10.0  # how often the driver renews its lease
TIMEOUT_S = 120.0  # a lease not renewed for this long is stale (its driver is gone)
SETTLE_S = 0.5  # pause between writing the lease and reading it back (two drivers starting together)


class OutputLease:
    def __init__(self, store: Store, timeout_s: float = TIMEOUT_S) -> None:
        self.store, self.timeout_s = store, timeout_s
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.renewed = 0.0

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        held = self._read()
        if held and held.get("owner") != self.record["owner"]:
            age = time.time() - float(held.get("heartbeat", 0))
            who = f"host {held.get('host', '?')}, pid {held.get('pid', '?')}"
            if age < self.timeout_s and not self._owner_gone(held):
                raise UserError(
                    f"{self.store.url} is being written by another `dreamshard generate` ({who}, heartbeat {age:.0f} s ago); "
                    f"wait for it to finish, or if that process is gone, re-run after {self.timeout_s - age:.0f} s (its lease expires)"
                )
            log.warning("taking over the lease of %s on %s: its driver is gone (last heartbeat %.0f s ago)", who, self.store.url, age)
        self._write()
        time.sleep(SETTLE_S)
        if (self._read() or {}).get("owner") != self.record["owner"]:
            raise UserError(f"{self.store.url}: another `dreamshard generate` took the output at the same moment; re-run in a minute")

    def _owner_gone(self, held: dict) -> bool:
        """A lease of this same host whose process no longer exists (a killed driver) needs no timeout."""
        if held.get("host") != self.record["host"] or not isinstance(held.get("pid"), int):
            return False
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def renew(self) -> None:
        """Called from the driver's loop: rewrites the heartbeat every HEARTBEAT_S; stops the run if another
        driver took the lease over (this one was presumed dead)."""
        if time.monotonic() - self.renewed < HEARTBEAT_S:
            return
        held = self._read()
        if held and held.get("owner") != self.record["owner"]:
            raise RunFailure(f"{self.store.url}: the output's lease was taken over by host {held.get('host')} pid {held.get('pid')}; this driver stops")
        self._write()

    def release(self) -> None:
        try:
            if (self._read() or {}).get("owner") == self.record["owner"]:
                self.store.remove(LEASE)
        except OSError as exc:  # leaving a lease behind only delays the next run by the timeout
            log.warning("could not remove %s/%s (%s)", self.store.url, LEASE, exc)

    def _read(self) -> dict | None:
        try:
            data = self.store.read_json(LEASE) if self.store.exists(LEASE) else None
        except (OSError, ValueError):
            return None  # half-written or removed meanwhile: as if free
        return data if isinstance(data, dict) else None

    def _write(self) -> None:
        self.store.makedirs()
        self.store.write_json(LEASE, {**self.record, "heartbeat": time.time()})
        self.renewed = time.monotonic()
