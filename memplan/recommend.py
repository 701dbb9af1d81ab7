"""recommend: what fits on a GPU -- the largest micro-batch and sequence length, the cheapest changes
that make a plan fit, and the smallest catalogue GPU that runs it as given.

Every answer is a search over the closed form (`estimate.compute`), exact at the boundary: the search
returns n such that n fits and n + 1 does not (integers, no coarse grid). It relies on `device_bytes`
being non-decreasing in micro-batch and in sequence length, which holds for the phase model (the
tests check it on a range of architectures); where it did not, the answer would still be a true
boundary (n fits, n + 1 does not), though not necessarily the largest.

A plan fits a GPU when `device_bytes + reserve_bytes <= gpu.memory_bytes`, exactly as `memplan fit`.
The default reserve is 0 bytes, the same as `fit`, so both commands give the same verdict for the
same flags: the estimate already counts the CUDA context, cuBLAS workspaces and the caching
allocator's overhead, calibrated per GPU (profiles/gpus). Keep a margin with `reserve_bytes` /
`--reserve GiB` for another process on the GPU, a desktop, or the estimator's error (DESIGN.md
targets 2% median, 4% max of peak reserved against measured runs).

Known limitations:
- The candidate changes are one-at-a-time edits of the plan (plus one cumulative combination when
  no single edit is enough); they are not an optimisation over every combination.
- Their order is a judgement about cost to training (speed first, then numerics, then capacity,
  then data), written down in `CHANGES` below; it does not depend on the model or the task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .catalogue import list_gpus, load_gpu, resolve_model
from .errors import MemplanError
from .estimate import Estimate, compute
from .gpu import GPUSpec
from .model import ModelSpec
from .plan import TrainPlan, plan_from
from .units import GiB

SCHEMA = "memplan.recommend/1"

#: Upper ends of the searches. 2**20 tokens is beyond every catalogued context window (the answer
#: notes when the model's max_position_embeddings is exceeded); 2**16 sequences per micro-batch is
#: beyond any practical micro-batch.
MAX_SEQ_LEN = 2**20
MAX_BATCH_SIZE = 2**16
#: The smallest rank the "smaller rank" change goes down to.
MIN_LORA_R = 4
DEFAULT_RESERVE_BYTES = 0


# ---------------------------------------------------------------------------------------------
# exact integer search
# ---------------------------------------------------------------------------------------------
def max_fitting(value: Callable[[int], int], limit: int, *, lo: int = 1, cap: int,
                known: Mapping[int, int] | None = None) -> tuple[int, bool]:
    """The largest n in [lo, cap] with value(n) <= limit, for a non-decreasing `value`.

    Returns (n, capped): n = lo - 1 when value(lo) > limit; capped is True when value(cap) <= limit
    (the answer is "at least cap"). Exponential search brackets the boundary, then bisection closes
    it; both are steered by linear interpolation of the byte counts (memory is close to linear in
    batch and sequence length), and every interpolated step is followed by a bisection step unless it
    at least halved the bracket, so the worst case stays O(log cap) evaluations and a typical search
    takes 4-8. The invariant value(a) <= limit < value(b) holds throughout, so the result is exact:
    n fits and n + 1 does not. `known`: values already computed ({n: value(n)}), used as a head start.
    """
    if cap < lo:
        raise ValueError(f"cap {cap} < lo {lo}")
    pts = sorted((n, v) for n, v in (known or {}).items() if lo <= n <= cap)
    fit_pts = [(n, v) for n, v in pts if v <= limit]
    over = [(n, v) for n, v in pts if v > limit and (not fit_pts or n > fit_pts[-1][0])]
    if fit_pts:
        a, fa = fit_pts[-1]
    else:
        fa = value(lo)
        if fa > limit:
            return lo - 1, False
        a = lo
    prev: tuple[int, int] | None = fit_pts[-2] if len(fit_pts) > 1 else None
    b = fb = None  # first known n that does not fit
    if over:
        b, fb = over[0]
    # ---- bracket: gallop upwards, guided by the slope of the last two points
    while b is None:
        if a >= cap:
            return cap, True
        nxt = 2 * a if a > 0 else 1
        if prev is not None and fa > prev[1]:
            slope = (fa - prev[1]) / (a - prev[0])
            guess = a + int((limit - fa) / slope) + 1  # just past the linear boundary
            nxt = max(a + 1, min(guess, 64 * a + 64))  # trust the slope, within reason
        nxt = min(nxt, cap)
        fn = value(nxt)
        if fn <= limit:
            prev, a, fa = (a, fa), nxt, fn
        else:
            b, fb = nxt, fn
    # ---- close the bracket [a, b]
    while b - a > 1:
        width = b - a
        g = a + int((limit - fa) * (b - a) / (fb - fa)) if fb > fa else (a + b) // 2
        g = min(max(g, a + 1), b - 1)
        fg = value(g)
        if fg <= limit:
            a, fa = g, fg
            h = g + 1  # the boundary is usually right here: probe the neighbour
        else:
            b, fb = g, fg
            h = g - 1
        if a < h < b:
            fh = value(h)
            if fh <= limit:
                a, fa = h, fh
            else:
                b, fb = h, fh
        if b - a > 1 and b - a > width // 2:  # interpolation did not halve the bracket: bisect once
            m = (a + b) // 2
            fm = value(m)
            if fm <= limit:
                a, fa = m, fm
            else:
                b, fb = m, fm
    return a, False


def _limit(gpu: GPUSpec, reserve_bytes: int) -> int:
    return gpu.memory_bytes - reserve_bytes


def max_batch_size(spec: ModelSpec, plan: TrainPlan, gpu: GPUSpec, reserve_bytes: int = 0,
                   cap: int = MAX_BATCH_SIZE) -> tuple[int, bool]:
    """(largest micro-batch that fits at plan.seq_len, capped); 0 when batch 1 does not fit."""
    return max_fitting(lambda n: compute(spec, plan.replace(batch_size=n), gpu).device_bytes,
                       _limit(gpu, reserve_bytes), cap=cap)


def max_seq_len(spec: ModelSpec, plan: TrainPlan, gpu: GPUSpec, reserve_bytes: int = 0,
                cap: int = MAX_SEQ_LEN) -> tuple[int, bool]:
    """(longest sequence that fits at plan.batch_size, capped); 0 when one token does not fit."""
    return max_fitting(lambda n: compute(spec, plan.replace(seq_len=n), gpu).device_bytes,
                       _limit(gpu, reserve_bytes), cap=cap)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """One edit of the plan, with the peak it leads to on the GPU."""

    key: str
    summary: str
    cost: str
    flags: str
    changes: Mapping[str, Any]
    plan: TrainPlan
    device_bytes: int
    headroom_bytes: int
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "summary": self.summary, "cost": self.cost, "flags": self.flags,
                "changes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.changes.items()},
                "device_bytes": self.device_bytes, "headroom_bytes": self.headroom_bytes, "fits": self.fits}


@dataclass(frozen=True)
class GPUFit:
    """The plan as given on one catalogue GPU."""

    name: str
    memory_bytes: int
    device_bytes: int
    headroom_bytes: int
    fits: bool
    supported: bool = True
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "device_bytes": self.device_bytes,
                "headroom_bytes": self.headroom_bytes, "fits": self.fits, "supported": self.supported,
                "reason": self.reason}


@dataclass(frozen=True)
class Recommendation:
    """What fits: limits of the plan on `gpu`, changes that make it fit, the smallest GPU for it.

    `fits`/`headroom_bytes` keep `reserve_bytes` free, as `Fit` does. `max_batch_size` is the largest
    micro-batch at `plan.seq_len` and `max_seq_len` the longest sequence at `plan.batch_size` (0 when
    even 1 does not fit; `*_capped` when the search stopped at its upper end). `changes` are the
    single edits that make the plan fit, cheapest first; `not_enough` the edits tried that do not
    fit on their own; `combined` a cumulative set of edits when no single one is enough.
    """

    model: ModelSpec
    gpu: GPUSpec
    plan: TrainPlan
    estimate: Estimate
    reserve_bytes: int
    fits: bool
    headroom_bytes: int
    max_batch_size: int
    max_batch_capped: bool
    max_seq_len: int
    max_seq_len_capped: bool
    changes: tuple[Change, ...] = ()
    not_enough: tuple[Change, ...] = ()
    combined: Change | None = None
    smallest_gpu: str | None = None
    gpus: tuple[GPUFit, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "schema": SCHEMA,
            "model": self.model.to_dict(),
            "plan": self.plan.to_dict(),
            "gpu": self.gpu.to_dict(),
            "reserve_bytes": self.reserve_bytes,
            "peak": {"phase": e.peak_phase, "allocated_bytes": e.allocated_bytes,
                     "reserved_bytes": e.reserved_bytes, "device_bytes": e.device_bytes},
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "max_batch_size": {"value": self.max_batch_size, "seq_len": self.plan.seq_len,
                               "capped": self.max_batch_capped},
            "max_seq_len": {"value": self.max_seq_len, "batch_size": self.plan.batch_size,
                            "capped": self.max_seq_len_capped,
                            "max_position_embeddings": self.model.max_position_embeddings},
            "changes": [c.to_dict() for c in self.changes],
            "not_enough": [c.to_dict() for c in self.not_enough],
            "combined": self.combined.to_dict() if self.combined else None,
            "smallest_gpu": self.smallest_gpu,
            "gpus": [g.to_dict() for g in self.gpus],
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# candidate changes, cheapest first
# ---------------------------------------------------------------------------------------------
# Each candidate maps (spec, plan, fits) to a list of (changes, flags) to try, least drastic first;
# the first one that fits is the answer, else the last (most drastic) one is reported as not enough.
_Try = list[tuple[dict[str, Any], str]]


def _c_checkpointing(spec: ModelSpec, p: TrainPlan) -> _Try:
    return [] if p.gradient_checkpointing else [({"gradient_checkpointing": True}, "--gradient-checkpointing")]


def _c_double_quant(spec: ModelSpec, p: TrainPlan) -> _Try:
    if p.method == "qlora" and p.quant in ("nf4", "fp4") and not p.double_quant:
        return [({"double_quant": True}, "--double-quant")]
    return []


def _c_optim(name: str) -> Callable[[ModelSpec, TrainPlan], _Try]:
    def c(spec: ModelSpec, p: TrainPlan) -> _Try:
        if p.optim in ("paged_adamw_8bit", name):
            return []  # already 8-bit (and paged state leaves the device, so paged is never worse)
        return [({"optim": name}, f"--optim {name}")]
    return c


def _c_grad_accum(spec: ModelSpec, p: TrainPlan) -> _Try:
    eff = p.batch_size * p.gradient_accumulation_steps
    return [({"batch_size": b, "gradient_accumulation_steps": eff // b},
             f"--batch-size {b} --gradient-accumulation-steps {eff // b}")
            for b in range(p.batch_size - 1, 0, -1) if eff % b == 0]


def _c_nf4(spec: ModelSpec, p: TrainPlan) -> _Try:
    return [({"quant": "nf4", "double_quant": True}, "--quant nf4 --double-quant")] if p.quant == "int8" else []


def _c_qlora(spec: ModelSpec, p: TrainPlan) -> _Try:
    if p.method != "lora":
        return []
    return [({"method": "qlora", "quant": "nf4", "double_quant": True, "prepare": True},
             "--method qlora --quant nf4 --double-quant")]


def _c_rank(spec: ModelSpec, p: TrainPlan) -> _Try:
    if p.method == "full":
        return []
    out, r = [], p.lora_r // 2
    while r >= MIN_LORA_R:
        alpha = max(1, round(p.lora_alpha * r / p.lora_r))  # keep alpha / r, so the update scale is unchanged
        out.append(({"lora_r": r, "lora_alpha": alpha}, f"--lora-r {r} --lora-alpha {alpha}"))
        r //= 2
    return out


def small_targets(spec: ModelSpec) -> tuple[str, ...]:
    """The attention-only LoRA targets of the original LoRA paper, in this architecture's names."""
    leaves = set(spec.linear_leaves)
    if {"q_proj", "v_proj"} <= leaves:
        return ("q_proj", "v_proj")
    if "qkv_proj" in leaves:
        return ("qkv_proj",)
    return ()


