"""FSDP1's closed form term by term against simulate per rank (the real FullyShardedDataParallel on meta under
torch's fake process group, which matches real 2-rank gloo ranks to the byte: tests/test_distributed_worlds.py):
use_orig_params, LoRA (the GPU-equivalent step: gloo's in-collective copies left out), the three backward prefetch
values, and catalogue shapes on 2/4/8 ranks.

Tiny plans as tests/test_distributed_real.py (llama, hidden 256, 2 layers, vocab 1000, batch 2 x seq 64; QLoRA nf4
with bf16 storage and --no-prepare, as FSDP1-QLoRA needs). Every term per rank is the meta trace's to the byte but
base_weights / other_params: FSDP1's flat parameter mixes a layer's packed weights and norms, so rank 0's shard
holds 1,024 B more base weights and 1,152 B fewer norm bytes than the even split the closed form shows (their sum:
128 B of flat padding), hence the peak within 128 B.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan import estimate  # noqa: E402
from memplan.runtime.distributed import World  # noqa: E402
from memplan.simulate import distributed as sim_dist  # noqa: E402
from memplan.simulate.distributed import simulate_rank  # noqa: E402
from memplan.terms import Term  # noqa: E402
from test_distributed_real import plan_of, tiny  # noqa: E402

#: the terms the closed form gives per rank exactly as the meta trace holds them (FSDP1, these plans)
EXACT = ("quant_state", "adapter_weights", "optimizer_state", "gradients", "activations", "logits", "temporaries",
         "comm_buffers")


def world1(**kw) -> World:
    return World(num_processes=2, strategy="fsdp", fsdp_version=1, **kw)


def est_of(config, plan, world):
    return estimate(config, plan.replace(**{k: v for k, v in world.to_dict().items() if hasattr(plan, k)}))


def assert_terms(config, plan, world, slack: int = 128):
    """simulate rank 0 vs the estimate's rank 0: every EXACT term to the byte, base + other within `slack`,
    the peak within `slack` and in the same phase. Returns (sim, estimate)."""
    sim = simulate_rank(config, plan, world)
    est = est_of(config, plan, world)
    d = est.ranks[0].to_dict()
    got = {t: d["terms"][t] for t in EXACT}
    assert got == {t: sim.terms[t] for t in EXACT}, (got, sim.terms, est.moment)
    both = d["terms"]["base_weights"] + d["terms"]["other_params"]
    assert abs(both - sim.terms["base_weights"] - sim.terms["other_params"]) <= slack
    assert abs(d["peak"]["allocated_bytes"] - sim.peak_bytes) <= slack, (d["peak"], sim.peak_bytes)
    assert est.peak_phase == sim.peak_phase
    return sim, est


@pytest.fixture
def no_gloo(monkeypatch):
    """The step a GPU rank runs: NCCL allocates its collectives' buffers outside torch's allocator, gloo on a CPU
    rank copies an all-gather output into a buffer of its own (simulate's patch D3, `gloo_temps`): left out."""
    monkeypatch.setattr(sim_dist, "gloo_temps", lambda: {})


#: FSDP1 use_orig_params, QLoRA: (checkpointing, the meta trace's peak = the real ranks', the activations added)
#: real 2-rank gloo ranks: 5,199,440 B with checkpointing (the earlier FSDP1 helper), 7,317,712 B without
ORIG = [(True, 5_199_440, 327_680), (False, 7_317_712, 524_288)]


@pytest.mark.parametrize("gc, peak, extra", ORIG, ids=["gc", "no-gc"])
def test_use_orig_params_saves_a_16_bit_copy_per_adapted_module(gc, peak, extra):
    """peft casts each adapted module's input to the dtype of the sharded original lora_A weight and FSDP's mixed
    precision casts it back: one saved 16-bit copy per adapted module (no longer shared by q/k/v and gate/up)."""
    config, plan = tiny("llama"), plan_of("qlora", gc).replace(prepare=False)
    sim, est = assert_terms(config, plan, world1(fsdp_use_orig_params=True))
    assert sim.peak_bytes == peak
    base_sim, base_est = assert_terms(config, plan, world1())
    assert sim.terms["activations"] - base_sim.terms["activations"] == extra
    assert est.terms[Term.ACTIVATIONS] - base_est.terms[Term.ACTIVATIONS] == extra
    assert any("use_orig_params: each adapted module saves" in n for n in est.notes)


#: LoRA (bf16 weights), default BACKWARD_PRE, the GPU-equivalent step: (checkpointing, peak, moment)
LORA = [(True, 7_006_584, "layer_end:1"), (False, 8_528_888, "loss:backward")]


@pytest.mark.parametrize("gc, peak, moment", LORA, ids=["gc", "no-gc"])
def test_lora_gpu_equivalent_per_term(no_gloo, gc, peak, moment):
    """With checkpointing the peak is the end of layer 1's backward (its input norm's fp32 backward) with layer 0's
    frozen unit prefetched: root + two frozen layers gathered (1,024,512 + 2 x 1,180,672 B)."""
    config, plan = tiny("llama"), plan_of("lora", gc)
    sim, est = assert_terms(config, plan, world1())
    assert sim.peak_bytes == peak and est.moment == moment
    if gc:
        assert sim.terms["comm_buffers"] == 1_024_512 + 2 * 1_180_672


#: (method, checkpointing, prefetch, the meta trace's peak without gloo's copies, the estimate's peak moment)
PREFETCH = [
    ("qlora", True, "BACKWARD_PRE", 4_871_760, "recompute:0"),
    ("qlora", True, "BACKWARD_POST", 4_855_376, "recompute:0"),
    ("qlora", True, "NO_PREFETCH", 4_855_376, "recompute:0"),
    ("qlora", False, "BACKWARD_PRE", 6_793_424, "loss:backward"),
    ("qlora", False, "NO_PREFETCH", 6_497_488, "loss:backward"),
    ("lora", True, "BACKWARD_POST", 7_006_584, "layer_end:1"),
    ("lora", True, "NO_PREFETCH", 6_397_368, "backward:0"),
    ("lora", False, "BACKWARD_POST", 7_879_160, "layer_end:1"),
    ("lora", False, "NO_PREFETCH", 7_348_216, "loss:backward"),
]


@pytest.mark.parametrize("method, gc, prefetch, peak, moment", PREFETCH,
                         ids=[f"{m}-{'gc' if g else 'nogc'}-{p}" for m, g, p, _, _ in PREFETCH])
def test_backward_prefetch_moments(no_gloo, method, gc, prefetch, peak, moment):
    """BACKWARD_PRE: the root's backward prefetches the last layer's frozen unit (loss:backward), lora_B's
    pre-backward its lora_A; PRE and POST: a layer's first LoRA unit prefetches the frozen unit below while the
    layer's input norm runs backward (layer_end); without prefetch neither, and the recompute holds only the last
    lora_B (8,192 B less than PRE's pair on QLoRA)."""
    config, plan = tiny("llama"), plan_of(method, gc).replace(prepare=False)
    sim, est = assert_terms(config, plan, world1(fsdp_backward_prefetch=prefetch))
    assert sim.peak_bytes == peak and est.moment == moment


#: catalogue shapes cut to 2 layers, CUDA plans, FSDP1 FULL_SHARD --no-prepare: (model, ranks, method, checkpointing)
CATALOGUE = [(m, n, "qlora", True) for m in ("llama-3-8b", "qwen2.5-7b") for n in (2, 4, 8)] + \
            [(m, n, "lora", False) for m in ("llama-3-8b", "qwen2.5-7b") for n in (2, 8)]


@pytest.mark.parametrize("model, n, method, gc", CATALOGUE, ids=[f"{m}-{n}-{t}" for m, n, t, _ in CATALOGUE])
def test_catalogue_shapes_per_rank(model, n, method, gc):
    """Measured: QLoRA with checkpointing to the byte on 2/4/8 ranks; LoRA without 2,048 B low (activations)."""
    from memplan.catalogue import resolve_model
    from memplan.plan import TrainPlan

    cfg = dict(resolve_model(model).config, num_hidden_layers=2)
    plan = TrainPlan(method=method, seq_len=1024, device="cuda", num_processes=n, strategy="fsdp", fsdp_version=1,
                     prepare=False, gradient_checkpointing=gc)
    sim = simulate_rank(cfg, plan, World.from_plan(plan), rank=0)
    est = estimate(cfg, plan)
    r0 = est.ranks[0]
    allocated = r0.allocated_bytes - r0.terms.get(Term.WORKSPACE, 0)  # simulate has no cuBLAS workspace
    assert abs(allocated - sim.peak_bytes) <= 4096, (allocated, sim.peak_bytes)  # issue 12: 1 %
    assert r0.peak_phase == sim.peak_phase
    for term in ("quant_state", "adapter_weights", "optimizer_state", "gradients", "logits", "comm_buffers"):
        assert r0.terms[Term(term)] == sim.terms[term], term
    for term in ("base_weights", "other_params", "activations", "temporaries"):
        assert abs(r0.terms[Term(term)] - sim.terms[term]) <= 1e-4 * sim.peak_bytes, term


def test_lora_backward_post_real_ranks_and_gpu_step(monkeypatch):
    """Real 2-rank gloo ranks (LoRA, no checkpointing, BACKWARD_POST): simulate per rank to the byte (8,536,056 B:
    layer 0's frozen unit all-gathered after q_proj.lora_A's backward, gloo's copy of it (1,180,672 B) alive beside
    both frozen layers); the GPU step (no gloo copy) peaks later, at layer 1's input norm backward (`layer_end:1`,
    7,879,160 B), which the estimate gives per term."""
    from test_distributed_worlds import real_and_sim

    config, plan = tiny("llama"), plan_of("lora", False)
    world = world1(fsdp_backward_prefetch="BACKWARD_POST")
    real, sims = real_and_sim(config, plan, world)
    # (alone: both ranks to the byte; after test_distributed_mixed/_sim in the same pytest process rank 0 reads
    # 8,192 B more (both runs here): something those leave in the parent reaches the spawned rank; not found yet)
    assert all(abs(r.peak_bytes - 8_536_056) <= 16_384 for r in real), [r.peak_bytes for r in real]
    assert real[0].comm_detail["gloo_buffers"] == 1_180_672
    monkeypatch.setattr(sim_dist, "gloo_temps", lambda: {})
    sim, est = assert_terms(config, plan, world)
    assert sim.peak_bytes == 7_879_160 and est.moment == "layer_end:1"
