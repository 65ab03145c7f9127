"""Value checks of the typed strategy parameters: each error names the run-config key, the value
and what is allowed, so that a user can fix the configuration from the message alone."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def at_least(key: str, value: float, minimum: float) -> None:
    """Raise ValueError unless ``value >= minimum``."""
    if not value >= minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")


def positive(key: str, value: float, note: str = "") -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (``note`` explains the key)."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{key} must be > 0{note}, got {value}")


def non_negative(key: str, value: float, note: str = "") -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0 (``note``: e.g. " (0: off)")."""
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{key} must be >= 0{note}, got {value}")


def in_interval(key: str, value: float, low: float, high: float, bounds: str = "[]", note: str = "") -> None:
    """Raise ValueError unless ``value`` lies in the interval; ``bounds`` is ``[]``, ``(]``, ``[)`` or ``()``."""
    above = value >= low if bounds[0] == "[" else value > low
    below = value <= high if bounds[1] == "]" else value < high
    if not (above and below):
        raise ValueError(f"{key} must be in {bounds[0]}{low:g}, {high:g}{bounds[1]}{note}, got {value}")


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got '{value}'")


def positive_number(key: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0 (not a bool), else ``ValueError`` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{key} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a positive number, got {value!r}")
    return float(value)
