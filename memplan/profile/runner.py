"""Real training steps on the device, measured per phase and per term (the `profile` engine).

One `Session` holds a loaded, adapted model; `Session.run(plan, steps)` builds the optimizer the HF
Trainer builds for `plan.optim`, runs `steps` Trainer-like steps through `runtime.step.run_steps`
(the same code path as simulate and the CPU agreement tests) and returns a `MeasuredRun`. Plans that
differ only in batch size, sequence length, gradient accumulation, optimizer or autocast reuse the
loaded model (a search or a sweep loads once); anything else reloads.

Measurement:
- CUDA: torch allocator peaks per phase (load, adapters, forward, loss, backward, optimizer) and per
  step (`CudaMeter`), NVML before CUDA init (baseline), at each phase boundary and sampled during
  phases; the live-tensor tracker (512-B rounding, CUDA storages only) attributes the tracked bytes to
  terms at the last step's peak. `workspace` = torch's peak allocated - the tracker's peak (what the
  allocator holds that no aten op created: cuBLAS/cuBLASLt workspaces, mostly);
  `allocator_overhead` = peak reserved - peak allocated; `cuda_context` = NVML used - baseline -
  reserved - paged optimizer state of the process (median over steady-state phase boundaries).
  Paged optimizer state (bitsandbytes managed memory, tensors marked `is_paged`) is summed from the
  optimizer's state.
- CPU: the live-tensor tracker only (no allocator, no context); `memory_limit_bytes` turns a measured
  peak above the limit into an "oom" result (the phase where the limit was first crossed), so the
  OOM and search logic runs on machines where nothing OOMs. On CUDA the same argument caps the
  caching allocator with `torch.cuda.set_per_process_memory_fraction`, which raises real OOMs.

Failures are results: an OOM (see `measure.is_oom`) gives status "oom" with the phase, step and the
memory seen so far; anything else "failed" with the error. Either way the step's tensors are released
(the traceback's frames are cleared, then `gc.collect()` and `torch.cuda.empty_cache()`) and the
session stays usable, so a sweep continues.

Known limitations: the steady-state peak is the maximum over steps >= 2; per-term attribution is the
last step's. Cached allocator segments from an earlier run in the same session are released
(`empty_cache`) before each run, but bitsandbytes never frees paged (managed) optimizer buffers
(its GlobalPageManager keeps them), so NVML's reading grows by them across runs in one process; the
context figure subtracts all of them (assumed resident: each was prefetched to the device when its
run stepped), which is exact unless the driver evicted some. The GPU check runs each model group in
its own process.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

from ..errors import MemplanError
from ..formulas import MODELED_VERSIONS
from ..model import ModelSpec
from ..plan import TrainPlan
from ..terms import Term
from .measure import (STEP_PHASES, CudaMeter, PhaseReading, is_oom, ordered_phases, phases_max, steady_steps,
                      summarize_cuda)
from .record import MeasuredRun

#: plan fields a session can change without reloading the model
RELOAD_FREE = ("batch_size", "seq_len", "gradient_accumulation_steps", "optim", "mixed_precision", "device")
_TOP = 8  # largest tensors kept in a record at the peak (keeps files small)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(text: str, n: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def package_versions(nvml: Any = None) -> dict[str, Any]:
    """Versions of everything whose behaviour decides the memory of a step."""
    from importlib import metadata

    from .. import __version__

    v: dict[str, Any] = {"memplan": __version__, "python": platform.python_version()}
    for pkg in (*MODELED_VERSIONS, "nvidia-ml-py"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    try:
        import torch

        v["cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover - torch is required to profile
        v["cuda"] = v["cudnn"] = None
    v["driver"] = nvml.driver_version() if nvml is not None else None
    return v


def model_record(spec: ModelSpec) -> dict[str, Any]:
    cfg = json.loads(json.dumps(dict(spec.config), default=str))
    return {"name": spec.hub_id or spec.name, "architecture": spec.architecture, "model_type": spec.model_type,
            "params": spec.params, "hub_id": spec.hub_id or None, "config": cfg}


def match_gpu(*names: str | None):
    """The catalogue GPUSpec whose name, alias or nvml_names matches one of `names`, else None."""
    from ..catalogue import load_gpu
    from ..errors import UnknownNameError

    for n in names:
        if not n:
            continue
        try:
            return load_gpu(n)
        except UnknownNameError:
            continue
    return None


def _paged_bytes(opt: Any) -> int:
    """bitsandbytes paged state: tensors from F.get_paged carry `is_paged = True`."""
    total, seen = 0, set()
    for st in getattr(opt, "state", {}).values():
        for t in st.values():
            if getattr(t, "is_paged", False) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _process_paged_bytes() -> int:
    """Every paged (managed) buffer bitsandbytes made in this process: its GlobalPageManager keeps them all
    and never frees them, so after an earlier run in the same process they still occupy the device."""
    try:
        import bitsandbytes.functional as bnbF

        return sum(t.numel() * t.element_size() for t in bnbF.GlobalPageManager.get_instance().paged_tensors)
    except Exception:  # no bitsandbytes, or its internals moved
        return 0


def _static_terms(model, plan: TrainPlan, round_to: int, device: str | None) -> dict[str, int]:
    """Terms of the parameters, buffers and quant state that exist now (registered, not traced)."""
    from ..runtime.classify import param_classifier
    from ..runtime.tracker import LiveTensorTracker

    t = LiveTensorTracker(round_to=round_to, device=device)
    t.register_model(model, param_classifier(model))
    return t.terms_at(0)


# ---------------------------------------------------------------------------------------------
# trackers that report phase changes and step boundaries to the session
# ---------------------------------------------------------------------------------------------
def _make_tracker(session: "Session", track: bool, round_to: int, device: str):
    if not track:
        return _NullTracker(session)
    from ..runtime.tracker import LiveTensorTracker

    class PhaseTracker(LiveTensorTracker):
        """The live-tensor tracker, plus per-step peaks and phase callbacks."""

        def __init__(self) -> None:
            super().__init__(round_to=round_to, device=device)
            self.step_peaks: list[dict[str, Any]] = []
            self._k = 0

        def set_phase(self, phase) -> None:
            session._on_phase(str(phase))
            super().set_phase(phase)

        def _snapshot(self) -> dict[str, Any]:
            return {"step": self._k, "allocated_bytes": self.peak, "phase": self.peak_phase,
                    "phases": {k: v.bytes for k, v in self.phase_peaks.items()}}

        def new_step(self) -> None:
            if self._k:
                self.step_peaks.append(self._snapshot())
            self._k += 1
            self.reset_peak()

        def finish(self) -> None:
            if self._k and (not self.step_peaks or self.step_peaks[-1]["step"] != self._k):
                self.step_peaks.append(self._snapshot())

    return PhaseTracker()


class _NullTracker:
    """Duck-typed stand-in for the tracker when tracking is off (overhead measurement, bare CUDA)."""

    peak = 0
    peak_at = -1
    peak_phase = ""
    paged_bytes = 0

    def __init__(self, session: "Session"):
        self._session = session
        self.phase_peaks: dict[str, Any] = {}
        self.records: list[Any] = []
        self.step_peaks: list[dict[str, Any]] = []
        self.current_phase = "setup"

    def register_model(self, *a: Any, **k: Any) -> None: ...
    def register(self, *a: Any, **k: Any) -> None: ...
    def attach_modules(self, *a: Any) -> None: ...
    def detach(self) -> None: ...
    def reset_peak(self) -> None: ...
    def label(self, *a: Any, **k: Any) -> None: ...
    def new_step(self) -> None: ...
    def finish(self) -> None: ...

    def __enter__(self) -> "_NullTracker":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def set_phase(self, phase: Any) -> None:
        self._session._on_phase(str(phase))
        self.current_phase = str(phase)

    def terms_at(self, t: Any) -> dict[str, int]:
        return {str(k): 0 for k in Term}

    def top_at(self, t: Any, n: int = 20) -> list[dict[str, Any]]:
        return []


# ---------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------
class Session:
    """A model loaded on one device, ready to profile plans (see the module doc)."""

    def __init__(self, spec: ModelSpec, *, device: str = "cuda", weights: str = "random", source: str | None = None,
                 memory_limit_bytes: int | None = None, track: bool = True, seed: int = 0,
                 progress: Callable[[str], None] | None = None, gpu: Any = None):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            from ..errors import MissingExtraError

            raise MissingExtraError("memplan profile", "torch, transformers, peft, bitsandbytes", "profile") from None
        import torch

        if device not in ("cpu", "cuda"):
            raise MemplanError(f"--device {device!r} is not one of: cpu, cuda")
        if weights not in ("random", "pretrained"):
            raise MemplanError(f"--weights {weights!r} is not one of: random, pretrained")
        if weights == "pretrained" and not source:
            raise MemplanError("--weights pretrained needs MODEL to be a hub id or a local folder with the weights")
        if memory_limit_bytes is not None and memory_limit_bytes <= 0:
            raise MemplanError(f"--memory-limit must be > 0 GiB, got {memory_limit_bytes / 2**30:g}")
        self.spec, self.device, self.weights, self.source = spec, device, weights, source
        self.memory_limit_bytes, self.track, self.seed = memory_limit_bytes, track, seed
        self.progress = progress or (lambda msg: None)
        self.notes: list[str] = []
        self.nvml = None
        self.sampler = None
        self.meter: CudaMeter | None = None
        self.gpu_spec = None
        self.gpu_info: dict[str, Any] | None = None
        self.nvml_info: dict[str, Any] = {}
        self._model = None
        self._key: tuple | None = None
        self._load_readings: list[PhaseReading] = []
        self._load_terms: dict[str, dict[str, int]] = {}
        self._load_wall: dict[str, float] = {}
        self._phase, self._step = "setup", 0
        self._runs = 0
        self.torch_device = "cpu"
        if device == "cuda":
            self._init_cuda(torch, gpu)
        else:
            self.gpu_spec = None
        self.versions = package_versions(self.nvml)

    # ---- CUDA setup ------------------------------------------------------------------------------
    def _init_cuda(self, torch: Any, gpu: Any) -> None:
        from .nvml import Nvml, NvmlSampler

        self.nvml = Nvml(index=0)
        baseline = self.nvml.used()
        if torch.cuda.is_initialized():
            self.notes.append("CUDA was initialised before the profiler started (its context is already in NVML's "
                              "reading): cuda_context is not measured; profile in a fresh process to measure it")
            baseline = None
        if not torch.cuda.is_available():
            raise MemplanError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                               "use --device cpu")
        torch.cuda.init()
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        # NVML numbers GPUs in PCI order; make sure we read the one torch uses (same UUID)
        if self.nvml.available and self.nvml.rebind_uuid(str(getattr(props, "uuid", "") or "")):
            self.notes.append("NVML device re-matched by UUID (CUDA and NVML order devices differently)")
            baseline = None  # the first read was of another GPU; no clean baseline any more
        self.dev_index = idx
        self.torch_device = f"cuda:{idx}"
        # create the context now, so that its cost is measured apart from the model
        x = torch.zeros(1, device=self.torch_device)
        torch.cuda.synchronize(idx)
        init_used = self.nvml.used()
        reserved = torch.cuda.memory_reserved(idx)
        del x
        torch.cuda.empty_cache()
        if not self.nvml.available:
            self.notes.append(f"NVML not read ({self.nvml.reason}): CUDA context and paged memory not measured")
        elif baseline is None:
            self.notes.append("no NVML baseline before CUDA init: cuda_context is not measured")
        self.nvml_info = {"available": self.nvml.available, "reason": self.nvml.reason or None,
                          "baseline_used_bytes": baseline, "init_used_bytes": init_used,
                          "context_at_init_bytes": (init_used - baseline - reserved)
                          if init_used is not None and baseline is not None else None,
                          "process_used_bytes": None}
        nvml_name = self.nvml.name()
        total = self.nvml.total() or int(props.total_memory)
        if gpu is not None:  # the user's choice (an unknown name is bad input)
            from ..catalogue import load_gpu

            self.gpu_spec = load_gpu(gpu)
        else:  # the catalogue entry whose nvml_names (or name) match the device
            self.gpu_spec = match_gpu(nvml_name, props.name)
        if self.gpu_spec is None:
            self.notes.append(f"GPU {nvml_name or props.name!r} is not in profiles/gpus: the estimate uses "
                              "generic CUDA context, workspace and allocator overheads")
        self.gpu_info = {"name": self.gpu_spec.name if self.gpu_spec else None, "nvml_name": nvml_name,
                         "torch_name": props.name, "memory_bytes": total,
                         "torch_total_memory": int(props.total_memory),
                         "compute_capability": f"{props.major}.{props.minor}",
                         "catalogue": self.gpu_spec is not None}
        if self.memory_limit_bytes is not None:
            frac = min(1.0, self.memory_limit_bytes / float(props.total_memory))
            torch.cuda.set_per_process_memory_fraction(frac, idx)
            self.notes.append(f"torch allocator capped at {self.memory_limit_bytes} B "
                              f"(set_per_process_memory_fraction {frac:.4f})")
        self.sampler = NvmlSampler(self.nvml).start() if self.nvml.available else None
        self.meter = CudaMeter(stats=torch.cuda, device=idx, nvml=self.nvml if self.nvml.available else None,
                               sampler=self.sampler, baseline_used=baseline)

    # ---- hooks called from the trackers --------------------------------------------------------
    def _on_phase(self, phase: str) -> None:
        self._phase = phase
        if self.meter is not None:
            self.meter.start(phase)

    # ---- loading -------------------------------------------------------------------------------
    def _load_key(self, plan: TrainPlan) -> tuple:
        d = plan.to_dict()
        return tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in RELOAD_FREE))

    def _round(self) -> int:
        return 512 if self.device == "cuda" else 1

    def _load(self, plan: TrainPlan) -> None:
        from ..runtime.load import adapt, load_model
        from .weights import checkpoint_path

        self.unload()
        self._load_readings, self._load_terms, self._load_wall = [], {}, {}
        self._step = 0
        dev_filter = "cuda" if self.device == "cuda" else "cpu"
        if self.meter is not None:
            self.meter.readings, self.meter.step = [], 0
        for phase in ("load", "adapters"):
            self._phase = phase
            if self.meter is not None:
                self.meter.start(phase)
            t0 = time.perf_counter()
            if phase == "load":
                self.progress(f"loading {self.spec.name} ({self.weights} weights, {plan.method})")
                config = dict(self.spec.config)
                path = checkpoint_path(config, plan, self.weights, self.source, self.seed, self.progress)
                self._model = load_model(config, plan, self.torch_device, seed=self.seed, checkpoint=path)
            else:
                self._model = adapt(self._model, plan)
            self._load_wall[phase] = round(time.perf_counter() - t0, 3)
            terms = _static_terms(self._model, plan, self._round(), dev_filter)
            self._load_terms[phase] = terms
            if self.meter is not None:
                r = self.meter.close()
                r.tracked_bytes = sum(terms.values())
            else:
                r = PhaseReading(0, phase, allocated_bytes=sum(terms.values()), tracked_bytes=sum(terms.values()))
            self._load_readings.append(r)
            self._check_cpu_limit(r.allocated_bytes or 0, phase, 0)
        self._key = self._load_key(plan)

    def unload(self) -> None:
        """Free the model and everything cached for it."""
        self._model = None
        self._key = None
        self._release()

    def _release(self, collect: bool = False) -> None:
        """Return freed memory: reference cycles (gc) and, on CUDA, the allocator's cached segments.

        NB: on the CPU nothing is cached and tensors go with their last reference, so the (slow, ~0.25 s)
        gc.collect runs there only after a failure, whose traceback may have left cycles.
        """
        if collect or self.device == "cuda":
            gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def close(self) -> None:
        self.unload()
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None

    def _check_cpu_limit(self, live: int, phase: str, step: int) -> None:
        if self.device == "cpu" and self.memory_limit_bytes is not None and live > self.memory_limit_bytes:
            from .measure import EmulatedOOM

            raise EmulatedOOM(f"memplan emulated out of memory: {live} B live in {phase} (step {step}) > "
                              f"--memory-limit {self.memory_limit_bytes} B")

    # ---- one run ---------------------------------------------------------------------------------
    def run(self, plan: TrainPlan, steps: int = 3) -> MeasuredRun:
        """Profile `plan` for `steps` steps; never raises for OOM or a failing step (see the module doc)."""
        if steps < 1:
            raise MemplanError(f"--steps must be >= 1, got {steps}")
        plan = plan.replace(device=self.device)
        self._runs += 1
        created = _now()
        failure: dict[str, Any] | None = None
        measured: dict[str, Any] = {}
        status = "success"
        try:
            if self._model is None or self._key != self._load_key(plan):
                self._load(plan)
            if self.meter is not None:
                self.meter.readings = list(self._load_readings)
            measured = self._steps(plan, steps)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a failure is a result
            status = "oom" if is_oom(e) else "failed"
            partial = self.meter.close(partial=True) if self.meter is not None else None
            failure = {"type": type(e).__name__, "message": _short(str(e)), "phase": self._phase, "step": self._step}
            if status == "failed":
                failure["where"] = _short(" <- ".join(
                    f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                    for f in reversed(traceback.extract_tb(e.__traceback__)[-4:])), 400)
            measured = self._partial_measurement(partial)
            in_load = self._phase in ("load", "adapters")
            traceback.clear_frames(e.__traceback__)  # the frames hold the step's activations
            del e
            if in_load or status == "failed":
                self.unload()
        self._after_run(collect=failure is not None)
        if status == "success" and self.device == "cpu" and self.memory_limit_bytes is not None:
            failure = self._cpu_limit_failure(measured)
            if failure is not None:
                status = "oom"
        estimate, est_notes = self._estimate(plan)
        notes = list(self.notes) + est_notes + list(measured.pop("_notes", []))
        rid = hashlib.sha1(f"{created}{self.spec.name}{plan}{self._runs}{os.getpid()}".encode()).hexdigest()[:8]
        return MeasuredRun(
            model=model_record(self.spec), plan=plan.to_dict(), device=self.device, status=status,
            measured=measured, estimate=estimate, failure=failure, gpu=self.gpu_info, versions=self.versions,
            steps=steps, weights=self.weights, seed=self.seed,
            run_id=f"{created.replace('-', '').replace(':', '')}-{rid}", created=created, notes=tuple(notes))

    def _after_run(self, collect: bool) -> None:
        if self._model is not None:
            self._model.zero_grad(set_to_none=True)
        self._release(collect)
        if self.meter is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(self.dev_index)

    def _estimate(self, plan: TrainPlan) -> tuple[dict[str, Any] | None, list[str]]:
        from ..estimate import compute

        try:
            e = compute(self.spec, plan, self.gpu_spec if self.device == "cuda" else None)
        except MemplanError as err:
            return None, [f"no closed-form estimate: {err}"]
        d = e.to_dict()
        return {"terms": d["terms"], "peak": d["peak"], "paged_bytes": d["paged_bytes"],
                "gpu": d["gpu"]["name"] if d.get("gpu") else None, "versions": dict(MODELED_VERSIONS)}, []

    # ---- the steps -----------------------------------------------------------------------------
    def _steps(self, plan: TrainPlan, steps: int) -> dict[str, Any]:
        from ..runtime.step import make_optimizer, run_steps

        model = self._model
        opt = make_optimizer(model, plan)
        if self.meter is not None:
            self.meter.paged_bytes = _process_paged_bytes
        tracker = _make_tracker(self, self.track, self._round(), "cuda" if self.device == "cuda" else "cpu")
        starts: list[float] = []
        self._step = 0

        def on_step(_msg: str) -> None:
            tracker.new_step()
            self._step += 1
            starts.append(time.perf_counter())
            if self.meter is not None:
                self.meter.begin_step(self._step)
            self.progress(f"step {self._step}/{steps} ({plan.batch_size} x {plan.seq_len} tokens)")

        res = run_steps(model, plan, vocab_size=self.spec.vocab_size, steps=steps, device=self.torch_device,
                        optimizer=opt, tracker=tracker, progress=on_step, seed=self.seed)
        end = time.perf_counter()
        if self.meter is not None:
            self.meter.close()
        tracker.finish()
        paged = _paged_bytes(opt)
        if self.nvml is not None:
            self.nvml_info["process_used_bytes"] = self.nvml.process_used()
        wall = {**self._load_wall, "steps": [round(b - a, 3) for a, b in zip(starts, starts[1:] + [end])]}
        measured = (self._measure_cuda(res, tracker, steps, paged) if self.device == "cuda"
                    else self._measure_cpu(res, tracker, steps))
        measured["wall_seconds"] = wall
        measured["attribution"] = "tracker" if self.track else "none"
        measured["session_run"] = self._runs
        del opt
        return measured

    def _terms_dict(self, terms: dict[str, int]) -> dict[str, int]:
        out = {str(t): 0 for t in Term}
        out.update({str(k): int(v) for k, v in terms.items()})
        return out

    def _measure_cpu(self, res: Any, tracker: Any, steps: int) -> dict[str, Any]:
        steady = steady_steps(steps)
        rows = tracker.step_peaks
        sel = [r for r in rows if r["step"] in steady] or rows
        best = max(sel, key=lambda r: r["allocated_bytes"]) if sel else None
        phases: dict[str, dict[str, Any]] = {r.phase: r.to_dict() for r in self._load_readings}
        for r in sel:
            for ph, b in ordered_phases(r["phases"]).items():
                cur = phases.setdefault(ph, {"allocated_bytes": 0})
                cur["allocated_bytes"] = max(cur["allocated_bytes"], b)
        for ph in phases:
            phases[ph].setdefault("tracked_bytes", phases[ph]["allocated_bytes"])
        measured: dict[str, Any] = {
            "terms": self._terms_dict(res.terms) if self.track else None,
            "peak": {"phase": best["phase"] if best else None, "step": best["step"] if best else None,
                     "allocated_bytes": best["allocated_bytes"] if best else None, "reserved_bytes": None,
                     "device_bytes": None, "tracked_bytes": res.peak_bytes if self.track else None,
                     "nvml_used_bytes": None},
            "paged_bytes": 0,
            "phases": ordered_phases(phases),
            "steps": [{"step": r["step"], "allocated_bytes": r["allocated_bytes"], "phase": r["phase"]} for r in rows],
            "step_phases": [{"step": r["step"], **ordered_phases(r["phases"])} for r in rows],
            "phase_terms": {k: self._terms_dict(v) for k, v in res.phase_terms.items()} if self.track else {},
            "load_terms": self._load_terms,
            "top": res.top[:_TOP],
        }
        if best and len(sel) > 1:
            lo = min(r["allocated_bytes"] for r in sel)
            if best["allocated_bytes"] - lo > 0.005 * best["allocated_bytes"]:
                measured["_notes"] = [f"steady-state steps differ by {best['allocated_bytes'] - lo} B"]
        if not self.track:
            measured["_notes"] = ["tracking off: on the CPU nothing is measured, only wall time"]
            measured["peak"]["allocated_bytes"] = None
        return measured

    def _measure_cuda(self, res: Any, tracker: Any, steps: int, paged: int) -> dict[str, Any]:
        meter = self.meter
        assert meter is not None
        steady = steady_steps(steps)
        s = summarize_cuda(meter, steps)
        notes: list[str] = []
        last = [r for r in meter.step_readings(steps)]
        last_alloc = max((r.allocated_bytes or 0) for r in last) if last else 0
        for r in meter.readings:  # the tracker's peak of each phase of the last step
            if r.step == steps and r.phase in tracker.phase_peaks:
                r.tracked_bytes = tracker.phase_peaks[r.phase].bytes
        terms = self._terms_dict(res.terms) if self.track else None
        if terms is not None:
            terms[str(Term.WORKSPACE)] = max(0, last_alloc - int(res.peak_bytes))
            alloc = s["allocated_bytes"] or 0
            terms[str(Term.ALLOCATOR_OVERHEAD)] = max(0, (s["reserved_bytes"] or 0) - alloc)
            terms[str(Term.CUDA_CONTEXT)] = s["context_bytes"] or 0
            if last_alloc < res.peak_bytes:
                notes.append(f"the tracker saw {res.peak_bytes - last_alloc} B more than torch allocated at the "
                             "last step's peak; workspace set to 0")
        if s["context_bytes"] is None:
            notes.append("cuda_context not measured (no NVML baseline)")
        baseline = self.nvml_info.get("baseline_used_bytes")
        nvml = dict(self.nvml_info)
        nvml["peak_used_bytes"] = s["nvml_used_bytes"]
        nvml["peak_delta_bytes"] = (s["nvml_used_bytes"] - baseline
                                    if s["nvml_used_bytes"] is not None and baseline is not None else None)
        # paged state as the driver sees it: bitsandbytes creates and prefetches it in step 1's optimizer
        # phase, so NVML's growth over that phase (end of the phase before it -> its end) beyond torch's
        # reserved growth is managed memory (plus kernel modules loaded lazily for the optimizer, ~MiB)
        first = meter.step_readings(1)
        o1 = meter.phase(1, "optimizer")
        b1 = first[first.index(o1) - 1] if o1 in first and first.index(o1) > 0 else None
        if b1 and o1 and None not in (b1.nvml_end_bytes, o1.nvml_end_bytes):
            nvml["paged_seen_bytes"] = max(0, (o1.nvml_end_bytes - b1.nvml_end_bytes)
                                           - ((o1.reserved_end_bytes or 0) - (b1.reserved_end_bytes or 0)))
        reserved = s["reserved_bytes"]
        ctx = s["context_bytes"]
        device_bytes = reserved + ctx if reserved is not None and ctx is not None else None
        step_rows = []
        for k in range(1, steps + 1):
            rows = meter.step_readings(k)
            if not rows:
                continue
            b = max(rows, key=lambda r: r.allocated_bytes or 0)
            nv = [r.nvml_used_bytes for r in rows if r.nvml_used_bytes is not None]
            step_rows.append({"step": k, "allocated_bytes": b.allocated_bytes, "phase": b.phase,
                              "reserved_bytes": max(r.reserved_bytes or 0 for r in rows),
                              "nvml_used_bytes": max(nv) if nv else None,
                              "tracked_bytes": next((t["allocated_bytes"] for t in tracker.step_peaks
                                                     if t["step"] == k), None) if self.track else None})
        return {
            "terms": terms,
            "peak": {"phase": s["phase"], "step": s["step"], "allocated_bytes": s["allocated_bytes"],
                     "reserved_bytes": reserved, "device_bytes": device_bytes,
                     "tracked_bytes": int(res.peak_bytes) if self.track else None,
                     "nvml_used_bytes": nvml["peak_delta_bytes"]},
            "paged_bytes": paged,
            "phases": phases_max(meter.readings, steady),
            "steps": step_rows,
            "phase_terms": {k: self._terms_dict(v) for k, v in res.phase_terms.items()} if self.track else {},
            "load_terms": self._load_terms,
            "top": res.top[:_TOP],
            "nvml": nvml,
            "memory_limit_bytes": self.memory_limit_bytes,
            "_notes": notes,
        }

    def _partial_measurement(self, partial: PhaseReading | None) -> dict[str, Any]:
        """What was seen before a failure: per-phase readings so far, and the failing phase's peak."""
        out: dict[str, Any] = {"phases": {r.phase: r.to_dict() for r in self._load_readings}}
        if self.meter is not None:
            out["readings"] = [{"step": r.step, "phase": r.phase, **r.to_dict()} for r in self.meter.readings]
            allocs = [r.allocated_bytes for r in self.meter.readings if r.allocated_bytes is not None]
            res = [r.reserved_bytes for r in self.meter.readings if r.reserved_bytes is not None]
            out["peak"] = {"allocated_bytes": max(allocs) if allocs else None,
                           "reserved_bytes": max(res) if res else None,
                           "phase": partial.phase if partial else self._phase, "step": self._step}
            out["nvml"] = dict(self.nvml_info)
            out["memory_limit_bytes"] = self.memory_limit_bytes
        return out

    def _cpu_limit_failure(self, measured: dict[str, Any]) -> dict[str, Any] | None:
        """The first (step, phase) whose tracked peak crossed the CPU memory limit, as a failure."""
        limit = self.memory_limit_bytes
        assert limit is not None
        for row in measured.get("step_phases", []):
            for ph in STEP_PHASES:
                b = row.get(ph)
                if b is not None and b > limit:
                    measured["peak"] = {**measured.get("peak", {}), "over_limit_bytes": b}
                    return {"type": "EmulatedOOM", "phase": ph, "step": row["step"],
                            "message": f"memplan emulated out of memory: {b} B live in {ph} (step {row['step']}) > "
                                       f"--memory-limit {limit} B"}
        return None


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------
def _source(model: Any, spec: ModelSpec) -> str | None:
    if isinstance(model, str):
        p = os.path.expanduser(model)
        if os.path.isdir(p):
            return p
        if os.path.isfile(p):
            return os.path.dirname(os.path.abspath(p))
    return spec.hub_id or (model if isinstance(model, str) else None)


