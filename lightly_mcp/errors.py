"""One-line descriptions of exceptions, for messages shown to users."""

from __future__ import annotations


class MCPWarning(UserWarning):
    """A warning about the method itself (e.g. an oscillating ADMM mask).

    The command line silences third-party warnings unless ``--debug``; these stay.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" if it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def describe_error(error: BaseException) -> str:
    """``"TypeName: first line of the message"``, or just the type name."""
    line = first_line(error)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
