"""memplan: GPU memory for QLoRA/LoRA fine-tuning, term by term, before you rent the GPU.

    >>> import memplan
    >>> e = memplan.estimate("llama-3-8b", gpu="a100-80gb", seq_len=4096)
    >>> e.fits, e.device_bytes

The core imports nothing heavy (no torch, transformers, numpy); `memplan.simulate` loads the `sim`
extra on first access.
"""

from __future__ import annotations

from typing import Any

from .catalogue import list_gpus, list_models, load_gpu, load_model
from .errors import MemplanError
from .estimate import Estimate, estimate
from .fit import Fit, check_fit
from .gpu import GPUSpec
from .model import ModelSpec
from .plan import TrainPlan
from .terms import Term

__version__ = "0.1.0"

__all__ = [
    "estimate", "check_fit", "simulate", "Term", "TrainPlan", "ModelSpec", "GPUSpec", "Estimate", "Fit",
    "load_model", "load_gpu", "list_models", "list_gpus", "MemplanError", "__version__",
]


def __getattr__(name: str) -> Any:
    # `memplan.simulate` needs torch & co.; import it only when someone asks for it.
    if name == "simulate":
        from .simulate import simulate

        # importing the subpackage bound `memplan.simulate` to the module; expose the function
        globals()["simulate"] = simulate
        return simulate
    raise AttributeError(f"module 'memplan' has no attribute {name!r}")
