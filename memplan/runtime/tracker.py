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

Known limitations: storages created outside the mode (before `start`) are invisible unless
registered; the module attribution is the innermost `nn.Module` call at creation. A storage freed by
`untyped_storage().resize_(0)` (FSDP2) stays counted until its object dies.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..terms import Phase, Term
from ..units import round_up

_BNB_NS = "bitsandbytes"
_INF = float("inf")


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
                 fast_kernels: dict[Any, Callable[[tuple, dict], Any]] | None = None):
        super().__init__()
        self.round_to = round_to
        #: device types whose storages count (None: all)
        self.devices = (device,) if isinstance(device, str) else (tuple(device) if device else None)
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
        nbytes = self._size(st.nbytes())
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
        )
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

    def _free(self, key: int) -> None:
        rec = self._by_id.pop(key, None)
        self._refs.pop(key, None)
        if rec is None:
            return
        rec.freed = self.clock + 0.5
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
        pp = self.phase_peaks.get(self.current_phase)
        if pp is None or self.live > pp.bytes:
            self.phase_peaks[self.current_phase] = PhasePeak(self.current_phase, self.live, self.clock)

    def reset_peak(self) -> None:
        """Start peak bookkeeping afresh (e.g. at the steady-state step)."""
        self.peak, self.peak_at, self.peak_phase = self.live, self.clock, self.current_phase
        self.phase_peaks = {self.current_phase: PhasePeak(self.current_phase, self.live, self.clock)}

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

    # ---- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.clock += 1
        temps = None
        if self.kernel_temps:
            mk = self.kernel_temps.get(func.__name__)
            if mk is not None:
                temps = mk(*args, **kwargs)
                for i in range(len(temps)):
                    self._track(temps[i].untyped_storage(), temps[i])
        if func.namespace == _BNB_NS:
            out = self._run_bnb(func, args, kwargs)
        else:
            fast = self.fast_kernels.get(func)
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
                rec = self._track(t.untyped_storage(), t)
                if rec is not None and not rec.op:
                    rec.op = func.__name__
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
        return [r for r in self.records if r.alive_at(t)]

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
