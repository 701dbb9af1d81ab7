"""`--find-max-batch` on the CPU: the estimate's prediction confirmed by real steps under --memory-limit."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import memplan.profile.search as search_mod  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.estimate import compute  # noqa: E402
from memplan.model import model_from_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.profile.search import find_max  # noqa: E402
from memplan.units import GiB  # noqa: E402

from _tiny import TINY  # noqa: E402

PLAN = TrainPlan(device="cpu", seq_len=64, optim="adamw_torch")


def _limit_between(b: int) -> int:
    """A limit halfway between the estimates at batch b and b + 1 (the estimate is within ~1 %)."""
    spec = model_from_config(TINY)
    lo, hi = (compute(spec, PLAN.replace(batch_size=n)).allocated_bytes for n in (b, b + 1))
    return (lo + hi) // 2


def test_cli_find_max_batch_confirms_the_prediction(tiny_config, tmp_path, capsys):
    limit = _limit_between(3)
    code = main(["profile", str(tiny_config), "--device", "cpu", "--seq-len", "64", "--optim", "adamw_torch",
                 "--find-max-batch", "--memory-limit", f"{limit / GiB:.12f}", "--json", "--quiet",
                 "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d["schema"] == "memplan.search/1" and d["predicted"] == 3 and d["largest"] == 3
    assert [(t["value"], t["status"]) for t in d["trials"]] == [(3, "success"), (4, "oom")]
    assert d["largest_peak_bytes"] <= d["limit_bytes"]
    assert len(list(tmp_path.glob("*.json"))) == 2  # every trial's run record


def test_search_recovers_from_a_wrong_prediction(monkeypatch):
    monkeypatch.setattr(search_mod, "predict", lambda *a, **k: 1)  # pretend the estimate said 1
    res = find_max(TINY, PLAN, dimension="batch_size", memory_limit_bytes=_limit_between(3))
    assert res.largest == 3 and res.predicted == 1
    assert [(t.value, t.status) for t in res.trials] == [(1, "success"), (2, "success"), (4, "oom"), (3, "success")]
    assert res.best is not None and res.best.plan["batch_size"] == 3


def test_cpu_search_needs_a_memory_limit(capsys):
    code = main(["profile", "llama-3.2-1b", "--device", "cpu", "--find-max-seq", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and "--memory-limit" in err


def test_prediction_is_the_shared_exact_search_over_the_closed_form(no_closed_form):
    from memplan.catalogue import load_model
    from memplan.errors import UnsupportedArchitectureError
    from memplan.search import gallop_bisect, max_fitting

    assert search_mod.gallop_bisect is gallop_bisect
    spec = model_from_config(TINY)
    limit = _limit_between(3)
    assert search_mod.predict(spec, PLAN, "batch_size", limit, "allocated_bytes", None, 1, 64) == 3
    assert max_fitting(lambda n: compute(spec, PLAN.replace(batch_size=n)).allocated_bytes, limit, cap=64)[0] == 3
    # no closed form: the search starts from 1 instead of a simulate trace per probe (seconds each)
    with pytest.raises(UnsupportedArchitectureError):
        search_mod.predict(load_model("mixtral-8x7b"), TrainPlan(), "batch_size", 80 * GiB, "device_bytes", None,
                           1, 64)
