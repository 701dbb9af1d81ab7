"""Distributed plans in closed form (memplan/distributed.py, issue 12): the per-rank inventory equals the
single-device terms at one rank, sharding divides them (plus padding), SHARD_GRAD_OP keeps the layers
gathered after forward, DDP is the single-device step plus its buckets, offload moves bytes to the host,
and the CLI / JSON / config readers carry the fields."""

from __future__ import annotations

import json
from math import ceil

import pytest

import memplan
from memplan import formulas as F
from memplan.catalogue import load_gpu, load_model
from memplan.cli import main
from memplan.distributed import (GPU_COUNTS, Param, Unit, quant_storage_bytes, rank_moments, shard_group,
                                 units)
from memplan.errors import InvalidSpecError
from memplan.estimate import compute
from memplan.plan import TrainPlan
from memplan.terms import ALLOCATED_TERMS, SINGLE_DEVICE_TERMS, Term

MODELS = ["llama-2-7b", "qwen2.5-7b", "gemma-2-9b", "phi-3-mini-4k", "mixtral-8x7b"]
PLANS = {
    "qlora-bf16-storage": dict(bnb_4bit_quant_storage="bf16"),
    "lora": dict(method="lora", optim="adamw_torch"),
    "qlora-noprep": dict(prepare=False, bnb_4bit_quant_storage="bf16"),
}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_worked_example():
    """The module docstring's example, by hand: a [64, 64] fp32 weight, LoRA r=8."""
    w = Param(64, 64, 4, Term.BASE_WEIGHTS)
    a, b = Param(8, 64, 4, Term.ADAPTER_WEIGHTS, True), Param(64, 8, 4, Term.ADAPTER_WEIGHTS, True)
    u = Unit("layers.0", (w, a, b), layer=0)
    assert u.bytes(2, 1, 2) == {Term.BASE_WEIGHTS: 8192, Term.OTHER_PARAMS: 0, Term.ADAPTER_WEIGHTS: 2048}
    assert u.bytes(3, 1, 2)[Term.BASE_WEIGHTS] == 22 * 64 * 4 == 5632
    assert u.bytes(3, 1, 2, unsharded=True)[Term.BASE_WEIGHTS] == 3 * 5632 == 16896
    assert u.grads(2, 1, 2) == 2048 and u.grads(1, 1, 2) == 4096
    # FSDP1: one flat parameter per dtype, padded as a whole: (4096 + 512 + 512) / 3 -> 1707 elements
    assert u.bytes(3, 1, 1)[Term.ADAPTER_WEIGHTS] == ceil(1024 / 3) * 4


#: bytes per element of a decoder Linear's bias in an FSDP rank's shard: the stored dtype (fp32 after
#: prepare_model_for_kbit_training, else the bf16 load dtype); one GPU: bf16 (bnb's Linear4bit casts it in place)
FSDP_BIAS_EL = {"qlora-bf16-storage": 4, "lora": 2, "qlora-noprep": 2}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("model", MODELS)
def test_one_rank_inventory_is_the_single_device_terms(model, plan_name):
    """w = 1: the units hold exactly the base weights and adapters of the closed form, and the other
    parameters up to the replicated buffers (rotary inv_freq, embed_scale) and the biases' dtype: an FSDP
    rank's shard keeps the stored bias dtype, one GPU's bias is cast to bf16 by its first forward
    (bitsandbytes Linear4bit.forward on the module's own bias; under FSDP it runs on the gathered copy)."""
    spec = load_model(model)
    plan = TrainPlan(device="cpu", num_processes=1, strategy="fsdp", **PLANS[plan_name])
    single = plan.single_device()
    inv = {t: 0 for t in (Term.BASE_WEIGHTS, Term.OTHER_PARAMS, Term.ADAPTER_WEIGHTS)}
    for u in units(spec, plan):
        for t, v in u.bytes(1, 1, 2).items():
            inv[t] += v
    assert inv[Term.BASE_WEIGHTS] == F.base_weights_bytes(spec, single)
    assert inv[Term.ADAPTER_WEIGHTS] == F.adapter_weights_bytes(spec, single)
    single_other = sum(u.bytes(1, 1, 2)[Term.OTHER_PARAMS] for u in units(spec, plan, single=True))
    biases = spec.num_layers * sum(lin.out_features for lin in spec.layer_linears if lin.bias)
    assert (biases > 0) == (model == "qwen2.5-7b")  # q/k/v biases
    assert inv[Term.OTHER_PARAMS] - single_other == biases * (FSDP_BIAS_EL[plan_name] - 2)
    buffers = F.other_params_bytes(spec, single) - single_other
    assert 0 <= buffers <= 4 * spec.rope_dim * 4 + 4  # inv_freq buffers (+ embed_scale)
    assert sum(u.grads(1, 1, 2) for u in units(spec, plan)) == F.gradient_bytes(spec, single)


