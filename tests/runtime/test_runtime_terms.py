"""One meaning per static term in estimate, simulate and the real step (memplan.runtime.classify).

base_weights = every Linear weight inside the decoder layers (targeted by LoRA or not, frozen or
trainable), adapter_weights = LoRA A/B only, other_params = everything else (embeddings, lm_head, norms,
biases, buffers). Checked on a 2-layer model for partial LoRA targets and full fine-tuning, where the
runtime once labelled untargeted Linears other_params and every trainable parameter adapter_weights.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.estimate import compute  # noqa: E402
from memplan.model import model_from_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.classify import base_weight_names  # noqa: E402
from memplan.runtime.load import adapt, load_model  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402
from memplan.simulate import simulate  # noqa: E402
from memplan.terms import Term  # noqa: E402

STATIC = ("base_weights", "quant_state", "other_params", "adapter_weights")
CFG = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=600, max_position_embeddings=256, tie_word_embeddings=False,
           pad_token_id=0, bos_token_id=1, eos_token_id=2)
QWEN2 = dict(CFG, model_type="qwen2")  # q/k/v biases: other_params
PLANS = {
    "qlora-qv": dict(target_modules="q_proj,v_proj"),
    "lora-qv": dict(method="lora", target_modules="q_proj,v_proj"),
    "lora-qv-prepare": dict(method="lora", target_modules="q_proj,v_proj", prepare=True),
    "full": dict(method="full", optim="adamw_torch"),
    "qlora-all-linear": dict(),
}


def _plan(plan_id: str, device: str = "cpu") -> TrainPlan:
    return TrainPlan(device=device, seq_len=32, gradient_checkpointing=False, **PLANS[plan_id])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("plan_id", list(PLANS))
@pytest.mark.parametrize("cfg", [CFG, QWEN2], ids=["llama", "qwen2"])
def test_static_terms_agree_estimate_and_simulate(cfg, plan_id, device):
    plan = _plan(plan_id, device)
    est = compute(model_from_config(cfg), plan).terms
    sim = simulate(cfg, plan).terms
    assert {t: sim[t] for t in STATIC} == {t: est[Term(t)] for t in STATIC}


@pytest.mark.parametrize("plan_id", ["lora-qv", "full"])
def test_real_step_labels_like_simulate(plan_id):
    plan = _plan(plan_id)
    real, sim = cpu_step(CFG, plan), simulate(CFG, plan)
    assert real.terms == sim.terms and real.peak_bytes == sim.peak_bytes


def test_base_weight_names_are_every_decoder_linear():
    plan = _plan("lora-qv")
    model = adapt(load_model(CFG, plan), plan)
    names = base_weight_names(model)
    leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(names) == CFG["num_hidden_layers"] * len(leaves)
    assert all(n.endswith(".weight") and any(f".{leaf}." in n for leaf in leaves) for n in names)
    assert any("q_proj.base_layer.weight" in n for n in names) and any("k_proj.weight" in n for n in names)
    assert not any("lora_" in n or "lm_head" in n or "embed" in n for n in names)
