"""The fit arithmetic, once: the reserve check and headroom (standard library only, imports nothing
from memplan but the errors, so `estimate`, `fit`, `recommend` and `report.sweep` can all use it).

A plan fits a GPU when `device_bytes + reserve_bytes <= memory_bytes`:

    headroom_bytes = memory_bytes - device_bytes - reserve_bytes      (fits when >= 0)
    fit_limit_bytes = memory_bytes - reserve_bytes                    (the most device_bytes that fit)
"""

from __future__ import annotations

import math
from typing import Any

from .errors import MemplanError
from .units import GiB


def check_reserve(reserve_bytes: Any) -> int:
    """`reserve_bytes` as a non-negative int, else MemplanError (one line). bool, float, inf and nan
    are refused: a reserve is a whole number of bytes (the CLI's --reserve GiB goes through
    `reserve_from_gib`)."""
    if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int):
        raise MemplanError(f"reserve must be a whole number of bytes >= 0, got {reserve_bytes!r}"
                           + (" (the CLI's --reserve takes GiB)" if isinstance(reserve_bytes, float) else ""))
    if reserve_bytes < 0:
        raise MemplanError(f"reserve must be a whole number of bytes >= 0, got {reserve_bytes}")
    return reserve_bytes


def reserve_from_gib(gib: float | None, flag: str = "--reserve") -> int:
    """The CLI's `--reserve GiB` in bytes (None: 0); refuses negatives, inf and nan in one line."""
    if gib is None:
        return 0
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not math.isfinite(gib) or gib < 0:
        raise MemplanError(f"{flag} must be a finite number of GiB >= 0, got {gib}")
    return check_reserve(int(round(gib * GiB)))


def fit_limit_bytes(memory_bytes: int, reserve_bytes: int = 0) -> int:
    """The largest `device_bytes` that fits `memory_bytes` with `reserve_bytes` kept free."""
    return memory_bytes - reserve_bytes


def headroom_bytes(memory_bytes: int, device_bytes: int, reserve_bytes: int = 0) -> int:
    """Bytes left after the step's peak and the reserve (negative when it does not fit)."""
    return fit_limit_bytes(memory_bytes, reserve_bytes) - device_bytes
