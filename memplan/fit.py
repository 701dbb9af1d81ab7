"""Fit: does one training step of a plan fit a GPU, with how much to spare.

Every verdict in memplan (`fit`, `recommend` and its changes and GPUs, the sweep's rows) is a `Fit`
built by `Fit.of(estimate, reserve_bytes)`; the arithmetic and the reserve check live in
`memplan.headroom`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import MemplanError
from .gpu import GPUSpec, gpu_fix, gpu_support  # noqa: F401  (the one rule lives with the GPU spec)
from .headroom import check_reserve, fit_limit_bytes, headroom_bytes, reserve_from_gib
from .plan import TrainPlan
from .present import gib as _gib, plan_dict

if TYPE_CHECKING:  # estimate imports headroom, not this module; keep it that way
    from .estimate import Estimate

__all__ = ["Fit", "check_fit", "check_reserve", "reserve_from_gib", "fit_limit_bytes", "headroom_bytes",
           "gpu_support", "gpu_fix", "FITS", "FITS_PAGING", "DOES_NOT_FIT", "CANNOT_RUN", "VERDICT_TEXT"]

_NO_GPU = "a fit needs a GPU (--gpu NAME); see `memplan gpus`"

#: The four verdicts (`Fit.verdict`, the `verdict` key of --json), and their words in text output.
FITS, FITS_PAGING, DOES_NOT_FIT, CANNOT_RUN = "fits", "fits_paging", "does_not_fit", "cannot_run"
VERDICT_TEXT = {FITS: "fits", FITS_PAGING: "fits only by paging to host memory every step",
                DOES_NOT_FIT: "DOES NOT FIT", CANNOT_RUN: "CANNOT RUN AS PLANNED"}


@dataclass(frozen=True)
class Fit:
    """The verdict for one model, plan and GPU.

    fits when the GPU can run the plan as planned (`gpu_support`: e.g. no bf16 on a T4) and
    `estimate.device_bytes + reserve_bytes <= gpu.memory_bytes`; `headroom_bytes` is what is left
    after both (negative when it does not fit). `blocked` says why the GPU cannot run the plan and
    `fix` the flags that let it; `paging` is True when the plan fits but its paged optimizer state
    (`estimate.paged_bytes`, CUDA managed memory) does not fit in the headroom, so it pages to host
    memory every step. `verdict` names the outcome (FITS, FITS_PAGING, DOES_NOT_FIT, CANNOT_RUN).
    Build it with `Fit.of`.
    """

    estimate: Estimate
    gpu: GPUSpec
    fits: bool
    headroom_bytes: int
    reserve_bytes: int = 0
    blocked: str = ""
    fix: str = ""
    paging: bool = False
    #: host RAM per node the job may use (None: not checked, only reported)
    host_ram_bytes: int | None = None

    @property
    def host_fits(self) -> bool | None:
        """Whether the node's host RAM holds `estimate.host` (None when `host_ram_bytes` is not given)."""
        if self.host_ram_bytes is None:
            return None
        return self.estimate.host_bytes <= self.host_ram_bytes

    @property
    def memory_fits(self) -> bool:
        """The memory verdict alone (whether or not the GPU can run the plan): every rank's device
        memory, and the host RAM when `host_ram_bytes` is given."""
        return self.headroom_bytes >= 0 and self.host_fits is not False

    @property
    def verdict(self) -> str:
        if not self.memory_fits:
            return DOES_NOT_FIT
        if self.blocked:
            return CANNOT_RUN
        return FITS_PAGING if self.paging else FITS

    @property
    def verdict_text(self) -> str:
        """The verdict in words, with the reason and the fix when the GPU cannot run the plan."""
        text = VERDICT_TEXT[self.verdict]
        if self.host_fits is False:
            text += (f" (host RAM: {_gib(self.estimate.host_bytes)} GiB needed per node, "
                     f"{_gib(self.host_ram_bytes)} GiB given)")
        if self.blocked:
            text += ("; and it " + VERDICT_TEXT[CANNOT_RUN].lower() if self.verdict != CANNOT_RUN else "")
            text += f": {self.blocked}" + (f"; run it with {self.fix}" if self.fix else "")
        elif self.paging:
            text += (f" ({_gib(self.estimate.paged_bytes)} GiB of paged optimizer state, "
                     f"{_gib(max(self.headroom_bytes, 0))} GiB free on the device)")
        return text

    @property
    def notes(self) -> tuple[str, ...]:
        """The notes of the estimate, plus the verdict's reason when it is not a plain fit."""
        extra = []  # the estimate itself says why the GPU cannot run the plan (memplan.gpu.gpu_notes)
        if self.paging:
            extra.append(f"fits only by paging to host memory every step: {_gib(self.estimate.paged_bytes)} GiB of "
                         f"paged optimizer state (CUDA managed memory) but {_gib(max(self.headroom_bytes, 0))} GiB "
                         "left on the device; expect slower steps, or free memory (see `memplan recommend`)")
        return tuple(extra) + tuple(self.estimate.notes)

    def __repr__(self) -> str:
        e = self.estimate
        return (f"Fit({e.model.name!r} on {self.gpu.name!r}: {self.verdict}, device {_gib(e.device_bytes)} GiB, "
                f"headroom {_gib(self.headroom_bytes)} GiB, reserve {_gib(self.reserve_bytes)} GiB)")

    @classmethod
    def of(cls, estimate: Estimate, reserve_bytes: int = 0, host_ram_bytes: int | None = None) -> "Fit":
        """The verdict for an estimate made for a GPU (`estimate.gpu`), keeping `reserve_bytes` free;
        a distributed plan's estimate is its busiest rank, so every rank fits when it does. With
        `host_ram_bytes` (per node) the host RAM the job needs (`estimate.host`) must fit too."""
        reserve = check_reserve(reserve_bytes)
        if host_ram_bytes is not None and (isinstance(host_ram_bytes, bool) or not isinstance(host_ram_bytes, int)
                                           or host_ram_bytes < 0):
            raise MemplanError(f"host RAM (--host-ram GiB) must be a non-negative size, got {host_ram_bytes!r}")
        g = estimate.gpu
        if g is None:
            raise MemplanError(_NO_GPU)
        h = headroom_bytes(g.memory_bytes, estimate.device_bytes, reserve)
        blocked = gpu_support(g, estimate.plan)
        fix = gpu_fix(g, estimate.plan)[1] if blocked else ""
        host_ok = host_ram_bytes is None or estimate.host_bytes <= host_ram_bytes
        fits = h >= 0 and not blocked and host_ok
        paging = fits and estimate.paged_bytes > h
        return cls(estimate=estimate, gpu=g, fits=fits, headroom_bytes=h, reserve_bytes=reserve,
                   blocked=blocked, fix=fix, paging=paging, host_ram_bytes=host_ram_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = self.estimate.to_dict()
        d["plan"] = plan_dict(self.estimate.plan)
        d["fits"] = self.fits
        d["verdict"] = self.verdict
        d["verdict_text"] = self.verdict_text
        d["blocked"] = self.blocked or None
        d["fix"] = self.fix or None
        d["paging"] = self.paging
        d["headroom_bytes"] = self.headroom_bytes
        d["reserve_bytes"] = self.reserve_bytes
        if self.host_ram_bytes is not None or self.estimate.host:
            d["host_ram_bytes"] = self.host_ram_bytes
            d["host_fits"] = self.host_fits
        d["notes"] = list(self.notes)
        return d



def check_fit(model: Any, gpu: str | GPUSpec, plan: TrainPlan | None = None, *, reserve_bytes: int = 0,
              bnb_config: Any = None, lora_config: Any = None, training_args: Any = None,
              config: Any = None, host_ram_bytes: int | None = None, **plan_kwargs: Any) -> Fit:
    """Estimate `model` under `plan` on `gpu` and say whether it fits, keeping `reserve_bytes` free
    (for other processes, a display, a safety margin). Arguments as for `estimate`. A distributed plan
    fits when every rank fits its GPU and, with `host_ram_bytes` (per node), the host RAM holds what
    the node's ranks offload and load."""
    from .estimate import estimate

    if gpu is None:
        raise MemplanError(_NO_GPU)
    reserve = check_reserve(reserve_bytes)  # before the (possibly simulated) estimate
    est = estimate(model, plan, gpu=gpu, bnb_config=bnb_config, lora_config=lora_config,
                   training_args=training_args, config=config, **plan_kwargs)
    return Fit.of(est, reserve, host_ram_bytes)
