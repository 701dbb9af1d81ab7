"""Errors users see. The CLI prints `memplan: error: <message>` and exits 2 for each of them."""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class MemplanError(Exception):
    """Bad input or an unavailable capability; the message says what to type instead.

    `error_kind`: a stable machine-readable name of the class of problem (sweep rows and charts
    classify errors by it, never by the message text).
    """

    error_kind = "error"


class UnknownNameError(MemplanError, LookupError):
    """A model, GPU or option name that is not known; suggests the closest known names."""

    error_kind = "unknown_name"

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = ""):
        self.kind, self.name = kind, name
        known = sorted(set(k for k in known if k))
        close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=3, cutoff=0.5)
        lower = {k.lower(): k for k in known}
        msg = f"unknown {kind} {name!r}"
        if close:
            msg += "; did you mean " + " or ".join(repr(lower[c]) for c in close) + "?"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class InvalidSpecError(MemplanError, ValueError):
    """A plan or spec with one or more problems, all listed at once."""

    error_kind = "invalid_spec"

    def __init__(self, what: str, problems: Sequence[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = f"invalid {what}: {self.problems[0]}"
        else:
            msg = f"invalid {what} ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(msg)


class UnsupportedArchitectureError(MemplanError):
    """The closed form does not cover this architecture."""

    error_kind = "unsupported_architecture"


class MissingExtraError(MemplanError, ImportError):
    """A feature needs an optional dependency group."""

    error_kind = "missing_extra"

    def __init__(self, feature: str, packages: str, extra: str):
        super().__init__(f"{feature} needs {packages}: pip install 'memplan[{extra}]'")

