"""The architecture table: every per-family fact the estimator needs, one row per `model_type`.

A row says how transformers builds a family's decoder (which Linears, fused or not, which biases and
norms, how the embedding is scaled, whether lm_head is tied by default, soft-capping defaults,
attention kernels, rotary buffers, the mixture-of-experts layout) and names the transformers source
it was read from. Nothing else in memplan asks for a `model_type`: `ModelSpec` carries its row
(`spec.arch`) and the formulas, the layer walk and the estimator read the row's fields.

Adding an architecture = one row here, one config in profiles/models, one case in
tests/test_agreement_cpu.py (a real CPU step of a tiny random-init model of the family).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UnsupportedArchitectureError
from .versions import MODELED_VERSIONS

#: The transformers release the rows were read from (memplan/versions.py).
_SRC = f"transformers v{MODELED_VERSIONS['transformers']}.0 " + "src/transformers/models/{0}/modeling_{0}.py"


@dataclass(frozen=True)
class MoELayout:
    """Mixture-of-experts keys of a family's config and how transformers stores the experts.

    transformers 5 fuses the experts into 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj`
    [E, H, I]) and the router is not an `nn.Linear`: bitsandbytes leaves all of them 16-bit.
    """

    experts_key: str
    top_k_key: str
    fused_experts: bool = True
    #: config key of each routed expert's intermediate size ("" = `intermediate_size`, Mixtral);
    #: deepseek: `moe_intermediate_size` (the dense layers' MLP keeps `intermediate_size`)
    expert_intermediate_key: str = ""
    #: config key of the shared-expert count ("" = none): one `shared_experts` MLP of intermediate
    #: size expert_I × n_shared_experts, plain nn.Linear (4-bit under QLoRA, adapted by all-linear)
    shared_experts_key: str = ""
    #: config key of the number of leading layers with a dense MLP instead of the MoE block
    #: ("" = every layer is MoE); deepseek: `first_k_dense_replace`
    first_dense_key: str = ""
    #: router: "softmax_topk" (Mixtral: softmax, top-k), "sigmoid_group_topk" (DeepseekV3TopkRouter:
    #: sigmoid + e_score_correction_bias, n_group/topk_group group-limited top-k, routed_scaling_factor),
    #: "softmax_group_topk" (DeepseekV2TopkRouter: softmax, `topk_method` greedy or group_limited_greedy)
    router: str = "softmax_topk"
    #: the router weight [E, H] is created fp32 and kept fp32 at load (`_keep_in_fp32_modules_strict`)
    router_fp32: bool = False
    #: the router holds an fp32 [E] buffer (`e_score_correction_bias`), not a parameter
    router_bias_buffer: bool = False
    #: the fused expert tensors carry biases (none of the rows so far)
    expert_bias: bool = False
    #: peft 0.21.2 maps the MLP leaf names gate_proj/up_proj/down_proj (the v4 expert names) onto the
    #: fused expert parameters (peft/utils/transformers_weight_conversion.py `_convert_peft_config_moe`,
    #: the qwen2_moe pattern that deepseek_v2/v3 use): a target naming them, all-linear included, adapts
    #: gate_up_proj (rank 2r, alpha 2·alpha) and down_proj (rank r) through ParamWrapper and leaves the
    #: shared experts' and the dense layers' MLP Linears without LoRA (measured,
    #: tests/test_simulate_deepseek_v3.py `test_real_stack_layout`)
    lora_remaps_mlp_leaves: bool = False


@dataclass(frozen=True)
class Arch:
    """One decoder family as transformers builds it.

    qkv_bias / o_bias: None reads `attention_bias` from the config, True/False is hard-coded by the
    modeling file. gemma_norm: RMSNorm computes `x * (1 + w.float())` in fp32 (the `1 + w` saved).
    rotary: "single" (one rotary module) or "per_layer_type" (one per attention type present in
    `layer_types`). sdpa: whether `from_pretrained` accepts `attn_implementation="sdpa"`.
    sliding: where a sliding window comes from ("none"; "config": `sliding_window` on every layer;
    "layer_types": the layers typed sliding_attention, defaulting as the family's config class
    does, see `layer_types`).
    default_layer_types: the config class's default when `layer_types` is absent: "alternate"
    (gemma2: sliding, full, ...), "pattern" (gemma3: every `sliding_window_pattern`-th layer full,
    default 6), "qwen" (sliding from `max_window_layers` on, only with `use_sliding_window`).
    """

    model_type: str
    source: str
    fused_qkv: bool = False
    fused_gate_up: bool = False
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False
    sandwich_norms: bool = False
    gemma_norm: bool = False
    embed_scale: bool = False
    tied_default: bool = False
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    sdpa: bool = True
    rotary: str = "single"
    sliding: str = "none"
    default_layer_types: str = ""
    moe: MoELayout | None = None
    #: "mha" (q/k/v/o projections, GQA by num_key_value_heads) or "mla" (DeepSeek multi-head latent
    #: attention: q_a_proj/q_a_layernorm/q_b_proj or q_proj, kv_a_proj_with_mqa, kv_a_layernorm,
    #: kv_b_proj, o_proj; q/k head dim qk_nope + qk_rope, v head dim v_head_dim; see model.MLA)
    attention: str = "mha"

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


ARCHITECTURES: dict[str, Arch] = {a.model_type: a for a in (
    Arch("llama", _SRC.format("llama")),
    Arch("mistral", _SRC.format("mistral"), qkv_bias=False, o_bias=False, sliding="config"),
    # q/k/v carry a bias, o_proj does not (Qwen2Attention)
    Arch("qwen2", _SRC.format("qwen2"), qkv_bias=True, o_bias=False, sliding="layer_types",
         default_layer_types="qwen"),
    Arch("qwen3", _SRC.format("qwen3"), qk_norm=True, sliding="layer_types", default_layer_types="qwen"),
    Arch("gemma", _SRC.format("gemma"), gemma_norm=True, embed_scale=True, tied_default=True),
    # no SDPA in 5.24 (attention soft-capping): from_pretrained picks eager
    Arch("gemma2", _SRC.format("gemma2"), sandwich_norms=True, gemma_norm=True, embed_scale=True,
         tied_default=True, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sdpa=False,
         sliding="layer_types", default_layer_types="alternate"),
    Arch("gemma3_text", _SRC.format("gemma3"), qk_norm=True, sandwich_norms=True, gemma_norm=True,
         embed_scale=True, tied_default=True, rotary="per_layer_type", sliding="layer_types",
         default_layer_types="pattern"),
    # qkv_proj [q + 2 kv, H] and gate_up_proj [2I, H] (Phi3Attention, Phi3MLP)
    Arch("phi3", _SRC.format("phi3"), fused_qkv=True, fused_gate_up=True, qkv_bias=False, o_bias=False,
         sliding="config"),
    Arch("mixtral", _SRC.format("mixtral"), qkv_bias=False, o_bias=False, sliding="config",
         moe=MoELayout("num_local_experts", "num_experts_per_tok")),
    # MLA attention (no sliding window); the first `first_k_dense_replace` layers have a dense MLP,
    # the rest DeepseekV3MoE: fused experts [E, 2·I_moe, H] / [E, H, I_moe], a sigmoid router with an
    # fp32 e_score_correction_bias buffer, and a shared-expert MLP (nn.Linear). The MTP layer
    # (num_nextn_predict_layers) is not built (the hub checkpoint's layer 61 is ignored at load).
    Arch("deepseek_v3", _SRC.format("deepseek_v3"), qkv_bias=None, o_bias=None, attention="mla",
         moe=MoELayout("n_routed_experts", "num_experts_per_tok", expert_intermediate_key="moe_intermediate_size",
                       shared_experts_key="n_shared_experts", first_dense_key="first_k_dense_replace",
                       router="sigmoid_group_topk", router_fp32=True, router_bias_buffer=True,
                       lora_remaps_mlp_leaves=True)),
    # as deepseek_v3, but a softmax router (greedy / group_limited_greedy by `topk_method`) with no
    # bias buffer, complex rotary (apply_rotary_emb), `mlp_bias` on the MLPs, first_k_dense_replace
    # defaulting to 0
    Arch("deepseek_v2", _SRC.format("deepseek_v2"), qkv_bias=None, o_bias=None, attention="mla",
         moe=MoELayout("n_routed_experts", "num_experts_per_tok", expert_intermediate_key="moe_intermediate_size",
                       shared_experts_key="n_shared_experts", first_dense_key="first_k_dense_replace",
                       router="softmax_group_topk", router_fp32=True, lora_remaps_mlp_leaves=True)),
)}

SUPPORTED = tuple(ARCHITECTURES)


def arch_of(model_type: object) -> Arch:
    """The row for `model_type`, or UnsupportedArchitectureError naming the fallback."""
    row = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if row is None:
        raise UnsupportedArchitectureError(
            f"the closed-form estimator does not cover model_type {model_type!r} "
            f"(supported: {', '.join(SUPPORTED)}); `memplan simulate` traces the causal LMs transformers builds "
            "(gpt2, gpt_neox, falcon, ... as well)")
    return row


def layer_types(arch: Arch, cfg: Mapping[str, Any], num_layers: int) -> tuple[tuple[str, ...], int | None]:
    """Each decoder layer's attention type ("full_attention" / "sliding_attention") and the sliding
    window, as the family's transformers config class resolves them (configuration_*.py
    `__post_init__`)."""
    window = cfg.get("sliding_window")
    if arch.sliding == "none":
        return ("full_attention",) * num_layers, None
    if arch.sliding == "config":
        return (("sliding_attention" if window else "full_attention"),) * num_layers, window or None
    if arch.default_layer_types == "qwen" and not cfg.get("use_sliding_window", False):
        window = None  # Qwen2Config: sliding_window = sliding_window if use_sliding_window else None
    types = cfg.get("layer_types")
    if not types:
        if arch.default_layer_types == "alternate":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        elif arch.default_layer_types == "pattern":
            every = int(cfg.get("sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers)]
        else:  # qwen
            first = int(cfg.get("max_window_layers", num_layers))
            types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                     for i in range(num_layers)]
    types = tuple(types)
    return types, (window if "sliding_attention" in types else None)