def _c_targets(spec: ModelSpec, p: TrainPlan) -> _Try:
    small = small_targets(spec)
    if p.method == "full" or not small:
        return []
    if p.target_modules != "all-linear" and set(p.target_modules) <= set(small):
        return []
    return [({"target_modules": small}, f"--target-modules {','.join(small)}")]


def _c_seq(spec: ModelSpec, p: TrainPlan, gpu: GPUSpec, reserve: int) -> _Try:
    n, _ = max_seq_len(spec, p, gpu, reserve, cap=max(1, p.seq_len - 1))
    return [({"seq_len": n}, f"--seq-len {n}")] if 0 < n < p.seq_len else []


def _c_no_prepare(spec: ModelSpec, p: TrainPlan) -> _Try:
    if p.method != "qlora" or not p.prepare:
        return []
    return [({"prepare": False}, "--no-prepare")]


def _c_lora(spec: ModelSpec, p: TrainPlan) -> _Try:
    if p.method != "full":
        return []
    return [({"method": "qlora", "quant": "nf4", "double_quant": True, "prepare": True},
             "--method qlora"),]


#: (key, summary, cost to training, candidate). Cheapest first: changes that only cost speed, then
#: small numeric changes, then capacity, then what the model sees. A judgement, stated once here.
CHANGES: tuple[tuple[str, str, str, Callable[..., _Try]], ...] = (
    ("gradient_checkpointing", "turn gradient checkpointing on",
     "same results; about 20-35% more compute per step (each layer's forward runs again in backward)",
     _c_checkpointing),
    ("double_quant", "turn double quantization on",
     "no measurable quality change (QLoRA paper); quantizes the absmax constants, ~0.37 bit/param less",
     _c_double_quant),
    ("prepare", "skip prepare_model_for_kbit_training's fp32 upcast (call model.enable_input_require_grads() "
     "and gradient_checkpointing_enable() yourself)",
     "embeddings, norms and lm_head stay in 16 bits and so does the residual stream: less memory, "
     "slightly less numerical headroom than fp32 norms and logits (common in QLoRA scripts)",
     _c_no_prepare),
    ("optim:paged_adamw_8bit", "use the paged 8-bit AdamW (paged_adamw_8bit)",
     "8-bit block-wise Adam state, on par with 32-bit Adam in published fine-tuning results; the state "
     "lives in CUDA managed memory and pages to CPU RAM under pressure (slower when it does)",
     _c_optim("paged_adamw_8bit")),
    ("optim:adamw_bnb_8bit", "use the 8-bit AdamW (adamw_bnb_8bit)",
     "8-bit block-wise Adam state, on par with 32-bit Adam in published fine-tuning results",
     _c_optim("adamw_bnb_8bit")),
    ("gradient_accumulation", "smaller micro-batch with gradient accumulation (same effective batch)",
     "same effective batch and the same updates; fewer tokens per kernel, so each step is slower",
     _c_grad_accum),
    ("quant:nf4", "4-bit NF4 base weights instead of int8",
     "small quality change from 4-bit weights (QLoRA reports NF4 matching 16-bit on its benchmarks)",
     _c_nf4),
    ("method:qlora", "QLoRA: a 4-bit NF4 base instead of a 16-bit one",
     "small quality change from 4-bit weights; dequantizing every matmul makes steps slower",
     _c_qlora),
    ("lora_r", "smaller LoRA rank (lora_alpha scaled to keep alpha/r)",
     "fewer adapter parameters: less capacity to learn the task", _c_rank),
    ("target_modules", "LoRA on the attention projections only",
     "adapters on fewer layers: less capacity (QLoRA found all-linear needed to match full fine-tuning)",
     _c_targets),
    ("seq_len", "shorter sequences (the longest that fits)",
     "examples are truncated or packed shorter: the model trains on less context", _c_seq),
    ("method:lora", "QLoRA adapters instead of full fine-tuning",
     "a different method: trains low-rank adapters on a 4-bit base, not every weight", _c_lora),
)


