"""Mixture-of-experts in closed form (issue 10): what the estimate says and refuses, without torch.

Byte agreement with real CPU steps and with simulate is in tests/test_agreement_cpu.py and
tests/test_agreement_sim.py (the mixtral / qwen cases); here: the answers a user reads.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import memplan
from memplan.cli import main
from memplan.errors import InvalidSpecError
from memplan.estimate import required_changes
from memplan.catalogue import load_model
from memplan.terms import Term

MOE_MODELS = ["mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "qwen2-57b-a14b", "qwen1.5-moe-a2.7b"]


@pytest.mark.parametrize("name", MOE_MODELS)
def test_catalogue_moe_models_have_a_closed_form_with_the_notes_a_user_needs(name):
    e = memplan.estimate(name, gpu="h100-80gb", fallback_simulate=False)
    assert e.moment != "simulate" and e.peak is not None
    notes = " ".join(e.notes)
    assert "only the attention projections are 4-bit" in notes and "not nn.Linear" in notes
    # the fused experts stay 16-bit: other_params holds them (E * 3 * I * H per layer, bf16 on CUDA without prepare)
    spec = load_model(name)
    experts = spec.num_layers * spec.expert_params_per_layer * 2
    assert e.terms[Term.OTHER_PARAMS] >= experts
    assert e.plan.prepare is False and "--no-prepare" in notes  # grouped_mm on CUDA takes bf16 experts only


def test_peft_wraps_experts_only_where_its_conversion_maps_the_family():
    # qwen3_moe (and mixtral) are keys of peft's conversion map; qwen2_moe only a value: its experts stay frozen
    q3 = memplan.estimate("qwen3-30b-a3b", gpu="h100-80gb")
    q2 = memplan.estimate("qwen2-57b-a14b", gpu="h100-80gb")
    assert any("lora.ParamWrapper" in n for n in q3.notes) and q3.plan.lora_dropout == 0
    assert not any("lora.ParamWrapper" in n for n in q2.notes) and q2.plan.lora_dropout == 0.05
    # Qwen3-30B-A3B: per layer r*(H+E) router + 2rE*(H+2I) gate_up + rE*(I+H) down, fp32, plus attention LoRA
    spec = load_model("qwen3-30b-a3b")
    r, H, E, I = 16, spec.hidden_size, spec.num_experts, spec.expert_intermediate_size
    attn = sum(r * (lin.in_features + lin.out_features) for lin in spec.layer_linears)
    per_layer = r * (H + E) + 2 * r * E * (H + 2 * I) + r * E * (I + H) + attn
    cpu = memplan.estimate("qwen3-30b-a3b", device="cpu")  # no 512-B rounding: the count itself
    assert cpu.terms[Term.ADAPTER_WEIGHTS] == 4 * per_layer * spec.num_layers


def test_required_changes_are_the_flags_the_run_needs():
    spec = load_model("mixtral-8x7b")
    plan, flags = required_changes(spec, memplan.TrainPlan())
    assert flags == "--lora-dropout 0 --no-prepare" and plan.lora_dropout == 0 and plan.prepare is False
    assert required_changes(spec, plan) == (plan, "")
    # on the CPU grouped_mm takes fp32 experts: only the dropout is required
    assert required_changes(spec, memplan.TrainPlan(device="cpu"))[1] == "--lora-dropout 0"
    # a dense model never needs any
    assert required_changes(load_model("llama-3-8b"), memplan.TrainPlan())[1] == ""


def test_recommend_names_the_required_flags_in_text_and_json(capsys):
    r = memplan.recommend("qwen3-30b-a3b", "h100-80gb")
    assert r.required_flags == "--lora-dropout 0 --no-prepare" and r.plan.prepare is False
    assert r.notes[0].startswith("the real stack refuses the plan as given: run it with --lora-dropout 0 --no-prepare")
    assert main(["recommend", "qwen3-30b-a3b", "--gpu", "h100-80gb", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["required_flags"] == "--lora-dropout 0 --no-prepare"


def test_fused_targets_must_come_together_and_fp32_experts_cannot_run_on_cuda(capsys):
    with pytest.raises(InvalidSpecError, match="w1.*without w3.*fused into gate_up_proj"):
        memplan.estimate("mixtral-8x7b", target_modules="q_proj,w1")
    with pytest.raises(InvalidSpecError, match="grouped_mm on CUDA refuses"):
        memplan.estimate("mixtral-8x7b", dtype="fp32")
    assert main(["fit", "mixtral-8x7b", "--gpu", "h200", "--target-modules", "w3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memplan: error:") and "target w1,w3 together" in err
    # v4 names are targets, not unknown Linears: a router-only adapter is fine
    e = memplan.estimate("mixtral-8x7b", target_modules="gate", device="cpu")
    assert not any("match no Linear" in n for n in e.notes) and e.plan.lora_dropout == 0


def test_the_acceptance_commands_answer_without_torch():
    code = ("import sys, memplan; from memplan.cli import main; rc = main(['fit', 'qwen3-30b-a3b', '--gpu', "
            "'rtx-4090']); assert 'torch' not in sys.modules, 'torch imported'; print('rc', rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rc 1" in out.stdout and "DOES NOT FIT" in out.stdout and "only the attention projections are 4-bit" in out.stdout


def test_the_router_aux_loss_is_simulate_s():
    """output_router_logits keeps every layer's router logits for the load-balancing loss: not in the closed
    form, which says so and names simulate (estimate() falls back to it where torch is installed)."""
    from memplan.errors import UnsupportedArchitectureError

    cfg = dict(load_model("qwen3-30b-a3b").config, output_router_logits=True)
    with pytest.raises(UnsupportedArchitectureError, match="output_router_logits.*simulate"):
        memplan.estimate(cfg, fallback_simulate=False)


def test_the_readme_moe_table_is_what_the_estimate_says():
    """README's mixture-of-experts table, row by row (regenerate: `memplan estimate MODEL --gpu h200 --json`)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Mixture of experts", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([\w.-]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (.+?) \|$", section, re.M)
    assert len(rows) >= 6
    G = 2 ** 30
    for name, device, other, four_bit, adapters, peak in rows:
        e = memplan.estimate(name.lower(), gpu="h200")
        t = e.terms
        assert f"{e.device_bytes / G:.1f}" == device, name
        assert f"{t[Term.OTHER_PARAMS] / G:.1f}" == other, name
        assert f"{(t[Term.BASE_WEIGHTS] + t[Term.QUANT_STATE]) / G:.2f}" == four_bit, name
        assert f"{t[Term.ADAPTER_WEIGHTS] / G:.2f}" == adapters, name
        assert ("loss" in peak) == (e.peak.kind == "loss_backward"), name


def test_every_mixture_of_experts_model_in_the_catalogue_has_a_closed_form():
    """Issue 10's bar: `estimate` answers every MoE in the catalogue in closed form (no simulate, no torch)."""
    from memplan.catalogue import list_models

    moe = [m.name for m in list_models() if m.is_moe]
    assert len(moe) >= 14
    for name in moe:
        e = memplan.estimate(name, gpu="h100-80gb", fallback_simulate=False)
        assert e.moment != "simulate" and e.device_bytes > 0, name


def test_the_readme_moe_commands_say_what_the_readme_says():
    """README's mixture-of-experts commands: `fit qwen3-30b-a3b --gpu rtx-4090` is 67.30 GiB and does not
    fit; `recommend gpt-oss-20b --gpu l4`: no change fits, the smallest catalogue GPU is an A40."""
    e = memplan.estimate("qwen3-30b-a3b", gpu="rtx-4090")
    assert f"{e.device_bytes / 2**30:.2f}" == "67.30" and not e.fits
    r = memplan.recommend("gpt-oss-20b", "l4")
    assert not r.fits and not r.changes and r.smallest_gpu == "a40"
