"""scripts/gpu_check.sh: the CPU path end to end, and the parent's recovery from a child that dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

import memplan.profile.matrix as matrix
from memplan.profile.record import read_run, validate

ROOT = Path(__file__).resolve().parents[2]


def test_matrix_shape():
    cuda = matrix.cuda_matrix()
    assert {e.group for e in cuda} == {"tiny", "1b", "8b"}
    assert len({e.id for e in cuda}) == len(cuda)
    plans = [e.plan for e in cuda]
    for key, values in (("method", {"qlora", "lora"}), ("gradient_checkpointing", {True, False}),
                        ("optim", {"paged_adamw_8bit", "adamw_torch"})):
        for g in ("tiny", "1b", "8b"):
            assert {p[key] for e, p in zip(cuda, plans) if e.group == g} == values, (g, key)
    assert len({e.plan["seq_len"] for e in cuda if e.group == "8b"}) == 2
    assert [e.id for e in matrix.load_order(cuda)][:2] == [e.id for e in cuda][:2]


def test_list_needs_no_torch(capsys):
    assert matrix.main(["--list"]) == 0
    out = capsys.readouterr()[0]
    assert "8b-qlora-gc-paged_adamw_8bit-s2048" in out and len(out.splitlines()) == len(matrix.cuda_matrix())


@pytest.mark.skipif(not os.access(ROOT / "scripts" / "gpu_check.sh", os.X_OK), reason="script not executable")
def test_cpu_tiny_check_end_to_end(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(tmp_path),
                        "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["success"] * 4
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == 4
    for p in runs:
        run = read_run(p)
        assert validate(run.to_dict()) == [] and run.device == "cpu"
        assert abs(run.estimate_error()["peak"]["allocated_bytes"]["error_pct"]) <= 3.0
    md = (tmp_path / "summary.md").read_text()
    assert "| configuration | status |" in md and "allocated: |error| median" in md
    assert "configurations in" in r.stdout


# a stand-in child: records a success for its first configuration, then dies the way bitsandbytes does
# when cudaMallocManaged fails (a C exit(1) after printing the CUDA error)
FAKE_CHILD = r"""
import json, sys
ids, results = sys.argv[1].split(","), sys.argv[2]
with open(results, "a") as f:
    f.write(json.dumps({"id": ids[0], "status": "success"}) + "\n")
if len(ids) > 1:
    print("Error out of memory at line 301 in file /src/csrc/pythonInterface.cpp", file=sys.stderr)
    sys.exit(1)
"""


def test_a_crashing_child_costs_one_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(matrix, "_child_cmd", lambda args, g, ids, res, dl: [sys.executable, "-c", FAKE_CHILD,
                                                                             ",".join(ids), str(res)])
    entries = [e for e in matrix.cuda_matrix() if e.group == "8b"][:4]
    args = Namespace(out=tmp_path, quiet=True)
    got = matrix.run_group(args, "8b", entries, deadline=float("inf"), log=lambda m: None)
    # child 1: e0 ok, dies on e1 (-> oom); child 2: e2 ok, dies on e3 (-> oom)
    assert [got[e.id]["status"] for e in entries] == ["success", "oom", "success", "oom"]
    assert "pythonInterface" in got[entries[1].id]["reason"]


def test_cuda_summary_and_calibration_from_records(tmp_path):
    """The summary table and the overhead calibration, from synthetic CUDA records (no GPU needed)."""
    from memplan.profile.record import MeasuredRun, write_run
    from memplan.terms import Term

    MiB = 2**20
    rows = []
    for i, (ctx, ws, ovh) in enumerate([(500, 64, 30), (520, 64, 50), (510, 70, 40)]):
        terms = {str(t): 0 for t in Term}
        terms.update(base_weights=1000 * MiB, activations=(1000 - ws) * MiB, workspace=ws * MiB,
                     allocator_overhead=ovh * MiB, cuda_context=ctx * MiB)
        alloc = 2000 * MiB
        measured = {"terms": terms, "paged_bytes": 0,
                    "peak": {"phase": "backward", "allocated_bytes": alloc, "reserved_bytes": alloc + ovh * MiB,
                             "device_bytes": alloc + (ovh + ctx) * MiB}}
        est = {"terms": terms, "paged_bytes": 0,
               "peak": {"phase": "loss", "allocated_bytes": alloc, "reserved_bytes": alloc + 60 * MiB,
                        "device_bytes": alloc + 560 * MiB}}
        run = MeasuredRun(model={"name": "llama-3-8b", "config": {}}, plan={"method": "qlora"}, device="cuda",
                          status="success", measured=measured, estimate=est, gpu={"name": "h200"},
                          run_id=f"x-{i}")
        p = write_run(run, tmp_path / f"{i}.json")
        rows.append(matrix._row(matrix.Entry(f"e{i}", "8b", {}), {"status": "success", "path": str(p)}))
    cal = matrix.calibration(rows)["h200"]
    assert cal["runs"] == 3 and cal["cuda_context_bytes"] == 510 * MiB
    assert cal["workspace_bytes"] == 32 * MiB  # half the untracked bytes: two cuBLAS workspaces
    assert cal["reserve_ratio"] == pytest.approx(40 / 2000)
    md = matrix.summary_markdown(rows, "cuda")
    assert "reserved error" in md and "device error" in md and "backward/loss" in md
    assert "reserved: |error| median" in md


def test_a_child_that_cannot_start_fails_the_group_quickly(tmp_path, monkeypatch):
    spawned = []

    def cmd(args, g, ids, res, dl):
        spawned.append(ids)
        return [sys.executable, "-c", "import sys; print('ImportError: no module named torch', file=sys.stderr); "
                                      "sys.exit(1)"]

    monkeypatch.setattr(matrix, "_child_cmd", cmd)
    entries = [e for e in matrix.cuda_matrix() if e.group == "tiny"][:5]
    got = matrix.run_group(Namespace(out=tmp_path, quiet=True), "tiny", entries, float("inf"), lambda m: None)
    assert [got[e.id]["status"] for e in entries] == ["failed"] * 5
    assert len(spawned) == 2 and "ImportError" in got[entries[-1].id]["reason"]
