"""estimate: every Term at the peak of a steady-state training step, in closed form.

The peak is the largest of a few candidate moments ("moments", in step order), each built from the
per-term functions in `formulas` and the symbolic layer walk in `activations`:

- ``forward``: the last layer's forward with every earlier layer's activations saved (no checkpointing);
- ``loss:forward``: every saved activation plus bf16 logits, their fp32 copy and the log-softmax
  (10 T V bytes), autocast's cache of bf16 LoRA weight copies, the final norm's output;
- ``loss:backward``: log-softmax output + its gradient + the logits gradient (12 T V bytes);
- ``recompute:i`` (checkpointing): layer i recomputed up to its last saved tensor (torch's
  non-reentrant early stop), with the checkpoint inputs of layers below it and the gradients of
  the layers above it;
- ``backward:i``: layer i's MLP backward: the down projection's saved tensors released, three
  [T x I] gradients in flight;
- ``optimizer``: every gradient plus the optimizer's scratch.
i is the last and the first layer (per-layer sizes are equal, so the extremes bound the rest).
Gradient accumulation keeps every gradient alive through the later micro-batches.

Measured agreement (tests/test_agreement_cpu.py, tests/test_agreement_sim.py): median 0.000 %, max
0.55 % of peak bytes against real CPU steps; max 0.12 % against `simulate` on real catalogue shapes.

Known limitations (NB):
- mixture-of-experts models have no closed form (fused experts wrapped by peft, routing):
  `estimate()` falls back to `simulate` and says so;
- CUDA: activation tensors inside a layer are not rounded to 512 B (each < 512 B off); the context,
  workspace and allocator-overhead defaults in profiles/gpus are not yet calibrated on hardware;
  flash-attention backward workspaces and cuBLAS workspaces other than the two handles are not counted;
- the gradients in flight while a layer recomputes are measured on CPU steps, not derived;
- sequences are unpadded (no attention mask), as in the synthetic batches of `profile`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from . import formulas as F
from .activations import activation_profile
from .gpu import GPUSpec
from .model import ModelSpec
from .optim import OPTIMIZERS
from .plan import TrainPlan, plan_from
from .terms import ALLOCATED_TERMS, Term
from .units import round_up

SCHEMA = "memplan.estimate/1"


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
    moments: dict[str, dict[Term, int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def allocated_bytes(self) -> int:
        return sum(self.terms[t] for t in ALLOCATED_TERMS)

    @property
    def reserved_bytes(self) -> int:
        return self.allocated_bytes + self.terms[Term.ALLOCATOR_OVERHEAD]

    @property
    def device_bytes(self) -> int:
        return self.reserved_bytes + self.terms[Term.CUDA_CONTEXT]

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.gpu is None else self.gpu.memory_bytes - self.device_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.device_bytes <= self.gpu.memory_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model.to_dict(),
            "plan": self.plan.to_dict(),
            "device": self.plan.device,
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "terms": {str(t): int(v) for t, v in self.terms.items()},
            "peak": {"phase": self.peak_phase, "moment": self.moment, "allocated_bytes": self.allocated_bytes,
                     "reserved_bytes": self.reserved_bytes, "device_bytes": self.device_bytes},
            "phase_peaks": dict(self.phase_peaks),
            "paged_bytes": self.paged_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "versions": dict(F.MODELED_VERSIONS),
            "notes": list(self.notes),
        }


_TERM = {t.value: t for t in Term}


def _moment(static: dict[Term, int], **extra: int) -> dict[Term, int]:
    out = dict(static)
    for k, v in extra.items():
        t = _TERM[k]
        out[t] += v
    return out


def compute(model: ModelSpec, plan: TrainPlan, gpu: GPUSpec | None = None) -> Estimate:
    """The estimate for a resolved model and plan (the pure core behind `estimate`)."""
    cuda = plan.device == "cuda"
    r = (lambda n: round_up(n, 512) if n else 0) if cuda else (lambda n: n)  # noqa: E731
    notes: list[str] = []
    T, V, H, L = plan.tokens, model.vocab_size, model.hidden_size, model.num_layers
    if plan.method in ("qlora", "lora") and plan.target_modules != "all-linear":
        leaves = set(model.linear_leaves)
        unknown = [t for t in plan.target_modules
                   if t not in leaves and all(lin.name != t for lin in model.layer_linears)]
        if unknown and len(unknown) == len(plan.target_modules):  # peft raises when nothing matches
            from .errors import InvalidSpecError

            raise InvalidSpecError("plan", [
                f"--target-modules {','.join(unknown)}: no such Linear in {model.name} (peft would raise); "
                f"its Linears are {','.join(sorted(leaves))}, or use all-linear"])
        if unknown:
            notes.append(f"--target-modules {','.join(unknown)} match no Linear in {model.name} (peft ignores them)")
    if model.is_moe:
        from .errors import UnsupportedArchitectureError

        # transformers 5 fuses the experts into 3-D tensors that peft wraps (ParamWrapper, which merges
        # a per-expert LoRA delta in every forward) and routes tokens data-dependently: not closed-form.
        raise UnsupportedArchitectureError(
            f"the closed form does not cover mixture-of-experts models ({model.model_type}: fused experts "
            f"wrapped by peft, data-dependent routing); run `memplan simulate {model.name}` for an exact trace "
            "(peft 0.21 also needs --lora-dropout 0 to wrap the fused experts)")

    if model.model_type == "gemma2" and plan.attn_implementation == "sdpa":
        # transformers 5.24 has no SDPA for gemma2 (attention soft-capping): from_pretrained picks eager
        plan = plan.replace(attn_implementation="eager")
        notes.append("gemma2 has no SDPA attention in transformers 5.24 (soft-capping): estimated with eager, "
                     "which from_pretrained picks; pass --attn-implementation flash_attention_2 if you use it")
    key = plan.replace(batch_size=1, seq_len=1, gradient_accumulation_steps=1)  # shape-free plan
    static_items, grads, paged, scratch = _static_part(model, key, cuda)
    static = dict(static_items)
    ga_grads = grads if plan.gradient_accumulation_steps > 1 else 0

    ap = activation_profile(model, plan, cpu=not cuda, key=key)
    moments: dict[str, dict[Term, int]] = {}
    gc = plan.gradient_checkpointing
    if gc:
        layers_saved = L * ap.layer_input_bytes
    else:
        layers_saved = ap.first_layer_bytes + (L - 1) * ap.layer_bytes
    model_saved = ap.rope_bytes + ap.final_norm_bytes + ap.head_bytes
    labels = r(8 * plan.batch_size * (plan.seq_len + 1))  # labels padded by one (-100) for the shift
    pos_ids = r(8 * plan.seq_len) if gc else 0  # position ids, an argument every checkpointed layer keeps
    small = 2 * r(4)  # the loss and its gradient seed

    # ---- loss stage ---------------------------------------------------------------------------
    tv = T * V
    fp32_copy = r(4 * tv) if ap.logits_dt != 4 else 0
    # Gemma-2 final soft-capping: logits / cap -> tanh (its output saved) -> * cap
    softcap = r(ap.logits_dt * tv) if model.final_logit_softcapping else 0
    loss_fwd_logits = r(ap.logits_dt * tv) + fp32_copy + r(4 * tv) + softcap
    loss_fwd = _moment(static, gradients=ga_grads,
                       activations=layers_saved + model_saved + (ap.lora_weight_copies - (0 if gc else ap.saved_copies))
                       + r(T * H * ap.stream_dt) + labels + pos_ids + small,
                       logits=loss_fwd_logits)
    loss_bwd = _moment(static, gradients=ga_grads, activations=layers_saved + model_saved + pos_ids + small,
                       logits=3 * r(4 * tv) + softcap)

    # ---- layer windows -----------------------------------------------------------------------------
    # Per layer i: its forward (no checkpointing: every earlier layer's saved set plus this layer's
    # live peak); its recompute under checkpointing (live bytes when its last tensor is saved: torch
    # stops recomputing there); and its MLP backward, when the down projection's saved tensors are
    # gone and three [T x I] gradients are in flight.
    per_layer_grads = grads // L
    g_res = r(T * H * ap.stream_dt)
    I = model.intermediate_size
    down_grads = (r(4 * plan.lora_r * I) + r(4 * H * plan.lora_r)) if plan.method != "full" else 0
    # NB: the [T x H] gradients in flight while a layer recomputes are measured (see _inflight_bytes)
    recompute_inflight = r(T * H * _inflight_bytes(ap.stream_dt, bool(plan.autocast), plan.method))
    if not gc:
        moments["forward"] = _moment(static, gradients=ga_grads, activations=(
            ap.first_layer_bytes + (L - 2) * ap.layer_bytes if L > 1 else 0) + ap.rope_bytes + ap.forward_peak)
    for i in ((L - 1, 0) if gc else (L - 1,)):
        saved_i = ap.first_layer_bytes if i == 0 else ap.layer_bytes
        if gc:
            below = i * ap.layer_input_bytes
            own_input = 0 if ap.input_in_saved else ap.layer_input_bytes
        else:
            below = ap.first_layer_bytes + (i - 1) * ap.layer_bytes if i else 0
            own_input = 0
        grads_i = grads if ga_grads else per_layer_grads * (L - 1 - i)
        fixed = below + ap.rope_bytes + pos_ids + small
        if gc:
            moments[f"recompute:{i}"] = _moment(static, gradients=grads_i,
                                                activations=fixed + own_input + ap.recompute_peak,
                                                temporaries=recompute_inflight)
        moments[f"backward:{i}"] = _moment(
            static, gradients=grads_i + down_grads,
            activations=fixed + own_input + saved_i - ap.down_saved,
            temporaries=g_res + 3 * r(T * I * ap.prod_dt))

    # ---- optimizer step -------------------------------------------------------------------------
    opt = _moment(static, gradients=grads, temporaries=scratch)

    moments.update({"loss:forward": loss_fwd, "loss:backward": loss_bwd, "optimizer": opt})
    totals = {k: sum(v[t] for t in ALLOCATED_TERMS) for k, v in moments.items()}
    moment = max(totals, key=totals.get)
    terms = dict(moments[moment])
    phase = _PHASE[moment.split(":")[0]] if moment != "loss:forward" else "loss"
    notes.append(f"peak: {_describe(moment, L)}")

    if cuda:
        _add_cuda_overheads(terms, gpu)
        totals = {k: v + terms[Term.WORKSPACE] for k, v in totals.items()}
        if gpu is None:
            notes.append("no --gpu given: CUDA context, workspace and allocator overhead use generic defaults")
        if paged:
            notes.append("paged optimizer: state of tensors with >= 100,000 elements lives in CUDA managed memory "
                         "(paged_bytes), outside torch's allocator; NVML counts it when resident")
    if plan.prepare and plan.method != "full":
        notes.append("prepare_model_for_kbit_training upcasts embeddings, norms and lm_head to fp32")
    if model.max_position_embeddings and plan.seq_len > model.max_position_embeddings:
        notes.append(f"seq_len {plan.seq_len} is longer than the model's max_position_embeddings "
                     f"{model.max_position_embeddings}")
    if gpu is not None and plan.mixed_precision == "bf16" and not gpu.bf16:
        notes.append(f"{gpu.name} has no bf16 support (compute capability {gpu.compute_capability}); "
                     "use --mixed-precision fp16 --compute-dtype fp16 --dtype fp16")
    return Estimate(model=model, plan=plan, terms=terms, peak_phase=phase, paged_bytes=paged if cuda else 0,
                    gpu=gpu, notes=tuple(notes), phase_peaks=totals, moment=moment, moments=moments)


@lru_cache(maxsize=4096)
def _static_part(model: ModelSpec, plan: TrainPlan, cuda: bool) -> tuple[tuple[tuple[Term, int], ...], int, int, int]:
    """Terms that do not depend on batch or sequence length: (static terms, gradients, paged, scratch)."""
    rnd = 512 if cuda else 1
    opt_dev, paged = F.optimizer_state_bytes(model, plan, rnd, cuda=cuda)
    static = {t: 0 for t in Term}
    static[Term.BASE_WEIGHTS] = F.base_weights_bytes(model, plan, rnd)
    static[Term.QUANT_STATE] = F.quant_state_bytes(model, plan, rnd)
    static[Term.OTHER_PARAMS] = F.other_params_bytes(model, plan, rnd)
    static[Term.ADAPTER_WEIGHTS] = F.adapter_weights_bytes(model, plan, rnd)
    static[Term.OPTIMIZER_STATE] = opt_dev
    grads = F.gradient_bytes(model, plan, rnd)
    return tuple(static.items()), grads, paged, _optimizer_scratch(model, plan, cuda, rnd)


def _inflight_bytes(stream_dt: int, autocast: bool, method: str) -> int:
    """Bytes per [T x H] element of the gradients alive when a checkpointed layer starts recomputing.

    NB: measured on CPU steps (tracker), not derived: the accumulated gradient of the layer's output
    plus the partial gradients of the layer above still in the engine's buffers, whose dtypes
    follow the regime. fp32 stream: fp32 + 16-bit. 16-bit stream: two 16-bit under autocast;
    16-bit + fp32 for QLoRA without autocast; two 16-bit + fp32 for LoRA without autocast.
    """
    if stream_dt == 4:
        return 6
    if autocast:
        return 4
    return 6 if method == "qlora" else 8


def _add_cuda_overheads(terms: dict[Term, int], gpu: GPUSpec | None) -> None:
    """Workspace, allocator overhead and CUDA context, from the GPU's calibrated overheads."""
    g = gpu or GPUSpec(name="generic", memory_bytes=0)  # GPUSpec's defaults when no GPU is named
    terms[Term.WORKSPACE] = 2 * g.workspace_bytes  # one cuBLAS workspace per handle: forward + autograd thread
    terms[Term.ALLOCATOR_OVERHEAD] = int(sum(terms[t] for t in ALLOCATED_TERMS) * g.reserve_ratio)
    terms[Term.CUDA_CONTEXT] = g.cuda_context_bytes


