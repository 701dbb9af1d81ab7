"""One verdict everywhere (issue 14): a GPU that cannot run the plan as planned (no bf16), paged optimizer
state that does not fit, ambiguous GPU names, the safety margin of suggested changes, and the warning for
sequences past max_position_embeddings, in estimate, fit, recommend and the report alike."""

from __future__ import annotations

import json

import pytest

import memplan
from memplan.cli import main
from memplan.fit import CANNOT_RUN, FITS, FITS_PAGING, Fit, check_fit
from memplan.recommend import recommend

FIX = "--mixed-precision fp16 --compute-dtype fp16 --dtype fp16"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# bf16 plan on a GPU without bf16: "cannot run as planned", with the fix
# ---------------------------------------------------------------------------------------------
def test_fit_bf16_on_t4_cannot_run_as_planned(capsys):
    code, out, err = run(capsys, "fit", "llama-2-7b", "--gpu", "t4")
    assert code == 1, err
    assert "CANNOT RUN AS PLANNED" in out and "no bf16" in out and FIX in out
    code, out, _ = run(capsys, "fit", "llama-2-7b", "--gpu", "t4", "--json")
    d = json.loads(out)
    assert code == 1 and d["fits"] is False and d["verdict"] == CANNOT_RUN and d["fix"] == FIX
    assert any("cannot run as planned" in n for n in d["notes"])


def test_fit_with_the_fix_fits(capsys):
    code, out, err = run(capsys, "fit", "llama-2-7b", "--gpu", "t4", *FIX.split())
    assert code == 0, err
    assert "-> fits" in out


def test_estimate_gives_fits_verdict(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--gpu", "t4")
    assert code == 0 and "CANNOT RUN AS PLANNED" in out and FIX in out
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--gpu", "t4", "--json")
    d = json.loads(out)
    assert d["fits"] is False and d["verdict"] == CANNOT_RUN and d["fix"] == FIX


def test_recommend_agrees_with_fit_on_t4(capsys):
    r = recommend("llama-2-7b", "t4")
    f = check_fit("llama-2-7b", "t4")
    assert r.fits is f.fits is False and r.verdict == f.verdict == CANNOT_RUN
    assert r.run_plan.mixed_precision == "fp16" and r.changes and r.changes[0].key == "gpu_fix"
    assert r.changes[0].flags == FIX and r.changes[0].fits
    t4 = next(g for g in r.gpus if g.name == "t4")
    assert not t4.fits and not t4.supported
    code, out, _ = run(capsys, "recommend", "llama-2-7b", "--gpu", "t4")
    assert code == 1 and "CANNOT RUN AS PLANNED" in out and FIX in out


def test_flash_attention_on_t4_cannot_run():
    f = check_fit("llama-2-7b", "t4", attn_implementation="flash_attention_2", mixed_precision="fp16",
                  compute_dtype="fp16", dtype="fp16")
    assert f.verdict == CANNOT_RUN and f.fix == "--attn-implementation sdpa"


def test_report_rows_agree_with_fit():
    pytest.importorskip("pandas")
    from memplan.report.charts import _cell_headroom, _cell_text
    from memplan.report.sweep import sweep

    df = sweep(["llama-2-7b"], ["t4", "a10g"], seq_lens=(1024,), batch_sizes=(1,), progress=False)
    for _, row in df.iterrows():
        f = check_fit("llama-2-7b", row["gpu"], seq_len=1024)
        assert bool(row["fits"]) == f.fits
    t4 = df[df["gpu"] == "t4"].iloc[0].to_dict()
    assert "cannot run" in _cell_text(t4) and _cell_headroom(t4) is None  # grey, not green


# ---------------------------------------------------------------------------------------------
# paged optimizer state that does not fit in the headroom
# ---------------------------------------------------------------------------------------------
def test_fit_only_by_paging(capsys):
    f = check_fit("llama-3-8b", "a100-40gb", method="full")
    assert f.fits and f.paging and f.verdict == FITS_PAGING
    assert f.estimate.paged_bytes > f.headroom_bytes
    code, out, _ = run(capsys, "fit", "llama-3-8b", "--method", "full", "--gpu", "a100-40gb")
    assert code == 0 and "fits only by paging to host memory every step" in out
    code, out, _ = run(capsys, "fit", "llama-3-8b", "--method", "full", "--gpu", "a100-40gb", "--json")
    d = json.loads(out)
    assert d["paging"] is True and d["verdict"] == FITS_PAGING
    assert any("paging to host memory" in n for n in d["notes"])


def test_recommend_names_paging_and_offers_changes():
    r = recommend("llama-3-8b", "a100-40gb", method="full")
    assert r.verdict == FITS_PAGING
    assert r.changes, "a plan that pages every step gets suggestions"
    assert all(not c.paging for c in r.changes)
    a100_40 = next(g for g in r.gpus if g.name == "a100-40gb")
    assert a100_40.paging and r.smallest_gpu != "a100-40gb"


def test_plain_fit_does_not_page():
    f = check_fit("llama-2-7b", "a10g")
    assert f.verdict == FITS and not f.paging


# ---------------------------------------------------------------------------------------------
# ambiguous GPU names, safety margin, negative zero, max_position_embeddings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, choices", [("v100", ("v100-16gb", "v100-32gb")),
                                           ("a100", ("a100-40gb", "a100-80gb")),
                                           ("A100", ("a100-40gb", "a100-80gb"))])
