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

    expert_intermediate_key: the config key of the routed experts' I ("intermediate_size" for
    Mixtral; Qwen2-MoE/Qwen3-MoE: "moe_intermediate_size", their `intermediate_size` being the
    dense MLP's). shared_expert_key: the config key of a shared expert MLP's intermediate size ("" =
    none); it is built of `nn.Linear` modules (`mlp.shared_expert.{gate,up,down}_proj`), so it is
    4-bit and LoRA-adapted like a dense MLP. shared_expert_gate: an `nn.Linear(H, 1)`
    (`mlp.shared_expert_gate`, sigmoid-gated). sparse_step_key / dense_layers_key: the config keys
    that make some layers dense (Qwen: layer i is MoE iff i not in `mlp_only_layers` and
    (i + 1) % `decoder_sparse_step` == 0; "" = every layer MoE). expert_bias / router_bias: biases
    on the fused experts / the router (gpt_oss: `gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, H]; router bias [E]). router: "parameter" (a module
    holding an [E, H] `nn.Parameter`, applied with F.linear: not an `nn.Linear`) or "linear".
    peft_names: see the field.
    router_name: the router's module name under `mlp` (`mlp.gate` Mixtral/Qwen, `mlp.router` gpt_oss).
    router_kind: "softmax_topk" (softmax over all E logits in fp32, top-k, renormalised: Mixtral) or
    "topk_softmax" (top-k of the logits, softmax over those k in their dtype: gpt_oss).
    transposed: the fused weights are stored [E, H, 2I] / [E, I, H] (`is_transposed=True` in
    `use_experts_implementation`), gate/up interleaved in the last dimension (gate = [..., ::2]).
    activation: "act_fn" (config `hidden_act` of gate, times up) or "clamped_swiglu" (gpt_oss:
    gate clamped above at `swiglu_limit`, up clamped to ±limit, (up + 1) · gate · σ(alpha · gate)).
    """

    experts_key: str
    top_k_key: str
    fused_experts: bool = True
    expert_intermediate_key: str = "intermediate_size"
    shared_expert_key: str = ""
    shared_expert_gate: bool = False
    sparse_step_key: str = ""
    dense_layers_key: str = ""
    expert_bias: bool = False
    router_bias: bool = False
    router: str = "parameter"
    #: the config key that switches the top-k renormalisation (Qwen `norm_topk_prob`); "" = always on (Mixtral)
    norm_topk_key: str = ""
    #: the router casts its top-k weights back to the logits' dtype (Qwen: `.to(router_logits.dtype)`)
    scores_cast: bool = False
    #: peft 0.21's v4 -> v5 conversion (utils/transformers_weight_conversion.py `_convert_peft_config_moe`,
    #: for model types that transformers' `_MODEL_TO_CONVERSION_PATTERN` maps, plus "mixtral") turns these
    #: v4 Linear names into targets of the router weight and the fused experts; `all-linear` means all of
    #: them. Empty: peft wraps no expert (all-linear adapts the nn.Linear modules only: Qwen2-MoE, whose
    #: type is a value of that map, not a key).
    peft_names: tuple[tuple[str, str], ...] = ()
    router_name: str = "gate"
    router_kind: str = "softmax_topk"
    transposed: bool = False
    activation: str = "act_fn"

    #: config key listing the MoE layers' indices (Llama 4 `moe_layers`; when unset
    #: `sparse_step_key` = `interleave_moe_layer_step` decides, as Llama4TextConfig resolves it)
    moe_layers_key: str = ""
    #: config key of a dense layer's MLP size (Llama 4 Maverick: `intermediate_size_mlp`)
    dense_intermediate_key: str = "intermediate_size"
    #: Llama 4: the MoE block's module path in the decoder layer ("feed_forward"); router_kind
    #: "sigmoid_input_scale": sigmoid of the top-k logits (0 elsewhere) scales each expert's INPUT and
    #: every expert runs on all T tokens (two dense bmm over [E, T, .], Llama4TextMoe, no experts
    #: interface); the router subclasses nn.Linear (Llama4Router: bitsandbytes skips it -- it replaces
    #: `type(m) is nn.Linear` only -- but peft's all-linear wraps it, and the wrapped router then fails)
    block: str = "mlp"
    router_is_linear_subclass: bool = False

    def moe_layers(self, cfg: Mapping[str, Any], num_layers: int) -> tuple[bool, ...]:
        """Which decoder layers hold the sparse MoE block (the rest a dense MLP), as
        Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer / Llama4TextConfig decide it (and
        DeepseekV3DecoderLayer: layer i is dense iff i < `first_k_dense_replace`)."""
        if self.moe_layers_key and cfg.get(self.moe_layers_key) is not None:
            given = {int(i) for i in cfg[self.moe_layers_key]}
            return tuple(i in given for i in range(num_layers))
        step = int(cfg.get(self.sparse_step_key) or 1) if self.sparse_step_key else 1
        dense = set(cfg.get(self.dense_layers_key) or ()) if self.dense_layers_key else set()
        first = int(cfg.get(self.first_dense_key) or 0) if self.first_dense_key else 0
        return tuple(i >= first and i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    #: config key of a shared-expert COUNT (deepseek `n_shared_experts`; "" = none): one MLP
    #: `mlp.shared_experts.{gate,up,down}_proj` of intermediate size I_moe × count, plain nn.Linear
    #: (4-bit under QLoRA), no gate, biases by `mlp_bias` (DeepseekV3MoE / DeepseekV2Moe)
    shared_experts_key: str = ""
    #: config key of the number of leading dense-MLP layers ("" = none); deepseek `first_k_dense_replace`
    first_dense_key: str = ""
    #: router_kind (above) for DeepSeek: "sigmoid_group_topk"
    #: (DeepseekV3TopkRouter + DeepseekV3MoE.route_tokens_to_experts: fp32 logits, sigmoid,
    #: + e_score_correction_bias for the choice, n_group/topk_group group-limited top-k, gather,
    #: renormalise by `norm_topk_prob`, × routed_scaling_factor), "softmax_group_topk"
    #: (DeepseekV2Moe: fp32 logits, softmax, `topk_method` greedy or group_limited_greedy,
    #: × routed_scaling_factor)
    #: the router weight [E, H] is created fp32 and kept fp32 at load (`_keep_in_fp32_modules_strict`),
    #: its logits computed in fp32 (F.linear(hidden.float(), weight.float()))
    router_fp32: bool = False
    #: the router holds an fp32 [E] buffer (`e_score_correction_bias`), not a parameter
    router_bias_buffer: bool = False


@dataclass(frozen=True)
class Arch:
    """One decoder family as transformers builds it.

    qkv_bias / o_bias: None reads `attention_bias` from the config, True/False is hard-coded by the
    modeling file (the default when `qkv_bias_key` names the config key that sets it: Qwen2-MoE's
    `qkv_bias`). gemma_norm: RMSNorm computes `x * (1 + w.float())` in fp32 (the `1 + w` saved).
    rotary: "single" (one rotary module) or "per_layer_type" (one per attention type present in
    `layer_types`). sdpa: whether `from_pretrained` accepts `attn_implementation="sdpa"`.
    sliding: where a sliding window comes from ("none"; "config": `sliding_window` on every layer;
    "layer_types": the layers typed sliding_attention, defaulting as the family's config class
    does, see `layer_types`; "chunked": Llama 4's `attention_chunk_size` on its RoPE layers, see
    `rope_layers`).
    attention_sinks: a learnable per-head logit `self_attn.sinks` [heads] joins every softmax (gpt_oss).
    rotary_chunked: cos/sin are [B, S, rope_dim/2] (`emb = freqs`, no cat) and `_apply_rotary_emb`
    rotates the two halves of q/k (chunk; x1·cos - x2·sin, x2·cos + x1·sin; cat): gpt_oss.
    default_layer_types: the config class's default when `layer_types` is absent: "alternate"
    (gemma2: sliding, full, ...), "pattern" (gemma3: every `sliding_window_pattern`-th layer full,
    default 6), "qwen" (sliding from `max_window_layers` on, only with `use_sliding_window`),
    "qwen2_moe" (Qwen2MoeConfig: even-indexed layers below `max_window_layers`, default 28, slide,
    only with `use_sliding_window`). sliding "flag" (Qwen3MoeConfig): every layer slides by
    `sliding_window` iff `use_sliding_window`.
    partial_rotary: the family's own default rotary embedding reads `partial_rotary_factor`
    (Phi3RotaryEmbedding.compute_default_rope_parameters: dim = int(head_dim * factor)); the other
    families' default rope ignores it and only the non-default rope types (modeling_rope_utils.py:
    llama3, longrope, yarn, ...) apply it.
    defaults: the config class's defaults for keys a hub config.json may leave out (the Gemma 3
    multimodal checkpoints name only the text keys that differ from Gemma3TextConfig's; gpt_oss:
    attention_bias True, head_dim 64, ...).
    qk_norm_scope: "head" (q_norm/k_norm over head_dim, per head: qwen3, gemma3) or "proj" (over the
    whole q and k projections, q_dim and kv_dim wide, before the heads are split: olmo2).
    post_norms: the layer normalises the attention and MLP outputs only (post_attention_layernorm,
    post_feedforward_layernorm), never their inputs (olmo2).
    norm_cast_last: RMSNorm returns `(weight * h).to(input_dtype)` (the product in fp32, cast last:
    olmo2, gpt_oss) instead of llama's `weight * h.to(input_dtype)`.
    rope_fp32: the rotary module returns fp32 cos/sin (no cast to the input's dtype) and
    apply_rotary_pos_emb casts q_embed / k_embed back to q's and k's dtype (olmo2).
    multipliers: granite's scalar multiplications, each a fresh tensor: `inputs_embeds *
    embedding_multiplier`, `residual + out * residual_multiplier` after attention and after the MLP,
    `logits / logits_scaling` (attention_multiplier is SDPA's `scale`, no tensor).
    unused_sliding_mask: the model's forward builds a "sliding_attention" mask for every config, which no
    layer takes when none slides (Qwen2MoeModel.forward; `activations.unused_forward_masks`).
    """

    model_type: str
    source: str
    fused_qkv: bool = False
    fused_gate_up: bool = False
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qkv_bias_key: str = ""
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
    attention_sinks: bool = False
    rotary_chunked: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()
    #: "mha" (q/k/v/o projections, GQA by num_key_value_heads) or "mla" (DeepSeek multi-head latent
    #: attention: q_a_proj/q_a_layernorm/q_b_proj or q_proj, kv_a_proj_with_mqa, kv_a_layernorm,
    #: kv_b_proj, o_proj; q/k head dim qk_nope + qk_rope, v head dim v_head_dim; see model.MLA)
    attention: str = "mha"
    #: the rotary embedding is one complex64 freqs_cis [1, S, rope/2] applied as complex products in fp32
    #: (DeepseekV2RotaryEmbedding / apply_rotary_emb), not cos/sin
    rotary_complex: bool = False
    #: the hub checkpoints of this family carry a quantization_config BitsAndBytesConfig cannot override
    #: (DeepSeek-V3/R1: fp8): said in the notes of a QLoRA estimate
    hub_quantized: str = ""
    qk_norm_scope: str = "head"
    post_norms: bool = False
    norm_cast_last: bool = False
    multipliers: bool = False
    rope_fp32: bool = False
    unused_sliding_mask: bool = False

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


#: peft's qwen2_moe conversion (utils/transformers_weight_conversion.py _MOE_TARGET_MODULE_MAPPING)
QWEN2_MOE_PEFT = (("gate", "router"), ("gate_proj", "gate_up"), ("up_proj", "gate_up"), ("down_proj", "down"))

#: Llama4TextMoe (modeling_llama4.py): every layer in `moe_layers` (default: every
#: `interleave_moe_layer_step`-th); peft 0.21 has no conversion for llama4 (all-linear wraps no expert)
_LLAMA4_MOE = MoELayout(
    "num_local_experts", "num_experts_per_tok", shared_expert_key="intermediate_size",
    sparse_step_key="interleave_moe_layer_step", moe_layers_key="moe_layers",
    dense_intermediate_key="intermediate_size_mlp", router_kind="sigmoid_input_scale",
    router_name="router", block="feed_forward", router_is_linear_subclass=True, transposed=True, peft_names=())
#: Llama4TextConfig's defaults (configuration_llama4.py) for keys a config.json may leave out
_LLAMA4_DEFAULTS = (("num_local_experts", 16), ("num_experts_per_tok", 1), ("intermediate_size_mlp", 16384),
                    ("head_dim", 128), ("attention_chunk_size", 8192), ("interleave_moe_layer_step", 1))

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
    # q_norm [q_dim] and k_norm [kv_dim] on the whole projections; post-attention and post-feedforward
    # norms instead of pre-norms; Olmo2RMSNorm returns (weight * h).to(input_dtype)
    Arch("olmo2", _SRC.format("olmo2"), qk_norm=True, qk_norm_scope="proj", post_norms=True,
         norm_cast_last=True, rope_fp32=True),
    # llama's layout with embedding_multiplier, residual_multiplier and logits_scaling
    # (GraniteModel.forward, GraniteDecoderLayer.forward, GraniteForCausalLM.forward)
    Arch("granite", _SRC.format("granite"), multipliers=True),
    Arch("mixtral", _SRC.format("mixtral"), qkv_bias=False, o_bias=False, sliding="config",
         moe=MoELayout("num_local_experts", "num_experts_per_tok",
                       peft_names=(("gate", "router"), ("w1", "gate_up"), ("w3", "gate_up"), ("w2", "down")))),
    # q/k/v bias from `config.qkv_bias` (default True; no hub config sets it), o_proj none; a shared
    # expert MLP + an nn.Linear(H, 1) sigmoid gate; `mlp_only_layers` / `decoder_sparse_step` make dense layers
    Arch("qwen2_moe", _SRC.format("qwen2_moe"), qkv_bias=True, o_bias=False, qkv_bias_key="qkv_bias",
         sliding="layer_types",
         default_layer_types="qwen2_moe", unused_sliding_mask=True,
         moe=MoELayout("num_experts", "num_experts_per_tok", expert_intermediate_key="moe_intermediate_size",
                       shared_expert_key="shared_expert_intermediate_size", shared_expert_gate=True,
                       norm_topk_key="norm_topk_prob", scores_cast=True,
                       sparse_step_key="decoder_sparse_step", dense_layers_key="mlp_only_layers",
                       peft_names=())),
    # q/k norm, no shared expert; `attention_bias` on all four projections
    Arch("qwen3_moe", _SRC.format("qwen3_moe"), qk_norm=True, sliding="flag",
         moe=MoELayout("num_experts", "num_experts_per_tok", expert_intermediate_key="moe_intermediate_size",
                       sparse_step_key="decoder_sparse_step", dense_layers_key="mlp_only_layers",
                       norm_topk_key="norm_topk_prob", scores_cast=True, peft_names=QWEN2_MOE_PEFT)),
    # MLA attention (no sliding window); the first `first_k_dense_replace` layers have a dense MLP,
    # the rest DeepseekV3MoE: fused experts [E, 2·I_moe, H] / [E, H, I_moe], a sigmoid router with an
    # fp32 e_score_correction_bias buffer, and a shared-expert MLP (nn.Linear). The MTP layer
    # (num_nextn_predict_layers) is not built (the hub checkpoint's layer 61 is ignored at load).
    Arch("deepseek_v3", _SRC.format("deepseek_v3"), qkv_bias=None, o_bias=None, attention="mla",
         hub_quantized="fp8",
         moe=MoELayout("n_routed_experts", "num_experts_per_tok", expert_intermediate_key="moe_intermediate_size",
                       shared_experts_key="n_shared_experts", first_dense_key="first_k_dense_replace",
                       router_kind="sigmoid_group_topk", router_fp32=True, router_bias_buffer=True,
                       norm_topk_key="norm_topk_prob", peft_names=QWEN2_MOE_PEFT),
         # DeepseekV3Config's defaults (configuration_deepseek_v3.py) for the routing keys
         defaults=(("norm_topk_prob", True), ("routed_scaling_factor", 2.5), ("n_group", 8), ("topk_group", 4))),
    # as deepseek_v3, but a softmax router (greedy / group_limited_greedy by `topk_method`) with no
    # bias buffer, complex rotary (apply_rotary_emb), `mlp_bias` on the MLPs, first_k_dense_replace
    # defaulting to 0
    Arch("deepseek_v2", _SRC.format("deepseek_v2"), qkv_bias=None, o_bias=None, attention="mla", rotary_complex=True,
         moe=MoELayout("n_routed_experts", "num_experts_per_tok", expert_intermediate_key="moe_intermediate_size",
                       shared_experts_key="n_shared_experts", first_dense_key="first_k_dense_replace",
                       router_kind="softmax_group_topk", router_fp32=True,
                       norm_topk_key="norm_topk_prob", peft_names=QWEN2_MOE_PEFT),
         # DeepseekV2Config's defaults (configuration_deepseek_v2.py) for the routing keys
         defaults=(("norm_topk_prob", False), ("routed_scaling_factor", 1.0), ("topk_method", "greedy"))),
    # Llama4TextMoe: routed experts [E, H, 2I] / [E, I, H] (plain bmm over all E x T rows), a shared
    # expert Llama4TextMLP(I), Llama4Router(nn.Linear) with sigmoid scores scaling the expert input;
    # dense layers Llama4TextMLP(intermediate_size_mlp); q/k/v/o bias = attention_bias; no_rope_layers
    # (every 4th layer NoPE, attention temperature tuning) and chunked attention on the RoPE layers
    # (layer_types); L2 qk norm without weights on RoPE layers (use_qk_norm); no SDPA restriction.
    Arch("llama4_text", _SRC.format("llama4"), sliding="chunked", moe=_LLAMA4_MOE, defaults=_LLAMA4_DEFAULTS),
    # the multimodal checkpoints (Llama4ForConditionalGeneration): model_from_config reads text_config
    # (llama4_text) for the decoder and counts the frozen vision tower + projector as `vision_params`
    Arch("llama4", _SRC.format("llama4"), sliding="chunked", moe=_LLAMA4_MOE, defaults=_LLAMA4_DEFAULTS),
    # q/k/v/o with bias (attention_bias, default True), per-head attention sinks; no SDPA in 5.24
    # (_supports_sdpa = False: from_pretrained raises for "sdpa"; eager, flex and the hub flash kernels
    # of _compatible_flash_implementations take the sinks); sliding (128) / full alternating by
    # layer_types; one YaRN rotary module; GptOssTopKRouter weight [E, H] + bias [E]; GptOssExperts
    # gate_up_proj [E, H, 2I] (+ bias [E, 2I]), down_proj [E, I, H] (+ bias [E, H]), interleaved
    # gate/up, clamped SwiGLU (configuration_gpt_oss.py for the defaults)
    Arch("gpt_oss", _SRC.format("gpt_oss"), sdpa=False, sliding="layer_types", default_layer_types="alternate",
         attention_sinks=True, norm_cast_last=True, rotary_chunked=True,
         moe=MoELayout("num_local_experts", "num_experts_per_tok", router_name="router", router_bias=True,
                       router_kind="topk_softmax", expert_bias=True, transposed=True, activation="clamped_swiglu",
                       peft_names=()),
         defaults=(("attention_bias", True), ("head_dim", 64), ("sliding_window", 128),
                   ("num_local_experts", 128), ("num_experts_per_tok", 4), ("tie_word_embeddings", False))),
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


def _row(table: Mapping[str, Any], model_type: object, what: str, supported: str, builds: str) -> Any:
    """`table[model_type]`, or UnsupportedArchitectureError naming what is covered and the fallback."""
    row = table.get(model_type) if isinstance(model_type, str) else None
    if row is None:
        raise UnsupportedArchitectureError(
            f"the closed-form estimator does not cover {what} {model_type!r} (supported: {supported}); "
            f"`memplan simulate` traces {builds}")
    return row


def vision_tower_of(model_type: object) -> VisionTower:
    """The row for a `vision_config.model_type`, or UnsupportedArchitectureError."""
    return _row(VISION_TOWERS, model_type, "vision towers of type", ", ".join(VISION_TOWERS),
                "the model transformers builds")


def multimodal_of(model_type: object) -> Multimodal:
    """The row for a multimodal wrapper's `model_type`, or UnsupportedArchitectureError."""
    return _row(MULTIMODAL, model_type, "multimodal checkpoints of type", ", ".join(MULTIMODAL),
                "the model transformers builds")


def arch_of(model_type: object) -> Arch:
    """The row for `model_type`, or UnsupportedArchitectureError naming the fallback."""
    return _row(ARCHITECTURES, model_type, "model_type", ", ".join(SUPPORTED),
                "the causal LMs transformers builds (gpt2, gpt_neox, falcon, ... as well)")


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
    if arch.sliding == "flag":  # Qwen3MoeConfig: sliding_window if use_sliding_window else None
        window = window if cfg.get("use_sliding_window", False) else None
        return (("sliding_attention" if window else "full_attention"),) * num_layers, window or None
    if arch.default_layer_types in ("qwen", "qwen2_moe") and not cfg.get("use_sliding_window", False):
        window = None  # Qwen2Config: sliding_window = sliding_window if use_sliding_window else None
    types = cfg.get("layer_types")
    if not types:
        if arch.default_layer_types == "alternate":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        elif arch.default_layer_types == "pattern":
            every = int(cfg.get("sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers)]
        elif arch.default_layer_types == "qwen2_moe":
            last = int(cfg.get("max_window_layers", 28))
            types = ["sliding_attention" if window and (i + 1) % 2 and i < last else "full_attention"
                     for i in range(num_layers)]
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