def test_quant_storage_auto_and_sharding_group():
    assert quant_storage_bytes(TrainPlan()) == 1
    assert quant_storage_bytes(TrainPlan(num_processes=2)) == 1  # ddp: uint8
    assert quant_storage_bytes(TrainPlan(num_processes=2, strategy="fsdp")) == 2
    assert quant_storage_bytes(TrainPlan(num_processes=2, strategy="fsdp", dtype="fp32")) == 4
    assert shard_group(TrainPlan(num_processes=8, num_machines=2, strategy="fsdp",
                                 fsdp_sharding_strategy="HYBRID_SHARD")) == 4
    assert shard_group(TrainPlan(num_processes=8, strategy="fsdp", fsdp_sharding_strategy="NO_SHARD")) == 1
    assert shard_group(TrainPlan(num_processes=8, strategy="deepspeed")) == 8


def _moment(model, plan, kind):
    single, world, per = rank_moments(load_model(model), plan)
    return single, next(t for m, t in per if m.kind == kind)


@pytest.mark.parametrize("w", [2, 3, 8])
def test_full_shard_base_weights_are_total_over_world_plus_padding(w):
    spec = load_model("llama-2-7b")
    plan = TrainPlan(num_processes=w, strategy="fsdp", bnb_4bit_quant_storage="bf16")
    single, t = _moment("llama-2-7b", plan, "optimizer")  # nothing gathered at the optimizer step
    total = single.moments[0].static[Term.BASE_WEIGHTS]
    rows = sum(1 for _ in spec.layer_linears) * spec.num_layers
    assert 0 <= w * t[Term.BASE_WEIGHTS] - total <= rows * w * 2 * (w - 1) + rows * 512 * w
    assert t[Term.QUANT_STATE] == single.moments[0].static[Term.QUANT_STATE]  # replicated
    # the optimizer state of the shards (on the CPU: no paged state; 8-bit state + absmax per 256, qmaps)
    single, t = _moment("llama-2-7b", plan.replace(device="cpu"), "optimizer")
    pad = ceil(16 / w) * w / 16  # lora_A [r=16, in] shards by rows: 3 ranks hold 6 rows each (2 rows of padding)
    assert t[Term.OPTIMIZER_STATE] <= single.moments[0].static[Term.OPTIMIZER_STATE] / w * pad * 1.02 + 4096


def test_shard_grad_op_keeps_the_layers_gathered_after_forward():
    """Gathered parameters are comm_buffers (the all-gather outputs), in the mixed-precision param dtype
    (bf16: 2 B per element whatever the stored dtype); the shards stay in their terms."""
    spec = load_model("llama-2-7b")
    full = TrainPlan(num_processes=4, strategy="fsdp", bnb_4bit_quant_storage="bf16")
    sgo = full.replace(fsdp_sharding_strategy="SHARD_GRAD_OP")
    _, world, per = rank_moments(spec, sgo)
    t_sgo = next(t for m, t in per if m.kind == "loss_forward")
    _, _, per_full = rank_moments(spec, full)
    t_full = next(t for m, t in per_full if m.kind == "loss_forward")
    gathered = [u for u in world.units if u.layer is not None or u.name == "embed_tokens"]
    assert t_sgo[Term.COMM_BUFFERS] - t_full[Term.COMM_BUFFERS] == sum(world.full(u) for u in gathered)
    assert t_sgo[Term.BASE_WEIGHTS] == t_full[Term.BASE_WEIGHTS]  # the shards
    layer = gathered[-1]
    lora = sum(p.numel for p in layer.params if p.trainable)
    assert world.full(layer) == 4 * sum(ceil(p.dim0 / 4) * p.rest * 2 for p in layer.params)  # bf16, padded
    assert lora and world.gather_el == 2
    t_opt = next(t for m, t in per if m.kind == "optimizer")
    assert t_opt[Term.COMM_BUFFERS] == 0  # resharded after backward