def _needs_gpu_search(func: Callable[..., _Try]) -> bool:
    return func is _c_seq


def _try(spec: ModelSpec, base: TrainPlan, gpu: GPUSpec, reserve: int, key: str, summary: str, cost: str,
         func: Callable[..., _Try]) -> Change | None:
    """The least drastic variant of one change that fits, else its most drastic variant (not fitting)."""
    tries = func(spec, base, gpu, reserve) if _needs_gpu_search(func) else func(spec, base)
    last = None
    for changes, flags in tries:
        try:
            plan = base.replace(**changes)
        except MemplanError:
            continue
        e = compute(spec, plan, gpu)
        headroom = gpu.memory_bytes - e.device_bytes - reserve
        last = Change(key=key, summary=summary, cost=cost, flags=flags, changes=changes, plan=plan,
                      device_bytes=e.device_bytes, headroom_bytes=headroom, fits=headroom >= 0)
        if last.fits:
            return last
    return last


def _combined(spec: ModelSpec, plan: TrainPlan, gpu: GPUSpec, reserve: int) -> Change | None:
    """Apply the changes cumulatively, cheapest first, until the plan fits (or none is left); then drop
    every earlier change the result does not need, costliest first."""
    parts: list[Change] = []
    p = plan
    for key, summary, cost, func in CHANGES:
        c = _try(spec, p, gpu, reserve, key, summary, cost, func)
        if c is None:
            continue
        parts.append(c)
        p = c.plan
        if c.fits:
            break
    if not parts:
        return None

    def build(cs: list[Change]) -> tuple[TrainPlan, int]:
        changes: dict[str, Any] = {}
        for c in cs:
            changes.update(c.changes)
        q = plan.replace(**changes)
        return q, compute(spec, q, gpu).device_bytes

    if parts[-1].fits:
        for c in reversed(parts[:-1]):
            rest = [x for x in parts if x is not c]
            try:
                _, dev = build(rest)
            except MemplanError:
                continue
            if dev + reserve <= gpu.memory_bytes:
                parts = rest
    q, dev = build(parts)
    headroom = gpu.memory_bytes - dev - reserve
    changes = {k: v for c in parts for k, v in c.changes.items()}
    return Change(key="+".join(c.key for c in parts), summary=" + ".join(c.summary for c in parts),
                  cost="; ".join(c.cost for c in parts), flags=" ".join(c.flags for c in parts), changes=changes,
                  plan=q, device_bytes=dev, headroom_bytes=headroom, fits=headroom >= 0)


