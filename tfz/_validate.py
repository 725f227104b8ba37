"""One way to check numbers and environment flags, so every bad value gets the same kind of message.

Integers accept ``int`` and numpy integers; numbers also accept ``float`` and numpy floats. ``bool``
is never a number here (``True`` is an ``int`` in Python, never what a caller meant). Every check
returns the value as a plain Python ``int`` / ``float`` and raises ValueError naming ``name`` and the
bad value.

This module needs only the standard library (a numpy scalar can exist only once numpy is imported, so
numpy is looked up, not imported): ``setup.py`` and ``kernels/configs.py`` load it by path where tfz
itself cannot be imported.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Any

__all__ = [
    "SWITCHES",
    "check_bool",
    "check_int",
    "check_number",
    "check_ratio",
    "env_flag",
    "float_array",
    "is_int",
    "is_number",
    "short_repr",
]

SWITCHES = ("TFZ_DEBUG", "TFZ_DISABLE_TRITON", "TFZ_FORCE_SKIP_CPP", "TFZ_TIMER_FORCE_CPU")
"""tfz's on/off environment variables read at run time, each by :func:`env_flag` (the ``tfz``
command checks them all before it starts; ``TFZ_SKIP_CPP_BUILD`` is setup.py's, read the same way)."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


MAX_SEED = 2**32 - 1
"""Largest seed tfz takes (numpy's legacy and torch's generators both take it)."""


def is_int(value: Any) -> bool:
    """``value`` is an ``int`` or numpy integer, and not a ``bool`` (numpy's bool is no integer)."""
    if isinstance(value, int):
        return not isinstance(value, bool)
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.integer)


def is_number(value: Any) -> bool:
    """``value`` is an int, float or numpy number, and not a ``bool``."""
    if isinstance(value, float) or is_int(value):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.floating)


def check_choice(name: str, value: Any, choices) -> str:
    """``value`` if it is one of ``choices`` (strings), else ValueError naming it and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {short_repr(value)}; choose one of: {', '.join(choices)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a plain ``bool`` (``bool`` or numpy's bool; not 0/1 nor a string), else ValueError."""
    np = sys.modules.get("numpy")
    if isinstance(value, bool) or (np is not None and isinstance(value, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be a bool, got {short_repr(value)}")


def check_int(
    name: str, value: Any, minimum: int | None = None, *, maximum: int | None = None, optional: bool = False
) -> int | None:
    """``value`` as an int in [minimum, maximum] (None allowed when ``optional``), else ValueError."""
    if optional and value is None:
        return None
    if (
        not is_int(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        kind = "None or an integer" if optional else "an integer"
        raise ValueError(f"{name} must be {kind}{_range(minimum, maximum)}, got {short_repr(value)}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    optional: bool = False,
    unit: str = "",
) -> float | None:
    """``value`` as a finite float in the range (``low < value`` when ``low_open``), else ValueError.

    ``unit`` ("seconds", "ms") is named in the message.
    """
    if optional and value is None:
        return None
    ok = is_number(value) and math.isfinite(_as_float(value))
    ok = (
        ok
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or value <= high)
    )
    if not ok:
        kind = "None or a finite number" if optional else "a finite number"
        if unit:
            kind += f" of {unit}"
        raise ValueError(f"{name} must be {kind}{_range(low, high, low_open)}, got {short_repr(value)}")
    return float(value)


def check_ratio(name: str, value: Any, *, optional: bool = False) -> float | None:
    """``value`` as a float in [0, 1], else ValueError."""
    return check_number(name, value, low=0.0, high=1.0, optional=optional)


def float_array(values: Any, what: str, label=None):
    """``values`` as a float64 numpy array (numpy is imported here); ValueError naming the first entry
    that is no real number (bool, str, complex, None, other objects) or too large for float64, as
    ``<what> of <label(i)>`` for a 1-D input given ``label`` (index -> name), else ``<what>[index]``.
    NaN, infinities and negative values pass: ranges are the caller's to check."""
    import numpy as np

    def bad(index, value, why: str):
        one_d = label is not None and len(index) == 1
        where = f"{what} of {label(index[0])}" if one_d else f"{what}{list(index)}"
        raise ValueError(f"{where} must be {why}, got {short_repr(value)}")

    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: expected an array of numbers ({exc})") from None
    if arr.dtype.kind in "iuf" or arr.size == 0:
        return arr.astype(np.float64, copy=False)
    if arr.dtype.kind != "O":
        bad(np.unravel_index(0, arr.shape), arr.reshape(-1)[0].item(), "a real number")
    out = np.empty(arr.shape, dtype=np.float64)
    for index, value in np.ndenumerate(arr):
        if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
            bad(index, value, "a real number")
        try:
            out[index] = float(value)
        except OverflowError:
            bad(index, value, "a number float64 can hold")
    return out


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a one-line message: cut to ``limit`` characters, its full length named."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 10]}...{text[-6:]} ({len(text)} characters)"


def env_flag(name: str, default: bool = False) -> bool:
    """Environment switch ``name``: 1/true/yes/on or 0/false/no/off/empty (any case), else ValueError."""
    text = os.environ.get(name)
    if text is None:
        return default
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(
        f"environment variable {name} must be 1/true/yes/on or 0/false/no/off, got {short_repr(text)}"
    )


def _as_float(value) -> float:
    """``float(value)``, infinite for an integer too large for a float (instead of OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _range(low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f" <= {_fmt(high)}"
    return ""


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)
