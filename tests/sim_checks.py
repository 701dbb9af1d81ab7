"""The check every simulate-vs-real-CPU-step test makes: DESIGN.md's limit, simulate within 0.1 % of
the real step's peak live bytes -- on the peak, its phase, every term and every phase peak."""

from __future__ import annotations

TOL = 1e-3


def assert_simulate_matches(real, sim, tol: float = TOL, other_phase_tol: float | None = None) -> None:
    """`sim` (memplan.simulate) against `real` (runtime.step.cpu_step) of the same config and plan.
    `other_phase_tol`: the limit for the peaks of the phases other than the step's peak phase (real gloo
    ranks: gloo's threads free their buffers at times that vary from run to run)."""
    peak = real.peak_bytes
    assert abs(sim.peak_bytes - peak) <= tol * peak, (peak, sim.peak_bytes)
    assert sim.peak_phase == real.peak_phase
    for term, b in real.terms.items():
        assert abs(sim.terms[term] - b) <= tol * peak, (term, b, sim.terms[term])
    assert set(sim.phase_peaks) == set(real.phase_peaks)
    for phase, b in real.phase_peaks.items():
        limit = tol if other_phase_tol is None or phase == real.peak_phase else other_phase_tol
        assert abs(sim.phase_peaks[phase] - b) <= limit * peak, (phase, b, sim.phase_peaks[phase])
