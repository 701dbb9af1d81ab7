"""The command line: exit codes, --json equals the API, one-line errors, never a traceback."""

from __future__ import annotations

import json

import pytest

import memplan
from memplan.cli import main
from memplan.terms import SINGLE_DEVICE_TERMS  # a single-GPU table has no comm_buffers row


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_exit_0_when_it_fits(capsys):
    code, out, err = run(capsys, "fit", "llama-3.2-1b", "--gpu", "h200")
    assert code == 0, err
    assert "fits" in out and "headroom" in out


def test_fit_exit_1_when_it_does_not(capsys):
    code, out, err = run(capsys, "fit", "llama-3.1-405b", "--gpu", "t4")
    assert code == 1, err
    assert "DOES NOT FIT" in out


@pytest.mark.parametrize("argv, expect", [
    pytest.param(["fit", "lama-2-7b", "--gpu", "a10g"], ["unknown model", "did you mean", "llama-2-7b"],
                 id="unknown-model"),
    pytest.param(["estimate", "llama-2-7b", "--gpu", "h2000"], ["unknown GPU", "did you mean", "h200"],
                 id="unknown-gpu"),
    pytest.param(["estimate", "llama-2-7b", "--batch-size", "0", "--lora-dropout", "1.5"],
                 ["2 problems", "--batch-size", "--lora-dropout"], id="two-problems-at-once"),
    pytest.param(["estimate", "llama-2-7b", "--method", "lora", "--quant", "nf4"], ["--method qlora"],
                 id="lora-with-quant"),
    pytest.param(["estimate", "llama-2-7b", "--seq-len", "abc"], ["--seq-len"], id="argparse-type"),
    pytest.param(["estimate", "llama-2-7b", "--method", "dpo"], ["--method"], id="argparse-choice"),
    pytest.param(["fit", "llama-2-7b"], ["--gpu"], id="fit-needs-gpu"),
    pytest.param(["estimate", "llama-2-7b", "--optim", "adamw_8bitt"], ["did you mean"], id="unknown-optim"),
    pytest.param([], ["give a command"], id="no-command"),
])
def test_bad_input_exits_2_with_one_error_line(capsys, argv, expect):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("memplan: error:"), err
    assert "Traceback" not in err + out
    assert err.count("memplan: error:") == 1
    for e in expect:
        assert e in err


def test_invalid_plan_lists_every_problem_once(capsys):
    code, _, err = run(capsys, "estimate", "llama-2-7b", "--batch-size", "0", "--lora-dropout", "1.5")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("memplan: error:")
    assert len(lines) == 3  # the heading and one line per problem


@pytest.mark.parametrize("argv, kwargs", [
    pytest.param(["estimate", "llama-2-7b"], {}, id="defaults"),
    pytest.param(["estimate", "llama-3-8b", "--gpu", "a100-80gb", "--seq-len", "4096"],
                 dict(gpu="a100-80gb", seq_len=4096), id="gpu-seq"),
    pytest.param(["estimate", "mistral-7b", "--method", "lora", "--optim", "adamw_torch", "--no-gradient-checkpointing",
                  "--batch-size", "2", "--seq-len", "512"],
                 dict(method="lora", optim="adamw_torch", gradient_checkpointing=False, batch_size=2, seq_len=512),
                 id="lora-no-gc"),
    pytest.param(["estimate", "llama-2-7b", "--no-double-quant", "--no-prepare", "--lora-r", "64",
                  "--target-modules", "q_proj,v_proj", "--device", "cpu"],
                 dict(double_quant=False, prepare=False, lora_r=64, target_modules="q_proj,v_proj", device="cpu"),
                 id="flags"),
])
def test_estimate_json_equals_api(capsys, argv, kwargs):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    d = json.loads(out)
    e = memplan.estimate(argv[1], **kwargs)
    want = e.to_dict()
    want["plan"] = memplan.present.plan_dict(e.plan)  # double_quant: null when nothing is 4-bit
    if e.gpu is not None:  # the verdict is fit's (one rule, memplan.fit.Fit), the rest the estimate's
        f = memplan.fit.Fit.of(e).to_dict()
        want.update({k: f[k] for k in ("fits", "verdict", "verdict_text", "blocked", "fix", "paging", "notes")})
        assert d["verdict"] == "fits"
    assert d == json.loads(json.dumps(want))


