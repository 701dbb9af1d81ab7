"""Units: sizes are int bytes everywhere; only printers format them."""

from __future__ import annotations

KiB = 2**10
MiB = 2**20
GiB = 2**30
GB = 10**9

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "uint8": 1, "bool": 1, "int64": 8}


def fmt_gib(n_bytes: int | float, digits: int = 2) -> str:
    """Format bytes as GiB ("12.34 GiB")."""
    return f"{n_bytes / GiB:.{digits}f} GiB"


def fmt_bytes(n_bytes: int | float) -> str:
    """Human size with binary prefixes (B, KiB, MiB, GiB, TiB)."""
    n = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
