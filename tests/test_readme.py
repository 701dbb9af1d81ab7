"""README.md's commands and Python API examples run verbatim (issue 14).

- the first command ("Will it fit?") exits 0 through the console script's entry point;
- the test command is the one `.ci/run` runs (its CPU torch from PyTorch's CPU index for readers,
  plain `pip install torch==2.13.0` in CI, where pip finds the CPU wheel on local disk);
- every ```python block under "## Python API" runs in a fresh interpreter in an empty folder, offline.
  A block that needs an extra (pandas for `memplan.sweep`, transformers/peft objects) is skipped only
  when that extra is missing; CI installs `[all]`, so all of them run there.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    nxt = README.find("\n## ", start + 1)
    return README[start:] if nxt < 0 else README[start:nxt]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands(block: str) -> list[str]:
    return [c.strip() for line in block.splitlines() for c in line.split("&&") if c.strip()]


API_BLOCKS = _blocks(_section("Python API"), "python")


def test_first_command_fits_through_the_entry_point(capsys):
    (block,) = _blocks(_section("Will it fit? (fresh machine, core only, offline)"), "bash")
    cmds = _commands(block)
    assert cmds[0] == "pip install -e ."
    argv = shlex.split(cmds[1])
    assert argv[:2] == ["memplan", "fit"]
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "DOES NOT FIT" not in out


def test_first_command_through_the_installed_script():
    exe = Path(sys.executable).with_name("memplan")
    if not exe.exists():
        pytest.skip("memplan console script not installed in this environment")
    (block,) = _blocks(_section("Will it fit? (fresh machine, core only, offline)"), "bash")
    r = subprocess.run([str(exe), *shlex.split(_commands(block)[1])[1:]], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_test_command_is_what_ci_runs():
    (block,) = _blocks(_section("Run the tests"), "bash")
    readme = _commands(block)
    assert readme == [f"pip install torch==2.13.0 --index-url {CPU_INDEX}",
                      "pip install -e '.[all,test]' -c constraints.txt", "python -m pytest -q"]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    # CI: the same steps; its pip gets the CPU wheel from local disk, so no --index-url there
    assert "pip install torch==2.13.0" in ci
    assert readme[1] in ci
    assert ci[-1] == readme[2]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    section = _section("Run the tests")
    assert "CI here" in section and "local disk" in section and "9 to 14 minutes on 2 CPU cores" in section


def test_python_api_examples_are_split_core_first():
    assert len(API_BLOCKS) >= 3
    core = API_BLOCKS[0]
    assert _needs(core) == []  # the first example runs with the standard library alone
    assert "training_args=" in core
    assert any("transformers" in _needs(b) for b in API_BLOCKS[1:])
    code = re.sub(r"#.*", "", "".join(API_BLOCKS))
    calls = re.findall(r"TrainingArguments\(([^)]*)\)", code)
    assert calls and not any(re.search(r"\bbf16\s*=\s*True", c) for c in calls)  # raises without a GPU


def _needs(block: str) -> list[str]:
    """The modules beyond the standard library and memplan that a block needs."""
    mods = sorted({m.split(".")[0] for m in re.findall(r"^\s*(?:from|import)\s+([\w.]+)", block, re.M)}
                  - {"memplan"})
    if "memplan.sweep" in block:
        mods += ["pandas", "matplotlib"]
    return mods


@pytest.mark.parametrize("block", API_BLOCKS, ids=[f"block{i}" for i in range(len(API_BLOCKS))])
def test_python_api_example_runs(block, tmp_path):
    for mod in _needs(block):
        pytest.importorskip(mod)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir()), "the example wrote files"
    if "print(e)" in block:
        assert "Estimate(" in r.stdout
