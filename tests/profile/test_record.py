"""Run records (memplan.run/1): shape, validation, per-term error, atomic writes, `memplan compare`.

No torch needed: records are plain JSON and the estimator is pure Python.
"""

from __future__ import annotations

import json
import os

import pytest

from memplan.cli import main
from memplan.errors import MemplanError
from memplan.estimate import compute
from memplan.model import model_from_config
from memplan.plan import TrainPlan
from memplan.profile.record import (SCHEMA, MeasuredRun, error_pct, estimate_error, read_run, run_filename,
                                    validate, write_json_atomic, write_run)
from memplan.terms import Term

from _tiny import TINY


def _run(status: str = "success", device: str = "cpu", scale: float = 1.0) -> MeasuredRun:
    """A record whose measurement is the estimate scaled by `scale` (a synthetic, hand-checkable run)."""
    plan = TrainPlan(device=device, seq_len=64)
    e = compute(model_from_config(TINY), plan).to_dict()
    terms = {k: int(v * scale) for k, v in e["terms"].items()}
    alloc = sum(terms[str(t)] for t in list(Term)[:10])
    measured = {"terms": terms, "peak": {"phase": "backward", "step": 2, "allocated_bytes": alloc,
                                         "reserved_bytes": None, "device_bytes": None}}
    failure = None if status == "success" else {"type": "OutOfMemoryError", "message": "x", "phase": "backward",
                                                 "step": 1}
    return MeasuredRun(model={"name": "tiny", "config": dict(TINY)}, plan=plan.to_dict(), device=device,
                       status=status, measured=measured if status == "success" else {}, failure=failure,
                       estimate={"terms": e["terms"], "peak": e["peak"], "paged_bytes": 0}, steps=3,
                       run_id="20250101T000000Z-abcdef12", created="2025-01-01T00:00:00Z")


def test_round_trip_and_schema():
    r = _run()
    d = r.to_dict()
    assert d["schema"] == SCHEMA and validate(d) == []
    assert MeasuredRun.from_dict(json.loads(json.dumps(d))).to_dict() == d
    for key in ("model", "plan", "device", "gpu", "versions", "status", "measured", "estimate", "estimate_error"):
        assert key in d


def test_validate_lists_every_problem():
    d = _run().to_dict()
    d["schema"] = "memplan.run/0"
    del d["measured"]["terms"]["logits"]
    d["model"].pop("config")
    problems = validate(d)
    assert len(problems) == 3, problems
    oom = _run("oom").to_dict()
    assert validate(oom) == []
    oom["failure"] = None
    assert any("failure" in p for p in validate(oom))


def test_per_term_error_is_estimate_minus_measured_over_measured():
    r = _run(scale=0.9)  # measured = 0.9 x estimate -> error +11.1 %
    e = r.estimate_error()
    act = e["terms"]["activations"]
    assert act["error_pct"] == pytest.approx(100 * (1 / 0.9 - 1), abs=0.01)
    assert act["diff_bytes"] == act["estimate"] - act["measured"]
    assert e["terms"]["workspace"]["error_pct"] == 0.0  # 0 vs 0
    assert set(e["peak"]) == {"allocated_bytes"}  # cpu: the only peak that exists
    assert error_pct(5, 0) is None and error_pct(None, 3) is None and error_pct(110, 100) == pytest.approx(10)
    cuda = estimate_error({"terms": {}, "peak": {"allocated_bytes": 10, "reserved_bytes": 12, "device_bytes": 20},
                           "paged_bytes": 4},
                          {"terms": {}, "peak": {"allocated_bytes": 10, "reserved_bytes": 11, "device_bytes": None},
                           "paged_bytes": 4}, "cuda")
    assert set(cuda["peak"]) == {"allocated_bytes", "reserved_bytes", "paged_bytes"}


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"a": 2}  # the old file is intact
    assert os.listdir(tmp_path) == ["run.json"]  # and no temporary is left behind


def test_write_run_to_a_folder_and_read_back(tmp_path):
    r = _run()
    p = write_run(r, tmp_path / "runs")
    assert p.name == run_filename(r) and p.parent == tmp_path / "runs"
    assert read_run(p).to_dict() == r.to_dict()
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "nope"}')
    with pytest.raises(MemplanError, match="memplan.run/1"):
        read_run(bad)


