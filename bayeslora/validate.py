"""Argument checks shared by every module: each error names the argument, what was expected and what came."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    """``value`` if it is one of ``options``, else a ValueError naming them."""
    if value not in options:
        raise ValueError(f"{name}: expected one of {list(options)}, got {value!r}.")
    return value


def positive(name: str, value: Any, kind: type = float) -> None:
    """Raise a ValueError unless ``value`` is a finite positive number (an integer for ``kind=int``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise ValueError(f"{name}: expected a positive {'integer' if kind is int else 'number'}, got {value!r}.")


def positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    """``value`` if it is an int >= 1 (or None with ``allow_none``), else a ValueError."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive integer{' or None' if allow_none else ''}, got {value!r}.")
    return int(value)
