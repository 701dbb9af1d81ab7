"""Shared fixtures for the profiler tests: a tiny random model (seconds per run) and a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _tiny import TINY


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Random-weight checkpoints go to a temporary folder, not ~/.cache."""
    old = os.environ.get("MEMPLAN_CACHE_DIR")
    os.environ["MEMPLAN_CACHE_DIR"] = str(tmp_path_factory.mktemp("memplan-cache"))
    yield
    if old is None:
        os.environ.pop("MEMPLAN_CACHE_DIR", None)
    else:
        os.environ["MEMPLAN_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """TINY as a config.json folder (what a user passes as MODEL)."""
    import json

    d = tmp_path_factory.mktemp("tiny-test-llama")
    (d / "config.json").write_text(json.dumps(TINY))
    return d
