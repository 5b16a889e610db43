"""User-facing errors: one line, naming the bad value and the valid choices.

The CLI turns a `LongctxError` into `longctx: error: <message>` on stderr and exit status 2,
with no traceback; library callers get an ordinary exception.
"""
from __future__ import annotations

from typing import Iterable


class LongctxError(ValueError):
    """Bad input from the user (method, path, length, chunk size, ...)."""


def choice_error(what: str, value: object, choices: Iterable[object]) -> LongctxError:
    """`unknown method 'x'; valid choices: a, b, c`."""
    listed = ", ".join(str(c) for c in choices)
    return LongctxError(f"unknown {what} {value!r}; valid choices: {listed}")


def positive_int(name: str, value: object) -> int:
    """Parse a strictly positive integer option (e.g. chunk_size) or raise a one-line error."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        parsed = int(str(value)) if not isinstance(value, (int, float)) else int(value)
    except (TypeError, ValueError):
        raise LongctxError(f"{name} must be a positive integer, got {value!r}") from None
    if parsed <= 0:
        raise LongctxError(f"{name} must be a positive integer, got {value!r}")
    return parsed