_PHASE = {"forward": "forward", "loss": "backward", "recompute": "backward", "backward": "backward",
          "optimizer": "optimizer"}


def _describe(moment: str, layers: int) -> str:
    """A reader's description of the peak moment."""
    kind, _, idx = moment.partition(":")
    if moment == "loss:forward":
        return "the loss forward: bf16 logits, their fp32 copy and the log-softmax over [tokens x vocab]"
    if moment == "loss:backward":
        return "the start of backward: log-softmax output and gradients over [tokens x vocab] (the loss stage)"
    if kind == "recompute":
        return f"recomputing checkpointed layer {idx} of {layers} during backward"
    if kind == "backward":
        return f"the MLP backward of layer {idx} of {layers}: [tokens x intermediate] gradients in flight"
    if kind == "forward":
        return f"the forward of the last layer ({layers - 1}), every earlier layer's activations saved"
    return "the optimizer step: every gradient plus the optimizer's state and scratch"


def _optimizer_scratch(model: ModelSpec, plan: TrainPlan, cuda: bool, rnd: int) -> int:
    """Transient buffers during optimizer.step()."""
    spec = OPTIMIZERS[plan.optim]
    groups = F._trainable_groups(model, plan)
    if not groups:
        return 0
    if spec.impl == "foreach" and cuda and spec.states:
        return sum(k * round_up(r * c * dt, rnd) for (r, c), dt, k in groups)  # one temporary per tensor
    sizes = [r * c * dt for (r, c), dt, _ in groups]
    if spec.impl == "fused" or spec.bits == 8 and cuda:
        return 0
    return max(sizes)  # single-tensor loop: the denominator of one tensor at a time


