"""Estimate vs a measurement, term by term (the nanoGPT habit: list each term, compare, print the ratio)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..errors import MemplanError
from ..estimate import Estimate
from ..profile.record import iter_runs
from ..terms import ALLOCATED_TERMS, Term


def compare_terms(estimate: Estimate, measured_terms: Mapping[str, int], measured_peak: int | None = None,
                  terms: tuple[Term, ...] = ALLOCATED_TERMS) -> pd.DataFrame:
    """One row per term: estimate_bytes, measured_bytes, diff_bytes (estimate - measured) and ratio
    (estimate / measured; <NA> when the measurement is 0), then a `peak (allocated)` row comparing
    `estimate.allocated_bytes` with `measured_peak` (default: the sum of the measured terms)."""
    rows = []
    for t in terms:
        est = int(estimate.terms.get(t, 0))
        meas = int(measured_terms.get(str(t), measured_terms.get(t, 0)) or 0)  # type: ignore[call-overload]
        rows.append((str(t), est, meas))
    peak = measured_peak if measured_peak is not None else sum(m for _, _, m in rows)
    rows.append(("peak (allocated)", int(estimate.allocated_bytes), int(peak)))
    df = pd.DataFrame(rows, columns=["term", "estimate_bytes", "measured_bytes"])
    df["diff_bytes"] = df["estimate_bytes"] - df["measured_bytes"]
    ratio = df["estimate_bytes"] / df["measured_bytes"].where(df["measured_bytes"] != 0)
    df["ratio"] = ratio.astype("Float64").round(4)
    return df


def measured_run(runs_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The first successful stored run in `runs_dir` (default profiles/runs/) with per-term measurements
    and a plan this version reads, or None.

    Returns {"path", "model" (the config.json dict), "plan" (TrainPlan), "device", "gpu" (catalogue name,
    or None when the run names none the catalogue knows: estimate with generic overheads), "terms",
    "peak_bytes"}. Records are read by `memplan.profile.record` (the one reader of `memplan.run/1`);
    files that are not valid records are skipped.
    """
    for path, run in iter_runs(runs_dir, strict=False):
        terms = run.measured.get("terms")
        if not run.ok or not isinstance(terms, Mapping):
            continue
        try:
            plan = run.train_plan()
        except MemplanError:  # a run from an incompatible version: skip it
            continue
        return {"path": str(path), "model": dict(run.model["config"]), "plan": plan, "device": run.device,
                "gpu": run.catalogue_gpu(), "terms": {str(k): int(v) for k, v in terms.items() if v is not None},
                "peak_bytes": run.allocated_bytes}
    return None