def test_unset_flags_keep_plan_defaults(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--json")
    assert code == 0
    assert json.loads(out)["plan"] == memplan.TrainPlan().to_dict()


def test_fit_json_equals_api(capsys):
    code, out, _ = run(capsys, "fit", "llama-2-7b", "--gpu", "a10g", "--reserve", "2", "--json")
    assert code == 0
    d = json.loads(out)
    assert d == json.loads(json.dumps(memplan.check_fit("llama-2-7b", "a10g", reserve_bytes=2 * 2**30).to_dict()))
    assert d["schema"] == "memplan.estimate/1" and d["reserve_bytes"] == 2 * 2**30
    assert d["headroom_bytes"] == d["gpu"]["memory_bytes"] - d["peak"]["device_bytes"] - 2 * 2**30


def test_estimate_table_shows_terms_and_plan(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--gpu", "a10g")
    assert code == 0
    for word in [str(t) for t in SINGLE_DEVICE_TERMS] + ["peak phase", "allocated", "reserved", "device", "headroom",
                                                 "paged_adamw_8bit", "seq 2048", "notes:"]:
        assert word in out


def test_models_json(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    models = json.loads(out)["models"]
    assert len(models) >= 25
    assert {"name", "hub_id", "params", "architecture"} <= set(models[0])


def test_gpus_json(capsys):
    code, out, _ = run(capsys, "gpus", "--json")
    assert code == 0
    gpus = json.loads(out)["gpus"]
    assert len(gpus) >= 15
    assert all(g["memory_bytes"] > 0 for g in gpus)


def test_help_documents_every_plan_flag(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for cmd in ("estimate", "fit", "simulate", "models", "gpus"):
        assert cmd in top
    assert main(["estimate", "--help"]) == 0
    out = capsys.readouterr().out
    flags = ["--method", "--quant", "--double-quant", "--no-double-quant", "--compute-dtype", "--dtype",
             "--no-prepare", "--prepare", "--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules",
             "--batch-size", "--seq-len", "--gradient-accumulation-steps", "--gradient-checkpointing",
             "--no-gradient-checkpointing", "--optim", "--attn-implementation", "--mixed-precision", "--device",
             "--gpu", "--json"]
    for f in flags:
        assert f in out, f


def test_simulate_without_extras_is_one_line(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "memplan.simulate", None)  # import fails as if torch were missing
    code, out, err = run(capsys, "simulate", "llama-3.2-1b")
    assert code == 2
    assert err.strip() == ("memplan: error: simulate needs torch, transformers, peft and bitsandbytes: "
                           "pip install 'memplan[sim]'")


@pytest.mark.parametrize("argv", [
    pytest.param(["fit", "llama-2-7b", "--gpu", "a10g"], id="fit"),
    pytest.param(["recommend", "llama-2-7b", "--gpu", "a10g"], id="recommend"),
    pytest.param(["report", "--models", "llama-3.2-1b", "--gpus", "a10g", "--no-progress", "--out", "{tmp}"],
                 id="report"),
])
@pytest.mark.parametrize("reserve", ["-1", "inf", "nan", "-0.5"])
def test_bad_reserve_is_one_error_line_everywhere(capsys, tmp_path, argv, reserve):
    argv = [a.replace("{tmp}", str(tmp_path / "r")) for a in argv]
    code, out, err = run(capsys, *argv, "--reserve", reserve)
    assert code == 2 and "Traceback" not in out + err
    assert err.strip().splitlines() == [f"memplan: error: --reserve must be a finite number of GiB >= 0, got "
                                        f"{float(reserve)}"]


def test_fit_table_uses_the_shared_formats(capsys):
    from memplan.present import gib, plan_lines

    code, out, _ = run(capsys, "fit", "llama-2-7b", "--gpu", "a10g", "--reserve", "1.5")
    f = memplan.check_fit("llama-2-7b", "a10g", reserve_bytes=3 * 2**30 // 2)
    assert code == 0
    assert f"headroom             {gib(f.headroom_bytes):>9} GiB  -> fits" in out
    assert f"reserve kept free    {gib(f.reserve_bytes):>9} GiB" in out
    for line in plan_lines(f.estimate.plan):
        assert line in out
    assert "-0.00" not in out


def test_fit_that_misses_by_a_byte_prints_no_negative_zero(capsys, monkeypatch):
    e = memplan.estimate("llama-2-7b", gpu="a10g")
    reserve = e.gpu.memory_bytes - e.device_bytes + 1  # headroom -1 byte
    code, out, _ = run(capsys, "fit", "llama-2-7b", "--gpu", "a10g", "--reserve", repr(reserve / 2**30))
    assert code == 1 and "DOES NOT FIT" in out
    assert "-0.00" not in out and "headroom                  0.00 GiB" in out


def test_recommend_simulate_budget_flag(capsys):
    code, out, err = run(capsys, "recommend", "llama-2-7b", "--gpu", "a10g", "--simulate-budget", "0")
    assert code == 2 and "--simulate-budget" in err
    code, out, err = run(capsys, "recommend", "llama-2-7b", "--gpu", "a10g", "--simulate-budget", "3", "--json")
    assert code in (0, 1) and json.loads(out)["schema"] == "memplan.recommend/1"


def test_gpus_table_and_recommend_table_use_gib(capsys):
    from memplan.present import gib

    code, out, _ = run(capsys, "gpus")
    assert code == 0
    h200 = memplan.load_gpu("h200")
    assert any(line.startswith("h200") and f" {gib(h200.memory_bytes)} " in line for line in out.splitlines())