def open_session(model: Any, plan: TrainPlan, *, weights: str = "random", memory_limit_bytes: int | None = None,
                 track: bool = True, seed: int = 0, progress: Callable[[str], None] | None = None,
                 gpu: Any = None) -> Session:
    from ..catalogue import resolve_model

    spec = resolve_model(model)
    return Session(spec, device=plan.device, weights=weights, source=_source(model, spec),
                   memory_limit_bytes=memory_limit_bytes, track=track, seed=seed, progress=progress, gpu=gpu)


def profile(model: Any, plan: TrainPlan | None = None, *, steps: int = 3, weights: str = "random",
            out: str | os.PathLike[str] | None = None, memory_limit_bytes: int | None = None, track: bool = True,
            seed: int = 0, progress: Callable[[str], None] | None = None, gpu: Any = None,
            bnb_config: Any = None, lora_config: Any = None, training_args: Any = None,
            **plan_kwargs: Any) -> MeasuredRun:
    """Run `steps` real training steps of `plan` and measure them (see `memplan.profile`)."""
    from ..plan import plan_from
    from .record import write_run

    p = plan_from(plan, bnb_config=bnb_config, lora_config=lora_config, training_args=training_args, **plan_kwargs)
    session = open_session(model, p, weights=weights, memory_limit_bytes=memory_limit_bytes, track=track,
                           seed=seed, progress=progress, gpu=gpu)
    try:
        run = session.run(p, steps)
    finally:
        session.close()
    if out is not None:
        write_run(run, out)
    return run


def profile_many(model: Any, plans: list[TrainPlan], *, steps: int = 3, weights: str = "random",
                 out: str | os.PathLike[str] | None = None, memory_limit_bytes: int | None = None,
                 track: bool = True, seed: int = 0, progress: Callable[[str], None] | None = None,
                 on_run: Callable[[MeasuredRun], None] | None = None) -> list[MeasuredRun]:
    """Profile several plans of one model in this process, loading only when a plan needs another model.

    An OOM or failure in one plan is recorded and the sweep goes on. All plans must share one device.
    """
    from .record import write_run

    if not plans:
        return []
    devices = {p.device for p in plans}
    if len(devices) != 1:
        raise MemplanError(f"profile_many: plans on several devices ({', '.join(sorted(devices))})")
    session = open_session(model, plans[0], weights=weights, memory_limit_bytes=memory_limit_bytes, track=track,
                           seed=seed, progress=progress)
    runs = []
    try:
        for p in plans:
            r = session.run(p, steps)
            if out is not None:
                write_run(r, out)
            if on_run is not None:
                on_run(r)
            runs.append(r)
    finally:
        session.close()
    return runs