def test_compare_prints_estimate_vs_measured_per_term(tmp_path, capsys):
    write_run(_run(scale=0.95), tmp_path / "a.json")
    write_run(_run("oom"), tmp_path / "b.json")
    code = main(["compare", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "activations" in out and "allocated (peak)" in out and "+5.26%" in out
    assert "oom in backward (step 1)" in out
    code = main(["compare", str(tmp_path / "a.json"), "--json", "--stored"])
    d = json.loads(capsys.readouterr()[0])
    assert d["runs"][0]["estimate_source"] == "stored"
    assert d["runs"][0]["comparison"]["peak"]["allocated_bytes"]["error_pct"] == pytest.approx(5.263, abs=0.01)


def test_compare_missing_file_is_one_error_line(tmp_path, capsys):
    code = main(["compare", str(tmp_path / "nope.json")])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("memplan: error:") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# the one reader of stored records
# ---------------------------------------------------------------------------------------------
def test_iter_runs_strict_and_tolerant(tmp_path):
    from memplan.profile.record import iter_runs, stored_runs

    write_run(_run(), tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{broken")
    (tmp_path / ".hidden.json").write_text("{}")
    with pytest.raises(MemplanError, match="b.json"):
        stored_runs(tmp_path)
    pairs = list(iter_runs(tmp_path, strict=False))
    assert [p.name for p, _ in pairs] == ["a.json"] and pairs[0][1].to_dict() == _run().to_dict()
    assert stored_runs(tmp_path / "missing") == []


@pytest.mark.parametrize("edit, match", [
    pytest.param(lambda d: d.update(warp_drive=True), "warp_drive", id="unknown-field"),
    pytest.param(lambda d: d.update(batch_size=0), "batch", id="invalid-value"),
])
def test_train_plan_never_drops_or_guesses(edit, match):
    r = _run()
    plan = dict(r.plan)
    edit(plan)
    bad = MeasuredRun.from_dict({**r.to_dict(), "plan": plan})
    with pytest.raises(MemplanError, match=match):
        bad.train_plan()
    assert r.train_plan() == TrainPlan(device="cpu", seq_len=64)


@pytest.mark.parametrize("device, gpu, expect", [
    pytest.param("cpu", None, None, id="cpu"),
    pytest.param("cuda", {"name": "a10g"}, "a10g", id="catalogue-name"),
    pytest.param("cuda", {"name": "NVIDIA A10G", "catalogue": "a10g"}, "a10g", id="catalogue-field"),
    pytest.param("cuda", {"nvml_name": "NVIDIA A10G", "name": "NVIDIA A10G"}, "a10g", id="alias"),
    pytest.param("cuda", {"name": "Mystery GPU 9000"}, None, id="unknown"),
])
def test_catalogue_gpu(device, gpu, expect):
    r = MeasuredRun(model={"name": "tiny", "config": dict(TINY)}, plan=TrainPlan(device=device).to_dict(),
                    device=device, status="success", measured={}, gpu=gpu)
    assert r.catalogue_gpu() == expect


def test_compare_an_unknown_gpu_says_why(tmp_path, capsys):
    r = _run(device="cuda")
    d = {**r.to_dict(), "gpu": {"name": "Mystery GPU 9000"}}
    (tmp_path / "r.json").write_text(json.dumps(d))
    code = main(["compare", str(tmp_path / "r.json")])
    out, _ = capsys.readouterr()
    assert code == 0 and "Mystery GPU 9000" in out and "not in the catalogue" in out


def test_printers_use_the_shared_formats(capsys):
    from memplan.present import mib, pct, plan_brief
    from memplan.profile.compare import print_run

    r = _run(scale=0.95)
    print_run(r)
    out = capsys.readouterr().out
    e = r.estimate_error()["terms"]["activations"]
    assert f"plan: {plan_brief(r.plan)}" in out
    assert f"{mib(e['measured']):>14} {mib(e['estimate']):>14} {mib(e['diff_bytes']):>11} {pct(e['error_pct']):>9}" in out
    assert "-0.00" not in out
