"""Properties every estimate must have, over real catalogue models and plans."""

from __future__ import annotations

import pytest

from memplan.catalogue import load_gpu, load_model
from memplan.estimate import compute
from memplan.plan import TrainPlan
from memplan.terms import ALLOCATED_TERMS, SINGLE_DEVICE_TERMS, Term

MODELS = ["tinyllama-1.1b", "llama-2-7b", "llama-3-8b", "mistral-7b-v0.1", "qwen2.5-7b", "qwen3-8b",
          "gemma-2-9b", "gemma-3-1b", "phi-3-mini-4k", "llama-3-70b"]
PLANS = {
    "default": TrainPlan(),
    "default-gemma2": TrainPlan(attn_implementation="eager"),
    "no-gc": TrainPlan(gradient_checkpointing=False),
    "lora": TrainPlan(method="lora", optim="adamw_torch"),
    "full": TrainPlan(method="full", optim="adamw_torch_fused", gradient_checkpointing=False),
    "fp32-no-autocast": TrainPlan(mixed_precision="no", optim="adamw_bnb_8bit"),
    "cpu": TrainPlan(device="cpu", seq_len=512),
}


def plan_for(model: str, name: str) -> TrainPlan:
    p = PLANS[name]
    if "gemma-2" in model and p.attn_implementation == "sdpa":
        p = p.replace(attn_implementation="eager")
    return p


@pytest.mark.parametrize("plan_name", [p for p in PLANS if p != "default-gemma2"])
@pytest.mark.parametrize("model", MODELS)
def test_terms_sum_to_the_peaks(model, plan_name):
    e = compute(load_model(model), plan_for(model, plan_name), load_gpu("h200"))
    assert all(v >= 0 for v in e.terms.values())
    assert e.allocated_bytes == sum(e.terms[t] for t in ALLOCATED_TERMS)
    assert e.reserved_bytes == e.allocated_bytes + e.terms[Term.ALLOCATOR_OVERHEAD]
    assert e.device_bytes == e.reserved_bytes + e.terms[Term.CUDA_CONTEXT]
    assert e.fits == (e.device_bytes <= e.gpu.memory_bytes)
    assert e.headroom_bytes == e.gpu.memory_bytes - e.device_bytes
    assert max(e.phase_peaks.values()) == e.allocated_bytes
    d = e.to_dict()
    assert d["peak"]["device_bytes"] == e.device_bytes and set(d["terms"]) == {t.value for t in SINGLE_DEVICE_TERMS}


@pytest.mark.parametrize("model", MODELS)
def test_cpu_has_no_cuda_overheads(model):
    e = compute(load_model(model), plan_for(model, "cpu"))
    for t in (Term.WORKSPACE, Term.ALLOCATOR_OVERHEAD, Term.CUDA_CONTEXT):
        assert e.terms[t] == 0
    assert e.paged_bytes == 0


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("field, values", [("batch_size", (1, 2, 4, 8)), ("seq_len", (256, 1024, 4096, 8192)),
                                           ("lora_r", (4, 16, 64, 256))])
def test_monotone_in_batch_seq_and_rank(model, field, values):
    spec = load_model(model)
    base = plan_for(model, "default")
    peaks = [compute(spec, base.replace(**{field: v})).allocated_bytes for v in values]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)


@pytest.mark.parametrize("model", MODELS)
def test_checkpointing_lowers_activations_and_the_peak(model):
    spec = load_model(model)
    p = plan_for(model, "default").replace(seq_len=4096)
    on, off = compute(spec, p), compute(spec, p.replace(gradient_checkpointing=False))
    assert on.allocated_bytes < off.allocated_bytes
    assert on.terms[Term.ACTIVATIONS] < off.terms[Term.ACTIVATIONS]


def test_qlora_below_lora_below_full():
    spec = load_model("llama-2-7b")
    q = compute(spec, TrainPlan()).allocated_bytes
    lo = compute(spec, TrainPlan(method="lora")).allocated_bytes
    full = compute(spec, TrainPlan(method="full", optim="adamw_torch")).allocated_bytes
    assert q < lo < full


def test_paged_optimizer_moves_state_out_of_the_allocator():
    spec = load_model("llama-3-8b")
    paged = compute(spec, TrainPlan(optim="paged_adamw_32bit", lora_r=64))
    plain = compute(spec, TrainPlan(optim="adamw_torch", lora_r=64))
    assert paged.paged_bytes > 0 and plain.paged_bytes == 0
    assert paged.terms[Term.OPTIMIZER_STATE] + paged.paged_bytes == pytest.approx(
        plain.terms[Term.OPTIMIZER_STATE], rel=0.01)


def test_gradient_accumulation_keeps_gradients_alive_in_forward():
    spec = load_model("llama-2-7b")
    p = TrainPlan(seq_len=512)
    one, ga = compute(spec, p), compute(spec, p.replace(gradient_accumulation_steps=4))
    assert ga.terms[Term.GRADIENTS] > 0 and ga.allocated_bytes > one.allocated_bytes


def test_big_vocab_peaks_in_the_loss_stage():
    e = compute(load_model("llama-3-8b"), TrainPlan(seq_len=4096))
    assert e.peak_phase in ("loss", "backward")
    assert e.terms[Term.LOGITS] >= 12 * 4096 * 128256


def test_long_sequence_is_a_note_not_an_error():
    e = compute(load_model("llama-2-7b"), TrainPlan(seq_len=8192))
    assert any("max_position_embeddings" in n for n in e.notes)
