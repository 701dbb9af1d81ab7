"""ModelSpec: the inventory of a decoder model, read from its Hugging Face config.json values.

Every `nn.Linear` (the layers bitsandbytes quantizes) with its shape, the embeddings, lm_head (tied or
not), norms, biases and rotary buffers -- enough to count every byte a training step keeps, without
importing transformers. Shapes follow transformers 5.24's modeling files for each family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .arch import SUPPORTED, Arch, arch_of, layer_types, moe_layer_ids, rope_layers
from .errors import InvalidSpecError

__all__ = ["Linear", "ModelSpec", "model_from_config", "SUPPORTED"]


@dataclass(frozen=True)
class Linear:
    """One nn.Linear in a decoder layer (or the model), weight [out, in]."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False
    kind: str = "attn"  # attn | mlp | shared_expert | router | head

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only causal LM, as transformers builds it from `config`."""

    name: str
    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    hidden_act: str
    layer_linears: tuple[Linear, ...]
    layer_norms: tuple[tuple[str, int], ...]
    num_experts: int = 0
    experts_per_token: int = 0
    hub_id: str = ""
    aliases: tuple[str, ...] = ()
    source: str = ""
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    #: the attention types its layers use ("full_attention", "sliding_attention"); `sliding_window` is
    #: the window of the sliding ones (None when no layer slides)
    attention_types: tuple[str, ...] = ("full_attention",)
    #: the architecture table's row (memplan/arch.py): every per-family fact
    arch: Arch | None = None
    #: rotary embedding modules (gemma3: one per attention type in `layer_types`), read from the
    #: config at construction: no derived value reads `config` (excluded from equality) later
    rotary_modules: int = 1
    #: Layers that are not all alike (Llama 4), one entry per decoder layer; empty when every layer is
    #: built the same way (all other families). `layer_kinds[i]`: "moe" (attention + the MoE block:
    #: `layer_linears`, `layer_norms` and the fused experts) or "dense" (attention + a dense MLP:
    #: `dense_layer_linears`, `dense_layer_norms`; Maverick's `intermediate_size_mlp` layers).
    #: `layer_rope[i]`: the layer applies rotary (Llama 4 `no_rope_layers`: the NoPE layers apply
    #: attention temperature tuning instead, and skip the weightless L2 qk norm).
    #: `layer_attention[i]`: "full_attention" or "chunked_attention" (a block-diagonal causal mask of
    #: `attention_chunk_size` tokens).
    layer_kinds: tuple[str, ...] = ()
    dense_layer_linears: tuple[Linear, ...] = ()
    dense_layer_norms: tuple[tuple[str, int], ...] = ()
    layer_rope: tuple[bool, ...] = ()
    layer_attention: tuple[str, ...] = ()
    attention_chunk_size: int | None = None
    #: MoE block extras: the shared expert's intermediate size (its Linears are in `layer_linears`,
    #: kind "shared_expert") and one routed expert's (the fused tensors' I)
    shared_expert_intermediate_size: int = 0
    expert_intermediate_size: int = 0
    #: A multimodal checkpoint's non-text towers (Llama 4: vision_model + multi_modal_projector),
    #: frozen but on the GPU: their parameter count (in `params`), how many of those are `nn.Linear`
    #: weights that bitsandbytes 4-bit replaces (all but the checkpoint's last module: Linears
    #: `type(m) is nn.Linear`), and whether peft's all-linear adapts them (it does: it targets every
    #: nn.Linear but the output embedding, vision tower included).
    vision_params: int = 0
    vision_linear_params: int = 0
    vision_linears: tuple[Linear, ...] = ()
    vision_adapted_by_all_linear: bool = False
    #: the vision tower's buffers (Llama4VisionRotaryEmbedding.freqs_ci, complex64), on the GPU as well
    vision_buffer_bytes: int = 0

    def __post_init__(self) -> None:
        if self.arch is None:
            object.__setattr__(self, "arch", arch_of(self.model_type))

    def __hash__(self) -> int:  # specs key the estimator's caches: hash the fields once
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare))
            object.__setattr__(self, "_hash", h)
        return h

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.arch.is_moe

    @property
    def expert_params_per_layer(self) -> int:
        """Fused 3-D expert tensors (gate_up_proj [E, 2I, H] + down_proj [E, H, I]) per MoE layer."""
        I = self.expert_intermediate_size or self.intermediate_size
        return self.num_experts * 3 * I * self.hidden_size if self.is_moe else 0

    @property
    def moe_layer_count(self) -> int:
        """Decoder layers with an MoE block (all of them for a uniform MoE stack)."""
        if not self.layer_kinds:
            return self.num_layers if self.is_moe else 0
        return self.layer_kinds.count("moe")

    @property
    def dense_layer_count(self) -> int:
        """Decoder layers with a dense MLP in a mixed stack (`layer_kinds`); 0 for uniform stacks."""
        return self.layer_kinds.count("dense")

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def linear_leaves(self) -> tuple[str, ...]:
        """Leaf names of the layer Linears (q_proj ... down_proj): what peft's target_modules match."""
        return tuple(lin.name.rsplit(".", 1)[-1] for lin in self.layer_linears)

    @property
    def layer_linear_params(self) -> int:
        return sum(l.numel for l in self.layer_linears)

    @property
    def layer_bias_params(self) -> int:
        return sum(l.out_features for l in self.layer_linears if l.bias)

    @property
    def layer_norm_params(self) -> int:
        return sum(n for _, n in self.layer_norms)

    @property
    def params(self) -> int:
        """Total parameters as transformers counts them (tied weights once)."""
        per_layer = (self.layer_linear_params + self.layer_bias_params + self.layer_norm_params
                     + self.expert_params_per_layer)
        if not self.layer_kinds:
            return self.num_layers * per_layer + self.embedding_params + self.lm_head_params + self.hidden_size
        dense = (sum(l.numel + (l.out_features if l.bias else 0) for l in self.dense_layer_linears)
                 + sum(n for _, n in self.dense_layer_norms))
        return (self.moe_layer_count * per_layer + self.dense_layer_count * dense + self.embedding_params
                + self.lm_head_params + self.hidden_size + self.vision_params)

    @property
    def rotary_buffer_elements(self) -> int:
        """fp32 buffers of the rotary embedding(s): inv_freq and original_inv_freq, head_dim/2 each."""
        return self.rotary_modules * 2 * (self.head_dim // 2)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.hub_id or self.name, "architecture": self.architecture, "params": self.params}


def _int(cfg: Mapping[str, Any], key: str, problems: list[str], default: Any = None) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        problems.append(f"config {key} must be a positive integer, got {v!r}")
        return 1
    return v


def model_from_config(config: Mapping[str, Any], name: str = "", hub_id: str = "",
                      aliases: tuple[str, ...] = (), source: str = "") -> ModelSpec:
    """Read a config.json dict (or a transformers PretrainedConfig) into a ModelSpec."""
    if not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        if to_dict is None:
            raise InvalidSpecError("model config", ["expected a config.json dict or a transformers PretrainedConfig"])
        config = to_dict()
    cfg = dict(config)
    vision = None
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrapper: the text tower trains
        if cfg.get("model_type") == "llama4":
            vision = _llama4_vision(cfg)
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
        if vision is not None:
            cfg.setdefault("model_type", "llama4_text")
    arch = arch_of(cfg.get("model_type"))
    model_type = arch.model_type
    problems: list[str] = []
    H = _int(cfg, "hidden_size", problems)
    L = _int(cfg, "num_hidden_layers", problems)
    nh = _int(cfg, "num_attention_heads", problems)
    nkv = _int(cfg, "num_key_value_heads", problems, cfg.get("num_attention_heads")) if cfg.get(
        "num_key_value_heads") is not None else nh
    I = _int(cfg, "intermediate_size", problems)
    V = _int(cfg, "vocab_size", problems)
    hd = cfg.get("head_dim") or (H // nh if nh else 0)
    if not isinstance(hd, int) or hd <= 0:
        problems.append(f"config head_dim must be a positive integer, got {hd!r}")
        hd = 1
    E = k = 0
    if arch.moe is not None:
        E = _int(cfg, arch.moe.experts_key, problems)
        k = _int(cfg, arch.moe.top_k_key, problems)
    if arch.sliding == "chunked":  # Llama4TextConfig: keys with class defaults, read as it reads them
        return _llama4_text(cfg, arch, problems, H, L, nh, nkv, I, V, hd, E, k, vision,
                            dict(name=name, hub_id=hub_id, aliases=aliases, source=source, config=config))
    if problems:
        raise InvalidSpecError("model config", problems)
    tied = bool(cfg.get("tie_word_embeddings", arch.tied_default))
    qd, kvd = nh * hd, nkv * hd
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    qkv_bias = attn_bias if arch.qkv_bias is None else arch.qkv_bias
    o_bias = attn_bias if arch.o_bias is None else arch.o_bias
    if arch.fused_qkv:
        linears = [Linear("self_attn.qkv_proj", qd + 2 * kvd, H, qkv_bias)]
    else:
        linears = [Linear("self_attn.q_proj", qd, H, qkv_bias),
                   Linear("self_attn.k_proj", kvd, H, qkv_bias),
                   Linear("self_attn.v_proj", kvd, H, qkv_bias)]
    linears.append(Linear("self_attn.o_proj", H, qd, o_bias))
    if arch.moe is None:
        if arch.fused_gate_up:
            linears.append(Linear("mlp.gate_up_proj", 2 * I, H, mlp_bias, "mlp"))
        else:
            linears += [Linear("mlp.gate_proj", I, H, mlp_bias, "mlp"), Linear("mlp.up_proj", I, H, mlp_bias, "mlp")]
        linears.append(Linear("mlp.down_proj", H, I, mlp_bias, "mlp"))
    norms = [("input_layernorm", H), ("post_attention_layernorm", H)]
    if arch.sandwich_norms:
        norms += [("pre_feedforward_layernorm", H), ("post_feedforward_layernorm", H)]
    if arch.qk_norm:
        norms += [("self_attn.q_norm", hd), ("self_attn.k_norm", hd)]
    if arch.moe is not None:
        # NB: transformers 5 routers are not nn.Linear; counted as a plain [E, H] parameter.
        norms += [("mlp.gate.weight", E * H)]
    types, window = layer_types(arch, cfg, L)
    # one set of rotary buffers per attention type present (gemma3), else one
    rotary_modules = len(set(types)) if arch.rotary == "per_layer_type" else 1
    archs = cfg.get("architectures") or []
    return ModelSpec(
        name=name or hub_id or model_type,
        model_type=model_type,
        architecture=archs[0] if archs else "",
        hidden_size=H, num_layers=L, num_heads=nh, num_kv_heads=nkv, head_dim=hd, intermediate_size=I,
        vocab_size=V, tie_word_embeddings=tied,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        hidden_act=str(cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"),
        layer_linears=tuple(linears), layer_norms=tuple(norms), num_experts=E, experts_per_token=k,
        hub_id=hub_id, aliases=tuple(aliases), source=source, config=dict(config),
        final_logit_softcapping=cfg.get("final_logit_softcapping", arch.final_logit_softcapping),
        sliding_window=window, attention_types=tuple(sorted(set(types))),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping", arch.attn_logit_softcapping),
        arch=arch, rotary_modules=rotary_modules,
    )


# ---- Llama 4 (Llama4ForCausalLM / Llama4ForConditionalGeneration, transformers 5.24 modeling_llama4.py) ----
#: Llama4TextConfig / Llama4VisionConfig defaults (configuration_llama4.py) for keys a config.json may omit
_L4_TEXT_DEFAULTS = {"num_local_experts": 16, "num_experts_per_tok": 1, "intermediate_size_mlp": 16384,
                     "head_dim": 128, "attention_chunk_size": 8192}
_L4_VISION_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 34, "num_channels": 3, "intermediate_size": 5632,
                       "vision_output_dim": 7680, "image_size": 448, "patch_size": 14, "projector_input_dim": 4096,
                       "projector_output_dim": 4096}


def _llama4_vision(cfg: Mapping[str, Any]) -> tuple[int, tuple[Linear, ...], int]:
    """Parameters of Llama4VisionModel + Llama4MultiModalProjector, and their nn.Linear weights.

    Per encoder layer (Llama4VisionEncoderLayer): q/k/v/o [h, h] with bias, fc1 [Iv, h] + bias, fc2
    [h, Iv] + bias, two LayerNorms (weight + bias). Model: patch_embedding.linear [h, c·p²] (no bias),
    class_embedding [h], positional_embedding_vlm [(img/p)² + 1, h], layernorm_pre/post (2h each),
    vision_adapter.mlp fc1 [proj_in, Iv] and fc2 [proj_out, proj_out] (no bias); projector
    linear_1 [H_text, vision_output_dim] (no bias). Buffer: freqs_ci complex64 [(img/p)² + 1, 1,
    h / heads / 2] (Llama4VisionRotaryEmbedding._compute_freqs_ci), 8 B per element.
    """
    v = {**_L4_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    h, Iv, Lv = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    img, p = v["image_size"], v["patch_size"]
    H = (cfg.get("text_config") or {}).get("hidden_size", 5120)
    lin = [Linear(f"self_attn.{n}_proj", h, h, True, "vision") for n in "qkvo"]
    lin += [Linear("mlp.fc1", Iv, h, True, "vision"), Linear("mlp.fc2", h, Iv, True, "vision")]
    per_layer = sum(l.numel + l.out_features for l in lin) + 4 * h
    layers = tuple(Linear(f"vision_model.model.layers.{i}.{l.name}", l.out_features, l.in_features, True, "vision")
                   for i in range(Lv) for l in lin)
    once = [Linear("vision_model.patch_embedding.linear", h, v["num_channels"] * p * p, False, "vision"),
            Linear("vision_model.vision_adapter.mlp.fc1", v["projector_input_dim"], Iv, False, "vision"),
            Linear("vision_model.vision_adapter.mlp.fc2", v["projector_output_dim"], v["projector_output_dim"],
                   False, "vision"),
            Linear("multi_modal_projector.linear_1", H, v["vision_output_dim"], False, "vision")]
    total = Lv * per_layer + sum(l.numel for l in once) + h + ((img // p) ** 2 + 1) * h + 4 * h
    buffer_bytes = ((img // p) ** 2 + 1) * (h // v.get("num_attention_heads", 16) // 2) * 8
    return total, layers + tuple(once), buffer_bytes


def _llama4_text(cfg, arch, problems, H, L, nh, nkv, I, V, hd, E, k, vision, meta) -> ModelSpec:
    """ModelSpec of a Llama 4 decoder (Llama4TextDecoderLayer): MoE layers (attention + Llama4TextMoe:
    router [E, H], shared expert gate/up/down of `intermediate_size`, fused experts [E, H, 2I] and
    [E, I, H]) and, with `interleave_moe_layer_step` > 1, dense layers (attention + gate/up/down of
    `intermediate_size_mlp`). q/k/v/o biases follow `attention_bias`; the L2 qk norm has no weights."""
    for key in ("num_local_experts", "num_experts_per_tok", "intermediate_size_mlp"):
        if key not in cfg:
            cfg = {**cfg, key: _L4_TEXT_DEFAULTS[key]}
    E = _int(cfg, "num_local_experts", problems)
    k = _int(cfg, "num_experts_per_tok", problems)
    Imlp = _int(cfg, "intermediate_size_mlp", problems)
    if cfg.get("head_dim") is None:
        hd = _L4_TEXT_DEFAULTS["head_dim"]
    if problems:
        raise InvalidSpecError("model config", problems)
    qd, kvd = nh * hd, nkv * hd
    b = bool(cfg.get("attention_bias", False))
    attn = [Linear("self_attn.q_proj", qd, H, b), Linear("self_attn.k_proj", kvd, H, b),
            Linear("self_attn.v_proj", kvd, H, b), Linear("self_attn.o_proj", H, qd, b)]
    shared = [Linear("feed_forward.shared_expert.gate_proj", I, H, False, "shared_expert"),
              Linear("feed_forward.shared_expert.up_proj", I, H, False, "shared_expert"),
              Linear("feed_forward.shared_expert.down_proj", H, I, False, "shared_expert")]
    dense = [Linear("feed_forward.gate_proj", Imlp, H, False, "mlp"), Linear("feed_forward.up_proj", Imlp, H, False, "mlp"),
             Linear("feed_forward.down_proj", H, Imlp, False, "mlp")]
    norms = (("input_layernorm", H), ("post_attention_layernorm", H))
    # NB: Llama4Router subclasses nn.Linear (bitsandbytes skips it, peft's all-linear wraps it);
    # counted as a plain [E, H] parameter, as Mixtral's router is
    moe_norms = norms + (("feed_forward.router.weight", E * H),)
    moe_ids = set(moe_layer_ids(arch, cfg, L))
    kinds = tuple("moe" if i in moe_ids else "dense" for i in range(L))
    rope = rope_layers(cfg, L)
    types, _ = layer_types(arch, cfg, L)
    chunk = cfg.get("attention_chunk_size", _L4_TEXT_DEFAULTS["attention_chunk_size"])
    vparams, vlin, vbuf = vision if vision is not None else (0, (), 0)
    archs = cfg.get("architectures") or []
    return ModelSpec(
        name=meta["name"] or meta["hub_id"] or arch.model_type, model_type=arch.model_type,
        architecture=archs[0] if archs else "",
        hidden_size=H, num_layers=L, num_heads=nh, num_kv_heads=nkv, head_dim=hd, intermediate_size=I,
        vocab_size=V, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        hidden_act=str(cfg.get("hidden_act") or "silu"),
        layer_linears=tuple(attn + shared), layer_norms=moe_norms, num_experts=E, experts_per_token=k,
        hub_id=meta["hub_id"], aliases=tuple(meta["aliases"]), source=meta["source"], config=dict(meta["config"]),
        sliding_window=None, attention_types=tuple(sorted(set(types))), arch=arch, rotary_modules=1,
        layer_kinds=kinds, dense_layer_linears=tuple(attn + dense) if "dense" in kinds else (),
        dense_layer_norms=norms if "dense" in kinds else (), layer_rope=rope, layer_attention=tuple(types),
        attention_chunk_size=chunk if "chunked_attention" in types else None,
        shared_expert_intermediate_size=I, expert_intermediate_size=I,
        vision_params=vparams, vision_linear_params=sum(l.numel for l in vlin), vision_linears=vlin,
        vision_adapted_by_all_linear=bool(vlin), vision_buffer_bytes=vbuf,
    )