def test_full_shard_backward_holds_the_layer_and_the_prefetched_one():
    spec = load_model("llama-2-7b")
    plan = TrainPlan(num_processes=4, strategy="fsdp", bnb_4bit_quant_storage="bf16")
    single, world, per = rank_moments(spec, plan)
    by = {u.name: u for u in world.units}
    L = spec.num_layers
    t = next(t for m, t in per if m.kind == "recompute" and m.layer == L - 1)
    t_loss = next(t for m, t in per if m.kind == "loss_forward")
    # backward of the last layer: it gathered, the root (final norm) gathered, the layer below prefetched
    # (its flat all-gather output, not yet copied out); no reduce-scatter input kept yet
    assert t[Term.COMM_BUFFERS] == (world.full(by[f"layers.{L - 1}"]) + world.full(by["root"])
                                    + world.flat(by[f"layers.{L - 2}"]))
    # the loss: the tail (lm_head) and the root gathered, and the tail's flat output kept from the forward
    assert t_loss[Term.COMM_BUFFERS] == world.full(by["lm_head"]) + world.full(by["root"]) + world.flat(by["lm_head"])
    # the first layer: the embedding prefetched (its output needs a gradient), layer 1's reduce-scatter input
    # (its LoRA gradients, unsharded, bf16) kept
    t0 = next(t for m, t in per if m.kind == "recompute" and m.layer == 0)
    rs = F.rounded(4 * sum(ceil(p.dim0 / 4) * p.rest * 2 for p in by["layers.1"].params if p.trainable), 512)
    assert t0[Term.COMM_BUFFERS] == (world.full(by["layers.0"]) + world.full(by["root"])
                                     + world.flat(by["embed_tokens"]) + rs)


def test_ddp_is_the_single_step_plus_buckets():
    single = memplan.estimate("llama-2-7b", gpu="a100-80gb")
    ddp = memplan.estimate("llama-2-7b", gpu="a100-80gb", num_processes=4)
    assert ddp.plan.world_strategy == "ddp"
    grads = F.gradient_bytes(load_model("llama-2-7b"), single.plan, 1)
    assert 0 <= ddp.terms[Term.COMM_BUFFERS] - grads < 512 * 8
    for t in ALLOCATED_TERMS:
        if t != Term.COMM_BUFFERS:
            assert ddp.terms[t] == single.terms[t], t
    assert ddp.allocated_bytes == single.allocated_bytes + ddp.terms[Term.COMM_BUFFERS]
    assert len(ddp.ranks) == 4 and all(r.terms == ddp.terms for r in ddp.ranks)


def test_bucket_size_does_not_change_the_bucket_bytes_much():
    a = memplan.estimate("llama-2-7b", device="cpu", num_processes=2, ddp_bucket_cap_mb=25)
    b = memplan.estimate("llama-2-7b", device="cpu", num_processes=2, ddp_bucket_cap_mb=100)
    assert a.terms[Term.COMM_BUFFERS] == b.terms[Term.COMM_BUFFERS]  # CPU: no rounding, same bytes


@pytest.mark.parametrize("strategy", [dict(strategy="fsdp"), dict(strategy="fsdp", fsdp_version=1),
                                      dict(strategy="deepspeed", zero_stage=3)])
def test_monotone_in_world_size(strategy):
    peaks = [memplan.estimate("llama-3.1-70b", gpu="h100-80gb", num_processes=n, **strategy).device_bytes
             for n in (2, 4, 8, 16)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]


