"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix (config, paths, data). The message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or --set override is invalid."""


class RunFailure(UserError):
    """The run could not go on (out of space, unusable data, shards that kept failing): one line, exit 1,
    nothing committed is lost, and the message says how to go on."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's cancel, `kill`): handled like Ctrl-C, exit 143."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, caught by a command that saved its work first: `kept` says what a re-run starts from."""

    def __init__(self, kept: str, sigterm: bool) -> None:
        super().__init__(kept)
        self.kept, self.sigterm = kept, sigterm


# Exit codes of every command: 0 done, 1 runtime failure, 2 bad input or config, 130 interrupted (SIGINT),
# 143 terminated (SIGTERM).
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


_SIGNALS_RECEIVED: set[int] = set()


def terminated() -> bool:
    """Whether this process received SIGTERM (see on_sigterm_raise)."""
    import signal

    return signal.SIGTERM in _SIGNALS_RECEIVED


def on_sigterm_raise() -> None:
    """Turn SIGTERM into `Terminated` in the main thread (Ray's driver installs its own handler at init,
    which ends in a C++ stack dump: `cluster.ray_session` puts this one back after init)."""
    import signal
    import threading

    def handler(signum, frame):
        _SIGNALS_RECEIVED.add(signum)  # Ray's C extension may re-raise it as a plain KeyboardInterrupt
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


class DeferredInterrupts:
    """Inside `with DeferredInterrupts():` a first Ctrl-C or SIGTERM is only recorded (`received`), so a loop
    can stop at a clean point (a finished training iteration) and save its state; a second one raises at
    once. Signal handlers can only be set in the main thread: elsewhere this records nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> DeferredInterrupts:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum, frame) -> None:
        import signal

        if self.received is not None:  # the second: stop now
            if signum == signal.SIGTERM:
                _SIGNALS_RECEIVED.add(signum)
                raise Terminated()
            raise KeyboardInterrupt()
        self.received = signum

    @property
    def sigterm(self) -> bool:
        import signal

        return self.received == signal.SIGTERM


def one_line(exc: BaseException, last: bool = False, limit: int = 300) -> str:
    """An exception as one line of a user message: its first line, or its last for errors that carry a
    remote traceback (a failed Ray task), cut at `limit` characters; the type name if it has no text."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return (lines[-1] if last else lines[0])[:limit]
