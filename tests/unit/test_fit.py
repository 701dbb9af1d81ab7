"""One verdict: the reserve check, headroom and `Fit.of`, and every caller agreeing with them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import memplan
from memplan.catalogue import load_gpu, load_model
from memplan.errors import MemplanError
from memplan.estimate import compute
from memplan.fit import Fit, check_fit
from memplan.headroom import check_reserve, fit_limit_bytes, headroom_bytes, reserve_from_gib
from memplan.plan import TrainPlan
from memplan.units import GiB


@pytest.mark.parametrize("value", [0, 1, 2**30, 10**15])
def test_check_reserve_accepts_whole_bytes(value):
    assert check_reserve(value) == value


@pytest.mark.parametrize("value, words", [
    pytest.param(-1, "-1", id="negative"),
    pytest.param(True, "True", id="bool"),
    pytest.param(False, "False", id="bool-false"),
    pytest.param(1.5, "GiB", id="float"),
    pytest.param(float("inf"), "inf", id="inf"),
    pytest.param(float("nan"), "nan", id="nan"),
    pytest.param("1", "'1'", id="str"),
    pytest.param(None, "None", id="none"),
])
def test_check_reserve_refuses_in_one_line(value, words):
    with pytest.raises(MemplanError) as e:
        check_reserve(value)
    msg = str(e.value)
    assert "reserve" in msg and words in msg and "\n" not in msg


@pytest.mark.parametrize("gib, expect", [(None, 0), (0, 0), (0.0, 0), (1.5, 3 * GiB // 2), (2, 2 * GiB)])
def test_reserve_from_gib(gib, expect):
    assert reserve_from_gib(gib) == expect


@pytest.mark.parametrize("gib", [-1.0, -0.001, float("inf"), float("-inf"), float("nan"), True])
def test_reserve_from_gib_refuses(gib):
    with pytest.raises(MemplanError, match="--reserve must be a finite number of GiB >= 0"):
        reserve_from_gib(gib)


@pytest.mark.parametrize("memory, device, reserve, headroom", [
    (100, 60, 0, 40), (100, 60, 40, 0), (100, 60, 41, -1), (100, 120, 0, -20), (0, 0, 0, 0),
])
def test_headroom_arithmetic(memory, device, reserve, headroom):
    assert headroom_bytes(memory, device, reserve) == headroom
    assert fit_limit_bytes(memory, reserve) - device == headroom


def _estimate(gpu: str = "a10g", **kw):
    return compute(load_model("llama-3.2-1b"), TrainPlan(**kw), load_gpu(gpu))


@pytest.mark.parametrize("delta, fits", [(-1, True), (0, True), (1, False)])
def test_fit_of_boundary_is_inclusive(delta, fits):
    e = _estimate()  # fits an a10g with GiBs to spare
    reserve = e.gpu.memory_bytes - e.device_bytes + delta  # leaves headroom -delta
    f = Fit.of(e, reserve)
    assert (f.fits, f.headroom_bytes, f.reserve_bytes) == (fits, -delta, reserve)
    assert f.estimate is e and f.gpu is e.gpu


def test_fit_of_needs_a_gpu_and_a_valid_reserve():
    with pytest.raises(MemplanError, match="GPU"):
        Fit.of(dataclasses.replace(_estimate(), gpu=None))
    with pytest.raises(MemplanError, match="reserve"):
        Fit.of(_estimate(), -5)


@pytest.mark.parametrize("reserve", [0, GiB, 7 * GiB])
def test_every_verdict_is_the_same_fit(reserve):
    """check_fit, recommend, the estimate's own verdict and a sweep row agree on headroom and fits."""
    e = _estimate("a10g", seq_len=4096, batch_size=2)
    f = Fit.of(e, reserve)
    assert (f.fits, f.headroom_bytes) == (e.headroom_bytes - reserve >= 0, e.headroom_bytes - reserve)
    c = check_fit("llama-3.2-1b", "a10g", seq_len=4096, batch_size=2, reserve_bytes=reserve)
    assert (c.fits, c.headroom_bytes, c.reserve_bytes) == (f.fits, f.headroom_bytes, reserve)
    r = memplan.recommend("llama-3.2-1b", "a10g", seq_len=4096, batch_size=2, reserve_bytes=reserve)
    assert (r.fits, r.headroom_bytes) == (f.fits, f.headroom_bytes)
    g = next(x for x in r.gpus if x.name == "a10g")
    assert (g.fits, g.headroom_bytes) == (f.fits, f.headroom_bytes)
    if reserve == 0:
        assert (e.fits, e.headroom_bytes) == (f.fits, f.headroom_bytes)


@pytest.mark.parametrize("call", [
    pytest.param(lambda r: check_fit("llama-3.2-1b", "a10g", reserve_bytes=r), id="check_fit"),
    pytest.param(lambda r: memplan.recommend("llama-3.2-1b", "a10g", reserve_bytes=r), id="recommend"),
    pytest.param(lambda r: Fit.of(_estimate(), r), id="Fit.of"),
])
@pytest.mark.parametrize("bad", [-1, True, 0.5, float("nan")])
def test_every_caller_uses_the_one_reserve_check(call, bad):
    with pytest.raises(MemplanError, match="reserve must be a whole number of bytes >= 0"):
        call(bad)


def test_fit_and_headroom_import_no_estimate():
    """estimate.py may import headroom at its top: headroom must not import estimate (no cycle)."""
    r = subprocess.run([sys.executable, "-c", "import sys, memplan.headroom; "
                        "import memplan.estimate, memplan.fit; print('ok')"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    import memplan.headroom as h

    assert "estimate" not in h.__dict__ and "Estimate" not in h.__dict__
