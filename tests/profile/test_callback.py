"""`MemplanCallback` inside a real `transformers.Trainer` run on the CPU (tiny random QLoRA model, 2 steps)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from transformers import Trainer, TrainingArguments  # noqa: E402

from memplan.integrations import MemplanCallback, plan_for_trainer  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.profile.record import read_run, validate  # noqa: E402
from memplan.runtime.load import adapt, load_model  # noqa: E402

from _tiny import TINY  # noqa: E402


def _dataset(n: int = 8, seq: int = 64):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, TINY["vocab_size"], (seq,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True, bf16=True,
                gradient_checkpointing=True, optim="paged_adamw_8bit", logging_steps=1, report_to=[],
                remove_unused_columns=False, save_strategy="no", disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def test_callback_logs_compares_warns_and_writes_a_record(tmp_path):
    plan = TrainPlan(device="cpu", seq_len=64, batch_size=2)
    model = adapt(load_model(TINY, plan, "cpu"), plan)  # what a QLoRA script builds
    # margin -0.5: "warn when the measurement is above half the estimate", to see the warning path fire
    cb = MemplanCallback(margin=-0.5, record_path=tmp_path / "run.json")
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # the plan read off the trainer's own objects
    p = cb.plan
    assert (p.method, p.quant, p.double_quant, p.prepare, p.dtype) == ("qlora", "nf4", True, True, "bf16")
    assert (p.batch_size, p.seq_len, p.gradient_checkpointing, p.optim, p.mixed_precision, p.device) == (
        2, 64, True, "paged_adamw_8bit", "bf16", "cpu")
    assert set(p.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # per-step peaks, compared with the estimate on the first steps
    assert [h["step"] for h in cb.history] == [1, 2]
    assert cb.history[1]["allocated_bytes"] > cb.history[0]["allocated_bytes"]  # optimizer state from step 1 on
    assert abs(cb.history[1]["error_pct"]) <= 3.0, cb.history
    # peaks land in the trainer's logs
    logged = [h for h in trainer.state.log_history if "memplan/peak_allocated_gib" in h]
    assert len(logged) == 2 and all("memplan/estimate_gib" in h for h in logged)
    # the margin check fired, as a warning and in the record's notes
    assert cb.warnings and any("exceeds the estimate" in str(w.message) for w in caught)
    run = read_run(tmp_path / "run.json")
    assert validate(run.to_dict()) == [] and run.source == "MemplanCallback"
    assert run.allocated_bytes == cb.history[1]["allocated_bytes"]
    assert abs(run.estimate_error()["peak"]["allocated_bytes"]["error_pct"]) <= 3.0


def test_plan_for_a_plain_lora_model(tmp_path):
    plan = TrainPlan(device="cpu", method="lora", seq_len=64, gradient_checkpointing=False, optim="adamw_torch")
    model = adapt(load_model(TINY, plan, "cpu"), plan)
    p = plan_for_trainer(model, _args(tmp_path, gradient_checkpointing=False, optim="adamw_torch", bf16=False),
                         batch_size=4, seq_len=32)
    assert (p.method, p.quant, p.prepare, p.dtype, p.lora_r) == ("lora", "none", False, "bf16", 16)
    assert (p.batch_size, p.seq_len, p.gradient_checkpointing, p.optim, p.mixed_precision) == (
        4, 32, False, "adamw_torch", "no")
