"""memplan.search: the integer searches every caller shares (recommend, sweep, profile), checked by brute force."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memplan.search import MAX_BATCH_SIZE, MAX_SEQ_LEN, gallop_bisect, max_fitting

CURVES = [
    pytest.param(lambda n: 1000 + 7 * n, id="linear"),
    pytest.param(lambda n: 5 * n * n + 3 * n, id="quadratic"),
    pytest.param(lambda n: 10 * (n // 37), id="steps"),
    pytest.param(lambda n: int(n ** 0.5 * 1000), id="concave"),
    pytest.param(lambda n: 1 << min(n, 60), id="exponential"),
]


@pytest.mark.parametrize("f", CURVES)
@pytest.mark.parametrize("limit", [0, 1005, 10_000, 123_456, 10**7])
def test_max_fitting_equals_brute_force(f, limit):
    cap = 5000
    expect = max([n for n in range(1, cap + 1) if f(n) <= limit], default=0)
    n, capped = max_fitting(f, limit, cap=cap)
    assert n == expect
    assert capped == (expect == cap)


@pytest.mark.parametrize("f", CURVES)
def test_max_fitting_from_lo(f):
    lo, cap, limit = 10, 900, 20_000
    expect = max([n for n in range(lo, cap + 1) if f(n) <= limit], default=lo - 1)
    assert max_fitting(f, limit, lo=lo, cap=cap)[0] == expect


def test_max_fitting_uses_known_points_and_stays_exact():
    f = lambda n: 3 * n + 11  # noqa: E731
    calls = []

    def g(n):
        calls.append(n)
        return f(n)

    known = {n: f(n) for n in (1, 2, 4, 8, 512, 1024)}
    n, _ = max_fitting(g, 3 * 700 + 11, cap=10**6, known=known)
    assert n == 700
    assert len(calls) <= 6


def test_max_fitting_typical_cost_is_a_handful_of_evaluations():
    calls = []

    def linear(n):
        calls.append(n)
        return 7_000_000_000 + 350_000 * n

    n, capped = max_fitting(linear, 80 * 2**30, cap=MAX_SEQ_LEN)
    assert not capped and linear(n) <= 80 * 2**30 < linear(n + 1)
    assert len(calls) <= 8


def test_max_fitting_rejects_an_empty_range():
    with pytest.raises(ValueError):
        max_fitting(lambda n: n, 10, lo=5, cap=4)


@pytest.mark.parametrize("truth", [0, 1, 2, 3, 7, 8, 50, 99, 100])
@pytest.mark.parametrize("start", [1, 4, 7, 12, 37, 100])
def test_gallop_bisect_equals_brute_force(truth, start):
    tried = []

    def fits(u):
        tried.append(u)
        return u <= truth

    largest, capped, exhausted = gallop_bisect(fits, start, cap=100, max_trials=30)
    assert (largest, capped, exhausted) == (truth, truth == 100, False)
    assert len(tried) == len(set(tried)), "each value is tried once"
    if truth and start == truth and truth < 100:
        assert tried == [truth, truth + 1]  # an exact prediction costs two runs


def test_gallop_bisect_budget():
    largest, capped, exhausted = gallop_bisect(lambda u: u <= 1000, 1, cap=4096, max_trials=3)
    assert exhausted and not capped and largest == 4  # 1, 2, 4 fit; the budget ends the search there


def test_caps_are_shared():
    import memplan.profile.search as profile_search

    recommend = sys.modules["memplan.recommend"]  # `memplan.recommend` is the function
    assert (MAX_BATCH_SIZE, MAX_SEQ_LEN) == (2**16, 2**20)
    assert profile_search.gallop_bisect is gallop_bisect and recommend.max_fitting is max_fitting


@pytest.mark.parametrize("module", ["search.py", "headroom.py", "present.py"])
def test_shared_modules_load_alone(module):
    """search, headroom and present are standard library only: each file loads on its own (headroom and
    present with their two tiny memplan dependencies), without torch, numpy or pandas."""
    import memplan

    path = Path(memplan.__file__).parent / module
    code = ("import importlib.util, sys, types\n"
            "pkg = types.ModuleType('mp'); pkg.__path__ = []; sys.modules['mp'] = pkg\n"
            f"for name in ('errors', 'units', {module[:-3]!r}):\n"
            f"    spec = importlib.util.spec_from_file_location('mp.' + name, {str(path.parent)!r} + '/' + name + '.py')\n"
            "    m = importlib.util.module_from_spec(spec); sys.modules['mp.' + name] = m; spec.loader.exec_module(m)\n"
            "bad = [m for m in ('torch', 'numpy', 'pandas', 'matplotlib', 'memplan') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
