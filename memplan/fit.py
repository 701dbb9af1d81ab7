"""Fit: does one training step of a plan fit a GPU, with how much to spare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import MemplanError
from .estimate import Estimate, estimate
from .gpu import GPUSpec
from .plan import TrainPlan


@dataclass(frozen=True)
class Fit:
    """The verdict for one model, plan and GPU.

    fits when `estimate.device_bytes + reserve_bytes <= gpu.memory_bytes`; `headroom_bytes` is what is
    left after both (negative when it does not fit).
    """

    estimate: Estimate
    gpu: GPUSpec
    fits: bool
    headroom_bytes: int
    reserve_bytes: int = 0

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
    if gpu is None:
        raise MemplanError("fit needs a GPU (--gpu NAME); see `memplan gpus`")
    if not isinstance(reserve_bytes, int) or isinstance(reserve_bytes, bool) or reserve_bytes < 0:
        raise MemplanError(f"reserve must be a non-negative number of bytes, got {reserve_bytes!r}")
    est = estimate(model, plan, gpu=gpu, bnb_config=bnb_config, lora_config=lora_config,
                   training_args=training_args, **plan_kwargs)
    g = est.gpu
    assert g is not None  # estimate() loads the GPU it is given
    headroom = g.memory_bytes - est.device_bytes - reserve_bytes
    return Fit(estimate=est, gpu=g, fits=headroom >= 0, headroom_bytes=headroom, reserve_bytes=reserve_bytes)
