"""The architecture table: one row per model_type, each with its source, and no family checks elsewhere."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest

from memplan.arch import ARCHITECTURES, SUPPORTED, arch_of
from memplan.catalogue import _model_entries
from memplan.errors import UnsupportedArchitectureError
from memplan.estimate import compute
from memplan.model import model_from_config
from memplan.plan import TrainPlan

ROOT = Path(__file__).resolve().parents[2]


def test_no_model_type_checks_outside_the_table():
    """Per-architecture facts live in memplan/arch.py only (issue 8: one table)."""
    offenders = []
    for path in sorted((ROOT / "memplan").rglob("*.py")):
        if path.name == "arch.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"model_type\s*(==|!=|in\s*[(\[{])|\.family\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_every_row_has_a_catalogue_model_and_a_cpu_case(model_type):
    """Adding an architecture = one row, one config in the catalogue, one CPU agreement case."""
    catalogue = {e["config"].get("model_type") for e in _model_entries().values()}
    catalogue |= {e["config"].get("text_config", {}).get("model_type") for e in _model_entries().values()}
    assert model_type in catalogue
    if ARCHITECTURES[model_type].is_moe:
        pytest.skip("mixture-of-experts rows have no closed form yet: estimate falls back to simulate")
    cases = (ROOT / "tests" / "test_agreement_cpu.py").read_text()
    assert f'model_type="{model_type}"' in cases


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_every_row_names_a_transformers_source_that_exists(model_type):
    row = ARCHITECTURES[model_type]
    assert row.source.startswith("transformers v5.24.0 src/transformers/models/")
    spec = importlib.util.find_spec("transformers")
    if spec is None:
        pytest.skip("transformers not installed")
    rel = row.source.split("src/transformers/", 1)[1]
    assert (Path(spec.origin).parent / rel).is_file()


def test_unknown_model_type_is_one_clear_error():
    with pytest.raises(UnsupportedArchitectureError, match="simulate"):
        arch_of("gpt2")
    with pytest.raises(UnsupportedArchitectureError):
        arch_of(None)


def _gemma3(layer_types):
    cfg = copy.deepcopy(next(e["config"] for e in _model_entries().values()
                             if e["config"].get("model_type") == "gemma3_text"))
    cfg["num_hidden_layers"] = len(layer_types)
    cfg["layer_types"] = layer_types
    return model_from_config(cfg)


def test_specs_that_differ_only_in_layer_types_are_different_specs():
    """Bug (issue 8): `config` is excluded from equality, yet rotary buffers were read from it and
    results are cached on the spec, so B's estimate came back with A's other_params."""
    a = _gemma3(["sliding_attention", "sliding_attention"])  # one rotary set
    b = _gemma3(["sliding_attention", "full_attention"])     # two
    assert (a.rotary_modules, b.rotary_modules) == (1, 2)
    assert a != b and hash(a) != hash(b)
    plan = TrainPlan(device="cpu")
    ea, eb = compute(a, plan), compute(b, plan)
    # one more set of fp32 inv_freq + original_inv_freq buffers, head_dim / 2 each
    assert eb.terms["other_params"] - ea.terms["other_params"] == 2 * (a.head_dim // 2) * 4
