"""Where the closed form does not cover an architecture (MoE), estimate falls back to simulate and says so."""

from __future__ import annotations

import pytest

import memplan
from memplan.cli import main
from memplan.errors import MemplanError, UnsupportedArchitectureError
from memplan.terms import Term

pytest.importorskip("torch")
pytest.importorskip("transformers")

MIXTRAL = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
               num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(autouse=True)
def _mixtral_without_closed_form(no_closed_form):
    """Mixtral has a closed form now: the fallback is tested with the closed form made to refuse it."""


def test_closed_form_refuses_moe_and_names_simulate():
    with pytest.raises(UnsupportedArchitectureError, match="simulate"):
        memplan.estimate(MIXTRAL, fallback_simulate=False)


def test_estimate_falls_back_to_simulate_with_a_note():
    e = memplan.estimate(MIXTRAL, device="cpu", seq_len=64, lora_dropout=0.0)
    assert e.moment == "simulate"
    assert any("simulate" in n for n in e.notes)
    assert e.terms[Term.OTHER_PARAMS] > 0 and e.allocated_bytes > 0
    assert e.allocated_bytes == sum(e.terms[t] for t in list(Term)[:10])


def test_a_step_that_would_fail_is_bad_input_not_a_traceback(capsys):
    # peft 0.21 cannot wrap transformers 5's fused experts with lora_dropout > 0 (the default 0.05)
    with pytest.raises(MemplanError, match="lora_dropout"):
        memplan.estimate(MIXTRAL, device="cpu", seq_len=64)
    code = main(["estimate", "mixtral-8x7b", "--seq-len", "64", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("memplan: error:") and "Traceback" not in err


def test_recommend_on_a_moe_catalogue_model_uses_simulate_within_its_budget():
    """recommend() gets estimate()'s fallback (it used to call the closed form and raise), one trace by default."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from memplan.cli import _recommend_table

    # NB: peft 0.21 wraps transformers 5's fused experts only with lora_dropout 0; prepare_model_for_kbit_training
    # upcasts the experts to fp32, which CUDA's grouped_mm refuses
    r = memplan.recommend("mixtral-8x7b", "h200", lora_dropout=0.0, prepare=False)
    assert r.estimate.moment == "simulate" and r.estimate.device_bytes > 0
    assert any("simulate" in n for n in r.estimate.notes)
    assert any("no closed form" in n and "simulate" in n and "1 made" in n for n in r.notes)
    assert r.max_batch_size is None and any("not searched" in n for n in r.notes)
    assert len(r.gpus) == len(memplan.list_gpus()) and r.smallest_gpu is not None
    h200 = next(g for g in r.gpus if g.name == "h200")
    assert (h200.device_bytes, h200.fits) == (r.estimate.device_bytes, r.fits)
    lines = []
    _recommend_table(r, lines.append)
    assert "largest micro-batch at seq len 2048: not searched (see notes)" in lines