def estimate(model: str | ModelSpec | Any, plan: TrainPlan | None = None, *, gpu: str | GPUSpec | None = None,
             bnb_config: Any = None, lora_config: Any = None, training_args: Any = None,
             fallback_simulate: bool = True, **plan_kwargs: Any) -> Estimate:
    """Estimate the peak memory of one training step.

    `model`: a catalogue name, hub id, local path, ModelSpec, config.json dict or PretrainedConfig.
    Plan fields come from `plan`, the user's HF objects (`bnb_config`, `lora_config`,
    `training_args`) and keyword arguments (which win), e.g. `estimate("llama-2-7b", seq_len=4096)`.
    Where the closed form does not cover the architecture (mixture-of-experts) and the [sim] extras
    are installed, the terms come from `memplan.simulate` instead and the notes say so
    (`fallback_simulate=False` raises UnsupportedArchitectureError instead).
    """
    from .catalogue import load_gpu, resolve_model

    from .errors import UnsupportedArchitectureError

    spec = resolve_model(model)
    p = plan_from(plan, bnb_config=bnb_config, lora_config=lora_config, training_args=training_args,
                  **plan_kwargs)
    g = load_gpu(gpu) if gpu is not None else None
    try:
        return compute(spec, p, g)
    except UnsupportedArchitectureError as e:
        if not fallback_simulate or not _sim_available():
            raise
        return from_simulation(spec, p, g, reason=str(e))


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
             *res.notes]
    if plan.device == "cuda":
        _add_cuda_overheads(terms, gpu)
    return Estimate(model=model, plan=plan, terms=terms, peak_phase=res.peak_phase, paged_bytes=res.paged_bytes,
                    gpu=gpu, notes=tuple(notes), phase_peaks=dict(res.phase_peaks), moment="simulate")
