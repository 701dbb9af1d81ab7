"""recommend: what fits on a GPU -- the largest micro-batch and sequence length, the cheapest changes
that make a plan fit, and the smallest catalogue GPU that runs it as given.

Every answer is a search over `memplan.estimate` (the closed form, microseconds per plan), exact at
the boundary: the search (`memplan.search.max_fitting`) returns n such that n fits and n + 1 does not
(integers, no coarse grid). It relies on `device_bytes` being non-decreasing in micro-batch and in
sequence length, which holds for the phase model (the tests check it on a range of architectures);
where it did not, the answer would still be a true boundary (n fits, n + 1 does not), though not
necessarily the largest.

A plan fits a GPU when `device_bytes + reserve_bytes <= gpu.memory_bytes`, exactly as `memplan fit`:
every verdict here is a `Fit.of(estimate, reserve_bytes)`. The default reserve is 0 bytes, the same
as `fit`, so both commands give the same verdict for the same flags: the estimate already counts the
CUDA context, cuBLAS workspaces and the caching allocator's overhead, calibrated per GPU
(profiles/gpus). Keep a margin with `reserve_bytes` / `--reserve GiB` for another process on the GPU,
a desktop, or the estimator's error (DESIGN.md targets 2% median, 4% max of peak reserved against
measured runs).

Models without a closed form (mixture-of-experts) get what `estimate()` gives them: a `memplan
simulate` trace, seconds per plan. Every estimate a recommendation makes is cached by plan; the
simulate traces are capped by `simulate_budget` (default 1: the plan as given). The catalogue GPUs
reuse that one trace (the traced bytes do not depend on the GPU; each GPU's overheads are added as
`estimate` adds them). The searches and changes that would need more traces than the budget allows
are skipped, and the notes say which.

Known limitations:
- The candidate changes are one-at-a-time edits of the plan (plus one cumulative combination when
  no single edit is enough); they are not an optimisation over every combination.
- Their order is a judgement about cost to training (speed first, then numerics, then capacity,
  then data), written down in `CHANGES` below; it does not depend on the model or the task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .catalogue import list_gpus, load_gpu, resolve_model
from .errors import MemplanError, UnsupportedArchitectureError
from .estimate import Estimate, estimate, required_changes
from .fit import Fit, gpu_fix, gpu_support
from .gpu import GPUSpec
from .headroom import check_reserve, fit_limit_bytes
from .model import ModelSpec
from .plan import TrainPlan, gpu_over_use_cpu, plan_from
from .present import plan_dict
from .search import MAX_BATCH_SIZE, MAX_SEQ_LEN, max_fitting

SCHEMA = "memplan.recommend/1"

#: The smallest rank the "smaller rank" change goes down to.
MIN_LORA_R = 4
DEFAULT_RESERVE_BYTES = 0
#: The share of the GPU's memory a suggested change must leave free, on top of the reserve: the
#: estimator's error target against measured runs (DESIGN.md: 2% median of peak reserved), so that no
#: suggestion lands at 0.00 GiB of headroom.
CHANGE_MARGIN_RATIO = 0.02
#: simulate traces one recommendation may make for a model without a closed form (each takes seconds)
DEFAULT_SIMULATE_BUDGET = 1

__all__ = ["recommend", "Recommendation", "Change", "GPUFit", "Estimator", "SimulateBudgetSpent", "CHANGES",
           "max_batch_size", "max_seq_len", "gpu_fits", "gpu_support", "small_targets", "DEFAULT_RESERVE_BYTES",
           "DEFAULT_SIMULATE_BUDGET", "MIN_LORA_R", "SCHEMA", "CHANGE_MARGIN_RATIO", "change_margin_bytes"]


def change_margin_bytes(gpu: GPUSpec) -> int:
    """Bytes a suggested change keeps free on `gpu` beyond the reserve (CHANGE_MARGIN_RATIO of its memory)."""
    return int(round(CHANGE_MARGIN_RATIO * gpu.memory_bytes))


# ---------------------------------------------------------------------------------------------
# every estimate of one recommendation
# ---------------------------------------------------------------------------------------------
class SimulateBudgetSpent(Exception):
    """The next estimate would be one simulate trace more than the budget allows."""


class Estimator:
    """Every estimate one recommendation makes, cached by (plan, GPU).

    Closed form first (`estimate(..., fallback_simulate=False)`). Where the closed form does not cover
    the model, each estimate on `gpu` is `estimate()`'s simulate fallback and counts against
    `simulate_budget` (past it: SimulateBudgetSpent); an estimate on another GPU reuses the trace made
    on `gpu` with that GPU's CUDA overheads (no new trace).
    """

    def __init__(self, spec: ModelSpec, gpu: GPUSpec, simulate_budget: int = DEFAULT_SIMULATE_BUDGET):
        self.spec, self.gpu, self.simulate_budget = spec, gpu, simulate_budget
        self.simulated = False  # True once the closed form said it does not cover the model
        self.traces = 0  # simulate traces made
        self.margin = change_margin_bytes(gpu)  # what a suggested change keeps free beyond the reserve
        self._cache: dict[tuple[TrainPlan, str], Estimate] = {}

    def __call__(self, plan: TrainPlan, gpu: GPUSpec | None = None) -> Estimate:
        g = gpu or self.gpu
        key = (plan, g.name)
        e = self._cache.get(key)
        if e is None:
            e = self._cache[key] = self._estimate(plan, g)
        return e

    def device_bytes(self, plan: TrainPlan) -> int:
        return self(plan).device_bytes

    def known(self, plan: TrainPlan, dimension: str) -> dict[int, int]:
        """{value: device_bytes} of the cached plans on `gpu` that differ from `plan` only in `dimension`."""
        return {getattr(p, dimension): e.device_bytes for (p, g), e in self._cache.items()
                if g == self.gpu.name and p == plan.replace(**{dimension: getattr(p, dimension)})}

    def _estimate(self, plan: TrainPlan, g: GPUSpec) -> Estimate:
        if not self.simulated:
            try:
                return estimate(self.spec, plan, gpu=g, fallback_simulate=False)
            except UnsupportedArchitectureError:
                self.simulated = True
        if g.name != self.gpu.name:
            return _with_overheads(self(plan), g)
        if self.traces >= self.simulate_budget:
            raise SimulateBudgetSpent
        self.traces += 1
        return estimate(self.spec, plan, gpu=g)  # the simulate fallback (or its UnsupportedArchitectureError)


def _with_overheads(e: Estimate, gpu: GPUSpec) -> Estimate:
    """A simulate-backed estimate moved to another GPU: the traced (allocated) terms do not depend on the
    GPU; workspace, allocator overhead and CUDA context are `gpu`'s, added as `estimate` adds them."""
    from .estimate import cuda_overheads

    terms = dict(e.terms)
    if e.plan.device == "cuda":
        cuda_overheads(terms, gpu)
    return dataclasses.replace(e, gpu=gpu, terms=terms)


