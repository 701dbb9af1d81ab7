"""Patches of torch, transformers and bitsandbytes for the meta device, and the optimizer on meta.

All are applied only inside `simulate` and restored afterwards (tests/test_simulate.py checks that).

1. ``transformers.masking_utils.find_packed_sequence_indices`` on meta position ids. It asks the data
   (``.all()``) whether the position ids describe packed sequences. Unpacked plans feed one sequence
   per row, for which the real function returns None: so does the patch. Packed plans (`packing`,
   `padding_free`: `runtime.step.packed_batch` puts two sequences in every row) get what the real
   function returns for them, the [B, S] sequence indices, computed by the real function with its
   data check skipped (``is_tracing`` → True for that call) (`build_patches(packed=...)`).
7. Optimizers: ``adamw_torch_fused`` needs "meta" in
   ``torch.optim.optimizer._get_fused_kernels_supported_devices`` (`build_patches`); on ``"cuda"``
   AdamW/SGD get ``foreach=True`` (torch's CUDA default; on meta, as on CPU, torch picks the
   per-tensor loop). Paged bitsandbytes state on ``"cuda"`` (tensors of at least
   `memplan.optim.PAGED_MIN_NUMEL` elements) is created outside the tracker and added to
   ``paged_bytes``; on ``"cpu"`` it is ordinary memory, as bitsandbytes does on CPU. 8-bit
   optimizers' code tables are moved to meta untracked on CPU (a no-op ``.to`` there, a tracked copy
   on CUDA) (`make_meta_optimizer`).

11. ``transformers.masking_utils.fast_all`` → False for a meta attention mask: whether a padded
   batch's mask is all ones is data; the step pads part of a row whenever the plan pads
   (`runtime.step.run_steps`), so transformers builds the 4-D mask as on a real device (`build_patches`).
10. ``torch.random.fork_rng(device_type="meta")`` returns at once on meta; on a real device it keeps
   a snapshot of the CPU generator (``torch.get_rng_state()``, 5056 B) while a checkpointed layer
   recomputes. The patch takes that snapshot on meta too; the tracker counts RNG states (it wraps
   ``torch.get_rng_state``) when the CPU is the emulated device (`step_patches`).

13. TRL's fused LM head on meta (`plan.trainer == "sft"`): see `sft_head`.
14. Liger kernels (plans with ``use_liger_kernel``): Liger applied to the model as the HF Trainer
   applies it (`runtime.liger.applied`, module attributes restored afterwards) and its Triton launches
   stubbed, ``Tensor.item``/``torch.equal`` answered for meta scalars, the loss phase marked at FLCE's
   forward (`simulate.liger.liger_patches`; what, why and which upstream functions are documented there).
15. FlashAttention-2 without the flash-attn package (CUDA only): the availability check skipped and
   the flash-attn functions transformers imports replaced by autograd Functions that allocate and save
   what flash-attn 2.x does, fixed-length and varlen (`flash.flash_patches`, entered by the driver for
   plans with attn_implementation flash_attention_2).

`step_patches` enters, for the steps, the emulation mode (`emulation.MetaEmulation`: patches 2, 3
and 6) with its autocast stand-ins (``torch.autocast``/``torch.amp.autocast`` accept
``device_type="meta"``, ``torch.clear_autocast_cache`` also clears the emulated weight cache, and on
``"cuda"`` ``torch.is_autocast_enabled()`` reports the carrier), the MoE patches (`moe`, patch 8; `moe_gpt_oss`, patch 12) and
the int8 matmul choice (`kernels`, patch 4).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from ..plan import TrainPlan

if TYPE_CHECKING:  # pragma: no cover
    from .emulation import MetaEmulation


@contextlib.contextmanager
def patch_attr(obj, name: str, value, own: bool = False) -> Iterator[None]:
    """Set `obj.name = value` for the duration of the block (deleted again if it did not exist).
    `own`: look only in the object's own dict (a class: an inherited attribute is deleted again, a
    staticmethod put back as one)."""
    missing = object()
    old = vars(obj).get(name, missing) if own else getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def build_patches(packed: bool = False) -> Iterator[None]:
    """Patches needed while building, adapting and stepping (patches 1 and 7, name2qmap on CPU);
    `packed`: the step's batch holds packed sequences (patch 1)."""
    import torch.optim.optimizer as topt
    import transformers.masking_utils as mu

    from .build import bnb_qmap_on_cpu

    orig_fused = topt._get_fused_kernels_supported_devices

    def fused_devices():
        return list(orig_fused()) + ["meta"]

    def find_packed(position_ids):
        if position_ids is not None and position_ids.is_meta:
            if not packed:
                return None
            with patch_attr(mu, "is_tracing", lambda *_: True):  # the real ops, minus the data check
                return orig_find(position_ids)
        return orig_find(position_ids)

    orig_find = mu.find_packed_sequence_indices
    orig_fast_all = mu.fast_all

    def fast_all(tensor):
        # patch 11: a padded batch's attention_mask on meta: the step pads part of a row (runtime.step)
        if tensor.is_meta:
            return False
        return orig_fast_all(tensor)

    with contextlib.ExitStack() as st:
        st.enter_context(patch_attr(mu, "find_packed_sequence_indices", find_packed))
        st.enter_context(patch_attr(mu, "fast_all", fast_all))
        st.enter_context(patch_attr(topt, "_get_fused_kernels_supported_devices", fused_devices))
        st.enter_context(bnb_qmap_on_cpu())
        yield


