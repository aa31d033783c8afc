"""User-facing errors.

Anything a user can cause (a missing file, a malformed label line, an unknown model
name, a bad option) raises :class:`EdgekitError` with one line that says what went
wrong, where, and how to fix it. The CLI prints that line and exits non-zero; it never
shows a traceback for these.
"""


class EdgekitError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""

    exit_code = 2


class BackendUnavailableError(EdgekitError):
    """A kernel backend was requested that cannot run on this machine."""


class CheckError(EdgekitError):
    """A check on valid input failed (export parity, a benchmark's correctness check):
    exit status 1, as a failed test, not 2 as bad input."""

    exit_code = 1