# ---------------------------------------------------------------------------------------------
# exact integer search
# ---------------------------------------------------------------------------------------------
def _max_along(dimension: str, spec: ModelSpec, plan: TrainPlan, gpu: GPUSpec, reserve_bytes: int, cap: int,
               estimator: Estimator | None) -> tuple[int, bool]:
    est = estimator or Estimator(spec, gpu)
    limit = fit_limit_bytes(gpu.memory_bytes, check_reserve(reserve_bytes))
    return max_fitting(lambda n: est.device_bytes(plan.replace(**{dimension: n})), limit, cap=cap,
                       known=est.known(plan, dimension))


def max_batch_size(spec: ModelSpec, plan: TrainPlan, gpu: GPUSpec, reserve_bytes: int = 0,
                   cap: int = MAX_BATCH_SIZE, *, estimator: Estimator | None = None) -> tuple[int, bool]:
    """(largest micro-batch that fits at plan.seq_len, capped); 0 when batch 1 does not fit."""
    return _max_along("batch_size", spec, plan, gpu, reserve_bytes, cap, estimator)


def max_seq_len(spec: ModelSpec, plan: TrainPlan, gpu: GPUSpec, reserve_bytes: int = 0,
                cap: int = MAX_SEQ_LEN, *, estimator: Estimator | None = None) -> tuple[int, bool]:
    """(longest sequence that fits at plan.batch_size, capped); 0 when one token does not fit."""
    return _max_along("seq_len", spec, plan, gpu, reserve_bytes, cap, estimator)


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
    paging: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "summary": self.summary, "cost": self.cost, "flags": self.flags,
                "changes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.changes.items()},
                "device_bytes": self.device_bytes, "headroom_bytes": self.headroom_bytes, "fits": self.fits,
                "paging": self.paging}


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
    paging: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "device_bytes": self.device_bytes,
                "headroom_bytes": self.headroom_bytes, "fits": self.fits, "supported": self.supported,
                "reason": self.reason, "paging": self.paging}


