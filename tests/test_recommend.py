"""recommend: exact boundaries, changes that really fit, the smallest GPU, the CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import memplan
from memplan.catalogue import list_gpus, load_gpu, load_model
from memplan.cli import main
from memplan.estimate import compute
from memplan.fit import check_fit
from memplan.plan import TrainPlan
from memplan.recommend import CHANGES, recommend
from memplan.search import MAX_SEQ_LEN
from memplan.units import GiB


def device(model: str, plan: TrainPlan, gpu: str) -> int:
    return compute(load_model(model), plan, load_gpu(gpu)).device_bytes


def fits(model: str, plan: TrainPlan, gpu: str, reserve: int = 0) -> bool:
    return device(model, plan, gpu) + reserve <= load_gpu(gpu).memory_bytes


# ---------------------------------------------------------------------------------------------
# exact boundaries on real models
# ---------------------------------------------------------------------------------------------
CASES = [
    pytest.param("llama-3-8b", "a10g", {}, id="llama3-8b-a10g"),
    pytest.param("llama-2-70b", "rtx-a6000", {}, id="llama2-70b-a6000"),
    pytest.param("qwen2.5-7b", "a100-80gb", dict(seq_len=4096), id="qwen-a100"),
    pytest.param("mistral-7b", "l4", dict(method="lora", optim="adamw_torch", seq_len=1024), id="mistral-lora"),
    pytest.param("phi-3-mini-4k", "rtx-4090", dict(gradient_checkpointing=False, batch_size=2), id="phi3-no-gc"),
    pytest.param("gemma-2-2b", "t4", dict(attn_implementation="eager", mixed_precision="fp16",
                                          compute_dtype="fp16", dtype="fp16"), id="gemma2-eager-t4"),
]


@pytest.mark.parametrize("model, gpu, kw", CASES)
def test_max_batch_and_seq_len_are_exact(model, gpu, kw):
    r = recommend(model, gpu, **kw)
    p = r.plan
    if r.max_batch_size:
        assert fits(model, p.replace(batch_size=r.max_batch_size), gpu)
    assert not fits(model, p.replace(batch_size=r.max_batch_size + 1), gpu)
    if r.max_seq_len:
        assert fits(model, p.replace(seq_len=r.max_seq_len), gpu)
    if not r.max_seq_len_capped:
        assert not fits(model, p.replace(seq_len=r.max_seq_len + 1), gpu)


@pytest.mark.parametrize("model, gpu, kw", CASES[:3])
def test_reserve_moves_the_boundary(model, gpu, kw):
    reserve = 2 * GiB
    r = recommend(model, gpu, reserve_bytes=reserve, **kw)
    p = r.plan
    if r.max_seq_len:
        assert fits(model, p.replace(seq_len=r.max_seq_len), gpu, reserve)
    assert not fits(model, p.replace(seq_len=r.max_seq_len + 1), gpu, reserve)
    assert r.max_seq_len <= recommend(model, gpu, **kw).max_seq_len
    f = check_fit(model, gpu, reserve_bytes=reserve, **kw)
    assert (r.fits, r.headroom_bytes) == (f.fits, f.headroom_bytes)


@pytest.mark.parametrize("model", ["llama-3-8b", "qwen2.5-7b", "gemma-2-9b", "phi-3-mini-4k", "llama-2-13b"])
@pytest.mark.parametrize("kw", [{}, dict(gradient_checkpointing=False), dict(method="lora", optim="adamw_torch")],
                         ids=["default", "no-gc", "lora"])
def test_device_bytes_is_monotone_in_batch_and_seq(model, kw):
    """The searches are exact because device_bytes never decreases as batch or sequence grows."""
    spec, gpu = load_model(model), load_gpu("a100-80gb")
    p = TrainPlan(**kw, attn_implementation="eager" if model.startswith("gemma-2") else "sdpa")
    seq = [compute(spec, p.replace(seq_len=s), gpu).device_bytes for s in [*range(1, 130), *range(130, 70000, 997)]]
    bat = [compute(spec, p.replace(batch_size=b), gpu).device_bytes for b in range(1, 70)]
    assert all(a <= b for a, b in zip(seq, seq[1:]))
    assert all(a <= b for a, b in zip(bat, bat[1:]))


def test_seq_len_beyond_max_position_embeddings_is_noted():
    r = recommend("llama-2-7b", "b200")  # 4096 positions, and a very large GPU
    assert r.max_seq_len > load_model("llama-2-7b").max_position_embeddings
    assert any("max_position_embeddings" in n for n in r.notes)


def test_tiny_model_on_a_huge_gpu_stops_at_the_cap():
    r = recommend("qwen2.5-0.5b", "b200", gradient_checkpointing=True)
    assert r.max_seq_len <= MAX_SEQ_LEN
    if r.max_seq_len_capped:
        assert any("stopped" in n for n in r.notes)


# ---------------------------------------------------------------------------------------------
# changes that make a plan fit
# ---------------------------------------------------------------------------------------------
NO_FIT = [
    pytest.param("llama-3-8b", "a10g", dict(gradient_checkpointing=False, batch_size=8, optim="adamw_torch"),
                 id="llama3-8b-no-gc-bs8"),
    pytest.param("llama-3.1-70b", "rtx-a6000", {}, id="llama3.1-70b-48gb"),
    pytest.param("mistral-7b", "l4", dict(method="lora", optim="adamw_torch", gradient_checkpointing=False),
                 id="mistral-lora"),
    pytest.param("llama-2-13b", "rtx-4090", dict(quant="int8", double_quant=False, lora_r=64, batch_size=4),
                 id="int8-r64"),
    pytest.param("llama-2-7b", "rtx-4090", dict(method="full"), id="full"),
]


@pytest.mark.parametrize("model, gpu, kw", NO_FIT)
def test_changes_really_fit_and_are_ranked(model, gpu, kw):
    r = recommend(model, gpu, **kw)
    assert not r.fits
    assert r.changes or r.combined, "a plan that does not fit gets at least one suggestion"
    order = [k for k, *_ in CHANGES]
    ranks = [order.index(c.key) for c in r.changes]
    assert ranks == sorted(ranks), "cheapest first"
    for c in r.changes:
        assert c.fits and c.headroom_bytes >= r.margin_bytes > 0, "suggestions keep the stated safety margin"
        assert not c.paging
        assert c.plan == r.plan.replace(**c.changes), "the change is exactly what it says"
        assert c.device_bytes == device(model, c.plan, gpu)
        assert fits(model, c.plan, gpu)
    for c in r.not_enough:
        assert not fits(model, c.plan, gpu) or c.paging or c.headroom_bytes < r.margin_bytes
    if r.combined is not None and r.combined.fits:
        assert fits(model, r.combined.plan, gpu)
        assert r.combined.plan == r.plan.replace(**r.combined.changes)


def test_checkpointing_is_the_cheapest_change_when_it_is_enough():
    r = recommend("llama-3-8b", "a100-40gb", gradient_checkpointing=False, batch_size=4)
    assert not r.fits
    assert r.changes[0].key == "gradient_checkpointing"


def test_gradient_accumulation_keeps_the_effective_batch():
    r = recommend("llama-3-8b", "a10g", batch_size=12, gradient_accumulation_steps=2)
    (c,) = [c for c in [*r.changes, *r.not_enough] if c.key == "gradient_accumulation"]
    assert c.plan.batch_size * c.plan.gradient_accumulation_steps == 24
    assert c.plan.batch_size < 12


def test_fewer_targets_uses_the_architecture_names():
    r = recommend("phi-3-mini-4k", "t4", batch_size=16, mixed_precision="fp16", compute_dtype="fp16", dtype="fp16")
    (c,) = [c for c in [*r.changes, *r.not_enough] if c.key == "target_modules"]
    assert c.plan.target_modules == ("qkv_proj",)


def test_a_plan_that_fits_gets_no_changes():
    r = recommend("llama-3.2-1b", "h200")
    assert r.fits and r.changes == () and r.combined is None
    assert r.max_batch_size >= 1


# ---------------------------------------------------------------------------------------------
# smallest GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, kw", [
    pytest.param("llama-3-8b", {}, id="llama3-8b"),
    pytest.param("llama-2-70b", {}, id="llama2-70b"),
    pytest.param("qwen2.5-14b", dict(seq_len=8192), id="qwen14b-8k"),
    pytest.param("llama-3.2-1b", dict(mixed_precision="fp16", compute_dtype="fp16", dtype="fp16"), id="fp16"),
])
def test_smallest_gpu_fits_and_every_smaller_one_does_not(model, kw):
    r = recommend(model, "a10g", **kw)
    assert r.smallest_gpu is not None
    names = [g.name for g in list_gpus()]  # smallest memory first
    i = names.index(r.smallest_gpu)
    assert fits(model, r.plan, r.smallest_gpu)
    for smaller in list_gpus()[:i]:
        f = next(g for g in r.gpus if g.name == smaller.name)
        assert not f.fits
        assert not fits(model, r.plan, smaller.name) or not f.supported
    if i:  # the next smaller one does not fit (or cannot run the plan)
        prev = list_gpus()[i - 1]
        assert not fits(model, r.plan, prev.name) or "bf16" in next(g for g in r.gpus if g.name == prev.name).reason


def test_smallest_gpu_skips_gpus_without_bf16_for_a_bf16_plan():
    r = recommend("llama-3.2-1b", "a10g")  # fits in 15 GiB, but T4 and V100 have no bf16
    assert r.smallest_gpu not in ("t4", "v100-16gb", "v100-32gb")
    t4 = next(g for g in r.gpus if g.name == "t4")
    assert not t4.supported and "bf16" in t4.reason


def test_no_gpu_fits():
    r = recommend("llama-3.1-405b", "t4", method="full", optim="adamw_torch")
    assert r.smallest_gpu is None


# ---------------------------------------------------------------------------------------------
# API and CLI
# ---------------------------------------------------------------------------------------------
def test_memplan_recommend_is_the_function_even_after_the_cli_imported_the_module(capsys):
    main(["recommend", "llama-3.2-1b", "--gpu", "h200", "--json"])
    capsys.readouterr()
    assert callable(memplan.recommend)
    assert memplan.recommend("llama-3.2-1b", "h200").fits


def test_recommend_is_stdlib_only():
    r = subprocess.run([sys.executable, "-c",
                        "import sys, memplan; memplan.recommend('llama-2-7b', 'a10g'); "
                        "bad=[m for m in ('pandas','matplotlib','numpy','torch') if m in sys.modules]; "
                        "assert not bad, bad"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_0_when_it_fits(capsys):
    code, out, err = run(capsys, "recommend", "llama-2-70b", "--gpu", "rtx-a6000")
    assert code == 0, err
    assert "largest micro-batch" in out and "longest seq len" in out and "reserve: 0.00 GiB" in out
    assert "smallest catalogue GPU" in out


def test_cli_exit_1_with_changes_when_it_does_not(capsys):
    code, out, err = run(capsys, "recommend", "llama-3-8b", "--gpu", "a10g", "--no-gradient-checkpointing",
                         "--batch-size", "8", "--optim", "adamw_torch")
    assert code == 1, err
    assert "DOES NOT FIT" in out and "cheapest first" in out and "--gradient-checkpointing" in out


def test_cli_json_equals_api(capsys):
    code, out, _ = run(capsys, "recommend", "llama-3.1-70b", "--gpu", "rtx-a6000", "--seq-len", "1024",
                       "--reserve", "1.5", "--json")
    api = recommend("llama-3.1-70b", "rtx-a6000", seq_len=1024, reserve_bytes=int(1.5 * GiB)).to_dict()
    d = json.loads(out)
    assert d == json.loads(json.dumps(api))
    assert d["schema"] == "memplan.recommend/1" and d["reserve_bytes"] == int(1.5 * GiB)
    assert code == (0 if d["fits"] else 1)


@pytest.mark.parametrize("argv, expect", [
    pytest.param(["recommend", "llama-2-7b"], ["--gpu"], id="needs-gpu"),
    pytest.param(["recommend", "llama-2-7b", "--gpu", "h2000"], ["unknown GPU", "h200"], id="unknown-gpu"),
    pytest.param(["recommend", "lama-2-7b", "--gpu", "a10g"], ["unknown model"], id="unknown-model"),
    pytest.param(["recommend", "llama-2-7b", "--gpu", "a10g", "--reserve", "-1"], ["--reserve"], id="negative-reserve"),
    pytest.param(["recommend", "llama-2-7b", "--gpu", "a10g", "--batch-size", "0"], ["--batch-size"], id="bad-plan"),
    pytest.param(["recommend", "llama-2-7b", "--gpu", "a10g", "--device", "cpu"], ["GPU run"], id="cpu"),
])
def test_cli_bad_input_exits_2(capsys, argv, expect):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("memplan: error:") and "Traceback" not in err + out
    for e in expect:
        assert e in err


# ---------------------------------------------------------------------------------------------
# models without a closed form: every estimate is a simulate trace, cached and budgeted
# ---------------------------------------------------------------------------------------------
DENSE = "llama-3.2-1b"


@pytest.fixture
def fake_simulate(monkeypatch, no_closed_form):
    """estimate()'s simulate fallback replaced by a dense stand-in (the closed form of llama-3.2-1b), counted:
    the logic of a mixture-of-experts recommendation, without torch and without seconds per trace."""
    import dataclasses

    est_mod = sys.modules["memplan.estimate"]  # `memplan.estimate` is the function
    dense = load_model(DENSE)
    calls = []

    def from_simulation(model, plan, gpu=None, reason=""):
        calls.append(plan)
        e = compute(dense, plan, gpu)
        return dataclasses.replace(e, model=model, moment="simulate", moments=(),
                                   notes=(f"closed form unavailable ({reason.split(';')[0]}): terms are an exact "
                                          "`memplan simulate` trace",))

    monkeypatch.setattr(est_mod, "from_simulation", from_simulation)
    monkeypatch.setattr(est_mod, "_sim_available", lambda: True)
    return calls


def test_moe_recommendation_spends_one_trace_by_default(fake_simulate):
    r = recommend("mixtral-8x7b", "a10g", seq_len=1024)
    assert len(fake_simulate) == 1
    assert r.max_batch_size is None and r.max_seq_len is None
    assert any("simulate" in n and "1 made" in n for n in r.notes)
    assert any("not searched" in n and "micro-batch" in n and "longest sequence" in n for n in r.notes)
    # the catalogue GPUs reuse the one trace with their own overheads: exactly what estimate() gives on each
    dense = recommend(DENSE, "a10g", seq_len=1024)
    assert [(g.name, g.device_bytes, g.fits) for g in r.gpus] == [(g.name, g.device_bytes, g.fits) for g in dense.gpus]
    assert r.smallest_gpu == dense.smallest_gpu and (r.fits, r.headroom_bytes) == (dense.fits, dense.headroom_bytes)
    d = r.to_dict()
    assert d["max_batch_size"]["value"] is None and d["max_seq_len"]["value"] is None
    json.dumps(d)


def test_moe_recommendation_with_a_budget_searches_exactly(fake_simulate):
    r = recommend("mixtral-8x7b", "a10g", seq_len=1024, simulate_budget=60)
    dense = recommend(DENSE, "a10g", seq_len=1024)
    assert (r.max_batch_size, r.max_seq_len) == (dense.max_batch_size, dense.max_seq_len)
    assert len(fake_simulate) <= 60 and len(fake_simulate) == len(set(fake_simulate)), "each plan traced once"
    assert not any("not searched" in n for n in r.notes)


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8])
def test_moe_recommendation_never_exceeds_its_budget(fake_simulate, budget):
    r = recommend("mixtral-8x7b", "a10g", seq_len=65536, simulate_budget=budget)  # does not fit
    assert not r.fits and len(fake_simulate) <= budget
    assert any("not searched" in n and "changes" in n for n in r.notes)
    for c in r.changes:  # whatever was checked is a true answer
        assert c.fits and c.device_bytes == device(DENSE, c.plan, "a10g")


def test_recommend_rejects_a_bad_budget():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(memplan.MemplanError, match="simulate_budget"):
            recommend(DENSE, "a10g", simulate_budget=bad)


def test_json_says_null_where_the_text_says_none():
    """Issue 14: a 'none' answer (nothing fits) showed as 0 in --json."""
    d = memplan.recommend("llama-3.1-70b", "t4").to_dict()
    assert d["max_batch_size"]["value"] is None and d["max_seq_len"]["value"] is None
    ok = memplan.recommend("llama-2-7b", "a100-80gb").to_dict()
    assert ok["max_batch_size"]["value"] >= 1 and ok["max_seq_len"]["value"] >= 1
