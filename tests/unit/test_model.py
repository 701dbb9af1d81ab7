"""ModelSpec from config.json values equals what transformers builds, to the parameter."""

from __future__ import annotations

import copy

import pytest

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
    # one layer of each kind: layer 0 of a uniform stack; the first MoE and the first dense one of a mixed one
    kinds = [(text.layers[0], spec.layer_linears, spec.layer_norms)] if not spec.layer_kinds else [
        (text.layers[spec.layer_kinds.index(k)], lin, nrm) for k, lin, nrm in
        (("moe", spec.layer_linears, spec.layer_norms), ("dense", spec.dense_layer_linears, spec.dense_layer_norms))
        if k in spec.layer_kinds]
    for layer, lin, nrm in kinds:
        linears = {n: tuple(m.weight.shape) for n, m in layer.named_modules() if type(m) is torch.nn.Linear}
        assert linears == {l.name: (l.out_features, l.in_features) for l in lin}
        biases = {n for n, m in layer.named_modules() if type(m) is torch.nn.Linear and m.bias is not None}
        assert biases == {l.name for l in lin if l.bias}
        # every parameter outside the Linears and the fused expert weights: norms, routers (Llama4Router is an
        # nn.Linear subclass, not `type(m) is nn.Linear`), sinks, expert biases
        in_linear = {f"{n}.{w}" for n, m in layer.named_modules() if type(m) is torch.nn.Linear
                     for w in ("weight", "bias")}
        norms = {n: p.numel() for n, p in layer.named_parameters()
                 if n not in in_linear and not n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        assert norms == {(n if n.endswith((".weight", ".bias", "_bias", ".sinks")) else n + ".weight"): k
                         for n, k in nrm}
    experts = sum(p.numel() for n, p in kinds[0][0].named_parameters()
                  if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert experts == spec.expert_params_per_layer
    if e["config"].get("model_type") == "llama4":  # the vision tower + projector AutoModelForCausalLM drops
        with torch.device("meta"):
            full = transformers_mod.AutoModelForImageTextToText.from_config(hf_config(copy.deepcopy(e["config"])))
        assert sum(p.numel() for p in full.parameters()) - spec.params == spec.unloaded_vision_params
    assert model.config.tie_word_embeddings == spec.tie_word_embeddings
    bufs = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
               if "rotary" in n and not n.startswith("vision_model."))  # the text stack's rotary buffers
    assert bufs == 4 * spec.rotary_buffer_elements
    # a multimodal checkpoint's other towers: every Linear's shape and bias, the rest, the buffers
    towers = [m for n, m in model.model.named_children() if n != "language_model"] if text is not model.model else []
    assert sum(p.numel() for t in towers for p in t.parameters()) == spec.vision_params
    vis = sorted((tuple(m.weight.shape), m.bias is not None) for t in towers for m in t.modules()
                 if isinstance(m, torch.nn.Linear))
    assert vis == sorted(((l.out_features, l.in_features), l.bias) for l in spec.vision_linears)
    assert sum(b.numel() * b.element_size() for t in towers for b in t.buffers()) == spec.vision_buffer_bytes
