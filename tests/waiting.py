"""Polling with a deadline, for tests that watch another process (a driver, a cluster) make progress."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float, what: str, every: float = 0.05):
    """The first truthy value of condition(), polled every `every` seconds; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
