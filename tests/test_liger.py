"""Liger kernels (`use_liger_kernel`, `liger_kernel_config`): closed form vs simulate, flags, validation.

Liger's kernels are Triton, GPU only: a real CPU step cannot run them (Triton has no CPU backend), so
the independent instrument here is `simulate`, which applies Liger to the model as the HF Trainer does
(transformers' `apply_liger_kernel`) and runs Liger's real Python wrappers on the meta device with the
Triton launches stubbed (memplan/simulate/liger.py, patch 13): what is counted is what those wrappers
allocate. Nothing here is checked on hardware yet (the estimate's notes say so).

Shapes: catalogue configs cut to 2 layers, as tests/test_agreement_sim.py does.
"""

from __future__ import annotations

import functools
import json

import pytest

import memplan
from memplan.cli import main
from memplan.errors import InvalidSpecError, UnsupportedArchitectureError
from memplan.estimate import compute
from memplan.liger import flce_chunk_tokens, liger_kernels, norm_kernel_config
from memplan.plan import TrainPlan
from memplan.terms import ALLOCATED_TERMS, Term

FLCE = "fused_linear_cross_entropy"
TERMS = [str(t) for t in ALLOCATED_TERMS if t != Term.WORKSPACE]


# ---- plan fields, validation, the family table (no torch) --------------------------------------------

def test_kernel_config_forms_normalise_to_sorted_pairs():
    assert norm_kernel_config({"rope": False, "RMS_norm": True}) == (("rms_norm", True), ("rope", False))
    exact = dict(norm_kernel_config("fused_linear_cross_entropy, rms_norm"))
    assert exact[FLCE] and exact["rms_norm"] and not exact["rope"] and not exact["swiglu"]
    assert norm_kernel_config(["rope"]) == norm_kernel_config("rope")
    p = TrainPlan(use_liger_kernel=True, liger_kernel_config={"rope": False})
    assert p.liger_kernel_config == (("rope", False),) and hash(p) == hash(p.replace())


def test_family_defaults_follow_liger_apply_functions():
    assert liger_kernels("llama", True, ()) == {FLCE, "rms_norm", "rope", "swiglu"}
    assert liger_kernels("gemma2", True, ()) == {FLCE, "geglu", "rms_norm", "rope"}
    assert liger_kernels("granite", True, ()) == {"cross_entropy", "rms_norm", "rope", "swiglu"}
    assert liger_kernels("llama", True, (("rope", False),)) == {FLCE, "rms_norm", "swiglu"}
    assert liger_kernels("llama", True, (("geglu", True),)) == {FLCE, "rms_norm", "rope", "swiglu"}  # not llama's
    assert liger_kernels("llama", False, ()) == set()
    assert liger_kernels("qwen2_moe", True, ()) == set()  # no apply_liger_kernel_to_qwen2_moe


@pytest.mark.parametrize("kw, words", [
    (dict(liger_kernel_config="flce"), ["--liger-kernels 'flce' is not a Liger kernel", FLCE]),
    (dict(liger_kernel_config=f"cross_entropy,{FLCE}"), ["cannot both be on"]),
    (dict(liger_kernel_config={"rope": "yes"}), ["liger_kernel_config['rope'] must be true or false"]),
    (dict(use_liger_kernel="yes"), ["--use-liger-kernel", "true or false"]),
])
def test_bad_values_get_one_line_each(kw, words):
    with pytest.raises(InvalidSpecError) as e:
        TrainPlan(**kw)
    msg = str(e.value)
    assert all(w in msg for w in words), msg


def test_defaults_keep_the_plan_json():
    d = TrainPlan().to_dict()
    assert "use_liger_kernel" not in d and "liger_kernel_config" not in d
    d = TrainPlan(use_liger_kernel=True, liger_kernel_config={"rope": False}).to_dict()
    assert d["use_liger_kernel"] is True and d["liger_kernel_config"] == {"rope": False}


def test_chunk_rows_follow_liger():
    # inc_factor = cdiv(V, H); next_power_of_2(cdiv(BT, inc_factor)), at most BT
    assert flce_chunk_tokens(4096, 128256, 4096) == 128      # Llama 3: inc 32
    assert flce_chunk_tokens(4 * 4096, 32000, 4096) == 2048  # Liger's own comment: inc 8
    assert flce_chunk_tokens(100, 1000, 2048) == 100         # V <= H: one chunk of every row
    assert flce_chunk_tokens(3000, 152064, 3584) == 128      # Qwen2.5-7B: inc 43 -> cdiv 70 -> 128


