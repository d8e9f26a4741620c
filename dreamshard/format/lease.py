"""One writer per output: a lease object `OUT/.lease` (command, owner, host, pid, heartbeat), renewed while the
command runs. `generate`, `train` and `personalize` hold it on their output. A second command on a leased
output refuses in seconds, naming the holder; a lease whose heartbeat is older than the timeout (its process
was killed or its node lost), or whose process on this same host no longer exists, is taken over with a
warning.

Works on the local disk and on object stores (S3 and GCS read their own writes): the lease is written whole,
then read back after a short pause, so of two commands that start at the same moment at most one goes on.
Heartbeats are wall-clock times of the writing host: keep the nodes' clocks in sync (NTP); the timeout leaves
minutes of room. Leases are written atomically, so one that does not read as a lease (no finite heartbeat,
not a JSON object: edited by hand or damaged) is taken over at once, with a warning.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from dreamshard.errors import RunFailure, UserError
from dreamshard.format.layout import LEASE
from dreamshard.format.store import Store

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # how often the holder renews its lease
TIMEOUT_S = 120.0  # a lease not renewed for this long is stale (its holder is gone)
SETTLE_S = 0.5  # pause between writing the lease and reading it back (two commands starting together)


class OutputLease:
    """`with OutputLease(store, "generate"):` holds the output for one command; `renew()` from its loop."""

    def __init__(self, store: Store, command: str = "generate", timeout_s: float = TIMEOUT_S) -> None:
        self.store, self.command, self.timeout_s = store, command, timeout_s
        self.record = {"command": command, "owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.renewed = 0.0

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        held = self._read()
        if held is not None and held.get("owner") != self.record["owner"]:
            self._refuse_unless_stale(held)
        self._write()
        time.sleep(SETTLE_S)
        if (self._read() or {}).get("owner") != self.record["owner"]:
            raise UserError(f"{self.store.url}: another dreamshard command took the output at the same moment; re-run in a minute")

    def _refuse_unless_stale(self, held: dict) -> None:
        age = heartbeat_age(held)
        who = f"`dreamshard {_text(held.get('command'), 'generate')}` on host {_text(held.get('host'))}, pid {_text(held.get('pid'))}"
        if age is None:
            log.warning("taking over the unreadable lease %s/%s (%s)", self.store.url, LEASE, held.get("problem", "no valid heartbeat"))
            return
        if age < -self.timeout_s:
            seen = f"its heartbeat is {-age:.0f} s in the future (the clocks of the two hosts differ: sync them with NTP)"
        else:
            seen = f"heartbeat {max(age, 0):.0f} s ago"
        if age < self.timeout_s and not self._owner_gone(held):
            raise UserError(
                f"{self.store.url} is being written by {who} ({seen}); wait for it to finish, or if that process is gone, "
                f"re-run after {self.timeout_s - max(age, 0):.0f} s (its lease expires)"
            )
        log.warning("taking over the lease of %s on %s: it is gone (%s)", who, self.store.url, seen)

    def _owner_gone(self, held: dict) -> bool:
        """A lease of this same host whose process no longer exists (a killed command) needs no timeout."""
        pid = held.get("pid")
        if held.get("host") != self.record["host"] or isinstance(pid, bool) or not isinstance(pid, int):
            return False
        if pid <= 0:  # not a process id (kill would signal a whole group)
            return True
        try:
            os.kill(pid, 0)
        except PermissionError:  # alive, another user's
            return False
        except (OverflowError, OSError):  # no such process (ProcessLookupError), or no process can have that pid
            return True
        return _zombie(pid)

    def renew(self, now: bool = False) -> None:
        """Called from the command's loop: rewrites the heartbeat every HEARTBEAT_S (or `now`); stops the run if
        another command took the lease over (this one was presumed dead)."""
        if not now and time.monotonic() - self.renewed < HEARTBEAT_S:
            return
        held = self._read()
        if held is not None and held.get("owner") != self.record["owner"]:
            raise RunFailure(
                f"{self.store.url}: the output's lease was taken over by host {_text(held.get('host'))} pid {_text(held.get('pid'))}; this command stops"
            )
        self._write()

    def release(self) -> None:
        try:
            if (self._read() or {}).get("owner") == self.record["owner"]:
                self.store.remove(LEASE)
        except Exception as exc:  # noqa: BLE001 - leaving a lease behind only delays the next run by the timeout
            log.warning("could not remove %s/%s (%s: %s)", self.store.url, LEASE, type(exc).__name__, exc)

    def _read(self) -> dict | None:
        """The lease as written; None when there is none; {"problem": ...} when there is one that does not
        read as a lease (a damaged file: stale, see heartbeat_age)."""
        if self.store.fs.isdir(self.store.path(LEASE)):
            raise UserError(f"{self.store.url_of(LEASE)} is a directory, not a lease file; remove it (nothing else is stored there) and re-run")
        try:
            data = self.store.read_json(LEASE) if self.store.exists(LEASE) else None
        except FileNotFoundError:
            return None  # removed meanwhile
        except (OSError, ValueError) as exc:
            return {"problem": f"unreadable: {type(exc).__name__}"}
        if data is None:
            return None
        return data if isinstance(data, dict) else {"problem": f"a JSON {type(data).__name__}, not an object"}

    def _write(self) -> None:
        self.store.fs.makedirs(self.store.root, exist_ok=True)
        self.store.write_json(LEASE, {**self.record, "heartbeat": time.time()})
        self.renewed = time.monotonic()


class NoLease:
    """What a process that holds no lease has (the other ranks of a distributed run): renewing does nothing."""

    def __enter__(self) -> NoLease:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def renew(self, now: bool = False) -> None:
        pass


def _zombie(pid: int) -> bool:
    """A process that exited but was not reaped (its parent died where nothing reaps orphans, as in some
    containers) still answers kill(pid, 0): on Linux its state in /proc says it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def lease_for(store: Store, command: str, holder: bool) -> OutputLease | NoLease:
    """The output's lease for the process that writes it (`holder`), nothing for the others."""
    return OutputLease(store, command) if holder else NoLease()


def heartbeat_age(held: dict[str, Any]) -> float | None:
    """Seconds since the lease's heartbeat (negative: the holder's clock is ahead); None when it has none that
    is a finite number (a damaged lease)."""
    beat = held.get("heartbeat")
    if isinstance(beat, bool) or not isinstance(beat, (int, float)) or not math.isfinite(beat):
        return None
    return time.time() - float(beat)


def _text(value: Any, default: str = "?") -> str:
    """A lease field for a message: short, one line, whatever was stored."""
    return default if value is None else str(value).replace("\n", " ")[:60]
