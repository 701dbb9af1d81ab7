"""FlashAttention-2 and packed batches on real model shapes: estimate vs simulate, term by term (issue 11).

flash-attn is CUDA-only and cannot be installed here: simulate emulates it on meta
(memplan/simulate/flash.py: allocations and saved tensors per flash-attn 2.x's source, transformers'
own code around it runs as is). Catalogue configs cut to 2 decoder layers, as tests/test_agreement_sim.py
does; the estimate must agree within 1 % on the peak and on every term.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import memplan  # noqa: E402
from memplan.estimate import FLASH_NOTE, compute  # noqa: E402
from memplan.model import model_from_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.simulate import simulate  # noqa: E402
from memplan.terms import ALLOCATED_TERMS, Term  # noqa: E402

from test_agreement_sim import ROUNDING_SLACK, config_of  # noqa: E402

MODELS = ("llama-3-8b", "qwen2.5-7b", "mistral-7b-v0.1")
PLANS = {
    "packing-sdpa": dict(packing=True, batch_size=2, seq_len=256),
    "padding-free-fa2": dict(padding_free=True, batch_size=2, seq_len=256, attn_implementation="flash_attention_2"),
    "fa2": dict(seq_len=512, attn_implementation="flash_attention_2"),
}
CASES = [(m, p, "cuda") for m in MODELS for p in PLANS] + [("llama-3-8b", "packing-sdpa", "cpu"),
                                                           ("qwen2.5-7b", "packing-sdpa", "cpu")]


@functools.lru_cache(maxsize=None)
def run(model: str, cfg_over: tuple, plan_kw: tuple, device: str):
    cfg = {**config_of(model), **dict(cfg_over)}
    plan = TrainPlan(device=device, **dict(plan_kw))
    e = compute(model_from_config(cfg), plan)
    return e, simulate(cfg, e.plan)


def _check(e, s, device):
    est = {str(t): e.terms[t] for t in ALLOCATED_TERMS if t != Term.WORKSPACE}
    sim = {str(t): int(s.terms.get(str(t), 0)) for t in ALLOCATED_TERMS if t != Term.WORKSPACE}
    peak = s.peak_bytes
    assert abs(sum(est.values()) - peak) <= 0.01 * peak, (sum(est.values()), peak, e.moment)
    limit = max(0.01 * peak, ROUNDING_SLACK if device == "cuda" else 0)
    off = {t: est[t] - sim[t] for t in est if abs(est[t] - sim[t]) > limit}
    assert not off, off


@pytest.mark.parametrize("model,plan,device", CASES, ids=[f"{m}-{p}-{d}" for m, p, d in CASES])
def test_estimate_matches_simulate_on_catalogue_shapes(model, plan, device):
    e, s = run(model, (), tuple(PLANS[plan].items()), device)
    _check(e, s, device)
    if "fa2" in plan:
        assert FLASH_NOTE in e.notes and any("FlashAttention-2 emulated" in n for n in s.notes)


# Where a layer is the peak (the vocabulary cut to 1,024 so the loss stage is small): the walk's saved
# sets, casts and recompute split, at real widths.
SMALL_VOCAB = (("vocab_size", 1024),)
LAYER_CASES = {
    "llama-3-8b-fa2": ("llama-3-8b", dict(seq_len=512, attn_implementation="flash_attention_2")),
    "llama-3-8b-padding-free-fa2-dropout0": ("llama-3-8b", dict(seq_len=256, batch_size=2, padding_free=True, lora_dropout=0.0,
                                                                 attn_implementation="flash_attention_2")),
    "mistral-7b-fa2-dropout0": ("mistral-7b-v0.1", dict(seq_len=512, lora_dropout=0.0,
                                                         attn_implementation="flash_attention_2")),
    "qwen2.5-7b-fa2-reentrant": ("qwen2.5-7b", dict(seq_len=512, use_reentrant=True,
                                                     attn_implementation="flash_attention_2")),
}


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_peaks_with_flash_attention(name):
    model, kw = LAYER_CASES[name]
    e, s = run(model, SMALL_VOCAB, tuple(kw.items()), "cuda")
    assert e.peak.kind in ("dequant", "recompute", "layer_backward", "attention_backward"), e.moment
    _check(e, s, "cuda")


# The kernel's backward (dq/dk/dv, dq_accum, softmax_d, GQA-expanded dk/dv) is the peak where the
# attention is wide and the MLP and vocabulary small (96 heads of 128, intermediate 512, vocab 1000,
# no prepare): fixed length and varlen, to the byte.
WIDE = (("vocab_size", 1000), ("intermediate_size", 512), ("num_attention_heads", 96), ("head_dim", 128))


@pytest.mark.parametrize("plan_kw", [
    dict(seq_len=2048, attn_implementation="flash_attention_2", prepare=False),
    dict(seq_len=1024, batch_size=2, padding_free=True, attn_implementation="flash_attention_2", prepare=False),
], ids=["fixed", "varlen"])
def test_flash_backward_workspace_moment_is_exact(plan_kw):
    e, s = run("mistral-7b-v0.1", WIDE, tuple(plan_kw.items()), "cuda")
    assert e.peak.kind == "attention_backward"
    assert e.allocated_bytes - e.terms[Term.WORKSPACE] == s.peak_bytes
    _check(e, s, "cuda")


def test_flash_saves_no_quadratic_tensor_and_packing_sdpa_does():
    """FA2 keeps softmax_lse [B, H, S], never [S x S]: a layer's saved set grows linearly with the
    sequence; padding-free SDPA keeps a [1, 1, B*S, B*S] additive mask per layer (quadratic)."""
    from memplan.activations import activation_profile, packed_rows
    from memplan.catalogue import resolve_model

    model = resolve_model("llama-3-8b")

    def layer(seq, **kw):
        plan = packed_rows(TrainPlan(seq_len=seq, batch_size=2, padding_free=True, **kw))
        return activation_profile(model, plan, cpu=False).layer_bytes

    def second_difference(**kw):  # 0 for a linear function of the row length, 2 q x^2 for q x^2
        f = [layer(s, **kw) for s in (1024, 2048, 3072)]
        return f[2] - 2 * f[1] + f[0]

    assert second_difference(attn_implementation="flash_attention_2") == 0
    assert second_difference() == 2 * 2 * (2 * 1024) ** 2  # the bf16 mask [1, 1, 2S, 2S] per layer


def test_flash_attention_rejected_on_cpu_and_packing_note():
    from memplan.errors import InvalidSpecError

    with pytest.raises(InvalidSpecError, match="flash_attention_2 runs only on CUDA"):
        TrainPlan(attn_implementation="flash_attention_2", device="cpu")
    e = memplan.estimate("llama-3-8b", attn_implementation="flash_attention_2", packing=True, batch_size=2)
    assert any("fixed-length kernel" in n for n in e.notes)
    v = memplan.estimate("llama-3-8b", attn_implementation="flash_attention_2", padding_free=True, batch_size=3)
    assert any("assumed 6 sequences" in n for n in v.notes)


def test_flash_on_a_padded_batch_is_noted_and_simulate_says_it_does_not_emulate_it():
    from memplan.errors import UnsupportedArchitectureError

    e = memplan.estimate("llama-3.2-1b", attn_implementation="flash_attention_2", padding="longest")
    assert any("flash_attention_2 with a padded batch" in n and "not modelled" in n for n in e.notes)
    with pytest.raises(UnsupportedArchitectureError, match="does not emulate FlashAttention-2 on a padded batch"):
        simulate(config_of("llama-3.2-1b"), TrainPlan(attn_implementation="flash_attention_2", padding="longest"))
