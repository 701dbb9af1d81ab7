"""memplan.present: sizes, percentages and plans as text, the same for the CLI, the report and the profiler."""

from __future__ import annotations

import math

import pytest

from memplan.plan import TrainPlan
from memplan.present import (gib, is_missing, mib, number, pct, plan_brief, plan_lines, plan_text, reserve_line,
                             share, verdict)
from memplan.units import GiB, MiB


@pytest.mark.parametrize("value, kw, expect", [
    pytest.param(0, {}, "0.00", id="zero"),
    pytest.param(1.5, {}, "1.50", id="plain"),
    pytest.param(1.5, dict(signed=True), "+1.50", id="signed"),
    pytest.param(-1.5, dict(signed=True), "-1.50", id="negative"),
    pytest.param(-0.004, {}, "0.00", id="tiny-negative"),
    pytest.param(-0.004, dict(signed=True), "0.00", id="tiny-negative-signed"),
    pytest.param(0.004, dict(signed=True), "0.00", id="tiny-positive-signed"),
    pytest.param(-0.0, dict(signed=True), "0.00", id="negative-zero"),
    pytest.param(-0.04, dict(digits=1), "0.0", id="one-digit"),
    pytest.param(1234567.891, dict(sep=True), "1,234,567.89", id="separators"),
    pytest.param(-1234.5, dict(sep=True, signed=True), "-1,234.50", id="separators-signed"),
    pytest.param(None, {}, "-", id="none"),
    pytest.param(float("nan"), dict(na="–"), "–", id="nan"),
    pytest.param(float("inf"), {}, "inf", id="inf"),
])
def test_number(value, kw, expect):
    assert number(value, **kw) == expect


@pytest.mark.parametrize("func, value, kw, expect", [
    pytest.param(gib, 3 * GiB // 2, {}, "1.50", id="gib"),
    pytest.param(gib, -GiB, dict(signed=True), "-1.00", id="gib-negative"),
    pytest.param(gib, -1, dict(signed=True), "0.00", id="gib-one-byte-short"),
    pytest.param(gib, -(2**20), {}, "0.00", id="gib-one-mib-short"),
    pytest.param(gib, 2**31, dict(signed=True), "+2.00", id="gib-signed"),
    pytest.param(gib, 5 * GiB, dict(digits=3), "5.000", id="gib-digits"),
    pytest.param(gib, None, dict(na="–"), "–", id="gib-missing"),
    pytest.param(mib, 1536 * MiB, {}, "1,536.00", id="mib"),
    pytest.param(mib, -3 * MiB, dict(signed=True), "-3.00", id="mib-negative"),
    pytest.param(mib, -1, {}, "0.00", id="mib-one-byte-short"),
    pytest.param(mib, None, {}, "-", id="mib-missing"),
    pytest.param(pct, 5.2631, {}, "+5.26%", id="pct"),
    pytest.param(pct, -0.001, {}, "0.00%", id="pct-rounds-to-zero"),
    pytest.param(pct, -3.14159, dict(digits=3), "-3.142%", id="pct-digits"),
    pytest.param(pct, 3.0, dict(signed=False), "3.00%", id="pct-unsigned"),
    pytest.param(pct, None, {}, "-", id="pct-missing"),
])
def test_sizes_and_percentages(func, value, kw, expect):
    assert func(value, **kw) == expect


@pytest.mark.parametrize("value", [-1, -(2**20), -(2**22), -0.001, -0.0])
@pytest.mark.parametrize("func", [gib, mib, pct])
def test_never_a_negative_zero(func, value):
    for signed in (False, True):
        out = func(value, signed=signed)
        assert out.lstrip("+-") == out or float(out.rstrip("%").replace(",", "")) != 0, out


def test_share_and_verdict():
    assert share(1, 3) == "33.3%" and share(0, 10) == "0.0%"
    assert share(5, 0) == "-" and share(None, 3) == "-"
    assert (verdict(True), verdict(False)) == ("fits", "DOES NOT FIT")


def test_missing_values():
    pd = pytest.importorskip("pandas")
    for x in (None, float("nan"), math.nan, pd.NA):
        assert is_missing(x)
    for x in (0, 0.0, -1, "llama", True, 2**40):
        assert not is_missing(x)


PLANS = [
    pytest.param(TrainPlan(), id="default-qlora"),
    pytest.param(TrainPlan(method="lora", optim="adamw_torch", target_modules=("q_proj", "v_proj")), id="lora"),
    pytest.param(TrainPlan(method="full", gradient_accumulation_steps=4, gradient_checkpointing=False), id="full"),
    pytest.param(TrainPlan(quant="int8", double_quant=False, prepare=False), id="int8"),
]


@pytest.mark.parametrize("plan", PLANS)
def test_a_plan_and_its_dict_read_the_same(plan):
    d = plan.to_dict()  # what run records and JSON carry
    assert plan_lines(plan) == plan_lines(d)
    assert plan_text(plan) == plan_text(d) == "; ".join(plan_lines(plan))
    assert plan_brief(plan) == plan_brief(d)
    assert plan_brief(plan, seq=False) == plan_brief(d, seq=False)


@pytest.mark.parametrize("plan", PLANS)
def test_plan_words_name_every_field_that_changes_memory(plan):
    head, run = plan_lines(plan)
    assert f"batch {plan.batch_size} x seq {plan.seq_len}" in run and plan.optim in run and plan.device in run
    assert plan.attn_implementation in run and f"mixed precision {plan.mixed_precision}" in run
    assert ("full fine-tune" in head) == (plan.method == "full")
    if plan.method != "full":
        assert f"LoRA r={plan.lora_r}" in head
    brief = plan_brief(plan)
    assert plan.optim in brief and f"seq {plan.seq_len}" in brief and f"micro-batch {plan.batch_size}" in brief
    assert ("grad accum" in brief) == (plan.gradient_accumulation_steps > 1)
    assert "seq" not in plan_brief(plan, seq=False) and "micro-batch" not in plan_brief(plan, batch=False)


def test_plan_lines_text():
    head, run = plan_lines(TrainPlan())
    assert head == ("qlora: nf4 + double quant base, LoRA r=16 alpha=32 dropout=0.05 on all-linear; "
                    "compute bf16, load bf16, prepare_model_for_kbit_training")
    assert run == ("batch 1 x seq 2048, grad accum 1, checkpointing on, paged_adamw_8bit, sdpa, "
                   "mixed precision bf16, cuda")
    assert plan_brief(TrainPlan()) == ("QLoRA r=16 (nf4 + double quant base), micro-batch 1 x seq 2048, "
                                       "checkpointing on, paged_adamw_8bit, sdpa, mixed precision bf16")


def test_reserve_line():
    assert reserve_line(0).startswith("reserve: 0.00 GiB kept free (default")
    assert reserve_line(3 * GiB // 2) == "reserve: 1.50 GiB kept free (--reserve)"


def test_plans_name_what_departs_from_the_recipe():
    from memplan.plan import TrainPlan
    from memplan.present import plan_brief, plan_lines

    p = TrainPlan(use_reentrant=True, padding="longest", adapter_dtype="bf16")
    for text in (plan_lines(p)[1], plan_brief(p)):
        assert "checkpointing on (reentrant)" in text and "bf16 adapters" in text and "padded (longest" in text
    default = plan_brief(TrainPlan())
    assert "reentrant" not in default and "adapters" not in default and "padded" not in default
