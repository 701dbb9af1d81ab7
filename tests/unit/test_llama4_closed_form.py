"""Llama 4 in closed form (stdlib only): the recipe change check_plan forces, the notes on what is
4-bit, Scout answering from the closed form, Maverick (mixed dense/MoE layers) refused by it."""

from __future__ import annotations

import time

import pytest

from memplan.catalogue import load_gpu, load_model
from memplan.errors import InvalidSpecError, UnsupportedArchitectureError
from memplan.estimate import check_plan, compute, estimate
from memplan.plan import TrainPlan

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_all_linear_becomes_the_linears_minus_the_router():
    scout = load_model("llama-4-scout")
    plan, notes = check_plan(scout, TrainPlan())
    assert plan.target_modules == LINEARS
    assert any("wraps Llama4Router" in n and "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in n for n in notes)
    plan, _ = check_plan(scout, TrainPlan(target_modules="q_proj,router"))
    assert plan.target_modules == ("q_proj",)
    with pytest.raises(InvalidSpecError):
        check_plan(scout, TrainPlan(target_modules="router"))
    plan, notes = check_plan(scout, TrainPlan(target_modules="q_proj,v_proj"))
    assert plan.target_modules == ("q_proj", "v_proj") and not any("wraps Llama4Router" in n for n in notes)


def test_scout_answers_in_closed_form_with_notes_on_what_is_4bit():
    scout = load_model("llama-4-scout")
    start = time.perf_counter()
    e = compute(scout, TrainPlan(device="cuda"), load_gpu("h100-80gb"))
    assert time.perf_counter() - start < 0.3
    assert e.moment != "simulate"
    text = " ".join(e.notes)
    assert "4-bit are the attention projections and the shared expert's gate/up/down_proj" in text
    assert "routed experts (96.6B parameters" in text and "stay fp32" in text
    assert "does not load the checkpoint's vision tower and projector (871,932,416 params)" in text
    assert scout.params == 107_769_861_120 and scout.unloaded_vision_params == 871_932_416


def test_maverick_mixed_layers_have_the_closed_form():
    """Maverick interleaves dense MLP layers with MoE ones: walked per layer kind (estimate vs simulate at
    2 layers, one of each kind: tests/test_agreement_sim.py)."""
    e = estimate("llama-4-maverick", gpu="h100-80gb", fallback_simulate=False)
    assert e.moment != "simulate" and e.model.layer_kinds.count("dense") == 24


def test_chunked_attention_reached_falls_back():
    with pytest.raises(UnsupportedArchitectureError):
        compute(load_model("llama-4-scout"), TrainPlan(device="cuda", seq_len=8192))
