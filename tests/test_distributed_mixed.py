"""Distributed plans of models whose decoder layers differ (`layer_kinds`: DeepSeek's first_k_dense_replace,
Qwen's mlp_only_layers, Llama 4 Maverick's interleaved MoE), of Llama 4's multimodal checkpoints (the
vision tower is not built) and of Gemma 3's (the tower built, idle: accelerate needs
fsdp_transformer_layer_cls_to_wrap for them): the per-rank closed form (memplan.distributed: one FSDP unit per decoder layer
with that layer's kind's parameters) against simulate's per-rank trace (memplan.simulate.distributed: the
real FSDP2 engine / DDP on meta under torch's fake process group), on catalogue shapes cut to a few
layers covering both kinds, CUDA plans, QLoRA (bf16 quant storage), rank 0 (padding makes ranks alike).

Measured (estimate - simulate, rank 0's allocated peak; static terms to the byte unless said):
  deepseek-v2-lite (3 layers, first_k_dense_replace=1)  2 FULL_SHARD -1,280 B; 4 SHARD_GRAD_OP +2,048 B
  qwen1.5-moe-a2.7b (3 layers, mlp_only_layers=[1])     2 FULL_SHARD -262,144 B (-0.004 %: activations);
                                                        4 SHARD_GRAD_OP +484,320 B
  qwen3-30b-a3b (3 layers, mlp_only_layers=[0])         4 FULL_SHARD -1,024 B
  llama-4-maverick (3 layers: dense, MoE, dense)        4 SHARD_GRAD_OP -15,734,784 B (-0.017 %)
                                                        2 FULL_SHARD +0.63 % (NB below; 4 ranks +0.76 %)
  llama-4-scout (2 layers, vision not built)            2 FULL_SHARD 0 B (the layer-1 all-gather copy-out)
  llama-4-maverick 2 DDP                                -1,536 B
  gemma-3-4b multimodal (2 text + 2 vision layers, fsdp_transformer_layer_cls_to_wrap
    Gemma3DecoderLayer,SiglipEncoderLayer,SiglipVisionEmbeddings)   2 FULL_SHARD 0 B; 4 SHARD_GRAD_OP 0 B;
    Gemma3DecoderLayer only (the tower in the root)                 2 FULL_SHARD 0 B
NB: with checkpointing, an MoE layer's forward under the checkpoint is the layer walk with nothing saved
(memplan.distributed `_checkpointed_forward`; the walk frees a saved tensor only where the layer code
drops it): +0.63 % on Maverick FULL_SHARD, where that forward (beside two copies of the layer's 32 GB of
gathered experts) is the peak (+1.29 % when taken as the forward without checkpointing).
"""

from __future__ import annotations

import pytest

from memplan import formulas as F
from memplan.catalogue import load_model, resolve_model
from memplan.distributed import units
from memplan.errors import UnsupportedArchitectureError
from memplan.plan import TrainPlan
from memplan.terms import Term

#: all-linear minus Llama4Router (peft wraps the router, an nn.Linear subclass, and the step fails:
#: tests/test_simulate_llama4.py)
LLAMA4_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CUTS = {
    "dsv2": ("deepseek-v2-lite", {"num_hidden_layers": 3, "first_k_dense_replace": 1}),
    "qwen2moe": ("qwen1.5-moe-a2.7b", {"num_hidden_layers": 3, "mlp_only_layers": [1]}),
    "qwen3moe": ("qwen3-30b-a3b", {"num_hidden_layers": 3, "mlp_only_layers": [0]}),
    "maverick": ("llama-4-maverick", {"num_hidden_layers": 3}),
    "scout": ("llama-4-scout", {"num_hidden_layers": 2}),
    "gemma3mm": ("gemma-3-4b", {"num_hidden_layers": 2}),  # and 2 vision layers
    "llama32": ("llama-3.2-1b", {"num_hidden_layers": 2}),  # tied embeddings
}


def config(key: str) -> dict:
    name, cut = CUTS[key]
    cfg = dict(resolve_model(name).config)
    if "text_config" not in cfg:
        return {**cfg, **cut}
    text = dict(cfg["text_config"])
    L0 = text["num_hidden_layers"]  # per-layer lists (layer_types, no_rope_layers) cut with the layers
    text = {k: v[:cut["num_hidden_layers"]] if isinstance(v, list) and len(v) == L0 else v for k, v in text.items()}
    vision = {**cfg["vision_config"], "num_hidden_layers": 2} if key == "gemma3mm" else cfg.get("vision_config")
    return {**cfg, "text_config": {**text, **cut}, "vision_config": vision}


