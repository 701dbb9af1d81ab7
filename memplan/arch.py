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

    Every field after `fused_experts` defaults to Mixtral's layout:
    intermediate_key: the config key of one expert's intermediate size I_moe.
    shared_expert_key: the config key of a shared (always-on) expert's intermediate size; None: none.
    dense_layers_key: the config key saying which layers are dense (not MoE); None: every layer is MoE.
    router: the router's module name under `mlp` (`mlp.gate` Mixtral, `mlp.router` gpt_oss); its
    weight is a plain [E, H] parameter, not an nn.Linear. router_bias: a [E] bias beside it.
    router_kind: "softmax_topk" (softmax over all E logits in fp32, top-k, renormalised: Mixtral) or
    "topk_softmax" (top-k of the logits, softmax over those k in their dtype: gpt_oss).
    expert_bias: `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H] beside the fused weights.
    transposed: the fused weights are stored [E, H, 2I] / [E, I, H] (`is_transposed=True` in
    `use_experts_implementation`), gate/up interleaved in the last dimension (gate = [..., ::2]).
    activation: "act_fn" (config `hidden_act` of gate, times up) or "clamped_swiglu" (gpt_oss:
    gate clamped above at `swiglu_limit`, up clamped to ±limit, (up + 1) · gate · σ(alpha · gate)).
    """

    experts_key: str
    top_k_key: str
    fused_experts: bool = True
    intermediate_key: str = "intermediate_size"
    shared_expert_key: str | None = None
    dense_layers_key: str | None = None
    router: str = "gate"
    router_bias: bool = False
    router_kind: str = "softmax_topk"
    expert_bias: bool = False
    transposed: bool = False
    activation: str = "act_fn"


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
    attention_sinks: a learnable per-head logit `self_attn.sinks` [heads] joins every softmax (gpt_oss).
    defaults: config-class defaults that differ from model_from_config's fallbacks, applied where the
    config.json lacks the key (gpt_oss: attention_bias True, head_dim 64, ...).
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
    attention_sinks: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()

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
    # q/k/v/o with bias (attention_bias, default True), per-head attention sinks; no SDPA in 5.24
    # (_supports_sdpa = False: from_pretrained raises for "sdpa"; eager, flex and the hub flash kernels
    # of _compatible_flash_implementations take the sinks); sliding (128) / full alternating by
    # layer_types; one YaRN rotary module; GptOssTopKRouter weight [E, H] + bias [E]; GptOssExperts
    # gate_up_proj [E, H, 2I] (+ bias [E, 2I]), down_proj [E, I, H] (+ bias [E, H]), interleaved
    # gate/up, clamped SwiGLU (configuration_gpt_oss.py for the defaults)
    Arch("gpt_oss", _SRC.format("gpt_oss"), sdpa=False, sliding="layer_types", default_layer_types="alternate",
         attention_sinks=True,
         moe=MoELayout("num_local_experts", "num_experts_per_tok", router="router", router_bias=True,
                       router_kind="topk_softmax", expert_bias=True, transposed=True, activation="clamped_swiglu"),
         defaults=(("attention_bias", True), ("head_dim", 64), ("sliding_window", 128),
                   ("num_local_experts", 128), ("num_experts_per_tok", 4), ("tie_word_embeddings", False))),
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
