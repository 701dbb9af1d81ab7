"""ModelSpec from config.json values equals what transformers builds, to the parameter."""

from __future__ import annotations

import copy

import pytest

from memplan.arch import QWEN2_MOE_PEFT
from memplan.catalogue import _model_entries, list_models
from memplan.errors import UnsupportedArchitectureError
from memplan.model import SUPPORTED, model_from_config


def test_catalogue_has_the_popular_models():
    names = {m.name for m in list_models()}
    assert len(names) >= 25
    for must in ("llama-2-7b", "llama-3-70b", "llama-3.1-405b", "mistral-7b-v0.1", "mixtral-8x7b", "qwen2.5-72b",
                 "gemma-2-27b", "phi-3-mini-4k", "tinyllama-1.1b"):
        assert must in names


@pytest.mark.parametrize("key", sorted(_model_entries()))
def test_param_count_equals_the_catalogue_count(key):
    """`params` in each catalogue file was counted by transformers (scripts/verify_catalogue.py)."""
    e = _model_entries()[key]
    assert model_from_config(e["config"]).params == e["params"]


def test_published_counts():
    by = {m.name: m.params for m in list_models()}
    assert by["llama-2-7b"] == 6_738_415_616
    assert by["llama-3-8b"] == 8_030_261_248
    assert by["mistral-7b-v0.1"] == 7_241_732_096
    assert by["mixtral-8x7b"] == 46_702_792_704
    assert by["qwen2.5-7b"] == 7_615_616_512
    assert by["gemma-2-9b"] == 9_241_705_984
    assert by["phi-3-mini-4k"] == 3_821_079_552


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as e:
        model_from_config({"model_type": "gpt2", "n_embd": 768})
    assert "gpt2" in str(e.value) and "llama" in str(e.value) and "simulate" in str(e.value)
    assert len(SUPPORTED) >= 9


@pytest.fixture(scope="module")
def transformers_mod():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("key", sorted(_model_entries()))
def test_shapes_match_transformers_on_meta(transformers_mod, key):
    """Build each catalogue model on the meta device: total and every layer module's shape agree."""
    import torch

    from memplan.runtime.load import hf_config

    e = _model_entries()[key]
    spec = model_from_config(e["config"])
    with torch.device("meta"):
        model = transformers_mod.AutoModelForCausalLM.from_config(hf_config(copy.deepcopy(e["config"])))
    assert sum(p.numel() for p in model.parameters()) == spec.params
    text = getattr(model.model, "language_model", model.model)  # Gemma3ForConditionalGeneration: the text tower
    # every layer kind, at its first index: the dense layers of a mixed model (deepseek
    # first_k_dense_replace, Qwen mlp_only_layers), then the MoE (or only) layer
    kinds = [("moe", spec.layer_linears, spec.layer_norms)]
    if spec.layer_kinds:
        kinds.append(("dense", spec.dense_layer_linears, spec.dense_layer_norms))
    for kind, spec_linears, spec_norms in kinds:
        layer = text.layers[spec.layer_kinds.index(kind) if spec.layer_kinds else 0]
        linears = {n: tuple(m.weight.shape) for n, m in layer.named_modules() if type(m) is torch.nn.Linear}
        assert linears == {l.name: (l.out_features, l.in_features) for l in spec_linears}
        biases = {n for n, m in layer.named_modules() if type(m) is torch.nn.Linear and m.bias is not None}
        assert biases == {l.name for l in spec_linears if l.bias}
        # every parameter outside the Linears and the fused expert weights: norms, routers (Llama4Router is an
        # nn.Linear subclass, not `type(m) is nn.Linear`), sinks, expert biases
        in_linear = {f"{n}.{w}" for n, m in layer.named_modules() if type(m) is torch.nn.Linear
                     for w in ("weight", "bias")}
        norms = {n: p.numel() for n, p in layer.named_parameters()
                 if n not in in_linear and not n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        assert norms == {(n if n.endswith((".weight", ".bias", "_bias", ".sinks")) else n + ".weight"): k
                         for n, k in spec_norms}
        experts = sum(p.numel() for n, p in layer.named_parameters()
                      if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
        assert experts == (spec.expert_params_per_layer if spec_linears is spec.layer_linears else 0)
    if e["config"].get("model_type") == "llama4":  # the vision tower + projector AutoModelForCausalLM drops
        with torch.device("meta"):
            full = transformers_mod.AutoModelForImageTextToText.from_config(hf_config(copy.deepcopy(e["config"])))
        assert sum(p.numel() for p in full.parameters()) - spec.params == spec.unloaded_vision_params
    assert model.config.tie_word_embeddings == spec.tie_word_embeddings
    bufs = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
               if "rotary" in n and not n.startswith("vision_model."))  # the text stack's rotary buffers
    assert bufs == 4 * spec.rotary_buffer_elements
    router_bufs = sum(b.numel() for n, b in model.named_buffers() if "e_score_correction_bias" in n)
    assert router_bufs == spec.router_buffer_elements
    # a multimodal checkpoint's other towers: every Linear's shape and bias, the rest, the buffers
    towers = [m for n, m in model.model.named_children() if n != "language_model"] if text is not model.model else []
    assert sum(p.numel() for t in towers for p in t.parameters()) == spec.vision_params
    vis = sorted((tuple(m.weight.shape), m.bias is not None) for t in towers for m in t.modules()
                 if isinstance(m, torch.nn.Linear))
    assert vis == sorted(((l.out_features, l.in_features), l.bias) for l in spec.vision_linears)
    assert sum(b.numel() * b.element_size() for t in towers for b in t.buffers()) == spec.vision_buffer_bytes


_DS_TINY = dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=512, q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                num_experts_per_tok=2, n_shared_experts=2, n_group=2, topk_group=1, first_k_dense_replace=1)


