"""The accuracy claims README.md quotes, read from its table, so tests assert the same limits.

Each row of the README's "How accurate is it?" table names the command that regenerates it; the
row's "median X %, max Y %" are the limits the tests of that command assert (`readme_claim`).
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_row(command: str) -> str:
    """The README table row that names `command` (the command that regenerates it)."""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("|") and f"`python {command}`" in line:
            return line
    raise AssertionError(f"README.md has no table row naming `python {command}`")


def readme_claim(command: str) -> tuple[float, float]:
    """(median %, max %) of the README table row that names `command`."""
    m = re.search(r"median ([0-9.]+) %, max ([0-9.]+) %", readme_row(command))
    if not m:
        raise AssertionError(f"README.md's row for {command} quotes no 'median X %, max Y %'")
    return float(m.group(1)), float(m.group(2))
