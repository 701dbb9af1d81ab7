"""Issue 12: the per-rank closed form (memplan.distributed) against simulate's per-rank trace
(memplan.simulate.distributed: the real FSDP2 engine on meta under torch's fake process group) for 2, 4
and 8 ranks on real catalogue shapes (7B, 70B; cut to 2 decoder layers: every layer is alike), FULL_SHARD
with checkpointing and SHARD_GRAD_OP without, CUDA plans. Limit: 2 KiB per rank on the peak (README: 16 KiB; issue 12
asks 1 %; measured: FULL_SHARD 0 B, SHARD_GRAD_OP -2,048 B on every model and world size), every static term to the
byte (qwen2's q/k/v biases keep prepare's fp32 in the shard: `distributed.bias_el`; -9,216 B on 2 ranks before).

CPU plans differ on 2 ranks of a 70B (the estimate 1.2-1.6 % low): gloo copies a collective's output in
its own buffer while it runs, which NCCL on a GPU does not do in torch's allocator; the estimate models
the GPU run, the real CPU ranks (tests/test_distributed_real.py) count gloo's copies."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan import estimate  # noqa: E402
from memplan.catalogue import resolve_model  # noqa: E402
from memplan.distributed import rank_moments  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.distributed import World  # noqa: E402
from memplan.simulate.distributed import simulate_rank  # noqa: E402
from memplan.terms import ALLOCATED_TERMS, Term  # noqa: E402

CASES = [(m, n, sharding) for m in ("llama-3-8b", "qwen2.5-7b", "llama-3.1-70b") for n in (2, 4, 8)
         for sharding in ("FULL_SHARD", "SHARD_GRAD_OP")]


@pytest.mark.parametrize("model, n, sharding", CASES, ids=[f"{m}-{n}-{s}" for m, n, s in CASES])
def test_estimate_matches_simulate_per_rank(model, n, sharding):
    cfg = dict(resolve_model(model).config, num_hidden_layers=2)
    plan = TrainPlan(seq_len=1024, device="cuda", num_processes=n, strategy="fsdp", fsdp_sharding_strategy=sharding,
                     gradient_checkpointing=sharding == "FULL_SHARD")
    sim = simulate_rank(cfg, plan, World.from_plan(plan), rank=0)
    est = estimate(cfg, plan)
    assert len(est.ranks) == n
    r0 = est.ranks[0]
    allocated = r0.allocated_bytes - r0.terms.get(Term.WORKSPACE, 0)  # simulate has no cuBLAS workspace
    # measured: 0 B (FULL_SHARD) / -2,048 B (SHARD_GRAD_OP); README: within 16 KiB per rank (issue 12's limit is 1 %)
    assert abs(allocated - sim.peak_bytes) <= 2048, (allocated, sim.peak_bytes)
    assert r0.peak_phase == sim.peak_phase
    for term in ("base_weights", "quant_state", "other_params", "adapter_weights", "optimizer_state"):
        assert r0.terms[Term(term)] == sim.terms[term], (term, r0.terms[Term(term)], sim.terms[term])
    # every phase's peak (measured: within 2,048 B; before FSDP2's lm_head-output moment `forward:lm_head`,
    # the forward phase read -3 % to -4 %: its peak is lm_head's 16-bit output with the tail gathered; before
    # the embedding's backward copy-out `backward:gather_embed`, the 70B's FULL_SHARD backward phase read
    # -506,777,600 / -501,600,256 / -499,011,584 B on 2 / 4 / 8 ranks: its peak is the prefetched embedding's
    # flat all-gather output and its unsharded parameters, 2 x 2.1 GB, after layer 0's backward; now 0 B)
    _, _, per = rank_moments(resolve_model(cfg), est.plan)
    phases: dict[str, int] = {}
    for m, t in per:
        phases[m.phase] = max(phases.get(m.phase, 0), sum(t.get(k, 0) for k in ALLOCATED_TERMS))
    for phase, peak in sim.phase_peaks.items():
        assert abs(phases[phase] - peak) <= 2048, (phase, phases[phase], peak)


def test_simulate_command_traces_a_rank_beside_the_estimate(tmp_path, capsys):
    """`memplan simulate --num-processes 2 --strategy fsdp`: rank 0's trace, the per-rank estimate beside it
    (tiny llama as in tests/test_distributed_real.py: its real ranks peak at 6,822,496 B)."""
    import json

    from memplan.cli import main

    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
               max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code = main(["simulate", str(tmp_path / "config.json"), "--device", "cpu", "--batch-size", "2", "--seq-len", "64",
                 "--num-processes", "2", "--strategy", "fsdp", "--optim", "adamw_torch", "--lora-dropout", "0",
                 "--no-gradient-checkpointing", "--json", "--quiet"])
    assert code == 0
    d = json.loads(capsys.readouterr().out)
    assert d["peak"]["allocated_bytes"] == 6_822_496 and d["peak"]["phase"] == "loss"
    assert d["ranks"][0]["terms"]["comm_buffers"] > 0
    assert abs(d["estimate"]["error_pct"]) <= 1.0


def test_readme_70b_eight_rank_trace_is_the_benchmarks_command():
    """README's benchmark claim, at its limits: `memplan simulate llama-3.1-70b --seq-len 4096 --num-processes 8
    --strategy fsdp --json` (benchmarks/bench_distributed_simulate.py's command, as a child process) traces a
    rank in under a minute (issue 12's limit; measured 21.8-31.6 s wall) and under 1 GiB of RSS (0.65 GiB), its
    peak 20.12 GiB against the estimate's 20.14 GiB (+0.078 %)."""
    import json
    import subprocess
    import sys
    import time

    # a wrapper process of its own, so that RUSAGE_CHILDREN is this command's alone (not earlier tests' children)
    wrap = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=False); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrap, sys.executable, "-m", "memplan", "simulate", "llama-3.1-70b",
                        "--seq-len", "4096", "--num-processes", "8", "--strategy", "fsdp", "--json"],
                       capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    d = json.loads(p.stdout)
    rss = int(p.stderr.strip().splitlines()[-1])
    assert wall < 60 and rss < 1 << 30, (wall, rss)
    GiB = 1 << 30
    assert (f"{d['peak']['allocated_bytes'] / GiB:.2f}", f"{d['estimate']['allocated_bytes'] / GiB:.2f}",
            f"{d['estimate']['error_pct']:+.3f}") == ("20.12", "20.14", "+0.078")
