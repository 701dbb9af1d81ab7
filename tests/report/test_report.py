"""Sweeps and the capacity report: shape, numbers equal to compute(), the HTML's structure, CLI errors."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

import memplan  # noqa: E402
from memplan.catalogue import load_gpu, load_model  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.errors import UnsupportedArchitectureError  # noqa: E402
from memplan.estimate import compute  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.report import TERM_COLUMNS, sweep, write_report  # noqa: E402
from memplan.report.html import CHARTS  # noqa: E402
from memplan.report.sweep import COLUMNS  # noqa: E402
from memplan.terms import Term  # noqa: E402

MODELS = ["llama-3.2-1b", "qwen2.5-7b"]
GPUS = ["a10g", "a100-80gb"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def df():
    return sweep(MODELS, GPUS, methods=("qlora", "lora", "full"), seq_lens=(512, 2048), batch_sizes=(1, 4),
                 ranks=(8, 16), progress=False)


@pytest.fixture(scope="module")
def report(df, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    res = write_report(df, out, force=True)
    return out, res, (out / "report.html").read_text(encoding="utf-8")


def _plan(row) -> TrainPlan:
    kw = dict(method=row["method"], seq_len=int(row["seq_len"]), batch_size=int(row["batch_size"]))
    if not pd.isna(row["lora_r"]):
        kw["lora_r"] = int(row["lora_r"])
    return TrainPlan(**kw)


# ---------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------
def test_sweep_shape_and_columns(df):
    # (qlora, lora) x 2 ranks + full once = 5 plans per shape
    assert len(df) == len(MODELS) * len(GPUS) * 5 * 2 * 2
    assert tuple(df.columns) == COLUMNS
    assert set(TERM_COLUMNS) == {f"{t.value}_bytes" for t in Term}
    full = df[df["method"] == "full"]
    assert full["lora_r"].isna().all() and len(full) == len(MODELS) * len(GPUS) * 4
    assert not df.duplicated(["model", "gpu", "method", "lora_r", "seq_len", "batch_size"]).any()
    assert (df["error"] == "").all()


def test_sweep_numbers_equal_compute(df):
    for row in df.to_dict("records"):
        e = compute(load_model(row["model"]), _plan(row), load_gpu(row["gpu"]))
        for t in Term:
            assert row[f"{t.value}_bytes"] == e.terms[t], (row, t)
        assert (row["allocated_bytes"], row["reserved_bytes"], row["device_bytes"], row["paged_bytes"]) == \
            (e.allocated_bytes, e.reserved_bytes, e.device_bytes, e.paged_bytes)
        assert row["peak_phase"] == e.peak_phase
        assert row["fits"] == e.fits and row["headroom_bytes"] == e.headroom_bytes


def test_sweep_limits_are_exact_boundaries(df):
    sample = df[(df["seq_len"] == 2048) & (df["batch_size"] == 1)]
    for row in sample.to_dict("records"):
        spec, gpu = load_model(row["model"]), load_gpu(row["gpu"])
        p = _plan(row)
        mb, ms = int(row["max_batch_size"]), int(row["max_seq_len"])
        assert compute(spec, p.replace(batch_size=mb + 1), gpu).fits is False
        assert compute(spec, p.replace(seq_len=ms + 1), gpu).fits is False
        if mb:
            assert compute(spec, p.replace(batch_size=mb), gpu).fits
        if ms:
            assert compute(spec, p.replace(seq_len=ms), gpu).fits


def test_sweep_reserve_and_plan_kwargs():
    d = sweep(["llama-3.2-1b"], ["t4"], seq_lens=(1024,), batch_sizes=(2,), progress=False,
              reserve_bytes=2**30, gradient_checkpointing=False, optim="adamw_torch")
    (row,) = d.to_dict("records")
    e = compute(load_model("llama-3.2-1b"),
                TrainPlan(seq_len=1024, batch_size=2, gradient_checkpointing=False, optim="adamw_torch"),
                load_gpu("t4"))
    assert row["device_bytes"] == e.device_bytes
    assert row["headroom_bytes"] == e.headroom_bytes - 2**30
    assert "bf16" in row["gpu_note"]
    assert row["gpu_fix"] == "--mixed-precision fp16 --compute-dtype fp16 --dtype fp16"


def test_rows_the_closed_form_cannot_estimate_carry_the_reason_and_its_kind(no_closed_form):
    d = sweep(["mixtral-8x7b", "llama-3.2-1b"], ["h200"], seq_lens=(512,), batch_sizes=(1,), progress=False)
    mix = d[d["model"] == "mixtral-8x7b"].iloc[0]
    assert "closed form does not cover" in mix["error"] and pd.isna(mix["device_bytes"])
    assert mix["error_kind"] == UnsupportedArchitectureError.error_kind == "unsupported_architecture"
    dense = d[d["model"] == "llama-3.2-1b"].iloc[0]
    assert dense["error"] == "" and dense["error_kind"] == ""


@pytest.mark.parametrize("kind, message, label", [
    pytest.param("unsupported_architecture", "anything at all", "no closed form", id="no-closed-form"),
    pytest.param("unsupported_architecture", "needs SDPA", "no closed form", id="message-is-not-read"),
    pytest.param("invalid_spec", "mixture-of-experts", "invalid plan", id="kind-wins-over-words"),
    pytest.param("", "mixture-of-experts", "see notes", id="unknown-kind"),
    pytest.param(None, "SDPA", "see notes", id="no-kind"),
])
def test_charts_classify_errors_by_kind_not_by_message(kind, message, label):
    from memplan.report.charts import _cell_text, error_label

    assert label in error_label(kind)
    assert _cell_text({"error": message, "error_kind": kind}) == error_label(kind)


def test_every_error_kind_has_a_chart_label():
    from memplan.errors import InvalidSpecError, MissingExtraError, UnknownNameError
    from memplan.report.charts import ERROR_LABELS

    kinds = {c.error_kind for c in (UnsupportedArchitectureError, InvalidSpecError, MissingExtraError,
                                    UnknownNameError)}
    assert kinds == set(ERROR_LABELS) and memplan.MemplanError.error_kind == "error"


def test_fit_matrix_cell_of_a_moe_model_names_its_kind(tmp_path, no_closed_form):
    d = sweep(["mixtral-8x7b", "llama-3.2-1b"], ["h200"], seq_lens=(2048,), batch_sizes=(1,), progress=False)
    html = (Path(write_report(d, tmp_path)["html"])).read_text(encoding="utf-8")
    cell = re.search(r'<td class="na" data-model="mixtral-8x7b" data-gpu="h200">([^<]*)</td>', html)
    assert cell and "no closed form" in cell.group(1)


def test_notes_give_each_blocked_gpu_its_own_fix(tmp_path):
    """The notes say how to make a blocked GPU runnable, from `gpu_fix`: the flags differ by reason."""
    d = pd.concat([sweep(["llama-3.2-1b"], ["t4"], seq_lens=(512,), batch_sizes=(1,), progress=False),
                   sweep(["llama-3.2-1b"], ["v100-32gb"], seq_lens=(512,), batch_sizes=(1,), progress=False,
                         attn_implementation="flash_attention_2", mixed_precision="fp16", compute_dtype="fp16",
                         dtype="fp16")], ignore_index=True)
    html = Path(write_report(d, tmp_path)["html"]).read_text(encoding="utf-8")
    assert "Run it with --mixed-precision fp16 --compute-dtype fp16 --dtype fp16." in html
    assert "Run it with --attn-implementation sdpa." in html


def test_report_does_not_import_the_cli():
    r = subprocess.run([sys.executable, "-c",
                        "import sys, memplan.report, memplan.report.html, memplan.report.charts; "
                        "assert 'memplan.cli' not in sys.modules, 'report imports the CLI'"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_headroom_that_rounds_to_zero_prints_without_a_sign(tmp_path):
    """A plan that misses by a byte is "does not fit" with 0.00 GiB headroom, never -0.00."""
    from memplan.report.charts import _cell_text
    from memplan.report.html import _gib_s

    assert _gib_s(-1, signed=True) == "0.00" and _gib_s(None) == "–"
    text = _cell_text({"error": "", "fits": False, "headroom_bytes": -1, "max_batch_size": 0, "gpu_note": ""})
    assert text == "does not fit\n0.0 GiB"
    e = compute(load_model("llama-3.2-1b"), TrainPlan(), load_gpu("a10g"))
    d = sweep(["llama-3.2-1b"], ["a10g"], seq_lens=(2048,), batch_sizes=(1,), progress=False,
              reserve_bytes=e.headroom_bytes + 1)
    assert d.iloc[0]["headroom_bytes"] == -1 and not d.iloc[0]["fits"]
    html = Path(write_report(d, tmp_path)["html"]).read_text(encoding="utf-8")
    assert "-0.00" not in html and "0.00 GiB headroom" in html


def test_headline_plan_is_described_by_present(report):
    from memplan.present import plan_text

    _, _, html = report
    assert plan_text(TrainPlan(method="qlora", lora_r=16, seq_len=2048, batch_size=1)) in html


def test_progress_bar_on_stderr(capsys):
    sweep(["llama-3.2-1b"], ["a10g"], seq_lens=(512, 1024), batch_sizes=(1,), progress=True)
    err = capsys.readouterr().err
    assert "2/2 rows" in err and "100.0%" in err and "rows/s" in err


@pytest.mark.parametrize("kw, msg", [
    pytest.param(dict(models=[]), "no models", id="no-models"),
    pytest.param(dict(gpus=[]), "no GPUs", id="no-gpus"),
    pytest.param(dict(seq_lens=()), "seq_lens is empty", id="empty-seq"),
    pytest.param(dict(batch_sizes=(0,)), "positive", id="zero-batch"),
    pytest.param(dict(methods=("dpo",)), "unknown method", id="bad-method"),
    pytest.param(dict(models=["lama-3"]), "unknown model", id="unknown-model"),
    pytest.param(dict(seq_len=4096), "grid dimensions", id="grid-kwarg"),
])
def test_sweep_bad_input(kw, msg):
    args = dict(models=["llama-3.2-1b"], gpus=["a10g"], progress=False)
    args.update(kw)
    with pytest.raises(memplan.MemplanError, match=msg):
        sweep(args.pop("models"), args.pop("gpus"), **args)


def test_memplan_sweep_is_lazy():
    r = subprocess.run([sys.executable, "-c",
                        "import sys, memplan; assert 'pandas' not in sys.modules; "
                        "assert 'matplotlib' not in sys.modules; memplan.sweep; assert 'pandas' in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def test_report_files(report):
    out, res, _ = report
    names = {Path(f).name for f in res["files"]}
    assert {"report.html", "sweep.csv"} | {png for png, _ in CHARTS.values()} <= names
    for png, _ in CHARTS.values():
        assert (out / png).read_bytes().startswith(PNG)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_html_has_every_section_with_an_embedded_chart(report):
    _, _, html = report
    for key, (_, title) in CHARTS.items():
        m = re.search(rf"<section id='{key}'>(.*?)</section>", html, re.S)
        assert m, key
        assert title in m.group(1)
        (src,) = re.findall(r"<img [^>]*src='data:image/png;base64,([^']+)'", m.group(1))
        assert base64.b64decode(src).startswith(PNG)
    assert "<section id='rows'>" in html and "<section id='notes'>" in html
    assert "http://" not in html and "https://" not in html, "self-contained: no external resources"


def test_fit_matrix_numbers_match_the_dataframe(df, report):
    _, _, html = report
    cells = re.findall(r'data-model="([^"]+)" data-gpu="([^"]+)" data-headroom-bytes="(-?\d+)" '
                       r'data-device-bytes="(\d+)" data-max-batch-size="(\d*)" data-max-seq-len="(\d*)"', html)
    assert len(cells) == len(MODELS) * len(GPUS)
    head = df[(df["method"] == "qlora") & (df["lora_r"] == 16) & (df["seq_len"] == 2048) & (df["batch_size"] == 1)]
    for model, gpu, headroom, dev, mb, ms in cells:
        (row,) = head[(head["model"] == model) & (head["gpu"] == gpu)].to_dict("records")
        assert int(headroom) == row["headroom_bytes"] and int(dev) == row["device_bytes"]
        assert int(mb) == row["max_batch_size"] and int(ms) == row["max_seq_len"]


def test_rows_table_matches_the_dataframe(df, report):
    _, _, html = report
    devs = [int(x) for x in re.findall(r'<tr data-device-bytes="(\d+)">', html)]
    assert devs == [int(x) for x in df["device_bytes"]]


def test_csv_and_parquet_round_trip(df, report):
    out, _, _ = report
    back = pd.read_csv(out / "sweep.csv", keep_default_na=False, na_values={"lora_r": [""]})
    assert list(back.columns) == list(df.columns)
    for c in (*TERM_COLUMNS, "device_bytes", "headroom_bytes", "max_batch_size", "max_seq_len", "seq_len"):
        assert back[c].astype("int64").tolist() == df[c].astype("int64").tolist(), c
    assert back["lora_r"].isna().tolist() == df["lora_r"].isna().tolist()
    assert back["fits"].astype(str).str.lower().eq(df["fits"].astype(str).str.lower()).all()
    if (out / "sweep.parquet").exists():
        pq = pd.read_parquet(out / "sweep.parquet")
        plain = df.copy()
        plain.attrs = {}
        pd.testing.assert_frame_equal(pq, plain, check_dtype=False)


def test_write_report_reads_a_loaded_csv_back(df, tmp_path, report):
    out, _, _ = report
    back = pd.read_csv(out / "sweep.csv", keep_default_na=False,
                       na_values={c: [""] for c in ("lora_r", *TERM_COLUMNS, "device_bytes")})
    back = back[back["method"] == "qlora"].reset_index(drop=True)
    res = write_report(back, tmp_path / "again")
    assert Path(res["html"]).exists()


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_report_and_force(capsys, tmp_path):
    out = tmp_path / "rep"
    args = ["report", "--models", "llama-3.2-1b", "--gpus", "t4,a10g", "--seq-lens", "512,1024", "--batch-sizes",
            "1", "--out", str(out), "--no-progress"]
    code, stdout, err = run(capsys, *args, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["rows"] == 4 and d["rows_per_second"] > 0 and Path(d["html"]).exists()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run(capsys, *args)
    assert code == 2 and "not empty" in err and "--force" in err
    code, stdout, err = run(capsys, *args, "--force")
    assert code == 0, err
    assert "rows/s" in stdout and (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("extra, expect", [
    pytest.param(["--models", ""], "--models is empty", id="empty-models"),
    pytest.param(["--gpus", " , "], "--gpus is empty", id="empty-gpus"),
    pytest.param(["--seq-lens", ""], "--seq-lens is empty", id="empty-seq"),
    pytest.param(["--batch-sizes", "1,x"], "integers", id="bad-int"),
    pytest.param(["--ranks", "0"], "positive", id="zero-rank"),
    pytest.param(["--methods", "qlora,dpo"], "unknown method", id="bad-method"),
    pytest.param(["--models", "lama-2-7b"], "unknown model", id="unknown-model"),
    pytest.param(["--gpus", "h2000"], "unknown GPU", id="unknown-gpu"),
    pytest.param(["--reserve", "-2"], "--reserve", id="negative-reserve"),
    pytest.param(["--lora-r", "8"], "--lora-r", id="single-value-flag"),  # the grid flag is --ranks
    pytest.param(["--methods", "lora", "--quant", "nf4"], "--method qlora", id="bad-plan"),
])
def test_cli_report_bad_input_exits_2(capsys, tmp_path, extra, expect):
    args = {"--models": "llama-3.2-1b", "--gpus": "a10g", "--out": str(tmp_path / "r")}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    argv = ["report", "--no-progress"] + [x for kv in args.items() for x in kv]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("memplan: error:") and "Traceback" not in err + out
    assert expect in err
    assert not (tmp_path / "r" / "report.html").exists()


def test_cli_report_out_cannot_be_written(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        code, _, err = run(capsys, "report", "--models", "llama-3.2-1b", "--gpus", "a10g", "--out", str(out),
                           "--no-progress")
        assert code == 2 and err.startswith("memplan: error:") and "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_cli_report_read_only_dir(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run(capsys, "report", "--models", "llama-3.2-1b", "--gpus", "a10g", "--out", str(ro / "r"),
                           "--no-progress")
    finally:
        ro.chmod(0o700)
    assert code == 2 and "cannot write" in err


# ---------------------------------------------------------------------------------------------
# estimate vs a stored run
# ---------------------------------------------------------------------------------------------
def test_measured_run_reads_a_memplan_run_record(tmp_path):
    from memplan.report import compare_terms, measured_run

    spec = load_model("llama-3.2-1b")
    plan = TrainPlan(seq_len=256, batch_size=2)
    e = compute(spec, plan, load_gpu("a10g"))
    terms = {str(t): int(v) for t, v in e.terms.items()}
    record = {"schema": "memplan.run/1", "status": "success", "device": "cuda",
              "model": {"name": spec.name, "config": dict(spec.config)}, "plan": plan.to_dict(),
              "gpu": {"name": "NVIDIA A10G", "catalogue": "a10g"},
              "measured": {"terms": terms, "peak": {"allocated_bytes": e.allocated_bytes}}}
    (tmp_path / "oom.json").write_text(json.dumps({**record, "status": "oom"}))
    (tmp_path / "run.json").write_text(json.dumps(record))
    run = measured_run(tmp_path)
    assert run is not None and run["path"].endswith("run.json") and run["gpu"] == "a10g"
    est = memplan.estimate(run["model"], run["plan"], gpu=run["gpu"])
    cmp = compare_terms(est, run["terms"], run["peak_bytes"])
    assert (cmp["diff_bytes"] == 0).all()
    assert cmp.loc[cmp["term"] == "base_weights", "ratio"].item() == 1.0
    assert measured_run(tmp_path / "empty") is None


def test_measured_run_skips_what_the_record_reader_refuses(tmp_path):
    """measured_run reads through memplan.profile.record: broken files, other schemas and plans with a field
    this version does not know are skipped, never half-read."""
    from memplan.profile.record import MeasuredRun
    from memplan.report import measured_run

    spec = load_model("llama-3.2-1b")
    plan = TrainPlan(seq_len=256, device="cpu")
    e = compute(spec, plan)
    good = {"schema": "memplan.run/1", "status": "success", "device": "cpu",
            "model": {"name": spec.name, "config": dict(spec.config)}, "plan": plan.to_dict(),
            "measured": {"terms": {str(t): int(v) for t, v in e.terms.items()},
                         "peak": {"allocated_bytes": e.allocated_bytes}}}
    (tmp_path / "a-broken.json").write_text("{not json")
    (tmp_path / "b-other-schema.json").write_text(json.dumps({**good, "schema": "memplan.run/0"}))
    (tmp_path / "c-future-field.json").write_text(json.dumps({**good, "plan": {**plan.to_dict(), "warp": 9}}))
    (tmp_path / "d-good.json").write_text(json.dumps(good))
    run = measured_run(tmp_path)
    assert run["path"].endswith("d-good.json") and run["plan"] == plan and run["gpu"] is None
    assert run["peak_bytes"] == e.allocated_bytes and run["model"] == dict(spec.config)
    assert MeasuredRun.from_dict(good).train_plan() == plan