def test_offload_moves_state_to_the_host():
    kw = dict(gpu="rtx-4090", num_processes=2, strategy="fsdp")
    on = memplan.estimate("llama-3.1-70b", fsdp_offload_params=True, **kw)
    off = memplan.estimate("llama-3.1-70b", **kw)
    assert on.device_bytes < off.device_bytes
    assert on.terms[Term.OPTIMIZER_STATE] == 0 and on.terms[Term.ADAPTER_WEIGHTS] == 0
    assert on.host["base_weights"] == 2 * off.terms[Term.BASE_WEIGHTS]  # the node's two ranks' shards
    assert set(off.host) == {"loading"} and on.host_bytes > off.host_bytes
    zero = memplan.estimate("llama-3.1-70b", gpu="rtx-4090", num_processes=2, strategy="deepspeed",
                            offload_optimizer_device="cpu", offload_param_device="cpu")
    assert zero.host["optimizer_state"] > 0 and zero.terms[Term.OPTIMIZER_STATE] == 0


def test_loading_once_per_node_with_cpu_ram_efficient_loading():
    e = memplan.estimate("llama-2-7b", device="cpu", num_processes=4, strategy="fsdp")
    f = memplan.estimate("llama-2-7b", device="cpu", num_processes=4, strategy="fsdp",
                         fsdp_cpu_ram_efficient_loading=False)
    assert f.host["loading"] == 4 * e.host["loading"]


def test_single_gpu_json_keeps_its_shape_and_distributed_adds_ranks_and_host():
    d = memplan.estimate("llama-2-7b", gpu="a10g").to_dict()
    assert "ranks" not in d and "host" not in d and set(d["terms"]) == {t.value for t in SINGLE_DEVICE_TERMS}
    assert "num_processes" not in d["plan"]
    e = memplan.estimate("llama-2-7b", gpu="a10g", num_processes=2, strategy="fsdp")
    d = e.to_dict()
    assert d["terms"]["comm_buffers"] >= 0 and len(d["ranks"]) == 2 and d["plan"]["num_processes"] == 2
    assert d["ranks"][0]["peak"]["device_bytes"] == d["peak"]["device_bytes"] == e.device_bytes
    assert d["host"]["bytes"] == sum(d["host"]["terms"].values()) == e.host_bytes


def test_plan_problems_name_the_flags():
    with pytest.raises(InvalidSpecError) as ei:
        TrainPlan(num_processes=3, num_machines=2, strategy="zero9", zero_stage=1, fsdp_sharding_strategy="x",
                  offload_param_device="disk", bnb_4bit_quant_storage="int4")
    text = str(ei.value)
    for flag in ("--num-processes", "--strategy", "--zero-stage", "--fsdp-sharding-strategy", "--offload-param",
                 "--bnb-4bit-quant-storage"):
        assert flag in text, flag
    with pytest.raises(InvalidSpecError, match="--strategy single"):
        TrainPlan(num_processes=2, strategy="single")


def test_cli_fit_acceptance_command(capsys):
    argv = ("fit", "llama-3.1-70b", "--gpu", "rtx-4090", "--num-processes", "2", "--strategy", "fsdp",
            "--cpu-offload")
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "per rank: ranks 0-1:" in out and "host RAM:" in out and "not checked" in out
    code, out, _ = run(capsys, *argv, "--json")
    d = json.loads(out)
    assert d["plan"]["fsdp_offload_params"] is True and d["host_fits"] is None and len(d["ranks"]) == 2
    code, out, _ = run(capsys, *argv, "--host-ram", "16")
    assert code == 1 and "host RAM" in out and "DOES NOT FIT" in out
    code, _, err = run(capsys, "fit", "llama-3.1-70b", "--gpu", "rtx-4090", "--strategy", "fsdpx")
    assert code == 2 and err.startswith("memplan: error:")


def test_recommend_acceptance_command(capsys):
    code, out, _ = run(capsys, "recommend", "qwen2.5-72b", "--gpu", "l40s", "--seq-len", "4096", "--json")
    d = json.loads(out)
    assert code == 1 and d["multi_gpu"]
    best = d["multi_gpu"][0]
    assert best["num_processes"] in GPU_COUNTS and best["max_batch_size"] >= 1 and best["host_bytes"] > 0
    # the fewest GPUs first; at that count no cheaper strategy fits
    counts = [o["num_processes"] for o in d["multi_gpu"] if o["num_processes"]]
    assert counts == sorted(counts) and best["num_processes"] == min(counts)
    plan = dict(TrainPlan(seq_len=4096).to_dict())
    flags = best["flags"].split()
    strategy = flags[flags.index("--strategy") + 1]
    assert strategy == "fsdp"
    fewer = memplan.estimate("qwen2.5-72b", gpu="l40s", seq_len=4096, num_processes=best["num_processes"] - 1,
                             strategy="fsdp", fsdp_offload_params=True)
    assert best["num_processes"] == 2 or not fewer.fits
    assert plan["seq_len"] == 4096


