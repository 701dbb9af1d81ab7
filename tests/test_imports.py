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


def _memplan_imports():
    """(module file, imported memplan module, imported names) for every import inside memplan/."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "memplan"
    for path in sorted(root.rglob("*.py")):
        pkg = path.relative_to(root.parent).with_suffix("").parts
        pkg = pkg[:-1] if pkg[-1] != "__init__" else pkg[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("memplan")):
                base = list(pkg[:len(pkg) - node.level + 1]) if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                yield path.relative_to(root.parent), target, [a.name for a in node.names]


def test_no_module_imports_another_packages_private_names():
    """Issue 8: public names across packages (the runtime is used by simulate, profile and the callback)."""
    bad = [f"{f}: from {mod} import {n}" for f, mod, names in _memplan_imports() for n in names
           if n.startswith("_") and n != "__version__"]
    assert not bad, "\n".join(bad)


def test_the_report_does_not_import_the_cli():
    bad = [f"{f}: {mod}" for f, mod, _ in _memplan_imports()
           if str(f).startswith("memplan/report") and (mod == "memplan.cli" or mod.endswith(".cli"))]
    assert not bad, bad
