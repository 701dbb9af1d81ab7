"""Meta-device simulation of a training step (needs the `sim` extra: torch, transformers, peft,
bitsandbytes). `simulate(config, plan)` → `StepResult`; see `memplan.simulate.meta` for how it works,
the patches it applies and its known limitations. Importing this package imports no heavy module.
"""

from __future__ import annotations

from typing import Any


def simulate(config: dict[str, Any], plan, steps: int = 2, round_to: int | None = None,
             progress: bool | None = None, full_warmup: bool = False):
    """Trace `steps` training steps of `plan` on the meta device (see `memplan.simulate.meta.simulate`).

    Raises `memplan.errors.MissingExtraError` when torch, transformers, peft or bitsandbytes is missing.
    """
    from .meta import simulate as _simulate

    return _simulate(config, plan, steps=steps, round_to=round_to, progress=progress, full_warmup=full_warmup)


__all__ = ["simulate"]
