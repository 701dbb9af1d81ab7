"""Every malformed input, across commands: exit 2, exactly one line on stderr starting
`memplan: error:`, no traceback, nothing on stdout, and no file or folder written (issue 14).

Each case runs `memplan.cli.main` in a scratch folder holding a few fixtures (a config.json that is a
JSON list, broken JSON, a plain file to write "through", an empty folder); the folder must look the
same afterwards.
"""

from __future__ import annotations

import os

import pytest

from memplan.cli import main

M = "llama-2-7b"

# (id, argv); "{tmp}" is the scratch folder
CASES = [
    # --- plan sizes and values (estimate) ---
    ("batch-0", ["estimate", M, "--batch-size", "0"]),
    ("batch-neg", ["estimate", M, "--batch-size", "-1"]),
    ("batch-text", ["estimate", M, "--batch-size", "two"]),
    ("batch-huge", ["estimate", M, "--batch-size", "1000000000"]),
    ("seq-float-exp", ["estimate", M, "--seq-len", "1e12"]),
    ("seq-huge", ["estimate", M, "--seq-len", "1000000000000"]),
    ("seq-0", ["estimate", M, "--seq-len", "0"]),
    ("accum-0", ["estimate", M, "--gradient-accumulation-steps", "0"]),
    ("accum-huge", ["estimate", M, "--gradient-accumulation-steps", "100000000"]),
    ("lora-r-0", ["estimate", M, "--lora-r", "0"]),
    ("lora-r-huge", ["estimate", M, "--lora-r", "100000"]),
    ("lora-r-above-hidden", ["estimate", M, "--lora-r", "8192"]),
    ("lora-alpha-0", ["estimate", M, "--lora-alpha", "0"]),
    ("lora-alpha-neg", ["estimate", M, "--lora-alpha", "-16"]),
    ("lora-dropout-1.5", ["estimate", M, "--lora-dropout", "1.5"]),
    ("lora-dropout-nan", ["estimate", M, "--lora-dropout", "nan"]),
    ("method", ["estimate", M, "--method", "qlor"]),
    ("quant", ["estimate", M, "--quant", "nf3"]),
    ("qlora-no-quant", ["estimate", M, "--quant", "none"]),
    ("lora-with-quant", ["estimate", M, "--method", "lora", "--quant", "nf4"]),
    ("optim", ["estimate", M, "--optim", "adamw_foo"]),
    ("targets-empty", ["estimate", M, "--target-modules", ","]),
    ("device", ["estimate", M, "--device", "tpu"]),
    ("flash-on-cpu", ["estimate", M, "--attn-implementation", "flash_attention_2", "--device", "cpu"]),
    ("dtype", ["estimate", M, "--dtype", "int4"]),
    ("unknown-flag", ["estimate", M, "--frobnicate"]),
    ("unknown-model", ["estimate", "llama-9-7b"]),
    ("empty-model", ["estimate", ""]),
    ("missing-config", ["estimate", "{tmp}/nope/config.json"]),
    ("config-is-list", ["estimate", "{tmp}/list.json"]),
    ("config-broken", ["estimate", "{tmp}/broken.json"]),
    ("config-dir-without", ["estimate", "{tmp}/empty"]),
    ("estimate-gpu-unknown", ["estimate", M, "--gpu", "h300"]),
    ("estimate-gpu-ambiguous", ["estimate", M, "--gpu", "v100"]),
    ("no-command", []),
    ("unknown-command", ["estimat", M]),
    # --- fit ---
    ("fit-no-gpu", ["fit", M]),
    ("fit-reserve-inf", ["fit", M, "--gpu", "a10g", "--reserve", "inf"]),
    ("fit-reserve-nan", ["fit", M, "--gpu", "a10g", "--reserve", "nan"]),
    ("fit-reserve-neg", ["fit", M, "--gpu", "a10g", "--reserve", "-1"]),
    ("fit-reserve-text", ["fit", M, "--gpu", "a10g", "--reserve", "lots"]),
    ("fit-gpu-ambiguous", ["fit", M, "--gpu", "a100"]),
    ("fit-batch-huge", ["fit", M, "--gpu", "a10g", "--batch-size", "5000000"]),
    # --- recommend ---
    ("rec-reserve-nan", ["recommend", M, "--gpu", "a10g", "--reserve", "nan"]),
    ("rec-reserve-inf", ["recommend", M, "--gpu", "a10g", "--reserve", "inf"]),
    ("rec-budget-0", ["recommend", M, "--gpu", "a10g", "--simulate-budget", "0"]),
    ("rec-cpu", ["recommend", M, "--gpu", "a10g", "--device", "cpu"]),
    ("rec-gpu-unknown", ["recommend", M, "--gpu", "gtx-1080"]),
    ("rec-lora-alpha-0", ["recommend", M, "--gpu", "a10g", "--lora-alpha", "0"]),
    # --- report (nothing may be written: no --out folder left behind) ---
    ("report-seq-empty-item", ["report", "--models", M, "--gpus", "a10g", "--seq-lens", "1024,,2048",
                               "--out", "{tmp}/r"]),
    ("report-seq-text", ["report", "--models", M, "--gpus", "a10g", "--seq-lens", "long", "--out", "{tmp}/r"]),
    ("report-seq-huge", ["report", "--models", M, "--gpus", "a10g", "--seq-lens", "1000000000000",
                         "--out", "{tmp}/r"]),
    ("report-batch-0", ["report", "--models", M, "--gpus", "a10g", "--batch-sizes", "0", "--out", "{tmp}/r"]),
    ("report-ranks-huge", ["report", "--models", M, "--gpus", "a10g", "--ranks", "100000", "--out", "{tmp}/r"]),
    ("report-methods", ["report", "--models", M, "--gpus", "a10g", "--methods", "qlora,dora", "--out", "{tmp}/r"]),
    ("report-models-empty", ["report", "--models", ",", "--gpus", "a10g", "--out", "{tmp}/r"]),
    ("report-model-unknown", ["report", "--models", "llama-9", "--gpus", "a10g", "--out", "{tmp}/r"]),
    ("report-gpu-unknown", ["report", "--models", M, "--gpus", "a10g,h300", "--out", "{tmp}/r"]),
    ("report-gpu-ambiguous", ["report", "--models", M, "--gpus", "a100", "--out", "{tmp}/r"]),
    ("report-reserve-inf", ["report", "--models", M, "--gpus", "a10g", "--reserve", "inf", "--out", "{tmp}/r"]),
    ("report-reserve-nan", ["report", "--models", M, "--gpus", "a10g", "--reserve", "nan", "--out", "{tmp}/r"]),
    ("report-out-is-file", ["report", "--models", M, "--gpus", "a10g", "--out", "{tmp}/afile"]),
    ("report-out-through-file", ["report", "--models", M, "--gpus", "a10g", "--out", "{tmp}/afile/r"]),
    ("report-flash-cpu", ["report", "--models", M, "--gpus", "a10g", "--attn-implementation", "flash_attention_2",
                          "--device", "cpu", "--out", "{tmp}/r"]),
    # --- simulate (fails before torch loads) ---
    ("sim-unknown-model", ["simulate", "llama-9-7b"]),
    ("sim-batch-0", ["simulate", M, "--batch-size", "0"]),
    ("sim-seq-huge", ["simulate", M, "--seq-len", "99999999999"]),
    # --- profile (fails before any work) ---
    ("prof-gpu-unknown", ["profile", M, "--device", "cpu", "--gpu", "foo"]),
    ("prof-steps-1", ["profile", M, "--device", "cpu", "--steps", "1"]),
    ("prof-steps-0", ["profile", M, "--device", "cpu", "--steps", "0"]),
    ("prof-limit-nan", ["profile", M, "--device", "cpu", "--memory-limit", "nan"]),
    ("prof-limit-inf", ["profile", M, "--device", "cpu", "--memory-limit", "inf"]),
    ("prof-limit-neg", ["profile", M, "--device", "cpu", "--memory-limit", "-2"]),
    ("prof-out-through-file", ["profile", M, "--device", "cpu", "--out", "{tmp}/afile/runs"]),
    ("prof-out-json-through-file", ["profile", M, "--device", "cpu", "--out", "{tmp}/afile/run.json"]),
    ("prof-out-json-is-folder", ["profile", M, "--device", "cpu", "--out", "{tmp}/empty.json"]),
    ("prof-granularity-0", ["profile", M, "--device", "cpu", "--find-max-batch", "--granularity", "0"]),
    ("prof-max-trials-0", ["profile", M, "--device", "cpu", "--find-max-batch", "--max-trials", "0"]),
    ("prof-both-searches", ["profile", M, "--find-max-batch", "--find-max-seq"]),
    ("prof-flash-cpu", ["profile", M, "--device", "cpu", "--attn-implementation", "flash_attention_2"]),
    ("prof-weights", ["profile", M, "--weights", "trained"]),
    ("prof-pretrained-config-only", ["profile", "{tmp}/cfgonly", "--device", "cpu", "--weights", "pretrained"]),
    ("prof-pretrained-config-file", ["profile", "{tmp}/cfgonly/config.json", "--device", "cpu",
                                     "--weights", "pretrained"]),
    ("prof-pretrained-catalogue", ["profile", M, "--device", "cpu", "--weights", "pretrained"]),
    # --- compare, models, gpus ---
    ("compare-empty-folder", ["compare", "{tmp}/empty"]),
    ("compare-missing", ["compare", "{tmp}/nope.json"]),
    ("compare-not-a-record", ["compare", "{tmp}/list.json"]),
    ("models-extra-arg", ["models", "llama"]),
    ("gpus-unknown-flag", ["gpus", "--all"]),
]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    (tmp_path / "list.json").write_text('[{"model_type": "llama"}]')
    (tmp_path / "broken.json").write_text('{"model_type": ')
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.json").mkdir()
    (tmp_path / "cfgonly").mkdir()  # a config.json and no weights
    (tmp_path / "cfgonly" / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
        '"num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs}


def test_at_least_60_cases():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({c[1][0] for c in CASES if c[1]}) >= 8  # across commands


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(capsys, scratch, argv):
    before = _tree(scratch)
    code = main([a.replace("{tmp}", str(scratch)) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if not ln.startswith("memplan: warning:")]
    assert code == 2, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("memplan: error: "), err
    assert _tree(scratch) == before, "nothing written"


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "existing-folder"])
def test_report_on_a_full_disk_is_one_line_and_keeps_nothing(capsys, tmp_path, monkeypatch, existing):
    """Issue 14: `report` on a full disk printed a traceback and left a partial folder."""
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    import errno

    import memplan.report.html as html

    calls = {"n": 0}
    real = html.write_bytes_atomic

    def full_disk(path, data):  # the first file is written, then the disk is full
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(html, "write_bytes_atomic", full_disk)
    out = tmp_path / "rep"
    if existing:
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    code = main(["report", "--models", "llama-2-7b", "--gpus", "a10g", "--seq-lens", "1024", "--batch-sizes", "1",
                 "--out", str(out), "--quiet"] + (["--force"] if existing else []))
    err = capsys.readouterr().err
    assert code == 2 and calls["n"] > 1
    lines = [ln for ln in err.splitlines() if not ln.startswith("memplan: warning:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in err
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    else:
        assert not out.exists()
