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
    #: config key of one routed expert's intermediate size (Mixtral and Llama 4: `intermediate_size`)
    expert_intermediate_key: str = "intermediate_size"
    #: config key of the shared expert's intermediate size (an `nn.Linear` MLP beside the routed experts,
    #: run on every token); None: no shared expert
    shared_expert_key: str | None = None
    #: which layers are MoE: "all", or "interleave" (`moe_layers` if set, else every
    #: `interleave_moe_layer_step`-th layer counting from step - 1, as Llama4TextConfig resolves it);
    #: the other layers carry a dense MLP of `dense_intermediate_key`
    moe_layers: str = "all"
    dense_intermediate_key: str | None = None
    #: biases on the fused expert tensors / on the router
    expert_bias: bool = False
    router_bias: bool = False
    #: "softmax_topk": softmax over top-k logits weighting the expert OUTPUTS, only the routed tokens
    #: reach an expert (Mixtral, transformers' experts interface: grouped_mm / eager loop);
    #: "sigmoid_input_scale": sigmoid of the top-k logits (0 elsewhere) scales each expert's INPUT and
    #: every expert runs on all T tokens (two dense bmm over [E, T, .], Llama4TextMoe, no experts interface)
    router_kind: str = "softmax_topk"
    #: the router's module path in the MoE block and whether it subclasses nn.Linear (Llama4Router does:
    #: bitsandbytes skips it -- it replaces `type(m) is nn.Linear` only -- but peft's all-linear wraps it)
    router_name: str = "mlp.gate"
    router_is_linear_subclass: bool = False
    #: fused expert layout: "E_out_in" (gate_up_proj [E, 2I, H], down_proj [E, H, I]: Mixtral) or
    #: "E_in_out" (gate_up_proj [E, H, 2I], down_proj [E, I, H]: Llama4TextExperts)
    experts_layout: str = "E_out_in"


@dataclass(frozen=True)
class Arch:
    """One decoder family as transformers builds it.

    qkv_bias / o_bias: None reads `attention_bias` from the config, True/False is hard-coded by the
    modeling file. gemma_norm: RMSNorm computes `x * (1 + w.float())` in fp32 (the `1 + w` saved).
    rotary: "single" (one rotary module) or "per_layer_type" (one per attention type present in
    `layer_types`). sdpa: whether `from_pretrained` accepts `attn_implementation="sdpa"`.
    sliding: where a sliding window comes from ("none"; "config": `sliding_window` on every layer;
    "layer_types": the layers typed sliding_attention, defaulting as the family's config class
    does, see `layer_types`; "chunked": Llama 4's `attention_chunk_size` on its RoPE layers, see
    `rope_layers`).
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

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


_LLAMA4_MOE = MoELayout(
    "num_local_experts", "num_experts_per_tok", shared_expert_key="intermediate_size", moe_layers="interleave",
    dense_intermediate_key="intermediate_size_mlp", router_kind="sigmoid_input_scale",
    router_name="feed_forward.router", router_is_linear_subclass=True, experts_layout="E_in_out")

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
    # Llama4TextMoe: routed experts [E, H, 2I] / [E, I, H] (plain bmm over all E x T rows), a shared
    # expert Llama4TextMLP(I), Llama4Router(nn.Linear) with sigmoid scores scaling the expert input;
    # dense layers Llama4TextMLP(intermediate_size_mlp); q/k/v/o bias = attention_bias; no_rope_layers
    # (every 4th layer NoPE, attention temperature tuning) and chunked attention on the RoPE layers
    # (layer_types); L2 qk norm without weights on RoPE layers (use_qk_norm); no SDPA restriction.
    Arch("llama4_text", _SRC.format("llama4"), sliding="chunked", moe=_LLAMA4_MOE),
    # the multimodal checkpoints (Llama4ForConditionalGeneration): model_from_config reads text_config
    # (llama4_text) for the decoder and counts the frozen vision tower + projector as `vision_params`
    Arch("llama4", _SRC.format("llama4"), sliding="chunked", moe=_LLAMA4_MOE),
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
    if arch.sliding == "chunked":  # Llama4TextConfig.__post_init__: chunked attention on the RoPE layers
        types = cfg.get("layer_types") or ["chunked_attention" if rope and cfg.get("attention_chunk_size", 8192)
                                           is not None else "full_attention" for rope in rope_layers(cfg, num_layers)]
        return tuple(types), None
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


def rope_layers(cfg: Mapping[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Llama 4: whether each layer applies rotary (`no_rope_layers`: 1 = RoPE; default every
    `no_rope_layer_interval`-th layer (4) without), as Llama4TextConfig.__post_init__ resolves it."""
    given = cfg.get("no_rope_layers")
    if given:
        return tuple(bool(x) for x in given[:num_layers])
    every = int(cfg.get("no_rope_layer_interval", 4))
    return tuple((i + 1) % every != 0 for i in range(num_layers))


def moe_layer_ids(arch: Arch, cfg: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
    """Indices of the MoE layers (Llama4TextConfig: `moe_layers`, else
    range(interleave_moe_layer_step - 1, L, interleave_moe_layer_step)); every layer for "all"."""
    if arch.moe is None:
        return ()
    if arch.moe.moe_layers == "all":
        return tuple(range(num_layers))
    given = cfg.get("moe_layers")
    if given is not None:
        return tuple(int(i) for i in given)
    step = int(cfg.get("interleave_moe_layer_step", 1))
    return tuple(range(step - 1, num_layers, step))
