"""TRL's SFTTrainer: its step (`trainer="sft"`: the fused, tiled LM head of trl 1.16) against real CPU steps,
and `MemplanCallback` inside a real `SFTTrainer` run.

What the real steps showed (tiny Llama, hidden 64, 2 layers, vocab 2048, 2 x 64 tokens, QLoRA, bf16
autocast, checkpointing): the plain Trainer step peaks at 5.09 MB at the start of the loss backward
(3 x [128 x 2048] fp32 logits buffers, 3.1 MB); the SFTTrainer step at 17.7 MB inside the fused head's
backward: its projection buffer is [min(N, 4096) x 32768] bf16 whatever the vocabulary (8.3 MB here),
and on CPU the torch fold of each tile holds seven fp32 and one bool [N x 2048] tensors (7.5 MB). On a
GPU the fold is a Triton kernel with no temporaries, and at real vocabularies the buffer is far smaller
than the logits: Llama-3-8B QLoRA at seq 4096 peaks at 16.40 GiB (Trainer) vs 11.39 GiB (SFTTrainer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: sim_checks

from transformers import TrainerCallback  # noqa: E402

from memplan.catalogue import resolve_model  # noqa: E402
from memplan.estimate import compute  # noqa: E402
from memplan.integrations import MemplanCallback  # noqa: E402
from memplan.integrations.configs import read_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.allocator import allocator_peak, window  # noqa: E402
from memplan.runtime.load import load_model  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402
from memplan.runtime.tracker import OP_MARK  # noqa: E402
from memplan.simulate import simulate  # noqa: E402
from sim_checks import assert_simulate_matches  # noqa: E402

V = 2048
CFG = dict(_name_or_path="tiny-test-llama", model_type="llama", hidden_size=64, intermediate_size=172,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
           max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
B, S = 2, 64
PLAN = TrainPlan(device="cpu", batch_size=B, seq_len=S, padding="longest", trainer="sft")


def _estimate(plan: TrainPlan):
    return compute(resolve_model(CFG), plan)


# -- the step: estimate and simulate against real CPU SFT steps, byte for byte --------------------------
#: Gemma-2: final logit soft-capping (one more fp32 tile alive in the CPU fold's backward), eager attention
GEMMA2 = dict(model_type="gemma2", hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=V, max_position_embeddings=512, pad_token_id=0,
              bos_token_id=2, eos_token_id=1, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
              sliding_window=4096, query_pre_attn_scalar=16)


@pytest.mark.parametrize("cfg,over", [
    # bf16 stream and head, no checkpointing, soft-capped logits
    (GEMMA2, {"prepare": False, "gradient_checkpointing": False, "attn_implementation": "eager"}),
    # no autocast (an fp32 head: no casts, an fp32 buffer); one unpadded row: the hidden states are a view
    (CFG, {"mixed_precision": "no", "padding": "none", "batch_size": 1, "seq_len": 100}),
], ids=["gemma2-noprep-nogc", "fp32-one-row"])
def test_sft_step_estimate_is_exact(cfg, over):
    plan = PLAN.replace(**over)
    _exact(cpu_step(cfg, plan), compute(resolve_model(cfg), plan))


def _exact(real, est):
    assert est.allocated_bytes == real.peak_bytes, (est.allocated_bytes, real.peak_bytes, est.moment)
    assert {str(k): v for k, v in est.terms.items() if str(k) in real.terms} == real.terms
    assert est.phase_peaks["loss:forward"] == real.phase_peaks["loss"]
    assert real.terms["logits"] > 0 and est.peak.kind == "sft_head_backward"


def test_sft_step_vs_trainer_step_estimate_and_simulate():
    """QLoRA, bf16 autocast, checkpointing: the SFT step against the plain Trainer step of the same plan."""
    sft = cpu_step(CFG, PLAN)
    plain = cpu_step(CFG, TrainPlan(device="cpu", batch_size=B, seq_len=S, padding="longest"))
    # the fused head's [126 x 32768] bf16 buffer and CPU fold temporaries vs 3 x [128 x 2048] fp32 logits
    assert plain.terms["logits"] == 3 * 4 * B * S * V
    assert sft.terms["logits"] == 2 * B * (S - 1) * 32768 + 29 * B * (S - 1) * V
    assert sft.terms["adapter_weights"] * 2 == plain.terms["adapter_weights"]  # SFTTrainer: bf16 adapters
    _exact(sft, _estimate(PLAN))
    assert_simulate_matches(sft, simulate(CFG, PLAN))


def test_sft_cuda_plan_estimate_vs_simulate():
    """A CUDA plan (the Triton fold allocates nothing; only valid positions scored) traced on meta."""
    plan = PLAN.replace(device="cuda", batch_size=2, seq_len=256)
    sim, est = simulate(CFG, plan), _estimate(plan)
    for term in ("activations", "logits", "temporaries", "adapter_weights"):
        assert sim.terms[term] == est.terms[next(t for t in est.terms if str(t) == term)], term
    assert any("not yet checked on hardware" in n for n in est.notes)


# -- MemplanCallback inside a real SFTTrainer run ----------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


class _Window(TrainerCallback):
    """Marks step 2 for the allocator trace and notes the callback tracker's live bytes as it starts."""

    def __init__(self, cb: MemplanCallback):
        self.cb, self.win, self.start = cb, None, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 1:
            self.start = self.cb._tracker.live
            self.win = window()
            self.win.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self.win is not None:
            self.win.__exit__(None, None, None)
            self.win = None


