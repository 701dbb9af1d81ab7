"""The modelled library versions have one source, and constraints.txt installs exactly them."""

from pathlib import Path

from memplan.arch import ARCHITECTURES
from memplan.versions import MODELED_VERSIONS, RECIPE_VERSIONS

ROOT = Path(__file__).resolve().parents[2]


def test_constraints_pin_the_modelled_versions():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert set(pins) == set(MODELED_VERSIONS) | set(RECIPE_VERSIONS)
    for pkg, v in {**MODELED_VERSIONS, **RECIPE_VERSIONS}.items():
        assert pins[pkg] == v or pins[pkg].startswith(v + "."), (pkg, pins[pkg], v)


def test_the_architecture_table_cites_the_modelled_transformers():
    assert all(f"v{MODELED_VERSIONS['transformers']}." in row.source for row in ARCHITECTURES.values())


def test_an_estimate_names_the_recipe_libraries_it_models_only_when_used():
    from memplan import estimate

    assert set(estimate("llama-3-8b").to_dict()["versions"]) == set(MODELED_VERSIONS)
    assert estimate("llama-3-8b", trainer="sft").to_dict()["versions"]["trl"] == RECIPE_VERSIONS["trl"]
    v = estimate("llama-3-8b", use_liger_kernel=True).to_dict()["versions"]
    assert v["liger-kernel"] == RECIPE_VERSIONS["liger-kernel"] and "trl" not in v
