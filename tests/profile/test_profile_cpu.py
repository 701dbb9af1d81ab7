"""Real CPU training steps through `memplan profile`: records, per-term attribution, OOM and failure as results.

A tiny random llama (hidden 64) keeps each run to about a second.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import memplan  # noqa: E402
import memplan.runtime.step as step_mod  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.profile.measure import STEP_PHASES  # noqa: E402
from memplan.profile.record import read_run, validate  # noqa: E402
from memplan.profile.runner import profile_many  # noqa: E402
from memplan.terms import ALLOCATED_TERMS  # noqa: E402

from _tiny import TINY  # noqa: E402

PLAN = TrainPlan(device="cpu", seq_len=64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = memplan.profile(TINY, PLAN, steps=3, out=out)
    return r, out


def test_profile_success_record(run):
    r, out = run
    d = r.to_dict()
    assert r.status == "success" and validate(d) == []
    m = d["measured"]
    # the terms are the tracker's view of the peak moment and sum to it
    assert sum(m["terms"][str(t)] for t in ALLOCATED_TERMS) == m["peak"]["tracked_bytes"]
    assert m["peak"]["allocated_bytes"] == max(s["allocated_bytes"] for s in m["steps"] if s["step"] >= 2)
    assert [s["step"] for s in m["steps"]] == [1, 2, 3]
    assert m["steps"][0]["allocated_bytes"] < m["steps"][1]["allocated_bytes"]  # no optimizer state in step 1
    assert list(m["phases"]) == ["load", "adapters", "forward", "loss", "backward", "optimizer"]
    assert m["phases"]["adapters"]["allocated_bytes"] > m["phases"]["load"]["allocated_bytes"]  # fp32 upcast + LoRA
    for k in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "cuda", "driver"):
        assert k in d["versions"]
    assert d["model"]["config"]["hidden_size"] == 64 and d["gpu"] is None
    # the estimate made at the time, with its per-term error
    err = d["estimate_error"]["peak"]["allocated_bytes"]["error_pct"]
    assert abs(err) <= 3.0, err
    (path,) = list(out.glob("*.json"))
    assert read_run(path).to_dict() == d  # written atomically, nothing else in the folder


def test_cli_profile_json_and_record(tiny_config, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["profile", str(tiny_config), "--device", "cpu", "--seq-len", "64", "--lora-r", "8", "--steps", "2",
                 "--json", "--quiet", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(stdout)
    assert d == json.loads(out.read_text())
    assert d["plan"]["lora_r"] == 8 and d["steps"] == 2 and d["model"]["name"] == "tiny-test-llama"


def test_memory_limit_turns_peaks_into_oom_and_a_sweep_goes_on(run):
    r, _ = run
    peak = r.allocated_bytes
    static = r.measured["phases"]["load"]["allocated_bytes"]
    plans = [PLAN.replace(batch_size=4), PLAN]  # the first crosses the limit, the second does not
    runs = profile_many(TINY, plans, steps=2, memory_limit_bytes=int(peak * 1.05))
    assert [x.status for x in runs] == ["oom", "success"]
    f = runs[0].failure
    assert f["type"] == "EmulatedOOM" and f["phase"] in STEP_PHASES and f["step"] >= 1
    assert runs[0].measured["peak"]["over_limit_bytes"] > peak * 1.05
    assert validate(runs[0].to_dict()) == []
    (low,) = profile_many(TINY, [PLAN], steps=2, memory_limit_bytes=static // 2)
    assert low.status == "oom" and low.failure["phase"] == "load"


def test_a_failing_step_is_recorded_and_the_session_recovers(monkeypatch):
    real = step_mod.run_steps
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("boom in the step")
        return real(*a, **k)

    monkeypatch.setattr(step_mod, "run_steps", flaky)
    runs = profile_many(TINY, [PLAN, PLAN], steps=2)
    assert [x.status for x in runs] == ["failed", "success"]
    assert runs[0].failure["type"] == "ValueError" and "boom" in runs[0].failure["message"]
    assert "where" in runs[0].failure


def test_tracking_off_still_runs():
    r = memplan.profile(TINY, PLAN, steps=2, track=False)
    assert r.status == "success" and r.measured["attribution"] == "none" and r.measured["terms"] is None
    assert len(r.measured["wall_seconds"]["steps"]) == 2
    assert validate(r.to_dict()) == []


def test_cuda_without_a_gpu_is_bad_input(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MemplanError, match="--device cpu"):
        memplan.profile(TINY, TrainPlan(device="cuda"))
    code = main(["profile", "llama-3.2-1b", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("memplan: error:") and "--device cpu" in err
