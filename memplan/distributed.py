"""distributed: the per-rank closed form of a data-parallel step (DDP, FSDP1/FSDP2, DeepSpeed ZeRO-2/3).

Every rank runs the single-device step of `memplan.estimate` on its own micro-batch (data parallel:
activations, logits and temporaries are the single-device moments', unchanged); what differs per
rank is where the parameters, gradients and optimizer state live and which collective buffers exist.
`compute_distributed` takes the single-device moments (`estimate.compute` of `plan.single_device()`)
and, for each, swaps the static terms for their per-rank form:

- parameters: each FSDP unit's parameters sharded over the shard group (FSDP2: every parameter
  padded on dim 0 to a multiple of the group, `torch/distributed/fsdp/_fully_shard/_fsdp_param.py`
  FSDPParam._init_sharded_param; FSDP1: one flat parameter per unit and dtype padded to a multiple of
  the group, `torch/distributed/fsdp/_flat_param.py` FlatParamHandle._get_shard), in their terms.
  `quant_state` is a module attribute, not a parameter: every rank keeps all of it (bitsandbytes
  nn/modules.py `fix_4bit_weight_quant_state_from_module`). Buffers (rotary inv_freq) are replicated.
- FSDP units follow accelerate 1.15 (accelerate/utils/fsdp_utils.py `fsdp2_prepare_model`): one unit
  per decoder layer (TRANSFORMER_BASED_WRAP on `_no_split_modules`; where the layers differ, `layer_kinds`:
  DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers, Llama 4's interleaved MoE, each layer's unit
  holds its kind's parameters, `layer_params`, and every per-layer sum and gathered/prefetched unit is
  that layer's own; routers shard on their dim 0, [E, H]), the input embedding (its own
  unit unless tied), the tail [lm_head] with reshard_after_forward=False, the root (the final norm:
  `_find_final_norm` does not see through a PeftModel) which keeps its parameters until the end of
  backward. The 4-bit weights shard as elements of `bnb_4bit_quant_storage` (packed
  [ceil(n/2)/itemsize, 1]); with uint8 storage accelerate leaves them out (ignored_params): whole on
  every rank. FSDP1 (peft's `fsdp_auto_wrap_policy`): the decoder layers and every LoRA Linear are
  units, the root holds embedding, final norm and lm_head and keeps them gathered after forward.
- gathered parameters are `comm_buffers` (the all-gather outputs of
  `_fsdp_collectives.foreach_all_gather_copy_out`, padded), in the mixed-precision param dtype: with
  bf16/fp16 mixed precision accelerate gives FSDP MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=bf16), so every gathered parameter is 2 B per element. FULL_SHARD / HYBRID_SHARD:
  forward: the layer that runs; loss: the tail and the root; a layer's backward (recompute, dequant,
  MLP backward): that layer and the root, plus the prefetched unit below it (FSDP2: its flat
  all-gather output, held in `_all_gather_result` until its pre-backward; FSDP1 BACKWARD_PRE: gathered;
  BACKWARD_POST / NO_PREFETCH: none). FSDP2 also keeps the last forward all-gather's flat output
  (`comm_ctx.all_gather_state`, until the next copy-out or the end of the root's forward,
  `FSDPState._post_forward`): the tail's during the loss forward. With mixed precision FSDP2 also has
  `forward:lm_head` (lm_head's 16-bit output, the tail gathered: dense models' forward phase peak) and,
  FULL_SHARD / HYBRID_SHARD, `backward:gather_last` (the tail's pre-backward prefetch of the last layer: its
  cast all-gather input and flat output beside the 16-bit logits' gradient, `_cast_input`), then
  `backward:copy_out_last` (the last layer's copy-out: its flat output and padded unsharded parameters both
  alive, the tail resharded; a large MoE layer's backward phase peak from 4 ranks on, `_backward_copy_out`). FSDP2 FULL_SHARD /
  HYBRID_SHARD, the embedding its own unit in the backward: `backward:gather_embed` (after layer 0's backward,
  the prefetched embedding copied out: its flat all-gather output and unsharded parameters both alive, every
  gradient reduced; a large vocabulary's backward phase peak, `_embed_backward_gather`). SHARD_GRAD_OP
  (reshard_after_forward=False): every layer stays gathered from its forward until its backward.
  NO_SHARD: nothing gathered.
- the step each rank computes: under that mixed precision (and DeepSpeed's 16-bit cast) every
  parameter reaches the compute in 16 bits, so the moments' activations, logits and temporaries are
  the single-device step's with 16-bit parameters and adapters (`rank_moments`).
- gradients of trainable parameters only: FSDP: sharded (padded) after each unit's reduce-scatter,
  the current layer's in flight unsharded; FSDP2 keeps one reduce-scatter input (the previous unit's
  unsharded gradients in the reduce dtype, `FSDPParamGroup.post_backward`,
  `reduce_scatter_max_input_buffers` = 1): `comm_buffers`. DDP: every gradient plus the reducer's buckets (`comm_buffers`: the gradients'
  bytes again, `torch/nn/parallel/distributed.py`, gradient_as_bucket_view=False).
- optimizer state: the plan's optimizer on each rank's shard (FSDP: per-parameter dim-0 shards).
  DeepSpeed ZeRO (deepspeed 0.19.8 runtime/zero/stage_1_and_2.py, stage3.py): floating parameters cast
  to the 16-bit dtype (the engine's `module.bfloat16()`); an fp32 master partition of the trainable
  parameters (optimizer_state); the gradient partition: ZeRO-2 fp32, made at the step (none during
  backward), ZeRO-3 in the 16-bit gradient_accumulation_dtype, kept (`grad_partitions_flat_buffer`);
  comm_buffers: the ipg reduce bucket (reduce_bucket_size elements, 16-bit; ZeRO-2 during backward
  only, ZeRO-3 always), ZeRO-3's gathered parameters (`_zero3_gathered`: a unit stays gathered from its
  forward to its backward while within stage3_max_reuse_distance, 1e9 elements), its persistent
  parameters (under the persistence threshold) whole and its prefetch bucket; bucket sizes are the
  plan's `zero_*` fields, "auto" = the HF Trainer's values (transformers integrations/deepspeed.py: H*H,
  0.9*H*H, persistence threshold 10*H). ZeRO-3 also: modules outside the backward trace released after
  their forward (`zero3_released_inputs`), the frozen lm_head's input saved by its memory-efficient linear
  (`zero3_saved_head_input`; with LoRA on part of the Linears the unadapted ones' inputs too,
  `zero3_unadapted_inputs`), the input ids detached by its module hooks (`zero3_input_ids`),
  engine.backward's scalars, and with offload_optimizer the fp32 master gradient on the host
  (`zero3_offload_fp32_grad`). Checked on real 2-rank CPU ranks (tests/test_distributed_deepspeed.py).
- offload: FSDP `offload_params` (CPUOffloadPolicy) keeps the parameter shards, the sharded
  gradients and the optimizer on the host; ZeRO `offload_optimizer` the master partition, gradient
  partition and optimizer state; `offload_param` (ZeRO-3) the parameter partitions. `host` is per
  node: what the node's ranks offload together (pinned), plus `loading`: the model in its load dtype
  in host RAM while loading, once per node with `fsdp_cpu_ram_efficient_loading` (rank 0 loads;
  accelerate disables it for a model with 4-bit Params4bit), once per rank otherwise.

Ranks: padding makes every rank allocate the same shard sizes, so every rank has the same terms;
`ranks` lists them all (the busiest first when they differ).

Worked example (hand-checked in tests/test_distributed.py::test_worked_example): one uniform layer of
a LoRA plan with a 2-rank FSDP2 FULL_SHARD, a q_proj [out 64, in 64] in fp32 (no prepare, LoRA r=8,
fp32 adapters): base weight per rank ceil(64/2)*64*4 = 8192 B (half of 16384 B); lora_A [8, 64]:
ceil(8/2)*64*4 = 1024 B; lora_B [64, 8]: 32*8*4 = 1024 B; with 3 ranks the base weight pads to
ceil(64/3) = 22 rows: 22*64*4 = 5632 B per rank (3 x 5632 = 16896 B > 16384 B: 512 B of padding), and
its unsharded all-gather output is 3 x 5632 = 16896 B (in fp32; 8448 B gathered in bf16).

Checked against real 2-process gloo FSDP2 steps on CPU (helper dist-real's measurements: llama, qwen2,
mistral, hidden 256, 2 layers, QLoRA nf4 with bf16 storage and LoRA, FULL_SHARD and SHARD_GRAD_OP, with
and without checkpointing): every static term per rank to the byte; the peak within 0.02 % in 10 of 12
configurations. The other two (LoRA FULL_SHARD without checkpointing -12.5 %, LoRA SHARD_GRAD_OP with
checkpointing -1.8 %) peak while gloo holds its in-collective copy of an all-gather output (CPU only:
NCCL allocates outside torch's allocator), which the closed form does not model.

Known limitations (NB):
- the collective library's own buffers (NCCL channels, gloo's) are outside torch's allocator and not
  counted; the all-gather flat buffer of the unit in compute is freed at copy-out and not counted;
- FSDP1 (checked on real 2-rank gloo steps, tests/test_distributed_worlds.py: FULL_SHARD / SHARD_GRAD_OP /
  NO_SHARD QLoRA with --no-prepare, within 128 B): flat padding per term (the real flat parameter mixes the
  packed weights and norms of a layer, so the ranks' base/other split differs by the shard boundary; the
  sums agree); with peft's units a layer computes with its frozen unit and one module's lora_A/lora_B
  gathered; the root's backward prefetches the last layer; NO_SHARD's low-precision copies (`_mp_shard`) of
  the fp32 LoRA units in use are counted; FULL_SHARD's transient `_mp_shard` (freed at the all-gather) is not;
  `use_orig_params`: one saved 16-bit copy of each adapted module's input (activations; within 128 B of the
  real ranks with and without checkpointing, +327,680 / +524,288 B on the tiny plan); FSDP1's prefetch at
  the end of a layer's backward (`layer_end:i`: the frozen layer below gathered while the layer's input norm
  runs backward; BACKWARD_PRE and BACKWARD_POST) is a moment (tests/test_distributed_fsdp1.py: the three
  prefetch values, LoRA and QLoRA, every term but the base/other split to the byte of simulate per rank);
  its temporaries are llama's RMSNorm backward (other norms not checked);
- HYBRID_SHARD (FSDP2, checked on 2 x 2 real gloo ranks to 4 B) shards within a node (ranks per node) and
  keeps each reduced unit's all-reduce input until the end of backward;
- DeepSpeed: bitsandbytes 8-bit / paged optimizers wrapped by ZeRO are estimated on the fp32 flat
  partition; the offloaded optimizer is DeepSpeedCPUAdam (fp32, two states; not run here); ZeRO-2's ipg
  buffer assumed single (overlap_comm doubles it). Real 2-rank CPU ranks (llama/qwen2/mistral, hidden
  256, 2 layers, bf16): ZeRO-2 LoRA/QLoRA with and without checkpointing within 0.4 % (4 of 5 to 12 B;
  offload_optimizer too); ZeRO-3 (llama QLoRA/LoRA with and without checkpointing, 2 layers seq 64; qwen2
  LoRA 3 layers seq 128 with and without checkpointing, qwen2 QLoRA seq 128, mistral QLoRA 3 layers and
  LoRA seq 128 with checkpointing; llama QLoRA + offload_optimizer: device + the rank's host share) every
  rank's peak 8 B under the real one (4 B with offload): ZeRO-3 keeps the previous step's unscaled grad
  norm (stage3.py `_global_grad_norm`, a float64 scalar on the CPU ranks), not modelled (its dtype on CUDA
  not measured); every other term to the byte; also LoRA / QLoRA on q_proj/v_proj only (the unadapted
  Linears' inputs, `zero3_unadapted_inputs`) to 8 B at the peak. ZeRO-3 offload_param is not run here;
- gradient accumulation: gradients are reduced every micro-batch (no `no_sync`), so they stay sharded;
- mixed dense/MoE layers: FSDP adds the forward of each kind's last layer and (FSDP2) the all-gather
  copy-out of each kind's first and last layer (`_layer_forwards`; one MoE layer's gathered experts can
  dwarf everything else); a checkpointed layer's forward is the layer walk with nothing saved
  (`_checkpointed_forward`, its input held by the caller: `checkpointed_input_held`; +0.63 % on a cut Llama 4
  Maverick, every phase within 1,280 B on cut deepseek-v2-lite / qwen3-30b-a3b FULL_SHARD,
  tests/test_distributed_mixed.py). CUDA MoE plans keep
  prepare under FSDP/ZeRO mixed precision (grouped_mm gets 16-bit experts; one GPU must drop it);
- Gemma 3's multimodal checkpoints: accelerate's default transformer_based_wrap raises on them (a SigLIP
  class in the aggregated `_no_split_modules` they do not build): refused, unless
  `fsdp_transformer_layer_cls_to_wrap` names Gemma3DecoderLayer (and optionally SiglipEncoderLayer,
  SiglipVisionEmbeddings: idle units, never gathered; the rest of the tower and the projector stay in the
  root, gathered all step: `_vision_units`), FSDP2 only; DDP / ZeRO with the tower (its never-used LoRA in
  the buckets / partitions) not modelled. Llama 4's multimodal checkpoints load as Llama4ForCausalLM (no
  tower): covered.
- FSDP2 with tied embeddings: the tail group [embed, lm_head] is gathered as the embedding runs and stays
  gathered to the end of backward (no tail all-gather at the end of forward; `_fsdp_alive`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from math import ceil
from typing import Any, Mapping

from . import formulas as F
from .errors import UnsupportedArchitectureError
from .model import ModelSpec
from .plan import DIST_FIELDS, TrainPlan, dtype_bytes
from .terms import ALLOCATED_TERMS, Term

__all__ = ["Param", "Unit", "RankResult", "compute_distributed", "shard_group", "units", "quant_storage_bytes",
           "fewest_gpus", "padding_slack", "MultiGPUOption", "LADDER", "LADDER_COST", "GPU_COUNTS", "rank_moments",
           "loaded_bytes", "zero_buckets", "zero_bucket_values", "DDP_FIRST_BUCKET_BYTES", "HOST_LOADING",
           "layer_params"]

#: DDP's first bucket (torch/distributed/distributed_c10d.py `_DEFAULT_FIRST_BUCKET_BYTES`)
DDP_FIRST_BUCKET_BYTES = 1024 * 1024
#: the host-only label for model loading (host-contract: no Term fits it)
HOST_LOADING = "loading"
MiB = 1024 * 1024

_PARAM_TERMS = (Term.BASE_WEIGHTS, Term.OTHER_PARAMS, Term.ADAPTER_WEIGHTS)


@dataclass(frozen=True)
class Param:
    """One parameter as FSDP/ZeRO see it: dim 0, the product of the other dims, bytes per element."""

    dim0: int
    rest: int
    el: int
    term: Term
    trainable: bool = False

    def __post_init__(self) -> None:  # hashed once: `_unit_bytes`' cache hashes every parameter of a unit
        object.__setattr__(self, "_hash", hash((self.dim0, self.rest, self.el, self.term, self.trainable)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def numel(self) -> int:
        return self.dim0 * self.rest

    def shard(self, w: int) -> int:
        """FSDP2: elements of each rank's padded dim-0 shard (FSDPParam: ceil(dim0 / w) rows)."""
        return ceil(self.dim0 / w) * self.rest


