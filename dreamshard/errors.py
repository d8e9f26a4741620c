"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input the user can fix (config, paths, data). The message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or --set override is invalid."""
