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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