# ---- the closed form on full models (microseconds) ---------------------------------------------------

def test_logits_term_of_llama3_8b_at_4096_drops_as_the_closed_form_says():
    """Without Liger the loss stage holds 12·T·V B of [T x V] buffers (log-softmax, its gradient, the
    logits gradient); with FLCE none: the only tensor of [.. x V] spanning T·V elements is lm_head's
    weight cast to bf16 for a chunk's matmul (V·H·2 B, [H x V] with H = T = 4096), and the chunk itself
    is [128 x V]."""
    T, V, H = 4096, 128256, 4096
    off = memplan.estimate("llama-3-8b", gpu="rtx-4090", seq_len=4096)
    on = memplan.estimate("llama-3-8b", gpu="rtx-4090", seq_len=4096, use_liger_kernel=True,
                          liger_kernel_config=FLCE)
    loss_off = next(m for m in off.moments if m.name == "loss:backward")
    loss_on = next(m for m in on.moments if m.name == "loss:forward")
    assert loss_off.logits == 12 * T * V == 6_304_038_912
    assert loss_on.logits == 2 * V * H == 1_050_673_152
    assert loss_off.logits - loss_on.logits == 5_253_365_760
    assert "fused linear cross-entropy" in loss_on.description
    assert any("Triton (GPU only)" in n and "not yet on hardware" in n for n in on.notes)
    assert on.to_dict()["versions"]["liger-kernel"] == "0.8.5"
    assert "liger-kernel" not in off.to_dict()["versions"]


def test_recommend_llama3_8b_rtx4090_seq4096():
    """The micro-batch a 24 GB card takes at seq 4096: 1 without Liger, 3 with FLCE alone, 4 with the
    llama defaults (FLCE, RMSNorm, RoPE, SwiGLU)."""
    from memplan.recommend import recommend

    kws = ({}, dict(use_liger_kernel=True, liger_kernel_config=FLCE), dict(use_liger_kernel=True))
    got = [recommend("llama-3-8b", "rtx-4090", seq_len=4096, **kw).max_batch_size for kw in kws]
    assert got == [1, 3, 4]  # README.md's table
    gib = [round(memplan.estimate("llama-3-8b", gpu="rtx-4090", seq_len=4096, **kw).device_bytes / 2**30, 2)
           for kw in kws]
    assert gib == [17.28, 12.12, 11.89]


def test_unsupported_combinations_are_said():
    with pytest.raises(InvalidSpecError, match="refuses it for granite"):
        memplan.estimate("granite-3.3-8b", use_liger_kernel=True, liger_kernel_config={FLCE: True},
                         fallback_simulate=False)
    with pytest.raises(UnsupportedArchitectureError, match="cross_entropy"):
        memplan.estimate("granite-3.3-8b", use_liger_kernel=True, fallback_simulate=False)
    with pytest.raises(UnsupportedArchitectureError, match="layer kernels"):  # gemma's geglu: not walked
        memplan.estimate("gemma-2-9b", use_liger_kernel=True, fallback_simulate=False)
    e = memplan.estimate("gemma-2-9b", use_liger_kernel=True, liger_kernel_config=FLCE)  # FLCE alone: closed form
    assert e.moment != "simulate"
    e = memplan.estimate("qwen1.5-moe-a2.7b", gpu="a100-80gb", use_liger_kernel=True, fallback_simulate=False)
    plain = memplan.estimate("qwen1.5-moe-a2.7b", gpu="a100-80gb", fallback_simulate=False)
    assert e.terms == plain.terms and any("has no kernels for qwen2_moe" in n for n in e.notes)


# ---- the command line ---------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_flags_map_onto_the_plan(capsys):
    code, out, _ = run(capsys, "estimate", "llama-3-8b", "--use-liger-kernel", "--json")
    assert code == 0 and json.loads(out)["plan"]["use_liger_kernel"] is True
    code, out, _ = run(capsys, "estimate", "llama-3-8b", "--liger-kernels", "fused_linear_cross_entropy,rms_norm",
                       "--json")
    plan = json.loads(out)["plan"]
    assert code == 0 and plan["use_liger_kernel"] is True
    assert plan["liger_kernel_config"] == {"cross_entropy": False, FLCE: True, "geglu": False, "layer_norm": False,
                                           "rms_norm": True, "rope": False, "swiglu": False}
    code, out, _ = run(capsys, "estimate", "llama-3-8b", "--use-liger-kernel", "--liger-kernel-config",
                       '{"rope": false}', "--json")
    assert code == 0 and json.loads(out)["plan"]["liger_kernel_config"] == {"rope": False}
    code, out, _ = run(capsys, "estimate", "llama-3-8b", "--no-use-liger-kernel", "--json")
    assert code == 0 and "use_liger_kernel" not in json.loads(out)["plan"]


