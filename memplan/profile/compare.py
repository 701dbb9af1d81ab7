"""Estimate vs measured for run records, and the tables of `memplan profile` and `memplan compare`
(standard library only; numbers and plans are formatted by `memplan.present`).

`compare_runs` re-estimates each stored run with the current estimator (or takes the estimate
stored in the record, `stored=True`) and lines it up with the measurement, term by term.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ..present import gib, mib, pct, plan_brief
from ..terms import Term
from .record import MeasuredRun, error_pct, estimate_error, read_run, run_paths

Out = Callable[[str], None]


def current_estimate(run: MeasuredRun) -> tuple[dict[str, Any] | None, str | None]:
    """The estimate the current estimator makes for a stored run (None and the reason when it cannot).

    Through `memplan.estimate` (a model without a closed form falls back to simulate when the `sim`
    extra is installed); a CUDA run on a GPU the catalogue does not know is not re-estimated (its
    calibrated overheads would be guessed).
    """
    from ..errors import MemplanError
    from ..estimate import estimate
    from ..model import model_from_config

    try:
        spec = model_from_config(run.model["config"], name=str(run.model.get("name", "")))
        plan = run.train_plan()
        gpu = run.catalogue_gpu()
        if run.device == "cuda" and run.gpu and gpu is None:
            raise MemplanError(f"GPU {run.gpu.get('name') or run.gpu.get('nvml_name')!r} is not in the catalogue "
                               "(see `memplan gpus`)")
        e = estimate(spec, plan, gpu=gpu).to_dict()
    except MemplanError as err:
        return None, str(err)
    return {"terms": e["terms"], "peak": e["peak"], "paged_bytes": e["paged_bytes"]}, None


def compare_run(run: MeasuredRun, stored: bool = False) -> dict[str, Any]:
    est, why = (run.estimate, None) if stored else current_estimate(run)
    cmp = estimate_error(est, run.measured, run.device) if run.status == "success" else None
    return {"run_id": run.run_id, "model": run.model.get("name"), "device": run.device,
            "gpu": (run.gpu or {}).get("name") or (run.gpu or {}).get("nvml_name"), "status": run.status,
            "plan": dict(run.plan), "estimate_source": "stored" if stored else "current",
            "estimate_unavailable": why, "failure": dict(run.failure) if run.failure else None,
            "comparison": cmp}


def compare_runs(paths: Iterable[Any], stored: bool = False) -> list[dict[str, Any]]:
    return [compare_run(read_run(p), stored=stored) | {"path": str(p)} for p in run_paths(paths)]


# ---------------------------------------------------------------------------------------------
# printers
# ---------------------------------------------------------------------------------------------
def term_table(cmp: dict[str, Any], out: Out, device: str) -> None:
    out(f"{'term':<20} {'measured MiB':>14} {'estimate MiB':>14} {'diff MiB':>11} {'error':>9}")
    for t in Term if cmp.get("terms") else ():
        if device == "cpu" and t in (Term.WORKSPACE, Term.ALLOCATOR_OVERHEAD, Term.CUDA_CONTEXT):
            continue
        if str(t) not in cmp["terms"]:  # comm_buffers: only a distributed run's comparison has it
            continue
        c = cmp["terms"][str(t)]
        out(f"{str(t):<20} {mib(c['measured']):>14} {mib(c['estimate']):>14} {mib(c['diff_bytes']):>11} "
            f"{pct(c['error_pct']):>9}")
    out("-" * 72)
    for k, c in cmp["peak"].items():
        label = k.replace("_bytes", "") + (" (peak)" if k != "paged_bytes" else "")
        out(f"{label:<20} {mib(c['measured']):>14} {mib(c['estimate']):>14} {mib(c['diff_bytes']):>11} "
            f"{pct(c['error_pct']):>9}")


def print_run(run: MeasuredRun, out: Out = print) -> None:
    d = run.to_dict()
    gpu = d.get("gpu") or {}
    where = f"cuda ({gpu.get('nvml_name') or gpu.get('torch_name')}" + (
        f" = {gpu['name']})" if gpu.get("name") else ", not in the catalogue)") if run.device == "cuda" else "cpu"
    out(f"{run.model.get('name')} ({run.model.get('architecture')}), {run.weights} weights, {run.steps} steps "
        f"on {where}")
    out(f"plan: {plan_brief(run.plan)}")
    out(f"status: {run.status}" + (f" in {run.failure.get('phase')} (step {run.failure.get('step')}): "
                                   f"{run.failure.get('type')}: {run.failure.get('message')}" if run.failure else ""))
    m = run.measured
    if run.status == "success" and m.get("terms") and d.get("estimate_error"):
        out("")
        term_table(d["estimate_error"], out, run.device)
    elif run.status == "success":
        out("measured peak: " + ", ".join(f"{k} {mib(v)} MiB" for k, v in (m.get("peak") or {}).items()
                                          if k.endswith("_bytes") and v is not None))
    pk = m.get("peak") or {}
    if pk.get("phase"):
        out(f"peak: {pk.get('phase')} of step {pk.get('step')}" + (
            f"; estimated peak phase: {run.estimate['peak'].get('phase')}" if run.estimate else ""))
    phases = m.get("phases") or {}
    if phases:
        out("per phase (steady state; load/adapters once), MiB: " + ", ".join(
            f"{k} {mib(v.get('allocated_bytes'))}" + (f"/{mib(v.get('reserved_bytes'))}r"
                                                       if v.get("reserved_bytes") is not None else "")
            for k, v in phases.items()))
    if m.get("paged_bytes"):
        out(f"paged optimizer state (managed memory, outside torch's allocator): {mib(m['paged_bytes'])} MiB")
    nv = m.get("nvml") or {}
    if run.device == "cuda":
        if nv.get("available"):
            out(f"NVML: baseline {mib(nv.get('baseline_used_bytes'))} MiB, "
                f"peak used {mib(nv.get('peak_used_bytes'))} "
                f"MiB ({mib(nv.get('peak_delta_bytes'), signed=True)} MiB for this run)")
        else:
            out(f"NVML: not read ({nv.get('reason')})")
    w = m.get("wall_seconds") or {}
    if w.get("steps"):
        out("wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in w.items() if k != "steps")
            + ", steps " + " / ".join(f"{s:.2f}" for s in w["steps"]) + " s")
    for n in run.notes:
        out(f"note: {n}")


def print_compare(rows: list[dict[str, Any]], out: Out = print) -> None:
    for i, r in enumerate(rows):
        if i:
            out("")
        where = f"{r['device']}" + (f" ({r['gpu']})" if r.get("gpu") else "")
        out(f"{r['path']}: {r['model']} on {where}, {r['status']}")
        out(f"  plan: {plan_brief(r['plan'])}")
        if r["failure"]:
            f = r["failure"]
            out(f"  {r['status']} in {f.get('phase')} (step {f.get('step')}): {f.get('message')}")
            continue
        if r["comparison"] is None:
            out(f"  no estimate to compare ({r.get('estimate_unavailable') or 'no per-term measurement'})")
            continue
        term_table(r["comparison"], lambda s: out("  " + s), r["device"])
    ok = [r for r in rows if r["comparison"]]
    if len(ok) > 1:
        key = "allocated_bytes"
        errs = [abs(r["comparison"]["peak"][key]["error_pct"]) for r in ok
                if r["comparison"]["peak"].get(key, {}).get("error_pct") is not None]
        if errs:
            errs.sort()
            out("")
            out(f"{len(errs)} runs: |allocated peak error| median {pct(errs[len(errs) // 2], signed=False)}, "
                f"max {pct(errs[-1], signed=False)}")


def print_search(res: Any, out: Out = print) -> None:
    d = res.to_dict()
    unit = "sequences" if res.dimension == "batch_size" else "tokens"
    out(f"search {res.dimension} ({res.plan.device}), limit {gib(res.limit_bytes, 3)} GiB on {res.measure}, "
        f"granularity {res.granularity}")
    out(f"{'value':>8} {'status':>8} {'peak MiB':>12}  phase")
    for t in d["trials"]:
        out(f"{t['value']:>8} {t['status']:>8} {mib(t['peak_bytes']):>12}  {t['phase'] or ''}")
    out(f"estimate predicted {res.predicted} {unit}; largest that ran: {res.largest} {unit}"
        + (f" (measured peak {mib(d['largest_peak_bytes'])} MiB)" if d["largest_peak_bytes"] else ""))
    for n in res.notes:
        out(f"note: {n}")


def error_summary(runs: Iterable[MeasuredRun]) -> dict[str, Any]:
    """Per-term error of each run's stored estimate, for reports."""
    out = {}
    for r in runs:
        e = r.estimate_error()
        if e:
            out[r.run_id] = {t: v["error_pct"] for t, v in e["terms"].items()} | {
                "peak": {k: v["error_pct"] for k, v in e["peak"].items()}}
    return out


__all__ = ["compare_run", "compare_runs", "current_estimate", "print_run", "print_compare", "print_search",
           "term_table", "error_pct"]
