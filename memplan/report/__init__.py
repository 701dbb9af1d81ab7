"""Capacity planning: grid sweeps into pandas DataFrames, matplotlib charts, a self-contained HTML
report. Needs the `report` extra (pandas, matplotlib); `import memplan` never loads this package.

    >>> import memplan
    >>> df = memplan.sweep(["llama-3-8b", "qwen2.5-7b"], ["a10g", "a100-80gb"], seq_lens=(1024, 2048))
    >>> from memplan.report import write_report
    >>> write_report(df, "out/")            # report.html, sweep.csv, sweep.parquet, *.png

The charts use matplotlib's object API (`matplotlib.figure.Figure`), never pyplot, so a notebook's or
script's matplotlib backend is left alone.
"""

from __future__ import annotations

from ..errors import MissingExtraError

try:  # one clear message instead of an ImportError deep inside
    import matplotlib  # noqa: F401
    import pandas  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("memplan report and sweep", "pandas and matplotlib", "report") from None

from .compare import compare_terms, measured_run  # noqa: E402
from .files import prepare_out_dir  # noqa: E402
from .html import run_report, write_report  # noqa: E402
from .sweep import DEFAULT_BATCH_SIZES, DEFAULT_RANKS, DEFAULT_SEQ_LENS, TERM_COLUMNS, sweep  # noqa: E402

__all__ = ["sweep", "write_report", "run_report", "prepare_out_dir", "compare_terms", "measured_run",
           "DEFAULT_SEQ_LENS", "DEFAULT_BATCH_SIZES", "DEFAULT_RANKS", "TERM_COLUMNS"]