@contextlib.contextmanager
def step_patches(emu: "MetaEmulation", device: str, trainer: str = "trainer") -> Iterator[None]:
    """Patches active during the steps: the emulation mode, autocast cache and flag, MoE and int8 kernels,
    and for `trainer="sft"` TRL's fused LM head (`sft_head`, patch 13)."""
    import torch

    from .kernels import int8_matmul_patch
    from .moe import experts_patch, grouped_mm_patch
    from .moe_gpt_oss import gpt_oss_experts_patch

    orig_clear = torch.clear_autocast_cache
    orig_enabled = torch.is_autocast_enabled

    def clear_autocast_cache():
        emu.clear_cache()
        return orig_clear()

    def is_autocast_enabled(device_type=None):
        if device_type is None or device_type == "cuda":
            return orig_enabled("cpu")
        return orig_enabled(device_type)

    class autocast(torch.amp.autocast_mode.autocast):  # noqa: N801 - stands in for torch.autocast
        """torch.autocast(device_type="meta", ...) → the CPU carrier (meta has no autocast state)."""

        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    orig_fork_rng = torch.random.fork_rng

    @contextlib.contextmanager
    def fork_rng(devices=None, enabled=True, _caller="fork_rng", _devices_kw="devices", device_type=None):
        """On a real device fork_rng snapshots the CPU generator (checkpoint recomputation): on meta it
        returns at once, so take the snapshot here (5056 B, counted when the CPU is the emulated device)."""
        if not (enabled and device_type == "meta"):
            with orig_fork_rng(devices, enabled, _caller, _devices_kw, device_type):
                yield
            return
        cpu_state = torch.get_rng_state()
        try:
            yield
        finally:
            torch.set_rng_state(cpu_state)

    with contextlib.ExitStack() as st:
        st.enter_context(patch_attr(torch.random, "fork_rng", fork_rng))
        st.enter_context(patch_attr(torch, "clear_autocast_cache", clear_autocast_cache))
        st.enter_context(patch_attr(torch, "autocast", autocast))
        st.enter_context(patch_attr(torch.amp, "autocast", autocast))
        st.enter_context(grouped_mm_patch(device))
        st.enter_context(experts_patch())
        st.enter_context(gpt_oss_experts_patch())
        st.enter_context(int8_matmul_patch(device))
        if trainer == "sft":  # TRL's fused LM head (runtime.step.add_sft_head)
            from .sft_head import fused_head_patch

            st.enter_context(fused_head_patch(device))
        if device == "cuda":
            st.enter_context(patch_attr(torch, "is_autocast_enabled", is_autocast_enabled))
        st.enter_context(emu)
        yield


def make_meta_optimizer(model, plan: TrainPlan, tracker):
    """`runtime.step.make_optimizer`, adjusted so that it behaves on meta as on `plan.device` (patch 7)."""
    import torch

    from ..optim import PAGED_MIN_NUMEL
    from ..runtime.step import make_optimizer

    opt = make_optimizer(model, plan)
    if isinstance(opt, torch.optim.Optimizer) and plan.device == "cuda":
        for g in opt.param_groups:
            if "foreach" in g and g.get("foreach") is None and not g.get("fused"):
                g["foreach"] = True  # torch's default for CUDA tensors
    if hasattr(opt, "get_state_buffer") and hasattr(opt, "is_paged"):
        def get_state_buffer(p, dtype=torch.float32, _opt=opt):
            if plan.device == "cuda" and _opt.is_paged and p.numel() >= PAGED_MIN_NUMEL:
                from torch.utils._python_dispatch import _disable_current_modes

                with _disable_current_modes():
                    buf = torch.zeros_like(p, dtype=dtype, device=p.device)
                tracker.add_paged(buf)
                return buf
            return torch.zeros_like(p, dtype=dtype, device=p.device)

        opt.get_state_buffer = get_state_buffer
    if plan.device == "cpu" and isinstance(getattr(opt, "name2qmap", None), dict):
        # bitsandbytes builds its code tables on CPU at construction and moves them to the parameters'
        # device at the first step: a no-op on CPU, a copy on meta. Move them now, untracked, as on CPU.
        opt.name2qmap = {k: v.to("meta") for k, v in opt.name2qmap.items()}
    return opt
