"""The wheel carries the catalogue (memplan/profiles) and every subpackage."""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools")
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1 builds wheels itself)
    except ImportError:
        pytest.importorskip("wheel")
    # build from a copy so that build/ and *.egg-info do not land in the checkout
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for d in ("memplan", "profiles"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("whl")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(src),
                        "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = glob.glob(str(out / "memplan-*.whl"))
    return zipfile.ZipFile(whl)


def test_wheel_holds_the_catalogue(wheel):
    names = wheel.namelist()
    models = [n for n in names if n.startswith("memplan/profiles/models/") and n.endswith(".json")]
    gpus = [n for n in names if n.startswith("memplan/profiles/gpus/") and n.endswith(".json")]
    assert len(models) >= 25
    assert len(gpus) >= 15
    assert len(models) == len(list((ROOT / "profiles" / "models").glob("*.json")))


def test_wheel_holds_every_subpackage(wheel):
    names = set(wheel.namelist())
    for init in (ROOT / "memplan").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel: add its package to pyproject.toml [tool.setuptools]"


def test_wheel_has_console_script(wheel):
    (ep,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "memplan = memplan.cli:main" in wheel.read(ep).decode()
