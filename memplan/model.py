"""ModelSpec: the inventory of a decoder model, read from its Hugging Face config.json values.

Every `nn.Linear` (the layers bitsandbytes quantizes) with its shape, the embeddings, lm_head (tied or
not), norms, biases and rotary buffers -- enough to count every byte a training step keeps, without
importing transformers. Shapes follow transformers 5.24's modeling files for each family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .arch import SUPPORTED, Arch, arch_of, layer_types
from .errors import InvalidSpecError

__all__ = ["Linear", "ModelSpec", "model_from_config", "SUPPORTED"]


@dataclass(frozen=True)
class Linear:
    """One nn.Linear in a decoder layer (or the model), weight [out, in]."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False
    kind: str = "attn"  # attn | mlp | router | head

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only causal LM, as transformers builds it from `config`.

    layer_norms: every per-layer parameter that is neither an nn.Linear (`layer_linears`) nor a fused
    expert weight (`expert_params_per_layer`), as (name under the layer, numel): the norms, and for
    MoE families the router (`mlp.gate.weight` Mixtral; `mlp.router.weight` + `mlp.router.bias`
    gpt_oss), plus gpt_oss's attention sinks (`self_attn.sinks` [heads]) and expert biases
    (`mlp.experts.gate_up_proj_bias` [E, 2I], `mlp.experts.down_proj_bias` [E, H]). None of them is
    an nn.Linear, so bitsandbytes leaves them 16-bit and prepare upcasts them to fp32.
    intermediate_size: for MoE families, one expert's intermediate size (`MoELayout.intermediate_key`).
    """

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
        """Fused 3-D expert tensors (gate_up_proj [E, 2I, H] + down_proj [E, H, I]) per layer."""
        return self.num_experts * 3 * self.intermediate_size * self.hidden_size if self.is_moe else 0

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
        return self.num_layers * per_layer + self.embedding_params + self.lm_head_params + self.hidden_size

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
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrapper: the text tower trains
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    arch = arch_of(cfg.get("model_type"))
    model_type = arch.model_type
    if arch.defaults:  # config-class defaults where config.json lacks the key (gpt_oss)
        cfg = {**dict(arch.defaults), **cfg}
    problems: list[str] = []
    H = _int(cfg, "hidden_size", problems)
    L = _int(cfg, "num_hidden_layers", problems)
    nh = _int(cfg, "num_attention_heads", problems)
    nkv = _int(cfg, "num_key_value_heads", problems, cfg.get("num_attention_heads")) if cfg.get(
        "num_key_value_heads") is not None else nh
    I = _int(cfg, arch.moe.intermediate_key if arch.moe is not None else "intermediate_size", problems)
    V = _int(cfg, "vocab_size", problems)
    hd = cfg.get("head_dim") or (H // nh if nh else 0)
    if not isinstance(hd, int) or hd <= 0:
        problems.append(f"config head_dim must be a positive integer, got {hd!r}")
        hd = 1
    E = k = 0
    if arch.moe is not None:
        E = _int(cfg, arch.moe.experts_key, problems)
        k = _int(cfg, arch.moe.top_k_key, problems)
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
    if arch.attention_sinks:
        norms += [("self_attn.sinks", nh)]
    if arch.moe is not None:
        # NB: transformers 5 routers are not nn.Linear; counted as a plain [E, H] parameter.
        norms += [(f"mlp.{arch.moe.router}.weight", E * H)]
        if arch.moe.router_bias:
            norms += [(f"mlp.{arch.moe.router}.bias", E)]
        if arch.moe.expert_bias:
            norms += [("mlp.experts.gate_up_proj_bias", E * 2 * I), ("mlp.experts.down_proj_bias", E * H)]
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
