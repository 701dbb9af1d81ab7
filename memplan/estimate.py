"""estimate: every Term at the peak of a steady-state training step, in closed form.

The peak is the largest of a few candidate moments of the step, each a `Moment` (name, kind, phase,
terms, description) built by one function from the shared `Step` (the shape-free `static_part`, the
symbolic layer walk of `activations`, the per-term functions of `formulas`), in step order:

- ``forward_moment``: the last layer's forward with every earlier layer's activations saved (no
  checkpointing);
- ``loss_forward_moment``: every saved activation plus bf16 logits, their fp32 copy and the
  log-softmax (10 T V bytes), autocast's cache of bf16 LoRA weight copies, the final norm's output;
- ``loss_backward_moment``: log-softmax output + its gradient + the logits gradient (12 T V bytes);
- ``flce_forward_moment`` / ``flce_backward_moment`` instead of the two loss moments when Liger's fused
  linear cross-entropy is on (`use_liger_kernel`, memplan/liger.py): one [chunk x vocab] logits chunk,
  lm_head's weight cast for its matmul and the [T x H] input gradient made in the forward; no [T x V];
- ``recompute_moment(i)`` (checkpointing): layer i recomputed up to its last saved tensor (torch's
  non-reentrant early stop), with the checkpoint inputs of layers below it and the gradients of
  the layers above it;
- ``post_norm_backward_moment(i)`` (olmo2's post norms): layer i's post-feedforward RMSNorm backward,
  the layer's saved set with RMSNorm's fp32 [T x H] gradients in flight;
- ``dequant_backward_moment(i)`` (QLoRA): layer i's 4-bit down projection backward: its weight
  dequantized again (bitsandbytes MatMul4Bit.backward), then the input gradient made;
- ``layer_backward_moment(i)``: layer i's MLP backward: the down projection's saved tensors released,
  three [T x I] gradients in flight;
- ``optimizer_moment``: every gradient plus the optimizer's scratch.
i is the last and the first layer (per-layer sizes are equal, so the extremes bound the rest).
Gradient accumulation keeps every gradient alive through the later micro-batches. Dtypes come from
`plan.precision`, per-architecture facts from `model.arch` (memplan/arch.py).

Measured agreement (tests/test_agreement_cpu.py, tests/test_agreement_sim.py): median 0.000 %, max
0.55 % of peak bytes against real CPU steps; max 0.12 % against `simulate` on real catalogue shapes.

Known limitations (NB):
- mixture of experts: the closed form walks the fused-experts block of the families in the table
  (Mixtral, Qwen2-MoE, Qwen3-MoE) as transformers 5.24 runs it by default (`grouped_mm`: every
  token*top_k slot in one grouped matmul, so memory does not depend on routing), with peft's
  ParamWrapper adapters and merged expert weights; models mixing dense and MoE layers, and
  `experts_implementation="eager"` (a routing-dependent per-expert loop), are `simulate`'s: `estimate()`
  falls back to it and says so;
- CUDA: activation tensors inside a layer are not rounded to 512 B (each < 512 B off); the context,
  workspace and allocator-overhead defaults in profiles/gpus are not yet calibrated on hardware;
  cuBLAS workspaces other than the two handles are not counted; FlashAttention-2 (CUDA-only) is
  modelled from flash-attn's source and checked against simulate's emulation, not yet on hardware;
- the gradients in flight while a layer recomputes are measured on CPU steps, not derived;
- CUDA, at most 1536 tokens: bitsandbytes picks the fused 4-bit kernel or dequantize + F.linear by
  a per-architecture heuristic (backends/cuda/ops.py); assumed fused, as `simulate` assumes;
- only the down projection's 4-bit backward is a candidate peak (the first and usually largest);
- 16-bit adapters on gemma3 (sandwich norms) without prepare and autocast: the in-flight gradients at
  a recompute are not measured for that combination (-3.4 % on the tiny CPU model);
- sequences are unpadded (no padding mask), as in the synthetic batches of `profile`;
- a config's `attention_dropout` > 0 (granite-3.0/3.1 ship 0.1) is not modelled, and noted: on the
  CPU SDPA then runs its math kernel (about 15 B more per [batch x heads x seq x seq] element and
  layer, measured on tiny granite and llama steps); `simulate` traces it;
- Liger kernels (`use_liger_kernel`): FLCE is modelled for every family, the layer kernels (RMSNorm,
  SwiGLU, RoPE) for llama/mistral/qwen2/qwen3/phi3 (`liger.WALKED_FAMILIES`; others fall back to
  simulate), from
  liger-kernel 0.8.5's Python wrappers and checked against simulate's emulation (Triton stubbed), not
  on hardware (reentrant checkpointing too: llama-3-8b at seq 512 and 4096, every term); sliding-window
  models (mistral, phi3) at seq >= the window without checkpointing, where Liger makes the last layer's
  forward the peak: that moment is 1.2-1.6 % under simulate (the same moment, with its sliding-window
  masks, without Liger: hidden there behind the loss stage);
- reentrant checkpointing (`use_reentrant`) is checked on real CPU steps and simulate for QLoRA/LoRA
  plans; its labels (which [T x H] tensors the tracker calls activations) follow the tracker.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable, Mapping, NamedTuple

from . import formulas as F
from .activations import (FUSED_4BIT_MAX_TOKENS, ActivationProfile, activation_profile, flash_varlen, layer_trace,
                          packed_rows, sdpa_masked)
from .catalogue import load_gpu, resolve_model
from .fused_head import sft_head_moments, sft_kept
from .errors import InvalidSpecError, MemplanError, UnsupportedArchitectureError
from .gpu import GPUSpec, gpu_notes
from .headroom import headroom_bytes
from .liger import flce_chunk_tokens, layer_kernels, liger_kernels
from .model import ModelSpec
from .offload import NOTE as OFFLOAD_NOTE, offloads, split as offload_split
from .plan import TrainPlan, plan_from, shape_free_cache
from .terms import ALLOCATED_TERMS, Phase, Term
from .versions import MODELED_VERSIONS, RECIPE_VERSIONS, TRANSFORMERS

MODELED_PEFT = MODELED_VERSIONS["peft"]

SCHEMA = "memplan.estimate/1"


class Moment(NamedTuple):
    """One moment of a training step at which the peak can occur, and the allocated terms alive then.

    `name` is a stable label ("loss:backward", "recompute:31") used as a key in `phase_peaks` and the
    JSON; code reads `kind` and `layer`, never the name. Kinds, in step order: forward (the last
    layer's forward, no checkpointing), loss_forward, loss_backward, recompute (a checkpointed
    layer recomputed during backward), dequant (a layer's 4-bit down projection backward: its weight
    dequantized again), layer_backward (a layer's MLP backward), optimizer.
    """

    name: str
    kind: str
    phase: str
    description: str
    layer: int | None
    static: Mapping[Term, int]  # the shape-free terms (shared by every moment of the step)
    allocated_bytes: int        # the static terms + the four below
    gradients: int
    activations: int
    logits: int
    temporaries: int

    @property
    def terms(self) -> dict[Term, int]:
        """The allocated terms at this moment (WORKSPACE 0: the estimate adds it to its peak)."""
        t = dict(self.static)
        t[Term.GRADIENTS], t[Term.ACTIVATIONS] = self.gradients, self.activations
        t[Term.LOGITS], t[Term.TEMPORARIES] = self.logits, self.temporaries
        return t


@dataclass(frozen=True)
class Estimate:
    """Bytes per Term at the peak moment of one steady-state training step."""

    model: ModelSpec
    plan: TrainPlan
    terms: dict[Term, int]
    peak_phase: str
    paged_bytes: int
    gpu: GPUSpec | None = None
    notes: tuple[str, ...] = ()
    phase_peaks: dict[str, int] = field(default_factory=dict)
    moment: str = ""
    #: every moment the estimator checked, in step order (empty when the terms come from simulate)
    moments: tuple[Moment, ...] = field(default=(), compare=False, repr=False)
    #: a distributed plan: every rank's terms and peak (memplan.distributed.RankResult); () otherwise
    ranks: tuple[Any, ...] = field(default=(), repr=False)
    #: bytes of host RAM at the device peak, keyed by Term value (or "loading"); per node for a
    #: distributed plan (shared contract "host"); empty when nothing lives on the host (a note gives the
    #: host's own peak when it comes at another moment)
    host: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def peak(self) -> Moment | None:
        """The moment at which the step peaks (None when the terms come from simulate)."""
        return next((m for m in self.moments if m.name == self.moment), None)

    @property
    def allocated_bytes(self) -> int:
        return sum(self.terms.get(t, 0) for t in ALLOCATED_TERMS)

    @property
    def reserved_bytes(self) -> int:
        return self.allocated_bytes + self.terms[Term.ALLOCATOR_OVERHEAD]

    @property
    def device_bytes(self) -> int:
        return self.reserved_bytes + self.terms[Term.CUDA_CONTEXT]

    @property
    def headroom_bytes(self) -> int | None:
        """GPU memory left after the step (no reserve; `Fit` keeps one): memplan.headroom."""
        return None if self.gpu is None else headroom_bytes(self.gpu.memory_bytes, self.device_bytes)

    @property
    def fits(self) -> bool | None:
        """Whether the step will run on `gpu`: the one verdict (`memplan.fit.Fit.of`: the memory fits
        and the GPU can run the plan as planned, e.g. bf16 on a T4 cannot); None without a GPU."""
        if self.gpu is None:
            return None
        from .fit import Fit

        return Fit.of(self).fits

    def __repr__(self) -> str:
        """One line: model, plan brief, device, peak GiB and, with a GPU, the one verdict `Fit.of`
        gives (fits / fits_paging / does_not_fit / cannot_run; `fits` is the same verdict).
        The dataclass keeps this method."""
        from .fit import Fit
        from .present import gib, plan_brief

        head = (f"Estimate({self.model.name!r}: {plan_brief(self.plan)}, {self.plan.device}; "
                f"peak {gib(self.device_bytes)} GiB at {self.peak_phase}")
        if self.gpu is None:
            return head + ", no GPU)"
        return head + f" on {self.gpu.name!r}: {Fit.of(self).verdict}, headroom {gib(self.headroom_bytes)} GiB)"

    def to_dict(self) -> dict[str, Any]:
        """The `memplan.estimate/1` dict; a distributed plan adds `ranks` (and `comm_buffers` in the
        terms), a result with host memory `host` (a single-GPU result keeps its shape)."""
        dist = self.plan.is_distributed
        d = {
            "schema": SCHEMA,
            "model": self.model.to_dict(),
            "plan": self.plan.to_dict(),
            "device": self.plan.device,
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "terms": {str(t): int(v) for t, v in self.terms.items() if dist or t != Term.COMM_BUFFERS},
            "peak": {"phase": self.peak_phase, "moment": self.moment, "allocated_bytes": self.allocated_bytes,
                     "reserved_bytes": self.reserved_bytes, "device_bytes": self.device_bytes},
            "phase_peaks": dict(self.phase_peaks),
            "paged_bytes": self.paged_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "versions": dict(F.MODELED_VERSIONS, **recipe_versions(self.plan)),
            "notes": list(self.notes),
        }
        if dist:
            d["ranks"] = [r.to_dict() for r in self.ranks]
        if self.host:
            d["host"] = {"terms": {k: int(v) for k, v in self.host.items()}, "bytes": self.host_bytes}
        return d


def recipe_versions(plan: TrainPlan) -> dict[str, str]:
    """The recipe libraries whose behaviour the plan's estimate models (named only when used): TRL for its
    SFTTrainer step and activation offloading, liger-kernel for Liger's kernels, deepspeed for ZeRO."""
    used = {"trl": plan.trainer == "sft" or plan.activation_offloading, "liger-kernel": plan.use_liger_kernel,
            "deepspeed": plan.world_strategy == "deepspeed"}
    return {k: v for k, v in RECIPE_VERSIONS.items() if used.get(k)}


# ---- the pieces every moment shares ----------------------------------------------------------------

@dataclass(frozen=True)
class Static:
    """What does not depend on batch or sequence length (cached per model and shape-free plan)."""

    terms: Mapping[Term, int]   # weights, quant state, other params, adapters, optimizer state
    total: int                  # their sum
    gradients: int              # every gradient, alive after backward
    paged: int                  # paged optimizer state in managed memory (CUDA)
    scratch: int                # the optimizer step's temporaries
    down: "DownProj"            # the down projection, for the layer backward moments
    attn_lora_grads: int        # LoRA gradients a layer has made when its attention core runs backward


@shape_free_cache()
def static_part(model: ModelSpec, plan: TrainPlan, cuda: bool) -> Static:
    """The terms of `plan` that do not depend on its shape (cached per model and shape-free plan)."""
    rnd = 512 if cuda else 1
    opt_dev, paged = F.optimizer_state_bytes(model, plan, rnd, cuda=cuda)
    terms = dict.fromkeys(ALLOCATED_TERMS, 0)
    terms[Term.BASE_WEIGHTS] = F.base_weights_bytes(model, plan, rnd)
    terms[Term.QUANT_STATE] = F.quant_state_bytes(model, plan, rnd)
    terms[Term.OTHER_PARAMS] = F.other_params_bytes(model, plan, rnd)
    terms[Term.ADAPTER_WEIGHTS] = F.adapter_weights_bytes(model, plan, rnd)
    terms[Term.OPTIMIZER_STATE] = opt_dev
    return Static(terms, sum(terms.values()), F.gradient_bytes(model, plan, rnd), paged,
                  F.optimizer_scratch_bytes(model, plan, rnd, cuda), _down_proj(model, plan, rnd),
                  _lora_grads_after_attention(model, plan, rnd))


def _lora_grads_after_attention(model: ModelSpec, plan: TrainPlan, rnd: int) -> int:
    """The LoRA gradients of one layer's Linears that run after the attention core (o_proj and the
    MLP): made already when the attention core's backward runs."""
    qkv = ("q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    return sum(F.lora_bytes(lin, plan, rnd) for lin in F.lora_targets(model, plan)
               if lin.name.rsplit(".", 1)[-1] not in qkv)


class DownProj(NamedTuple):
    """Shape-free facts of a layer's down projection, for the moments of its backward."""

    in_features: int
    out_features: int
    targeted: bool          # LoRA adapts it
    lora_grads: int         # its LoRA gradients (0 when not adapted)
    dequant: int            # 4-bit: the weight dequantized into the load dtype + its absmax or its cast
    w_grad: int             # 4-bit: the dequantized weight in the gradient's dtype (0: not 4-bit)


def _down_proj(model: ModelSpec, plan: TrainPlan, rnd: int) -> DownProj:
    r = lambda n: F.rounded(n, rnd)  # noqa: E731
    lin = next((x for x in model.layer_linears if x.name.endswith("down_proj")), model.layer_linears[-1])
    n, N, K = lin.numel, lin.out_features, lin.in_features
    targeted = any(x.name == lin.name for x in F.lora_targets(model, plan))
    lora_grads = F.lora_bytes(lin, plan, rnd) if targeted else 0
    dequant = w_grad = 0
    if plan.method == "qlora" and plan.quant != "int8":
        pr = plan.precision
        nb = -(-n // F.BNB_BLOCKSIZE)
        dequant = r(n * pr.load) + max(r(4 * nb) if plan.double_quant else 0,
                                       r(n * pr.compute) if pr.load != pr.compute else 0)
        w_grad = r(n * pr.compute)
    return DownProj(K, N, targeted, lora_grads, dequant, w_grad)


class Step(NamedTuple):
    """One step's shared quantities: the static part, the activation profile and the small tensors
    that every moment after the forward keeps (position ids, the loss and its gradient seed)."""

    model: ModelSpec
    plan: TrainPlan
    static: Static
    ap: ActivationProfile
    r: Callable[[int], int]     # allocation rounding: 512 B on CUDA, none on the CPU
    tokens: int                 # T = batch x sequence
    ga_grads: int               # gradients kept across micro-batches (gradient accumulation)
    layers_saved: int           # every layer's saved set (checkpointing: each layer's input)
    model_saved: int            # rotary cos/sin, the final norm's saved tensors, lm_head's autocast copy
    layer_args: int             # position ids and attention masks: arguments every checkpointed layer keeps
    small: int                  # the loss and its gradient seed
    rng_state: int              # one saved CPU RNG state (CPU steps with checkpointing), see `RNG_STATE_BYTES`
    #: mixed dense/MoE layers (`layer_kinds`): per layer, its saved set, its kind's (view, profile) and
    #: its gradients; () when every layer is alike
    saved_layers: tuple[int, ...] = ()
    layer_kind: tuple[tuple[ModelSpec, ActivationProfile], ...] = ()
    grads_layers: tuple[int, ...] = ()
    #: batch tensors that an op first sees and the batch then keeps alive to the step's end: an SFT
    #: step's labels ([B, S] int64: the fused head slices them; `fused_head.sft_kept`)
    kept: int = 0
    #: Liger's fused linear cross-entropy replaces lm_head + loss (`flce_forward_moment`)
    flce: bool = False
    #: FlashAttention-2 varlen: the sequences in the packed row (`runtime.step.packed_batch`: two per row)
    flash_seqs: int = 0

    def moment(self, kind: str, layer: int | None, gradients: int, activations: int, logits: int,
               temporaries: int, detail: str = "") -> Moment:
        """A moment of `kind` (`MOMENT_KINDS`): the static terms plus what is alive then (the allocated
        terms only)."""
        st = self.static
        name, phase, description = _label(kind, layer, self.model.num_layers, detail)
        return Moment(name, kind, phase, description, layer, st.terms,
                      st.total + gradients + activations + logits + temporaries, gradients, activations, logits,
                      temporaries)


def _nope(model: ModelSpec, ap: Any, lo: int, hi: int) -> int:
    """Llama 4: what the NoPE layers among layers lo..hi-1 save beyond a RoPE layer (`layer_bytes` is a
    RoPE layer's). NB layer 0's own set, and a NoPE layer's forward and recompute, are taken as a RoPE
    layer's."""
    if not ap.nope_delta:
        return 0
    return ap.nope_delta * sum(1 for rope in model.layer_rope[lo:hi] if not rope)


def make_step(model: ModelSpec, plan: TrainPlan, cuda: bool, flash_seqs: int = 0) -> Step:
    s = _make_step(model, plan, cuda, flash_seqs)
    return s._replace(kept=sft_kept(s)) if plan.trainer == "sft" else s


def _make_step(model: ModelSpec, plan: TrainPlan, cuda: bool, flash_seqs: int = 0) -> Step:
    static = static_part(model, plan, cuda)
    if model.layer_kinds:
        return _mixed_step(model, plan, cuda, static)._replace(flash_seqs=flash_seqs)
    ap = activation_profile(model, plan, cpu=not cuda)
    r = _round512 if cuda else int
    L, gc = model.num_layers, plan.gradient_checkpointing
    layers_saved = (L * ap.layer_input_bytes if gc
                    else ap.first_layer_bytes + (L - 1) * ap.layer_bytes + _nope(model, ap, 1, L))
    flce = uses_flce(model, plan)
    head = 0 if flce else ap.head_bytes  # FLCE casts lm_head's weight per chunk, saves no copy
    return Step(model, plan, static, ap, r, plan.batch_size * plan.seq_len,  # tokens
                static.gradients if plan.gradient_accumulation_steps > 1 else 0,  # ga_grads
                layers_saved, ap.rope_bytes + ap.embed_leaf_bytes + ap.final_norm_bytes + head,  # model_saved
                (_position_ids(plan, r) + ap.mask_bytes) if gc else 0, 2 * r(4),  # layer_args, small
                RNG_STATE_BYTES if gc and not cuda else 0,  # rng_state
                flce=flce, flash_seqs=flash_seqs)


def _position_ids(plan: TrainPlan, r: Callable[[int], int]) -> int:
    """The position ids a checkpointed layer keeps as its argument: the model's arange(S)[None] (int64),
    or none made in the step when the batch brings its own (packing: made by the collator)."""
    return 0 if plan.packing else r(8 * plan.seq_len)


def _mixed_step(model: ModelSpec, plan: TrainPlan, cuda: bool, static: Static) -> Step:
    """A model whose layers differ (`layer_kinds`: DeepSeek's first_k_dense_replace, Qwen's
    mlp_only_layers, interleaved MoE): each kind walked as a model of that kind alone
    (`formulas.kind_view`), the saved sets, LoRA weight copies and gradients summed over the actual
    layer order; the step's profile is the last layer's kind's (its forward is the forward moment)."""
    r = _round512 if cuda else int
    L, gc = model.num_layers, plan.gradient_checkpointing
    B, S = plan.batch_size, plan.seq_len
    T = B * S
    rnd = 512 if cuda else 1
    kinds = {}
    for kind in set(model.layer_kinds):
        view = F.kind_view(model, kind == "moe")
        ap = activation_profile(view, plan, cpu=not cuda)
        tr = layer_trace(view, plan, (not cuda, cuda and plan.method == "qlora" and T <= FUSED_4BIT_MAX_TOKENS,
                                      sdpa_masked(view, plan), flash_varlen(plan)))
        ev = lambda c: c[0] * T + c[1] * T * S + c[2]  # noqa: E731
        grads = sum(k and F.rounded(rr * cc * dt, rnd) for (rr, cc), dt, k in F._trainable_groups(view, plan)
                    if k == view.num_layers)
        kinds[kind] = (view, ap, ev(tr.copies), ev(tr.copies_first), tr.lora_weight_copies // L, grads)
    order = [kinds[k] for k in model.layer_kinds]
    saved = tuple(o[1].first_layer_bytes if i == 0 else o[1].layer_bytes for i, o in enumerate(order))
    copies = sum(o[4] for o in order)
    saved_copies = order[0][3] + sum(o[2] for o in order[1:])
    last = order[-1][1]._replace(lora_weight_copies=copies, saved_copies=saved_copies)
    layers_saved = L * last.layer_input_bytes if gc else sum(saved)
    return Step(model, plan, static, last, r, T,
                static.gradients if plan.gradient_accumulation_steps > 1 else 0,
                layers_saved, last.rope_bytes + last.final_norm_bytes + last.head_bytes,
                (_position_ids(plan, r) + last.mask_bytes) if gc else 0, 2 * r(4),
                RNG_STATE_BYTES if gc and not cuda else 0,
                saved, tuple((o[0], o[1]) for o in order), tuple(o[5] for o in order))


def _kind_step(s: Step, i: int) -> Step:
    """The step as layer i's kind sees it (its profile, its down projection), for its backward moments."""
    if not s.layer_kind:
        return s
    view, ap = s.layer_kind[i]
    rnd = 512 if s.plan.device == "cuda" else 1
    ap = ap._replace(lora_weight_copies=s.ap.lora_weight_copies, saved_copies=s.ap.saved_copies)
    return s._replace(model=view, ap=ap, static=replace(s.static, down=_down_proj(view, s.plan, rnd),
                                                                  attn_lora_grads=_lora_grads_after_attention(
                                                                      view, s.plan, rnd)))


#: torch.utils.checkpoint (preserve_rng_state=True) keeps `torch.get_rng_state()` of each checkpointed
#: layer from its forward until its recompute, and `torch.random.fork_rng` one more during a
#: recompute: the CPU generator's state, 5056 B (mt19937). On CUDA they are host memory (with the CUDA
#: generator's), not device memory. Measured with torch's allocator events (tests/runtime/test_instrument.py).
RNG_STATE_BYTES = 5056


def _round512(n: int) -> int:
    """The CUDA caching allocator's granularity: every tensor is rounded up to 512 B."""
    return -(-n // 512) * 512


_FORWARD, _LOSS, _BACKWARD, _OPTIMIZER = (p.value for p in (Phase.FORWARD, Phase.LOSS, Phase.BACKWARD, Phase.OPTIMIZER))


#: kind -> (name, phase, description); {i}: the layer, {L}: the layer count, {detail}: the moment's own
MOMENT_KINDS = {
    "forward": ("forward", _FORWARD, "the forward of the last layer ({i}), every earlier layer's activations saved"),
    "loss_forward": ("loss:forward", _LOSS,
                     "the loss forward: bf16 logits, their fp32 copy and the log-softmax over [tokens x vocab]"),
    "loss_backward": ("loss:backward", _BACKWARD,
                      "the start of backward: log-softmax output and gradients over [tokens x vocab] (the loss stage)"),
    "sft_head_forward": ("loss:forward", _LOSS,
                         "the loss forward through TRL's fused LM head (SFTTrainer, trl 1.16): {detail}, "
                         "[tokens x 32768] tiles, no [tokens x vocab] logits"),
    "sft_head_backward": ("loss:backward", _BACKWARD,
                          "the loss backward through TRL's fused LM head (SFTTrainer, trl 1.16): {detail}, "
                          "fp32 gradient of the hidden states"),
    "flce_forward": ("loss:forward", _LOSS,
                     "Liger's fused linear cross-entropy forward: one [{detail} x vocab] logits chunk, lm_head's "
                     "weight cast for its matmul, the [tokens x hidden] input gradient made in the forward"),
    "flce_backward": ("loss:backward", _BACKWARD,
                      "the start of backward with Liger's fused linear cross-entropy: its saved [tokens x hidden] "
                      "input gradient handed to the final norm (no [tokens x vocab] logits)"),
    "recompute": ("recompute:{i}", _BACKWARD, "recomputing checkpointed layer {i} of {L} during backward"),
    "post_norm_backward": ("post_norm_backward:{i}", _BACKWARD,
                           "the backward of layer {i}'s post-feedforward norm (of {L}): the layer's saved set, "
                           "RMSNorm's fp32 [tokens x hidden] gradients in flight"),
    "dequant": ("dequant:{i}", _BACKWARD, "the 4-bit backward of layer {i}'s down projection (of {L}): {detail}"),
    "layer_backward": ("backward:{i}", _BACKWARD,
                       "the MLP backward of layer {i} of {L}: [tokens x intermediate] gradients in flight"),
    "attention_backward": ("attention_backward:{i}", _BACKWARD,
                           "the eager attention backward of layer {i} of {L}: [batch x heads x seq x seq] "
                           "probabilities and their gradients"),
    "experts_unpermute_backward": ("experts_unpermute_backward:{i}", _BACKWARD,
                                   "the start of layer {i}'s mixture-of-experts backward (of {L}): the "
                                   "[tokens*top_k x hidden] gradient unpermuted, every saved tensor alive"),
    "experts_backward": ("experts_backward:{i}", _BACKWARD,
                         "the experts' down projection backward of layer {i} of {L}: the gradient of its "
                         "[experts x hidden x intermediate] merged weight and [tokens*top_k x intermediate] "
                         "gradients in flight"),
    "experts_act_backward": ("experts_act_backward:{i}", _BACKWARD,
                             "the experts' activation backward of layer {i} of {L}: three "
                             "[tokens*top_k x intermediate] gradients in flight"),
    "experts_gate_up_backward": ("experts_gate_up_backward:{i}", _BACKWARD,
                                 "the experts' gate/up projection backward of layer {i} of {L}: the gradient "
                                 "of its [experts x 2*intermediate x hidden] merged weight in flight"),
    "moe_backward_start": ("moe_backward_start:{i}", _BACKWARD,
                           "the start of layer {i}'s mixture-of-experts backward (of {L}, Llama 4): the "
                           "gradient of the sum over experts in flight, every saved tensor alive"),
    "dense_experts_backward": ("experts_backward:{i}", _BACKWARD,
                               "the experts' down projection backward of layer {i} of {L} (Llama 4: every expert "
                               "on every token): [experts x tokens x intermediate] gradients in flight, the "
                               "16-bit expert weight copies alive"),
    "dense_experts_act_backward": ("experts_act_backward:{i}", _BACKWARD,
                                   "the experts' activation backward of layer {i} of {L} (Llama 4: every expert "
                                   "on every token): three [experts x tokens x intermediate] gradients in flight"),
    "experts_input_backward": ("experts_input_backward:{i}", _BACKWARD,
                               "the backward of layer {i}'s score-scaled expert input (of {L}, Llama 4): three "
                               "fp32 [experts*tokens x hidden] gradients in flight"),
    "optimizer": ("optimizer", _OPTIMIZER, "the optimizer step: every gradient plus the optimizer's state and scratch"),
}


@lru_cache(maxsize=1024)
def _label(kind: str, i: int | None, L: int, detail: str) -> tuple[str, str, str]:
    name, phase, description = MOMENT_KINDS[kind]
    return name.format(i=i), phase, description.format(i=i, L=L, detail=detail)


# ---- the moments, one function each, in step order ---------------------------------------------------

def forward_moment(s: Step) -> Moment:
    """No checkpointing: the last layer's forward, every earlier layer's saved set alive."""
    ap, L = s.ap, s.model.num_layers
    earlier = ap.first_layer_bytes + (L - 2) * ap.layer_bytes + _nope(s.model, ap, 1, L - 1) if L > 1 else 0
    if s.saved_layers:
        earlier = sum(s.saved_layers[:-1])
    return s.moment("forward", L - 1, s.ga_grads,
                    earlier + ap.rope_bytes + ap.embed_leaf_bytes + ap.mask_bytes + ap.forward_peak - ap.forward_temps, 0,
                    ap.forward_temps + ap.forward_masks)


def _softcap_bytes(s: Step) -> int:
    """Gemma-2 final soft-capping: logits / cap -> tanh (its output saved) -> * cap."""
    return s.r(s.ap.logits_dt * s.tokens * s.model.vocab_size) if s.model.final_logit_softcapping else 0


def loss_forward_moment(s: Step) -> Moment:
    """The loss forward: 16-bit logits, their fp32 copy and the log-softmax over [tokens x vocab], with
    every saved activation, autocast's cache of 16-bit LoRA weight copies and the final norm's output
    (loss/loss_utils.py ForCausalLMLoss)."""
    ap, r, p, T = s.ap, s.r, s.plan, s.tokens
    tv = T * s.model.vocab_size
    fp32_copy = r(4 * tv) if ap.logits_dt != 4 else 0
    logits = r(ap.logits_dt * tv) + fp32_copy + r(4 * tv) + _softcap_bytes(s)
    labels = r(8 * p.batch_size * (p.seq_len + 1))  # labels padded by one (-100) for the shift
    copies = ap.lora_weight_copies - (0 if p.gradient_checkpointing else ap.saved_copies)
    acts = (s.layers_saved + s.model_saved + copies + r(T * s.model.hidden_size * ap.stream_dt) + labels
            + s.layer_args + s.small + s.model.num_layers * s.rng_state)
    return s.moment("loss_forward", None, s.ga_grads, acts, logits, 0)


def loss_backward_moment(s: Step) -> Moment:
    """The start of backward: log-softmax output + its gradient + the logits' gradient (12 T V B)."""
    tv = s.tokens * s.model.vocab_size
    return s.moment("loss_backward", None, s.ga_grads,
                    s.layers_saved + s.model_saved + s.layer_args + s.small + s.model.num_layers * s.rng_state,
                    3 * s.r(4 * tv) + _softcap_bytes(s), 0)


# ---- Liger's fused linear cross-entropy (use_liger_kernel; memplan/liger.py) ----------------------------

def uses_flce(model: ModelSpec, plan: TrainPlan) -> bool:
    """Whether the plan's Liger kernels include fused_linear_cross_entropy for this model's family."""
    return plan.use_liger_kernel and "fused_linear_cross_entropy" in liger_kernels(
        model.model_type, plan.use_liger_kernel, plan.liger_kernel_config)


def flce_forward_moment(s: Step) -> Moment:
    """Liger's FLCE forward at a chunk's matmul (liger_kernel 0.8.5 ops/fused_linear_cross_entropy.py
    `fused_linear_cross_entropy_forward`, called by transformers/model/<family>.py `lce_forward` through
    loss_utils `LigerForCausalLMLoss`): the [T x V] logits never exist.

    Alive: every saved activation and the final norm's output (the FLCE input, [T x H] stream dtype),
    `grad_input = zeros_like(_input)` (T·H·a, filled chunk by chunk in the forward and kept by
    ctx.save_for_backward), `loss_1d` (4T), the target mask (T, bool), the labels padded by one
    (8·B·(S+1)) and shifted (8T, `.contiguous()`: a copy when B > 1); no loss scalar yet; in flight: one logits chunk [c x V] (autocast
    dtype, else the weight's), the lm_head weight cast to the autocast dtype for the matmul (V·H·2,
    not cached: the frozen weight does not require grad; none without autocast or with a 16-bit
    lm_head) and the [c x H] chunk of the input cast (first matmul) or of the input gradient (second
    matmul), in the autocast dtype (else the stream's). c = `liger.flce_chunk_tokens`. lm_head's
    weight gradient is not made (frozen: grad_weight None).

    NB terms follow the tracker's labelling: a tensor whose last dimension is V and that spans at
    least T x V elements is `logits` (the transposed weight cast [H x V] when H >= T; the chunk when it
    is all T rows), everything else made inside the loss is a temporary; grad_input is an activation.
    Modelled from liger-kernel's source and checked against simulate's emulation (Triton launches
    stubbed), not yet on hardware.
    """
    ap, r, p, m, T = s.ap, s.r, s.plan, s.model, s.tokens
    H, V = m.hidden_size, m.vocab_size
    a, ac = ap.stream_dt, p.precision.autocast
    c = flce_chunk_tokens(T, V, H)
    w_cast = r(V * H * 2) if ac and p.precision.params != ac else 0
    chunk = r(c * V * (ac or p.precision.params))
    row = r(c * H * (ac or a))
    logits = (w_cast if H >= T else 0) + (chunk if c == T else 0)
    temps = (w_cast - (w_cast if H >= T else 0)) + (chunk - (chunk if c == T else 0)) + row
    # loss_1d, the target mask, the padded labels and their shifted copy (a view when B == 1)
    temps += r(4 * T) + r(T) + r(8 * p.batch_size * (p.seq_len + 1)) + (r(8 * T) if p.batch_size > 1 else 0)
    copies = ap.lora_weight_copies - (0 if p.gradient_checkpointing else ap.saved_copies)
    acts = (s.layers_saved + s.model_saved + copies + r(T * H * a) + r(T * H * a) + s.layer_args
            + m.num_layers * s.rng_state)
    return s.moment("flce_forward", None, s.ga_grads, acts, logits, temps, detail=str(c))


def flce_backward_moment(s: Step) -> Moment:
    """The start of backward with FLCE: its saved input gradient [T x H] (made in the forward) handed
    on as the final norm's output gradient; no [T x V] buffer."""
    T, H = s.tokens, s.model.hidden_size
    return s.moment("flce_backward", None, s.ga_grads,
                    s.layers_saved + s.model_saved + s.layer_args + s.small + s.model.num_layers * s.rng_state
                    + s.r(T * H * s.ap.stream_dt), 0, 0)


class LayerBackward(NamedTuple):
    """What every moment of layer i's backward shares."""

    i: int
    fixed: int          # activations besides the layer's own: the layers below, cos/sin, ids, its input
    after_down: int     # activations once down_proj's saved tensors are released (fixed + the layer's rest)
    grads: int          # gradients of the layers above (all of them with gradient accumulation)


def layer_backward_state(s: Step, i: int) -> LayerBackward:
    """Layer i's backward: the activations of the layers below it (their checkpointed inputs, or
    their saved sets), its own input, cos/sin, ids, masks, the RNG states not yet used (this layer's
    and those below), and the gradients of the layers above (all of them with accumulation)."""
    ap, grads, L = s.ap, s.static.gradients, s.model.num_layers
    rng_states = i + 1
    if s.plan.gradient_checkpointing:
        below = i * ap.layer_input_bytes + (0 if ap.input_in_saved else ap.layer_input_bytes)
        if s.plan.use_reentrant:
            # torch's CheckpointFunction.backward holds the recomputed layer's output through its inner
            # backward, and every layer's ctx keeps its RNG state until the whole backward is done
            below += ap.layer_input_bytes
            rng_states = L
    elif s.saved_layers:
        below = sum(s.saved_layers[:i])
    else:
        below = ap.first_layer_bytes + (i - 1) * ap.layer_bytes + _nope(s.model, ap, 1, i) if i else 0
    fixed = below + ap.rope_bytes + ap.embed_leaf_bytes + s.layer_args + s.small + rng_states * s.rng_state + s.kept
    n_types = len(s.model.attention_types)
    # NB: measured on gpt_oss only (gemma2/3 would follow, unmeasured: their golden files keep both masks)
    if s.plan.gradient_checkpointing and i == 0 and n_types > 1 and not s.plan.use_reentrant \
            and s.model.arch.attention_sinks:
        # the masks are the checkpointed layers' arguments: once every layer above is done only layer
        # 0's own type is still referenced (gpt_oss sliding/full; measured on CPU steps)
        fixed -= ap.mask_bytes // n_types * (n_types - 1)
    saved_i = (ap.first_layer_bytes if i == 0 else ap.layer_bytes) + (_nope(s.model, ap, i, i + 1) if i else 0)
    above = grads // L * (L - 1 - i)
    if s.grads_layers:
        saved_i = s.saved_layers[i]
        above = sum(s.grads_layers[i + 1:])
    return LayerBackward(i, fixed, fixed + saved_i - ap.down_saved, grads if s.ga_grads else above)


def recompute_moment(s: Step, lb: LayerBackward) -> Moment:
    """Checkpointing: layer i recomputed up to its last saved tensor (torch's non-reentrant early stop),
    with the checkpoint inputs below it, the gradients of the layers above and the [T x H] gradients
    in flight (activations.inflight_bytes_per_element), and fork_rng's snapshot of the CPU generator.
    Reentrant: the whole layer is recomputed inside its CheckpointFunction's backward (its output
    not made yet at the peak; no extra RNG snapshot beyond the ctx states; only the output's gradient
    in flight)."""
    i, ap = lb.i, s.ap
    if s.plan.use_reentrant:
        # fixed counts the layer's output for the backward moments: not made yet. The RNG snapshot is
        # made in the backward node (a temporary); on a 16-bit stream the output's gradient is an
        # argument of the recomputed forward's backward, which the tracker sees as an activation.
        moved = 0 if ap.input_in_saved else ap.recompute_inflight
        return s.moment("recompute", i, lb.grads, lb.fixed - ap.layer_input_bytes + moved + ap.recompute_peak
                        - ap.recompute_temps, 0, ap.recompute_inflight - moved + ap.recompute_temps + s.rng_state)
    peak, temps = ap.recompute_peak, ap.recompute_temps
    if i == 0 and ap.recompute_peak_first >= 0:  # layer 0 recomputes from a leaf input (olmo2: shared casts)
        peak, temps = ap.recompute_peak_first, ap.recompute_temps_first
    # Liger's FLCE + Liger's final RMSNorm (backward in place, dX written into dY): the last layer's
    # output gradient in flight is FLCE's grad_input, made in the loss forward (an activation)
    moved = (s.r(s.tokens * s.model.hidden_size * ap.stream_dt)
             if s.flce and i == s.model.num_layers - 1 and "rms_norm" in layer_kernels(s.model, s.plan) else 0)
    return s.moment("recompute", i, lb.grads, lb.fixed + s.rng_state + peak - temps + moved, 0,
                    ap.recompute_inflight + temps - moved)


def layer_backward_moment(s: Step, lb: LayerBackward) -> Moment:
    """Layer i's MLP backward: the down projection's saved tensors released, the [T x H] output
    gradient and three [T x I] gradients in flight, down_proj's LoRA gradients just made."""
    i, ap, r, m, T = lb.i, s.ap, s.r, s.model, s.tokens
    return s.moment("layer_backward", i, lb.grads + s.static.down.lora_grads, lb.after_down, 0,
                    r(T * m.hidden_size * ap.stream_dt) + 3 * r(T * m.intermediate_size * ap.prod_dt))


def attention_backward_moment(s: Step, lb: LayerBackward) -> Moment | None:
    """Eager attention: layer i's softmax backward. Its saved set up to the probabilities is alive
    (the second matmul's saved cast and v are released), with the [B, heads, S, S] fp32 gradient of
    the probabilities and the softmax backward's output, the gradient of the attention output and of
    the residual stream (stream dtype) in flight; o_proj's and the MLP's LoRA gradients are made."""
    ap = s.ap
    if not ap.probs_bytes:
        return None
    i, r, T, m = lb.i, s.r, s.tokens, s.model
    saved = ap.attn_saved_first if i == 0 else ap.attn_saved
    # reentrant: the gradient of the layer's output, the inner backward's argument, is held too
    residual = r(T * m.hidden_size * ap.stream_dt) * (2 if s.plan.use_reentrant else 1)
    return s.moment("attention_backward", i, lb.grads + s.static.attn_lora_grads, lb.fixed + saved, 0,
                    2 * ap.probs_bytes + residual + r(T * m.q_dim * ap.stream_dt))


def flash_attention_backward_moment(s: Step, lb: LayerBackward) -> Moment | None:
    """FlashAttention-2: layer i's attention kernel backward (flash-attn 2.x flash_attn_interface.py
    FlashAttnFunc.backward, csrc/flash_attn/flash_api.cpp mha_bwd / mha_varlen_bwd). Alive: the
    layer's saved set up to the kernel's saved tensors (o_proj's released), o_proj's and the MLP's
    LoRA gradients; in flight: the gradient of the attention output (the kernel's dout) and of the
    residual stream, dq/dk/dv (empty_like q/k/v), softmax_d fp32 [B, H, round128(S)] and dq_accum fp32
    [B, round128(S), H, hd_r] (varlen: [H, T + 128 n] and [T + 128 n, H, hd_r] for n sequences),
    hd_r = head_dim rounded up to 32 (<= 128) or 64; GQA: dk/dv expanded to the query heads.
    NB: not checked on hardware (simulate's emulation allocates the same, memplan/simulate/flash.py);
    deterministic mode (a zero-filled split dq_accum) not modelled."""
    if s.plan.attn_implementation != "flash_attention_2":
        return None
    i, ap, r, T, m = lb.i, s.ap, s.r, s.tokens, s.model
    p = s.plan
    cdt = ap.flash_dt
    hd = m.head_dim
    hd8, hd_r = -(-hd // 8) * 8, -(-hd // (32 if hd <= 128 else 64)) * (32 if hd <= 128 else 64)
    H, Hk = m.num_heads, m.num_kv_heads
    if flash_varlen(p):
        rows = T + 128 * max(s.flash_seqs, 1)
        ws = r(4 * H * rows) + r(4 * rows * H * hd_r)
    else:
        sq = -(-p.seq_len // 128) * 128
        ws = r(4 * p.batch_size * H * sq) + r(4 * p.batch_size * sq * H * hd_r)
    dqkv = r(T * H * hd8 * cdt) + 2 * r(T * Hk * hd8 * cdt)
    expanded = 2 * r(T * H * hd8 * cdt) if Hk != H else 0
    pad = r(T * H * hd8 * cdt) if hd8 != hd else 0  # dout padded (F.pad)
    saved = ap.attn_saved_first if i == 0 else ap.attn_saved
    residual = r(T * m.hidden_size * ap.stream_dt) * (2 if p.use_reentrant else 1)
    return s.moment("attention_backward", i, lb.grads + s.static.attn_lora_grads, lb.fixed + saved, 0,
                    r(T * m.q_dim * cdt) + residual + dqkv + ws + expanded + pad)


def mla_attention_backward_moment(s: Step, lb: LayerBackward) -> Moment | None:
    """MLA on the CPU (math SDPA, v head dim != q/k's): layer i's attention core backward once the
    scores' matmul has run backward. Alive: the layer's saved set up to q·scale and k^T·scale (the
    probabilities and the contiguous values released), o_proj's and the MLP's LoRA gradients; in
    flight: two [B, heads, S, S] fp32 gradients (the probabilities' and the scores'), the fp32
    gradients of q·scale, k^T·scale and of q/k before scaling, their casts to the autocast dtype, the
    gradient of the attention output [T, heads·v] in fp32 and its cast, the kv_b output's gradient
    buffer [T, heads·(nope+v)] fp32, the rotary parts' gradients, and the gradient of the layer's
    output. NB: measured on a tiny deepseek_v3 CPU step (the peak with checkpointing); the tensors a
    checkpointed recompute leaves alive (q_b's and kv_b's outputs) are not counted."""
    m = s.model
    if m.mla is None or s.plan.device == "cuda" or s.plan.attn_implementation != "sdpa":
        return None
    i, ap, r, T, a = lb.i, s.ap, s.r, s.tokens, m.mla
    nh, B, S = m.num_heads, s.plan.batch_size, s.plan.seq_len
    cdt = s.plan.precision.autocast or ap.stream_dt
    P = r(4 * B * nh * S * S)
    qk = T * nh * a.qk_head_dim
    if ap.stream_dt == 4:
        temps = (2 * P + 4 * r(4 * qk) + (2 * r(cdt * qk) if cdt != 4 else 0) + r(T * m.hidden_size * ap.stream_dt)
                 + r(4 * T * nh * a.v_head_dim) + (r(cdt * T * nh * a.v_head_dim) if cdt != 4 else 0)
                 + r(4 * T * nh * (a.qk_nope_head_dim + a.v_head_dim)) + r(4 * T * nh * a.qk_rope_head_dim)
                 + r(4 * T * a.qk_rope_head_dim))
    else:  # 16-bit stream (LoRA): the fp32 [S, S] causal mask, two fp32 q/k gradients, 16-bit rotary ones
        dt = ap.stream_dt
        temps = (2 * P + r(4 * S * S) + 2 * r(4 * qk) + 2 * r(cdt * qk) + r(T * m.hidden_size * dt)
                 + r(dt * T * nh * a.qk_rope_head_dim) + r(dt * T * a.qk_rope_head_dim))
    core = ap.attn_saved_first if i == 0 else ap.attn_saved  # the layer's saved set up to q·scale, k^T·scale
    saved = core + r(4 * T * nh * a.v_head_dim)  # + the values
    if s.plan.gradient_checkpointing and not s.plan.use_reentrant:
        # the recompute stopped inside this attention: its frame's tensors stay referenced (the
        # attention input [T, H], q_b's (q_proj's) output, the normed latent, kv_b's output) with
        # fork_rng's snapshot. NB: measured on tiny deepseek_v3/v2 CPU steps.
        dt = ap.stream_dt
        saved += (r(dt * T * m.hidden_size) + r(dt * T * nh * a.qk_head_dim) + r(dt * T * a.kv_lora_rank)
                  + r(dt * T * nh * (a.qk_nope_head_dim + a.v_head_dim)) + s.rng_state)
        if dt != 4:  # kv_a's output: saved by its norm (x.to(float32) is x) on an fp32 stream, a local otherwise
            saved += r(dt * T * (a.kv_lora_rank + a.qk_rope_head_dim))
    # no LoRA gradient of this layer is accumulated yet (measured)
    late = s.moment("attention_backward", i, lb.grads, lb.fixed + saved, 0, temps)
    # the softmax's backward, earlier: the probabilities still saved, their gradient and the softmax
    # backward's output [B, heads, S, S] fp32 in flight with the attention output's fp32 gradient and
    # the layer output's; the LoRA gradients of o_proj and of the MoE block's experts and router are
    # accumulated; the values are released (their matmul ran backward). NB: measured against simulate
    # at long sequences (deepseek-v2-lite, seq 16k/32k, the last layer), where it is the peak; there the
    # stopped recompute's locals of the later instant are not alive
    moe_lora = sum(F.rounded(s.plan.precision.adapter * rr * cc, 512 if s.plan.device == "cuda" else 1)
                   for rr, cc in F.moe_lora_shapes(m, s.plan))
    early = s.moment("attention_backward", i, lb.grads + s.static.attn_lora_grads + moe_lora,
                     lb.fixed + core + P, 0,
                     2 * P + r(4 * T * nh * a.v_head_dim) + r(T * m.hidden_size * ap.stream_dt))
    return max(late, early, key=lambda mo: mo.allocated_bytes)
def post_norm_backward_moment(s: Step, lb: LayerBackward) -> Moment | None:
    """olmo2 (post norms): the backward of layer i's post_feedforward_layernorm, the first node of
    its backward. That norm saves last, so a checkpointed layer has been recomputed to its end: its
    whole saved set is alive but the norm's rsqrt (released by RsqrtBackward); in flight are the
    [T x H] gradient of the layer output (stream dtype, held for the residual path) and five fp32
    [T x H] temporaries of RMSNorm's backward (x.to(float32) * rsqrt's gradient, waiting to be
    summed with the pow path; mean's backward; pow's x**1, * 2 and * grad). Measured on CPU steps
    (tests/test_agreement_cpu.py, olmo2 fp32 and no-prepare cases)."""
    if not s.model.arch.post_norms:
        return None
    i, ap, r, T, H = lb.i, s.ap, s.r, s.tokens, s.model.hidden_size
    saved_i = ap.first_layer_bytes if i == 0 else ap.layer_bytes
    return s.moment("post_norm_backward", i, lb.grads, lb.fixed + saved_i - r(4 * T), 0,
                    r(T * H * ap.stream_dt) + 5 * r(4 * T * H))


def dequant_backward_moment(s: Step, lb: LayerBackward) -> Moment | None:
    """Layer i's down projection backward (QLoRA, 4-bit): bitsandbytes MatMul4Bit.backward computes
    `grad_output @ dequantize_4bit(W).to(grad_output.dtype)` (autograd/_functions.py): the weight
    dequantized into the quant_state (load) dtype with its fp32 absmax, cast to the gradient's
    (compute) dtype, then the input gradient. Its LoRA branch has run: down_proj's LoRA gradients
    exist and its saved tensors are released; in flight are the gradient arriving at the output,
    its cast to the compute dtype and the LoRA branch's gradient of the input. The larger of two
    instants: the dequantization (absmax, or the load-dtype weight and its cast, alive) and the
    matmul (the weight in the gradient's dtype and the input gradient).
    NB: down_proj is the first 4-bit backward of a layer and usually the largest; the others run
    with fewer saved tensors alive."""
    d = s.static.down
    if not d.w_grad:
        return None
    i, ap, r, T, cd = lb.i, s.ap, s.r, s.tokens, s.plan.precision.compute
    N, K = d.out_features, d.in_features
    in_flight = (r(T * N * ap.down_out_dt) + (r(T * N * cd) if ap.down_out_dt != cd else 0)
                 + (r(T * K * ap.prod_dt) if d.targeted else 0))
    if s.model.arch.post_norms:
        # olmo2: post_feedforward_layernorm sits between down_proj and the residual add, so the
        # stream's gradient (held for the residual path) and the norm's backward output, in the
        # compute dtype, are two tensors (NB: measured with simulate, 16-bit and fp32 streams)
        in_flight = r(T * N * ap.stream_dt) + r(T * N * cd) + (r(T * K * ap.prod_dt) if d.targeted else 0)
    acts, grads = lb.after_down, lb.grads + d.lora_grads
    matmul = d.w_grad + r(T * K * cd)
    what = "the input gradient made" if matmul >= d.dequant else "its weight dequantized"
    return s.moment("dequant", i, grads, acts, 0, in_flight + max(matmul, d.dequant), what)


def experts_unpermute_moment(s: Step, lb: LayerBackward) -> Moment:
    """Layer i's MoE block backward, its first instant: the gradient of the block's output unpermuted
    (`weighted_out[inv_perm]` run backward: a contiguous copy of the expanded [T·k, H] gradient,
    new_zeros and index_put), every saved tensor of the layer alive. With a shared expert (Qwen2-MoE)
    the sigmoid-gated branch has run backward first: its gate's LoRA gradients are made and two
    [T, H] gradients of the shared branch are in flight (measured with the tracker on CPU steps)."""
    i, ap, r, m, T = lb.i, s.ap, s.r, s.model, s.tokens
    H, S = m.hidden_size, T * m.experts_per_token
    saved = ap.first_layer_bytes if i == 0 else ap.layer_bytes
    wo_dt = max(ap.moe_dt, ap.moe_sw_dt)
    temps = r(T * H * ap.stream_dt) + 3 * r(S * H * wo_dt) + _shared_input_grad(s)
    grads = lb.grads
    if m.shared_expert_intermediate_size and m.arch.moe.shared_expert_gate:
        temps += 2 * r(T * H * ap.stream_dt)
        gate = next(lin for lin in m.layer_linears if lin.name.endswith("shared_expert_gate"))
        if any(lin.name == gate.name for lin in F.lora_targets(m, s.plan)):
            grads += F.lora_bytes(gate, s.plan, 512 if s.plan.device == "cuda" else 1)
    return s.moment("experts_unpermute_backward", i, grads, lb.fixed + saved - ap.moe_tail, 0, temps)


def _shared_input_grad(s: Step) -> int:
    """DeepSeek's shared experts (no gate) run backward before the routed experts: the gradient of
    their input [T, H] waits, in the stream dtype, to be summed with the experts' and the router's
    (measured against simulate at catalogue shapes, cpu and cuda)."""
    m = s.model
    if not (m.is_moe and m.arch.moe.shared_experts_key and m.shared_expert_intermediate_size):
        return 0
    return s.r(s.tokens * m.hidden_size * s.ap.stream_dt)


def experts_backward_moments(s: Step, lb: LayerBackward) -> tuple[Moment, Moment, Moment]:
    """Layer i's fused experts backward (integrations/moe.py grouped_mm_experts_forward run backward),
    at its two largest instants (measured with the tracker on real CPU steps):

    - the down projection's grouped_mm backward: the unpermute and routing-weight mul have run (the
      down output, the sorted routing weights and the inverse permutation are released); in flight are
      the gradient arriving at the layer's output [T, H], the gradient of the down output
      [T·k, H] and of the routing weights [T·k], the input gradient [T·k, I] and, where peft adapts
      down_proj, the gradient of its merged weight [E, H, I] (from which baddbmm's backward makes the
      LoRA gradients);
    - the activation's backward (act_fn(gate) * up run backward): the down projection's saved
      tensors are released and its LoRA gradients made (baddbmm's backward runs first); in flight are
      the arriving gradient and three [T·k, I] gradients (the product's, the activation's and up's);
    - the gate_up projection's grouped_mm backward: the activation's saved tensors are released too;
      in flight are the arriving gradient, the gradient of the gate_up output [T·k, 2I], the input
      gradient [T·k, H] and the gradient of the merged gate_up weight [E, 2I, H].
    """
    i, ap, r, m, T = lb.i, s.ap, s.r, s.model, s.tokens
    H, I, E, k, dt = m.hidden_size, m.expert_intermediate_size, m.num_experts, m.experts_per_token, ap.moe_dt
    S = T * k
    targets = F.expert_targets(m, s.plan)
    saved = (ap.first_layer_bytes if i == 0 else ap.layer_bytes) - ap.moe_tail
    arriving = r(T * H * ap.stream_dt) + _shared_input_grad(s)
    down_w = r(E * H * I * dt) if "down" in targets else 0
    down = s.moment("experts_backward", i, lb.grads, lb.fixed + saved - ap.moe_late, 0,
                    arriving + r(S * H * dt) + r(S * ap.moe_sw_dt) + r(S * I * dt) + down_w)
    ad = s.plan.precision.adapter
    down_lora = (r(ad * s.plan.lora_r * E * I) + r(ad * H * s.plan.lora_r * E)) if "down" in targets else 0
    gu_w = r(E * 2 * I * H * dt) if "gate_up" in targets else 0
    act = s.moment("experts_act_backward", i, lb.grads + down_lora, lb.fixed + saved - ap.moe_late - ap.moe_mid, 0,
                   arriving + 3 * r(S * I * dt))
    gate_up = s.moment("experts_gate_up_backward", i, lb.grads + down_lora,
                       lb.fixed + saved - ap.moe_late - ap.moe_mid - ap.moe_act, 0,
                       arriving + r(S * 2 * I * dt) + r(S * H * dt) + gu_w)
    return down, act, gate_up


def _plus(m: Moment, activations: int = 0, temporaries: int = 0) -> Moment:
    return m._replace(allocated_bytes=m.allocated_bytes + activations + temporaries,
                      activations=m.activations + activations, temporaries=m.temporaries + temporaries)


def llama4_backward_moments(s: Step, lb: LayerBackward) -> list[Moment]:
    """Layer i's Llama4TextMoe backward, at the instants measured with the tracker on real CPU steps.

    The sum over experts ran after the shared expert, so its backward runs first: the gradient of the
    experts' output (the arriving gradient cast to the experts' dtype, expanded to [E, T, H]) is in
    flight from then on, every saved tensor of the layer still alive (the first instant). Then:
    - the shared expert's down projection backward (4-bit: bitsandbytes MatMul4Bit.backward, as
      `dequant_backward_moment`): its LoRA saved tensors are released, its LoRA gradients not made yet;
      in flight the arriving gradient, its compute-dtype cast, the dequantized weight with its absmax
      and the input gradient [T, I];
    - NB the shared expert's MLP backward after it (`layer_backward_moment` for dense layers) is not
      a candidate: never the peak in the measured steps, its order of LoRA and base gradients unmeasured;
    - the routed experts' down bmm backward: the shared expert's saved set released; every routed
      saved tensor alive (the down weight's 16-bit copy too); in flight the arriving gradient, its
      cast, the [E, T, H] gradient and the input gradient [E, T, I] (the largest routed instant: the
      next ones release the weight copies, 6EHI bytes, before making at most 12ETH fp32);
    - the activation's backward (up * act_fn(gate) run backward): the down weight's copy and the
      stopped recompute's locals released, the shared expert's LoRA gradients made; three [E, T, I]
      gradients in flight with the arriving one and the shared expert's input gradient;
    - the score-scaled input's backward (`experts_input_backward`).
    With (non-reentrant) checkpointing the locals alive at the recompute's stop stay referenced
    through the layer's backward (`ActivationProfile.moe_stale`).
    """
    ap, r, m, T, d = s.ap, s.r, s.model, s.tokens, s.static.down
    H, I, E, dt = m.hidden_size, m.expert_intermediate_size, m.num_experts, ap.moe_dt
    cd = s.plan.precision.compute
    stale = ap.moe_stale if s.plan.gradient_checkpointing and not s.plan.use_reentrant else 0
    if stale and s.rng_state:  # CPU: the recompute's fork_rng snapshot is referenced with the stopped frames
        stale += s.rng_state
    arriving = r(T * H * ap.stream_dt)
    routed_grad = r(T * H * dt) + r(E * T * H * dt)
    saved_i = (ap.first_layer_bytes if lb.i == 0 else ap.layer_bytes) + (_nope(m, ap, lb.i, lb.i + 1) if lb.i else 0)
    out = [s.moment("moe_backward_start", lb.i, lb.grads, lb.fixed + saved_i + stale, 0, arriving + routed_grad)]
    if stale:
        stale -= ap.moe_stale_shared
    if d.w_grad:
        nb = -(-d.in_features * d.out_features // F.BNB_BLOCKSIZE)
        absmax = r(4 * nb) if s.plan.double_quant else 0
        cast = r(T * H * cd) if ap.down_out_dt != cd else 0
        if s.plan.device == "cpu":  # measured: the dequantized weight, its absmax and the input gradient alive
            out.append(s.moment("dequant", lb.i, lb.grads, lb.after_down + stale, 0,
                                arriving + cast + routed_grad + d.w_grad + absmax + r(T * d.in_features * cd),
                                "the input gradient made"))
        else:  # NB CUDA: taken as a dense layer's (checked against simulate only: never the peak there)
            out.append(_plus(dequant_backward_moment(s, lb), stale))
    saved = saved_i - ap.moe_tail
    if stale:  # the shared expert's product (down_proj's input) is released by its backward (measured)
        stale -= r(T * m.shared_expert_intermediate_size * ap.prod_dt)
    out.append(s.moment("dense_experts_backward", lb.i, lb.grads, lb.fixed + saved + stale, 0,
                        arriving + routed_grad + r(E * T * I * dt)))
    # the activation's backward: the down weight's copy released, and the locals of the stopped recompute
    # (measured); in flight the arriving gradient, the shared expert's input gradient [T, H] and three
    # [E, T, I] gradients; the shared expert's LoRA gradients made
    shared_lora = sum(F.lora_bytes(lin, s.plan, 512 if s.plan.device == "cuda" else 1)
                      for lin in F.lora_targets(m, s.plan) if ".shared_expert." in lin.name)
    out.append(s.moment("dense_experts_act_backward", lb.i, lb.grads + shared_lora,
                        lb.fixed + saved - ap.moe_mid, 0, arriving + r(T * H * ap.stream_dt) + 3 * r(E * T * I * dt)))
    out.append(s.moment("experts_input_backward", lb.i, lb.grads,
                        lb.fixed + saved + stale - ap.moe_late - ap.moe_mid - ap.moe_act, 0,
                        arriving + 3 * r(E * T * H * 4)))
    return out


def optimizer_moment(s: Step) -> Moment:
    """optimizer.step(): every gradient plus the optimizer's scratch."""
    return s.moment("optimizer", None, s.static.gradients, s.kept, 0, s.static.scratch)


def moments(s: Step) -> tuple[Moment, ...]:
    """Every candidate peak, in step order. Per-layer sizes are equal, so layers are checked at the
    extremes: with checkpointing the last layer (every checkpoint below it) and the first (every
    gradient above it) bound the rest; without, the last layer (every other saved set below it)."""
    gc = s.plan.gradient_checkpointing
    four_bit, eager = s.static.down.w_grad, s.ap.probs_bytes  # whether those moments exist
    out = [] if gc else [forward_moment(s)]
    if s.plan.trainer == "sft":  # TRL's SFTTrainer: the fused, tiled LM head (memplan/fused_head.py)
        out += sft_head_moments(s)
    elif s.flce:  # Liger's fused linear cross-entropy replaces lm_head + loss
        out += [flce_forward_moment(s), flce_backward_moment(s)]
    else:
        out += [loss_forward_moment(s), loss_backward_moment(s)]
    last = s.model.num_layers - 1
    layers = [last, 0] if gc and last else [last]
    rope = s.model.layer_rope
    if rope and not rope[last] and any(rope[1:]):
        # Llama 4: a NoPE layer saves less than a RoPE one, so the last RoPE layer is checked too
        layers.insert(1, max(i for i in range(1, last + 1) if rope[i]))
    if s.layer_kind:  # mixed layers: the first and last layer of each kind, last first
        kinds = s.model.layer_kinds
        layers = sorted({i for k in set(kinds) for i in (kinds.index(k), last - kinds[::-1].index(k))},
                        reverse=True)
    for i in dict.fromkeys(layers):
        first_i = len(out)
        s_i = s
        s = _kind_step(s_i, i)
        lb = layer_backward_state(s, i)
        if gc:
            out.append(recompute_moment(s, lb))
        if s.model.arch.post_norms:
            out.append(post_norm_backward_moment(s, lb))
        if s.model.is_moe and s.model.arch.moe.router_kind == "sigmoid_input_scale":
            out += llama4_backward_moments(s, lb)
        elif s.model.is_moe:
            out += [experts_unpermute_moment(s, lb), *experts_backward_moments(s, lb)]
        else:
            if four_bit:
                out.append(dequant_backward_moment(s, lb))
            out.append(layer_backward_moment(s, lb))
        if eager:
            out.append(attention_backward_moment(s, lb))
        elif s.plan.attn_implementation == "flash_attention_2":
            out.append(flash_attention_backward_moment(s, lb))
        elif s.model.mla is not None:
            mla = mla_attention_backward_moment(s, lb)
            if mla is not None:
                out.append(mla)
        if gc and s.ap.nograd_saved:
            # the recomputed layer's tensors made with grad mode off are temporaries for the tracker
            x = s.ap.nograd_saved
            out[first_i:] = [m if m.kind == "recompute" else _plus(m, -x, x) for m in out[first_i:]]
        s = s_i
    out.append(optimizer_moment(s))
    return tuple(out)


# ---- the estimate ----------------------------------------------------------------------------------

def check_plan(model: ModelSpec, plan: TrainPlan) -> tuple[TrainPlan, list[str]]:
    """What the HF stack would refuse or change before a step runs: the plan actually run, and notes
    (each change the plan needs is said in a note)."""
    changes, notes = _plan_checks(model, plan, False)
    chunk = model.attention_chunk_size
    if chunk and plan.seq_len >= chunk:
        raise UnsupportedArchitectureError(
            f"{model.name}: seq_len {plan.seq_len} reaches attention_chunk_size {chunk}, where the chunked "
            f"layers get a block-diagonal mask the closed form does not model; `memplan simulate {model.name}` "
            "traces it exactly")
    return (plan.replace(**dict(changes)) if changes else plan), list(notes) + _packing_notes(plan) + _flash_notes(plan)


#: said on every FlashAttention-2 estimate (and simulate result)
FLASH_NOTE = ("FlashAttention-2 kernels are CUDA-only: modelled from flash-attn's source, checked against simulate's "
              "emulation, not yet on hardware (terms: activations, temporaries)")


def _flash_notes(plan: TrainPlan) -> list[str]:
    if plan.attn_implementation != "flash_attention_2":
        return []
    notes = [FLASH_NOTE]
    if plan.padding != "none":
        notes.append("flash_attention_2 with a padded batch: transformers unpads q/k/v by the attention_mask (index "
                     "copies of the real tokens) and pads the output back; not modelled: estimated as the unpadded "
                     "fixed-length kernel")
    if flash_varlen(packed_rows(plan)):
        notes.append("FlashAttention-2 varlen (one packed row): its backward workspace grows by 128 rows per sequence; "
                     f"assumed {2 * plan.batch_size} sequences (two per row of seq_len)")
    elif plan.packing:
        notes.append("packing with batch_size > 1 and flash_attention_2: transformers 5.24 runs the varlen kernel only "
                     "for a batch of one row (_is_packed_sequence), so each packed row runs the fixed-length kernel "
                     "(sequences attend across their boundaries); use --padding-free for the varlen path")
    return notes


@shape_free_cache()
def _plan_checks(model: ModelSpec, plan: TrainPlan, _unused: bool) -> tuple[tuple[tuple[str, Any], ...],
                                                                           tuple[str, ...]]:
    """check_plan's shape-free work, cached: (the plan fields to change, notes). Raises what the HF
    stack would refuse and no plan edit can fix (errors are not cached)."""
    notes: list[str] = []
    changes: dict[str, Any] = {}
    moe_names = {v4 for v4, _ in model.arch.moe.peft_names} if model.is_moe else set()
    if plan.method in ("qlora", "lora") and plan.target_modules != "all-linear":
        lins = model.layer_linears + model.vision_linears  # peft matches the vision tower's Linears too
        leaves = {lin.name.rsplit(".", 1)[-1] for lin in lins} | moe_names
        unknown = [t for t in plan.target_modules if t not in leaves and all(lin.name != t for lin in lins)]
        if unknown and len(unknown) == len(plan.target_modules):  # peft raises when nothing matches
            raise InvalidSpecError("plan", [
                f"--target-modules {','.join(unknown)}: no such Linear in {model.name} (peft would raise); "
                f"its Linears are {','.join(sorted(leaves))}, or use all-linear"])
        if unknown:
            notes.append(f"--target-modules {','.join(unknown)} match no Linear in {model.name} (peft ignores them)")
    if model.is_moe:
        if model.router_aux_loss:
            raise UnsupportedArchitectureError(
                f"the closed form does not cover the router load-balancing loss (output_router_logits in "
                f"{model.name}'s config: every layer's router logits kept, a one-hot over layers x tokens x top_k "
                f"x experts); `memplan simulate {model.name}` traces it exactly, or set output_router_logits false")
        if model.arch.moe.activation == "clamped_swiglu" and plan.method == "full":
            raise UnsupportedArchitectureError(
                f"the closed form walks {model.name}'s experts frozen (peft wraps none); full fine-tuning trains "
                f"them: `memplan simulate {model.name}` traces it exactly")
        notes += (_llama4_checks if model.arch.moe.router_kind == "sigmoid_input_scale" else _moe_checks)(
            model, plan, changes)
    notes += _liger_checks(model, plan)
    if model.attention_dropout:
        notes.append(f"the config sets attention_dropout {model.attention_dropout:g}, which the closed form does not "
                     "model: on the CPU, SDPA then runs its math kernel and keeps [batch x heads x seq x seq] "
                     "tensors per layer (measured: about 15 B per element); not checked on CUDA. Set it to 0 for the "
                     "estimate to apply, or trace the step with `memplan simulate`")
    if model.mla is not None and plan.attn_implementation != "sdpa":
        raise UnsupportedArchitectureError(
            f"the closed form walks {model.name}'s multi-head latent attention through SDPA only "
            f"(--attn-implementation {plan.attn_implementation} not modelled); `memplan simulate {model.name}` "
            "traces it exactly")
    if offloads(plan) and liger_kernels(model.model_type, plan.use_liger_kernel, plan.liger_kernel_config):
        # NB: simulate's trace of the combination records no host copies (Liger's patched modules and the
        # offloading hooks are not yet traced together): refused rather than guessed
        raise InvalidSpecError("plan", [
            "Liger kernels (--use-liger-kernel) together with --activation-offloading or --checkpoint-offload are "
            "not modelled yet (neither closed form nor simulate); estimate each technique on its own"])
    if plan.trainer == "sft" and (plan.activation_offloading or plan.checkpoint_offload):
        raise UnsupportedArchitectureError(
            "the closed form does not yet combine TRL's fused LM head (--trainer sft) with activation or "
            f"checkpoint offloading; `memplan simulate {model.name}` traces the combination exactly (the estimate "
            "falls back to it), or estimate each technique with --trainer trainer")
    if plan.checkpoint_offload and not plan.use_reentrant and not plan.activation_offloading:
        changes["use_reentrant"] = True
        notes.append("checkpoint offload (axolotl gradient_checkpointing: offload) runs each layer in a "
                     "reentrant-style autograd.Function (Unsloth_Offloaded_Gradient_Checkpointer: the whole layer "
                     "recomputed in backward): estimated as reentrant checkpointing with the layers' inputs in host "
                     "memory; modelled from axolotl's source, not checked on a real step (its backward needs CUDA)")
    if plan.activation_offloading and plan.device == "cpu":
        notes.append("TRL 1.16's OffloadActivations needs an accelerator (torch.accelerator.current_accelerator() "
                     "is None on a CPU-only machine and its constructor fails): the CPU step is estimated as the "
                     "hooks split saved tensors on an accelerator, the host copies counted as host memory")
    if plan.activation_offloading and plan.gradient_checkpointing and plan.use_reentrant:
        notes.append("activation offloading with reentrant checkpointing: the recomputed layers' saved tensors "
                     "also pass through the offloading hooks in backward; the closed form counts only the "
                     "layers' inputs (non-reentrant rules), `memplan simulate` traces it")
    eager = not model.arch.sdpa and plan.attn_implementation == "sdpa"
    if eager:
        changes["attn_implementation"] = "eager"
        why = "attention sinks" if model.arch.attention_sinks else "soft-capping"
        notes.append(f"{model.model_type} has no SDPA attention in {TRANSFORMERS} ({why}): estimated "
                     "with eager, which from_pretrained picks; pass --attn-implementation flash_attention_2 if "
                     "you use it")
    if model.arch.attention_sinks and changes.get("attn_implementation", plan.attn_implementation) != "eager":
        raise UnsupportedArchitectureError(
            f"the closed form covers {model.name}'s eager attention with sinks only: `memplan simulate "
            f"{model.name}` traces {plan.attn_implementation}")
    return tuple(changes.items()), tuple(notes)


def _liger_checks(model: ModelSpec, plan: TrainPlan) -> list[str]:
    """`use_liger_kernel`: which kernels Liger applies to this family (memplan/liger.py), the notes that
    say so, and what the closed form does not walk (raised: `estimate()` falls back to simulate)."""
    if not plan.use_liger_kernel:
        return []
    from .liger import LAYER_KERNELS, LIGER_DEFAULTS, REFUSED, WALKED_FAMILIES

    if model.model_type not in LIGER_DEFAULTS:
        return [f"use_liger_kernel: liger-kernel {RECIPE_VERSIONS['liger-kernel']} has no kernels for "
                f"{model.model_type} (_apply_liger_kernel_to_instance applies none): estimated unchanged"]
    on = liger_kernels(model.model_type, True, plan.liger_kernel_config)
    refused = sorted(k for k in on if (model.model_type, k) in REFUSED)
    if refused:
        raise InvalidSpecError("plan", [
            f"--liger-kernels {refused[0]}: liger-kernel {RECIPE_VERSIONS['liger-kernel']} refuses it for "
            f"{model.model_type} (apply_liger_kernel_to_{model.model_type} raises NotImplementedError); switch it off "
            f"(e.g. --liger-kernels {','.join(sorted(on - set(refused))) or 'rms_norm'})"])
    if not on:
        return ["use_liger_kernel with every kernel switched off (liger_kernel_config): estimated unchanged"]
    if "cross_entropy" in on:
        raise UnsupportedArchitectureError(
            "the closed form does not model Liger's cross_entropy kernel (on materialized logits); `memplan "
            f"simulate {model.name}` traces it, or use fused_linear_cross_entropy")
    layer = sorted(on & LAYER_KERNELS)
    if layer and model.model_type not in WALKED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"the closed form walks Liger's layer kernels ({', '.join(layer)}) for {', '.join(sorted(WALKED_FAMILIES))} "
            f"only; `memplan simulate {model.name}` traces {model.model_type}'s exactly, or keep only "
            "fused_linear_cross_entropy (--liger-kernels fused_linear_cross_entropy)")
    return [f"Liger kernels on ({', '.join(sorted(on))}; liger-kernel {RECIPE_VERSIONS['liger-kernel']}, as the HF "
            "Trainer applies them)",
            "Liger's kernels are Triton (GPU only): the logits / activations terms with use_liger_kernel are modelled "
            f"from liger-kernel {RECIPE_VERSIONS['liger-kernel']}'s source and checked against simulate's emulation, "
            "not yet on hardware"]


def _packing_notes(plan: TrainPlan) -> list[str]:
    """What a packed or padding-free plan assumes (activations.packed_rows), and what TRL 1.16 does
    not check: it documents padding_free for FlashAttention-2/3 but neither warns nor refuses it with
    SDPA or eager (trl/trainer/sft_trainer.py SFTTrainer.__init__), where transformers then builds a
    block-diagonal mask over the whole flattened row."""
    if not (plan.packing or plan.padding_free):
        return []
    rows = (f"one flattened row of batch_size x seq_len = {plan.tokens} tokens" if plan.padding_free
            else f"{plan.batch_size} row(s) of {plan.seq_len} tokens")
    notes = [f"{'padding-free' if plan.padding_free else 'packed'} batch: {rows}, position ids restarting per "
             "sequence, no attention_mask; assumed full (every row packed to seq_len) and holding two or more "
             "sequences -- memory depends on the row shape, not on where the sequence boundaries fall "
             "(checked on real CPU steps)"]
    attn = plan.attn_implementation
    if attn in ("sdpa", "eager"):
        S = plan.tokens if plan.padding_free else plan.seq_len
        B = 1 if plan.padding_free else plan.batch_size
        notes.append(f"{attn} with packed sequences: transformers builds a block-diagonal [{B}, 1, {S}, {S}] mask "
                     "(masking_utils.find_packed_sequence_indices) and each layer keeps its additive float copy "
                     "(quadratic in the row length); --attn-implementation flash_attention_2 runs varlen without one"
                     + ("; TRL documents padding_free for FlashAttention-2/3 only, but neither warns nor refuses "
                        "it with " + attn if plan.padding_free else ""))
    return notes


#: plan fields the real stack forces for a model (`_moe_checks`), as the flags that set them
REQUIRED_FLAGS: dict[str, Callable[[Any], str]] = {
    "lora_dropout": lambda v: f"--lora-dropout {v:g}",
    "prepare": lambda v: "--prepare" if v else "--no-prepare",
    "target_modules": lambda v: "--target-modules " + (v if isinstance(v, str) else ",".join(v)),
}


def required_changes(model: ModelSpec, plan: TrainPlan) -> tuple[TrainPlan, str]:
    """The plan the real stack runs instead of `plan` where it refuses `plan` as given (peft's
    ParamWrapper and dropout, grouped_mm and fp32 experts, ...), and the flags that make it so ("" when
    `plan` runs as given). Automatic switches (eager attention where a family has no SDPA) are not
    requirements. Architectures without a closed form: `plan`, "" (simulate finds out)."""
    try:
        resolved, _ = check_plan(model, plan)
    except UnsupportedArchitectureError:
        return plan, ""
    diff = {k: getattr(resolved, k) for k in REQUIRED_FLAGS if getattr(resolved, k) != getattr(plan, k)}
    if not diff:
        return plan, ""
    return plan.replace(**diff), " ".join(REQUIRED_FLAGS[k](v) for k, v in diff.items())


def _moe_checks(model: ModelSpec, plan: TrainPlan, changes: dict[str, Any]) -> list[str]:
    """Mixture-of-experts: what is quantized and what is not, and the recipe changes the real stack
    forces (each one a plan change and a note). Refusals with no plan fix raise."""
    moe = model.arch.moe
    notes = []
    E, I, H = model.num_experts, model.expert_intermediate_size, model.hidden_size
    experts = E * 3 * I * H * model.num_moe_layers
    if plan.method in ("qlora", "lora") and plan.target_modules != "all-linear":
        # the v4 Linears fused into gate_up_proj must be targeted together (peft raises otherwise)
        names = [v4 for v4, p in moe.peft_names if p == "gate_up"]
        hit = [v for v in names if v in plan.target_modules]
        if hit and len(hit) < len(names):
            raise InvalidSpecError("plan", [
                f"--target-modules {','.join(hit)} without {','.join(n for n in names if n not in hit)}: peft "
                f"{MODELED_PEFT} cannot adapt one of them, they are fused into gate_up_proj (it raises); "
                f"target {','.join(names)} together"])
    cuda = plan.device == "cuda"
    experts_dt = plan.precision.params
    if cuda and experts_dt == 4:
        if plan.prepare and plan.precision.load != 4:
            changes["prepare"] = False
            notes.append("grouped_mm on CUDA takes bf16 experts only, and prepare_model_for_kbit_training upcasts "
                         "them to fp32 (the step fails in torch's grouped_mm): estimated without prepare "
                         "(--no-prepare), which the run must use; or load with experts_implementation='eager'")
        else:
            raise InvalidSpecError("plan", [
                f"the experts of {model.name} would be fp32 (--dtype fp32), which grouped_mm on CUDA refuses "
                "(bf16 only): use --dtype bf16"])
    if plan.method == "qlora":
        kept = ("fp32 (prepare_model_for_kbit_training upcasts them)" if changes.get("prepare", plan.prepare)
                else "in the load dtype")
        if moe.expert_bias:  # gpt_oss: the experts' and router's biases, the attention sinks too
            notes.append(f"{model.model_type}: the fused experts ({experts / 1e9:.1f}B parameters, 3-D tensors) "
                         f"with their biases, the routers (weight and bias) and the attention sinks are not "
                         f"nn.Linear, so bitsandbytes leaves them {kept}; only q/k/v/o_proj are 4-bit (their "
                         "biases stay 16-bit), and peft's all-linear adapts only those (no expert is wrapped)")
            notes.append(f"{model.model_type}: the hub checkpoints are MXFP4 (quantization_config mxfp4), which "
                         "from_pretrained refuses to combine with BitsAndBytesConfig (ValueError); load a bf16 "
                         "copy (dequantized with Mxfp4Config(dequantize=True) and saved): estimated with bf16 "
                         "experts")
        else:
            four = "the attention projections"
            if moe.shared_experts_key or model.layer_kinds:
                four += (", the shared experts" if moe.shared_experts_key else "") + \
                    (" and the dense layers' MLP" if model.layer_kinds else "")
            notes.append(f"{model.model_type}: the fused experts ({experts / 1e9:.1f}B parameters, 3-D tensors) and "
                         f"the routers are not nn.Linear, so bitsandbytes leaves them {kept}; only {four} are 4-bit")
            if moe.router_fp32:
                notes.append("the router weights (and any e_score_correction_bias buffer) are fp32 from construction "
                             "(_keep_in_fp32_modules_strict)")
        if moe.peft_names and plan.method in ("qlora", "lora") and (moe.shared_experts_key or model.layer_kinds):
            notes.append(f"peft {MODELED_PEFT} moves gate_proj/up_proj/down_proj to the fused experts: the shared "
                         "experts' and the dense layers' MLP Linears get no LoRA")
        if model.arch.hub_quantized and plan.method == "qlora":
            notes.append(f"the hub {model.model_type} checkpoints (DeepSeek-V3/R1) are {model.arch.hub_quantized} "
                         f"(their quantization_config): from_pretrained with a BitsAndBytesConfig refuses them "
                         "(ValueError); load a bf16 copy")
    targets = F.expert_targets(model, plan)
    if targets:
        parts = ", ".join(f"{p}{'_proj' if p != 'router' else ''}" for p in sorted(targets))
        notes.append(f"peft wraps the {parts} parameters (lora.ParamWrapper): each expert gets its own rank-"
                     f"{plan.lora_r} adapter (gate_up_proj rank {2 * plan.lora_r}: two fused Linears), and the "
                     "merged expert weights are materialized in every forward (saved for backward)")
        if plan.lora_dropout:
            changes["lora_dropout"] = 0.0
            notes.append(f"peft {MODELED_PEFT} refuses lora_dropout {plan.lora_dropout} on fused experts "
                         "(lora.ParamWrapper raises ValueError): estimated with --lora-dropout 0, which the run "
                         "must use")
    return notes


def _llama4_checks(model: ModelSpec, plan: TrainPlan, changes: dict[str, Any]) -> list[str]:
    """Llama 4 (Llama4TextMoe): what is 4-bit and what is not, and the recipe change the real stack
    forces: peft's all-linear (or a list naming `router`) wraps Llama4Router, an nn.Linear subclass
    that returns a tuple, and peft's forward then fails ("'tuple' object has no attribute 'dtype'",
    tests/test_simulate_llama4.py): the plan targets the Linears minus the router instead."""
    notes = []
    E, I, H = model.num_experts, model.expert_intermediate_size, model.hidden_size
    experts = E * 3 * I * H * model.num_moe_layers
    if plan.method in ("qlora", "lora"):
        leaves = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                  if any(lin.name.endswith("." + n) for lin in model.layer_linears + model.dense_layer_linears)]
        if plan.target_modules == "all-linear" or "router" in plan.target_modules:
            rest = tuple(leaves) if plan.target_modules == "all-linear" else tuple(
                t for t in plan.target_modules if t != "router")
            if not rest:
                raise InvalidSpecError("plan", [
                    f"--target-modules router: peft wraps Llama4Router (an nn.Linear subclass returning a tuple) "
                    f"and the step fails in peft {MODELED_PEFT}'s forward; target {','.join(leaves)}"])
            changes["target_modules"] = rest
            notes.append(f"peft {MODELED_PEFT} wraps Llama4Router (an nn.Linear subclass returning a tuple) when "
                         f"targeted ({'all-linear does' if plan.target_modules == 'all-linear' else 'router'}) "
                         "and the step fails (AttributeError: 'tuple' object has no attribute 'dtype'): estimated "
                         f"with --target-modules {','.join(rest)}, which the run must use")
    if plan.method == "qlora":
        kept = "fp32 (prepare_model_for_kbit_training upcasts them)" if plan.prepare else "in the load dtype"
        notes.append(f"{model.model_type}: 4-bit are the attention projections and the shared expert's gate/up/"
                     f"down_proj{' and the dense layers MLPs' if model.layer_kinds else ''}; the routed experts "
                     f"({experts / 1e9:.1f}B parameters, 3-D nn.Parameter) and the routers (Llama4Router subclasses "
                     f"nn.Linear; bitsandbytes replaces `type(m) is nn.Linear` only) stay {kept}")
    notes.append("Llama 4 experts run as two bmm over every expert and all tokens (the sigmoid router scores, 0 "
                 "outside the top-k, scale the input; no grouped_mm): memory does not depend on the routing"
                 + ("; under autocast each forward saves bf16 copies of the fp32 experts (--no-prepare keeps "
                    "them 16-bit: half the experts' bytes, no copies)" if plan.prepare and plan.method == "qlora"
                    else ""))
    return notes


def compute(model: ModelSpec, plan: TrainPlan, gpu: GPUSpec | None = None) -> Estimate:
    """The estimate for a resolved model and plan (the pure core behind `estimate`): every moment of
    the step, the peak is the largest. A distributed plan: per rank (memplan.distributed)."""
    if plan.is_distributed:
        from .distributed import compute_distributed

        return compute_distributed(model, plan, gpu)
    plan, notes = check_plan(model, plan)
    cuda = plan.device == "cuda"
    # padding-free: the one flattened row the model sees; runtime.step.packed_batch: two sequences per row
    step = make_step(model, packed_rows(plan), cuda, 2 * plan.batch_size)
    ms = moments(step)
    hosts: list[dict[str, int]] = [{}] * len(ms)
    if offloads(plan):
        ms, hosts = zip(*(offload_split(step, m) for m in ms))
        notes.append(OFFLOAD_NOTE)
    alloc = [m.allocated_bytes for m in ms]
    peak = ms[alloc.index(max(alloc))]  # the first in step order on a tie
    terms = peak.terms
    terms[Term.WORKSPACE] = 0
    notes.append(f"peak: {peak.description}")
    paged = 0
    if cuda:
        cuda_overheads(terms, gpu, max(alloc))
        ws = terms[Term.WORKSPACE]
        totals = {m.name: a + ws for m, a in zip(ms, alloc)}
        if gpu is None:
            notes.append("no --gpu given: CUDA context, workspace and allocator overhead use generic defaults")
        paged = step.static.paged
    else:
        terms[Term.ALLOCATOR_OVERHEAD] = terms[Term.CUDA_CONTEXT] = 0
        totals = {m.name: a for m, a in zip(ms, alloc)}
    notes += _static_notes(model, plan, cuda)
    if model.max_position_embeddings and plan.seq_len > model.max_position_embeddings:
        notes.append(f"seq_len {plan.seq_len} is longer than the model's max_position_embeddings "
                     f"{model.max_position_embeddings}")
    notes += gpu_notes(gpu, plan)
    most = max(range(len(ms)), key=lambda i: sum(hosts[i].values()))
    if sum(hosts[most].values()) > sum(hosts[alloc.index(max(alloc))].values()):
        notes.append(f"host RAM peaks at {sum(hosts[most].values()) / 2**30:.2f} GiB during {ms[most].name}, "
                     "before the device peak (`host` is what the host holds at the device peak)")
    return Estimate(model=model, plan=plan, terms=terms, peak_phase=peak.phase, paged_bytes=paged, gpu=gpu,
                    notes=tuple(notes), phase_peaks=totals, moment=peak.name, moments=tuple(ms),
                    host=dict(hosts[alloc.index(max(alloc))]))


@shape_free_cache()
def _static_notes(model: ModelSpec, plan: TrainPlan, cuda: bool) -> tuple[str, ...]:
    """The notes that depend on neither the shape nor the GPU (cached)."""
    notes = []
    if cuda and static_part(model, plan, cuda).paged:
        notes.append("paged optimizer: state of tensors with >= 100,000 elements lives in CUDA managed memory "
                     "(paged_bytes), outside torch's allocator; NVML counts it when resident")
    if plan.prepare and plan.method != "full":
        notes.append("prepare_model_for_kbit_training upcasts embeddings, norms and lm_head to fp32")
    if plan.trainer == "sft":
        notes.append("trainer sft: TRL 1.16 SFTTrainer's fused LM head (trl.trainer.utils.add_fused_lm_head): the "
                     "[tokens x vocab] logits are never built; one [min(tokens, 4096) x 32768] projection buffer "
                     "and the fp32 gradient of the hidden states instead"
                     + ("; on CUDA its Triton fold kernels (trl/kernels/chunked_logprob.py) are modelled as "
                        "allocating nothing: the logits and temporaries terms of the loss stage are not yet "
                        "checked on hardware" if cuda else ""))
    if model.unloaded_vision_params:
        notes.append(f"{model.name}: AutoModelForCausalLM (a text QLoRA script's loader, and memplan's) builds "
                     "Llama4ForCausalLM and does not load the checkpoint's vision tower and projector "
                     f"({model.unloaded_vision_params:,} params): estimated without them")
    if model.vision_params:
        notes.append(f"multimodal checkpoint: its vision tower and projector ({model.vision_params:,} params) are "
                     "loaded (Linears quantized like the text tower's) and LoRA-wrapped by all-linear, but a "
                     "text-only step never runs them: no activations, gradients or optimizer state for them")
    return tuple(notes)


def cuda_overheads(terms: dict[Term, int], gpu: GPUSpec | None, allocated: int | None = None) -> None:
    """Workspace, allocator overhead and CUDA context, from the GPU's calibrated overheads (in place).
    `allocated`: the allocated terms' sum without the workspace, when the caller has it."""
    g = gpu or GENERIC_GPU
    ws = terms[Term.WORKSPACE] = 2 * g.workspace_bytes  # one cuBLAS workspace per handle: forward + autograd thread
    if allocated is None:
        allocated = sum(terms[t] for t in ALLOCATED_TERMS if t != Term.WORKSPACE)
    terms[Term.ALLOCATOR_OVERHEAD] = int((allocated + ws) * g.reserve_ratio)
    terms[Term.CUDA_CONTEXT] = g.cuda_context_bytes


#: GPUSpec's default overheads, for a CUDA estimate without a named GPU
GENERIC_GPU = GPUSpec(name="generic", memory_bytes=0)


def estimate(model: str | ModelSpec | Any = None, plan: TrainPlan | None = None, *,
             gpu: str | GPUSpec | None = None, bnb_config: Any = None, lora_config: Any = None,
             training_args: Any = None, config: Any = None, fallback_simulate: bool = True,
             **plan_kwargs: Any) -> Estimate:
    """Estimate the peak memory of one training step.

    `model`: a catalogue name, hub id, local path, ModelSpec, config.json dict or PretrainedConfig.
    Plan fields come from `plan`, the user's HF objects (`bnb_config`, `lora_config`,
    `training_args`) and keyword arguments (which win), e.g. `estimate("llama-2-7b", seq_len=4096)`.
    Where the closed form does not cover the architecture (mixture-of-experts) and the [sim] extras
    are installed, the terms come from `memplan.simulate` instead and the notes say so
    (`fallback_simulate=False` raises UnsupportedArchitectureError instead).
    A `training_args` with `use_cpu=True` together with `gpu=` contradict each other: the GPU wins
    (the step is estimated on cuda) and the notes say so; `device="cpu"` (a keyword or the `plan`'s
    own field) estimates the CPU step.
    `config`: a training config file (axolotl YAML, TRL SFTConfig or TrainingArguments JSON/YAML; see
    `memplan.integrations.configs.read_config`): its plan fields under the objects and keyword
    arguments, its model when `model` is None, its notes (what memplan does not model) in the notes.
    """
    from dataclasses import replace as _replace

    from .plan import gpu_over_use_cpu

    model, config, config_notes = with_config(model, config)
    spec = resolve_model(model)
    p = plan_from(plan, bnb_config=bnb_config, lora_config=lora_config, training_args=training_args,
                  config=config, **plan_kwargs)
    g = load_gpu(gpu) if gpu is not None else None
    p, device_note = gpu_over_use_cpu(p, plan, training_args, plan_kwargs, g.name if g else None)
    try:
        est = compute(spec, p, g)
    except UnsupportedArchitectureError as e:
        if not fallback_simulate or not _sim_available() or p.is_distributed:  # simulate traces one device
            raise
        fixes: list[str] = []
        if spec.is_moe and spec.arch.moe.router_is_linear_subclass:  # Llama 4 Maverick: the recipe that runs
            changes: dict[str, Any] = {}
            fixes = _llama4_checks(spec, p, changes)[:1] if changes or p.target_modules == "all-linear" else []
            p = p.replace(**changes) if changes else p
        est = from_simulation(spec, p, g, reason=str(e))
        est = _replace(est, notes=(*fixes, *est.notes)) if fixes else est
    front = ((device_note,) if device_note else ()) + config_notes
    return _replace(est, notes=(*front, *est.notes)) if front else est


def with_config(model: Any, config: Any) -> tuple[Any, Any, tuple[str, ...]]:
    """(model, the config file read once, its notes): the model the file names when `model` is None."""
    if config is None:
        if model is None:
            raise MemplanError("give a model (a catalogue name, hub id or config.json path)")
        return model, None, ()
    from .integrations.configs import read_config

    read = read_config(config)
    if model is None:
        if not read.model:
            raise MemplanError(f"the config file {read.path} names no model (base_model / model_name_or_path); "
                               "give MODEL")
        model = read.model
    return model, read, read.notes


def _sim_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft", "bitsandbytes"))


def from_simulation(model: ModelSpec, plan: TrainPlan, gpu: GPUSpec | None = None, reason: str = "") -> Estimate:
    """An Estimate whose allocated terms come from `memplan.simulate` (a meta-device trace of the step).

    Used where the closed form does not cover an architecture; the CUDA overheads (workspace,
    allocator overhead, context) are added as in `compute`, and the notes say so.
    """
    from .simulate import simulate

    res = simulate(dict(model.config), plan)
    terms = {t: int(res.terms.get(t.value, 0)) for t in Term}
    notes = [f"closed form unavailable ({reason.split(';')[0]}): terms are an exact `memplan simulate` trace",
             *res.notes, *gpu_notes(gpu, plan)]
    if plan.device == "cuda":
        cuda_overheads(terms, gpu)
    return Estimate(model=model, plan=plan, terms=terms, peak_phase=res.peak_phase, paged_bytes=res.paged_bytes,
                    gpu=gpu, notes=tuple(notes), phase_peaks=dict(res.phase_peaks), moment="simulate",
                    host=dict(getattr(res, "host", None) or {}))
