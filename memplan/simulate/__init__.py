"""Meta-device simulation of a training step (needs the `sim` extra: torch, transformers, peft,
bitsandbytes). `simulate(config, plan)` → `StepResult` (see meta.py)."""

from __future__ import annotations

from typing import Any


def simulate(config: dict[str, Any], plan, steps: int = 2, round_to: int | None = None, progress: bool | None = None):
    """Trace `steps` training steps of `plan` on the meta device; see `memplan.simulate.meta.simulate`."""
    from .meta import simulate as _simulate

    return _simulate(config, plan, steps=steps, round_to=round_to, progress=progress)


__all__ = ["simulate"]
