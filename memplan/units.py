"""Units: sizes are int bytes everywhere; only the printers (cli, report) format them."""

from __future__ import annotations

KiB = 2**10
MiB = 2**20
GiB = 2**30
GB = 10**9

def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
