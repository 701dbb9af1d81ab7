"""Short one-line reprs of the results (issue 14: `print(result)` must not dump every field)."""
import memplan
from memplan.fit import Fit


def _one_line(r: str, limit: int = 320) -> None:
    assert "\n" not in r and len(r) < limit, r


def test_estimate_repr_names_model_plan_peak_and_verdict():
    e = memplan.estimate("llama-2-7b", gpu="rtx-4090")
    r = repr(e)
    _one_line(r)
    assert r.startswith("Estimate('llama-2-7b': QLoRA r=16 (nf4 + double quant base)")
    assert "micro-batch 1 x seq 2048" in r and ", cuda;" in r
    assert f"peak {e.device_bytes / 2**30:.2f} GiB at {e.peak_phase}" in r
    assert "on 'rtx-4090': fits, headroom" in r
    # the dataclass did not overwrite it with the field dump
    assert "terms=" not in r and "Term." not in r and "moments" not in r
    assert str(e) == r


def test_estimate_repr_without_gpu():
    r = repr(memplan.estimate("llama-2-7b", seq_len=512))
    _one_line(r)
    assert "seq 512" in r and r.endswith(", no GPU)")


def test_estimate_repr_gives_the_one_verdict():
    # memory alone fits on a T4, but the bf16 plan cannot run there: fits, the repr and check_fit agree
    e = memplan.estimate("llama-2-7b", gpu="t4")
    assert e.fits is False and Fit.of(e).memory_fits
    assert Fit.of(e).verdict == "cannot_run"
    assert "on 't4': cannot_run" in repr(e)
    assert "does_not_fit" in repr(memplan.estimate("llama-3.1-70b", gpu="t4", mixed_precision="fp16",
                                                   compute_dtype="fp16", dtype="fp16"))
    assert ": fits_paging," in repr(memplan.estimate("llama-3-8b", gpu="a100-40gb", method="full"))


def test_fit_and_recommendation_reprs_stay_one_line():
    _one_line(repr(memplan.check_fit("llama-2-7b", "rtx-4090")))
    _one_line(repr(memplan.recommend("llama-2-7b", "rtx-4090")))
