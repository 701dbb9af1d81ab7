"""Estimate vs a measurement, term by term (the nanoGPT habit: list each term, compare, print the ratio)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..catalogue import profiles_dir
from ..estimate import Estimate
from ..plan import TrainPlan
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
    """The first successful stored run in profiles/runs/ that names its model, plan and terms, or None.

    Returns {"path", "model" (config dict or catalogue name), "plan" (TrainPlan), "device", "gpu" (catalogue
    name, or None when the run names none the catalogue knows: estimate with generic overheads), "terms",
    "peak_bytes"} in the `memplan.run/1` shape that `memplan profile` writes. NB: read tolerantly (the
    schema is young): the model may be a name or {"name", "config"}, the terms may sit at the top
    level or under "measured"; records that cannot be read are skipped.
    """
    folder = Path(runs_dir) if runs_dir is not None else profiles_dir() / "runs"
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(run, dict) or run.get("status", "success") != "success":
            continue
        measured = run.get("measured") if isinstance(run.get("measured"), dict) else run
        terms = measured.get("terms")
        model = run.get("model")
        if isinstance(model, dict):
            model = model.get("config") or model.get("name") or model.get("hub_id")
        if not isinstance(terms, dict) or not model or not isinstance(run.get("plan"), dict):
            continue
        try:
            plan_d = dict(run["plan"])
            if isinstance(plan_d.get("target_modules"), list):
                plan_d["target_modules"] = tuple(plan_d["target_modules"])
            plan = TrainPlan(**{k: v for k, v in plan_d.items() if k in TrainPlan.field_names()})
        except Exception:  # a run from an incompatible version: skip it
            continue
        peak = measured.get("peak", {})
        gpu = run.get("gpu") if isinstance(run.get("gpu"), dict) else {}
        return {"path": str(path), "model": model, "plan": plan, "device": run.get("device", plan.device),
                "gpu": _catalogue_gpu(gpu.get("catalogue") or gpu.get("name")),
                "terms": {str(k): int(v) for k, v in terms.items() if v is not None},
                "peak_bytes": (peak.get("allocated_bytes") if isinstance(peak, dict) else None)}
    return None


def _catalogue_gpu(name: Any) -> str | None:
    if not name:
        return None
    from ..catalogue import load_gpu
    from ..errors import MemplanError

    try:
        return load_gpu(str(name)).name
    except MemplanError:
        return None
