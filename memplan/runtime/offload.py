"""Activation offloading as TRL's SFTTrainer runs it, on the CPU and meta devices, under the tracker.

TRL 1.16 (`trl/models/activation_offloading.py`, torchtune's design) wraps each `training_step`
(forward and backward of one micro-batch, `SFTTrainer.training_step`) in
`get_act_offloading_ctx_manager(model)`: an `OffloadActivations` (`saved_tensors_hooks`) whose pack
hook copies every saved tensor of at least `min_offload_size` = 1024 bytes that is on the accelerator,
is not an `nn.Parameter`/`Buffer` nor shares a parameter's storage, into a host tensor
(`torch.empty_like(x, pin_memory=True, device="cpu")` + `copy_`), and whose unpack hook brings it
back (`.to(accelerator)`) when backward needs it. lm_head's forward runs under a `NoOpManager`
(its saved tensors stay on the device), as does any module named "liger". With checkpointing the
hooks see only what is saved outside the checkpointed layers, the layers' inputs among them (torch's
non-reentrant checkpoint saves them as SavedVariables); the recomputation's saved tensors go through
checkpoint's own hooks.

Here the real hooks run, unchanged; only their environment is patched (`offload_context`):
- `OffloadActivations` reads the accelerator from `torch.accelerator.current_accelerator()`, which is
  None on a CPU-only machine (TRL then fails with AttributeError): it is told the step's device
  ("cpu" for a real CPU step, "meta" for simulate) is the accelerator, so that the pack hook's device
  test passes as on CUDA, and `torch.cpu` (plus a no-op `empty_cache`) is its device module;
- `use_pin_memory=False` (pinning needs an accelerator) and `use_streams=False` (one stream: no
  forward stash, no storage deduplication; TRL's default on CUDA is two streams, see
  `memplan.estimate`'s notes);
- the pack and unpack hooks are wrapped (not replaced): the pack hook runs inside the tracker's
  `host_region`, so the host copy it makes is counted as host memory, and every packed tensor is
  recorded (`OffloadRecord`). On meta the host copy is made on meta (tracker), never in real RAM.
On the CPU, unpack's `.to("cpu")` returns the host copy itself: backward uses the host copy, so an
unpacked tensor stays host memory until backward releases it (on CUDA a device copy is made).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Any

import torch

#: TRL's default `min_offload_size` (bytes): smaller saved tensors stay on the device
MIN_OFFLOAD_BYTES = 1024


@dataclass
class OffloadRecord:
    """What the real pack hook did: bytes of every saved tensor it copied to the host, and of those it kept."""

    offloaded: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)

    @property
    def offloaded_bytes(self) -> int:
        return sum(self.offloaded)


def _device_module() -> Any:
    """`torch.cpu` with the `empty_cache` that `OffloadActivations.__enter__` calls when bitsandbytes is loaded."""
    mod = types.SimpleNamespace(**{k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("__")})
    mod.empty_cache = lambda: None
    return mod


def offload_context(model: torch.nn.Module, device: str, tracker: Any = None,
                    record: OffloadRecord | None = None, bring_back: bool = False):
    """TRL's `get_act_offloading_ctx_manager(model)` for a step on `device` ("cpu" or "meta"), one
    stream, no pinning, its pack hook's host copies counted by `tracker` as host memory (see module doc).
    `bring_back` (simulate emulating CUDA): unpack returns a device copy of the host tensor, as
    `.to("cuda")` makes one, and the host copy goes (on meta `.to("meta")` would return the host copy).
    Returns the context manager to enter around each micro-batch's forward and backward."""
    from trl.models import activation_offloading as ao

    acc = torch.device(device)
    orig_acc, orig_mod = torch.accelerator.current_accelerator, torch.get_device_module
    torch.accelerator.current_accelerator = lambda *a, **k: acc
    torch.get_device_module = lambda *a, **k: _device_module()
    try:
        ctx = ao.get_act_offloading_ctx_manager(model, use_pin_memory=False, use_streams=False,
                                                warn_if_no_head=False)
    finally:
        torch.accelerator.current_accelerator, torch.get_device_module = orig_acc, orig_mod
    pack, unpack = ctx.pack_hook, ctx.unpack_hook
    region = tracker.host_region if tracker is not None else contextlib.nullcontext

    def pack_hook(x: torch.Tensor) -> Any:
        with region():
            tid = pack(x)
        if record is not None:
            entry = ctx.tracker.get(tid)
            if entry is not None:
                (record.offloaded if entry[1] else record.kept).append(x.element_size() * x.nelement())
        return tid

    def unpack_hook(tid: Any) -> torch.Tensor:
        modified = ctx.tracker.get(tid, (None, False))[1]
        t = unpack(tid)
        return t.clone() if bring_back and modified else t

    ctx.pack_hook, ctx.unpack_hook = pack_hook, unpack_hook
    return ctx
