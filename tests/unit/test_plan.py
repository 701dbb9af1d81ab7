"""TrainPlan: DESIGN.md's defaults, every problem at once, and plans read from HF objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from memplan.errors import InvalidSpecError
from memplan.plan import TrainPlan, plan_from


def test_defaults_match_design():
    p = TrainPlan()
    assert p.to_dict() == {
        "method": "qlora", "quant": "nf4", "double_quant": True, "compute_dtype": "bf16", "dtype": "bf16",
        "prepare": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
        "adapter_dtype": "fp32",
        "batch_size": 1, "seq_len": 2048, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
        "use_reentrant": False, "padding": "none",
        "optim": "paged_adamw_8bit", "attn_implementation": "sdpa", "mixed_precision": "bf16", "device": "cuda",
    }


@pytest.mark.parametrize("method, quant, prepare", [("qlora", "nf4", True), ("lora", "none", False),
                                                    ("full", "none", False)])
def test_quant_and_prepare_follow_method(method, quant, prepare):
    p = TrainPlan(method=method)
    assert (p.quant, p.prepare) == (quant, prepare)


def test_every_problem_at_once():
    with pytest.raises(InvalidSpecError) as e:
        TrainPlan(batch_size=0, seq_len=-1, lora_dropout=1.5, optim="adamw_9bit", device="tpu")
    probs = e.value.problems
    assert len(probs) == 5
    for flag in ("--batch-size", "--seq-len", "--lora-dropout", "--optim", "--device"):
        assert any(flag in p for p in probs), flag
    assert "5 problems" in str(e.value)


def test_lora_with_quant_is_rejected_with_a_fix():
    with pytest.raises(InvalidSpecError, match="--method qlora"):
        TrainPlan(method="lora", quant="nf4")


def test_dtype_spellings_normalise():
    p = TrainPlan(compute_dtype="torch.float16", dtype="bfloat16", mixed_precision="fp16")
    assert (p.compute_dtype, p.dtype) == ("fp16", "bf16")


def test_target_modules_string_becomes_tuple():
    assert TrainPlan(target_modules="q_proj, v_proj").target_modules == ("q_proj", "v_proj")


def test_plan_from_unknown_field():
    with pytest.raises(InvalidSpecError, match="seq_length"):
        plan_from(seq_length=4096)


def test_plan_from_keywords_win_and_none_is_ignored():
    base = TrainPlan(seq_len=512)
    p = plan_from(base, seq_len=None, batch_size=4)
    assert (p.seq_len, p.batch_size) == (512, 4)


def test_plan_from_stand_in_objects():
    bnb = SimpleNamespace(load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type="fp4",
                          bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype="torch.float16")
    lora = SimpleNamespace(r=64, lora_alpha=16, lora_dropout=0.1, target_modules={"v_proj", "q_proj"})
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=8,
                           gradient_checkpointing=False, optim="adamw_torch", bf16=False, fp16=True, use_cpu=False)
    p = plan_from(bnb_config=bnb, lora_config=lora, training_args=args, seq_len=1024)
    assert (p.method, p.quant, p.double_quant, p.compute_dtype) == ("qlora", "fp4", False, "fp16")
    assert (p.lora_r, p.lora_alpha, p.lora_dropout, p.target_modules) == (64, 16, 0.1, ("q_proj", "v_proj"))
    assert (p.batch_size, p.gradient_accumulation_steps, p.gradient_checkpointing) == (4, 8, False)
    assert (p.optim, p.mixed_precision, p.seq_len) == ("adamw_torch", "fp16", 1024)


def test_plan_from_dicts_and_8bit():
    p = plan_from(bnb_config={"load_in_8bit": True}, training_args={"bf16": False, "fp16": False})
    assert (p.method, p.quant, p.mixed_precision) == ("qlora", "int8", "no")


def test_plan_from_real_hf_objects(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                          gradient_checkpointing=True, optim="paged_adamw_32bit", bf16=True,
                                          use_cpu=True, report_to="none")
    p = plan_from(bnb_config=bnb, lora_config=lora, training_args=args)
    assert (p.method, p.quant, p.double_quant, p.compute_dtype) == ("qlora", "nf4", True, "bf16")
    assert (p.lora_r, p.lora_alpha, p.lora_dropout) == (8, 16, 0.0)
    assert p.target_modules == ("k_proj", "q_proj", "v_proj")
    assert (p.batch_size, p.gradient_accumulation_steps, p.gradient_checkpointing) == (2, 4, True)
    assert (p.optim, p.mixed_precision) == ("paged_adamw_32bit", "bf16")
    lora_all = peft.LoraConfig(r=16, target_modules="all-linear")
    assert plan_from(lora_config=lora_all).target_modules == "all-linear"


def test_plans_pickle_and_copy_through_their_fields():
    import copy
    import pickle

    p = TrainPlan(seq_len=512, target_modules=["q_proj", "v_proj"], lora_r=8)
    for q in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p), copy.copy(p)):
        assert q == p and hash(q) == hash(p) and q.precision == p.precision


def test_normalisation_is_cached_but_types_still_checked():
    assert TrainPlan(lora_r=16).lora_r == 16
    with pytest.raises(InvalidSpecError, match="--lora-r"):
        TrainPlan(lora_r=16.0)  # equal to 16 and hashed alike, but not an integer
    with pytest.raises(InvalidSpecError, match="--seq-len"):
        TrainPlan(seq_len=True)


def test_reentrant_checkpointing_is_read_from_training_arguments():
    args = SimpleNamespace(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert plan_from(training_args=args).use_reentrant is True
    assert plan_from(training_args=SimpleNamespace(gradient_checkpointing=True)).use_reentrant is False


def test_a_peft_model_gives_its_config_and_its_adapters_dtype():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(8, 8, dtype=torch.bfloat16))
    net.config = SimpleNamespace(model_type="custom", to_dict=lambda: {}, tie_word_embeddings=False)  # peft asks
    fp32 = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    p = plan_from(lora_config=fp32)
    assert (p.lora_r, p.lora_alpha, p.target_modules, p.adapter_dtype) == (4, 8, ("q_proj",), "fp32")
    for prm in fp32.parameters():
        prm.data = prm.data.to(torch.bfloat16)
    assert plan_from(lora_config=fp32).adapter_dtype == "bf16"
