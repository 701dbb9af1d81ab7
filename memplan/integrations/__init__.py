"""Integrations with training frameworks. `MemplanCallback` (transformers.Trainer, TRL SFTTrainer) loads
transformers on first access; importing this package imports nothing heavy."""

from __future__ import annotations

from typing import Any

__all__ = ["MemplanCallback", "plan_for_trainer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'memplan.integrations' has no attribute {name!r}")