@dataclass(frozen=True)
class Unit:
    """One FSDP unit (a `fully_shard` group / an FSDP1 flat parameter's module)."""

    name: str
    params: tuple[Param, ...]
    layer: int | None = None          # the decoder layer it is, None for embed / tail
    keep_after_forward: bool = False  # reshard_after_forward=False (the tail; FSDP1's root)
    root: bool = False                # the root: gathered first in forward, resharded at the end of backward
    idle: bool = False                # never runs in a text-only step (a vision tower's): never gathered

    def bytes(self, w: int, rnd: int, version: int, unsharded: bool = False, gather_el: int = 0) -> dict[Term, int]:
        """Per-term bytes of one rank's shard (or, `unsharded`, of the all-gathered parameters, padded,
        in `gather_el` bytes per element when mixed precision casts them: FSDP's param_dtype)."""
        return dict(_unit_bytes(self.params, w, rnd, version, unsharded, gather_el))

    def grads(self, w: int, rnd: int, version: int, unsharded: bool = False, gather_el: int = 0) -> int:
        """Bytes of the unit's trainable gradients: per-rank shard, or unsharded (padded; in `gather_el`
        bytes per element: FSDP's reduce_dtype)."""
        return sum(v for _, v in _unit_bytes(tuple(p for p in self.params if p.trainable), w, rnd, version, unsharded,
                                             gather_el))


@lru_cache(maxsize=4096)
def _unit_bytes(params: tuple[Param, ...], w: int, rnd: int, version: int, unsharded: bool,
                gather_el: int = 0) -> tuple[tuple[Term, int], ...]:
    out = dict.fromkeys(_PARAM_TERMS, 0)
    el_of = (lambda p: gather_el or p.el) if unsharded else (lambda p: p.el)  # noqa: E731
    if version == 1:  # one flat parameter per dtype and term, padded to a multiple of w
        flat: dict[tuple[Term, int], int] = {}
        for p in params:
            flat[(p.term, el_of(p))] = flat.get((p.term, el_of(p)), 0) + p.numel
        for (t, el), n in flat.items():
            per = ceil(n / w)
            out[t] += F.rounded((per * w if unsharded else per) * el, rnd)
    else:
        for p in params:
            per = p.shard(w)
            out[p.term] += F.rounded((per * w if unsharded else per) * el_of(p), rnd)
    return tuple(out.items())


def quant_storage_bytes(plan: TrainPlan) -> int:
    """Bytes per element of the packed 4-bit weight: `bnb_4bit_quant_storage`; auto is uint8 for a
    single GPU and DDP, the 16-bit load dtype for FSDP and ZeRO (FSDP-QLoRA needs a floating storage)."""
    qs = plan.bnb_4bit_quant_storage
    if qs == "auto":
        return dtype_bytes(plan.dtype) if plan.world_strategy in ("fsdp", "deepspeed") else 1
    return 1 if qs == "uint8" else dtype_bytes(qs)


def shard_group(plan: TrainPlan) -> int:
    """Ranks one parameter is sharded over: all ranks (FULL_SHARD, SHARD_GRAD_OP, ZeRO), the ranks of
    a node (HYBRID_SHARD), 1 (NO_SHARD, DDP)."""
    s = plan.world_strategy
    if s == "deepspeed":
        return plan.num_processes
    if s != "fsdp" or plan.fsdp_sharding_strategy == "NO_SHARD":
        return 1
    return plan.ranks_per_node if plan.fsdp_sharding_strategy == "HYBRID_SHARD" else plan.num_processes


def _cast(plan: TrainPlan, el: int) -> int:
    """DeepSpeed casts every floating parameter to its 16-bit dtype (engine.py `_cast_module_mixed_precision`)."""
    if plan.world_strategy == "deepspeed" and plan.autocast:
        return 2
    return el


#: one object per distinct Param (`_layer_params`)
_PARAMS: dict[Param, Param] = {}