def plan(key: str, n: int, sharding: str, **kw) -> TrainPlan:
    strategy = "ddp" if sharding == "ddp" else "fsdp"
    extra = {"fsdp_sharding_strategy": sharding} if strategy == "fsdp" else {}
    if key in ("maverick", "scout"):
        extra["target_modules"] = LLAMA4_TARGETS
    fields = dict(seq_len=512, device="cuda", num_processes=n, strategy=strategy, lora_dropout=0.0,
                  gradient_checkpointing=sharding != "SHARD_GRAD_OP", **extra)
    return TrainPlan(**{**fields, **kw})


def one_rank_inventory(spec, p: TrainPlan) -> tuple[tuple, int]:
    """w = 1: the units hold exactly the closed form's base weights, adapters and gradients; returns the
    units and the other parameters the single-device terms have beyond them (the replicated buffers)."""
    single = p.single_device()
    us = units(spec, p)
    inv = dict.fromkeys((Term.BASE_WEIGHTS, Term.OTHER_PARAMS, Term.ADAPTER_WEIGHTS), 0)
    for u in us:
        for t, v in u.bytes(1, 1, 2).items():
            inv[t] += v
    assert inv[Term.BASE_WEIGHTS] == F.base_weights_bytes(spec, single)
    assert inv[Term.ADAPTER_WEIGHTS] == F.adapter_weights_bytes(spec, single)
    assert sum(u.grads(1, 1, 2) for u in us) == F.gradient_bytes(spec, single)
    return us, F.other_params_bytes(spec, single) - inv[Term.OTHER_PARAMS]


@pytest.mark.parametrize("model, kw", [("deepseek-v2-lite", {}), ("llama-4-maverick", {"target_modules": LLAMA4_TARGETS}),
                                       ("deepseek-v3", {}), ("llama-4-scout", {"target_modules": LLAMA4_TARGETS}),
                                       ("deepseek-v2-lite", {"method": "lora", "optim": "adamw_torch"})])
def test_one_rank_inventory_is_the_single_device_terms(model, kw):
    """w = 1: the units of a mixed dense/MoE model hold exactly the closed form's base weights and adapters
    and its other parameters up to the replicated buffers; the dense and MoE layers' units differ."""
    spec = load_model(model)
    us, buffers = one_rank_inventory(spec, TrainPlan(device="cpu", num_processes=1, strategy="fsdp", prepare=False, **kw))
    # rotary inv_freq (+ DeepSeek-V3's fp32 e_score_correction_bias per MoE layer)
    assert 0 <= buffers <= 4 * spec.rope_dim * 4 + 4 * spec.num_moe_layers * spec.num_experts
    if spec.layer_kinds:
        size = {k: sum(u.bytes(1, 1, 2).values()) for u in us if u.layer is not None
                for k in [spec.layer_kinds[u.layer]]}
        assert size["moe"] > 2 * size["dense"]


GEMMA3_WRAP = ("Gemma3DecoderLayer", "SiglipEncoderLayer", "SiglipVisionEmbeddings")


def test_gemma3_multimodal_default_wrap_is_refused_with_accelerates_reason():
    """Gemma 3's multimodal checkpoints: accelerate 1.15's transformer_based_wrap raises on
    Gemma3ForConditionalGeneration by default (transformers aggregates SigLIP's `_no_split_modules`, which
    name SiglipMultiheadAttentionPoolingHead, a head Gemma 3 does not build: measured with simulate per
    rank); the closed form says so and names the flag that makes it run."""
    with pytest.raises(UnsupportedArchitectureError, match="SiglipMultiheadAttentionPoolingHead") as e:
        units(load_model("gemma-3-4b"), TrainPlan(num_processes=2, strategy="fsdp"))
    assert str(e.value).endswith("--fsdp-transformer-layer-cls-to-wrap Gemma3DecoderLayer")
    with pytest.raises(UnsupportedArchitectureError, match="required"):
        units(load_model("gemma-3-4b"), TrainPlan(num_processes=2, strategy="fsdp",
                                                  fsdp_transformer_layer_cls_to_wrap="SiglipEncoderLayer"))