def test_cli_table_shows_ranks_and_host(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--gpu", "a10g", "--num-processes", "2", "--strategy",
                       "deepspeed", "--zero-stage", "3", "--offload-optimizer", "cpu")
    assert code == 0 and "comm_buffers" in out and "per rank:" in out and "optimizer_state" in out
    assert "2 processes, ZeRO-3, offload optimizer" in out


# -- config files ---------------------------------------------------------------------------------------
def test_accelerate_yaml(tmp_path):
    from memplan.integrations.configs import read_config

    p = tmp_path / "fsdp.yaml"
    p.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\nnum_processes: 8\n"
                 "mixed_precision: bf16\nfsdp_config:\n  fsdp_version: 2\n  fsdp_offload_params: true\n"
                 "  fsdp_reshard_after_forward: false\n  fsdp_cpu_ram_efficient_loading: true\n")
    r = read_config(p)
    assert r.kind == "accelerate" and r.model is None
    assert r.plan_fields == {"num_processes": 8, "num_machines": 1, "strategy": "fsdp", "fsdp_version": 2,
                             "fsdp_offload_params": True, "fsdp_sharding_strategy": "SHARD_GRAD_OP",
                             "fsdp_cpu_ram_efficient_loading": True, "mixed_precision": "bf16"}
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                    "reduce_bucket_size": 5e8}, "bf16": {"enabled": True}}))
    p2 = tmp_path / "ds.yaml"
    p2.write_text("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n"
                  "  deepspeed_config_file: ds.json\n")
    r = read_config(p2)
    assert r.plan_fields["strategy"] == "deepspeed" and r.plan_fields["zero_stage"] == 3
    assert r.plan_fields["offload_optimizer_device"] == "cpu" and r.plan_fields["num_processes"] == 4
    assert r.plan_fields["zero_reduce_bucket_size"] == 500_000_000  # the plan field (JSON 5e8 is a float)
    e = memplan.estimate("llama-2-7b", config=p2, gpu="a10g")
    assert e.plan.world_strategy == "deepspeed" and len(e.ranks) == 4


def test_deepspeed_json_and_training_args(tmp_path):
    from memplan.integrations.configs import read_config

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto",
                             "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}))
    r = read_config(p)
    assert r.kind == "deepspeed" and r.plan_fields == {"strategy": "deepspeed", "zero_stage": 2,
                                                       "offload_optimizer_device": "cpu", "batch_size": 2}
    ta = tmp_path / "ta.json"
    ta.write_text(json.dumps({"output_dir": "o", "per_device_train_batch_size": 1, "bf16": True,
                              "fsdp": "shard_grad_op offload auto_wrap", "fsdp_config": {"fsdp_version": 1,
                              "backward_prefetch": "backward_post", "use_orig_params": True},
                              "ddp_bucket_cap_mb": 50}))
    r = read_config(ta)
    f = r.plan_fields
    assert (f["strategy"], f["fsdp_sharding_strategy"], f["fsdp_offload_params"], f["fsdp_version"]) == (
        "fsdp", "SHARD_GRAD_OP", True, 1)
    assert f["fsdp_backward_prefetch"] == "BACKWARD_POST" and f["fsdp_use_orig_params"] is True
    assert f["ddp_bucket_cap_mb"] == 50 and any("--num-processes" in n for n in r.notes)
    ta.write_text(json.dumps({"output_dir": "o", "deepspeed": str(p), "bf16": True}))
    f = read_config(ta).plan_fields
    assert f["strategy"] == "deepspeed" and f["zero_stage"] == 2 and f["mixed_precision"] == "bf16"