def test_callback_in_a_real_sfttrainer_run(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, V, (S,), generator=g).tolist() for _ in range(8)]
    # a QLoRA script: the 4-bit model, prepared, and the adapter handed to the trainer as peft_config
    model = prepare_model_for_kbit_training(load_model(CFG, PLAN, "cpu"))
    cb = MemplanCallback(warn=False)
    win = _Window(cb)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=B, use_cpu=True,
                     max_length=S, optim="paged_adamw_8bit", logging_steps=1, report_to=[], save_strategy="no",
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=_tokenizer(), callbacks=[cb, win],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trace = allocator_peak(trainer.train, mark=OP_MARK)
    p = cb.plan
    assert (p.trainer, p.padding, p.adapter_dtype, p.prepare, p.mixed_precision) == ("sft", "longest", "bf16", True,
                                                                                     "bf16")
    assert (p.batch_size, p.seq_len, p.gradient_checkpointing, p.optim) == (B, S, True, "paged_adamw_8bit")
    step2 = cb.history[1]
    # the callback's peak against memplan's estimate of the same plan (the batch, built before the
    # step begins, is not counted by the callback: 10 KB here)
    assert step2["estimate_bytes"] == _estimate(p).allocated_bytes
    assert abs(step2["error_pct"]) <= 1.0, step2
    # ... and against an independent instrument: torch's allocator events over the same step
    above = step2["allocated_bytes"] - win.start
    assert abs(trace.peak_above_start - above) <= 2048, (trace.peak_above_start, above)
    # the SFT step peaks far above the plain Trainer estimate of the same plan (the head's buffers)
    assert step2["allocated_bytes"] > 3 * _estimate(p.replace(trainer="trainer")).allocated_bytes
    assert any("memplan/estimate_gib" in h for h in trainer.state.log_history)


# -- config files: a TRL file plans SFTTrainer's step -------------------------------------------------------
def test_trl_file_plans_the_sft_step(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: org/model\nload_in_4bit: true\nuse_peft: true\nmax_length: 512\n"
                    "per_device_train_batch_size: 2\n")
    r = read_config(path)
    f = r.plan_fields
    assert (f["trainer"], f["prepare"], f["dtype"]) == ("sft", False, "fp32")
    assert any("float32" in n for n in r.notes)
    plan = TrainPlan(**f)
    assert plan.adapter_dtype == "bf16"  # SFTTrainer casts a quantized model's adapters
    path.write_text(json.dumps({"output_dir": "o", "max_length": 256, "dtype": "bfloat16", "label_smoothing_factor": 0.1}))
    r = read_config(path)
    assert r.plan_fields["trainer"] == "sft" and "prepare" not in r.plan_fields and r.plan_fields["dtype"] == "bf16"
    assert any("label_smoothing_factor: 0.1: SFTTrainer" in n for n in r.notes)


def test_trainer_field_validation_and_json():
    from memplan.errors import InvalidSpecError

    with pytest.raises(InvalidSpecError, match="--trainer 'dpo' is not one of: trainer, sft"):
        TrainPlan(trainer="dpo")
    assert "trainer" not in TrainPlan().to_dict()  # the default leaves the JSON as it was
    assert TrainPlan(trainer="SFTTrainer").to_dict()["trainer"] == "sft"
    assert TrainPlan(trainer="sft", method="lora").adapter_dtype == "fp32"  # no cast without quantization


def test_readme_sft_recommendation():
    """README: Llama-3-8B QLoRA on an RTX 4090 at seq 4096: micro-batch 3 with SFTTrainer's step, 1 with
    the plain Trainer's (its 5.9 GiB of logits buffers)."""
    from memplan.recommend import recommend

    got = {t: recommend("llama-3-8b", "rtx-4090", seq_len=4096, trainer=t).max_batch_size for t in ("trainer", "sft")}
    assert got == {"trainer": 1, "sft": 3}