def test_ambiguous_gpu_alias_is_an_error(capsys, name, choices):
    code, out, err = run(capsys, "fit", "llama-2-7b", "--gpu", name)
    assert code == 2 and out == ""
    assert err.startswith("memplan: error:") and "ambiguous" in err and all(c in err for c in choices)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, want", [("h100", "h100-80gb"), ("a10", "a10g"), ("4090", "rtx-4090"),
                                        ("Tesla V100-SXM2-32GB", "v100-32gb")])
def test_unambiguous_aliases_still_resolve(name, want):
    assert memplan.load_gpu(name).name == want


def test_recommend_changes_keep_a_margin(capsys):
    r = recommend("llama-2-13b", "rtx-4090", seq_len=32768)
    assert not r.fits and r.margin_bytes > 0
    for c in r.changes:
        assert c.headroom_bytes >= r.margin_bytes
    code, out, _ = run(capsys, "recommend", "llama-2-13b", "--gpu", "rtx-4090", "--seq-len", "32768")
    assert "suggested changes keep at least" in out
    assert "-0.00" not in out


@pytest.mark.parametrize("argv", [
    ["estimate", "llama-2-7b", "--seq-len", "8192"],
    ["fit", "llama-2-7b", "--gpu", "h200", "--seq-len", "8192"],
    ["recommend", "llama-2-7b", "--gpu", "h200", "--seq-len", "8192"],
], ids=["estimate", "fit", "recommend"])
def test_seq_len_past_max_position_embeddings_warns(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code in (0, 1)
    assert "memplan: warning:" in err and "max_position_embeddings (4096)" in err


def test_report_warns_past_max_position_embeddings(capsys, tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, "report", "--models", "llama-2-7b", "--gpus", "a10g", "--seq-lens", "1024,8192",
                         "--batch-sizes", "1", "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 0, err
    assert "memplan: warning:" in err and "8192" in err and "max_position_embeddings" in err


def test_no_warning_within_max_position_embeddings(capsys):
    code, _, err = run(capsys, "estimate", "llama-2-7b", "--seq-len", "4096")
    assert code == 0 and err == ""


# ---------------------------------------------------------------------------------------------
# short reprs
# ---------------------------------------------------------------------------------------------
def test_short_reprs():
    f = check_fit("llama-2-7b", "a10g")
    r = recommend("llama-2-7b", "a10g")
    for obj in (f, r):  # NB: Estimate's repr lives in memplan/estimate.py (not changed here)
        text = repr(obj)
        assert len(text) < 300 and "\n" not in text, text
    assert repr(f).startswith("Fit(") and "fits" in repr(f)
    assert repr(r).startswith("Recommendation(")
    assert isinstance(f, Fit)
