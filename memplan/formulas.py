"""One pure function per static term: weights, quant state, other params, adapters, grads, optimizer.

Bytes are exact for the libraries named in `MODELED_VERSIONS` (FACTS.md). `rnd` is the allocation
granularity: 512 on CUDA (every tensor is its own allocation), 1 on the CPU.
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil

from .model import Linear, ModelSpec
from .optim import BNB_STATE_BLOCK, MIN_8BIT_SIZE, OPTIMIZERS, PAGED_MIN_NUMEL
from .plan import TrainPlan
from .units import round_up

from .versions import MODELED_VERSIONS  # noqa: F401  (re-exported: estimates name the versions they model)

BNB_BLOCKSIZE = 64        # 4-bit blocksize on every backend in bitsandbytes 0.50
NESTED_BLOCKSIZE = 256    # double-quant second level, hard-coded


def rounded(n: int, rnd: int) -> int:
    """`n` bytes as allocated: rounded up to `rnd` (512 on CUDA, 1 on the CPU)."""
    return round_up(n, rnd) if rnd > 1 and n else n


_r = rounded


def layer_groups(model: ModelSpec) -> tuple[tuple[int, tuple[Linear, ...], tuple[tuple[str, int], ...], bool], ...]:
    """(layer count, Linears, norms, holds the MoE block) per layer kind: one group when every layer is
    alike; a mixed model (`layer_kinds`: DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
    has its MoE layers and its dense layers (`dense_layer_linears` / `dense_layer_norms`)."""
    if not model.layer_kinds:
        return ((model.num_layers, model.layer_linears, model.layer_norms, model.is_moe),)
    return ((model.num_moe_layers, model.layer_linears, model.layer_norms, True),
            (model.num_dense_layers, model.dense_layer_linears, model.dense_layer_norms, False))


_VIEWS: dict[tuple[int, bool], tuple[ModelSpec, ModelSpec]] = {}
_PARENT: dict[int, ModelSpec] = {}  # id(dense view) -> its model (kept alive by _VIEWS)


def kind_view(model: ModelSpec, moe: bool) -> ModelSpec:
    """`_kind_view`, one object per model and kind (the shape-free caches key on the model's id)."""
    if not model.layer_kinds:
        return model
    hit = _VIEWS.get((id(model), moe))
    if hit is None or hit[0] is not model:
        if len(_VIEWS) > 256:
            _VIEWS.clear()
            _PARENT.clear()
        hit = _VIEWS[(id(model), moe)] = (model, _kind_view(model, moe))
        _PARENT[id(hit[1])] = model
    return hit[1]


def _kind_view(model: ModelSpec, moe: bool) -> ModelSpec:
    """One layer kind of a mixed model as a model whose every layer is of that kind (the layer count
    kept): the MoE layers as they are, or the dense layers (their Linears and norms, no MoE block)."""
    if not model.layer_kinds:
        return model
    if moe:
        return replace(model, layer_kinds=())
    return replace(model, layer_kinds=(), layer_linears=model.dense_layer_linears,
                   layer_norms=model.dense_layer_norms, arch=replace(model.arch, moe=None),
                   num_experts=0, experts_per_token=0, moe_intermediate_size=0, shared_expert_intermediate_size=0)


def base_weights_bytes(model: ModelSpec, plan: TrainPlan, rnd: int = 1) -> int:
    """Stored base Linear weights: packed 4-bit ceil(n/2) B, int8 n B, or the 16/32-bit weight.

    bitsandbytes functional.quantize_4bit packs two 4-bit codes per byte; `bnb_4bit_quant_storage`
    changes the packed dtype, not the byte count. For LoRA/full the Linear weights stay in the load
    dtype (fp32 after prepare_model_for_kbit_training). A multimodal checkpoint's vision-tower
    Linears count too: from_pretrained's 4-bit skip rules (transformers quantizers/base.py
    `get_keys_to_not_convert`: tied weights, the last parameter, the output embedding) do not
    exempt them, so they are quantized although a text-only step never runs them (measured,
    tests/test_gemma3_multimodal.py).
    """
    def one(lin: Linear) -> int:
        if plan.method == "qlora":
            return _r(lin.numel if plan.quant == "int8" else ceil(lin.numel / 2), rnd)
        return _r(lin.numel * plan.precision.params, rnd)

    return (sum(n * sum(one(lin) for lin in lins) for n, lins, _, _ in layer_groups(model))
            + sum(one(lin) for lin in model.vision_linears) + model.num_moe_layers * _router_linear(model, plan, rnd))


def _router_linear(model: ModelSpec, plan: TrainPlan, rnd: int) -> int:
    """A router that subclasses nn.Linear (Llama4Router): bitsandbytes leaves it unquantized (it
    replaces `type(m) is nn.Linear` only), in the parameters' dtype, but it is a Linear in the decoder
    layers, so it counts with the base weights (as memplan.runtime.classify counts it)."""
    if not model.is_moe or not model.arch.moe.router_is_linear_subclass:
        return 0
    return _r(model.num_experts * model.hidden_size * plan.precision.params, rnd)


def quant_state_bytes(model: ModelSpec, plan: TrainPlan, rnd: int = 1) -> int:
    """Block constants stored beside 4-bit weights (bitsandbytes functional.quantize_4bit).

    Double quant on, per weight with nb = ceil(n/64) blocks: absmax nb B (uint8) + second-level absmax
    4*ceil(nb/256) B + offset 4 B + 16-entry fp32 code (64 B) + 256-entry fp32 code (1024 B) -- the
    code tables are copied per weight. Double quant off: 4*nb B absmax + the 64 B code.
    int8 (LLM.int8): one fp32 scale per output row (SCB). Vision-tower Linears of a multimodal
    checkpoint are quantized too (see base_weights_bytes).
    """
    if plan.method != "qlora":
        return 0

    def one(lin: Linear) -> int:
        if plan.quant == "int8":
            return _r(4 * lin.out_features, rnd)
        nb = ceil(lin.numel / BNB_BLOCKSIZE)
        if plan.double_quant:
            return (_r(nb, rnd) + _r(4 * ceil(nb / NESTED_BLOCKSIZE), rnd) + _r(4, rnd) + _r(64, rnd)
                    + _r(1024, rnd))
        return _r(4 * nb, rnd) + _r(64, rnd)

    return (sum(n * sum(one(lin) for lin in lins) for n, lins, _, _ in layer_groups(model))
            + sum(one(lin) for lin in model.vision_linears))


def other_params_bytes(model: ModelSpec, plan: TrainPlan, rnd: int = 1) -> int:
    """Every other parameter and buffer: embeddings, lm_head, norms, biases, routers, MoE experts.

    prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not Params4bit to fp32.
    For LoRA/full the Linear weights themselves are `base_weights`, not counted here.
    """
    dt = plan.precision.params
    H = model.hidden_size
    tensors = [model.embedding_params]
    if not model.tie_word_embeddings:
        tensors.append(model.lm_head_params)
    tensors.append(H)  # final norm
    # A 4-bit Linear's bias is cast to the compute dtype by its first forward (bitsandbytes
    # nn/modules.py Linear4bit.forward: `bias.data = bias.data.to(x.dtype)`), whatever prepare made it.
    bias_dt = plan.precision.compute if plan.method == "qlora" and plan.quant != "int8" else dt
    total = sum(_r(n * dt, rnd) for n in tensors)
    lay = model.arch.moe
    # a router that subclasses nn.Linear (Llama4Router) counts with the base weights (`_router_linear`)
    linear_router = f"{lay.block}.{lay.router_name}.weight" if lay is not None and lay.router_is_linear_subclass else ""
    for L, lins, norms, moe in layer_groups(model):
        per_layer = [n for name, n in norms if name != linear_router
                     and not (moe and model.arch.moe.router_fp32 and name == "mlp.gate.weight")]
        if moe and model.arch.moe.router_fp32:  # created fp32 and kept fp32 at load (_keep_in_fp32_modules_strict)
            total += L * _r(4 * model.num_experts * H, rnd)
        biases = [lin.out_features for lin in lins if lin.bias]
        if moe:
            E, I = model.num_experts, model.expert_intermediate_size
            per_layer += [E * 2 * I * H, E * H * I]
        total += L * sum(_r(n * dt, rnd) for n in per_layer) + L * sum(_r(n * bias_dt, rnd) for n in biases)
    half = model.rope_dim // 2  # inv_freq / original_inv_freq (longrope: + long_inv_freq): rope_dim/2 each
    buffers = [half] * ((model.rotary_buffer_elements + model.rotary_state_elements) // half)
    total += sum(_r(4 * n, rnd) for n in buffers)  # rotary inv_freq buffers stay fp32
    if model.router_buffer_elements:  # deepseek_v3 e_score_correction_bias: an fp32 [E] buffer per MoE layer
        total += model.num_moe_layers * _r(4 * model.num_experts, rnd)
    if model.arch.embed_scale:
        total += _r(plan.precision.load, rnd)  # embed_scale: a load-dtype buffer, which prepare does not touch
    return total + vision_other_bytes(model, plan, rnd)


def vision_other_bytes(model: ModelSpec, plan: TrainPlan, rnd: int = 1) -> int:
    """A multimodal checkpoint's non-Linear tower tensors, the vision Linears' biases and the buffers.

    prepare_model_for_kbit_training upcasts them to fp32 like every other non-4-bit parameter; the
    biases of the (4-bit) vision Linears stay in that dtype, since the Linear4bit forward that would
    cast them to the compute dtype never runs in a text-only step. SigLIP's position_ids buffer is
    int64 (8 B per patch). Measured on a real CPU step (tests/test_gemma3_multimodal.py).
    """
    if not model.vision_params:
        return 0
    dt = plan.precision.params
    tensors = list(model.vision_other_tensors) + [lin.out_features for lin in model.vision_linears if lin.bias]
    return sum(_r(n * dt, rnd) for n in tensors) + _r(model.vision_buffer_bytes, rnd)


def _targeted(linears: tuple[Linear, ...], plan: TrainPlan) -> tuple[Linear, ...]:
    if plan.method not in ("qlora", "lora"):
        return ()
    if plan.target_modules == "all-linear":
        return linears
    tm = set(plan.target_modules)
    return tuple(lin for lin in linears if lin.name.rsplit(".", 1)[-1] in tm or lin.name in tm)


def lora_targets(model: ModelSpec, plan: TrainPlan) -> tuple[Linear, ...]:
    """The layer Linears peft adapts: "all-linear" is every Linear but the output layer (which is not
    a layer Linear); a list matches module names by their last component or in full.

    Where peft converts the v4 expert names (`MoELayout.peft_names`), those names leave
    target_modules for target_parameters (peft 0.21.2 utils/transformers_weight_conversion.py
    `_convert_peft_config_moe`, "all-linear" resolved to leaf names first): an nn.Linear whose leaf
    name is one of them gets no LoRA (DeepSeek's shared experts and dense MLP gate/up/down_proj,
    measured in tests/test_simulate_deepseek_v3.py)."""
    return _targeted(_unconverted(model, model.layer_linears), plan)


def _unconverted(model: ModelSpec, linears: tuple[Linear, ...]) -> tuple[Linear, ...]:
    model = _PARENT.get(id(model), model)  # a dense-layer view converts as its model does
    v4 = {n for n, _ in model.arch.moe.peft_names} if model.arch.moe is not None else set()
    return tuple(lin for lin in linears if lin.name.rsplit(".", 1)[-1] not in v4) if v4 else linears


def dense_lora_targets(model: ModelSpec, plan: TrainPlan) -> tuple[Linear, ...]:
    """The dense layers' Linears peft adapts in a mixed dense/MoE model (same rules as `lora_targets`)."""
    return _targeted(_unconverted(model, model.dense_layer_linears), plan)


def vision_lora_targets(model: ModelSpec, plan: TrainPlan) -> tuple[Linear, ...]:
    """The vision-tower Linears peft adapts (all of them, every layer).

    peft 0.21.2 `_maybe_include_all_linear_layers` (tuners/tuners_utils.py) turns "all-linear" into
    every nn.Linear of the model but the output embedding, the vision tower's included; a list
    matches by suffix, so `q_proj` adapts SigLIP's q_proj as well.
    """
    return _targeted(model.vision_linears, plan)


def lora_shapes(model: ModelSpec, plan: TrainPlan) -> list[tuple[int, int]]:
    """(rows, cols) of the LoRA A [r, in] and B [out, r] tensors of one layer."""
    out: list[tuple[int, int]] = []
    for lin in lora_targets(model, plan):
        out += [(plan.lora_r, lin.in_features), (lin.out_features, plan.lora_r)]
    return out


def lora_bytes(lin: Linear, plan: TrainPlan, rnd: int = 1) -> int:
    """One adapted Linear's LoRA A [r, in] and B [out, r] (or their gradients), in the adapter dtype."""
    dt = plan.precision.adapter
    return rounded(dt * plan.lora_r * lin.in_features, rnd) + rounded(dt * lin.out_features * plan.lora_r, rnd)


def expert_targets(model: ModelSpec, plan: TrainPlan) -> frozenset[str]:
    """The mixture-of-experts parts peft adapts: "router", "gate_up", "down".

    peft 0.21 converts v4 target names of the families transformers 5 fused (utils/
    transformers_weight_conversion.py `_convert_peft_config_moe`): `all-linear`, or a list naming the
    v4 Linears (`MoELayout.peft_names`, e.g. Mixtral's gate / w1 / w3 / w2), targets the router weight
    and the fused 3-D expert parameters, each wrapped by a `lora.ParamWrapper`.
    """
    if plan.method not in ("qlora", "lora") or not model.is_moe:
        return frozenset()
    names = model.arch.moe.peft_names
    if plan.target_modules == "all-linear":
        return frozenset(part for _, part in names)
    return frozenset(part for v4, part in names if v4 in plan.target_modules)


def moe_lora_shapes(model: ModelSpec, plan: TrainPlan) -> list[tuple[int, int]]:
    """(rows, cols) of one layer's LoRA tensors on the router and the fused experts (peft ParamWrapper).

    ParamWrapper (tuners/lora/layer.py) makes lora_A = Linear(in, r·E) and lora_B = Linear(r·E, out):
    every expert gets its own rank-r block. The router weight [E, H] is 2-D (one "expert"): A [r, H],
    B [E, r]. gate_up_proj [E, 2I, H] fuses two v4 Linears, so the conversion doubles its rank (and
    alpha): A [2r·E, H], B [2I, 2r·E]. down_proj [E, H, I]: A [r·E, I], B [H, r·E].
    """
    t = expert_targets(model, plan)
    if not t:
        return []
    E, H, I, r = model.num_experts, model.hidden_size, model.expert_intermediate_size, plan.lora_r
    out: list[tuple[int, int]] = []
    if "router" in t:
        out += [(r, H), (E, r)]
    if "gate_up" in t:
        out += [(2 * r * E, H), (2 * I, 2 * r * E)]
    if "down" in t:
        out += [(r * E, I), (H, r * E)]
    return out


def lora_tensors(model: ModelSpec, plan: TrainPlan) -> list[int]:
    """Element counts of every LoRA A [r, in] and B [out, r] tensor, all layers."""
    if plan.method not in ("qlora", "lora"):
        return []
    if model.layer_kinds:
        dense = [(plan.lora_r, lin.in_features) for lin in dense_lora_targets(model, plan)]
        dense += [(lin.out_features, plan.lora_r) for lin in dense_lora_targets(model, plan)]
        return ([r * c for r, c in lora_shapes(model, plan) + moe_lora_shapes(model, plan)] * model.num_moe_layers
                + [r * c for r, c in dense] * model.num_dense_layers)
    return [r * c for r, c in lora_shapes(model, plan) + moe_lora_shapes(model, plan)] * model.num_layers


def _trainable_groups(model: ModelSpec, plan: TrainPlan) -> list[tuple[tuple[int, int], int, int]]:
    """((rows, cols), dtype bytes, count) of the trainable parameters, grouped per layer (per layer
    kind in a mixed dense/MoE model)."""
    if plan.method in ("qlora", "lora"):
        if model.layer_kinds:
            dense = dense_lora_targets(model, plan)
            dshapes = [(plan.lora_r, lin.in_features) for lin in dense] + [(lin.out_features, plan.lora_r)
                                                                          for lin in dense]
            return ([(shape, plan.precision.adapter, model.num_moe_layers)
                     for shape in lora_shapes(model, plan) + moe_lora_shapes(model, plan)]
                    + [(shape, plan.precision.adapter, model.num_dense_layers) for shape in dshapes])
        return [(shape, plan.precision.adapter, model.num_layers)
                for shape in lora_shapes(model, plan) + moe_lora_shapes(model, plan)]
    dt = plan.precision.params
    out = []
    for L, lins, norms, moe in layer_groups(model):
        per_layer = [(l.out_features, l.in_features) for l in lins]
        per_layer += [(l.out_features, 1) for l in lins if l.bias]
        fp32_router = moe and model.arch.moe.router_fp32  # DeepSeek: the router weight stays fp32
        per_layer += [(n, 1) for name, n in norms if not (fp32_router and name == "mlp.gate.weight")]
        if moe:
            E, I, H = model.num_experts, model.expert_intermediate_size, model.hidden_size
            per_layer += [(E * 2 * I, H), (E * H, I)]
        out += [(shape, dt, L) for shape in per_layer]
        if fp32_router:
            out.append(((model.num_experts * model.hidden_size, 1), 4, L))
    top = [(model.vocab_size, model.hidden_size), (model.hidden_size, 1)]
    if model.lm_head_params:
        top.append((model.vocab_size, model.hidden_size))
    return out + [(shape, dt, 1) for shape in top]


def adapter_weights_bytes(model: ModelSpec, plan: TrainPlan, rnd: int = 1) -> int:
    """LoRA A/B in fp32 (peft get_peft_model(autocast_adapter_dtype=True) upcasts them).

    A multimodal checkpoint's vision-tower LoRA is created too (`vision_lora_targets`) but gets no
    gradient and so no optimizer state in a text-only step: the tower never runs, its grads stay None
    and the optimizers skip such parameters (torch/optim/adamw.py, bitsandbytes optim/optimizer.py).
    """
    if plan.method == "full":
        return 0
    return gradient_bytes(model, plan, rnd) + sum(lora_bytes(lin, plan, rnd) for lin in vision_lora_targets(model, plan))


def gradient_bytes(model: ModelSpec, plan: TrainPlan, rnd: int = 1) -> int:
    """One gradient per trainable parameter, in its dtype (all alive after backward)."""
    return sum(k * _r(r * c * dt, rnd) for (r, c), dt, k in _trainable_groups(model, plan))


def optimizer_state_bytes(model: ModelSpec | None, plan: TrainPlan, rnd: int = 1, cuda: bool = True,
                          groups: list[tuple[tuple[int, int], int, int]] | None = None) -> tuple[int, int]:
    """(device-resident, paged) optimizer state bytes after the first step.

    torch AdamW: exp_avg + exp_avg_sq in the param dtype and a `step` scalar (a device tensor for
    fused, a CPU tensor otherwise). bitsandbytes 8-bit: uint8 state + one fp32 absmax per 256
    elements per state; tensors under 4096 elements keep 32-bit state. Paged variants put
    state1/state2 of tensors with at least 100,000 elements in cudaMallocManaged memory (NVML sees
    it, torch does not); on the CPU they are ordinary tensors. Adafactor (factored, no first
    moment): a row and a column vector per matrix. `groups` ((rows, cols), dtype bytes, count):
    the tensors the optimizer steps, when not the model's trainable parameters (a rank's shards:
    memplan.distributed).
    """
    spec = OPTIMIZERS[plan.optim]
    dev = paged = 0
    if groups is None:
        groups = _trainable_groups(model, plan)
    for (rows, cols), dt, k in groups:
        n = rows * cols
        d = p = 0
        if spec.impl in ("foreach", "fused", "single"):
            d = spec.states * _r(n * dt, rnd)
            if spec.states and (spec.impl == "fused" or not cuda):
                d += _r(4, rnd)  # `step` tensor: a device tensor for fused, a CPU tensor otherwise
        elif spec.impl == "adafactor":
            d = _r(4 * rows, rnd) + _r(4 * cols, rnd) if rows > 1 and cols > 1 else _r(4 * n, rnd)
        else:
            eight = spec.bits == 8 and n >= MIN_8BIT_SIZE
            state = n * (1 if eight else 4)
            is_paged = spec.paged and cuda and n >= PAGED_MIN_NUMEL
            for _ in range(spec.states):
                if is_paged:
                    p += state
                else:
                    d += _r(state, rnd)
                if eight:
                    d += _r(4 * ceil(n / BNB_STATE_BLOCK), rnd)
        dev += k * d
        paged += k * p
    # the shared dynamic quantization maps (qmap1/qmap2): made on the CPU by the optimizer's __init__
    # (bitsandbytes optim/optimizer.py Optimizer8bit `fill_qmap`), copied to the device by the first
    # 8-bit state's init_state
    if spec.bits == 8 and (not cuda or any(r * c >= MIN_8BIT_SIZE for (r, c), _, _ in groups)):
        dev += spec.states * _r(256 * 4, rnd)
    return dev, paged


def optimizer_scratch_bytes(model: ModelSpec, plan: TrainPlan, rnd: int = 1, cuda: bool = True) -> int:
    """Transient buffers during optimizer.step() (the `temporaries` of the optimizer moment).

    torch foreach on CUDA: one temporary per state-holding tensor (torch/optim/adamw.py
    `_multi_tensor_adamw`); fused and bitsandbytes 8-bit on CUDA: none; the single-tensor loop (CPU,
    bitsandbytes 32-bit/CPU kernels): the largest tensor's denominator, one at a time.
    """
    spec = OPTIMIZERS[plan.optim]
    groups = _trainable_groups(model, plan)
    if not groups:
        return 0
    if spec.impl == "foreach" and cuda and spec.states:
        return sum(k * _r(r * c * dt, rnd) for (r, c), dt, k in groups)
    if spec.impl == "fused" or spec.bits == 8 and cuda:
        return 0
    if spec.bits == 8 and spec.states == 2:
        # bitsandbytes' CPU 8-bit Adam (backends/cpu/ops.py _optimizer_update_8bit_blockwise_cpu): both
        # states dequantized to fp32, grad * gnorm_scale, and sqrt(state2) with its quotient alive
        # together (5 fp32 copies), plus an fp32 copy of a 16-bit parameter; 32-bit state below 4096
        return max((5 * 4 * r * c + (4 * r * c if dt != 4 else 0)) if r * c >= MIN_8BIT_SIZE else r * c * dt
                   for (r, c), dt, _ in groups)
    return max(r * c * dt for (r, c), dt, _ in groups)
