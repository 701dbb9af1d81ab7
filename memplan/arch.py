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
    partial_rotary: the family's own default rotary embedding reads `partial_rotary_factor`
    (Phi3RotaryEmbedding.compute_default_rope_parameters: dim = int(head_dim * factor)); the other
    families' default rope ignores it and only the non-default rope types (modeling_rope_utils.py:
    llama3, longrope, yarn, ...) apply it.
    defaults: the config class's defaults for keys a hub config.json may leave out (the Gemma 3
    multimodal checkpoints name only the text keys that differ from Gemma3TextConfig's).
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
    partial_rotary: bool = False
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
         default_layer_types="pattern",
         # Gemma3TextConfig's defaults (configuration_gemma3.py), for the multimodal checkpoints' sparse text_config
         defaults=(("vocab_size", 262_208), ("hidden_size", 2304), ("intermediate_size", 9216),
                   ("num_hidden_layers", 26), ("num_attention_heads", 8), ("num_key_value_heads", 4),
                   ("head_dim", 256), ("hidden_activation", "gelu_pytorch_tanh"),
                   ("max_position_embeddings", 131_072), ("sliding_window", 4096),
                   ("final_logit_softcapping", None), ("attn_logit_softcapping", None))),
    # qkv_proj [q + 2 kv, H] and gate_up_proj [2I, H] (Phi3Attention, Phi3MLP)
    Arch("phi3", _SRC.format("phi3"), fused_qkv=True, fused_gate_up=True, qkv_bias=False, o_bias=False,
         sliding="config", partial_rotary=True),
    Arch("mixtral", _SRC.format("mixtral"), qkv_bias=False, o_bias=False, sliding="config",
         moe=MoELayout("num_local_experts", "num_experts_per_tok")),
)}

SUPPORTED = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class VisionTower:
    """A multimodal checkpoint's image encoder, keyed by `vision_config.model_type`.

    layout "siglip" (SiglipVisionTransformer): patch_embedding Conv2d [C, channels, p, p] + bias,
    position_embedding [patches, C] and a non-persistent int64 `position_ids` buffer [1, patches]
    (patches = (image_size // patch_size)**2); per encoder layer q/k/v/out_proj [C, C] and fc1 [I, C],
    fc2 [C, I] nn.Linear with biases, layer_norm1/2 LayerNorm (weight + bias); post_layernorm. The
    attention-pooling head (`vision_use_head`) is not modelled (Gemma 3 ships without it).
    defaults: the config class's values for keys the hub file leaves out.
    """

    model_type: str
    source: str
    layout: str
    defaults: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Multimodal:
    """A multimodal wrapper (`model_type` of the top-level config) whose text tower memplan trains.

    projector "gemma3" (Gemma3MultiModalProjector): `mm_input_projection_weight` [C_vision, H_text]
    (an nn.Parameter, not an nn.Linear: never quantized) and an RMSNorm `mm_soft_emb_norm` [C_vision].
    """

    model_type: str
    source: str
    projector: str
    #: the vision tower a config without `vision_config` gets (the config class's sub-config default)
    vision_default: str = "siglip_vision_model"


VISION_TOWERS: dict[str, VisionTower] = {v.model_type: v for v in (
    VisionTower("siglip_vision_model", _SRC.format("siglip"), "siglip",
                # SiglipVisionConfig's defaults (configuration_siglip.py)
                defaults=(("hidden_size", 768), ("intermediate_size", 3072), ("num_hidden_layers", 12),
                          ("num_attention_heads", 12), ("num_channels", 3), ("image_size", 224),
                          ("patch_size", 16), ("vision_use_head", True))),
)}

MULTIMODAL: dict[str, Multimodal] = {m.model_type: m for m in (
    Multimodal("gemma3", _SRC.format("gemma3"), "gemma3"),
)}


def vision_tower_of(model_type: object) -> VisionTower:
    """The row for a `vision_config.model_type`, or UnsupportedArchitectureError."""
    row = VISION_TOWERS.get(model_type) if isinstance(model_type, str) else None
    if row is None:
        raise UnsupportedArchitectureError(
            f"the closed-form estimator does not cover vision towers of type {model_type!r} "
            f"(supported: {', '.join(VISION_TOWERS)}); `memplan simulate` traces the model transformers builds")
    return row


def multimodal_of(model_type: object) -> Multimodal:
    """The row for a multimodal wrapper's `model_type`, or UnsupportedArchitectureError."""
    row = MULTIMODAL.get(model_type) if isinstance(model_type, str) else None
    if row is None:
        raise UnsupportedArchitectureError(
            f"the closed-form estimator does not cover multimodal checkpoints of type {model_type!r} "
            f"(supported: {', '.join(MULTIMODAL)}); `memplan simulate` traces the model transformers builds")
    return row


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
