"""Shared pytest options."""

from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.json from the current estimator (deliberate changes only)")


import pytest  # noqa: E402


@pytest.fixture
def no_closed_form(monkeypatch):
    """Make the closed form refuse Mixtral (as it refuses every family outside the architecture table's
    closed-form rows): the fallback machinery (simulate traces, budgets, report cells) is then tested on
    a real mixture-of-experts model whatever the closed form covers today."""
    import sys

    from memplan.errors import UnsupportedArchitectureError

    est = sys.modules["memplan.estimate"]
    orig = est.check_plan

    def check_plan(model, plan):
        if model.model_type == "mixtral":
            raise UnsupportedArchitectureError(
                f"the closed form does not cover {model.name} (a test stand-in for a mixture-of-experts family "
                f"without one); run `memplan simulate {model.name}` for an exact trace")
        return orig(model, plan)

    monkeypatch.setattr(est, "check_plan", check_plan)
