"""What `simulate` returns: the traced step's peak and terms, and the `memplan.simulate/1` JSON.

`SimulateResult` is a `runtime.step.StepResult` (peak, terms, phase peaks, largest tensors, paged
bytes) plus what the trace was of (the model spec, the plan), the library versions traced and
notes. `to_dict()` is the one source of `memplan simulate --json`: the same `terms` and `peak`
shape as `memplan estimate --json`, with the closed-form estimate of the same plan beside the trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model import ModelSpec
from ..plan import TrainPlan
from ..runtime.step import StepResult
from ..terms import SINGLE_DEVICE_TERMS, Term

SCHEMA = "memplan.simulate/1"


@dataclass
class SimulateResult(StepResult):
    #: the model traced (None when its config is outside memplan's architecture table)
    model: ModelSpec | None = None
    #: the plan traced (`plan.device` is the device emulated)
    plan: TrainPlan | None = None

    def estimate_check(self) -> dict[str, Any] | None:
        """The closed-form estimate of the same plan next to the trace (None where there is no closed form)."""
        from ..errors import UnsupportedArchitectureError
        from ..estimate import compute

        if self.model is None or self.plan is None:
            return None
        try:
            e = compute(self.model, self.plan)
        except UnsupportedArchitectureError:
            return None
        est = e.allocated_bytes - e.terms[Term.WORKSPACE]  # a trace sees no cuBLAS workspace
        return {"allocated_bytes": est, "moment": e.moment,
                "error_pct": round((est - self.peak_bytes) / self.peak_bytes * 100, 4) if self.peak_bytes else None}

    def to_dict(self) -> dict[str, Any]:
        """The `memplan.simulate/1` dict (`memplan simulate --json`)."""
        terms = {str(t): 0 for t in SINGLE_DEVICE_TERMS}  # comm_buffers only when a step has collectives
        terms.update({str(k): int(v) for k, v in self.terms.items() if int(v) or str(k) in terms})
        return {
            "schema": SCHEMA,
            "model": self.model.to_dict() if self.model is not None else None,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "device": self.plan.device if self.plan is not None else None,
            "gpu": None,
            "terms": terms,
            "peak": {"phase": self.peak_phase, "allocated_bytes": int(self.peak_bytes),
                     "reserved_bytes": None, "device_bytes": None},
            "phase_peaks": {str(k): int(v) for k, v in self.phase_peaks.items()},
            "paged_bytes": int(self.paged_bytes or 0),
            "fits": None,
            "headroom_bytes": None,
            "top": list(self.top or []),
            "versions": dict(self.versions or {}),
            "estimate": self.estimate_check(),
            "notes": ["simulate traces logical bytes of a real step on the meta device; "
                      "allocator overhead, workspace and CUDA context are not traced", *self.notes],
            **({"host": {"terms": dict(self.host), "bytes": sum(self.host.values())}} if self.host else {}),
        }
