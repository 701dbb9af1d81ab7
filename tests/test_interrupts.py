"""Ctrl-C (issue 14): one `memplan: interrupted` line on stderr, exit 130, no partial output; progress
off with --quiet everywhere; library warnings memplan triggers are filtered; shell completion."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import memplan.cli as cli
from memplan.cli import main


def _boom(*a, **k):
    raise KeyboardInterrupt


def test_report_interrupted_removes_its_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pandas")
    import memplan.report as report

    monkeypatch.setattr(report, "run_report", lambda *a, **k: (
        (k["out"] / "sweep.csv").write_text("partial"), _boom()))
    out = tmp_path / "a" / "b"
    code = main(["report", "--models", "llama-3.2-1b", "--gpus", "a10g", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and err == "memplan: interrupted\n"
    assert not (tmp_path / "a").exists()


def test_report_interrupted_keeps_existing_files(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pandas")
    import memplan.report as report

    (tmp_path / "mine.txt").write_text("keep")
    monkeypatch.setattr(report, "run_report", lambda *a, **k: (
        (k["out"] / "report.html").write_text("partial"), _boom()))
    code = main(["report", "--models", "llama-3.2-1b", "--gpus", "a10g", "--out", str(tmp_path), "--force"])
    assert code == 130 and capsys.readouterr().err == "memplan: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_simulate_interrupted(monkeypatch, capsys):
    monkeypatch.setattr(cli, "simulate_data", _boom)
    assert main(["simulate", "llama-3.2-1b"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == "memplan: interrupted\n"


def test_profile_interrupted_writes_nothing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    import memplan.profile.runner as runner

    monkeypatch.setattr(runner.Session, "run", _boom)
    code = main(["profile", "tests/profile/configs/tiny-llama", "--device", "cpu", "--seq-len", "32",
                 "--quiet", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 130 and out == "" and err.endswith("memplan: interrupted\n")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_a_long_native_call_exits_promptly(tmp_path):
    """SIGINT while the main thread is stuck in C (no bytecode runs): the watcher ends the process."""
    import os
    import signal
    import time

    script = (
        "import re, sys, memplan.cli as c\n"
        "def stuck(args):\n"
        "    open(sys.argv[1], 'w').close()\n"
        "    re.match(r'(a+)+$', 'a' * 60 + 'b')\n"  # minutes of backtracking inside _sre
        "c.simulate_data = stuck\n"
        "sys.exit(c.main(['simulate', 'llama-3.2-1b']))\n")
    flag = tmp_path / "started"
    # SIGINT as a terminal gives it: a shell's background job (`cmd &`, nohup) starts with it ignored, and a
    # child inherits that; the child must never outlive the test (it backtracks for minutes)
    p = subprocess.Popen([sys.executable, "-c", script, str(flag)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.time()
        while not flag.exists() and time.time() - t0 < 60:
            time.sleep(0.05)
        assert flag.exists(), "the child never reached the long native call"
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        t1 = time.time()
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130 and err == "memplan: interrupted\n" and out == ""
    assert time.time() - t1 < cli.INTERRUPT_GRACE_S + 5
    assert os.environ is not None


def test_quiet_is_the_one_flag():
    parser = cli.build_parser()
    for name in ("simulate", "report", "profile"):
        sub = parser.commands[name]
        assert any("--quiet" in a.option_strings for a in sub._actions), name
    help_text = parser.commands["report"].format_help()
    assert "--quiet" in help_text and "--no-progress" not in help_text  # the old name: a hidden alias
    args, _ = parser.parse_known_args(["report", "--models", "x", "--gpus", "y", "--out", "o", "--no-progress"])
    assert args.quiet is True


def test_library_warnings_filtered():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.filter_library_warnings()
        warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
                      "`activation_checkpointing_enable` instead.", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("Paged optimizers are not supported on CPU. Falling back to non-paged optimizer behavior.",
                      UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in seen] == ["something else"]


def test_profile_help_documents_the_cache(capsys):
    assert main(["profile", "--help"]) == 0
    out = capsys.readouterr().out
    assert "MEMPLAN_CACHE_DIR" in out and "random-weights" in out


def test_profile_says_what_it_will_write(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    import memplan.profile.runner as runner

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runner.Session, "run", _boom)
    main(["profile", "tests/profile/configs/tiny-llama", "--device", "cpu", "--seq-len", "32"])
    err = capsys.readouterr().err
    assert "will write a random-weight checkpoint of ~" in err and str(tmp_path / "random-weights") in err
    assert "CPU step(s)" in err and "roughly" in err


# ---- shell completion -------------------------------------------------------------------------
@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script(shell, capsys):
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for name in cli.build_parser().commands:
        assert name in script
    assert "llama-3.2-1b" in script and "a100-80gb" in script and "--seq-len" in script and "--quiet" in script


def test_bash_accepts_the_bash_script(tmp_path):
    path = tmp_path / "memplan.bash"
    path.write_text(cli.completion_script("bash"))
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    got = subprocess.run(["bash", "-c", f"source {path}; COMP_WORDS=(memplan fit llama-2-7b --gpu a10); "
                          "COMP_CWORD=4; _memplan; echo ${COMPREPLY[@]}"], capture_output=True, text=True)
    assert got.stdout.split() == ["a100-40gb", "a100-80gb", "a10g"]
