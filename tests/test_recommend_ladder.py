"""recommend's several-GPU ladder (memplan/distributed.py LADDER / fewest_gpus): DeepSpeed ZeRO-2, ZeRO-3
and its two offloads beside DDP and FSDP; every printed flag string reads back through `memplan fit` to
the same figures; the pruned search equals the full scan; the tie rule between FSDP and ZeRO."""

from __future__ import annotations

import json

import pytest

import memplan
from memplan.catalogue import load_gpu, load_model
from memplan.cli import main
from memplan.distributed import (GPU_COUNTS, LADDER, LADDER_COST, MultiGPUOption, fewest_gpus, padding_slack,
                                 world_fields)
from memplan.fit import Fit
from memplan.headroom import fit_limit_bytes
from memplan.plan import TrainPlan
from memplan.present import gib
from memplan.recommend import Estimator

QWEN = ("qwen2.5-72b", "--gpu", "l40s", "--seq-len", "4096")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_ladder_has_zero_and_is_ordered_by_cost():
    names = [n for n, _ in LADDER]
    assert names == ["ddp", "deepspeed ZeRO-2", "fsdp SHARD_GRAD_OP", "fsdp FULL_SHARD", "deepspeed ZeRO-3",
                     "deepspeed ZeRO-3 + offload optimizer", "fsdp FULL_SHARD + cpu offload",
                     "deepspeed ZeRO-3 + offload optimizer + params"]
    tiers = [LADDER_COST[n][0] for n in names]
    assert tiers == sorted(tiers) and set(LADDER_COST) == set(names)
    # FSDP and ZeRO of the same traffic share a tier: the tie rule decides between them
    assert LADDER_COST["fsdp FULL_SHARD"][0] == LADDER_COST["deepspeed ZeRO-3"][0]
    assert LADDER_COST["fsdp FULL_SHARD + cpu offload"][0] == \
        LADDER_COST["deepspeed ZeRO-3 + offload optimizer + params"][0]


def test_every_printed_flag_string_reads_back_through_fit(capsys):
    """The table's flag lines, run back through `memplan fit`, give the row's per-GPU and host figures."""
    code, text, _ = run(capsys, "recommend", *QWEN)
    assert code == 1
    code, out, _ = run(capsys, "recommend", *QWEN, "--json")
    rows = json.loads(out)["multi_gpu"]
    printed = [ln.strip() for ln in text.splitlines() if ln.startswith("      --num-processes")]
    fitting = [r for r in rows if r["num_processes"]]
    assert printed == [r["flags"] for r in fitting] and len(printed) == 5
    assert {r["strategy"] for r in fitting} >= {"deepspeed ZeRO-3", "deepspeed ZeRO-3 + offload optimizer",
                                                "deepspeed ZeRO-3 + offload optimizer + params"}
    for r, flags in zip(fitting, printed):
        code, out, err = run(capsys, "fit", *QWEN, *flags.split(), "--json")
        d = json.loads(out)
        assert code == 0 and d["fits"], (flags, err)
        assert (d["peak"]["device_bytes"], d["host"]["bytes"]) == (r["device_bytes"], r["host_bytes"]), flags
        assert len(d["ranks"]) == r["num_processes"]
    # the ZeRO rows (the closed form checked on real ZeRO ranks by test_distributed_deepspeed): per GPU / host RAM per node, GiB
    by = {r["strategy"]: r for r in rows}
    assert [(gib(by[s]["device_bytes"]), gib(by[s]["host_bytes"]), by[s]["max_batch_size"]) for s in
            ("deepspeed ZeRO-3", "deepspeed ZeRO-3 + offload optimizer",
             "deepspeed ZeRO-3 + offload optimizer + params")] == \
        [("36.56", "76.76", 1), ("35.95", "80.29", 1), ("16.52", "118.02", 3)]
    assert by["deepspeed ZeRO-2"]["num_processes"] is None  # the 4-bit weights are whole on every rank
    assert "--zero-stage 3 --offload-optimizer cpu --offload-param cpu" in text and "cost: " in text


def test_fsdp_and_zero_tie_at_two_l40s():
    """2 L40S: FULL_SHARD and ZeRO-3 (same tier) both fit with micro-batch 1; FULL_SHARD loads the model
    once per node (cpu_ram_efficient_loading), ZeRO-3 once per rank: the smaller host RAM goes first."""
    rows = memplan.recommend("qwen2.5-72b", "l40s", seq_len=4096).multi_gpu
    assert [o.strategy for o in rows[:2]] == ["fsdp FULL_SHARD", "deepspeed ZeRO-3"]
    fs, z3 = rows[0], rows[1]
    assert fs.num_processes == z3.num_processes == 2 and fs.max_batch_size == z3.max_batch_size == 1
    assert fs.host_bytes < z3.host_bytes and z3.device_bytes < fs.device_bytes


