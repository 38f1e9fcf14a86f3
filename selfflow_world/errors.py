"""One exception type for bad user input.

Everything a user can get wrong (a config value, a path, a file) raises :class:`UserError` with a
one-line message that names what was wrong and what is accepted. The CLI prints it as
``sfw: error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from a user: the message is one line and says what is accepted."""


def check_positive(name: str, value: int | float) -> None:
    """Raise :class:`UserError` unless ``value`` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"{name} must be a positive number, got {value!r}")


def check_count(name: str, value: int, minimum: int = 1) -> None:
    """Raise :class:`UserError` unless ``value`` is an integer (not a bool) >= ``minimum`` (1 or 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum >= 1 else "an integer >= 0"
        raise UserError(f"{name} must be {kind}, got {value!r}")