def test_deepseek_layers_by_hand():
    """MLA + one dense layer + two MoE layers, counted by hand (DeepseekV3Attention/MLP/MoE, 5.24)."""
    s = model_from_config(_DS_TINY)
    H, nh, qk, v, E, I, Is = 64, 4, 16 + 8, 16, 8, 32, 64
    attn = 32 * H + nh * qk * 32 + (16 + 8) * H + nh * (16 + v) * 16 + H * nh * v
    assert s.mla.qk_head_dim == qk and s.head_dim == 8 and s.q_dim == nh * qk and s.rotary_buffer_elements == 8
    assert s.layer_kinds == ("dense", "moe", "moe") and s.num_moe_layers == 2 and s.expert_intermediate_size == I
    dense = (sum(l.numel + (l.out_features if l.bias else 0) for l in s.dense_layer_linears)
             + sum(n for _, n in s.dense_layer_norms))
    assert dense == attn + 3 * 128 * H + 2 * H + 32 + 16
    assert s.shared_expert_intermediate_size == Is
    assert s.layer_linear_params == attn + 3 * Is * H
    assert s.expert_params_per_layer == E * 3 * I * H
    assert s.layer_norm_params == 2 * H + 32 + 16 + E * H  # the router weight counts as a plain [E, H]
    assert s.params == dense + 2 * (attn + 3 * Is * H + 2 * H + 48 + E * H + E * 3 * I * H) \
        + 2 * 512 * H + H
    assert s.router_buffer_elements == 2 * E  # e_score_correction_bias, one per MoE layer
    assert s.arch.moe.peft_names == QWEN2_MOE_PEFT and s.arch.moe.router_fp32


def test_deepseek_q_proj_when_q_lora_rank_is_null():
    s = model_from_config({**_DS_TINY, "q_lora_rank": None, "attention_bias": True})
    assert [l.name for l in s.layer_linears[:3]] == ["self_attn.q_proj", "self_attn.kv_a_proj_with_mqa",
                                                      "self_attn.kv_b_proj"]
    assert {l.name for l in s.layer_linears if l.bias} == {"self_attn.kv_a_proj_with_mqa", "self_attn.o_proj"}
    assert ("self_attn.q_a_layernorm", 32) not in s.layer_norms


def test_deepseek_config_without_mla_keys_lists_every_problem():
    from memplan.errors import InvalidSpecError

    cfg = {k: v for k, v in _DS_TINY.items() if k not in ("q_lora_rank", "v_head_dim", "first_k_dense_replace")}
    with pytest.raises(InvalidSpecError) as e:
        model_from_config(cfg)
    msg = str(e.value)
    assert "q_lora_rank" in msg and "v_head_dim" in msg and "first_k_dense_replace" in msg


def test_mixtral_spec_unchanged_by_the_deepseek_fields():
    s = next(model_from_config(e["config"]) for e in _model_entries().values()
             if e["config"].get("model_type") == "mixtral")
    assert (s.layer_kinds, s.moe_intermediate_size, s.shared_expert_intermediate_size, s.mla) == ((), 0, 0, None)
    assert s.num_moe_layers == s.num_layers and s.expert_intermediate_size == s.intermediate_size
    assert s.router_buffer_elements == 0 and s.q_dim == s.num_heads * s.head_dim
