"""The estimator against every stored run in profiles/runs/ (written by `memplan profile`).

Each record carries the model's config.json values and the resolved plan, so the *current* estimate is
recomputed here and compared with what was measured:
- CPU runs: |peak allocated error| <= 3 % (live tensor bytes; no allocator, no context);
- GPU runs (once scripts/gpu_check.sh records are committed): |peak reserved error| <= 4 % (DESIGN.md).
Runs that ran out of memory or failed are checked for shape only. Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.catalogue import profiles_dir
from memplan.profile.record import read_run, validate
from memplan.profile.compare import current_estimate
from memplan.profile.record import estimate_error

RUNS = sorted((profiles_dir() / "runs").glob("*.json"))
CPU_TOL_PCT, GPU_RESERVED_TOL_PCT = 3.0, 4.0


def test_there_are_stored_runs():
    cpu = [p for p in RUNS if json.loads(p.read_text())["device"] == "cpu"]
    assert len(cpu) >= 8, "profiles/runs should hold the committed CPU profiles"


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_stored_run(path: Path):
    d = json.loads(path.read_text())
    assert validate(d) == [], path.name
    assert path.stat().st_size < 64 * 1024, "keep run records small"
    run = read_run(path)
    if run.status != "success":
        assert run.failure and run.failure.get("phase"), "an OOM/failed run says where"
        return
    est, why = current_estimate(run)
    if est is None:
        pytest.skip(f"no closed-form estimate: {why}")
    cmp = estimate_error(est, run.measured, run.device)
    if run.device == "cpu":
        err = cmp["peak"]["allocated_bytes"]["error_pct"]
        assert abs(err) <= CPU_TOL_PCT, f"{path.name}: peak error {err:+.2f}%"
    else:
        res = cmp["peak"].get("reserved_bytes")
        assert res is not None, "a CUDA run records the reserved peak"
        assert abs(res["error_pct"]) <= GPU_RESERVED_TOL_PCT, f"{path.name}: reserved error {res['error_pct']:+.2f}%"
