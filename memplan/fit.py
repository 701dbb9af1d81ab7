"""Fit: does one training step of a plan fit a GPU, with how much to spare.

Every verdict in memplan (`fit`, `recommend` and its changes and GPUs, the sweep's rows) is a `Fit`
built by `Fit.of(estimate, reserve_bytes)`; the arithmetic and the reserve check live in
`memplan.headroom`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import MemplanError
from .gpu import GPUSpec
from .headroom import check_reserve, fit_limit_bytes, headroom_bytes, reserve_from_gib
from .plan import TrainPlan

if TYPE_CHECKING:  # estimate imports headroom, not this module; keep it that way
    from .estimate import Estimate

__all__ = ["Fit", "check_fit", "check_reserve", "reserve_from_gib", "fit_limit_bytes", "headroom_bytes"]

_NO_GPU = "a fit needs a GPU (--gpu NAME); see `memplan gpus`"


@dataclass(frozen=True)
class Fit:
    """The verdict for one model, plan and GPU.

    fits when `estimate.device_bytes + reserve_bytes <= gpu.memory_bytes`; `headroom_bytes` is what is
    left after both (negative when it does not fit). Build it with `Fit.of`.
    """

    estimate: Estimate
    gpu: GPUSpec
    fits: bool
    headroom_bytes: int
    reserve_bytes: int = 0

    @classmethod
    def of(cls, estimate: Estimate, reserve_bytes: int = 0) -> "Fit":
        """The verdict for an estimate made for a GPU (`estimate.gpu`), keeping `reserve_bytes` free."""
        reserve = check_reserve(reserve_bytes)
        g = estimate.gpu
        if g is None:
            raise MemplanError(_NO_GPU)
        h = headroom_bytes(g.memory_bytes, estimate.device_bytes, reserve)
        return cls(estimate=estimate, gpu=g, fits=h >= 0, headroom_bytes=h, reserve_bytes=reserve)

    def to_dict(self) -> dict[str, Any]:
        d = self.estimate.to_dict()
        d["fits"] = self.fits
        d["headroom_bytes"] = self.headroom_bytes
        d["reserve_bytes"] = self.reserve_bytes
        return d


def check_fit(model: Any, gpu: str | GPUSpec, plan: TrainPlan | None = None, *, reserve_bytes: int = 0,
              bnb_config: Any = None, lora_config: Any = None, training_args: Any = None,
              **plan_kwargs: Any) -> Fit:
    """Estimate `model` under `plan` on `gpu` and say whether it fits, keeping `reserve_bytes` free
    (for other processes, a display, a safety margin). Arguments as for `estimate`."""
    from .estimate import estimate

    if gpu is None:
        raise MemplanError(_NO_GPU)
    reserve = check_reserve(reserve_bytes)  # before the (possibly simulated) estimate
    est = estimate(model, plan, gpu=gpu, bnb_config=bnb_config, lora_config=lora_config,
                   training_args=training_args, **plan_kwargs)
    return Fit.of(est, reserve)