def test_training_arguments_object():
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from memplan.plan import plan_from

    args = TrainingArguments(output_dir="/tmp/memplan-ta", report_to=[], fsdp=True,
                             fsdp_config={"version": 2, "reshard_after_forward": False, "cpu_offload": True})
    p = plan_from(training_args=args, num_processes=4)
    assert (p.world_strategy, p.fsdp_sharding_strategy, p.fsdp_offload_params) == ("fsdp", "SHARD_GRAD_OP", True)
    plain = plan_from(training_args=TrainingArguments(output_dir="/tmp/memplan-ta", report_to=[]))
    assert not plain.is_distributed and "num_processes" not in plain.to_dict()


def test_cpu_step_estimate_terms_sum():
    e = compute(load_model("llama-2-7b"), TrainPlan(device="cpu", num_processes=2, strategy="fsdp",
                                                     gradient_accumulation_steps=2), load_gpu("a10g"))
    assert e.allocated_bytes == sum(e.terms[t] for t in ALLOCATED_TERMS)
    assert max(e.phase_peaks.values()) == e.allocated_bytes


def test_root_forward_frees_the_last_all_gather_and_fp32_gathers_in_place():
    """FSDP2 keeps the tail's flat all-gather output through the loss forward (inside the root's forward)
    and frees it when the root's forward returns (FSDPState._post_forward): the loss backward has the
    tail gathered but not its flat buffer. Without mixed precision the gathered dtype is the stored one."""
    spec = load_model("llama-2-7b")
    plan = TrainPlan(device="cpu", num_processes=2, strategy="fsdp", bnb_4bit_quant_storage="bf16")
    _, world, per = rank_moments(spec, plan)
    by = {u.name: u for u in world.units}
    fwd = next(t for m, t in per if m.kind == "loss_forward")
    bwd = next(t for m, t in per if m.kind == "loss_backward")
    assert fwd[Term.COMM_BUFFERS] - bwd[Term.COMM_BUFFERS] == world.flat(by["lm_head"]) > 0
    _, w32, _ = rank_moments(spec, plan.replace(mixed_precision="no", compute_dtype="fp32"))
    lm = {u.name: u for u in w32.units}["lm_head"]
    assert w32.gather_el == 0 and w32.full(lm) == spec.vocab_size * spec.hidden_size * 4  # fp32 after prepare
    assert world.full(by["lm_head"]) == spec.vocab_size * spec.hidden_size * 2  # bf16 param_dtype


@pytest.mark.parametrize("command, hint", [("simulate", "memplan estimate"), ("profile", "--device cpu")])
def test_simulate_and_profile_refuse_what_they_cannot_run(capsys, command, hint):
    """simulate traces FSDP2 and DDP ranks (tests/test_distributed_sim.py) and profile launches gloo ranks
    on the CPU (tests/test_distributed_real.py); a ZeRO-3 plan on CUDA is refused in one line naming what
    to run instead."""
    pytest.importorskip("torch")
    code, _, err = run(capsys, command, "llama-3.2-1b", "--num-processes", "2", "--strategy", "deepspeed")
    assert code == 2 and hint in err and len(err.strip().splitlines()) == 1, err


def test_the_readme_several_gpus_figures():
    """README's "Several GPUs" figures, at the two decimals it prints: Qwen2.5-72B at seq 4096 on L40S
    (recommend's multi_gpu), Llama-3.1-70B on 2 RTX 4090 with FSDP FULL_SHARD and CPU offload."""
    from memplan.present import gib

    rows = {r["strategy"]: r for r in memplan.recommend("qwen2.5-72b", "l40s", seq_len=4096).to_dict()["multi_gpu"]}
    fs, off = rows["fsdp FULL_SHARD"], rows["fsdp FULL_SHARD + cpu offload"]
    assert (fs["num_processes"], gib(fs["device_bytes"]), fs["max_batch_size"], gib(fs["host_bytes"])) == \
        (2, "39.70", 1, "38.38")
    assert (gib(off["device_bytes"]), off["max_batch_size"], gib(off["host_bytes"])) == ("17.58", 3, "82.33")
    e = memplan.estimate("llama-3.1-70b", gpu="rtx-4090", num_processes=2, strategy="fsdp", fsdp_offload_params=True)
    assert (gib(e.device_bytes), gib(e.host_bytes), gib(e.host["loading"])) == ("10.67", "78.45", "36.80")