def _norm_param(model: ModelSpec, name: str, n: int, el: int, full: bool) -> Param:
    """One per-layer parameter of `layer_norms` with its real dim 0 (FSDP2 shards dim 0): the router
    weight [E, H] (Llama4Router, an nn.Linear subclass, counts with the base weights; DeepSeek keeps its
    router fp32: `_keep_in_fp32_modules_strict`), gpt_oss's expert biases [E, 2I] / [E, H]; the norms,
    router biases and sinks are 1-D."""
    moe = model.arch.moe
    if moe is None or not model.num_experts:
        return Param(n, 1, el, Term.OTHER_PARAMS, full)
    E = model.num_experts
    router = f"{moe.block}.{moe.router_name}.weight"
    if name not in (router, f"{moe.block}.experts.gate_up_proj_bias", f"{moe.block}.experts.down_proj_bias"):
        return Param(n, 1, el, Term.OTHER_PARAMS, full)
    term = Term.BASE_WEIGHTS if name == router and moe.router_is_linear_subclass else Term.OTHER_PARAMS
    return Param(E, n // E, el, term, full)


def bias_el(plan: TrainPlan, single: bool = False) -> int:
    """Bytes per element of a decoder Linear's bias as the rank stores it. One GPU (and DDP, ZeRO: the
    module's own bias runs the forward): a 4-bit Linear's is cast to the input dtype in place on its first
    forward (bitsandbytes nn/modules.py `Linear4bit.forward`: `self.bias.data = self.bias.data.to(x.dtype)`),
    the compute dtype, as `formulas.other_params_bytes` counts it. FSDP (1 and 2): the forward runs on the
    gathered copy (FSDP2's unsharded parameter, FSDP1's flat-parameter view), so the rank's shard keeps
    its stored dtype: fp32 after prepare_model_for_kbit_training, else the load dtype (measured with
    simulate per rank: qwen2.5-7b, qwen1.5-moe other_params to the byte). `single`: the single-device
    dtype (the inventory the replicated buffers are computed from)."""
    pr = plan.precision
    qlora4 = plan.method == "qlora" and plan.quant != "int8"
    if qlora4 and (single or plan.world_strategy != "fsdp"):
        return _cast(plan, pr.compute)
    return _cast(plan, pr.params)


def _layer_params(model: ModelSpec, plan: TrainPlan, single: bool = False) -> tuple[Param, ...]:
    """The parameters of one decoder layer of a model whose layers are alike (or of one layer kind's
    `formulas.kind_view`): its Linears (packed 4-bit, int8 or floating), biases, norms and routers,
    the fused experts, and the LoRA tensors peft adds (on the Linears, the router and the experts);
    `single`: the biases in their single-device dtype (`bias_el`)."""
    pr = plan.precision
    params_el = _cast(plan, pr.params)
    layer: list[Param] = []
    qlora4 = plan.method == "qlora" and plan.quant != "int8"
    qs = quant_storage_bytes(plan) if plan.method == "qlora" else 1
    fsdp_ignored = plan.world_strategy == "fsdp" and qlora4 and qs == 1  # accelerate: ignored_params
    for lin in model.layer_linears:
        if fsdp_ignored:
            continue  # replicated on every rank (`replicated_bytes`), not in a unit
        if qlora4:
            layer.append(Param((lin.numel + 1) // (2 * qs), 1, qs, Term.BASE_WEIGHTS))
        elif plan.method == "qlora":
            layer.append(Param(lin.out_features, lin.in_features, 1, Term.BASE_WEIGHTS))
        else:
            layer.append(Param(lin.out_features, lin.in_features, params_el, Term.BASE_WEIGHTS,
                               plan.method == "full"))
    b_el = bias_el(plan, single)
    full = plan.method == "full"
    layer += [Param(lin.out_features, 1, b_el, Term.OTHER_PARAMS, full) for lin in model.layer_linears if lin.bias]
    moe = model.arch.moe
    fp32_router = f"{moe.block}.{moe.router_name}.weight" if moe is not None and moe.router_fp32 else ""
    layer += [_norm_param(model, name, n, _cast(plan, 4) if name == fp32_router else params_el, full)
              for name, n in model.layer_norms]
    if model.is_moe:
        E, I, H = model.num_experts, model.expert_intermediate_size, model.hidden_size
        layer += [Param(E, 2 * I * H, params_el, Term.OTHER_PARAMS, full),
                  Param(E, H * I, params_el, Term.OTHER_PARAMS, full)]
    if plan.method in ("qlora", "lora"):
        ad = _cast(plan, pr.adapter)
        layer += [Param(r, c, ad, Term.ADAPTER_WEIGHTS, True)
                  for r, c in F.lora_shapes(model, plan) + F.moe_lora_shapes(model, plan)]
    return tuple(_PARAMS.setdefault(p, p) for p in layer)  # equal parameters: one object


def layer_params(model: ModelSpec, plan: TrainPlan, single: bool = False) -> tuple[tuple[Param, ...], ...]:
    """Every decoder layer's parameters, in order: one tuple shared by all layers when they are alike,
    else each layer's kind's (`layer_kinds`: DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers,
    Llama 4's interleaved MoE; `formulas.kind_view`)."""
    if not model.layer_kinds:
        return (_layer_params(model, plan, single),) * model.num_layers
    kinds = {k: _layer_params(F.kind_view(model, k == "moe"), plan, single) for k in set(model.layer_kinds)}
    return tuple(kinds[k] for k in model.layer_kinds)


#: multimodal checkpoints (Gemma3ForConditionalGeneration): the decoder layer class, and the vision tower
#: classes of its `_no_split_modules` (transformers aggregates the children's) that it builds
_MM_DECODER = {"gemma3_text": "Gemma3DecoderLayer"}
_SIGLIP_LAYER, _SIGLIP_EMBED = "SiglipEncoderLayer", "SiglipVisionEmbeddings"


def _vision_units(model: ModelSpec, plan: TrainPlan, wrap: tuple[str, ...]) -> tuple[list[Unit], tuple[Param, ...]]:
    """A multimodal checkpoint's vision tower under `fsdp_transformer_layer_cls_to_wrap` = `wrap`: (its units,
    never gathered in a text-only step, and the parameters left to the root: the projector, the
    post-layernorm, and whatever class `wrap` does not name). SigLIP (transformers siglip/modeling_siglip.py):
    embeddings = patch_embedding Conv2d [C, ch, p, p] + bias and position_embedding [patches, C]; each
    SiglipEncoderLayer q/k/v/out_proj, fc1, fc2 (nn.Linear with bias: 4-bit under QLoRA, the biases in the
    parameters' dtype, never cast by a forward) and layer_norm1/2 (weight + bias); Gemma3MultiModalProjector
    mm_input_projection_weight [C, H] and mm_soft_emb_norm [C]. The tower's LoRA (peft's all-linear adapts
    it) requires grad but never gets a gradient: no gradient, no optimizer state (`trainable` False)."""
    if plan.fsdp_version == 1:
        raise UnsupportedArchitectureError(f"{model.name}: FSDP1 units of a multimodal checkpoint are not modelled; "
                                           "use --fsdp-version 2")
    decoder = _MM_DECODER.get(model.model_type, "")
    unknown = [c for c in wrap if c not in (decoder, _SIGLIP_LAYER, _SIGLIP_EMBED)]
    if decoder not in wrap or unknown:
        raise UnsupportedArchitectureError(
            f"{model.name}: fsdp_transformer_layer_cls_to_wrap {','.join(wrap)}: memplan models units of "
            f"{decoder} (required) and {_SIGLIP_LAYER}, {_SIGLIP_EMBED} for this checkpoint"
            + (f", not {','.join(unknown)}" if unknown else ""))
    pr = plan.precision
    el = _cast(plan, pr.params)
    qlora4 = plan.method == "qlora" and plan.quant != "int8"
    qs = quant_storage_bytes(plan) if plan.method == "qlora" else 1
    other = model.vision_other_tensors
    C = other[1]
    n_layers = (len(other) - 7) // 4
    per = len(model.vision_linears) // n_layers if n_layers else 0
    targets = {lin.name for lin in F.vision_lora_targets(model, plan)}
    ad = _cast(plan, pr.adapter)
    embed = (Param(C, other[0] // C, el, Term.OTHER_PARAMS), Param(C, 1, el, Term.OTHER_PARAMS),
             Param(other[2] // C, C, el, Term.OTHER_PARAMS))
    layers = []
    for j in range(n_layers):
        ps: list[Param] = []
        lins = model.vision_linears[j * per:(j + 1) * per]
        for lin in lins:
            if qlora4:
                if qs != 1 or plan.world_strategy != "fsdp":  # uint8 storage: accelerate's ignored_params
                    ps.append(Param((lin.numel + 1) // (2 * qs), 1, qs, Term.BASE_WEIGHTS))
            elif plan.method == "qlora":
                ps.append(Param(lin.out_features, lin.in_features, 1, Term.BASE_WEIGHTS))
            else:
                ps.append(Param(lin.out_features, lin.in_features, el, Term.BASE_WEIGHTS))
        ps += [Param(lin.out_features, 1, el, Term.OTHER_PARAMS) for lin in lins if lin.bias]
        ps += [Param(C, 1, el, Term.OTHER_PARAMS)] * 4
        if plan.method in ("qlora", "lora"):
            for lin in lins:
                if lin.name in targets:
                    ps += [Param(plan.lora_r, lin.in_features, ad, Term.ADAPTER_WEIGHTS),
                           Param(lin.out_features, plan.lora_r, ad, Term.ADAPTER_WEIGHTS)]
        layers.append(tuple(ps))
    tail = (Param(C, 1, el, Term.OTHER_PARAMS), Param(C, 1, el, Term.OTHER_PARAMS),  # post_layernorm
            Param(C, other[-2] // C, el, Term.OTHER_PARAMS), Param(C, 1, el, Term.OTHER_PARAMS))  # projector
    out, root = [], list(tail)
    if _SIGLIP_EMBED in wrap:
        out.append(Unit("vision.embeddings", embed, idle=True))
    else:
        root += embed
    if _SIGLIP_LAYER in wrap:
        out += [Unit(f"vision.layers.{j}", ps, idle=True) for j, ps in enumerate(layers)]
    else:
        root += [p for ps in layers for p in ps]
    return out, tuple(root)


@lru_cache(maxsize=512)
def units(model: ModelSpec, plan: TrainPlan, single: bool = False) -> tuple[Unit, ...]:
    """The FSDP units of the model under `plan`, bottom-up: the embedding (unless tied), one per decoder
    layer (accelerate's transformer_based_wrap on `_no_split_modules`: each layer its own kind's
    parameters where the layers differ), the tail (final norm, lm_head, the tied embedding).
    Llama 4's multimodal checkpoints build Llama4ForCausalLM (`unloaded_vision_params`: no tower).
    `single`: the decoder Linears' biases in their single-device dtype (`bias_el`)."""
    wrap = plan.fsdp_transformer_layer_cls_to_wrap
    if model.vision_params and not (plan.world_strategy == "fsdp" and wrap):
        # transformers aggregates the children's `_no_split_modules` (modeling_utils post_init): Gemma3's
        # gets SigLIP's, whose SiglipMultiheadAttentionPoolingHead Gemma 3 does not build (vision_use_head
        # False), and accelerate's fsdp2_prepare_auto_wrap_policy raises for a class it cannot find
        if plan.world_strategy != "fsdp":
            raise UnsupportedArchitectureError(
                f"{model.name}: a multimodal checkpoint's vision tower (its LoRA requires grad but never gets a "
                "gradient) in DDP buckets / ZeRO partitions is not modelled yet; estimate one GPU")
        raise UnsupportedArchitectureError(
            f"{model.name}: accelerate 1.15's transformer_based_wrap fails on this multimodal checkpoint (\"Could "
            "not find the transformer layer class SiglipMultiheadAttentionPoolingHead in the model\": its "
            "_no_split_modules name SigLIP's pooling head, which it does not build): name the layers to wrap, "
            f"e.g. --fsdp-transformer-layer-cls-to-wrap {_MM_DECODER.get(model.model_type, 'Gemma3DecoderLayer')}")
    params_el = _cast(plan, plan.precision.params)
    layers = layer_params(model, plan, single)
    full = plan.method == "full"
    H, V = model.hidden_size, model.vocab_size
    embed = Param(V, H, params_el, Term.OTHER_PARAMS, full)
    norm = Param(H, 1, params_el, Term.OTHER_PARAMS, full)
    tail = [Param(V, H, params_el, Term.OTHER_PARAMS, full)] if model.lm_head_params else []
    out = []
    if not model.tie_word_embeddings:
        out.append(Unit("embed_tokens", (embed,)))
    else:
        tail.insert(0, embed)
    out += [Unit(f"layers.{i}", ps, layer=i) for i, ps in enumerate(layers)]
    vision_root: tuple[Param, ...] = ()
    if model.vision_params:
        vision, vision_root = _vision_units(model, plan, wrap)
        out += vision
    if plan.method == "full" and not model.vision_params:
        # accelerate's _find_final_norm finds it on a plain model: the tail's
        out.append(Unit("norm+lm_head", (norm, *tail), keep_after_forward=True))
    else:  # a PeftModel hides it (`_find_final_norm` scans model.<base_model_prefix>): it stays in the root
        out.append(Unit("lm_head", tuple(tail), keep_after_forward=True))
        # (a multimodal model's final norm is under model.language_model: not found either)
        out.append(Unit("root", (norm, *vision_root), keep_after_forward=True, root=True))
    tail.insert(0, norm)
    if plan.fsdp_version == 1 and plan.world_strategy == "fsdp":
        # FSDP1 (peft fsdp_auto_wrap_policy): every LoRA Linear is its own unit; embedding, final norm and
        # lm_head stay in the root, which keeps its parameters after forward
        top = (embed,) if not model.tie_word_embeddings else ()
        out = [Unit(f"layers.{i}", tuple(p for p in ps if p.term != Term.ADAPTER_WEIGHTS), layer=i)
               for i, ps in enumerate(layers)]
        out += [Unit(f"layers.{i}.lora.{j}", (p,), layer=i) for i, ps in enumerate(layers)
                for j, p in enumerate(p for p in ps if p.term == Term.ADAPTER_WEIGHTS)]
        out.append(Unit("root", top + tuple(tail), keep_after_forward=True, root=True))
    return tuple(out)


@dataclass(frozen=True)
class RankResult:
    """One rank's terms at its peak (the same shape as an estimate's `terms` and `peak`)."""

    rank: int
    terms: dict[Term, int]
    peak_phase: str
    moment: str

    @property
    def allocated_bytes(self) -> int:
        return sum(self.terms.get(t, 0) for t in ALLOCATED_TERMS)

    @property
    def reserved_bytes(self) -> int:
        return self.allocated_bytes + self.terms.get(Term.ALLOCATOR_OVERHEAD, 0)

    @property
    def device_bytes(self) -> int:
        return self.reserved_bytes + self.terms.get(Term.CUDA_CONTEXT, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "terms": {str(t): int(v) for t, v in self.terms.items()},
                "peak": {"phase": self.peak_phase, "moment": self.moment, "allocated_bytes": self.allocated_bytes,
                         "reserved_bytes": self.reserved_bytes, "device_bytes": self.device_bytes}}


def zero_buckets(model: ModelSpec, plan: Any = None) -> dict[str, int]:
    """The DeepSpeed bucket sizes of `plan` for `model`, in elements (`zero_bucket_values`)."""
    return zero_bucket_values(model.hidden_size, plan)


#: DeepSpeed's default stage3_max_live_parameters (deepspeed/runtime/zero/config.py
#: `DeepSpeedZeroConfig.max_live_parameters`); the HF Trainer fills no "auto" value for it
ZERO_MAX_LIVE_PARAMETERS = 1_000_000_000


def zero_bucket_values(hidden_size: int, plan: Any = None) -> dict[str, int]:
    """The bucket sizes in elements: the plan's `zero_reduce_bucket_size`, `zero_stage3_prefetch_bucket_size`,
    `zero_stage3_param_persistence_threshold`, `zero_stage3_max_live_parameters` where set, else the HF
    Trainer's "auto" values (transformers integrations/deepspeed.py
    `HfTrainerDeepSpeedConfig.trainer_config_finalize`: H*H, int(0.9*H*H), 10*H) and DeepSpeed's 1e9."""
    H = hidden_size
    out = {"reduce_bucket_size": H * H, "stage3_prefetch_bucket_size": int(0.9 * H * H),
           "stage3_param_persistence_threshold": 10 * H, "stage3_max_live_parameters": ZERO_MAX_LIVE_PARAMETERS}
    for k in out:
        v = getattr(plan, f"zero_{k}", "auto") if plan is not None else "auto"
        if v != "auto":
            out[k] = int(v)
    return out


@dataclass
class _World:
    """The per-rank inventory one distributed estimate works from (built once per estimate)."""

    model: ModelSpec
    plan: TrainPlan
    rnd: int
    w: int
    version: int
    units: tuple[Unit, ...]
    notes: list[str] = field(default_factory=list)

    #: bytes per element of gathered parameters and reduced gradients: the mixed-precision param_dtype /
    #: reduce_dtype (accelerate's MixedPrecisionPolicy for bf16/fp16), 0 = their own dtype
    gather_el: int = 0
    #: the single-device static terms in the plan's own dtypes (quant state, buffers, DDP's everything)
    static: Mapping[Term, int] = field(default_factory=dict)
    #: every gradient of the step each rank computes (the moments' dtype), for the in-flight split
    view_grads: int = 0
    #: base weights every rank holds whole (FSDP with uint8 4-bit storage: accelerate's ignored_params)
    replicated_base: int = 0
    #: each layer's gradients in the step each rank computes, where the layers differ (`layer_kinds`);
    #: () = every layer alike: view_grads / num_layers each
    view_layer_grads: tuple[int, ...] = ()

    #: shape-free sums over the units, computed once per estimate (`sums`), not once per moment
    _sums: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def sums(self) -> dict[str, Any]:
        """Per-estimate aggregates every rank moment reads: the unsharded inventory by term, every
        trainable gradient (whole and per-rank shard, and layer 0's shard), the trainable parameters."""
        if "inventory" not in self._sums:
            us, rnd, w = self.units, self.rnd, self.w
            inventory = dict.fromkeys(_PARAM_TERMS, 0)
            for u in us:
                _add(inventory, u.bytes(1, rnd, 2))
            self._sums.update(
                inventory=inventory, full_grads=sum(u.grads(1, rnd, 2) for u in us), trainable=_trainable(us),
                layer_units=[u for u in us if u.layer is not None],
                shard_grads=sum(u.grads(w, rnd, self.version) for u in us))
            # per decoder layer (they differ where `layer_kinds` mixes dense and MoE layers): the trainable
            # gradients' per-rank shards and their whole bytes
            L = self.model.num_layers
            layer_shard, layer_full = [0] * L, [0] * L
            for u in self._sums["layer_units"]:
                layer_shard[u.layer] += u.grads(w, rnd, self.version)
                layer_full[u.layer] += u.grads(1, rnd, 2)
            self._sums.update(layer_shard=tuple(layer_shard), layer_full=tuple(layer_full))
        return self._sums

    def single_other(self) -> int:
        """OTHER_PARAMS of the units at w = 1 in the single-device dtypes (`bias_el`): what the single-device
        static holds of them (the rest of its other_params are the replicated buffers)."""
        if "single_other" not in self._sums:
            if bias_el(self.plan, True) == bias_el(self.plan):
                self._sums["single_other"] = self.sums()["inventory"][Term.OTHER_PARAMS]
            else:
                self._sums["single_other"] = sum(u.bytes(1, self.rnd, 2)[Term.OTHER_PARAMS]
                                                 for u in units(self.model, self.plan, single=True))
        return self._sums["single_other"]

    def view_above(self, i: int) -> int:
        """The view's gradients of the layers above layer i (done in backward before it)."""
        L = self.model.num_layers
        if not self.view_layer_grads:
            return (L - 1 - i) * (self.view_grads // L if L else 0)
        return sum(self.view_layer_grads[i + 1:])

    def shard(self, u: Unit) -> dict[Term, int]:
        return u.bytes(self.w, self.rnd, self.version)

    def shards(self) -> dict[Term, int]:
        """Every unit's per-rank shard, by term (once per estimate: every moment holds them)."""
        if "shards" not in self._sums:
            total: dict[Term, int] = {}
            for u in self.units:
                _add(total, self.shard(u))
            self._sums["shards"] = total
        return self._sums["shards"]

    def fsdp_optimizer(self, cuda: bool) -> int:
        """The device optimizer state of the rank's FSDP shards (once per estimate)."""
        key = ("fsdp_optimizer", cuda)
        if key not in self._sums:
            self._sums[key] = _optimizer_on(self.sums()["trainable"], self.w, self.plan, self.rnd, cuda, False)[0]
        return self._sums[key]

    def full(self, u: Unit) -> int:
        """Bytes of the unit's gathered parameters (the all-gather output, per parameter)."""
        return sum(u.bytes(self.w, self.rnd, self.version, True, self.gather_el).values())

    def flat(self, u: Unit) -> int:
        """Bytes of the unit's flat all-gather output buffer (FSDP2 `foreach_all_gather`: one buffer,
        uint8 when the dtypes differ, no per-tensor rounding)."""
        return F.rounded(sum(u.bytes(self.w, 1, self.version, True, self.gather_el).values()), self.rnd)


def _add(a: dict[Term, int], b: Mapping[Term, int], k: int = 1) -> None:
    for t, v in b.items():
        a[t] = a.get(t, 0) + k * v


def _trainable(us: tuple[Unit, ...]) -> list[Param]:
    seen: list[Param] = []
    for u in us:
        seen += [p for p in u.params if p.trainable]
    return seen


def _optimizer_on(params: list[Param], w: int, plan: TrainPlan, rnd: int, cuda: bool, flat: bool) -> tuple[int, int]:
    """(device, paged) optimizer state of the plan's optimizer over each rank's shard: per-parameter
    dim-0 shards (FSDP), or one fp32 flat partition (ZeRO, `flat`)."""
    if flat:
        n = ceil(sum(p.numel for p in params) / w)
        groups = [((n, 1), 4, 1)] if n else []
    else:  # alike shards counted once (the layers repeat them): the same sum, one term per shape
        alike: dict[tuple[tuple[int, int], int], int] = {}
        for p in params:
            key = ((ceil(p.dim0 / w), p.rest), p.el)
            alike[key] = alike.get(key, 0) + 1
        groups = [(shape, el, k) for (shape, el), k in alike.items()]
    return F.optimizer_state_bytes(None, plan, rnd, cuda=cuda, groups=groups)


def rank_moments(model: ModelSpec, plan: TrainPlan, gpu: Any = None) -> tuple[Any, "_World", list[tuple[Any, dict]]]:
    """(the single-device estimate, the world, [(moment, one rank's allocated terms + "host")] in step
    order): what `compute_distributed` takes the peak of; tests read every moment from it.

    The moments' activations, logits, temporaries and in-flight gradients come from the step each rank
    computes: under FSDP mixed precision (accelerate: MixedPrecisionPolicy(param_dtype=bf16)) and
    DeepSpeed's 16-bit cast, every parameter reaches the compute in 16 bits, so that step is the
    single-device step with 16-bit parameters and adapters (`prepare=False`, `adapter_dtype` = the
    autocast dtype: no fp32 residual stream, no autocast copies of the adapters)."""
    from dataclasses import replace

    from .estimate import compute, static_part

    asked = plan
    single = compute(model, plan.single_device(), gpu)
    plan = single.plan.replace(**{k: getattr(plan, k) for k in DIST_FIELDS})  # with check_plan's changes
    strategy = plan.world_strategy
    if not single.moments:
        raise UnsupportedArchitectureError(f"{model.name}: no closed-form moments to shard (simulate-only model)")
    view = single
    cast16 = bool(plan.autocast) and strategy in ("fsdp", "deepspeed")
    static = single.moments[0].static
    if cast16 and model.is_moe and asked.prepare and not plan.prepare and plan.device == "cuda":
        # one GPU: grouped_mm refuses prepare's fp32 experts, so check_plan drops prepare; under FSDP's
        # mixed precision (param_dtype bf16) and DeepSpeed's cast the experts reach grouped_mm in 16 bits:
        # prepare runs (its fp32 parameters are what the ranks shard), measured with simulate per rank
        plan = plan.replace(prepare=True)
        kept = "fp32 (prepare_model_for_kbit_training upcasts them)"
        notes = [n.replace("leaves them in the load dtype", f"leaves them {kept}") for n in single.notes
                 if not n.startswith(_GROUPED_MM_NOTE)]
        notes.append(f"{strategy}: its mixed precision hands grouped_mm 16-bit experts, so prepare_model_for_kbit_"
                     "training runs (one GPU would need --no-prepare): each rank shards fp32 experts")
        single = replace(single, plan=single.plan.replace(prepare=True), notes=tuple(notes))
        static = static_part(model, single.plan, True).terms
    orig = _fsdp1_orig_params(plan)
    if cast16 and (single.plan.prepare or single.plan.adapter_dtype != plan.autocast or orig):
        view = compute(model, single.plan.replace(prepare=False, adapter_dtype=plan.autocast, **orig), gpu)
    w = shard_group(plan)
    version = plan.fsdp_version if strategy == "fsdp" else 2
    rnd = 512 if plan.device == "cuda" else 1
    world = _World(model, plan, rnd, w, version, units(model, plan),
                   gather_el=2 if cast16 and strategy == "fsdp" else 0, static=static,
                   view_grads=F.gradient_bytes(model, view.plan, rnd),
                   view_layer_grads=_view_layer_grads(model, view.plan, rnd))
    if strategy == "fsdp" and plan.method == "qlora" and plan.quant != "int8" and quant_storage_bytes(plan) == 1:
        world.replicated_base = world.static[Term.BASE_WEIGHTS]
    ms = list(view.moments)
    if strategy == "fsdp" and plan.fsdp_sharding_strategy != "NO_SHARD":
        ms = _layer_forwards(model, view.plan, ms, version == 2) + ms
    elif strategy == "deepspeed" and plan.zero_stage == 3 and model.layer_kinds:
        # ZeRO-3 gathers each layer for its forward too: an MoE layer's forward beside its gathered experts
        ms = _layer_forwards(model, view.plan, ms, False) + ms
    if strategy == "fsdp" and version == 2 and plan.fsdp_sharding_strategy != "NO_SHARD" \
            and not model.tie_word_embeddings:  # tied: the tail is gathered as the embedding runs (`_fsdp_alive`)
        at = next((k for k, m in enumerate(ms) if m.kind == "loss_forward"), None)
        if at is not None:
            ms.insert(at, _tail_gather(ms[at], view.plan, rnd))
    if strategy == "fsdp" and version == 2 and plan.fsdp_sharding_strategy != "NO_SHARD" and world.gather_el:
        at = next((k for k, m in enumerate(ms) if m.kind == "loss_forward"), None)
        if at is not None and not model.final_logit_softcapping:
            ms.insert(at, _lm_head_forward(ms[at], model, view.plan, rnd))
    if strategy == "fsdp" and version == 2 and plan.fsdp_sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD") \
            and world.gather_el and model.num_layers:
        at = next((k for k, m in enumerate(ms) if m.kind == "loss_backward"), None)
        if at is not None:
            ms.insert(at + 1, _backward_gather(ms[at], model, view.plan, rnd))
            ms.insert(at + 2, _backward_copy_out(model, view, ms[at + 1]))
    if _embed_regathered(plan, world.units):
        at = max((k for k, m in enumerate(ms) if m.phase == "backward"), default=len(ms) - 1) + 1
        ms.insert(at, _embed_backward_gather(model, view, ms))
    if _fsdp1_layer_end(plan, world.units):
        ms = _with_layer_ends(model, view, ms)
    return single, world, [(m, _rank_terms(world, m, single, world.notes)) for m in ms]


#: the single-device note of a CUDA MoE plan whose prepare check_plan drops (estimate._moe_checks)
_GROUPED_MM_NOTE = "grouped_mm on CUDA takes bf16 experts only"


def _view_layer_grads(model: ModelSpec, plan: TrainPlan, rnd: int) -> tuple[int, ...]:
    """Each decoder layer's gradients where the layers differ (as `estimate._mixed_step` sums them: the
    trainable groups of the layer's kind, `formulas.kind_view`); () when every layer is alike."""
    if not model.layer_kinds:
        return ()
    per_kind = {}
    for kind in set(model.layer_kinds):
        view = F.kind_view(model, kind == "moe")
        per_kind[kind] = sum(F.rounded(r * c * dt, rnd) for (r, c), dt, k in F._trainable_groups(view, plan)
                             if k == view.num_layers)
    return tuple(per_kind[k] for k in model.layer_kinds)


_CKPT_FORWARD: dict[tuple[Any, ...], tuple[tuple[int, int, int], ...]] = {}


def _checkpointed_forward(view: ModelSpec, plan: TrainPlan, cuda: bool) -> tuple[tuple[int, int, int], ...]:
    """The live bytes of one layer's forward under a non-reentrant checkpoint, as (per token, per token x
    sequence, constant) coefficients at each moment: the layer walk of `activations` (its flags as
    `estimate` gives them) with nothing kept for backward (the checkpoint's pack hook keeps no tensor),
    each tensor freed as the layer code releases it (what only autograd keeps -- perm // k, the router's
    div_ clone, the logsumexp -- the layer walk saves and drops at once: gone here). NB the walk
    releases a saved tensor only where the layer code drops it, so a tensor it takes as saved may be
    counted a little longer than it lives. The layer's input lives through the whole walk
    (`checkpointed_input_held`)."""
    from .activations import FUSED_4BIT_MAX_TOKENS, LayerModel, Lin, Walk, flash_varlen, sdpa_masked

    class Unsaved(Walk):
        held: frozenset = frozenset()  # what the caller references for the whole layer call

        def save(self, *ts: Any) -> None:
            for t in ts:
                self.hold(t)

        def drop(self, *ts: Any) -> None:
            super().drop(*(t for t in ts if t.sid not in self.held))

    T = plan.batch_size * plan.seq_len
    flags = (cuda and plan.method == "qlora" and T <= FUSED_4BIT_MAX_TOKENS, sdpa_masked(view, plan),
             flash_varlen(plan))
    key = (view, plan.shape_free_id, cuda, flags)  # the walk is symbolic in the shape
    hit = _CKPT_FORWARD.get(key)
    if hit is None:
        w = Unsaved()
        lm = LayerModel(view, plan, w, not cuda, *flags)
        x = w.new(Lin(t=1) * view.hidden_size, plan.precision.params, True)
        w.held = frozenset({x.sid}) if checkpointed_input_held(plan) else frozenset()
        lm.layer(x, 4 if view.arch.rope_fp32 else plan.precision.params)
        if len(_CKPT_FORWARD) > 512:
            _CKPT_FORWARD.clear()
        hit = _CKPT_FORWARD[key] = tuple((m.t + m.s, m.q, m.c) for m in w.moments)
    return hit


def checkpointed_input_held(plan: TrainPlan) -> bool:
    """Whether a checkpointed layer's input (the residual stream entering it, T x H in 16 bits) stays
    alive through that layer's whole forward, past the residual add where the layer code drops its own
    reference: the decoder loop of every transformers model (5.x, e.g. DeepseekV2Model.forward:
    `for decoder_layer in self.layers: hidden_states = decoder_layer(hidden_states, ...)`) rebinds
    `hidden_states` only when the call returns, and `GradientCheckpointingLayer.__call__` hands it to
    torch.utils.checkpoint (non-reentrant: `_checkpoint_without_reentrant_generator` keeps the args for
    the recompute; reentrant: `CheckpointFunction` saves them), so the walk with nothing saved
    (`_checkpointed_forward`) must not free it. Without checkpointing the layer's norm saves the input
    anyway. Measured with simulate per rank (FSDP2 FULL_SHARD, 3 cut layers): the forward phase of
    deepseek-v2-lite / qwen3-30b-a3b peaks inside the last MoE layer's experts, and read -2,040,320 /
    -2,048,000 B (the input's 2,097,152 B missing) before."""
    return bool(plan.gradient_checkpointing)


def _layer_forwards(model: ModelSpec, plan: TrainPlan, ms: list[Any], fsdp2: bool) -> list[Any]:
    """FSDP: the forward of the last layer of each kind (the gathered unit, with FSDP2 its flat all-gather
    output kept, is that layer's: an MoE layer gathers far more than a dense one), beside the single-device
    moments. Without checkpointing: every earlier layer's saved set, as `estimate.forward_moment` (the
    last layer's forward is that moment itself). With checkpointing: the checkpointed inputs of the
    layers below it and the layer's forward under the checkpoint (`_checkpointed_forward`: nothing
    saved). FSDP2 also: the layer's all-gather copy-out (`gather:layer<i>`,
    before its forward computes: its unsharded parameters, its flat all-gather output and the previous
    unit's, still kept in `comm_ctx.all_gather_state`), which peaks where one layer's experts are large."""
    from .activations import packed_rows
    from .estimate import make_step

    L, gc = model.num_layers, plan.gradient_checkpointing
    kinds = model.layer_kinds or ("",) * L
    last = {L - 1 - kinds[::-1].index(k) for k in set(kinds)}
    # the copy-out of a kind's first layer keeps the unit below's flat output (the embedding's for layer 0)
    gathers = (last | {kinds.index(k) for k in set(kinds)}) if fsdp2 else set()
    forwards = last if gc else last - {L - 1}
    layers = sorted(gathers | forwards)
    if not layers:
        return []
    s = make_step(model, packed_rows(plan), plan.device == "cuda", 2 * plan.batch_size)
    out = []
    if fsdp2:  # the forward's first all-gather after the root's: the embedding's (tied: the tail's)
        m = s.moment("forward", 0, s.ga_grads, 0, 0, 0)
        out.append(m._replace(name="forward:gather_embed", kind="embed_gather", layer=None,
                              description="FSDP2's all-gather of the input embedding (its copy-out: the root's flat "
                                          "all-gather output still kept), before it runs"))
    for i in layers:
        ap = s.layer_kind[i][1] if s.layer_kind else s.ap  # layer i's kind's profile
        if gc:  # the checkpointed inputs of the layers below and the layer's own input
            earlier = i * ap.layer_input_bytes + s.layer_args
        elif s.saved_layers:
            earlier = sum(s.saved_layers[:i])
        else:
            earlier = ap.first_layer_bytes + (i - 1) * ap.layer_bytes if i else 0
        peak = ap.forward_peak
        if gc:  # the layer's forward under its checkpoint: its own input and locals, nothing saved
            p = packed_rows(plan)
            T, S = p.batch_size * p.seq_len, p.seq_len
            view = F.kind_view(model, kinds[i] == "moe") if model.layer_kinds else model
            peak = max(a * T + b * T * S + c for a, b, c in _checkpointed_forward(view, p, p.device == "cuda"))
        m = s.moment("forward", i, s.ga_grads, earlier + ap.rope_bytes + ap.embed_leaf_bytes + ap.mask_bytes
                      + peak - ap.forward_temps, 0, ap.forward_temps + ap.forward_masks)
        if i in gathers:
            own = ap.layer_input_bytes if gc else 0
            out.append(m._replace(
                name=f"forward:gather{i}", kind="layer_gather", description=f"FSDP2's all-gather of layer {i} of {L} "
                "(its copy-out: the previous unit's flat all-gather output still kept), before its forward",
                allocated_bytes=m.allocated_bytes - peak + own, activations=m.activations - peak
                + ap.forward_temps + own, temporaries=ap.forward_masks))
        if i in forwards:
            out.append(m._replace(name=f"forward:layer{i}", description=f"the forward of layer {i} of {L}"
                                  + (" (checkpointed)" if gc else ", every earlier layer's activations saved")))
    return out


def _fsdp1_orig_params(plan: TrainPlan) -> dict[str, Any]:
    """The fields that tell the layer walk (`activations.LayerModel`) a rank computes under FSDP1 with
    use_orig_params: every adapted module saves its own 16-bit cast of its input (peft's cast to the fp32 of the
    sharded original lora_A weight, FSDP's cast back to param_dtype); {} otherwise. The view plan is a
    single-device plan: these two fields are its only distributed ones."""
    if plan.world_strategy == "fsdp" and plan.fsdp_version == 1 and plan.fsdp_use_orig_params and \
            plan.method in ("qlora", "lora"):
        return {"fsdp_version": 1, "fsdp_use_orig_params": True}
    return {}


def _fsdp1_layer_end(plan: TrainPlan, us: tuple[Unit, ...]) -> bool:
    """Whether FSDP1 gathers the layer below while a layer's backward ends (`_with_layer_ends`): peft's units
    (LoRA Linears their own units), FULL_SHARD / HYBRID_SHARD, a backward prefetch, two layers or more."""
    return (plan.world_strategy == "fsdp" and plan.fsdp_version == 1 and plan.fsdp_backward_prefetch != "NO_PREFETCH"
            and plan.fsdp_sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
            and any(".lora." in u.name for u in us)
            and max((u.layer or 0) for u in us) >= 1)


def _with_layer_ends(model: ModelSpec, view: Any, ms: list[Any]) -> list[Any]:
    """FSDP1's prefetch at the end of a layer's backward, as a moment per layer i >= 1 (the last and layer 1):
    `layer_end:i`, the backward of layer i's input norm, with layer i-1's frozen unit gathered beside layer i's.

    Why: FSDP1 prefetches the handle before the current one in post-forward order
    (torch/distributed/fsdp/_runtime_utils.py `_prefetch_handle`, _exec_order_utils.py
    `get_handle_to_backward_prefetch`): with peft's units that is layer i's first LoRA unit (q_proj.lora_A) ->
    layer i-1's frozen unit, at that unit's pre-backward (BACKWARD_PRE) or post-backward (BACKWARD_POST); layer
    i's frozen unit has no gradient, so it reshards only when the gradient of its input is made
    (`_post_backward_reshard_only_hook`): both are gathered through layer i's input norm backward.

    Alive then (the single-device step each rank computes): the activations below layer i (`layer_backward_state`'s
    `fixed`: the checkpointed inputs or the saved sets of the layers below, rotary, ids, its own input) and the
    input norm's fp32 copy of the layer input [T, H] (RMSNorm's `hidden_states.to(torch.float32)`, saved by pow
    and mul); in flight: the residual stream's gradient [T, H] and five fp32 [T, H] of the RMSNorm backward
    (pow, mul, div, mul, mul). Layer i's LoRA gradients are reduced (`_rank_terms`). NB measured on the meta trace
    of FSDP1 ranks (llama RMSNorm, tests/test_distributed_fsdp1.py); other norms not checked."""
    from .estimate import layer_backward_state, make_step

    s = make_step(model, view.plan, view.plan.device == "cuda")
    L, T, H = model.num_layers, s.tokens, model.hidden_size
    out = list(ms)
    for i in sorted({L - 1, 1}, reverse=True):
        lb = layer_backward_state(s, i)
        fp32 = s.r(T * H * 4)
        acts, temps = lb.fixed + fp32, 5 * fp32 + s.r(T * H * s.ap.stream_dt)
        tmpl = next(m for m in ms if m.layer is not None)  # the static terms: every moment's
        m = tmpl._replace(name=f"layer_end:{i}", kind="layer_end", phase="backward", layer=i,
                          description=f"the end of layer {i}'s backward (its input norm): FSDP1 has prefetched "
                                      f"layer {i - 1}'s frozen unit, layer {i}'s still gathered",
                          allocated_bytes=tmpl.allocated_bytes - tmpl.gradients - tmpl.activations - tmpl.logits
                          - tmpl.temporaries + lb.grads + acts + temps,
                          gradients=lb.grads, activations=acts, logits=0, temporaries=temps)
        at = max((k for k, mm in enumerate(out) if mm.layer is not None and mm.layer >= i), default=-1) + 1
        out.insert(at, m)
    return out


def _loss_only(plan: TrainPlan, rnd: int) -> int:
    """What the loss moment's activations hold that the forward has not made yet: the shifted labels ([B, S+1]
    int64, padded by one) and the loss with its gradient seed (`estimate.loss_forward_moment`)."""
    from .activations import packed_rows

    p = packed_rows(plan)
    return F.rounded(8 * p.batch_size * (p.seq_len + 1), rnd) + 2 * F.rounded(4, rnd)


def _tail_gather(loss: Any, plan: TrainPlan, rnd: int) -> Any:
    """FSDP2's last all-gather of the forward: the tail's (lm_head) copy-out, with the previous unit's flat
    output still kept and the tail's own flat output alive (`wait_for_unshard` frees the previous one
    after the copy-out): the saved activations of the whole forward (the final norm's output included), no
    logits, labels or loss yet (`_loss_only`; measured with simulate per rank: the forward phase peak of a
    70B, to the byte)."""
    acts = loss.activations - _loss_only(plan, rnd)
    return loss._replace(name="forward:tail_gather", kind="tail_gather", phase="forward",
                         description="the end of forward: FSDP2 all-gathers the tail (lm_head), the previous "
                                     "unit's all-gather output still kept",
                         allocated_bytes=loss.allocated_bytes - loss.logits - loss.temporaries - loss.activations
                         + acts, logits=0, temporaries=0, activations=acts)


def _lm_head_forward(loss: Any, model: ModelSpec, plan: TrainPlan, rnd: int) -> Any:
    """FSDP2 with mixed precision: the end of forward, lm_head's 16-bit output computed with the tail gathered
    (its unsharded parameters and its flat all-gather output, kept until the root's forward returns): the
    loss moment before the loss computes (no fp32 copy or log-softmax yet, neither the shifted labels nor
    the loss and its gradient seed). Measured with simulate per rank (the forward phase peak of dense
    untied models)."""
    from .activations import packed_rows

    p = packed_rows(plan)
    tv = p.batch_size * p.seq_len * model.vocab_size
    logits = F.rounded(plan.precision.logits * tv, rnd)
    acts = loss.activations - _loss_only(plan, rnd)
    return loss._replace(name="forward:lm_head", kind="lm_head_forward", phase="forward",
                         description="the end of forward: lm_head's output, the tail gathered",
                         allocated_bytes=loss.allocated_bytes - loss.logits - loss.temporaries - loss.activations
                         + logits + acts, logits=logits, activations=acts, temporaries=0)


def _backward_gather(loss: Any, model: ModelSpec, plan: TrainPlan, rnd: int) -> Any:
    """FSDP2 FULL_SHARD / HYBRID_SHARD with mixed precision: the start of backward, where the tail's
    pre-backward prefetches the last layer (torch/distributed/fsdp/_fully_shard/_fsdp_state.py
    `_pre_backward` -> `_backward_prefetch`): its all-gather (`foreach_all_gather`: the rank's shard of every
    parameter not in param_dtype cast into one input buffer, and the flat output) while the logits' gradient
    (16-bit, the log-softmax's fp32 buffers freed) waits for lm_head's backward. Measured with simulate per
    rank (qwen1.5-moe, 3 layers, 2 ranks: the backward phase peak, a 1.6 GB MoE layer)."""
    from .activations import packed_rows

    p = packed_rows(plan)
    tv = p.batch_size * p.seq_len * model.vocab_size
    fp32 = 3 * F.rounded(4 * tv, rnd)  # the loss backward's log-softmax output, its gradient, the logits' gradient
    logits = loss.logits - fp32 + F.rounded(plan.precision.logits * tv, rnd)
    return loss._replace(name="backward:gather_last", kind="backward_gather", phase="backward",
                         description="the start of backward: FSDP2 all-gathers the last layer (its cast input and "
                                     "flat output) beside the tail and the logits' gradient",
                         allocated_bytes=loss.allocated_bytes - loss.logits + logits, logits=logits)


def _backward_copy_out(model: ModelSpec, view: Any, gather: Any) -> Any:
    """FSDP2 FULL_SHARD / HYBRID_SHARD: the last layer's copy-out at the start of backward. The tail's
    pre-backward prefetched the last layer (`_backward_gather`: its flat all-gather output,
    `_all_gather_result`); once lm_head's and the final norm's backward have run (the tail resharded by its
    post_backward, the logits' gradient freed), the layer's pre-backward (torch/distributed/fsdp/_fully_shard/
    _fsdp_state.py `_pre_backward` -> _fsdp_param_group.py `FSDPParamGroup.pre_backward` -> `unshard` ->
    `wait_for_unshard`) runs `foreach_all_gather_copy_out` (_fsdp_collectives.py): the unsharded parameters
    are resized to their padded full size (`FSDPParam.alloc_all_gather_outputs`: the shard padded on dim 0
    times the world) beside the flat output, both alive until the flat output is freed. The cast input is
    freed by then, so this outgrows `backward:gather_last` as the world grows (the cast input, 1/w of the
    layer, shrinks while the copy-out's two copies do not): the backward phase's peak for a large MoE layer
    from 4 ranks on (measured with simulate per rank, qwen1.5-moe 3 layers: tests/test_distributed_mixed.py).

    Alive then: the layers' saved inputs (checkpointed) and what the model keeps (rope, the embedding's leaf,
    layer arguments, the loss); in flight: the gradient of the last layer's output [T, H] in the stream's
    dtype; no layer's gradient yet (accumulated ones, with gradient accumulation, as the loss's)."""
    from .estimate import make_step

    s = make_step(model, view.plan, view.plan.device == "cuda")
    ap, T, H = s.ap, s.tokens, model.hidden_size
    grad = s.r(T * H * ap.stream_dt)
    acts = (s.layers_saved + ap.rope_bytes + ap.embed_leaf_bytes + s.layer_args + s.small
            + model.num_layers * s.rng_state + s.kept)
    return gather._replace(name="backward:copy_out_last", kind="backward_copy_out", phase="backward",
                           description="the start of backward: FSDP2 copies the prefetched last layer out of its "
                                       "all-gather output (both alive), the tail resharded",
                           allocated_bytes=gather.allocated_bytes - gather.activations - gather.logits
                           - gather.temporaries + acts + grad,
                           activations=acts, logits=0, temporaries=grad)


def _embed_regathered(plan: TrainPlan, us: tuple[Unit, ...]) -> bool:
    """Whether FSDP2 all-gathers the input embedding again at the end of backward (`_embed_backward_gather`):
    FULL_SHARD / HYBRID_SHARD (SHARD_GRAD_OP keeps it gathered from its forward), the embedding its own unit
    (untied: a tied one is in the tail group, gathered to the end of backward), and in the backward graph:
    enable_input_require_grads makes its output require grad (checkpointing or prepare_model_for_kbit_training,
    as `_fsdp_alive_untied` prefetches it)."""
    return (plan.world_strategy == "fsdp" and plan.fsdp_version == 2
            and plan.fsdp_sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
            and (plan.gradient_checkpointing or plan.prepare)
            and any(u.layer is not None for u in us)
            and any(u.layer is None and not u.keep_after_forward and not u.root and not u.idle for u in us))


def _embed_backward_gather(model: ModelSpec, view: Any, ms: list[Any]) -> Any:
    """FSDP2 FULL_SHARD / HYBRID_SHARD: the end of backward, the input embedding's copy-out
    (`_embed_regathered`). Layer 0's pre-backward prefetched the embedding (torch/distributed/fsdp/_fully_shard/
    _fsdp_state.py `_pre_backward` -> `_backward_prefetch`: its flat all-gather output, `_all_gather_result`);
    once layer 0's backward has made the gradient of the embedding's output, the pre-backward hook FSDP
    registered on that output (`_register_pre_backward_hook`) runs the embedding's `FSDPParamGroup.pre_backward`
    -> `unshard` -> `wait_for_unshard`: `foreach_all_gather_copy_out` copies the flat output into the unsharded
    parameters (resized to full), both alive until the flat output is freed after the copy-out. The frozen
    embedding makes no weight gradient; its post_backward reshards it. With a large vocabulary (a 70B's
    embedding: 2 x 2.1 GB) this is the backward phase's peak.

    Alive then (measured with simulate per rank: llama-3.1-70b, 2 layers, 2 / 4 / 8 ranks, to the byte): every
    layer's gradients reduced to their shards, layer 0's reduce-scatter input kept (`_rank_terms`), the root
    gathered; activations: the embedding's output, a leaf made to require grad by enable_input_require_grads
    and held by its AccumulateGrad node until backward ends (`embed_leaf_bytes` where layer 0's input is a
    copy of it), the loss and its gradient seed (and, reentrant checkpointing, what every layer's checkpoint
    ctx keeps: cos/sin, position ids and masks, its CPU RNG state: measured +532,480 B on the 70B, 2 ranks);
    in flight: the gradient of the embedding's output [T, H] in the stream's dtype."""
    from .estimate import make_step

    s = make_step(model, view.plan, view.plan.device == "cuda")
    ap, T, H = s.ap, s.tokens, model.hidden_size
    grad = s.r(T * H * ap.stream_dt)
    leaf = ap.embed_leaf_bytes or grad
    # reentrant checkpointing: every layer's CheckpointFunction ctx lives until backward ends, and with it the
    # arguments its run_function binds (cos/sin, position ids, masks) and its CPU RNG state
    reentrant = view.plan.gradient_checkpointing and view.plan.use_reentrant
    held = ap.rope_bytes + s.layer_args + model.num_layers * s.rng_state if reentrant else 0
    acts = leaf + s.small + s.kept + held
    grads = s.static.gradients
    tmpl = next(m for m in ms if m.layer is not None)  # the static terms: every moment's
    return tmpl._replace(name="backward:gather_embed", kind="embed_backward_gather", phase="backward", layer=None,
                         description="the end of backward: FSDP2 copies the prefetched input embedding out of its "
                                     "all-gather output (both alive), every layer's gradients reduced",
                         allocated_bytes=tmpl.allocated_bytes - tmpl.gradients - tmpl.activations - tmpl.logits
                         - tmpl.temporaries + grads + acts + grad,
                         gradients=grads, activations=acts, logits=0, temporaries=grad)


def _cast_input(world: _World, u: Unit) -> int:
    """FSDP2's all-gather input buffer of unit `u` under mixed precision: the rank's (padded) shard of each
    parameter whose dtype is not param_dtype, cast to it in one buffer (`foreach_all_gather`,
    `FSDPParam.all_gather_inputs`); freed once the all-gather has run."""
    el = world.gather_el
    if not el:
        return 0
    return F.rounded(sum(p.shard(world.w) * el for p in u.params if p.el != el), world.rnd)


def compute_distributed(model: ModelSpec, plan: TrainPlan, gpu: Any = None) -> Any:
    """The Estimate of a distributed plan: `terms` and `peak` of the busiest rank, every rank in
    `ranks`, the node's host RAM in `host` (see the module docstring)."""
    from dataclasses import replace

    from .estimate import cuda_overheads

    single, world, per_moment = rank_moments(model, plan, gpu)
    plan = world.plan
    cuda = plan.device == "cuda"
    alloc = [sum(t.get(k, 0) for k in ALLOCATED_TERMS) for _, t in per_moment]
    i = alloc.index(max(alloc))
    m, terms = per_moment[i]
    host_rank = terms["host"]
    terms = {t: int(terms.get(t, 0)) for t in Term}
    terms[Term.WORKSPACE] = 0
    if cuda:
        cuda_overheads(terms, gpu, alloc[i])
        ws = terms[Term.WORKSPACE]
        totals = {mm.name: a + ws for (mm, _), a in zip(per_moment, alloc)}
    else:
        terms[Term.ALLOCATOR_OVERHEAD] = terms[Term.CUDA_CONTEXT] = 0
        totals = {mm.name: a for (mm, _), a in zip(per_moment, alloc)}
    ranks = tuple(RankResult(r, dict(terms), m.phase, m.name) for r in range(plan.num_processes))
    host = _host(world, host_rank)
    paged = _paged(world, single.paged_bytes, cuda)
    notes = _notes(world, terms, host) + [n for n in single.notes if not n.startswith("peak: ")
                                          and not (n.startswith("paged optimizer") and not paged)]
    notes.insert(0, f"peak (every rank): {m.description}")
    return replace(single, plan=plan, terms=terms, peak_phase=m.phase, moment=m.name, phase_peaks=totals,
                   notes=tuple(notes), ranks=ranks, host=host, paged_bytes=paged)


def _paged(world: _World, single_paged: int, cuda: bool) -> int:
    p = world.plan
    if not cuda or not single_paged or p.world_strategy == "ddp":
        return single_paged
    if p.world_strategy == "fsdp" and not p.fsdp_offload_params:
        return _optimizer_on(_trainable(world.units), world.w, p, world.rnd, True, False)[1]
    if p.world_strategy == "deepspeed" and p.offload_optimizer_device == "none":
        return _optimizer_on(_trainable(world.units), world.w, p, world.rnd, True, True)[1]
    return 0


def _rank_terms(world: _World, m: Any, single: Any, notes: list[str]) -> dict[Any, int]:
    """One rank's allocated terms at the single-device moment `m` (plus "host": that rank's offloaded
    bytes by Term)."""
    plan, rnd, w, us = world.plan, world.rnd, world.w, world.units
    s = plan.world_strategy
    cuda = plan.device == "cuda"
    t: dict[Any, int] = {k: 0 for k in ALLOCATED_TERMS}
    st = world.static
    t[Term.QUANT_STATE] = st[Term.QUANT_STATE]
    t[Term.ACTIVATIONS], t[Term.LOGITS], t[Term.TEMPORARIES] = m.activations, m.logits, m.temporaries
    host: dict[Term, int] = {}
    # parameters that are neither in a unit nor a quant state: buffers (rotary inv_freq, embed_scale), replicated
    agg = world.sums()
    single_plan = single.plan
    # (the single-device static minus the units' inventory in the single-device dtypes: FSDP's biases differ)
    buffers = max(0, st[Term.OTHER_PARAMS] - world.single_other()) if s != "deepspeed" else max(
        0, F.other_params_bytes(world.model, single_plan, rnd) - _uncast_other(world))
    t[Term.OTHER_PARAMS] += buffers
    L = world.model.num_layers
    layer_units = agg["layer_units"]
    kind, i = m.kind, m.layer
    full_grads = agg["full_grads"]
    ga = plan.gradient_accumulation_steps > 1
    trainable = agg["trainable"]

    if s == "ddp":
        for k in (Term.BASE_WEIGHTS, Term.OTHER_PARAMS, Term.ADAPTER_WEIGHTS, Term.OPTIMIZER_STATE):
            t[k] = st[k]
        t[Term.GRADIENTS] = m.gradients
        t[Term.COMM_BUFFERS] = _ddp_buckets(trainable, plan, rnd)
        t["host"] = host
        return t

    if s == "deepspeed":
        return _zero(world, m, t, host, trainable, full_grads, ga)

    # FSDP (1 or 2); NO_SHARD: w == 1, nothing gathered (the all-reduce of one unit's gradients in flight)
    offload = plan.fsdp_offload_params
    nos = plan.fsdp_sharding_strategy == "NO_SHARD"
    alive, prefetched, retained = _fsdp_alive(world, kind, i, L, layer_units)
    _add(host if offload else t, world.shards())
    t[Term.BASE_WEIGHTS] += world.replicated_base
    if not nos:
        # gathered parameters (the per-parameter all-gather outputs), and FSDP2's flat all-gather outputs:
        # the prefetched unit's (not yet copied out) and the last forward all-gather's (kept in
        # comm_ctx.all_gather_state until the next copy-out); FSDP1 gathers the prefetched unit whole
        t[Term.COMM_BUFFERS] += sum(world.full(u) for u in us if u.name in alive)
        if world.version == 2:
            t[Term.COMM_BUFFERS] += sum(world.flat(u) for u in us if u.name in prefetched | retained)
            if kind == "backward_gather":  # the last layer's all-gather: its cast input and flat output
                t[Term.COMM_BUFFERS] += sum(world.flat(u) + _cast_input(world, u) for u in layer_units
                                            if u.layer == L - 1)
        else:
            t[Term.COMM_BUFFERS] += sum(world.full(u) for u in us if u.name in prefetched)
    elif world.version == 1 and world.gather_el and i is not None:
        # FSDP1 NO_SHARD with mixed precision: a unit whose dtype differs from param_dtype computes with a
        # low-precision copy (`_mp_shard`, FlatParamHandle._use_low_precision_shard), alive around its compute:
        # the fp32 LoRA units in use (measured: 24,576 B on real 2-rank gloo steps)
        t[Term.COMM_BUFFERS] += sum(world.full(u) for u in us if u.name in alive and u.layer is not None and any(
            p.el != world.gather_el for p in u.params))
    # gradients: sharded for the units done, the current layer's in flight unsharded
    shard_grads, layer_shard = agg["shard_grads"], agg["layer_shard"]
    ga_view = world.view_grads if ga else 0
    if kind == "optimizer":
        grads_dev = shard_grads
        scratch_ratio = shard_grads / full_grads if full_grads else 0
        t[Term.TEMPORARIES] = int(m.temporaries * scratch_ratio) if not offload else 0
    elif kind == "layer_end":  # layer i's gradients reduced (FSDP1 frees each unit's once reduce-scattered)
        grads_dev = shard_grads if ga else sum(layer_shard[i:])
    elif kind == "embed_backward_gather":  # every layer's gradients reduced, layer 0's reduce-scatter input kept
        grads_dev = shard_grads
        t[Term.COMM_BUFFERS] += _reduce_scatter_input(world, [u for u in layer_units if u.layer == 0])
        if plan.fsdp_sharding_strategy == "HYBRID_SHARD" and plan.num_machines > 1:
            t[Term.COMM_BUFFERS] += _hsdp_all_reduce_inputs(world, layer_units)
    elif i is not None and kind not in ("forward", "layer_gather"):
        in_flight = max(0, m.gradients - ga_view - world.view_above(i))
        grads_dev = (shard_grads if ga else sum(layer_shard[i + 1:])) + in_flight
        if world.version == 2 and i < L - 1 and not nos:
            # the previous unit's reduce-scatter input, in the reduce dtype (FSDP2 keeps one:
            # reduce_scatter_max_input_buffers; FSDP1 frees it once reduced)
            t[Term.COMM_BUFFERS] += _reduce_scatter_input(world, [u for u in layer_units if u.layer == i + 1])
            if plan.fsdp_sharding_strategy == "HYBRID_SHARD" and plan.num_machines > 1:
                t[Term.COMM_BUFFERS] += _hsdp_all_reduce_inputs(world, [u for u in layer_units if u.layer > i])
    else:
        grads_dev = shard_grads if ga else 0
    if offload:
        host[Term.GRADIENTS] = shard_grads
        reduced = ga or kind in ("optimizer", "layer_end", "embed_backward_gather")
        grads_dev -= min(grads_dev, shard_grads if reduced else sum(layer_shard[i + 1:]) if i is not None else 0)
        host[Term.OPTIMIZER_STATE] = _optimizer_on(trainable, w, plan, 1, False, False)[0]  # steps on the CPU
    else:
        dev = world.fsdp_optimizer(cuda)
        t[Term.OPTIMIZER_STATE] = dev
    t[Term.GRADIENTS] = grads_dev
    t["host"] = host
    return t


def _reduce_scatter_input(world: _World, done: list[Unit]) -> int:
    """FSDP2's reduce-scatter input of the units `done` (one decoder layer's): their unsharded trainable
    gradients in the reduce dtype, one padded buffer, kept until the next unit's reduce-scatter
    (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py `FSDPParamGroup.post_backward`:
    `reduce_scatter_state`; FSDP1 frees it once reduced)."""
    return sum(F.rounded(sum(v for _, v in _unit_bytes(tuple(p for p in u.params if p.trainable), world.w, 1, 2,
                                                      True, world.gather_el)), world.rnd) for u in done)


def _hsdp_all_reduce_inputs(world: _World, done: list[Unit]) -> int:
    """FSDP2 HYBRID_SHARD: each unit reduced so far keeps its all-reduce input (the reduce-scatter output: its
    trainable gradients' shard in the reduce dtype, padded) until the end of backward
    (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py `FSDPParamGroup.post_backward`:
    `_all_reduce_state = AllReduceState(all_reduce_input, ...)`, per group, cleared by the group's next
    post-backward or `finalize_backward`). Measured on real 2 x 2 gloo ranks (+65,536 B at layer 0)."""
    return sum(F.rounded(sum(p.shard(world.w) * (world.gather_el or p.el) for p in u.params if p.trainable), world.rnd)
               for u in done)


def _cpu_adam(params: list[Param], w: int, rnd: int, flat: bool) -> int:
    """An optimizer that steps on the host: fp32 AdamW state (two states) of each rank's shard (torch
    AdamW on CPU for FSDP offload; DeepSpeedCPUAdam for ZeRO offload_optimizer)."""
    if flat:
        return 2 * 4 * ceil(sum(p.numel for p in params) / w)
    return sum(2 * 4 * p.shard(w) for p in params) if params else 0


def _uncast_other(world: _World) -> int:
    """OTHER_PARAMS of the units in the plan's own dtypes (before DeepSpeed's cast), w = 1."""
    total = 0
    plan = world.plan.replace(strategy="fsdp")  # the same inventory, no DeepSpeed cast
    for u in units(world.model, plan, single=True):
        total += u.bytes(1, world.rnd, 2)[Term.OTHER_PARAMS]
    return total


def _fsdp_alive(world: _World, kind: str, i: int | None, L: int,
                layer_units: list[Unit]) -> tuple[set[str], set[str], set[str]]:
    """(units gathered at the moment, units prefetched: all-gathered, not yet copied out, units whose
    flat all-gather output FSDP2 still keeps: the last forward all-gather's).

    FSDP2 with tied embeddings: the tail group [input_embed, lm_head] is gathered as the embedding runs
    (the first all-gather after the root's) and, reshard_after_forward=False, stays gathered to the end of
    backward (measured with simulate per rank on Gemma 3: tests/test_distributed_mixed.py)."""
    alive, pre, kept = _fsdp_alive_untied(world, kind, i, L, layer_units)
    if kind != "optimizer" and world.version == 2 and world.model.tie_word_embeddings:
        tops = [u for u in world.units if u.layer is None and not u.idle]
        tail = {u.name for u in tops if u.keep_after_forward and not u.root}
        alive |= tail
        if kind == "layer_gather" and i == 0:
            kept |= tail  # the tail's all-gather was the one before layer 0's
        if kind == "embed_gather":
            kept |= tail
        elif i is None and kind != "tail_gather" and kept & tail:
            # its flat output was freed at layer 0's copy-out: the last forward all-gather is the last layer's
            kept = (kept - tail) | {min(u.name for u in layer_units if u.layer == L - 1)}
    return alive, pre, kept


def _fsdp_alive_untied(world: _World, kind: str, i: int | None, L: int,
                       layer_units: list[Unit]) -> tuple[set[str], set[str], set[str]]:
    p = world.plan
    names: dict[int, set[str]] = {}
    for u in layer_units:
        names.setdefault(u.layer, set()).add(u.name)

    def layers(lo: int, hi: int) -> set[str]:
        return set().union(*(names[j] for j in range(lo, hi)))

    tops = [u for u in world.units if u.layer is None and not u.idle]
    keep = {u.name for u in tops if u.keep_after_forward}
    root = {u.name for u in tops if u.root}
    tail = keep - root
    embed = {u.name for u in tops} - keep
    after_forward = p.fsdp_sharding_strategy == "SHARD_GRAD_OP"
    alive: set[str] = set()
    pre: set[str] = set()
    kept: set[str] = set()
    if kind == "optimizer":
        return alive, pre, kept
    if kind == "embed_gather":  # the embedding's copy-out (tied: the tail's, added by `_fsdp_alive`)
        alive |= root | embed
        kept |= root | embed
        return alive, pre, kept
    if kind == "layer_gather":  # layer i's copy-out: its flat output and the previous unit's kept
        alive |= names[i] | root
        kept |= {sorted(names[i])[0]} | ({sorted(names[i - 1])[0]} if i else embed)
        if after_forward:
            alive |= embed | layers(0, i)
        return alive, pre, kept
    if kind == "forward":  # layer i's forward (the last layer's, or a layer of another kind)
        j = L - 1 if i is None else i
        alive |= names[j] | root
        kept |= {next(iter(sorted(names[j])))} if world.version == 2 else set()
        if after_forward:
            alive |= embed | layers(0, j + 1)
        return alive, pre, kept
    if kind == "tail_gather":  # the tail's copy-out: the last layer's flat output kept, the tail's alive
        alive |= keep
        kept |= tail | {sorted(names[L - 1])[0]}
        if after_forward:
            alive |= embed | layers(0, L)
        return alive, pre, kept
    if kind == "backward_copy_out":  # the last layer's copy-out (`_backward_copy_out`): its flat all-gather
        return names[L - 1] | root, set(), {sorted(names[L - 1])[0]}  # output and its unsharded parameters
    if i is None:  # the loss: the tail (and the root) gathered; the tail's flat output kept until the root's
        alive |= keep  # forward returns (FSDPState._post_forward of the forward root frees all_gather_state)
        kept |= tail if world.version == 2 and kind not in ("loss_backward", "backward_gather") else set()
        if after_forward:
            alive |= embed | layers(0, L)
        elif world.version == 1 and kind == "loss_backward" and p.fsdp_backward_prefetch == "BACKWARD_PRE":
            # FSDP1 prefetches in reverse post-forward order: the root's backward gathers the last layer's
            # frozen unit (its LoRA units finished their forward before it)
            pre |= {n for n in names[L - 1] if ".lora." not in n}
        return alive, pre, kept
    if kind == "embed_backward_gather":  # the embedding's copy-out (`_embed_backward_gather`): its flat
        return root | embed, set(embed), kept  # all-gather output (prefetched) and its unsharded parameters
    if kind == "layer_end":  # FSDP1 (`_with_layer_ends`): layer i's frozen unit and layer i-1's prefetched one
        frozen = {n for n in names[i] if ".lora." not in n}
        return alive | frozen | keep, {n for n in names[i - 1] if ".lora." not in n}, kept
    lora1 = world.version == 1 and any(".lora." in n for n in names[i])
    alive |= (_fsdp1_in_use(world, names[i], kind) if lora1 and not after_forward else names[i]) | root
    if after_forward:
        alive |= embed | layers(0, i)
    elif lora1:
        pass  # NB: FSDP1's BACKWARD_PRE prefetches the next unit in backward order: a LoRA unit (not counted)
    elif world.version == 2 or p.fsdp_backward_prefetch == "BACKWARD_PRE":
        if i > 0:
            pre |= names[i - 1]
        elif embed and (p.gradient_checkpointing or p.prepare):
            pre |= embed  # enable_input_require_grads: the embedding's output needs a gradient, FSDP gathers it
    if world.version == 1:
        alive |= keep  # FSDP1's root (embedding, norm, lm_head) stays gathered until the end of backward
    return alive, pre, kept


def _fsdp1_in_use(world: _World, layer: set[str], kind: str = "") -> set[str]:
    """FSDP1 with peft's wrap policy: of a layer's units, the ones gathered while it computes: the layer's
    frozen unit and, with BACKWARD_PRE, one adapted module's lora_A and lora_B units (each LoRA Linear is its
    own unit, gathered around its own forward / backward and resharded after it; lora_B's pre-backward
    prefetches lora_A): the pair with the largest all-gather (measured on real 2-rank gloo FSDP1 steps: 24,576 B
    of LoRA gathered in bf16 at the recompute of layer 0). BACKWARD_POST / NO_PREFETCH (meta trace, 2 ranks):
    the recompute stops in the last adapted module's lora_B, the only LoRA unit gathered then (8,192 B); in the
    MLP backward none with NO_PREFETCH; BACKWARD_POST's prefetch after lora_A's backward is taken as the pair
    (NB: not the peak of any plan measured)."""
    by = {u.name: u for u in world.units}
    lora = sorted((n for n in layer if ".lora." in n), key=lambda n: int(n.rsplit(".", 1)[1]))
    pairs = [lora[k:k + 2] for k in range(0, len(lora), 2)]
    prefetch = world.plan.fsdp_backward_prefetch
    if prefetch != "BACKWARD_PRE" and kind == "recompute":
        return (layer - set(lora)) | set(lora[-1:])
    if prefetch == "NO_PREFETCH":
        return layer - set(lora)
    best = max(pairs, key=lambda pr: sum(world.full(by[n]) for n in pr), default=[])
    return (layer - set(lora)) | set(best)


def _ddp_buckets(trainable: list[Param], plan: TrainPlan, rnd: int) -> int:
    """DDP's reducer buckets: the trainable gradients' bytes per dtype, in buckets of
    `ddp_bucket_cap_mb` (the first 1 MiB), each its own allocation (torch/nn/parallel/distributed.py
    `_build_params_for_reducer`, `dist._compute_bucket_assignment_by_size`). NB bucket boundaries
    fall between parameters; taken as full buckets."""
    by_dtype: dict[int, int] = {}
    for p in trainable:
        by_dtype[p.el] = by_dtype.get(p.el, 0) + p.numel * p.el
    cap = int(plan.ddp_bucket_cap_mb * MiB)
    total = 0
    for n in by_dtype.values():
        first = min(n, DDP_FIRST_BUCKET_BYTES)
        rest = n - first
        total += F.rounded(first, rnd) + (rest // cap) * F.rounded(cap, rnd) + F.rounded(rest % cap, rnd)
    return total


def _zero(world: _World, m: Any, t: dict[Any, int], host: dict[Term, int], trainable: list[Param],
          full_grads: int, ga: bool) -> dict[Any, int]:
    """DeepSpeed ZeRO-2 / ZeRO-3 at the moment `m` (see the module docstring)."""
    plan, rnd, w, us = world.plan, world.rnd, world.w, world.units
    stage = plan.zero_stage
    b = zero_buckets(world.model, plan)
    kind, i = m.kind, m.layer
    thr = b["stage3_param_persistence_threshold"]
    off_param = stage == 3 and plan.offload_param_device == "cpu"
    off_opt = plan.offload_optimizer_device == "cpu"
    gathered_units = _zero3_gathered(world, kind, i, thr, b) if stage == 3 else set()
    for u in us:
        for p in u.params:
            whole = F.rounded(p.numel * p.el, rnd)
            if stage == 2:
                t[p.term] += whole  # ZeRO-2: replicated
                continue
            # ZeRO-3: every parameter partitioned (ds_tensor: ceil(numel / w), padded); the persistent ones
            # (numel < stage3_param_persistence_threshold) also whole: stage3.py `_post_step` all-gathers them
            # after every step and they are never released (ds_persist): comm_buffers, like gathered parameters
            part = F.rounded(ceil(p.numel / w) * p.el, rnd)
            if off_param:
                host[p.term] = host.get(p.term, 0) + part
            else:
                t[p.term] += part
            if p.numel < thr:
                t[Term.COMM_BUFFERS] += whole
            if u.name in gathered_units and p.numel >= thr:  # the gathered parameter (torch.cat of the partitions)
                t[Term.COMM_BUFFERS] += whole
    n_tr = sum(p.numel for p in trainable)
    part = ceil(n_tr / w)
    # ZeRO-3 keeps the gradient partition in gradient_accumulation_dtype, the 16-bit dtype under bf16/fp16
    # (deepspeed 0.19.8 runtime/zero/stage3.py: grad_partitions_flat_buffer = torch.zeros(..., dtype=
    # self.gradient_accumulation_dtype); measured: bf16 on real CPU ranks); ZeRO-2's is fp32 (stage_1_and_2.py)
    grad_el = 2 if stage == 3 and plan.autocast else 4
    grad_part = F.rounded(grad_el * part, rnd) if n_tr else 0
    master = F.rounded(4 * part, rnd) if n_tr else 0
    in_flight = 0
    if i is not None and kind != "optimizer":
        layer_full = world.sums()["layer_full"]  # each layer's own (mixed dense/MoE layers differ)
        in_flight = max(0, m.gradients - (full_grads if ga else 0) - sum(layer_full[i + 1:]))
        in_flight = min(in_flight, layer_full[i])
    # ZeRO-2 makes its fp32 gradient partition at the step (stage_1_and_2.py `step`: single_grad_partition
    # from the reduced 16-bit gradients); during backward only the in-flight gradients and the ipg bucket
    # exist (measured on real CPU ranks: no gradient partition alive at any backward peak)
    if stage == 3 or kind == "optimizer" or ga:
        grads_held = grad_part
    else:
        grads_held = 0
    if off_opt:
        host[Term.GRADIENTS] = grad_part
        host[Term.OPTIMIZER_STATE] = master + _cpu_adam(trainable, w, rnd, flat=True)
        if stage == 3 and n_tr:
            host[Term.GRADIENTS] += zero3_offload_fp32_grad(part)
        if stage == 2 and n_tr:
            # stage_1_and_2.py `step` (cpu_offload): the updated fp32 partition is copied to the device through
            # a 16-bit staging buffer, param_buffer_of_bit16_for_cpu_offload_groups (pinned host; kept)
            host[Term.COMM_BUFFERS] = host.get(Term.COMM_BUFFERS, 0) + F.rounded(2 * part, 1)
        t[Term.GRADIENTS] = in_flight
        t[Term.OPTIMIZER_STATE] = 0
        if kind == "optimizer":
            t[Term.TEMPORARIES] = 0
    else:
        t[Term.GRADIENTS] = grads_held + in_flight
        dev, _ = _optimizer_on(trainable, w, plan, rnd, plan.device == "cuda", True)
        t[Term.OPTIMIZER_STATE] = master + dev
        if kind == "optimizer":
            t[Term.TEMPORARIES] = int(m.temporaries * (grad_part / full_grads)) if full_grads else 0
    bucket = F.rounded(min(b["reduce_bucket_size"], max(n_tr, 1)) * 2, rnd) if n_tr else 0
    if stage == 3:
        # ZeRO-3's ipg buffer is reduce_bucket_size elements whatever the trainable count (stage3.py
        # `__init__`: bucket.buffer = torch.empty(self.reduce_bucket_size, ...) per communication dtype, with
        # contiguous_gradients; measured: 131,072 B with 57,344 trainable elements)
        t[Term.COMM_BUFFERS] += F.rounded(b["reduce_bucket_size"] * 2, rnd) if n_tr else 0
        prev = {u.name for u in us if u.layer == (i or 0) - 1}
        if i is not None and i > 0 and kind != "optimizer" and not prev <= gathered_units:
            nxt = sum(p.numel for u in us if u.layer == i - 1 for p in u.params if p.numel >= thr)
            t[Term.COMM_BUFFERS] += F.rounded(min(b["stage3_prefetch_bucket_size"], nxt) * 2, rnd)
    elif off_opt and n_tr and kind != "optimizer" and (i is not None or kind == "loss_backward"):
        # ZeRO-2 + offload_optimizer: the ipg buffer (setup_buckets, at the start of engine.backward) is in
        # _gradient_reduction_buffer_dtype, fp32 here (measured on real CPU ranks: 4 B x reduce_bucket_size)
        t[Term.COMM_BUFFERS] += F.rounded(min(b["reduce_bucket_size"], n_tr) * 4, rnd)
    elif i is not None and kind != "optimizer":
        t[Term.COMM_BUFFERS] += bucket  # ZeRO-2: the ipg buffer lives through backward
    if stage == 3:
        t[Term.COMM_BUFFERS] -= zero3_released_inputs(world, m, gathered_units, thr)
        t[Term.ACTIVATIONS] += zero3_saved_head_input(world, m) + zero3_input_ids(world, m) + \
            zero3_backward_scalars(world, m) + zero3_unadapted_inputs(world, m)
    t["host"] = host
    return t


#: the decoder-layer Linears that read the layer's (normed) input: the attention's input projections
#: (llama/qwen2/mistral q/k/v, fused qkv, DeepSeek MLA's down-projections)
_INPUT_SIDE = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack",
                         "q_a_proj", "kv_a_proj_with_mqa"})


def zero3_released_inputs(world: _World, m: Any, gathered: set[str], thr: int) -> int:
    """Bytes of gathered parameters ZeRO-3 has already released at `m` although their layer is counted
    gathered (`_zero3_gathered`): layer 0's input projections (q/k/v base weights) without checkpointing.

    deepspeed 0.19.8 runtime/zero/parameter_offload.py `_register_deepspeed_module`: a module enters the
    backward trace through `_pre_backward_module_hook` (PreBackwardFunctionForModule applied to its outputs),
    whose backward runs only for an output that requires grad. Without checkpointing nothing makes the
    embedding's output need a gradient (enable_input_require_grads is called with checkpointing only), so
    layer 0's frozen q/k/v (input: the embedding's output through the frozen input norm) produce outputs
    without grad: they are in the forward trace only, and partitioned_param_coordinator.py
    `__params_to_release` (no recurrence in `__submodule_order[step_id:]`) releases them right after their
    forward: gathered only during layer 0's forward. Their LoRA A/B (trainable) stay in the trace.
    Measured on 2 real CPU ranks (hidden 256): 262,144 B (bf16) / 65,536 B (packed 4-bit) less at loss:backward.
    NB the frozen biases of these projections (small, usually persistent) are left as gathered."""
    plan, model = world.plan, world.model
    L = model.num_layers
    if plan.gradient_checkpointing or plan.method == "full" or "layers.0" not in gathered:
        return 0
    if m.kind in ("forward", "tail_gather") and L == 1:
        return 0  # layer 0's forward itself: its q/k/v are gathered
    params_el = _cast(plan, plan.precision.params)
    qlora4 = plan.method == "qlora" and plan.quant != "int8"
    qs = quant_storage_bytes(plan) if plan.method == "qlora" else 0
    total = 0
    for lin in model.layer_linears:
        if lin.name.rsplit(".", 1)[-1] not in _INPUT_SIDE:
            continue
        n, el = ((lin.numel + 1) // (2 * qs), qs) if qlora4 else (lin.numel, 1 if plan.method == "qlora" else params_el)
        if n >= thr:
            total += F.rounded(n * el, world.rnd)
    return total


def zero3_saved_head_input(world: _World, m: Any) -> int:
    """ZeRO-3's memory-efficient linear keeps the frozen lm_head's input (the final norm's output,
    [B, S, H] in the compute dtype) from the lm_head's forward to its backward: the loss moments.

    deepspeed 0.19.8 runtime/zero/partition_parameters.py `Init.__init__(module=...)` (what
    `deepspeed.initialize` uses to partition an existing module) calls `_enable_mem_efficient_linear`
    (zero_optimization.memory_efficient_linear, default True): torch.nn.functional.linear becomes
    runtime/zero/linear.py `zero3_linear_wrap`, whose `LinearFunctionForZeroStage3.setup_context` saves input
    and weight for backward unconditionally. For a LoRA/QLoRA plan every adapted Linear's input is saved
    by its lora_A anyway (the same tensor, dropout 0); the frozen lm_head's input is saved only here.
    The 4-bit base layers (bnb matmul_4bit) do not go through it. Measured on 2 real CPU ranks: +65,536 B
    ([2, 64, 256] bf16) at loss:backward. A partial `target_modules` leaves frozen layer Linears whose
    input is saved the same way (`zero3_unadapted_inputs`); Liger's fused linear cross entropy bypasses F.linear
    (nothing added; not checked on real ranks: its Triton kernels do not run on the CPU)."""
    from .liger import liger_kernels

    plan = world.plan
    if m.kind not in ("loss_forward", "loss_backward") or plan.method == "full":
        return 0
    if "fused_linear_cross_entropy" in liger_kernels(world.model.model_type, plan.use_liger_kernel,
                                                     plan.liger_kernel_config):
        return 0  # Liger's FLCE runs the lm_head in its own kernel (no F.linear); NB not run on ZeRO-3 ranks
    el = dtype_bytes(plan.autocast) if plan.autocast else plan.precision.compute
    return F.rounded(plan.batch_size * plan.seq_len * world.model.hidden_size * el, world.rnd)


#: decoder-layer Linears that read one input tensor together (llama/qwen2/mistral names); o_proj reads the
#: attention output, which SDPA saves for its own backward
_SHARED_INPUTS = (frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}),
                  frozenset({"down_proj"}))


def zero3_unadapted_inputs(world: _World, m: Any) -> int:
    """LoRA on part of the layer Linears: ZeRO-3's linear (`zero3_saved_head_input`) saves the input of every
    frozen Linear whose input needs a gradient; it is extra where no adapted Linear reads the same tensor
    (q/k/v: the input norm's output, gate/up: the post-attention norm's output, [B, S, H]; down: the MLP
    product, [B, S, I]). Without checkpointing every layer's are alive from its forward to its backward
    (layer 0's q/k/v input needs no gradient then); with checkpointing only the recomputed layer's. Measured
    on real CPU ranks (llama LoRA on q_proj/v_proj, no checkpointing): +393,216 B at loss:backward (2 layers
    x (65,536 + 131,072)). NB counted whole at the start of a layer's backward and at the last layer's
    forward; families with other Linear names are not covered (nothing added). QLoRA's 4-bit layers do not
    go through F.linear: nothing."""
    plan, model = world.plan, world.model
    if plan.method != "lora" or m.kind == "optimizer":
        return 0
    targets = {lin.name.rsplit(".", 1)[-1] for lin in F.lora_targets(model, plan)}
    ins = {lin.name.rsplit(".", 1)[-1]: lin.in_features for lin in model.layer_linears}
    el = dtype_bytes(plan.autocast) if plan.autocast else plan.precision.compute
    per = [F.rounded(plan.batch_size * plan.seq_len * ins[next(iter(g & ins.keys()))] * el, world.rnd)
           if (g & ins.keys()) and not (g & targets) else 0 for g in _SHARED_INPUTS]
    layer, layer0 = sum(per), sum(per[1:])
    if not layer:
        return 0
    L, i = model.num_layers, m.layer
    if plan.gradient_checkpointing:  # only the layer being recomputed / back-propagated
        return layer if i is not None and m.phase == "backward" else 0
    alive = L if i is None else (i + 1)  # layers 0..i (loss: all of them)
    return layer0 + (alive - 1) * layer if alive else 0


def zero3_input_ids(world: _World, m: Any) -> int:
    """The input ids ([B, S] int64) under ZeRO-3: parameter_offload.py `_post_backward_module_hook` (a forward
    pre-hook on every module) replaces each module's tensor inputs by `PostBackwardFunctionModule.apply`
    (`input.detach()`), so the embedding runs on a tensor made on the batch's storage: the step holds it
    from the embedding's forward on (the batch is alive until the step ends). Single-device and the other
    strategies never make a tensor on it (the batch is the data loader's). Measured: +1,024 B ([2, 64])."""
    if m.kind == "optimizer":
        return 0
    p = world.plan
    return F.rounded(p.batch_size * p.seq_len * 8, world.rnd)


def zero3_backward_scalars(world: _World, m: Any) -> int:
    """`DeepSpeedEngine.backward` (runtime/engine.py) runs backward from `loss / gradient_accumulation_steps`
    and then the optimizer's `scale_if_loss` (loss * loss_scale): two fp32 scalars alive through backward.
    Measured on ZeRO-3 CPU ranks: +8 B."""
    return 2 * F.rounded(4, world.rnd) if m.phase == "backward" else 0


def zero3_offload_fp32_grad(part: int) -> int:
    """ZeRO-3 + offload_optimizer: the fp32 gradient of the offloaded master partition (pinned host, kept).

    deepspeed 0.19.8 runtime/zero/stage3.py `_create_fp32_partitions` -> optimizer-state setup: with
    offload_optimizer, `fp32_partitioned_groups_flat[i].grad = torch.zeros(num_elements, dtype=fp32,
    device=cpu)` (pinned), filled at the boundary by `_offload_grad_partition_at_boundary` from the 16-bit
    gradient partition: 4 B per element of the rank's partition, beside the 16-bit partition
    (grad_partitions_flat_buffer, pinned too). Measured on 2 real CPU ranks: 262,144 B (65,536 fp32)."""
    return 4 * part


#: DeepSpeed's default stage3_max_reuse_distance (deepspeed/runtime/zero/config.py; the HF Trainer's
#: example ZeRO-3 configs set the same 1e9)
ZERO_MAX_REUSE_DISTANCE = 1_000_000_000


def _zero3_gathered(world: _World, kind: str, i: int | None, thr: int, b: Mapping[str, int]) -> set[str]:
    """The units whose (non-persistent) parameters ZeRO-3 holds gathered at a moment.

    deepspeed 0.19.8 runtime/zero/partitioned_param_coordinator.py `release_sub_module` /
    `__params_to_release`: once the step's trace is recorded (from the second step on), a module's
    parameters are NOT released after it runs when they recur in the trace within
    `stage3_max_reuse_distance` elements (default 1e9): so a unit that runs in forward stays gathered until
    its backward when the parameters traced in between (every unit above it, forward and backward, and
    the tail) are fewer than 1e9 elements; in backward a unit is released after its backward (its next use
    is the next step). The frozen embedding is not in the backward trace: released after its forward.
    Measured on 2 real CPU ranks (hidden 256, 2 layers): every decoder layer and the lm_head gathered at
    loss:backward (with checkpointing the embedding too); without checkpointing layer 0's q/k/v are not
    in the backward trace and already released there (`zero3_released_inputs` takes them off)."""
    us = world.units
    layers = sorted({u.layer for u in us if u.layer is not None})
    if kind == "optimizer" or not layers:
        return set()
    L = len(layers)
    numel = {u.name: sum(p.numel for p in u.params if p.numel >= thr) for u in us}
    by_layer = {u.layer: u.name for u in us if u.layer is not None}
    tail = [u.name for u in us if u.layer is None and u.keep_after_forward]
    tail_numel = sum(numel[n] for n in tail)
    reuse = ZERO_MAX_REUSE_DISTANCE

    def kept(j: int) -> bool:  # layer j's parameters recur (in its backward) within the reuse distance
        return 2 * (sum(numel[by_layer[k]] for k in range(j + 1, L)) + tail_numel) < reuse

    # with checkpointing, enable_input_require_grads (peft prepare_model_for_kbit_training, the Trainer's
    # gradient_checkpointing_enable for a PeftModel) makes the embedding's output need a gradient: the
    # embedding is in the backward trace and stays gathered like a layer below layer 0
    embed = [u.name for u in us if u.layer is None and not u.keep_after_forward] \
        if world.plan.gradient_checkpointing and kept(-1) else []
    out: set[str] = set(embed)
    if kind in ("forward", "tail_gather"):  # a layer's forward (the last's unless named): the layers before it kept
        top = L - 1 if i is None or kind == "tail_gather" else i
        out |= {by_layer[j] for j in range(top) if kept(j)} | {by_layer[top]}
        return out
    if i is None:  # the loss: the tail, and every layer kept since its forward
        return out | {by_layer[j] for j in range(L) if kept(j)} | set(tail)
    # a layer's backward (or its recompute): that layer and the layers below it kept since forward
    return out | {by_layer[j] for j in range(i) if kept(j)} | {by_layer[i]}


def loaded_bytes(model: ModelSpec, plan: TrainPlan) -> int:
    """Bytes of the model as `from_pretrained` holds it in host RAM on a loading rank: the base weights
    as stored (packed 4-bit for QLoRA: transformers quantizes while loading), their quant state and
    every other parameter in the load dtype (before prepare_model_for_kbit_training's upcast). NB the
    checkpoint files are memory-mapped (page cache, not counted)."""
    p = plan.single_device().replace(prepare=False)
    return (F.base_weights_bytes(model, p) + F.quant_state_bytes(model, p) + F.other_params_bytes(model, p))


def _host(world: _World, per_rank: Mapping[Term, int]) -> dict[str, int]:
    """Host RAM per node: the node's ranks' offloaded bytes plus model loading."""
    p = world.plan
    k = p.ranks_per_node
    host = {str(t): int(v) * k for t, v in per_rank.items() if v}
    # fsdp_cpu_ram_efficient_loading: transformers loads on each node's local rank 0 only, the others on meta
    # (modeling_utils: is_fsdp_enabled() and not is_local_dist_rank_0()), then FSDP syncs module states
    efficient = p.world_strategy == "fsdp" and p.fsdp_cpu_ram_efficient_loading
    host[HOST_LOADING] = (1 if efficient else k) * loaded_bytes(world.model, p)
    return host


def _notes(world: _World, terms: Mapping[Term, int], host: Mapping[str, int]) -> list[str]:
    p = world.plan
    s = p.world_strategy
    notes = []
    if s == "ddp":
        notes.append(f"DDP over {p.num_processes} processes: every rank holds the whole model, its gradients and the "
                     f"optimizer; the reducer's buckets ({p.ddp_bucket_cap_mb} MiB each, the first 1 MiB) hold "
                     "the gradients again (comm_buffers)")
    elif s == "fsdp":
        strat = p.fsdp_sharding_strategy
        notes.append(f"FSDP{p.fsdp_version} {strat} over {p.num_processes} processes (shard group {world.w}); "
                     "units per accelerate: one per decoder layer, the embedding, the tail (final norm + lm_head, "
                     "kept unsharded after forward)" + ("; every LoRA Linear its own unit (peft fsdp_auto_wrap_policy)"
                                                        if p.fsdp_version == 1 else ""))
        if p.method == "qlora" and quant_storage_bytes(p) == 1 and p.quant != "int8":
            notes.append("bnb_4bit_quant_storage uint8: accelerate leaves the 4-bit weights out of FSDP sharding "
                         "(ignored_params); they are whole on every rank — use --bnb-4bit-quant-storage bf16")
        if p.fsdp_version == 1:
            if p.method == "qlora" and p.prepare:
                notes.append("FSDP1 flattens a unit's parameters into one flat parameter of one dtype: "
                             "prepare_model_for_kbit_training's fp32 norms beside the 16-bit 4-bit storage fail "
                             "('Must flatten tensors with uniform dtype'); FSDP1-QLoRA runs with --no-prepare")
            if not p.fsdp_limit_all_gathers:
                notes.append("FSDP1 limit_all_gathers off: on a GPU the CPU thread may issue all-gathers ahead of the "
                             "compute (more units gathered than the current and the prefetched one counted here): "
                             "not modelled, not checked on GPUs; on CPU ranks it changes nothing (measured: the same "
                             "peak to the byte)")
            if p.fsdp_use_orig_params and p.method in ("qlora", "lora"):
                notes.append("FSDP1 use_orig_params: each adapted module saves its own 16-bit copy of its input (peft "
                             "casts it to the dtype of the sharded original lora_A weight, FSDP's mixed precision "
                             "back): in the activations (real 2-rank gloo ranks of a tiny QLoRA plan: +327,680 B with "
                             "checkpointing, +524,288 B without; the estimate within 128 B of them)")
            notes.append("FSDP1: the flat parameter's shard splits base weights and norms by rank (rank 0 holds the "
                         "first half of each unit's flat parameter); per rank totals are equal, the terms shown are "
                         "the even split")
        if p.fsdp_version == 2 and not p.fsdp_limit_all_gathers:
            notes.append("FSDP2 has no limit_all_gathers (FSDP1's rate limiter): ignored")
        if p.fsdp_version == 2 and p.fsdp_backward_prefetch != "BACKWARD_PRE":
            notes.append(f"FSDP2 ignores fsdp_backward_prefetch {p.fsdp_backward_prefetch}: it prefetches one unit "
                         "in backward (implicit prefetching)")
    else:
        if p.method == "qlora" and p.quant != "int8" and quant_storage_bytes(p) == 1 and p.zero_stage == 3:
            notes.append("ZeRO-3 partitions every parameter, and 4-bit weights in uint8 storage do not survive it "
                         "(transformers' DeepSpeed-QLoRA guide sets bnb_4bit_quant_storage to the 16-bit dtype): "
                         "use --bnb-4bit-quant-storage bf16")
        notes.append(f"DeepSpeed ZeRO-{p.zero_stage} over {p.num_processes} processes with the HF Trainer's 'auto' "
                     "bucket sizes unless set (zero_* fields); floating parameters are cast to 16-bit, the fp32 "
                     "master partition is optimizer_state; checked on real 2-rank CPU ranks (ZeRO-2 within 0.4 %, "
                     "ZeRO-3 within 8 B), not on GPUs")
        if p.zero_stage == 3:
            notes.append("ZeRO-3 keeps a layer's parameters gathered from its forward to its backward while the "
                         "parameters traced in between are under stage3_max_reuse_distance (1e9 elements): "
                         "comm_buffers; modules outside the backward trace (without checkpointing layer 0's "
                         "frozen q/k/v) are released after their forward; its memory-efficient linear saves the "
                         "frozen lm_head's input (activations, until the loss backward)")
            if p.method == "lora" and len(F.lora_targets(world.model, p)) < len(world.model.layer_linears):
                notes.append("ZeRO-3 with LoRA on part of the layer Linears: its memory-efficient linear also "
                             "saves the inputs of the frozen, unadapted Linears (activations; checked at the peak "
                             "on real CPU ranks with q_proj/v_proj targets, without checkpointing)")
        if p.offload_optimizer_device != "none":
            notes.append("offload_optimizer: DeepSpeedCPUAdam (a JIT-built C++ op) steps on the host; checked on "
                         "real 2-rank CPU ranks (device + host: ZeRO-2 to 12 B, ZeRO-3 to 4 B, its host gradients "
                         "the 16-bit partition and the fp32 master's gradient); not checked on GPUs (pinned "
                         "host buffers)")
    if p.autocast and s in ("fsdp", "deepspeed"):
        notes.append(f"{'FSDP mixed precision (param_dtype ' if s == 'fsdp' else 'DeepSpeed casts parameters to '}"
                     f"{p.autocast}{')' if s == 'fsdp' else ''}: every parameter reaches the compute in {p.autocast}, "
                     f"so each rank's activations are those of the step with {p.autocast} parameters and adapters "
                     "(no fp32 residual stream, no autocast copies of the adapters)")
    notes.append("comm_buffers counts the collective buffers in torch's allocator; NCCL's own buffers (outside "
                 "it, like cuda_context) are not counted and not yet checked on GPUs")
    if host.get(HOST_LOADING):
        once = p.world_strategy == "fsdp" and p.fsdp_cpu_ram_efficient_loading
        notes.append(f"host RAM per node includes loading ({host[HOST_LOADING] / 2**30:.2f} GiB: the model as "
                     "from_pretrained holds it, " + ("once per node: cpu_ram_efficient_loading, local rank 0 loads"
                                                      if once else f"once per rank ({p.ranks_per_node} on the node)")
                     + "); it precedes the step, and is counted in the node's requirement as an upper bound")
    return notes


# ---- recommend: the fewest GPUs and the cheapest strategy ---------------------------------------------

#: the strategies `fewest_gpus` tries, in the order of what they cost a step beyond one GPU's work
#: (`LADDER_COST`: communication a step first, then host RAM and PCIe traffic; under QLoRA/LoRA the
#: trainable bytes, the adapters', are far fewer than the model's)
LADDER: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ddp", {"strategy": "ddp"}),
    ("deepspeed ZeRO-2", {"strategy": "deepspeed", "zero_stage": 2}),
    ("fsdp SHARD_GRAD_OP", {"strategy": "fsdp", "fsdp_sharding_strategy": "SHARD_GRAD_OP"}),
    ("fsdp FULL_SHARD", {"strategy": "fsdp", "fsdp_sharding_strategy": "FULL_SHARD"}),
    ("deepspeed ZeRO-3", {"strategy": "deepspeed", "zero_stage": 3}),
    ("deepspeed ZeRO-3 + offload optimizer", {"strategy": "deepspeed", "zero_stage": 3,
                                              "offload_optimizer_device": "cpu"}),
    ("fsdp FULL_SHARD + cpu offload", {"strategy": "fsdp", "fsdp_sharding_strategy": "FULL_SHARD",
                                       "fsdp_offload_params": True}),
    ("deepspeed ZeRO-3 + offload optimizer + params", {"strategy": "deepspeed", "zero_stage": 3,
                                                       "offload_optimizer_device": "cpu",
                                                       "offload_param_device": "cpu"}),
)
#: per ladder step: (cost tier, what it costs a step). Strategies in one tier cost the same traffic
#: (FSDP FULL_SHARD and ZeRO-3 both gather every parameter in forward and again in backward and
#: reduce-scatter the gradients; FSDP's offload_params and ZeRO-3's offload of both move the parameters
#: over PCIe at every gather); `fewest_gpus` breaks a tie inside a tier (see there).
LADDER_COST: dict[str, tuple[int, str]] = {
    "ddp": (0, "all-reduce of the trainable gradients (twice the trainable bytes a step); every rank holds "
               "everything"),
    "deepspeed ZeRO-2": (1, "reduce-scatter of the gradients + all-gather of the updated trainable partitions "
                            "(the same bytes as DDP); gradients and optimizer state sharded, parameters whole"),
    "fsdp SHARD_GRAD_OP": (2, "+ one all-gather of every parameter a step (all the model's bytes), kept gathered "
                              "until backward"),
    "fsdp FULL_SHARD": (3, "two all-gathers of every parameter a step (forward and backward) + "
                           "reduce-scatter of the gradients"),
    "deepspeed ZeRO-3": (3, "two all-gathers of every parameter a step (forward and backward) + "
                            "reduce-scatter of the gradients"),
    "deepspeed ZeRO-3 + offload optimizer": (4, "as ZeRO-3, + the gradient and master partitions over PCIe "
                                                "(trainable only) and the optimizer step on the CPU; host RAM"),
    "fsdp FULL_SHARD + cpu offload": (5, "as FULL_SHARD, + every parameter shard copied over PCIe at each gather, "
                                         "gradients and optimizer on the CPU; the most host RAM"),
    "deepspeed ZeRO-3 + offload optimizer + params": (5, "as ZeRO-3 + offload optimizer, + every parameter "
                                                         "partition fetched over PCIe at each gather; the most "
                                                         "host RAM"),
}
#: GPU counts tried: one node of up to 8, then whole nodes of 8
GPU_COUNTS = (2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 48, 64)
GPUS_PER_NODE = 8
#: the CLI flag of a ladder field (memplan/cli.py add_distributed_flags), when not --field-name
_FLAGS = {"fsdp_offload_params": "--cpu-offload", "offload_optimizer_device": "--offload-optimizer",
          "offload_param_device": "--offload-param"}


@dataclass(frozen=True)
class MultiGPUOption:
    """One strategy at the fewest GPUs of the type that fit it: per-rank device bytes at the plan's
    batch, the largest per-GPU micro-batch, host RAM per node, and what the strategy costs a step."""

    strategy: str
    num_processes: int | None      # None: no count up to the largest tried fits
    num_machines: int
    flags: str
    device_bytes: int
    max_batch_size: int
    host_bytes: int
    host_fits: bool | None
    cost: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "num_processes": self.num_processes, "num_machines": self.num_machines,
                "flags": self.flags, "device_bytes": self.device_bytes, "max_batch_size": self.max_batch_size,
                "host_bytes": self.host_bytes, "host_fits": self.host_fits, "cost": self.cost}


def world_fields(n: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The plan fields of `n` GPUs (whole nodes of GPUS_PER_NODE beyond one node) and a ladder step."""
    return {"num_processes": n, "num_machines": 1 if n <= GPUS_PER_NODE else n // GPUS_PER_NODE, **fields}


def flags_of(fields: Mapping[str, Any]) -> str:
    """The `memplan` CLI flags that give `fields` (what `memplan fit ... FLAGS` reads back)."""
    out = []
    for k, v in fields.items():
        flag = _FLAGS.get(k, "--" + k.replace("_", "-"))
        out.append(flag if v is True else f"{flag} {v}")
    return " ".join(out)


def padding_slack(model: ModelSpec, plan: TrainPlan) -> int:
    """An upper bound on how many bytes more one rank may hold at `plan.num_processes` ranks than at
    any fewer: only the padding of unsharded (gathered) parameters and gradients grows with the world
    (FSDP2 pads dim 0 to ceil(dim0 / w) * w rows; FSDP1 a flat parameter, ZeRO a partition, to a multiple
    of w: under w elements): the padding of every parameter at w, 4 B per element, each rounded. Every
    shard and partition (ceil(n / w)) shrinks or stays; activations and DDP's and ZeRO's buckets do not
    depend on w; DDP pads nothing (0). What `fewest_gpus` prunes with (tests/test_recommend_ladder.py
    checks it against the full scan)."""
    w = shard_group(plan)
    if w == 1:
        return 0
    rows = plan.world_strategy == "fsdp" and plan.fsdp_version == 2
    return sum(((ceil(p.dim0 / w) * w - p.dim0) * p.rest if rows else w - 1) * 4 + 512
               for u in units(model, plan) for p in u.params)


def fewest_gpus(device_bytes: Any, fits: Any, plan: TrainPlan, host_of: Any, host_ram_bytes: int | None = None,
                max_batch: Any = None, hopeless: Any = None) -> list[MultiGPUOption]:
    """For each ladder strategy, the fewest GPUs (GPU_COUNTS) at which `plan` fits on every rank (and the
    host RAM, when given). `device_bytes(plan)`, `fits(plan)`, `host_of(plan)` and `max_batch(plan)` are
    the caller's estimator (recommend's cached Estimator).

    Order (the first is "the cheapest that fits"): the fewest GPUs; at the same count the lower cost tier
    (`LADDER_COST`: communication a step, then host RAM and PCIe traffic); inside a tier, where FSDP and
    ZeRO cost the same traffic (FULL_SHARD and ZeRO-3; FSDP offload and ZeRO-3 offloading both), the
    larger per-GPU micro-batch, then the smaller host RAM per node, then the fewer device bytes per GPU,
    then FSDP (torch's own engine, no extra dependency, and its estimate is checked against real ranks
    here; ZeRO's is not yet). The strategies that fit on no count tried come last, in ladder order.

    `hopeless(plan)`, when given, is asked at the largest count once the fewest did not fit: True means
    no count can fit (the busiest rank there, less `padding_slack`, is already over the GPU), so the
    counts are not scanned one by one (what keeps a cold `memplan recommend` under a second)."""
    out: list[MultiGPUOption] = []
    for name, f in LADDER:
        found = None
        for k, n in enumerate(GPU_COUNTS):
            if k == 1 and hopeless is not None and hopeless(plan.replace(**world_fields(GPU_COUNTS[-1], f))):
                break  # the fewest did not fit, and no count can
            fields = world_fields(n, f)
            p = plan.replace(**fields)
            if fits(p):
                host = host_of(p)
                if host_ram_bytes is None or host <= host_ram_bytes:
                    found = (n, fields, p, host)
                    break
        if found is None:
            out.append(MultiGPUOption(name, None, 0, flags_of(f), 0, 0, 0, None, LADDER_COST[name][1]))
            continue
        n, fields, p, host = found
        out.append(MultiGPUOption(name, n, fields["num_machines"], flags_of(fields), device_bytes(p),
                                  max_batch(p) if max_batch else 0, host,
                                  None if host_ram_bytes is None else host <= host_ram_bytes, LADDER_COST[name][1]))
    order = {name: i for i, (name, _) in enumerate(LADDER)}
    return sorted(out, key=lambda o: (o.num_processes is None, o.num_processes or 0, LADDER_COST[o.strategy][0],
                                      -o.max_batch_size, o.host_bytes, o.device_bytes, order[o.strategy]))
