"""The report folder: checked before any work, written atomically (temp file + os.replace)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import MemplanError

#: Every file a report writes (PNG names come from html.CHARTS); --force overwrites these and
#: leaves anything else in the folder alone.
REPORT_FILES = ("report.html", "sweep.csv", "sweep.parquet")


def prepare_out_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Create `out` (and parents) or accept it when empty; an existing non-empty folder needs `force`.

    Checks that the folder can be written by creating and removing a temporary file, so that a
    long sweep never ends in a permission error.
    """
    if out is None or not str(out).strip():
        raise MemplanError("--out is empty; give a folder for the report, e.g. --out report/")
    path = Path(os.path.expanduser(str(out)))
    if path.exists() and not path.is_dir():
        raise MemplanError(f"--out {str(path)!r} is a file, not a folder; give a folder for the report")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise MemplanError(f"--out {str(path)!r} exists and is not empty; pass --force to overwrite the report "
                           "files in it, or give another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".memplan-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MemplanError(f"cannot write the report to {str(path)!r}: {e.strerror or e}; "
                           "give a folder you can write to") from None
    return path


