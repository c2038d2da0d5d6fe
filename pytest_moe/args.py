"""argparse types for numbers a user types: the CLI's options and the plugin's ``--moe-*`` options.

Why bounds on every number: ``--tp 0`` divided by zero, ``--tp -1`` and ``--gpus 0`` passed preflight as
"ok", ``plan --gpus 1000000000`` looped for ever and ``--moe-server-timeout inf`` never timed out.  A
value outside its range is a usage error naming the option (argparse adds the option's name), exit 2
from the CLI and exit 4 from pytest.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: The longest wait any option may ask for: a week.
MAX_SECONDS = 7 * 24 * 3600.0


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """A whole number in ``[low, high]`` (no ``8.0``, no ``true``)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    parse.__name__ = "whole number"
    return parse


def seconds(low: float = 0.0, *, allow_zero: bool = True) -> Callable[[str], float]:
    """A finite number of seconds from ``low`` (inclusive when ``allow_zero``) up to a week."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        too_small = value < low or (value == low and not allow_zero)
        if not math.isfinite(value) or too_small or value > MAX_SECONDS:
            bound = ">=" if allow_zero else ">"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds {bound} {low:g} and <= {MAX_SECONDS:g}")
        return value

    parse.__name__ = "seconds"
    return parse


def fraction(text: str) -> float:
    """A finite number in (0, 1], e.g. ``--mem-fraction 0.85``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1]")
    return value