def gpu_support(gpu: GPUSpec, plan: TrainPlan) -> str:
    """Why `gpu` cannot run `plan` at all ('' when it can)."""
    if plan.mixed_precision == "bf16" and not gpu.bf16:
        return f"no bf16 (compute capability {gpu.compute_capability}); the HF Trainer refuses bf16=True"
    if plan.attn_implementation == "flash_attention_2" and gpu.compute_capability:
        try:
            if float(gpu.compute_capability) < 8.0:
                return f"flash_attention_2 needs compute capability >= 8.0, this is {gpu.compute_capability}"
        except ValueError:
            pass
    return ""


def gpu_fits(spec: ModelSpec, plan: TrainPlan, reserve_bytes: int = 0,
             gpus: list[GPUSpec] | None = None) -> tuple[GPUFit, ...]:
    """The plan as given on every catalogue GPU (smallest memory first)."""
    out = []
    for g in gpus if gpus is not None else list_gpus():
        e = compute(spec, plan, g)
        headroom = g.memory_bytes - e.device_bytes - reserve_bytes
        reason = gpu_support(g, plan)
        out.append(GPUFit(name=g.name, memory_bytes=g.memory_bytes, device_bytes=e.device_bytes,
                          headroom_bytes=headroom, fits=headroom >= 0 and not reason, supported=not reason,
                          reason=reason))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------
