"""Integer searches (standard library only): the largest n that fits, by bytes or by trials.

- `max_fitting(value, limit, cap=...)`: the largest n with value(n) <= limit for a non-decreasing,
  cheap `value` (bytes from the closed form): exact, typically 4-8 evaluations (recommend, the
  report's sweep, the profiler's prediction).
- `gallop_bisect(fits, start, cap, max_trials)`: the largest n with fits(n) for an expensive,
  monotone yes/no trial (a real training step), starting from a prediction, under a trial budget
  (the profiler's confirmation).
- `MAX_BATCH_SIZE`, `MAX_SEQ_LEN`: the upper ends every search shares.
"""

from __future__ import annotations

from typing import Callable, Mapping

#: Upper ends of the searches. 2**20 tokens is beyond every catalogued context window (recommend
#: notes when the model's max_position_embeddings is exceeded); 2**16 sequences per micro-batch is
#: beyond any practical micro-batch.
MAX_SEQ_LEN = 2**20
MAX_BATCH_SIZE = 2**16

__all__ = ["MAX_BATCH_SIZE", "MAX_SEQ_LEN", "max_fitting", "gallop_bisect", "TrialBudgetSpent"]


def max_fitting(value: Callable[[int], int], limit: int, *, lo: int = 1, cap: int,
                known: Mapping[int, int] | None = None) -> tuple[int, bool]:
    """The largest n in [lo, cap] with value(n) <= limit, for a non-decreasing `value`.

    Returns (n, capped): n = lo - 1 when value(lo) > limit; capped is True when value(cap) <= limit
    (the answer is "at least cap"). Exponential search brackets the boundary, then bisection closes
    it; both are steered by linear interpolation of the byte counts (memory is close to linear in
    batch and sequence length), and every interpolated step is followed by a bisection step unless it
    at least halved the bracket, so the worst case stays O(log cap) evaluations and a typical search
    takes 4-8. The invariant value(a) <= limit < value(b) holds throughout, so the result is exact:
    n fits and n + 1 does not. `known`: values already computed ({n: value(n)}), used as a head start.
    """
    if cap < lo:
        raise ValueError(f"cap {cap} < lo {lo}")
    pts = sorted((n, v) for n, v in (known or {}).items() if lo <= n <= cap)
    fit_pts = [(n, v) for n, v in pts if v <= limit]
    over = [(n, v) for n, v in pts if v > limit and (not fit_pts or n > fit_pts[-1][0])]
    if fit_pts:
        a, fa = fit_pts[-1]
    else:
        fa = value(lo)
        if fa > limit:
            return lo - 1, False
        a = lo
    prev: tuple[int, int] | None = fit_pts[-2] if len(fit_pts) > 1 else None
    b = fb = None  # first known n that does not fit
    if over:
        b, fb = over[0]
    # ---- bracket: gallop upwards, guided by the slope of the last two points
    while b is None:
        if a >= cap:
            return cap, True
        nxt = 2 * a if a > 0 else 1
        if prev is not None and fa > prev[1]:
            slope = (fa - prev[1]) / (a - prev[0])
            guess = a + int((limit - fa) / slope) + 1  # just past the linear boundary
            nxt = max(a + 1, min(guess, 64 * a + 64))  # trust the slope, within reason
        nxt = min(nxt, cap)
        fn = value(nxt)
        if fn <= limit:
            prev, a, fa = (a, fa), nxt, fn
        else:
            b, fb = nxt, fn
    # ---- close the bracket [a, b]
    while b - a > 1:
        width = b - a
        g = a + int((limit - fa) * (b - a) / (fb - fa)) if fb > fa else (a + b) // 2
        g = min(max(g, a + 1), b - 1)
        fg = value(g)
        if fg <= limit:
            a, fa = g, fg
            h = g + 1  # the boundary is usually right here: probe the neighbour
        else:
            b, fb = g, fg
            h = g - 1
        if a < h < b:
            fh = value(h)
            if fh <= limit:
                a, fa = h, fh
            else:
                b, fb = h, fh
        if b - a > 1 and b - a > width // 2:  # interpolation did not halve the bracket: bisect once
            m = (a + b) // 2
            fm = value(m)
            if fm <= limit:
                a, fa = m, fm
            else:
                b, fb = m, fm
    return a, False


class TrialBudgetSpent(Exception):
    """Raised inside `gallop_bisect` when the next trial would exceed `max_trials`."""


def gallop_bisect(fits: Callable[[int], bool], start: int, cap: int, max_trials: int) -> tuple[int, bool, bool]:
    """(largest u in [1, cap] with fits(u), capped, exhausted) for a monotone `fits`, from `start`.

    From `start` (a prediction): if it fits, gallop upwards (+1, +2, +4, ...) until a trial does not;
    else gallop downwards likewise; then bisect between the largest value that fit and the smallest
    that did not. Each value is tried at most once. Returns 0 when fits(1) is False. `capped`:
    fits(cap) held; `exhausted`: the trial budget ran out first (the result is then the largest
    value confirmed so far).
    """
    seen: dict[int, bool] = {}

    def t(u: int) -> bool:
        if u not in seen:
            if len(seen) >= max_trials:
                raise TrialBudgetSpent
            seen[u] = fits(u)
        return seen[u]

    lo, hi = 0, None
    capped = exhausted = False
    start = min(max(1, start), cap)
    try:
        if t(start):
            lo, step = start, 1
            while True:
                if lo >= cap:
                    capped = True
                    break
                u = min(lo + step, cap)
                if t(u):
                    lo, step = u, step * 2
                else:
                    hi = u
                    break
        else:
            hi, step = start, 1
            while hi > 1:
                u = max(hi - step, 1)
                if t(u):
                    lo = u
                    break
                hi, step = u, step * 2
        while hi is not None and hi - lo > 1:
            m = (lo + hi) // 2
            if t(m):
                lo = m
            else:
                hi = m
    except TrialBudgetSpent:
        exhausted = True
    return lo, capped, exhausted
