"""The core imports nothing heavy: `import memplan`, an estimate and `memplan --help` stay fast."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "pandas", "matplotlib", "numpy", "peft", "bitsandbytes")


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_and_estimate_import_nothing_heavy():
    r = _py("import memplan, sys; memplan.estimate('llama-2-7b'); "
            f"bad=[m for m in {HEAVY!r} if m in sys.modules]; assert not bad, bad")
    assert r.returncode == 0, r.stderr


def test_cli_help_imports_nothing_heavy():
    r = _py("import sys, runpy; sys.argv=['memplan', '--help']\n"
            "try:\n    runpy.run_module('memplan', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"bad=[m for m in {HEAVY!r} if m in sys.modules]; assert not bad, bad")
    assert r.returncode == 0, r.stderr
    assert "estimate" in r.stdout


def test_python_m_memplan_help():
    r = subprocess.run([sys.executable, "-m", "memplan", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: memplan" in r.stdout


def test_simulate_is_lazy():
    r = _py("import memplan, sys; assert 'memplan.simulate' not in sys.modules; "
            "assert 'simulate' in memplan.__all__")
    assert r.returncode == 0, r.stderr
