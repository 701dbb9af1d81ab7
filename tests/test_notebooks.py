"""The notebooks run top to bottom (nbclient), so they never rot, and are stored without outputs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SIM = ("torch", "transformers", "peft", "bitsandbytes")


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"01_will_it_fit.ipynb", "02_capacity_planning.ipynb",
                                           "03_estimate_vs_measured.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"strip {path.name}'s outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    if path.name.startswith("03"):
        missing = [m for m in SIM if importlib.util.find_spec(m) is None]
        if missing and not list((ROOT / "profiles" / "runs").glob("*.json")):
            pytest.skip(f"needs the sim extra for its CPU step: {', '.join(missing)} missing")
    # the kernel is a child process: make it import this checkout, with a non-interactive matplotlib
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