def _fake(fit_at: dict[str, int], batch: dict[str, int], host: dict[str, int]):
    """Callables for fewest_gpus that fit strategy s from fit_at[s] GPUs on."""
    def name(p: TrainPlan) -> str:
        return next(n for n, f in LADDER if p == TrainPlan().replace(**world_fields(p.num_processes, f)))

    return (lambda p: 10, lambda p: p.num_processes >= fit_at.get(name(p), 99), lambda p: host.get(name(p), 0),
            lambda p: batch.get(name(p), 1))


@pytest.mark.parametrize("batch,host,first", [
    ({"fsdp FULL_SHARD": 1, "deepspeed ZeRO-3": 2}, {}, "deepspeed ZeRO-3"),   # the larger micro-batch
    ({}, {"fsdp FULL_SHARD": 5, "deepspeed ZeRO-3": 4}, "deepspeed ZeRO-3"),   # then the smaller host RAM
    ({}, {}, "fsdp FULL_SHARD"),                                                # then FSDP
])
def test_tie_rule(batch, host, first):
    fit_at = {"fsdp FULL_SHARD": 4, "deepspeed ZeRO-3": 4, "deepspeed ZeRO-3 + offload optimizer": 4,
              "fsdp FULL_SHARD + cpu offload": 3}
    dev, fits, host_of, max_batch = _fake(fit_at, batch, host)
    out = fewest_gpus(dev, fits, TrainPlan(), host_of, max_batch=max_batch)
    got = [(o.strategy, o.num_processes) for o in out if o.num_processes]
    # the fewest GPUs first (offload at 3), then at 4 the tier: ZeRO-3 + offload optimizer (tier 4) after both
    assert got[0] == ("fsdp FULL_SHARD + cpu offload", 3)
    assert got[1][0] == first and got[3] == ("deepspeed ZeRO-3 + offload optimizer", 4)
    assert [o.strategy for o in out if not o.num_processes] == [n for n, _ in LADDER if n not in fit_at]


@pytest.mark.parametrize("model,gpu,kw", [
    ("qwen2.5-72b", "l40s", dict(seq_len=4096)),
    ("gpt-oss-20b", "l4", dict(prepare=False)),
    ("llama-3.1-70b", "rtx-4090", {}),
    ("llama-3.1-8b", "t4", dict(mixed_precision="fp16", seq_len=8192)),
])
def test_pruned_search_equals_the_full_scan(model, gpu, kw):
    """`hopeless` (the largest count, less padding_slack) skips only strategies no count fits."""
    spec, g = load_model(model), load_gpu(gpu)
    est = Estimator(spec, g)
    plan = TrainPlan(**kw)
    limit = fit_limit_bytes(g.memory_bytes, 0)
    hopeless_calls = []

    def hopeless(q):
        hopeless_calls.append(q)
        return est(q).device_bytes - 2 * padding_slack(spec, est(q).plan) > limit

    args = (lambda q: est(q).device_bytes, lambda q: Fit.of(est(q)).fits, plan, lambda q: est(q).host_bytes)
    pruned = fewest_gpus(*args, hopeless=hopeless)
    full = fewest_gpus(*args)
    assert pruned == full
    assert all(isinstance(o, MultiGPUOption) for o in full)
    assert hopeless_calls  # the fewest did not fit for at least one strategy: the probe ran
    for o in full:  # and the full scan agrees: no count below the one found fits
        if o.num_processes:
            f = dict(LADDER)[o.strategy]
            assert all(not Fit.of(est(plan.replace(**world_fields(n, f)))).fits
                       for n in GPU_COUNTS if n < o.num_processes)


def test_padding_slack():
    spec = load_model("llama-3.1-70b")
    assert padding_slack(spec, TrainPlan(num_processes=8, strategy="ddp")) == 0
    fsdp = padding_slack(spec, TrainPlan(num_processes=64, strategy="fsdp"))
    zero = padding_slack(spec, TrainPlan(num_processes=64, strategy="deepspeed"))
    # FSDP2 pads lora_A [16, 8192] to 64 rows (48 rows of 8192 elements) in every one of 80 x 7 adapted
    # Linears; ZeRO pads each flat partition by under 64 elements
    assert fsdp > 80 * 7 * 48 * 8192 * 4 > zero > 0
