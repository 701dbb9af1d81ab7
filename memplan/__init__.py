"""memplan: GPU memory for QLoRA/LoRA fine-tuning, term by term, before you rent the GPU.

    >>> import memplan
    >>> e = memplan.estimate("llama-3-8b", gpu="a100-80gb", seq_len=4096)
    >>> e.fits, e.device_bytes

The core imports nothing heavy (no torch, transformers, numpy); `memplan.simulate` loads the `sim`
extra and `memplan.sweep` the `report` extra (pandas, matplotlib) on first access.
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
# NB: imported eagerly (stdlib only, a few ms) because the function shares its name with its module:
# a lazy import would leave `memplan.recommend` bound to the module once anything imported it.
from .recommend import Recommendation, recommend
from .terms import Term

__version__ = "0.1.0"

__all__ = [
    "estimate", "check_fit", "recommend", "sweep", "simulate", "Term", "TrainPlan", "ModelSpec", "GPUSpec",
    "Estimate", "Fit", "Recommendation", "profile", "MeasuredRun",
    "load_model", "load_gpu", "list_models", "list_gpus", "MemplanError", "__version__",
]


def __getattr__(name: str) -> Any:
    # `memplan.simulate` needs torch & co.; import it only when someone asks for it.
    if name == "simulate":
        from .simulate import simulate

        # importing the subpackage bound `memplan.simulate` to the module; expose the function
        globals()["simulate"] = simulate
        return simulate
    if name in ("profile", "MeasuredRun"):
        # the package memplan.profile is callable (memplan.profile(...) runs profile.profile); torch & co.
        # load only when a profile runs
        import importlib

        _profile_pkg = importlib.import_module(".profile", __name__)  # not `from . import`: that recurses here
        return _profile_pkg if name == "profile" else _profile_pkg.MeasuredRun
    if name == "sweep":  # pandas + matplotlib (the `report` extra)
        from .report import sweep

        globals()["sweep"] = sweep
        return sweep
    raise AttributeError(f"module 'memplan' has no attribute {name!r}")
