"""Small argument checks shared across the library."""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
    """True for an integer: a Python int or a numpy integer (anything registered as
    numbers.Integral), never a bool. Callers convert with int(value) after the check, so a
    numpy integer never reaches JSON or a file name."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