@pytest.mark.parametrize("argv, words", [
    (["--liger-kernels", "rms_norm,flce"], ["'flce' is not a Liger kernel"]),
    (["--liger-kernels", f"cross_entropy,{FLCE}"], ["cannot both be on"]),
    (["--liger-kernel-config", "{rope"], ["not JSON"]),
    (["--liger-kernel-config", "[1]"], ["JSON object"]),
])
def test_cli_bad_liger_values_exit_2_with_one_line(capsys, argv, words):
    code, out, err = run(capsys, "estimate", "llama-3-8b", *argv)
    assert code == 2 and "Traceback" not in err
    assert all(w in err for w in words), err


# ---- estimate vs simulate, term by term (needs the [sim] extras and liger-kernel) -----------------------

SHAPES = ("llama-3-8b", "qwen2.5-7b", "mistral-7b-v0.1")
KERNELS = {"flce": FLCE, "defaults": ()}


@functools.lru_cache(maxsize=None)
def _pair(model: str, device: str, gc: bool, kernels: str, seq: int = 512):
    pytest.importorskip("torch")
    pytest.importorskip("liger_kernel")
    from memplan.model import model_from_config
    from memplan.simulate import simulate

    from test_agreement_sim import config_of

    cfg = config_of(model)
    plan = TrainPlan(device=device, seq_len=seq, gradient_checkpointing=gc, use_liger_kernel=True,
                     liger_kernel_config=KERNELS[kernels])
    e = compute(model_from_config(cfg), plan)
    s = simulate(cfg, e.plan)
    return e, s


#: every (device, checkpointing, kernels) on the three shapes; the other walked families (qwen3's q/k
#: norms, phi3's fused gate_up) with the default kernels
CASES = [(m, d, gc, k) for m in SHAPES for d in ("cpu", "cuda") for gc in (True, False) for k in sorted(KERNELS)] + [
    (m, d, True, "defaults") for m in ("qwen3-8b", "phi-3-mini-4k") for d in ("cpu", "cuda")]


@pytest.mark.parametrize("model, device, gc, kernels", CASES,
                         ids=[f"{m}-{d}-{'gc' if gc else 'no-gc'}-{k}" for m, d, gc, k in CASES])
def test_estimate_matches_simulate_term_by_term(model, device, gc, kernels):
    e, s = _pair(model, device, gc, kernels)
    est = {t: e.terms[Term(t)] for t in TERMS}
    sim = {t: int(s.terms.get(t, 0)) for t in TERMS}
    assert abs(sum(est.values()) - s.peak_bytes) <= 0.002 * s.peak_bytes, (e.moment, est, sim)
    for t in TERMS:  # CUDA: in-layer tensors are not rounded to 512 B in the closed form
        assert abs(est[t] - sim[t]) <= max(0.01 * sim[t], 4096 if device == "cuda" else 0), (t, est[t], sim[t])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_long_sequence_peak_is_a_recompute_with_flce_grad_input_in_flight(device):
    """At seq 4096 with checkpointing the loss stage is no longer the peak: the last layer's recompute is,
    with FLCE's grad_input (made in the loss forward, an activation) as the gradient in flight through
    Liger's in-place RMSNorm backward; SwiGLU's product is a temporary (made with grad mode off)."""
    e, s = _pair("llama-3-8b", device, True, "defaults", 4096)
    assert e.moment == "recompute:1" and s.peak_phase == "backward"
    for t in TERMS:
        assert abs(e.terms[Term(t)] - s.terms.get(t, 0)) <= (2048 if device == "cuda" else 0), t


def test_simulate_records_liger_and_restores_the_modules():
    e, s = _pair("llama-3-8b", "cpu", True, "defaults")
    assert s.versions.get("liger-kernel") == "0.8.5"
    assert any("Triton launches are stubbed" in n for n in s.notes)
    import torch.nn.functional as F
    from transformers.models.llama import modeling_llama

    assert modeling_llama.LlamaRMSNorm.__module__ == modeling_llama.__name__
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__
    assert F.cross_entropy.__module__ == "torch.nn.functional"
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    from triton.runtime.jit import KernelInterface

    assert isinstance(vars(LigerFusedLinearCrossEntropyFunction)["forward"], staticmethod)
    assert "__getitem__" in vars(KernelInterface) and "item" not in vars(torch_tensor())


def torch_tensor():
    import torch

    return torch.Tensor
