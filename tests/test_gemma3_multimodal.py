"""Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration) in a text-only QLoRA step.

A tiny random-init Gemma3ForConditionalGeneration (a gemma3_text tower and a SigLIP vision tower of
2 layers each) is loaded through `from_pretrained(quantization_config=BitsAndBytesConfig(...))`,
prepared, adapted with peft and stepped on the CPU on text only, as `memplan.runtime.step.cpu_step`
does for every other family. What the real stack does with the vision tower, measured here
(transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2):

- bitsandbytes 4-bit quantizes the tower's nn.Linear modules (SigLIP q/k/v/out_proj, fc1, fc2): the
  quantizer's default skips (quantizers/base.py `get_keys_to_not_convert`: tied weights, the last
  parameter, the output embedding) do not name them;
- prepare_model_for_kbit_training upcasts every other tower parameter (patch embedding, position
  embedding, LayerNorms, the Linears' biases, the projector) to fp32, and the biases stay fp32:
  the Linear4bit forward that would cast them to the compute dtype never runs;
- peft's "all-linear" (`_maybe_include_all_linear_layers`: every nn.Linear but the output
  embedding) adapts the tower's Linears too: fp32 LoRA A/B that get no gradient (the tower never
  runs) and so no optimizer state.

The estimate (memplan.formulas: `vision_linears`, `vision_other_bytes`, `vision_lora_targets`) is
compared with that real step term by term, and simulate (the meta-device trace) with it too.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.estimate import compute  # noqa: E402
from memplan.formulas import base_weights_bytes, quant_state_bytes  # noqa: E402
from memplan.model import model_from_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402
from memplan.terms import ALLOCATED_TERMS  # noqa: E402

# image_token_index inside the vocabulary, as in the real checkpoints (262144 < 262208): transformers
# then uses input_ids as they are (an out-of-vocabulary image token id makes Gemma3Model clone them)
TINY = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 4,
    "image_token_index": 999, "boi_token_index": 997, "eoi_token_index": 998,
    "text_config": {"model_type": "gemma3_text", "hidden_size": 128, "intermediate_size": 344,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                    "vocab_size": 1000, "max_position_embeddings": 512, "sliding_window": 64},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 176,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                      "vision_use_head": False},
}

CASES = [
    ("default-recipe", dict()),
    ("no-gc", dict(gradient_checkpointing=False)),
    ("q-v-only-adamw", dict(target_modules="q_proj,v_proj", optim="adamw_torch", lora_dropout=0.0)),
    ("lora-bf16", dict(method="lora", gradient_checkpointing=False)),
]


def _plan(over: dict) -> TrainPlan:
    return TrainPlan(device="cpu", **{"seq_len": 64, **over})


@functools.lru_cache(maxsize=None)
def real_step(name: str):
    return cpu_step(TINY, _plan(dict(CASES)[name]))


def test_the_tower_is_inventoried_as_transformers_builds_it():
    """ModelSpec.vision_params and the quantizable Linears equal the meta build's."""
    import transformers

    from memplan.runtime.load import hf_config

    spec = model_from_config(TINY)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(hf_config(TINY))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) == spec.params
    towers = [model.model.vision_tower, model.model.multi_modal_projector]
    assert sum(p.numel() for t in towers for p in t.parameters()) == spec.vision_params == 126_432
    linears = [m for t in towers for m in t.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == len(spec.vision_linears) == 12


def test_from_pretrained_quantizes_the_vision_linears_and_peft_adapts_them():
    """The facts the estimate encodes, read off the real loaded and adapted model."""
    import bitsandbytes as bnb

    from memplan.runtime.load import adapt, load_model

    plan = _plan({})
    model = adapt(load_model(TINY, plan), plan)
    tower = model.get_base_model().model.vision_tower
    four_bit = [n for n, m in tower.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 12  # q, k, v, out_proj, fc1, fc2 x 2 layers
    others = {p.dtype for n, p in tower.named_parameters() if "lora_" not in n and p.dtype != torch.uint8}
    assert others == {torch.float32}  # conv, position embedding, LayerNorms, biases: upcast by prepare
    lora = [p for n, p in tower.named_parameters() if "lora_" in n]
    assert len(lora) == 24 and all(p.requires_grad and p.dtype == torch.float32 for p in lora)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_estimate_matches_a_real_text_only_step(name):
    """Every allocated term of the estimate equals the real CPU step's, to the byte."""
    plan = _plan(dict(CASES)[name])
    e = compute(model_from_config(TINY), plan)
    m = real_step(name)
    est = {str(t): e.terms[t] for t in ALLOCATED_TERMS}
    meas = {str(t): int(m.terms.get(str(t), 0)) for t in ALLOCATED_TERMS}
    print(f"\n{name:16s} estimate {e.allocated_bytes:>11,d} B  measured {m.peak_bytes:>11,d} B")
    assert {t: est[t] - meas[t] for t in est if est[t] != meas[t]} == {}
    assert e.allocated_bytes == m.peak_bytes


def test_the_tower_is_counted():
    """Without the tower the static terms would be short: the check above can fail."""
    spec = model_from_config(TINY)
    text_only = model_from_config({**TINY["text_config"], "architectures": ["Gemma3ForCausalLM"]})
    plan = _plan({})
    assert base_weights_bytes(spec, plan) - base_weights_bytes(text_only, plan) == 2 * (4 * 64 * 64 // 2 + 2 * 64 * 176 // 2)
    assert quant_state_bytes(spec, plan) > quant_state_bytes(text_only, plan)
    full, text = compute(spec, plan), compute(text_only, plan)
    assert full.allocated_bytes - text.allocated_bytes == spec_static_gap(spec, text_only, plan)


def spec_static_gap(spec, text_only, plan) -> int:
    from memplan.formulas import adapter_weights_bytes, other_params_bytes

    return sum(f(spec, plan) - f(text_only, plan)
               for f in (base_weights_bytes, quant_state_bytes, other_params_bytes, adapter_weights_bytes))


@pytest.mark.parametrize("name", ["default-recipe", "no-gc"])
def test_simulate_matches_the_same_real_step(name):
    """The meta-device trace of the multimodal model vs the real step: within 0.1 % of the peak."""
    from memplan.simulate import simulate

    plan = _plan(dict(CASES)[name])
    sim = simulate(TINY, plan)
    m = real_step(name)
    err = (sim.peak_bytes - m.peak_bytes) / m.peak_bytes * 100
    print(f"\n{name:16s} simulate {sim.peak_bytes:>11,d} B  measured {m.peak_bytes:>11,d} B  {err:+.4f} %")
    assert abs(err) <= 0.1
    for t in ("base_weights", "quant_state", "other_params", "adapter_weights", "gradients", "optimizer_state"):
        assert sim.terms[t] == m.terms[t], t
