"""Packing and padding-free batches (issue 11): real CPU steps vs simulate (0.1 %) vs the estimate (1 %).

The batch is the one TRL 1.16's collator hands the model (`runtime.step.packed_batch`): rows of packed
sequences with position ids restarting at each, no attention_mask; padding-free flattens the rows into
one. SDPA and eager then get transformers' block-diagonal masks (masking_utils.find_packed_sequence_indices).
"""

from __future__ import annotations

import functools
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import memplan  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.errors import InvalidSpecError  # noqa: E402
from memplan.estimate import compute  # noqa: E402
from memplan.model import model_from_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime import step as step_mod  # noqa: E402
from memplan.runtime.step import cpu_step, packed_batch  # noqa: E402
from memplan.simulate import simulate  # noqa: E402
from memplan.terms import ALLOCATED_TERMS  # noqa: E402

from sim_checks import assert_simulate_matches  # noqa: E402
from test_agreement_cpu import BASE  # noqa: E402  the tiny model every real-step agreement test uses

CASES = {
    "llama-packing-b2-gc": ("llama", dict(packing=True, batch_size=2, seq_len=64)),
    "llama-padding-free-b2-gc": ("llama", dict(padding_free=True, batch_size=2, seq_len=64)),
    "qwen2-packing-b2-no-gc": ("qwen2", dict(packing=True, batch_size=2, seq_len=64, gradient_checkpointing=False)),
    "mistral-packing-eager": ("mistral", dict(packing=True, batch_size=2, seq_len=128, attn_implementation="eager")),
}


def _cfg(family: str) -> dict:
    return {**BASE, "model_type": family}


@functools.lru_cache(maxsize=None)
def _real(name: str):
    family, kw = CASES[name]
    return cpu_step(_cfg(family), TrainPlan(device="cpu", **kw))


@pytest.mark.parametrize("name", sorted(CASES))
def test_simulate_matches_a_real_packed_cpu_step(name):
    family, kw = CASES[name]
    assert_simulate_matches(_real(name), simulate(_cfg(family), TrainPlan(device="cpu", **kw)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_estimate_matches_a_real_packed_cpu_step_term_by_term(name):
    family, kw = CASES[name]
    real = _real(name)
    e = compute(model_from_config(_cfg(family)), TrainPlan(device="cpu", **kw))
    assert abs(e.allocated_bytes - real.peak_bytes) <= 0.01 * real.peak_bytes, (e.allocated_bytes, real.peak_bytes)
    for t in ALLOCATED_TERMS:
        assert abs(e.terms[t] - real.terms.get(str(t), 0)) <= 0.01 * real.peak_bytes, t


def test_padding_free_is_the_flattened_packed_row():
    """B rows of S flattened = one packed row of B*S: the same real step, byte for byte; and the
    block-diagonal mask makes it larger than B packed rows of S (quadratic in the row length)."""
    flat = _real("llama-padding-free-b2-gc")
    one_row = cpu_step(_cfg("llama"), TrainPlan(device="cpu", packing=True, batch_size=1, seq_len=128))
    assert flat.peak_bytes == one_row.peak_bytes and flat.terms == one_row.terms
    assert flat.peak_bytes > _real("llama-packing-b2-gc").peak_bytes


def test_memory_depends_on_the_row_shape_not_on_the_sequence_boundaries(monkeypatch):
    """The estimate's assumption: where the packed sequences start does not change the step's memory
    (two sequences split at S/2, or four of uneven lengths), on a real CPU step."""
    plan = TrainPlan(device="cpu", packing=True, batch_size=2, seq_len=64)

    def uneven(ids, flatten):
        b = packed_batch(ids, flatten)
        pos = torch.arange(64)
        pos = torch.where(pos < 5, pos, torch.where(pos < 30, pos - 5, torch.where(pos < 31, pos - 30, pos - 31)))
        b["position_ids"] = pos.expand(2, 64).contiguous()
        b["labels"] = b["input_ids"].masked_fill(b["position_ids"] == 0, -100)
        return b

    monkeypatch.setattr(step_mod, "packed_batch", uneven)
    other = cpu_step(_cfg("llama"), plan)
    assert other.peak_bytes == _real("llama-packing-b2-gc").peak_bytes
    assert other.terms == _real("llama-packing-b2-gc").terms


def test_packed_batch_is_trls_collator_output():
    ids = torch.arange(12).reshape(2, 6)
    b = packed_batch(ids, flatten=False)
    assert set(b) == {"input_ids", "position_ids", "labels"}  # no attention_mask
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]] * 2
    assert b["labels"][0].tolist() == [-100, 1, 2, -100, 4, 5]
    f = packed_batch(ids, flatten=True)
    assert f["input_ids"].shape == (1, 12) and f["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2] * 2]


def test_cuda_estimate_grows_with_tokens_and_the_sdpa_mask():
    """On a catalogue model: padding-free with SDPA holds a [1, 1, B*S, B*S] mask per layer (quadratic),
    packing B rows only [B, 1, S, S]; the plain plan none."""
    kw = dict(seq_len=2048, batch_size=4, gradient_checkpointing=False)
    plain = memplan.estimate("llama-3.2-1b", **kw)
    packed = memplan.estimate("llama-3.2-1b", packing=True, **kw)
    flat = memplan.estimate("llama-3.2-1b", padding_free=True, **kw)
    assert plain.allocated_bytes < packed.allocated_bytes < flat.allocated_bytes
    assert any("block-diagonal [1, 1, 8192, 8192]" in n and "neither warns nor refuses" in n for n in flat.notes)
    assert any(n.startswith("packed batch: 4 row(s) of 2048 tokens") for n in packed.notes)


def test_plan_validation_and_json():
    with pytest.raises(InvalidSpecError, match="--padding longest pads rows that --packing leaves unpadded"):
        TrainPlan(packing=True, padding="longest")
    with pytest.raises(InvalidSpecError, match="--padding-free takes true or false"):
        TrainPlan(padding_free="yes")
    assert "packing" not in TrainPlan().to_dict()  # the JSON of existing plans is unchanged
    assert TrainPlan(padding_free=True).to_dict()["padding_free"] is True


def test_cli_flags(capsys):
    assert main(["estimate", "llama-3.2-1b", "--padding-free", "--batch-size", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["plan"]["padding_free"] is True and "packing" not in d["plan"]
    assert any(n.startswith("padding-free batch: one flattened row") for n in d["notes"])
    assert main(["estimate", "llama-3.2-1b", "--packing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["packing"] is True
    assert main(["estimate", "llama-3.2-1b", "--packing", "--padding", "longest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memplan: error:") and "--padding longest" in err and "Traceback" not in err
