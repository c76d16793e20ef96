"""Errors that reach the user as one clear paragraph instead of a traceback.

Exit codes: 0 ok, 1 the work failed, 2 the user's input (command line, config, files) is wrong.
"""

EXIT_FAILURE = 1
EXIT_USAGE = 2


class PlinthError(Exception):
    """A failure explained for the user; the CLI prints the message and exits with `exit_code`."""

    exit_code = EXIT_FAILURE


class UsageError(PlinthError):
    """The input is wrong (bad key, bad value, missing file); fixing the input fixes the run."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A configuration problem: names the key, where its value came from, and the fix."""


class NotSupportedError(UsageError):
    """An option the chosen recipe cannot honour (yet); refusing beats silently ignoring it."""
