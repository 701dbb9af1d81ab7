"""Routing and memory (issue 10): transformers 5's default experts implementation (`grouped_mm`) runs
all T*top_k token slots through one grouped matmul whatever the router picks, so the step's memory does
not depend on routing and the closed form's one figure is also the worst case. Checked on real CPU
steps with the routing forced: all tokens to the same top-k experts (the most tokens an expert can
receive), and the router's own choice, against the estimate, byte for byte."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.estimate import compute  # noqa: E402
from memplan.model import model_from_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402

CFG = dict(model_type="qwen3_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1000, num_experts=6,
           num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, max_position_embeddings=512,
           pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _force(monkeypatch, route):
    from transformers.models.qwen3_moe import modeling_qwen3_moe as mq

    orig = mq.Qwen3MoeTopKRouter.forward

    def forward(self, hidden_states):
        logits, scores, idx = orig(self, hidden_states)
        return logits, scores, route(idx)

    monkeypatch.setattr(mq.Qwen3MoeTopKRouter, "forward", forward)


@pytest.mark.parametrize("routing", ["router", "all-to-experts-0-and-1", "round-robin"])
@pytest.mark.parametrize("gc", [True, False], ids=["gc", "no-gc"])
def test_grouped_mm_memory_does_not_depend_on_routing(monkeypatch, routing, gc):
    if routing == "all-to-experts-0-and-1":
        _force(monkeypatch, lambda idx: torch.arange(idx.shape[1]).expand_as(idx).contiguous())
    elif routing == "round-robin":
        _force(monkeypatch, lambda idx: (torch.arange(idx.numel()) % CFG["num_experts"]).view_as(idx))
    plan = TrainPlan(device="cpu", seq_len=64, lora_dropout=0.0, gradient_checkpointing=gc, optim="adamw_torch")
    e = compute(model_from_config(CFG), plan)
    real = cpu_step(CFG, plan)
    assert real.peak_bytes == e.allocated_bytes