@dataclass(frozen=True)
class Recommendation:
    """What fits: limits of the plan on `gpu`, changes that make it fit, the smallest GPU for it.

    `fits`/`headroom_bytes` keep `reserve_bytes` free, as `Fit` does. `max_batch_size` is the largest
    micro-batch at `plan.seq_len` and `max_seq_len` the longest sequence at `plan.batch_size` (0 when
    even 1 does not fit; `*_capped` when the search stopped at its upper end; None when it was not
    searched: a model without a closed form past its simulate budget, see `notes`). `changes` are the
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
    max_batch_size: int | None
    max_batch_capped: bool
    max_seq_len: int | None
    max_seq_len_capped: bool
    changes: tuple[Change, ...] = ()
    not_enough: tuple[Change, ...] = ()
    combined: Change | None = None
    smallest_gpu: str | None = None
    gpus: tuple[GPUFit, ...] = ()
    notes: tuple[str, ...] = field(default=())
    #: the verdict for the plan as given (the same `Fit` as `memplan fit`)
    fit: Fit | None = field(default=None, repr=False)
    #: what every suggested change keeps free beyond the reserve (CHANGE_MARGIN_RATIO of the GPU's memory)
    margin_bytes: int = 0
    #: the plan the limits and changes are about: the plan as given, or, when the GPU cannot run it as
    #: planned, the plan with `fit.fix` applied
    run_plan: TrainPlan | None = field(default=None, repr=False)
    #: flags the real stack needs before the plan as given runs at all ("" = none); `plan` has them applied
    required_flags: str = ""
    #: a single-GPU plan that does not fit: per strategy, the fewest GPUs of this type that fit it
    #: (memplan.distributed.fewest_gpus), the fewest first; () otherwise
    multi_gpu: tuple[Any, ...] = ()
    #: host RAM per node given for the check (--host-ram), None: reported, not checked
    host_ram_bytes: int | None = None

    @property
    def verdict(self) -> str:
        return self.fit.verdict if self.fit is not None else ("fits" if self.fits else "does_not_fit")

    def __repr__(self) -> str:
        return (f"Recommendation({self.model.name!r} on {self.gpu.name!r}: {self.verdict}, "
                f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"{len(self.changes)} changes, smallest_gpu={self.smallest_gpu!r})")

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        f = self.fit
        return {
            "schema": SCHEMA,
            "model": self.model.to_dict(),
            "plan": plan_dict(self.plan),
            "gpu": self.gpu.to_dict(),
            "reserve_bytes": self.reserve_bytes,
            "peak": {"phase": e.peak_phase, "allocated_bytes": e.allocated_bytes,
                     "reserved_bytes": e.reserved_bytes, "device_bytes": e.device_bytes},
            "fits": self.fits,
            "verdict": self.verdict,
            "verdict_text": f.verdict_text if f is not None else None,
            "blocked": (f.blocked or None) if f is not None else None,
            "fix": (f.fix or None) if f is not None else None,
            "paging": f.paging if f is not None else False,
            "paged_bytes": e.paged_bytes,
            "change_margin_bytes": self.margin_bytes,
            "run_plan": plan_dict(self.run_plan or self.plan),
            "required_flags": self.required_flags or None,
            "headroom_bytes": self.headroom_bytes,
            # null when nothing fits (the text says "none"), as when the search was not run
            "max_batch_size": {"value": self.max_batch_size or None, "seq_len": self.plan.seq_len,
                               "capped": self.max_batch_capped},
            "max_seq_len": {"value": self.max_seq_len or None, "batch_size": self.plan.batch_size,
                            "capped": self.max_seq_len_capped,
                            "max_position_embeddings": self.model.max_position_embeddings},
            "changes": [c.to_dict() for c in self.changes],
            "not_enough": [c.to_dict() for c in self.not_enough],
            "combined": self.combined.to_dict() if self.combined else None,
            "smallest_gpu": self.smallest_gpu,
            "gpus": [g.to_dict() for g in self.gpus],
            "notes": list(self.notes),
            **({"multi_gpu": [o.to_dict() for o in self.multi_gpu], "host_ram_bytes": self.host_ram_bytes}
               if self.multi_gpu else {}),
            **({"host": {"terms": dict(e.host), "bytes": e.host_bytes}} if e.host else {}),
        }


# ---------------------------------------------------------------------------------------------
# candidate changes, cheapest first
# ---------------------------------------------------------------------------------------------
# Each candidate maps (spec, plan) to a list of (changes, flags) to try, least drastic first (the
# sequence-length one also searches, through the recommendation's Estimator); the first one that fits
# is the answer, else the last (most drastic) one is reported as not enough.
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


def _c_seq(spec: ModelSpec, p: TrainPlan, est: Estimator, reserve: int) -> _Try:
    n, _ = max_seq_len(spec, p, est.gpu, reserve + est.margin, cap=max(1, p.seq_len - 1), estimator=est)
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


def _needs_search(func: Callable[..., _Try]) -> bool:
    return func is _c_seq


def _change(est: Estimator, reserve: int, key: str, summary: str, cost: str, flags: str,
            changes: Mapping[str, Any], plan: TrainPlan) -> Change:
    """A suggested change fits when the plan fits, without paging, with `est.margin` to spare."""
    f = Fit.of(est(plan), reserve)
    return Change(key=key, summary=summary, cost=cost, flags=flags, changes=dict(changes), plan=plan,
                  device_bytes=f.estimate.device_bytes, headroom_bytes=f.headroom_bytes,
                  fits=f.fits and not f.paging and f.headroom_bytes >= est.margin, paging=f.paging)


def _try(est: Estimator, base: TrainPlan, reserve: int, key: str, summary: str, cost: str,
         func: Callable[..., _Try]) -> Change | None:
    """The least drastic variant of one change that fits, else its most drastic variant (not fitting).
    A variant the plan or the estimator refuses (MemplanError) is skipped; SimulateBudgetSpent propagates."""
    tries = func(est.spec, base, est, reserve) if _needs_search(func) else func(est.spec, base)
    last = None
    for changes, flags in tries:
        try:
            plan = base.replace(**changes)
            last = _change(est, reserve, key, summary, cost, flags, changes, plan)
        except MemplanError:
            continue
        if last.fits:
            return last
    return last


def _combined(est: Estimator, plan: TrainPlan, reserve: int) -> Change | None:
    """Apply the changes cumulatively, cheapest first, until the plan fits (or none is left); then drop
    every earlier change the result does not need, costliest first."""
    parts: list[Change] = []
    p = plan
    for key, summary, cost, func in CHANGES:
        c = _try(est, p, reserve, key, summary, cost, func)
        if c is None:
            continue
        parts.append(c)
        p = c.plan
        if c.fits:
            break
    if not parts:
        return None

    def build(cs: list[Change]) -> Change:
        changes: dict[str, Any] = {}
        for c in cs:
            changes.update(c.changes)
        return _change(est, reserve, "+".join(c.key for c in cs), " + ".join(c.summary for c in cs),
                       "; ".join(c.cost for c in cs), " ".join(c.flags for c in cs), changes,
                       plan.replace(**changes))

    if parts[-1].fits:
        for c in reversed(parts[:-1]):
            rest = [x for x in parts if x is not c]
            try:
                if build(rest).fits:
                    parts = rest
            except MemplanError:
                continue
    return build(parts)


def gpu_fits(spec: ModelSpec, plan: TrainPlan, reserve_bytes: int = 0, gpus: list[GPUSpec] | None = None, *,
             estimator: Estimator | None = None) -> tuple[GPUFit, ...]:
    """The plan as given on every catalogue GPU (smallest memory first)."""
    out: list[GPUFit] = []
    fleet = gpus if gpus is not None else list_gpus()
    if not fleet:
        return ()
    est = estimator or Estimator(spec, fleet[0])
    for g in fleet:
        f = Fit.of(est(plan, g), reserve_bytes)
        out.append(GPUFit(name=g.name, memory_bytes=g.memory_bytes, device_bytes=f.estimate.device_bytes,
                          headroom_bytes=f.headroom_bytes, fits=f.fits, supported=not f.blocked,
                          reason=f.blocked, paging=f.paging))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------
def _limits(spec: ModelSpec, p: TrainPlan, g: GPUSpec, reserve: int, est: "Estimator", notes: list[str],
            skipped: list[str]) -> tuple[tuple[int | None, bool], tuple[int | None, bool]]:
    """(largest micro-batch, capped) and (longest sequence, capped) that fit; notes the caps, a
    sequence past max_position_embeddings, and what the simulate budget left unsearched."""
    mb: tuple[int | None, bool] = (None, False)
    ms: tuple[int | None, bool] = (None, False)
    try:
        mb = max_batch_size(spec, p, g, reserve, estimator=est)
    except SimulateBudgetSpent:
        skipped.append("the largest micro-batch")
    try:
        ms = max_seq_len(spec, p, g, reserve, estimator=est)
    except SimulateBudgetSpent:
        skipped.append("the longest sequence")
    mpe = spec.max_position_embeddings
    if mpe and ms[0] is not None and ms[0] > mpe:
        notes.append(f"the longest sequence that fits ({ms[0]}) is beyond the model's max_position_embeddings "
                     f"({mpe}); training past it needs RoPE scaling or a long-context variant")
    if mb[1]:
        notes.append(f"the micro-batch search stopped at {MAX_BATCH_SIZE}")
    if ms[1]:
        notes.append(f"the sequence-length search stopped at {MAX_SEQ_LEN} tokens")
    return mb, ms


def _ranked_changes(est: "Estimator", p: TrainPlan, reserve: int, skipped: list[str]
                    ) -> tuple[list[Change], list[Change], Change | None]:
    """The single changes that make `p` fit (cheapest first), those that help but do not suffice, and
    a combination worth offering."""
    changes: list[Change] = []
    not_enough: list[Change] = []
    unchecked = []
    for key, summary, cost, func in CHANGES:
        try:
            c = _try(est, p, reserve, key, summary, cost, func)
        except SimulateBudgetSpent:
            unchecked.append(key)
            continue
        if c is not None:
            (changes if c.fits else not_enough).append(c)
    if unchecked:
        skipped.append("the changes " + ", ".join(unchecked))
    # Several cheap changes together can beat the cheapest single one that fits (checkpointing
    # plus gradient accumulation rather than 135-token sequences): offer the combination when
    # every change in it ranks before that single one, or when no single change fits.
    try:
        combo = _combined(est, p, reserve)
    except SimulateBudgetSpent:
        combo = None
        skipped.append("a combination of changes")
    order = [k for k, *_ in CHANGES]
    first_fit = order.index(changes[0].key) if changes else len(order)
    combined = None
    if combo is not None and not changes:
        combined = combo
    elif combo is not None and "+" in combo.key and all(order.index(k) < first_fit for k in combo.key.split("+")):
        combined = combo
    return changes, not_enough, combined


def recommend(model: Any, gpu: str | GPUSpec, plan: TrainPlan | None = None, *,
              reserve_bytes: int = DEFAULT_RESERVE_BYTES, bnb_config: Any = None, lora_config: Any = None,
              training_args: Any = None, simulate_budget: int = DEFAULT_SIMULATE_BUDGET,
              config: Any = None, host_ram_bytes: int | None = None, **plan_kwargs: Any) -> Recommendation:
    """What fits `model` on `gpu`: max micro-batch and sequence length, changes that make the plan fit
    (cheapest first), and the smallest catalogue GPU that runs it as given.

    Arguments as for `memplan.estimate`; `reserve_bytes` is kept free on the GPU (default 0, as
    `memplan fit`: the estimate already includes context, workspace and allocator overhead).
    `simulate_budget`: how many `memplan simulate` traces (seconds each) a model without a closed form
    (mixture-of-experts) may cost; what needs more is skipped and named in the notes.
    A single-GPU plan that does not fit also gets `multi_gpu`: per strategy (DDP, ZeRO-2, SHARD_GRAD_OP,
    FULL_SHARD, ZeRO-3, ZeRO-3 + offload optimizer, FSDP + CPU offload, ZeRO-3 + both offloads:
    memplan.distributed LADDER) the fewest GPUs of this type that fit every rank (and `host_ram_bytes`
    per node, when given), with the largest per-GPU micro-batch and the host RAM each needs; the first
    is the cheapest that fits (`fewest_gpus` says how ties are broken).
    """
    if gpu is None:
        raise MemplanError("recommend needs a GPU (--gpu NAME); see `memplan gpus`")
    reserve = check_reserve(reserve_bytes)
    if isinstance(simulate_budget, bool) or not isinstance(simulate_budget, int) or simulate_budget < 1:
        raise MemplanError(f"simulate_budget (--simulate-budget) must be a whole number >= 1, got {simulate_budget!r}")
    from .estimate import with_config

    model, config, config_notes = with_config(model, config)
    spec = resolve_model(model)
    p = plan_from(plan, bnb_config=bnb_config, lora_config=lora_config, training_args=training_args,
                  config=config, **plan_kwargs)
    p, device_note = gpu_over_use_cpu(p, plan, training_args, plan_kwargs, str(getattr(gpu, "name", gpu)))
    if p.device != "cuda":
        raise MemplanError("recommend sizes a GPU run; drop --device cpu (or use `memplan estimate --device cpu`)")
    g = load_gpu(gpu)
    p, required = required_changes(spec, p)
    est = Estimator(spec, g, simulate_budget)
    verdict = Fit.of(est(p), reserve, host_ram_bytes)
    e = verdict.estimate
    notes = ([device_note] if device_note else []) + list(config_notes) + list(verdict.notes)
    if required:
        notes.insert(0, f"the real stack refuses the plan as given: run it with {required} (every figure here is "
                        "for that plan; the notes below say why)")
    skipped: list[str] = []
    run = p
    fix_changes: dict[str, Any] = {}
    if verdict.blocked:  # the limits and changes are about the plan the GPU can run
        fix_changes, fix_flags = gpu_fix(g, p)
        run = p.replace(**fix_changes)
        notes.insert(0, f"the limits and changes below are for the plan with {fix_flags} (what {g.name} can run)")

    (mb, mb_cap), (ms, ms_cap) = _limits(spec, run, g, reserve, est, notes, skipped)
    changes: list[Change] = []
    not_enough: list[Change] = []
    combined = None
    if verdict.blocked:
        fixed = _change(est, reserve, "gpu_fix", f"run what {g.name} supports ({fix_flags})",
                        "fp16 autocast needs loss scaling (the HF Trainer's fp16=True adds it): less numeric range "
                        "than bf16, occasionally overflows" if "mixed_precision" in fix_changes else
                        "a different attention kernel: same results, different speed", fix_flags, fix_changes, run)
        if fixed.fits:
            changes = [fixed]
        else:
            more, not_enough, combined = _ranked_changes(est, run, reserve, skipped)
            glue = lambda c: dataclasses.replace(  # noqa: E731
                c, flags=f"{fix_flags} {c.flags}", changes={**fix_changes, **c.changes},
                summary=f"{fixed.summary} + {c.summary}", key=f"gpu_fix+{c.key}")
            changes = [glue(c) for c in more]
            not_enough = [fixed] + [glue(c) for c in not_enough]
            combined = glue(combined) if combined is not None else None
    elif not verdict.fits or verdict.paging:
        changes, not_enough, combined = _ranked_changes(est, p, reserve, skipped)

    fleet = gpu_fits(spec, p, reserve, estimator=est)
    smallest = next((f.name for f in fleet if f.fits and not f.paging), None)
    paging_only = next((f for f in fleet if f.fits and f.paging), None)
    if paging_only is not None and (smallest is None or paging_only.memory_bytes < next(
            f.memory_bytes for f in fleet if f.name == smallest)):
        notes.append(f"{paging_only.name} fits the plan only by paging its optimizer state to host memory every "
                     "step; the smallest GPU named here fits it without paging")
    if est.simulated:
        notes.append(f"no closed form for {spec.name}: every estimate here is a `memplan simulate` trace "
                     f"({est.traces} made, simulate budget {simulate_budget}); the catalogue GPUs reuse the "
                     "trace with their own overheads")
    if skipped:
        notes.append(f"not searched, each step of it needs another simulate trace (seconds): {'; '.join(skipped)}; "
                     "raise the budget (--simulate-budget N, or simulate_budget=N) to search them")
    multi: tuple[Any, ...] = ()
    if not verdict.fits and not p.is_distributed and not verdict.blocked and not est.simulated:
        multi = _multi_gpu(spec, p, g, reserve, est, host_ram_bytes, notes)
    return Recommendation(model=spec, gpu=g, plan=p, estimate=e, reserve_bytes=reserve, fits=verdict.fits,
                          headroom_bytes=verdict.headroom_bytes, max_batch_size=mb, max_batch_capped=mb_cap,
                          max_seq_len=ms, max_seq_len_capped=ms_cap, changes=tuple(changes),
                          not_enough=tuple(not_enough), combined=combined, smallest_gpu=smallest,
                          gpus=fleet, notes=tuple(notes), fit=verdict, margin_bytes=est.margin, run_plan=run,
                          required_flags=required, multi_gpu=multi, host_ram_bytes=host_ram_bytes)


def _multi_gpu(spec: ModelSpec, p: TrainPlan, g: GPUSpec, reserve: int, est: Estimator,
               host_ram_bytes: int | None, notes: list[str]) -> tuple[Any, ...]:
    """The fewest GPUs of type `g` per strategy (memplan.distributed.fewest_gpus), or () with a note
    when the distributed closed form does not cover the model."""
    from .distributed import fewest_gpus, padding_slack

    def fits(q: TrainPlan) -> bool:
        return Fit.of(est(q), reserve).fits

    limit = fit_limit_bytes(g.memory_bytes, reserve)

    def hopeless(q: TrainPlan) -> bool:  # twice the slack: the allocator overhead is a ratio (< 1) of it
        return est(q).device_bytes - 2 * padding_slack(spec, est(q).plan) > limit

    try:
        opts = fewest_gpus(lambda q: est(q).device_bytes, fits, p, lambda q: est(q).host_bytes, host_ram_bytes,
                           lambda q: max_batch_size(spec, q, g, reserve, estimator=est)[0], hopeless)
    except UnsupportedArchitectureError as err:
        notes.append(f"several GPUs not searched: {err}")
        return ()
    best = next((o for o in opts if o.num_processes), None)
    if best is not None:
        notes.append(f"on several {g.name}: the fewest that fit are {best.num_processes} with {best.strategy} "
                     f"({best.flags}), micro-batch up to {best.max_batch_size} per GPU, host RAM "
                     f"{best.host_bytes / 2**30:.1f} GiB per node")
    return tuple(opts)