def recommend(model: Any, gpu: str | GPUSpec, plan: TrainPlan | None = None, *,
              reserve_bytes: int = DEFAULT_RESERVE_BYTES, bnb_config: Any = None, lora_config: Any = None,
              training_args: Any = None, **plan_kwargs: Any) -> Recommendation:
    """What fits `model` on `gpu`: max micro-batch and sequence length, changes that make the plan fit
    (cheapest first), and the smallest catalogue GPU that runs it as given.

    Arguments as for `memplan.estimate`; `reserve_bytes` is kept free on the GPU (default 0, as
    `memplan fit`: the estimate already includes context, workspace and allocator overhead).
    """
    if gpu is None:
        raise MemplanError("recommend needs a GPU (--gpu NAME); see `memplan gpus`")
    if not isinstance(reserve_bytes, int) or isinstance(reserve_bytes, bool) or reserve_bytes < 0:
        raise MemplanError(f"reserve must be a non-negative number of bytes, got {reserve_bytes!r}")
    spec = resolve_model(model)
    p = plan_from(plan, bnb_config=bnb_config, lora_config=lora_config, training_args=training_args,
                  **plan_kwargs)
    if p.device != "cuda":
        raise MemplanError("recommend sizes a GPU run; drop --device cpu (or use `memplan estimate --device cpu`)")
    g = load_gpu(gpu)
    est = compute(spec, p, g)
    headroom = g.memory_bytes - est.device_bytes - reserve_bytes
    fits = headroom >= 0
    notes = list(est.notes)

    mb, mb_cap = max_batch_size(spec, p, g, reserve_bytes)
    ms, ms_cap = max_seq_len(spec, p, g, reserve_bytes)
    mpe = spec.max_position_embeddings
    if mpe and ms > mpe:
        notes.append(f"the longest sequence that fits ({ms}) is beyond the model's max_position_embeddings "
                     f"({mpe}); training past it needs RoPE scaling or a long-context variant")
    if mb_cap:
        notes.append(f"the micro-batch search stopped at {MAX_BATCH_SIZE}")
    if ms_cap:
        notes.append(f"the sequence-length search stopped at {MAX_SEQ_LEN} tokens")
    reason = gpu_support(g, p)
    if reason and not any("bf16" in n for n in notes):  # the estimate already notes a missing bf16
        notes.append(f"{g.name}: {reason}")

    changes: list[Change] = []
    not_enough: list[Change] = []
    combined = None
    if not fits:
        for key, summary, cost, func in CHANGES:
            c = _try(spec, p, g, reserve_bytes, key, summary, cost, func)
            if c is not None:
                (changes if c.fits else not_enough).append(c)
        # Several cheap changes together can beat the cheapest single one that fits (checkpointing
        # plus gradient accumulation rather than 135-token sequences): offer the combination when
        # every change in it ranks before that single one, or when no single change fits.
        combo = _combined(spec, p, g, reserve_bytes)
        order = [k for k, *_ in CHANGES]
        first_fit = order.index(changes[0].key) if changes else len(order)
        if combo is not None and not changes:
            combined = combo
        elif combo is not None and "+" in combo.key and all(order.index(k) < first_fit
                                                             for k in combo.key.split("+")):
            combined = combo

    fleet = gpu_fits(spec, p, reserve_bytes)
    smallest = next((f.name for f in fleet if f.fits), None)
    return Recommendation(model=spec, gpu=g, plan=p, estimate=est, reserve_bytes=reserve_bytes, fits=fits,
                          headroom_bytes=headroom, max_batch_size=mb, max_batch_capped=mb_cap,
                          max_seq_len=ms, max_seq_len_capped=ms_cap, changes=tuple(changes),
                          not_enough=tuple(not_enough), combined=combined, smallest_gpu=smallest,
                          gpus=fleet, notes=tuple(notes))


def describe_reserve(reserve_bytes: int) -> str:
    """One line stating the margin kept free (shown by the CLI)."""
    if reserve_bytes == DEFAULT_RESERVE_BYTES:
        return (f"reserve: {reserve_bytes / GiB:.2f} GiB kept free (default, as `memplan fit`: the estimate already "
                "counts CUDA context, workspace and allocator overhead; --reserve GiB keeps a margin)")
    return f"reserve: {reserve_bytes / GiB:.2f} GiB kept free (--reserve)"
