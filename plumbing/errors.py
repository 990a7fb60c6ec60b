"""The one error hierarchy: every error a user can cause or meet derives from ``LifeboatError``,
which carries its exit status, so the CLI prints the message and exits without a traceback.

Exit status follows ``shared/CLI.md``: 2 for bad usage or bad input (nothing was changed),
1 for an operation that failed.
"""


class LifeboatError(Exception):
    """Base of every error lifeboat reports to a user; an operation failed (exit status 1)."""

    exit_code = 1


class UsageError(LifeboatError):
    """The user asked for something malformed: nothing was changed (exit status 2)."""

    exit_code = 2
