"""Live-tensor tracker: counts every storage alive during a training step.

A `TorchDispatchMode` sees every op's outputs; each new storage gets a record and a weakref
finalizer that marks it freed. Records keep the op counter at creation and at free, so the set
alive at any moment (the peak in particular) is recovered after the step without snapshotting on
every allocation. Works on real CPU/CUDA tensors and on the meta device. The same tracker measures
real CPU steps (tests, `profile`, the Trainer callback) and meta-device traces (`memplan.simulate`).

Labelling (`Term`) happens after the step, when lifetimes are known:
- parameters, buffers and bitsandbytes quant state are registered up front by what they are
  (`register_model`, with `memplan.runtime.classify` deciding base_weights / adapter_weights /
  other_params);
- a storage that is a parameter's `.grad` after backward -> gradients; one held in the optimizer's
  state after `step()` -> optimizer_state;
- a storage whose shape ends in the vocabulary size and spans every token -> logits;
- created in forward, or in a backward recomputation (grad mode on), and still alive when the
  innermost module call that created it returned -> activations (saved for backward, outputs);
  anything else -> temporaries (dequantized weights, in-flight gradients, optimizer scratch).

Ops run inside bitsandbytes' Python kernels are seen by redispatching those ops below the Python
key with the mode still pushed (otherwise their internal buffers would be invisible).

Hooks for the meta device (simulate fills them; a real step leaves them empty): `bnb_impls`
replaces bitsandbytes' fake kernels by Python kernels that allocate what the emulated device's
kernels allocate, `kernel_temps` adds the buffers a kernel allocates internally for the duration of
one op, `fast_kernels` computes the outputs of simple ops instead of torch's slow Python meta
kernels (`check_fast` compares the two), and `add_paged` counts managed (paged) memory apart.

Checked against an independent instrument, torch's allocator events (`allocator.py`,
tests/test_instrument.py): on real CPU steps the two agree to <= 152 B once the two blind spots
below are covered.
- Buffers a kernel allocates internally never reach the mode: on CPU, oneDNN's scratchpad inside a
  bf16 `mm` (40-200 KB on the tiny test shapes, freed before the op returns) is alive at the peak of
  a checkpointed step, which falls in the last matmul of the first layer's recomputation.
  `kernel_workspace=True` (real devices) runs every op inside a profiler range `OP_MARK<clock>`;
  `capture_kernel_workspace` profiles the step and `add_kernel_workspace` turns each op's own
  allocator events into `Term.WORKSPACE` records (an in-op transient alive at the op's clock).
- Tensors that C++ builds outside any op: checkpointing's saved CPU RNG states
  (`torch.get_rng_state()`, 5056 B each; one per checkpointed layer until its recompute, one more
  during a recompute). `torch.get_rng_state` is wrapped while the tracker is active, on every device.

Known limitations: storages created outside the mode (before `start`) are invisible unless
registered; the module attribution is the innermost `nn.Module` call at creation; other tensors made
in C++ outside any op (a few 8-byte scalars per step) are not seen; a storage resized in place
(`resize_`, e.g. FSDP2's freeing of gathered parameters) keeps its first size (with
`add_kernel_workspace`, its new block is added as workspace until freed).
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..terms import Phase, Term
from ..units import round_up

_BNB_NS = "bitsandbytes"
#: profiler range name prefix around each op (followed by the op's clock), see `kernel_workspace`
OP_MARK = "memplan.op#"
_INF = float("inf")
#: the ops by which an offloading hook makes its host copy (`LiveTensorTracker.host_region`)
HOST_OPS = (torch.ops.aten.empty_like.default, torch.ops.aten.empty.memory_format,
            torch.ops.aten.empty_strided.default)


@dataclass(eq=False, slots=True)
class StorageRecord:
    nbytes: int
    created: float  # op counter at creation (-1 for registered storages)
    phase: str
    module: str
    shape: tuple[int, ...]
    dtype: str
    grad_mode: bool
    frame: int
    freed: float = _INF
    outlived_frame: bool = True
    term: Term | None = None
    name: str = ""
    op: str = ""
    ptr: int = 0  # data pointer (set when kernel workspace is captured, to match allocator events)
    host: bool = False  # a host (CPU RAM) copy made by an offloading hook (`host_region`), not device memory

    def alive_at(self, t: float) -> bool:
        return self.created <= t < self.freed


_DTYPE_NAMES: dict[Any, str] = {}


def _dtype_name(dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


@dataclass
class PhasePeak:
    phase: str
    bytes: int
    at: int


class LiveTensorTracker(TorchDispatchMode):
    """Counts live storage bytes through a training step.

    Use `register(tensor, term, name)` for tensors that exist before tracking starts, `phase(...)`
    to mark phases, and `attach_modules(model)` for module attribution and the saved/transient
    decision. `round_to` (512 on CUDA) rounds each storage up as the CUDA caching allocator does.
    """

    #: compare every `fast_kernels` result with torch's own kernel (a test switch)
    check_fast = False

    def __init__(self, round_to: int = 1, device: str | tuple[str, ...] | None = None,
                 bnb_impls: dict[str, Callable[..., Any]] | None = None,
                 kernel_temps: dict[str, Callable[..., list[torch.Tensor]]] | None = None,
                 fast_kernels: dict[Any, Callable[[tuple, dict], Any]] | None = None,
                 kernel_workspace: bool = False):
        super().__init__()
        self.round_to = round_to
        #: device types whose storages count (None: all)
        self.devices = (device,) if isinstance(device, str) else (tuple(device) if device else None)
        #: mark every op for the profiler so that buffers a kernel allocates internally can be added
        #: (see `add_kernel_workspace`); real devices only (named in `device`; never with meta)
        self.kernel_workspace = bool(kernel_workspace and self.devices and "meta" not in self.devices)
        #: bitsandbytes op name -> Python implementation run (with this mode pushed) on meta tensors,
        #: to emulate the real device's kernel (its internal buffers) instead of the bare fake kernel.
        self.bnb_impls = dict(bnb_impls or {})
        #: op name -> fn(*args, **kwargs) returning the buffers the real device's kernel allocates
        #: internally (through the caching allocator) while it runs, on meta; alive during the op only
        self.kernel_temps = dict(kernel_temps or {})
        #: aten op -> fn(args, kwargs) giving the op's output directly (or None: run the op), e.g.
        #: `memplan.simulate.fastmeta.FAST_KERNELS` on meta tensors
        self.fast_kernels = dict(fast_kernels or {})
        #: storages kept out of the live count (e.g. paged optimizer state in managed memory)
        self.paged_bytes = 0
        self.records: list[StorageRecord] = []
        self._by_id: dict[int, StorageRecord] = {}
        self._refs: dict[int, Any] = {}
        self.clock = 0
        self.live = 0
        self.peak = 0
        self.peak_at = -1
        self.peak_phase = ""
        self.current_phase = "setup"
        self.phase_peaks: dict[str, PhasePeak] = {}
        self._frames: list[tuple[int, str]] = [(0, "")]
        self._frame_records: dict[int, list[StorageRecord]] = {}
        self._next_frame = 1
        self._hooks: list[Any] = []
        self.step_index = 0
        #: (clock, phase) of every set_phase, and the clock of the last reset_peak (for add_kernel_workspace)
        self._phase_log: list[tuple[int, str]] = [(-1, self.current_phase)]
        self._reset_clock = -1
        self._depth = 0
        self._saved_rng: Any = None
        #: host (CPU RAM) storages: inside `host_region`, storages made by the ops named in
        #: `HOST_OPS` are host copies (activation offloading): kept out of `live`/`peak`, counted here
        self._host_depth = 0
        self._host_op = False
        self.host_live = 0
        #: buffers added by `add_kernel_workspace`: how many, and the largest in-op excess (bytes)
        self.workspace_ops = 0
        self.workspace_max = 0

    # ---- bookkeeping -------------------------------------------------------------------------
    def _size(self, nbytes: int) -> int:
        return round_up(nbytes, self.round_to) if self.round_to > 1 and nbytes else nbytes

    def _track(self, st: Any, t: torch.Tensor | None, term: Term | None = None, name: str = "",
               created: float | None = None) -> StorageRecord | None:
        key = id(st)
        if key in self._by_id:
            rec = self._by_id[key]
            if term is not None and rec.term is None:
                rec.term, rec.name = term, name
            return rec
        if self.devices is not None and st.device.type not in self.devices:
            return None
        host = self._host_depth > 0 and self._host_op
        nbytes = st.nbytes() if host else self._size(st.nbytes())
        frame, module = self._frames[-1]
        rec = StorageRecord(
            nbytes=nbytes,
            created=self.clock if created is None else created,
            phase=self.current_phase,
            module=module,
            shape=tuple(t.shape) if t is not None else (st.nbytes(),),
            dtype=_dtype_name(t.dtype) if t is not None else "uint8",
            grad_mode=torch.is_grad_enabled(),
            frame=frame,
            term=term,
            name=name,
            host=host,
        )
        if host:
            self.records.append(rec)
            self._by_id[key] = rec
            self._refs[key] = weakref.ref(st, lambda _r, key=key: self._free(key))
            self.host_live += nbytes
            return rec
        if self.kernel_workspace:
            rec.ptr = st.data_ptr()
        self.records.append(rec)
        self._by_id[key] = rec
        self._refs[key] = weakref.ref(st, lambda _r, key=key: self._free(key))
        self._frame_records.setdefault(frame, []).append(rec)
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_at, self.peak_phase = self.live, self.clock, self.current_phase
        pp = self.phase_peaks.get(self.current_phase)
        if pp is None or self.live > pp.bytes:
            self.phase_peaks[self.current_phase] = PhasePeak(self.current_phase, self.live, self.clock)
        return rec

    def resized(self, st: Any, t: torch.Tensor | None = None) -> None:
        """A tracked storage was resized in place (`untyped_storage().resize_(n)`: FSDP2's
        `alloc_storage`/`free_storage`, which no op reports): its record ends here and, if the new size
        is not 0, a record of the new size (op "resize_") begins. A pseudo-op on the clock."""
        key = id(st)
        rec = self._by_id.get(key)
        new = self._size(st.nbytes())
        if rec is not None and rec.nbytes == new:
            return
        self.clock += 1
        if rec is None:
            if not new or (self.devices is not None and st.device.type not in self.devices):
                return
            self._refs[key] = weakref.ref(st, lambda _r, key=key: self._free(key))
        else:
            rec.freed = self.clock
            self.live -= rec.nbytes
            if rec.term is not None and not new:  # keep the label for the storage's next size
                self._by_id[key] = StorageRecord(0, self.clock, self.current_phase, rec.module, rec.shape, rec.dtype,
                                                 False, -1, term=rec.term, name=rec.name, op="resize_")
                return
        self._by_id.pop(key, None)
        old_term, old_name = (rec.term, rec.name) if rec is not None else (None, "")
        nrec = self._track(st, t, created=self.clock)
        if nrec is not None:
            nrec.op = "resize_"
            nrec.term, nrec.name = nrec.term or old_term, nrec.name or old_name
        self._refs[key] = weakref.ref(st, lambda _r, key=key: self._free(key))

    def _free(self, key: int) -> None:
        rec = self._by_id.pop(key, None)
        self._refs.pop(key, None)
        if rec is None:
            return
        rec.freed = self.clock + 0.5
        if rec.host:
            self.host_live -= rec.nbytes
        else:
            self.live -= rec.nbytes

    def add_paged(self, tensor: torch.Tensor) -> None:
        """Count a tensor that lives outside the device allocator (bitsandbytes paged memory).

        Create it with the mode disabled (so it is not tracked as a device storage) and pass it here.
        """
        self.paged_bytes += tensor.untyped_storage().nbytes()

    def register(self, tensor: torch.Tensor, term: Term, name: str = "") -> None:
        """Record a tensor that exists already (a parameter, buffer or quant-state tensor)."""
        if tensor is None:
            return
        self._track(tensor.untyped_storage(), tensor, term, name, created=-1)

    def register_model(self, model: torch.nn.Module, classify: Callable[[str, torch.Tensor], Term]) -> None:
        for name, p in model.named_parameters(remove_duplicate=True):
            self.register(p, classify(name, p), name)
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                for qname, qt in quant_state_tensors(qs):
                    self.register(qt, Term.QUANT_STATE, f"{name}.{qname}")
        for name, b in model.named_buffers(remove_duplicate=True):
            self.register(b, Term.OTHER_PARAMS, name)
        for name, mod in model.named_modules():  # int8 layers keep SCB etc. on the weight
            w = getattr(mod, "weight", None)
            for attr in ("SCB", "CB"):
                v = getattr(w, attr, None)
                if isinstance(v, torch.Tensor):
                    self.register(v, Term.QUANT_STATE, f"{name}.weight.{attr}")

    def set_phase(self, phase: str | Phase) -> None:
        self.current_phase = str(phase)
        self._phase_log.append((self.clock, self.current_phase))
        pp = self.phase_peaks.get(self.current_phase)
        if pp is None or self.live > pp.bytes:
            self.phase_peaks[self.current_phase] = PhasePeak(self.current_phase, self.live, self.clock)

    def reset_peak(self) -> None:
        """Start peak bookkeeping afresh (e.g. at the steady-state step)."""
        self.peak, self.peak_at, self.peak_phase = self.live, self.clock, self.current_phase
        self.phase_peaks = {self.current_phase: PhasePeak(self.current_phase, self.live, self.clock)}
        self._reset_clock = self.clock

    # ---- module frames -----------------------------------------------------------------------
    def attach_modules(self, model: torch.nn.Module) -> None:
        names = {m: n for n, m in model.named_modules()}

        def pre(mod, _args):
            f = self._next_frame
            self._next_frame += 1
            self._frames.append((f, names.get(mod, type(mod).__name__)))

        def post(mod, _args, _out):
            if len(self._frames) > 1:
                f, _ = self._frames.pop()
                for rec in self._frame_records.pop(f, ()):
                    rec.outlived_frame = rec.freed == _INF

        self._hooks.append(torch.nn.modules.module.register_module_forward_pre_hook(pre))
        self._hooks.append(torch.nn.modules.module.register_module_forward_hook(post, always_call=True))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ---- storages created outside the dispatcher ----------------------------------------------
    def __enter__(self):
        if self._depth == 0:
            self._patch_rng()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, exc_type, exc_val, exc_tb):
        try:
            return super().__exit__(exc_type, exc_val, exc_tb)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._unpatch_rng()

    def _patch_rng(self) -> None:
        """`torch.get_rng_state()` builds its ByteTensor in C++ (no op reaches this mode): count it.

        Checkpointing (`preserve_rng_state=True`, the default) keeps one per checkpointed layer from
        forward to that layer's recompute, plus one inside `fork_rng` while a layer recomputes
        (5056 B each for the CPU generator in torch 2.13).
        """
        import torch.random as trandom

        orig = trandom.get_rng_state
        tracker = self

        def get_rng_state():
            state = orig()
            tracker.clock += 1  # a pseudo-op: created after the op before it
            rec = tracker._track(state.untyped_storage(), state)
            if rec is not None and not rec.op:
                rec.op = "get_rng_state"
            return state

        self._saved_rng = (orig, torch.get_rng_state)
        trandom.get_rng_state = get_rng_state
        torch.get_rng_state = get_rng_state

    def _unpatch_rng(self) -> None:
        import torch.random as trandom

        if self._saved_rng is not None:
            trandom.get_rng_state, torch.get_rng_state = self._saved_rng
            self._saved_rng = None

    # ---- kernel workspace (real devices) --------------------------------------------------------
    @contextlib.contextmanager
    def capture_kernel_workspace(self):
        """Profile the block (torch.profiler, `profile_memory=True`) and `add_kernel_workspace` after.

        A no-op unless `kernel_workspace`. When a profiler is running already (an outer instrument,
        see `allocator.allocator_peak`), profilers cannot nest: the block runs unprofiled and the
        caller passes that profiler's events to `add_kernel_workspace` itself.
        """
        if not self.kernel_workspace or torch._C._autograd._profiler_enabled():
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        from .allocator import allocation_events

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            yield
        self.add_kernel_workspace(allocation_events(prof, mark=OP_MARK))

    def add_kernel_workspace(self, events: Iterable[Any], op_ranges: Sequence[tuple[int, int, str]] = ()) -> int:
        """Count the buffers kernels allocate below the Python dispatch key; return how many were added.

        A kernel's internal buffers (oneDNN's scratchpad and packed operands inside a CPU bf16 `mm`,
        flash-attention's per-thread buffers on CPU, cuBLAS workspaces) go through the device allocator
        but never reach this mode as op outputs. `events` are that allocator's events, read by
        `allocator.allocation_events(prof, mark=OP_MARK)` from a profiler that ran around the tracked
        step (each op ran inside a `OP_MARK<clock>` range because `kernel_workspace` is set). Per op,
        the largest running sum of its own events minus what it still holds when it returns is a
        transient: a `Term.WORKSPACE` record alive at the op's clock only (the op's outputs are alive
        then too, so the live count there is the op's in-kernel peak). A block the op allocated and
        still holds at its return without being one of its tracked outputs (a persistent workspace)
        becomes a `Term.WORKSPACE` record until the allocator frees it. Then the peaks are recomputed.

        A free made outside any op (on another thread: gloo's worker frees a collective's buffer when it
        drops the Work) happens after the last op whose range began before it; `op_ranges` (the
        `OP_MARK<clock>` ranges, `allocator.mark_ranges(prof, OP_MARK)`) names that op, and whether the free
        fell inside it. Without them, the op of the last event inside an op stands in for it.

        NB: allocations outside any op (e.g. a tensor built in C++ by Python code) are not added.
        """
        dev = self.devices
        per_op: dict[int, list[Any]] = {}
        frees: dict[int, list[tuple[int, int]]] = {}  # ptr -> [(ns, clock of the op it happened in or after)]
        last_clock = -1
        starts = [r[0] for r in op_ranges]
        for e in events:
            if dev is not None and e.device not in dev:
                continue
            c = int(e.mark[len(OP_MARK):]) if e.mark else None
            if c is not None:
                last_clock = c
                per_op.setdefault(c, []).append(e)
            if e.delta < 0:
                if c is None and starts:  # the op running, or last run, on the main thread at that time
                    i = bisect.bisect_right(starts, e.ns) - 1
                    at = (int(op_ranges[i][2][len(OP_MARK):]), e.ns < op_ranges[i][1]) if i >= 0 else (-1, False)
                else:
                    at = (last_clock if c is None else c, c is not None)
                frees.setdefault(e.ptr, []).append((e.ns, *at))
        tracked = {(r.ptr, r.created) for r in self.records if r.created >= 0}
        added = []
        for c, evs in per_op.items():
            run = high = 0
            held: dict[int, Any] = {}
            for e in evs:
                run += e.delta
                high = max(high, run)
                if e.delta > 0:
                    held[e.ptr] = e
                else:
                    held.pop(e.ptr, None)
            kept = sum(e.delta for e in held.values())
            phase = self._phase_at(c)
            if high > kept:
                added.append(self._workspace_record(high - kept, c, c + 0.25, phase, evs[0]))
            for ptr, e in held.items():
                if (ptr, c) in tracked:
                    continue
                freed = _INF
                for ns, fc, in_op in frees.get(ptr, ()):
                    if ns > e.ns:
                        freed = fc + (0.75 if in_op else 0.5)
                        break
                added.append(self._workspace_record(e.delta, c, freed, phase, e))
        if added:
            self.records.extend(added)
            self.workspace_ops += len(added)
            self.workspace_max = max(self.workspace_max, max(r.nbytes for r in added))
            self._recompute_peaks()
        return len(added)

    def _workspace_record(self, nbytes: int, created: float, freed: float, phase: str, e: Any) -> StorageRecord:
        op = next((s for s in getattr(e, "scope", ()) if not s.startswith(OP_MARK)), "")
        return StorageRecord(nbytes=self._size(nbytes), created=created, phase=phase, module="", shape=(nbytes,),
                             dtype="uint8", grad_mode=False, frame=-1, freed=freed, outlived_frame=False,
                             term=Term.WORKSPACE, name="kernel workspace", op=op)

    def _phase_at(self, t: float) -> str:
        """The phase in effect for the op at clock `t` (set_phase calls made before it ran)."""
        phase = self._phase_log[0][1]
        for c, p in self._phase_log:
            if c >= t:
                break
            phase = p
        return phase

    def _recompute_peaks(self) -> None:
        """Peak and per-phase peaks since the last reset_peak, from the records (after records were added)."""
        deltas: list[tuple[float, int]] = []
        for r in self.records:
            if r.host:
                continue
            deltas.append((r.created, r.nbytes))
            if r.freed != _INF:
                deltas.append((r.freed, -r.nbytes))
        deltas.sort(key=lambda d: (d[0], d[1] > 0))  # at one instant, frees first (alive_at: created <= t < freed)
        live = 0
        i = 0
        n = len(deltas)
        while i < n:
            t = deltas[i][0]
            grew = False
            while i < n and deltas[i][0] == t:
                live += deltas[i][1]
                grew = grew or deltas[i][1] > 0
                i += 1
            if not grew or t <= self._reset_clock:
                continue
            phase = self._phase_at(t)
            if live > self.peak:
                self.peak, self.peak_at, self.peak_phase = live, t, phase
            pp = self.phase_peaks.get(phase)
            if pp is None or live > pp.bytes:
                self.phase_peaks[phase] = PhasePeak(phase, live, t)

    # ---- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.kernel_workspace:
            with torch._C._profiler._RecordFunctionFast(f"{OP_MARK}{self.clock + 1}"):
                return self._dispatch(func, types, args, kwargs)
        return self._dispatch(func, types, args, kwargs)

    def _dispatch(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.clock += 1
        temps = None
        if self.kernel_temps:
            mk = self.kernel_temps.get(func.__name__)
            if mk is not None:
                temps = mk(*args, **kwargs)
                for i in range(len(temps)):
                    rec = self._track(temps[i].untyped_storage(), temps[i])
                    if rec is not None and not rec.op:
                        rec.op = f"temp:{func.__name__}"
        self._host_op = self._host_depth > 0 and func in HOST_OPS
        if self._host_op and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
            flat = [a for a in args if isinstance(a, torch.Tensor)]
            if flat and flat[0].device.type == "meta":  # simulate: the host copy stays on meta (no real RAM)
                kwargs = {**kwargs, "device": torch.device("meta"), "pin_memory": False}
        if func.namespace == _BNB_NS:
            out = self._run_bnb(func, args, kwargs)
        else:
            fast = self.fast_kernels.get(func)
            if fast is not None and types and any(t is not torch.Tensor and t is not torch.nn.Parameter
                                                  for t in types):
                fast = None  # a tensor subclass (DTensor) computes its own output
            out = fast(args, kwargs) if fast is not None else None
            if out is None:
                out = func(*args, **kwargs)
            elif self.check_fast:
                _check_fast(func, out, func(*args, **kwargs))
        if isinstance(out, torch.Tensor):
            outs: Any = (out,)
        elif isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) or t is None for t in out):
            outs = out
        else:
            outs = tree_flatten(out)[0]
        for t in outs:
            if isinstance(t, torch.Tensor):
                t = getattr(t, "_local_tensor", t)  # a DTensor (sharded parameters): its local shard
                rec = self._track(t.untyped_storage(), t)
                if rec is not None and not rec.op:
                    rec.op = func.__name__
        self._host_op = False
        if temps:
            self.clock += 1  # the kernel's internal buffers go once its outputs exist
            del temps
        return out

    def _run_bnb(self, func, args, kwargs):
        """Run a bitsandbytes op's backend kernel with this mode pushed, so its inner ops count."""
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        dev = flat[0].device.type if flat else "cpu"
        key = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA,
               "meta": torch._C.DispatchKey.Meta}.get(dev)
        if key is None:
            return func(*args, **kwargs)
        if dev == "meta":
            impl = self.bnb_impls.get(func.__name__)  # e.g. "gemm_4bit.default"
            if impl is not None:
                with self:
                    return impl(*args, **kwargs)
        with self:
            return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)

    # ---- results -------------------------------------------------------------------------------
    def alive_at(self, t: float) -> list[StorageRecord]:
        return [r for r in self.records if r.alive_at(t) and not r.host]

    @contextlib.contextmanager
    def host_region(self):
        """Inside: storages made by `HOST_OPS` (the `torch.empty_like(..., device="cpu")` of an
        offloading pack hook) are host copies, counted apart (`host_at`); on meta they are made on meta."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    def host_at(self, t: float) -> dict[str, int]:
        """Host bytes alive at `t`, by term (the contract's `host`: only non-zero terms)."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.host and r.alive_at(t):
                k = str(r.term or Term.ACTIVATIONS)
                out[k] = out.get(k, 0) + r.nbytes
        return out

    def label(self, grads: Iterable[torch.Tensor] = (), optimizer_state: Iterable[torch.Tensor] = (),
              vocab_size: int | None = None, tokens: int | None = None,
              params: Iterable[tuple[str, torch.Tensor, Term]] = ()) -> None:
        """Assign a Term to every unlabelled record (call after the step).

        `params`: (name, tensor, term) of the model's parameters and buffers now; a storage that
        replaced a parameter's during the step (bitsandbytes' Linear4bit casts its bias to the input
        dtype with `bias.data = ...` in forward) gets the parameter's term.
        """
        for name, t, term in params:
            rec = self._by_id.get(id(t.untyped_storage()))
            if rec is not None and rec.term is None:
                rec.term, rec.name = term, name
        for t in grads:
            rec = self._by_id.get(id(t.untyped_storage()))
            if rec is not None:
                rec.term = Term.GRADIENTS
        for t in optimizer_state:
            rec = self._by_id.get(id(t.untyped_storage()))
            if rec is not None and rec.term is None:
                rec.term = Term.OPTIMIZER_STATE
        for rec in self.records:
            if rec.term is not None:
                continue
            numel = 1
            for s in rec.shape:
                numel *= s
            if vocab_size and tokens and rec.shape and rec.shape[-1] == vocab_size and numel >= tokens * vocab_size:
                rec.term = Term.LOGITS
            elif rec.phase in (str(Phase.FORWARD), str(Phase.LOSS)) or (
                    rec.phase == str(Phase.BACKWARD) and rec.grad_mode):
                rec.term = Term.ACTIVATIONS if rec.outlived_frame else Term.TEMPORARIES
            else:
                rec.term = Term.TEMPORARIES

    def terms_at(self, t: float) -> dict[str, int]:
        out = {str(k): 0 for k in Term}
        for r in self.alive_at(t):
            out[str(r.term or Term.TEMPORARIES)] += r.nbytes
        return out

    def top_at(self, t: float, n: int = 20) -> list[dict[str, Any]]:
        alive = sorted(self.alive_at(t), key=lambda r: -r.nbytes)[:n]
        return [{"name": r.name or r.module, "shape": list(r.shape), "dtype": r.dtype, "bytes": r.nbytes,
                 "term": str(r.term), "phase": r.phase} for r in alive]


def quant_state_tensors(qs: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a bitsandbytes QuantState holds (absmax, code, offset, nested state)."""
    out = []
    for attr in ("absmax", "code", "offset"):
        v = getattr(qs, attr, None)
        if isinstance(v, torch.Tensor):
            out.append((attr, v))
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        out += [(f"state2.{n}", t) for n, t in quant_state_tensors(s2)]
    return out


def _check_fast(func, fast, ref) -> None:
    for a, b in zip(tree_flatten(fast)[0], tree_flatten(ref)[0]):
        if (a.shape, a.dtype, a.stride(), a.device) != (b.shape, b.dtype, b.stride(), b.device):
            raise AssertionError(f"fast kernel for {func} gave {tuple(a.shape)} {a.dtype} {a.stride()} "
                                 f"{a.device}; torch gives {tuple(b.shape)} {b.dtype} {b.stride()} {b.device}")
