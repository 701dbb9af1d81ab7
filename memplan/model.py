"""ModelSpec: the inventory of a decoder model, read from its Hugging Face config.json values.

Every `nn.Linear` (the layers bitsandbytes quantizes) with its shape, the embeddings, lm_head (tied or
not), norms, biases and rotary buffers -- enough to count every byte a training step keeps, without
importing transformers. Shapes follow transformers 5.24's modeling files for each family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InvalidSpecError, UnsupportedArchitectureError

#: model_type -> family. A family decides module names, norms and MLP kind.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "phi3": "phi3",
    "mixtral": "moe",
}
SUPPORTED = tuple(FAMILIES)


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

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
        n_rotary = 1
        if self.model_type == "gemma3_text":  # one rotary module per attention type present
            types = self.config.get("layer_types") or [
                "full_attention" if (i + 1) % int(self.config.get("sliding_window_pattern", 6)) == 0
                else "sliding_attention" for i in range(self.num_layers)]
            n_rotary = len(set(types))
        return n_rotary * 2 * (self.head_dim // 2)

    @property
    def buffer_bytes(self) -> int:
        """Non-parameter buffers (fp32): rotary frequencies, Gemma's embed_scale."""
        return 4 * (self.rotary_buffer_elements + (1 if self.family == "gemma" else 0))

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
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"the closed-form estimator does not cover model_type {model_type!r} "
            f"(supported: {', '.join(SUPPORTED)}); use `memplan simulate` for any architecture transformers knows")
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
    if problems:
        raise InvalidSpecError("model config", problems)
    family = FAMILIES[model_type]
    tied_default = family == "gemma"
    tied = bool(cfg.get("tie_word_embeddings", tied_default))
    qd, kvd = nh * hd, nkv * hd
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    linears: list[Linear]
    if family == "phi3":
        linears = [Linear("self_attn.qkv_proj", qd + 2 * kvd, H, attn_bias),
                   Linear("self_attn.o_proj", H, qd, attn_bias),
                   Linear("mlp.gate_up_proj", 2 * I, H, False, "mlp"),
                   Linear("mlp.down_proj", H, I, False, "mlp")]
    else:
        qkv_bias = True if model_type == "qwen2" else attn_bias
        o_bias = False if model_type == "qwen2" else attn_bias
        linears = [Linear("self_attn.q_proj", qd, H, qkv_bias),
                   Linear("self_attn.k_proj", kvd, H, qkv_bias),
                   Linear("self_attn.v_proj", kvd, H, qkv_bias),
                   Linear("self_attn.o_proj", H, qd, o_bias)]
        if family != "moe":
            linears += [Linear("mlp.gate_proj", I, H, mlp_bias, "mlp"),
                        Linear("mlp.up_proj", I, H, mlp_bias, "mlp"),
                        Linear("mlp.down_proj", H, I, mlp_bias, "mlp")]
    norms = [("input_layernorm", H), ("post_attention_layernorm", H)]
    if model_type in ("gemma2", "gemma3_text"):
        norms += [("pre_feedforward_layernorm", H), ("post_feedforward_layernorm", H)]
    if model_type in ("qwen3", "gemma3_text"):
        norms += [("self_attn.q_norm", hd), ("self_attn.k_norm", hd)]
    E = k = 0
    if family == "moe":
        E = _int(cfg, "num_local_experts", problems)
        k = _int(cfg, "num_experts_per_tok", problems)
        # NB: transformers 5 routers are not nn.Linear; counted as a plain [E, H] parameter.
        norms += [("mlp.gate.weight", E * H)]
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
        final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
        sliding_window=cfg.get("sliding_window"),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
    )
