"""The largest micro-batch (or sequence length) that really fits: predicted, then confirmed on the device.

1. Predict with the estimator: the largest value whose estimate stays within the limit
   (`memplan.search.max_fitting`, an exact integer search over the closed-form estimate).
2. Confirm with real steps (one `Session`, the model loaded once): run the prediction; if it fits,
   gallop upwards (+1, +2, +4, ...) until a run does not fit; if it does not, gallop downwards;
   then bisect between the largest value that fit and the smallest that did not
   (`memplan.search.gallop_bisect`). Each trial is a full profiled run (OOM recovered in-process),
   so the answer is a value that ran and its neighbour above did not (or the search cap / trial
   budget was reached, which the result says).

The limit and the quantity compared with it:
- CPU: `memory_limit_bytes` (required; nothing runs out of memory on the CPU) against the measured
  peak of live tensors (`allocated_bytes`), the same quantity the CPU estimate predicts;
- CUDA with `memory_limit_bytes`: torch's allocator is capped there, so the estimate's
  `reserved_bytes` predicts, and a run fits when it raises no OOM;
- CUDA without: the GPU's memory (catalogue entry, else NVML's total) against the estimate's
  `device_bytes`; a run fits when it raises no OOM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import MemplanError
from ..plan import TrainPlan
from ..search import MAX_BATCH_SIZE, MAX_SEQ_LEN, gallop_bisect, max_fitting
from .record import MeasuredRun

__all__ = ["find_max", "predict", "gallop_bisect", "SearchResult", "Trial", "DIMENSIONS"]

DIMENSIONS = ("batch_size", "seq_len")
_FLAG = {"batch_size": "--find-max-batch", "seq_len": "--find-max-seq"}


@dataclass(frozen=True)
class Trial:
    value: int
    status: str
    peak_bytes: int | None
    run: MeasuredRun = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        r = self.run
        return {"value": self.value, "status": self.status, "peak_bytes": self.peak_bytes,
                "allocated_bytes": r.allocated_bytes, "reserved_bytes": r.reserved_bytes,
                "phase": (r.failure or {}).get("phase") if r.failure else r.peak.get("phase"),
                "run_id": r.run_id}


@dataclass(frozen=True)
class SearchResult:
    """What the search found; `largest` is 0 when even the smallest value did not fit."""

    dimension: str
    plan: TrainPlan
    predicted: int
    largest: int
    limit_bytes: int
    measure: str
    granularity: int
    trials: tuple[Trial, ...]
    capped: bool = False
    exhausted: bool = False
    notes: tuple[str, ...] = ()

    @property
    def best(self) -> MeasuredRun | None:
        for t in self.trials:
            if t.value == self.largest and t.status == "success":
                return t.run
        return None

    def to_dict(self) -> dict[str, Any]:
        b = self.best
        return {"schema": "memplan.search/1", "dimension": self.dimension, "plan": self.plan.to_dict(),
                "device": self.plan.device, "predicted": self.predicted, "largest": self.largest,
                "largest_peak_bytes": _peak(b, self.measure) if b else None, "limit_bytes": self.limit_bytes,
                "measure": self.measure, "granularity": self.granularity, "capped": self.capped,
                "exhausted": self.exhausted, "trials": [t.to_dict() for t in self.trials],
                "notes": list(self.notes)}


def _peak(run: MeasuredRun, measure: str) -> int | None:
    if run.status != "success":
        return (run.measured.get("peak") or {}).get("over_limit_bytes") or run.allocated_bytes
    return run.peak.get(measure) if run.peak.get(measure) is not None else run.allocated_bytes


class _Failed(Exception):
    pass


def predict(spec: Any, plan: TrainPlan, dimension: str, limit: int, measure: str, gpu: Any, granularity: int,
            cap_units: int) -> int:
    """The largest multiple of `granularity` (in units) whose estimate's `measure` is <= limit (0: none).

    Closed form only (`fallback_simulate=False`): where it does not cover the architecture this
    raises UnsupportedArchitectureError and the search starts from 1 instead of simulating each probe.
    """
    from ..estimate import estimate

    def value(u: int) -> int:
        e = estimate(spec, plan.replace(**{dimension: u * granularity}), gpu=gpu, fallback_simulate=False)
        return int(getattr(e, measure))

    n, _ = max_fitting(value, limit, cap=cap_units)
    return n


def find_max(model: Any, plan: TrainPlan | None = None, *, dimension: str = "batch_size", steps: int = 2,
             weights: str = "random", memory_limit_bytes: int | None = None, granularity: int | None = None,
             max_trials: int = 12, cap: int | None = None, out: str | os.PathLike[str] | None = None,
             track: bool = True, seed: int = 0, progress: Callable[[str], None] | None = None,
             gpu: Any = None, **plan_kwargs: Any) -> SearchResult:
    """Search the largest `dimension` ("batch_size" or "seq_len") that runs (see the module doc)."""
    from ..plan import plan_from
    from .record import write_run
    from .runner import open_session

    if dimension not in DIMENSIONS:
        raise MemplanError(f"cannot search {dimension!r}; one of: {', '.join(DIMENSIONS)}")
    p = plan_from(plan, **plan_kwargs)
    g = granularity or (1 if dimension == "batch_size" else 64)
    if g < 1:
        raise MemplanError(f"--granularity must be >= 1, got {g}")
    if max_trials < 1:
        raise MemplanError(f"--max-trials must be >= 1, got {max_trials}")
    if p.device == "cpu" and memory_limit_bytes is None:
        raise MemplanError(f"{_FLAG[dimension]} on the CPU needs --memory-limit GiB (nothing runs out of memory "
                           "on the CPU; the limit turns a measured peak above it into an OOM)")
    cap_value = cap or (MAX_BATCH_SIZE if dimension == "batch_size" else MAX_SEQ_LEN)
    cap_units = max(1, cap_value // g)
    session = open_session(model, p, weights=weights, memory_limit_bytes=memory_limit_bytes, track=track,
                           seed=seed, progress=progress, gpu=gpu)
    notes: list[str] = []
    trials: list[Trial] = []
    try:
        if p.device == "cpu":
            limit, measure, est_gpu = int(memory_limit_bytes), "allocated_bytes", None  # type: ignore[arg-type]
        elif memory_limit_bytes is not None:
            limit, measure, est_gpu = int(memory_limit_bytes), "reserved_bytes", session.gpu_spec
        else:
            est_gpu = session.gpu_spec
            detected = int((session.gpu_info or {}).get("memory_bytes") or 0)
            limit = est_gpu.memory_bytes if est_gpu is not None else detected
            measure = "device_bytes"
        try:
            pred = predict(session.spec, p, dimension, limit, measure, est_gpu, g, cap_units)
        except MemplanError as e:
            notes.append(f"no estimate to start from ({e}); starting at 1")
            pred = 1
        if pred == 0:
            notes.append("the estimate says even the smallest value does not fit; confirming from 1")

        def fits(u: int) -> bool:
            v = u * g
            if progress:
                progress(f"trial {dimension}={v}")
            run = session.run(p.replace(**{dimension: v}), steps)
            if out is not None:
                write_run(run, out)
            trials.append(Trial(v, run.status, _peak(run, measure), run))
            if run.status == "failed":
                raise _Failed((run.failure or {}).get("message", "failed"))
            return run.status == "success"

        try:
            largest_u, capped, exhausted = gallop_bisect(fits, pred, cap_units, max_trials)
        except _Failed as e:
            ok = [t.value for t in trials if t.status == "success"]
            largest_u, capped, exhausted = (max(ok) // g if ok else 0), False, False
            notes.append(f"search stopped: a trial failed (not an OOM): {e}")
        if exhausted:
            notes.append(f"trial budget ({max_trials}) spent before the boundary was bracketed to one step")
        if capped:
            notes.append(f"the search cap {cap_units * g} fits; the real maximum may be larger")
    finally:
        session.close()
    return SearchResult(dimension=dimension, plan=p, predicted=pred * g, largest=largest_u * g, limit_bytes=limit,
                        measure=measure, granularity=g, trials=tuple(trials), capped=capped, exhausted=exhausted,
                        notes=tuple(notes))
