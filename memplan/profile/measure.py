"""Per-phase memory bookkeeping for a profiled run, and failure classification.

`CudaMeter` reads torch's caching-allocator statistics at every phase boundary of a step:
`torch.cuda.max_memory_allocated(dev)` / `max_memory_reserved(dev)` give the peak since the last
`torch.cuda.reset_peak_memory_stats(dev)`, which it calls when a phase starts; the allocator counts on
the host at allocation time, so no synchronisation is needed for them. NVML (device-wide used memory,
which includes the CUDA context and resident managed memory) is read after
`torch.cuda.synchronize(dev)` at each boundary and sampled on a thread in between (`NvmlSampler`).
The CUDA context and library state at a boundary is NVML used - baseline (before CUDA init) -
torch reserved - paged (managed) optimizer state.

The meter only needs an object with torch.cuda's memory functions (`stats`), so its bookkeeping is
tested on the CPU with a fake.
"""

from __future__ import annotations

import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

#: the phases of a step, in the order they happen (gradient accumulation repeats the first three)
STEP_PHASES = ("forward", "loss", "backward", "optimizer")

_OOM_TEXT = re.compile(
    r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|"
    r"memplan emulated out of memory", re.IGNORECASE)


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory failure: torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same
    class), a Python MemoryError (host), or a RuntimeError whose message is a CUDA/cuBLAS
    allocation failure (raised as a plain RuntimeError by C10_CUDA_CHECK / cuBLAS, and by
    bitsandbytes' kernels when their torch allocations fail).

    NB: bitsandbytes' own managed-memory allocation (`cget_managed_ptr`, paged optimizer state)
    calls `exit(1)` in C when `cudaMallocManaged` fails (csrc: CUDA_CHECK_RETURN); no Python handler
    sees it. Sweeps that must survive it run each group in a child process (see matrix.py), which
    turns a child that died with "out of memory" on stderr into an "oom" record.
    """
    torch = sys.modules.get("torch")
    oom_cls = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM_TEXT.search(str(exc)))


def is_oom_text(text: str) -> bool:
    return bool(_OOM_TEXT.search(text or ""))


class EmulatedOOM(MemoryError):
    """Raised for a `memory_limit_bytes` crossing on the CPU (nothing OOMs there)."""


@dataclass
class PhaseReading:
    step: int  # 0 for load/adapters
    phase: str
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None       # max NVML used during the phase (sampled)
    nvml_end_bytes: int | None = None        # NVML used at the end of the phase (after synchronize)
    reserved_end_bytes: int | None = None
    context_bytes: int | None = None         # NVML used - baseline - reserved - paged, at the end
    tracked_bytes: int | None = None         # the live-tensor tracker's peak in this phase
    partial: bool = False                    # the phase was cut short by a failure

    def merge(self, other: "PhaseReading") -> None:
        """Gradient accumulation repeats phases within a step: keep the maxima."""
        for k in ("allocated_bytes", "reserved_bytes", "nvml_used_bytes", "tracked_bytes"):
            a, b = getattr(self, k), getattr(other, k)
            if b is not None and (a is None or b > a):
                setattr(self, k, b)
        for k in ("nvml_end_bytes", "reserved_end_bytes", "context_bytes"):
            if getattr(other, k) is not None:
                setattr(self, k, getattr(other, k))
        self.partial = self.partial or other.partial

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("step", "phase") and v is not None}
        if not self.partial:
            d.pop("partial", None)
        return d


@dataclass
class CudaMeter:
    """torch allocator + NVML readings per (step, phase). `stats` is `torch.cuda` (or a fake)."""

    stats: Any
    device: int = 0
    nvml: Any = None              # Nvml or None
    sampler: Any = None           # NvmlSampler or None
    baseline_used: int | None = None
    paged_bytes: Callable[[], int] = lambda: 0
    readings: list[PhaseReading] = field(default_factory=list)
    step: int = 0
    current: str | None = None

    # ---- phases ----------------------------------------------------------------------------------
    def start(self, phase: str) -> None:
        """Close the open phase (if any) and open `phase`: peaks restart from the current usage."""
        self.close()
        self.stats.reset_peak_memory_stats(self.device)
        if self.sampler is not None:
            self.sampler.take()
        self.current = str(phase)

    def begin_step(self, step: int) -> None:
        self.close()
        self.step = step

    def close(self, partial: bool = False) -> PhaseReading | None:
        if self.current is None:
            return None
        st = self.stats
        r = PhaseReading(self.step, self.current, partial=partial,
                         allocated_bytes=int(st.max_memory_allocated(self.device)),
                         reserved_bytes=int(st.max_memory_reserved(self.device)))
        if not partial:
            try:
                st.synchronize(self.device)
            except Exception:  # a sticky CUDA error: the readings above still stand
                pass
        r.reserved_end_bytes = int(st.memory_reserved(self.device))
        if self.sampler is not None:
            r.nvml_used_bytes = self.sampler.take()
        if self.nvml is not None:
            r.nvml_end_bytes = self.nvml.used()
            if r.nvml_used_bytes is None:
                r.nvml_used_bytes = r.nvml_end_bytes
        if r.nvml_end_bytes is not None and self.baseline_used is not None:
            r.context_bytes = max(0, r.nvml_end_bytes - self.baseline_used - r.reserved_end_bytes
                                  - int(self.paged_bytes()))
        self.current = None
        self._add(r)
        return r

    def _add(self, r: PhaseReading) -> None:
        for old in self.readings:
            if old.step == r.step and old.phase == r.phase:
                old.merge(r)
                return
        self.readings.append(r)

    # ---- summaries -------------------------------------------------------------------------------
    def phase(self, step: int, phase: str) -> PhaseReading | None:
        return next((r for r in self.readings if r.step == step and r.phase == phase), None)

    def step_readings(self, step: int) -> list[PhaseReading]:
        return [r for r in self.readings if r.step == step]


def steady_steps(steps_run: int) -> list[int]:
    """Steps whose peak counts (1-based): step >= 2, when the optimizer state exists; step 1 alone when
    only one step ran."""
    return list(range(2, steps_run + 1)) if steps_run >= 2 else [1]


def summarize_cuda(meter: CudaMeter, steps_run: int) -> dict[str, Any]:
    """Steady-state peaks and per-phase maxima (over steady steps) from a meter's readings."""
    steady = steady_steps(steps_run)
    rows = [r for r in meter.readings if r.step in steady]
    out: dict[str, Any] = {"allocated_bytes": None, "reserved_bytes": None, "nvml_used_bytes": None,
                           "phase": None, "step": None, "context_bytes": None}
    if not rows:
        return out
    best = max(rows, key=lambda r: r.allocated_bytes or 0)
    out["allocated_bytes"] = best.allocated_bytes
    out["phase"], out["step"] = best.phase, best.step
    out["reserved_bytes"] = max(r.reserved_bytes or 0 for r in rows)
    nv = [r.nvml_used_bytes for r in rows if r.nvml_used_bytes is not None]
    out["nvml_used_bytes"] = max(nv) if nv else None
    ctx = [r.context_bytes for r in rows if r.context_bytes is not None]
    out["context_bytes"] = int(statistics.median(ctx)) if ctx else None
    return out


PHASE_ORDER = ("load", "adapters") + STEP_PHASES


def ordered_phases(phases: dict[str, Any]) -> dict[str, Any]:
    """load, adapters, forward, loss, backward, optimizer, then any other phase; "setup" dropped."""
    keys = [k for k in PHASE_ORDER if k in phases] + [k for k in phases if k not in PHASE_ORDER and k != "setup"]
    return {k: phases[k] for k in keys}


def phases_max(readings: list[PhaseReading], steps: list[int]) -> dict[str, dict[str, Any]]:
    """Per phase name: the maxima over `steps` (step phases), plus load/adapters (step 0)."""
    out: dict[str, PhaseReading] = {}
    for r in readings:
        if r.step != 0 and r.step not in steps:
            continue
        cur = out.get(r.phase)
        if cur is None:
            out[r.phase] = PhaseReading(r.step, r.phase, **{k: v for k, v in r.__dict__.items()
                                                            if k not in ("step", "phase")})
        else:
            cur.merge(r)
    return ordered_phases({k: v.to_dict() for k, v in out.items()})