@pytest.mark.parametrize("wrap", [GEMMA3_WRAP, GEMMA3_WRAP[:1]])
def test_gemma3_multimodal_one_rank_inventory(wrap):
    """w = 1 with fsdp_transformer_layer_cls_to_wrap: the units (text layers, the vision tower's units or
    the root) hold the closed form's base weights (the 4-bit vision Linears too) and adapters (the tower's
    LoRA too), the gradients only the text LoRA's (the tower never runs)."""
    spec = load_model("gemma-3-4b")
    us, buffers = one_rank_inventory(spec, TrainPlan(device="cpu", num_processes=1, strategy="fsdp",
                                                     fsdp_transformer_layer_cls_to_wrap=wrap))
    assert buffers == 4 * 2 * 2 * (spec.rope_dim // 2) + 2 + spec.vision_buffer_bytes  # inv_freq, embed_scale, ids
    assert sum(u.idle for u in us) == (28 if len(wrap) == 3 else 0)  # 27 encoder layers + the embeddings


def test_wrap_classes_from_flags_and_configs(tmp_path):
    from memplan.integrations.world import from_fsdp_args

    assert TrainPlan(fsdp_transformer_layer_cls_to_wrap="A, B").fsdp_transformer_layer_cls_to_wrap == ("A", "B")
    fields, _ = from_fsdp_args("full_shard auto_wrap", {"transformer_layer_cls_to_wrap": ["Gemma3DecoderLayer"]})
    assert fields["fsdp_transformer_layer_cls_to_wrap"] == ("Gemma3DecoderLayer",)
    fields, _ = from_fsdp_args("full_shard", {"fsdp_transformer_layer_cls_to_wrap": "A,B"})
    assert fields["fsdp_transformer_layer_cls_to_wrap"] == ("A", "B")
    assert "fsdp_transformer_layer_cls_to_wrap" not in TrainPlan(num_processes=2).to_dict()  # omitted at default
    from memplan.cli import main

    assert main(["estimate", "gemma-3-4b", "--num-processes", "2", "--strategy", "fsdp", "--json",
                 "--fsdp-transformer-layer-cls-to-wrap", ",".join(GEMMA3_WRAP)]) == 0
    assert main(["estimate", "gemma-3-4b", "--num-processes", "2", "--strategy", "fsdp",
                 "--fsdp-transformer-layer-cls-to-wrap", "not a class"]) == 2


# (case, ranks, sharding, plan overrides, peak tolerance as a fraction of the peak)
SIM_CASES = [
    ("dsv2", 2, "FULL_SHARD", {}, 1e-5),
    ("dsv2", 4, "SHARD_GRAD_OP", {}, 1e-5),
    ("qwen2moe", 2, "FULL_SHARD", {}, 1e-4),
    ("qwen3moe", 4, "FULL_SHARD", {}, 1e-5),
    ("maverick", 4, "SHARD_GRAD_OP", {}, 2e-4),
    ("scout", 2, "FULL_SHARD", {}, 1e-5),
    ("maverick", 2, "ddp", {}, 1e-5),
    ("dsv2", 2, "ddp", {"prepare": False}, 1e-5),  # DDP casts nothing: grouped_mm needs bf16 experts
    ("qwen2moe", 8, "FULL_SHARD", {}, 1e-4),  # 60 experts over 8 ranks: the routers pad on dim 0
    ("dsv2", 2, "FULL_SHARD", {"method": "lora", "optim": "adamw_torch"}, 1e-5),
    # tied embeddings: the tail [embed, lm_head] gathered from the embedding's forward to the end of backward
    ("gemma3mm", 2, "FULL_SHARD", {"fsdp_transformer_layer_cls_to_wrap": GEMMA3_WRAP}, 1e-6),
    ("gemma3mm", 4, "SHARD_GRAD_OP", {"fsdp_transformer_layer_cls_to_wrap": GEMMA3_WRAP}, 1e-6),
    ("gemma3mm", 2, "FULL_SHARD", {"fsdp_transformer_layer_cls_to_wrap": GEMMA3_WRAP[:1]}, 1e-6),  # tower in root
    # a tied text model: the tail gathered from the embedding on (before: +21 % and +23 %, a tail all-gather
    # at the end of forward that FSDP2 does not do)
    ("llama32", 2, "FULL_SHARD", {}, 1e-6),
    ("llama32", 4, "FULL_SHARD", {"gradient_checkpointing": False}, 1e-5),
]


@pytest.mark.parametrize("key, n, sharding, kw, tol", SIM_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'-'.join(c[3])}-{k}" for k, c in enumerate(SIM_CASES)])
def test_estimate_matches_simulate_per_rank(key, n, sharding, kw, tol):
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from memplan import estimate
    from memplan.runtime.distributed import World
    from memplan.simulate.distributed import simulate_rank

    cfg, p = config(key), plan(key, n, sharding, **kw)
    sim = simulate_rank(cfg, p, World.from_plan(p), rank=0)
    est = estimate(cfg, p)
    r0 = est.ranks[0]
    allocated = r0.allocated_bytes - r0.terms.get(Term.WORKSPACE, 0)  # simulate has no cuBLAS workspace
    assert abs(allocated - sim.peak_bytes) <= tol * sim.peak_bytes, (allocated, sim.peak_bytes, r0.moment)
    assert r0.peak_phase == sim.peak_phase
    # other_params too (qwen1.5-moe's q/k/v biases: the shard keeps prepare's fp32, `distributed.bias_el`;
    # -18,432 B on 2 ranks when counted in the single-device bf16)
    for term in ("base_weights", "quant_state", "other_params", "adapter_weights", "optimizer_state"):
        assert r0.terms[Term(term)] == sim.terms[term], term


def test_checkpointed_moe_forward_within_one_percent():
    """Maverick FULL_SHARD with checkpointing peaks in the MoE layer's forward (its gathered experts twice:
    the unsharded parameters and the flat all-gather output); the closed form walks that forward with
    nothing saved: measured +0.63 % on 2 ranks (+0.76 % on 4; +0.62 % / +0.75 % before the layer's input
    was held through it, `checkpointed_input_held`: 5,242,880 B), every static and collective term to the
    byte."""
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from memplan import estimate
    from memplan.runtime.distributed import World
    from memplan.simulate.distributed import simulate_rank

    cfg, p = config("maverick"), plan("maverick", 2, "FULL_SHARD")
    sim = simulate_rank(cfg, p, World.from_plan(p), rank=0)
    r0 = estimate(cfg, p).ranks[0]
    allocated = r0.allocated_bytes - r0.terms.get(Term.WORKSPACE, 0)
    assert r0.moment == "forward:layer1" and sim.peak_phase == "forward"
    assert 0 < allocated - sim.peak_bytes <= 0.0065 * sim.peak_bytes, (allocated, sim.peak_bytes)
    for term in ("base_weights", "quant_state", "other_params", "adapter_weights", "optimizer_state",
                 "comm_buffers"):
        assert r0.terms[Term(term)] == sim.terms[term], term


def test_fsdp_and_zero_keep_prepare_for_cuda_moe():
    """One GPU: grouped_mm refuses prepare's fp32 experts, so the estimate drops prepare; under FSDP's mixed
    precision (and DeepSpeed's cast) the experts reach grouped_mm in bf16 and prepare runs: the ranks shard
    fp32 experts (simulate per rank: other_params to the byte, above)."""
    from memplan import estimate

    p = TrainPlan(device="cuda", seq_len=512, lora_dropout=0.0)
    assert not estimate("deepseek-v2-lite", p).plan.prepare
    for world in ({"strategy": "fsdp"}, {"strategy": "deepspeed"}):
        est = estimate("deepseek-v2-lite", p.replace(num_processes=2, **world))
        assert est.plan.prepare
        assert any("prepare_model_for_kbit_training runs" in n for n in est.notes)
        assert not any(n.startswith("grouped_mm on CUDA takes bf16 experts only") for n in est.notes)
    ddp = estimate("deepseek-v2-lite", p.replace(num_processes=2, strategy="ddp"))  # DDP casts nothing
    assert not ddp.plan.prepare


def test_backward_phase_peak_is_the_last_layers_all_gather():
    """FSDP2 FULL_SHARD: the backward phase peaks as the tail's pre-backward prefetches the last layer (its
    cast all-gather input and flat output, beside lm_head gathered and the 16-bit logits' gradient):
    the closed form's `backward:gather_last` to the byte against simulate per rank (before: -10.07 %, the
    backward peak taken at layer 0's recompute)."""
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from memplan import estimate
    from memplan.distributed import rank_moments
    from memplan.runtime.distributed import World
    from memplan.simulate.distributed import simulate_rank
    from memplan.terms import ALLOCATED_TERMS

    cfg, p = config("qwen2moe"), plan("qwen2moe", 2, "FULL_SHARD")
    sim = simulate_rank(cfg, p, World.from_plan(p), rank=0)
    _, _, per = rank_moments(resolve_model(cfg), estimate(cfg, p).plan)
    backward = {m.name: sum(t.get(k, 0) for k in ALLOCATED_TERMS) for m, t in per if m.phase == "backward"}
    assert max(backward, key=backward.get) == "backward:gather_last"
    assert backward["backward:gather_last"] == sim.phase_peaks["backward"] == 5_742_254_080


# (case, ranks, sharding, limit in bytes on every phase's peak, rank 0: the largest measured gap)
PHASE_CASES = [
    ("dsv2", 2, "FULL_SHARD", 1280),
    ("dsv2", 8, "FULL_SHARD", 1280),
    ("qwen3moe", 4, "FULL_SHARD", 1024),
    ("qwen2moe", 2, "FULL_SHARD", 0),
    ("qwen2moe", 4, "FULL_SHARD", 0),
    ("qwen2moe", 8, "FULL_SHARD", 0),
    ("dsv2", 2, "SHARD_GRAD_OP", 3584),
    ("qwen3moe", 4, "SHARD_GRAD_OP", 3072),
]


@pytest.mark.parametrize("key, n, sharding, limit", PHASE_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in PHASE_CASES])
def test_mixed_phase_peaks_match_simulate(key, n, sharding, limit):
    """Every phase's peak (`phase_peaks`: the max over the closed form's moments of each phase, as
    tests/test_distributed_sim.py sums them) against simulate per rank, FSDP2, mixed dense/MoE models.
    Measured (estimate - simulate, B; forward / loss / backward / optimizer):
      deepseek-v2-lite FULL_SHARD 2 and 8 ranks      -512 / 0 / -1,280 / 0
      qwen3-30b-a3b FULL_SHARD 4 ranks (2, 8 alike)     0 / 0 / -1,024 / 0
      qwen1.5-moe-a2.7b FULL_SHARD 2, 4 and 8 ranks     0 / 0 / 0 / 0
      deepseek-v2-lite SHARD_GRAD_OP 2 ranks         -3,584 on forward, loss and backward / 0
      qwen3-30b-a3b SHARD_GRAD_OP 4 ranks            -3,072 on forward, loss and backward / 0
    With checkpointing the forward phase peaks inside the last MoE layer's experts (`forward:layer2`);
    before the checkpointed layer's input was held through its forward (`checkpointed_input_held`:
    2,097,152 B) and the walk with nothing saved let go of what only autograd keeps (perm // k, the
    router's div_ clone, MLA's logsumexp) it read -2,040,320 B (deepseek-v2-lite) and -2,048,000 B
    (qwen3-30b-a3b), then +56,832 / +49,152 B. qwen1.5-moe's forward read -262,144 B before
    `activations.unused_forward_masks` (Qwen2MoeModel.forward builds the sliding-window mask for every
    config, sliding_window 0 when use_sliding_window is off: a bool [1, 1, S, S] no layer takes, alive
    through the model's forward; its peak is layer 0's all-gather copy-out, `forward:gather0`).
    qwen1.5-moe FULL_SHARD's backward on 4 / 8 ranks read -25,442,304 / -215,972,352 B before
    `backward:copy_out_last` (`distributed._backward_copy_out`: the last MoE layer's copy-out at the start of
    backward, its flat all-gather output and unsharded parameters both alive: 1,065 + 1,038 MB of experts on 4
    ranks, 1,134 + 1,107 MB on 8 (60 experts padded to 64); `backward:gather_last`'s cast input, 1/w of
    the layer, shrinks with the world while these do not; 2 ranks: gather_last stays the peak).
    NB known gaps, not asserted (backward phases, below the step's peak, which is the forward):
    Llama 4 FULL_SHARD scout 2 / 4 ranks
    -1,067,124,736 / -59,864,064 B, maverick 2 ranks -24,990,457,856 B; SHARD_GRAD_OP qwen1.5-moe
    +487,904 B on every phase but the optimizer's, maverick's forward -15,734,784 B; maverick FULL_SHARD's
    forward +665,849,856 B (the checkpointed MoE forward, test_checkpointed_moe_forward_within_one_percent)."""
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from memplan import estimate
    from memplan.distributed import rank_moments
    from memplan.runtime.distributed import World
    from memplan.simulate.distributed import simulate_rank
    from memplan.terms import ALLOCATED_TERMS

    cfg, p = config(key), plan(key, n, sharding)
    sim = simulate_rank(cfg, p, World.from_plan(p), rank=0)
    _, _, per = rank_moments(resolve_model(cfg), estimate(cfg, p).plan)
    phases: dict[str, int] = {}
    for m, t in per:
        phases[m.phase] = max(phases.get(m.phase, 0), sum(t.get(k, 0) for k in ALLOCATED_TERMS))
    assert set(phases) == set(sim.phase_peaks)
    diff = {ph: phases[ph] - peak for ph, peak in sim.phase_peaks.items()}
    assert all(abs(d) <= limit for d in diff.values()), diff
