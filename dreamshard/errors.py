"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input the user can fix (config, paths, data). The message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or --set override is invalid."""


def one_line(exc: BaseException, last: bool = False, limit: int = 300) -> str:
    """An exception as one line of a user message: its first line, or its last for errors that carry a
    remote traceback (a failed Ray task), cut at `limit` characters; the type name if it has no text."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return (lines[-1] if last else lines[0])[:limit]
