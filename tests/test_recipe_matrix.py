"""estimate vs simulate over the recipe matrix of issue 9 (attention x padding x checkpointing x adapter
dtype), on a subset of `scripts/recipe_matrix.py` (one real shape, one sequence length, both devices),
at the limit README.md quotes for the full matrix."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from readme_claims import readme_claim  # noqa: E402

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recipe_matrix.py"


def _matrix():
    spec = importlib.util.spec_from_file_location("recipe_matrix", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("recipe_matrix", mod)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_matrix_subset_within_the_readme_limit():
    rows = list(_matrix().rows(["mistral-7b-v0.1"], [1024], ["cuda", "cpu"]))
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # attention x padding x checkpointing x adapters x device
    median, worst = readme_claim("scripts/recipe_matrix.py")
    errs = sorted(abs(r[10]) for r in rows)
    bad = [r[:8] + (f"{r[10]:+.3f} %",) for r in rows if abs(r[10]) > worst]
    assert not bad, bad
    assert errs[len(errs) // 2] <= median + 1e-9
