"""ModelSpec: the inventory of a decoder model, read from its Hugging Face config.json values.

Every `nn.Linear` (the layers bitsandbytes quantizes) with its shape, the embeddings, lm_head (tied or
not), norms, biases and rotary buffers -- enough to count every byte a training step keeps, without
importing transformers. Shapes follow transformers 5.24's modeling files for each family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .arch import MULTIMODAL, SUPPORTED, Arch, arch_of, layer_types, multimodal_of, rope_layers, vision_tower_of
from .errors import InvalidSpecError

__all__ = ["Linear", "MLA", "ModelSpec", "model_from_config", "SUPPORTED"]


@dataclass(frozen=True)
class Linear:
    """One nn.Linear in a decoder layer (or the model), weight [out, in]."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False
    #: attn | mlp | router | head | vision | shared_gate (Qwen2-MoE's nn.Linear(H, 1) `mlp.shared_expert_gate`);
    #: a shared expert's gate/up/down projections are "mlp"
    kind: str = "attn"

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class MLA:
    """DeepSeek multi-head latent attention dims (DeepseekV3Attention / DeepseekV2Attention).

    Linears: q_a_proj [q_lora_rank, H] + q_a_layernorm [q_lora_rank] + q_b_proj [heads·qk_head_dim,
    q_lora_rank] (q_lora_rank > 0), else q_proj [heads·qk_head_dim, H]; kv_a_proj_with_mqa
    [kv_lora_rank + qk_rope_head_dim, H] + kv_a_layernorm [kv_lora_rank]; kv_b_proj
    [heads·(qk_nope_head_dim + v_head_dim), kv_lora_rank]; o_proj [H, heads·v_head_dim].
    SDPA gets q and k with head dim qk_head_dim and v with v_head_dim (on CPU that is the math kernel).
    """

    q_lora_rank: int  # 0: no q compression (q_proj), config `q_lora_rank: null`
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only causal LM, as transformers builds it from `config`.

    Mixture-of-experts models: `layer_linears` / `layer_norms` describe an MoE layer (its attention,
    any shared expert's nn.Linear modules, norms, and the router's [E, H] parameter under
    `layer_norms`); the fused experts are `expert_params_per_layer` ([E, 2·I_moe, H] + [E, H, I_moe],
    I_moe = `expert_intermediate_size`). Where a family mixes dense and MoE layers (Qwen2-MoE /
    Qwen3-MoE `mlp_only_layers`, `decoder_sparse_step`), `layer_kinds` names each layer ("moe" or
    "dense", in order) and `dense_layer_linears` / `dense_layer_norms` describe a dense layer (a
    gate/up/down MLP of `intermediate_size`). `layer_kinds` is empty when every layer is alike (all
    dense models, Mixtral, and Qwen MoE checkpoints whose layers are all MoE): then
    `num_layers × layer_*` is the whole stack, as before.
    DeepSeek (deepseek_v2/v3): the first `first_k_dense_replace` layers are dense (`layer_kinds`), the
    shared experts sit in `layer_linears` as mlp.shared_experts.* (intermediate
    `shared_expert_intermediate_size` = I_moe × n_shared_experts). MLA attention (`mla` not None):
    `head_dim` is transformers' `config.head_dim` (= qk_rope_head_dim, the rotary dim), `q_dim`/`kv_dim`
    are heads × mla.qk_head_dim (the width of q and of the expanded keys), the value width is
    heads × mla.v_head_dim.
    `layer_norms` holds every per-layer parameter that is neither an nn.Linear nor a fused expert
    weight: the norms, the router (`mlp.gate.weight`; gpt_oss `mlp.router.weight` + `mlp.router.bias`),
    gpt_oss's attention sinks (`self_attn.sinks` [heads]) and expert biases
    (`mlp.experts.gate_up_proj_bias` [E, 2I], `mlp.experts.down_proj_bias` [E, H]). None of them is
    an nn.Linear, so bitsandbytes leaves them 16-bit and prepare upcasts them to fp32.
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
    #: routed experts' intermediate size (Qwen: `moe_intermediate_size`); 0 = `intermediate_size` (Mixtral)
    moe_intermediate_size: int = 0
    #: Qwen2-MoE's shared expert MLP intermediate size (0 = no shared expert)
    shared_expert_intermediate_size: int = 0
    #: per-layer "moe" / "dense" where the layers differ; () = every layer alike
    layer_kinds: tuple[str, ...] = ()
    #: a dense layer's Linears and norms where `layer_kinds` has "dense" entries
    dense_layer_linears: tuple[Linear, ...] = ()
    dense_layer_norms: tuple[tuple[str, int], ...] = ()
    #: the router renormalises its top-k weights (Qwen `norm_topk_prob`; always for Mixtral)
    norm_topk_prob: bool = True
    #: `output_router_logits`: every layer's router logits kept for the load-balancing aux loss
    router_aux_loss: bool = False
    #: dimensions the rotary embedding covers: head_dim, or int(head_dim * partial_rotary_factor)
    #: (Phi-4-mini: 96 of 128); 0 reads as head_dim
    rotary_dim: int = 0
    #: rope_scaling's rope type ("default", "llama3", "linear", "longrope", ...): longrope keeps a third
    #: fp32 [rope_dim/2] tensor (`long_inv_freq`) once the first forward ran
    rope_type: str = "default"
    #: Llama 4: `layer_rope[i]` whether layer i applies rotary (`no_rope_layers`; the NoPE layers apply
    #: attention temperature tuning instead and skip the weightless L2 qk norm); `layer_attention[i]`
    #: "full_attention" or "chunked_attention" (a block-diagonal causal mask of `attention_chunk_size`
    #: tokens); () for every other family
    layer_rope: tuple[bool, ...] = ()
    layer_attention: tuple[str, ...] = ()
    attention_chunk_size: int | None = None
    #: Llama 4 `use_qk_norm`: the weightless L2 norm of q and k on the RoPE layers
    l2_qk_norm: bool = False
    #: Llama 4 `attn_temperature_tuning`: the NoPE layers scale q by log1p(floor((pos + 1) / floor_scale))
    #: * attn_scale + 1
    attn_temperature_tuning: bool = False
    #: Llama 4's multimodal checkpoints: parameters of the vision tower + projector the checkpoint
    #: holds but AutoModelForCausalLM does not build (it makes Llama4ForCausalLM from `text_config` and
    #: drops `vision_model.*` / `multi_modal_projector.*`): not on the GPU, not in `params`
    unloaded_vision_params: int = 0
    #: multimodal checkpoints (Gemma 3): parameters of the non-text towers (vision encoder and
    #: projector), which transformers builds and from_pretrained loads although a text step never runs them
    vision_params: int = 0
    #: their nn.Linear modules, every layer's (what bitsandbytes quantizes and peft's all-linear adapts)
    vision_linears: tuple[Linear, ...] = field(default=(), repr=False)
    #: element counts of every other tower parameter (conv, position embedding, norms, projector)
    vision_other_tensors: tuple[int, ...] = field(default=(), repr=False)
    #: bytes of the towers' buffers (SigLIP position_ids: int64 [1, patches])
    vision_buffer_bytes: int = 0
    #: multi-head latent attention dims (deepseek), None for q/k/v attention
    mla: MLA | None = None
    #: config `attention_dropout` (granite-3.0/3.1 ship 0.1): applied by the attention in training;
    #: NB not modelled by the closed form (estimate notes it)
    attention_dropout: float = 0.0

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
        return self.num_heads * (self.mla.qk_head_dim if self.mla else self.head_dim)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * (self.mla.qk_head_dim if self.mla else self.head_dim)

    @property
    def is_moe(self) -> bool:
        return self.arch.is_moe

    @property
    def expert_intermediate_size(self) -> int:
        """I of one routed expert: `moe_intermediate_size` (Qwen), else `intermediate_size` (Mixtral)."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def expert_params_per_layer(self) -> int:
        """Fused 3-D expert tensors (gate_up_proj [E, 2I, H] + down_proj [E, H, I]) per MoE layer."""
        return self.num_experts * 3 * self.expert_intermediate_size * self.hidden_size if self.is_moe else 0

    @property
    def num_moe_layers(self) -> int:
        """Decoder layers holding the sparse MoE block."""
        if not self.is_moe:
            return 0
        return self.layer_kinds.count("moe") if self.layer_kinds else self.num_layers

    @property
    def num_dense_layers(self) -> int:
        """Decoder layers with a dense MLP (all of them for a dense model)."""
        return self.num_layers - self.num_moe_layers

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
        top = self.embedding_params + self.lm_head_params + self.hidden_size + self.vision_params
        if not self.layer_kinds:
            return self.num_layers * per_layer + top
        dense = (sum(l.numel + (l.out_features if l.bias else 0) for l in self.dense_layer_linears)
                 + sum(n for _, n in self.dense_layer_norms))
        return self.num_moe_layers * per_layer + self.num_dense_layers * dense + top

    @property
    def rope_dim(self) -> int:
        """Dimensions the rotary embedding rotates (cos/sin width): head_dim unless partial."""
        return self.rotary_dim or self.head_dim

    @property
    def rotary_buffer_elements(self) -> int:
        """fp32 buffers of the rotary embedding(s): inv_freq and original_inv_freq, rope_dim/2 each
        (`torch.arange(0, dim, 2)`, modeling_rope_utils.py / Phi3RotaryEmbedding)."""
        return self.rotary_modules * 2 * (self.rope_dim // 2)

    @property
    def rotary_state_elements(self) -> int:
        """fp32 rotary tensors that are not registered buffers: longrope's `long_inv_freq` [rope_dim/2],
        a plain attribute the first forward creates and keeps (modeling_rope_utils.py
        `longrope_frequency_update`)."""
        return self.rotary_modules * (self.rope_dim // 2) if self.rope_type == "longrope" else 0

    @property
    def router_buffer_elements(self) -> int:
        """fp32 router buffers of all MoE layers (deepseek_v3 e_score_correction_bias [E] each), else 0."""
        return self.num_moe_layers * self.num_experts if self.is_moe and self.arch.moe.router_bias_buffer else 0

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
    wrapper = None
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrapper: the text tower trains
        wrapper = cfg
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
        if wrapper.get("model_type") == "llama4":  # AutoModelForCausalLM: Llama4ForCausalLM, text only
            cfg.setdefault("model_type", "llama4_text")
    arch = arch_of(cfg.get("model_type"))
    cfg = {**dict(arch.defaults), **cfg}  # keys the hub file leaves to the config class
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
    E = k = I_moe = I_shared = 0
    if arch.moe is not None:
        E = _int(cfg, arch.moe.experts_key, problems)
        k = _int(cfg, arch.moe.top_k_key, problems)
        if arch.moe.expert_intermediate_key != "intermediate_size":
            I_moe = _int(cfg, arch.moe.expert_intermediate_key, problems)
        if arch.moe.shared_expert_key:
            I_shared = _int(cfg, arch.moe.shared_expert_key, problems)
        if arch.moe.shared_experts_key:  # DeepseekV3MoE: MLP(intermediate_size=moe_I * n_shared_experts)
            I_shared = I_moe * _count(cfg, arch.moe.shared_experts_key, problems)
        if arch.moe.first_dense_key:
            _count(cfg, arch.moe.first_dense_key, problems)
    mla = _mla(cfg, problems) if arch.attention == "mla" else None
    if mla is not None:
        hd = mla.qk_rope_head_dim  # transformers' DeepseekV3Config.head_dim (the rotary dim)
    if problems:
        raise InvalidSpecError("model config", problems)
    tied = bool(cfg.get("tie_word_embeddings", arch.tied_default))
    qd, kvd = nh * hd, nkv * hd
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    qkv_bias = attn_bias if arch.qkv_bias is None else arch.qkv_bias
    if arch.qkv_bias_key:
        qkv_bias = bool(cfg.get(arch.qkv_bias_key, qkv_bias))
    o_bias = attn_bias if arch.o_bias is None else arch.o_bias
    if mla is not None:
        linears = _mla_linears(mla, H, nh, attn_bias)
    elif arch.fused_qkv:
        linears = [Linear("self_attn.qkv_proj", qd + 2 * kvd, H, qkv_bias)]
    else:
        linears = [Linear("self_attn.q_proj", qd, H, qkv_bias),
                   Linear("self_attn.k_proj", kvd, H, qkv_bias),
                   Linear("self_attn.v_proj", kvd, H, qkv_bias)]
    linears.append(Linear("self_attn.o_proj", H, nh * mla.v_head_dim if mla else qd, o_bias))
    attn_linears = list(linears)
    # the MLP's module path: "mlp"; Llama 4 "feed_forward" (dense layers and the MoE block alike)
    blk = arch.moe.block if arch.moe is not None else "mlp"
    Id = _int(cfg, arch.moe.dense_intermediate_key, problems) if arch.moe is not None else I
    if arch.fused_gate_up:
        dense_mlp = [Linear(f"{blk}.gate_up_proj", 2 * Id, H, mlp_bias, "mlp")]
    else:
        dense_mlp = [Linear(f"{blk}.gate_proj", Id, H, mlp_bias, "mlp"),
                     Linear(f"{blk}.up_proj", Id, H, mlp_bias, "mlp")]
    dense_mlp.append(Linear(f"{blk}.down_proj", H, Id, mlp_bias, "mlp"))
    if arch.moe is None:
        linears += dense_mlp
    elif I_shared and arch.moe.shared_experts_key:  # DeepseekV3MoE.shared_experts = DeepseekV3MLP(moe_I * n)
        linears += _mlp_linears("mlp.shared_experts", I_shared, H, mlp_bias)
    elif I_shared:  # Qwen2MoeSparseMoeBlock / Llama4TextMoe: shared_expert = an MLP of I_shared
        linears += [Linear(f"{blk}.shared_expert.gate_proj", I_shared, H, False, "mlp"),
                    Linear(f"{blk}.shared_expert.up_proj", I_shared, H, False, "mlp"),
                    Linear(f"{blk}.shared_expert.down_proj", H, I_shared, False, "mlp")]
    if arch.moe is not None and arch.moe.shared_expert_gate:
        linears.append(Linear(f"{blk}.shared_expert_gate", 1, H, False, "shared_gate"))
    if arch.post_norms:  # olmo2: no input_layernorm, a norm after the MLP instead
        norms = [("post_attention_layernorm", H), ("post_feedforward_layernorm", H)]
    else:
        norms = [("input_layernorm", H), ("post_attention_layernorm", H)]
    if arch.sandwich_norms:
        norms += [("pre_feedforward_layernorm", H), ("post_feedforward_layernorm", H)]
    if arch.qk_norm:
        if arch.qk_norm_scope == "proj":  # olmo2: over the whole projections
            norms += [("self_attn.q_norm", qd), ("self_attn.k_norm", kvd)]
        else:
            norms += [("self_attn.q_norm", hd), ("self_attn.k_norm", hd)]
    if arch.attention_sinks:
        norms += [("self_attn.sinks", nh)]
    if mla is not None:
        if mla.q_lora_rank:
            norms += [("self_attn.q_a_layernorm", mla.q_lora_rank)]
        norms += [("self_attn.kv_a_layernorm", mla.kv_lora_rank)]
    dense_norms = tuple(norms)
    kinds: tuple[str, ...] = ()
    if arch.moe is not None:
        # NB: transformers 5 routers are not nn.Linear; counted as a plain [E, H] parameter.
        # NB: Llama4Router subclasses nn.Linear, but bitsandbytes skips it (`type(m) is nn.Linear`): a
        # plain [E, H] parameter as well
        router = arch.moe.router_name
        norms += [(f"{blk}.{router}.weight", E * H)]
        if arch.moe.router_bias:
            norms += [(f"{blk}.{router}.bias", E)]
        if arch.moe.expert_bias:
            Ie = I_moe or I
            norms += [(f"{blk}.experts.gate_up_proj_bias", E * 2 * Ie), (f"{blk}.experts.down_proj_bias", E * H)]
        moe_layers = arch.moe.moe_layers(cfg, L)
        if not all(moe_layers):
            kinds = tuple("moe" if m else "dense" for m in moe_layers)
    types, window = layer_types(arch, cfg, L)
    # one set of rotary buffers per attention type present (gemma3), else one
    rotary_modules = len(set(types)) if arch.rotary == "per_layer_type" else 1
    chunked = arch.sliding == "chunked"  # Llama 4: NoPE layers, chunked attention on the RoPE layers
    archs = cfg.get("architectures") or []
    unloaded = _llama4_vision_params(wrapper) if wrapper is not None and wrapper.get("model_type") == "llama4" else 0
    vision = _vision_inventory(wrapper, H) if wrapper is not None and wrapper.get("model_type") in MULTIMODAL else None
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
        arch=arch, rotary_modules=rotary_modules, rotary_dim=_rotary_dim(arch, cfg, hd), rope_type=_rope_type(cfg),
        mla=mla,
        **(vision or {}),
        norm_topk_prob=bool(cfg.get(arch.moe.norm_topk_key, False)) if arch.moe and arch.moe.norm_topk_key else True,
        router_aux_loss=bool(arch.moe and cfg.get("output_router_logits")),
        moe_intermediate_size=I_moe, shared_expert_intermediate_size=I_shared, layer_kinds=kinds,
        dense_layer_linears=tuple(attn_linears + dense_mlp) if kinds else (),
        dense_layer_norms=dense_norms if kinds else (),
        layer_rope=rope_layers(cfg, L) if chunked else (), layer_attention=types if chunked else (),
        attention_chunk_size=cfg.get("attention_chunk_size") if chunked and "chunked_attention" in types else None,
        unloaded_vision_params=unloaded, l2_qk_norm=chunked and bool(cfg.get("use_qk_norm", True)),
        attn_temperature_tuning=chunked and bool(cfg.get("attn_temperature_tuning", True)),
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
    )


def _rope(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rope if isinstance(rope, Mapping) else {}


def _rope_type(cfg: Mapping[str, Any]) -> str:
    rope = _rope(cfg)
    return str(rope.get("rope_type", rope.get("type")) or "default")


def _rotary_dim(arch: Arch, cfg: Mapping[str, Any], head_dim: int) -> int:
    """int(head_dim * partial_rotary_factor) where transformers applies the factor, else head_dim.

    The factor is a top-level key (Phi-4-mini) or sits in rope_scaling / rope_parameters. The
    family's default rope applies it only if the family's rotary module reads it (`arch.partial_rotary`);
    the non-default rope types (modeling_rope_utils.py: llama3, longrope, yarn, linear, dynamic)
    always do.
    """
    factor = cfg.get("partial_rotary_factor", _rope(cfg).get("partial_rotary_factor"))
    if not factor or not (arch.partial_rotary or _rope_type(cfg) != "default"):
        return head_dim
    return int(head_dim * factor)


def _vision_inventory(wrapper: Mapping[str, Any], text_hidden: int) -> dict[str, Any]:
    """The non-text towers of a multimodal checkpoint (memplan/arch.py VISION_TOWERS, MULTIMODAL),
    as ModelSpec fields: every vision Linear, every other tower tensor, the buffers, and their total."""
    mm = multimodal_of(wrapper.get("model_type"))
    vcfg = dict(wrapper.get("vision_config") or {})
    tower = vision_tower_of(vcfg.get("model_type", mm.vision_default))
    v = {**dict(tower.defaults), **vcfg}
    problems: list[str] = []
    C = _int(v, "hidden_size", problems)
    Iv = _int(v, "intermediate_size", problems)
    Lv = _int(v, "num_hidden_layers", problems)
    ch = _int(v, "num_channels", problems)
    img, patch = v.get("image_size"), v.get("patch_size")
    if not isinstance(img, int) or not isinstance(patch, int) or img <= 0 or patch <= 0:
        problems.append(f"vision_config image_size and patch_size must be positive integers, got {img!r}, {patch!r}")
        img = patch = 1
    if v.get("vision_use_head"):
        problems.append("vision_config vision_use_head: the attention-pooling head is not modelled "
                        "(`memplan simulate` traces it)")
    if problems:
        raise InvalidSpecError("model config", problems)
    patches = (img // patch) ** 2
    layer = [Linear("self_attn.q_proj", C, C, True, "vision"), Linear("self_attn.k_proj", C, C, True, "vision"),
             Linear("self_attn.v_proj", C, C, True, "vision"), Linear("self_attn.out_proj", C, C, True, "vision"),
             Linear("mlp.fc1", Iv, C, True, "vision"), Linear("mlp.fc2", C, Iv, True, "vision")]
    linears = tuple(layer) * Lv
    other = [C * ch * patch * patch, C, patches * C]  # patch_embedding weight + bias, position_embedding
    other += [C, C, C, C] * Lv                         # layer_norm1/2 weight + bias
    other += [C, C]                                    # post_layernorm
    other += [C * text_hidden, C]                      # projector: mm_input_projection_weight, mm_soft_emb_norm
    total = sum(l.numel + (l.out_features if l.bias else 0) for l in linears) + sum(other)
    return {"vision_params": total, "vision_linears": linears, "vision_other_tensors": tuple(other),
            "vision_buffer_bytes": 8 * patches}


def _count(cfg: Mapping[str, Any], key: str, problems: list[str]) -> int:
    """A non-negative integer config value (0 allowed: no shared experts, no dense layers)."""
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        problems.append(f"config {key} must be a non-negative integer, got {v!r}")
        return 0
    return v


def _mla(cfg: Mapping[str, Any], problems: list[str]) -> MLA:
    """MLA dims from a deepseek config; `q_lora_rank: null` (DeepSeek-V2-Lite) means a plain q_proj.

    Every key must be present: the config classes' defaults (DeepSeek-V3's 1536/512/128/64/128) are
    not guessed for a config that omits them."""
    if "q_lora_rank" not in cfg:
        problems.append("config q_lora_rank must be given (an integer, or null for a plain q_proj)")
    q = cfg.get("q_lora_rank")
    q_rank = 0 if q is None else _int(cfg, "q_lora_rank", problems)
    return MLA(q_rank, _int(cfg, "kv_lora_rank", problems), _int(cfg, "qk_nope_head_dim", problems),
               _int(cfg, "qk_rope_head_dim", problems), _int(cfg, "v_head_dim", problems))


def _mla_linears(mla: MLA, H: int, nh: int, bias: bool) -> list[Linear]:
    """DeepseekV3Attention's Linears before o_proj, in construction order; q_a_proj and
    kv_a_proj_with_mqa take `attention_bias`, q_proj / q_b_proj / kv_b_proj never have a bias."""
    if mla.q_lora_rank:
        lins = [Linear("self_attn.q_a_proj", mla.q_lora_rank, H, bias),
                Linear("self_attn.q_b_proj", nh * mla.qk_head_dim, mla.q_lora_rank)]
    else:
        lins = [Linear("self_attn.q_proj", nh * mla.qk_head_dim, H)]
    return lins + [Linear("self_attn.kv_a_proj_with_mqa", mla.kv_lora_rank + mla.qk_rope_head_dim, H, bias),
                   Linear("self_attn.kv_b_proj", nh * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank)]


def _mlp_linears(prefix: str, inter: int, H: int, bias: bool) -> list[Linear]:
    return [Linear(f"{prefix}.gate_proj", inter, H, bias, "mlp"), Linear(f"{prefix}.up_proj", inter, H, bias, "mlp"),
            Linear(f"{prefix}.down_proj", H, inter, bias, "mlp")]
#: Llama4VisionConfig's defaults (configuration_llama4.py) for keys a config.json may omit
_L4_VISION_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 34, "num_channels": 3, "intermediate_size": 5632,
                       "vision_output_dim": 7680, "image_size": 448, "patch_size": 14, "projector_input_dim": 4096,
                       "projector_output_dim": 4096}


def _llama4_vision_params(cfg: Mapping[str, Any]) -> int:
    """Parameters of Llama4VisionModel + Llama4MultiModalProjector (what AutoModelForImageTextToText
    would add; AutoModelForCausalLM drops them).

    Per encoder layer (Llama4VisionEncoderLayer): q/k/v/o [h, h] with bias, fc1 [Iv, h] + bias, fc2
    [h, Iv] + bias, two LayerNorms (weight + bias). Model: patch_embedding.linear [h, c·p²] (no bias),
    class_embedding [h], positional_embedding_vlm [(img/p)² + 1, h], layernorm_pre/post (2h each),
    vision_adapter.mlp fc1 [proj_in, Iv] and fc2 [proj_out, proj_out] (no bias); projector
    linear_1 [H_text, vision_output_dim] (no bias).
    """
    v = {**_L4_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    h, Iv, Lv = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    img, p = v["image_size"], v["patch_size"]
    H = (cfg.get("text_config") or {}).get("hidden_size", 5120)
    per_layer = 4 * (h * h + h) + (Iv * h + Iv) + (h * Iv + h) + 4 * h
    once = (h * v["num_channels"] * p * p + v["projector_input_dim"] * Iv
            + v["projector_output_dim"] ** 2 + H * v["vision_output_dim"])
    return Lv * per_layer + once + h + ((img // p) ** 2 + 1) * h + 4 * h
