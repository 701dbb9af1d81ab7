"""Patch 13: TRL's fused LM head (`plan.trainer == "sft"`) on the meta device.

`trl.kernels.chunked_logprob.ChunkedLogProbFunction` (trl 1.16; `SFTTrainer` adds it through
`trl.trainer.utils.add_fused_lm_head`) projects the hidden states through the LM head in
[min(N, 4096) x 32768] tiles into one preallocated buffer and folds each tile into online-logsumexp
statistics. Two things need help on meta:

- its compute dtype is `torch.get_autocast_dtype(device)` when `torch.is_autocast_enabled(device)`:
  on meta both are asked of the CPU carrier (meta has no autocast state; see `patches.step_patches`);
- on CUDA the fold is a Triton kernel (`_forward_kernel`/`_backward_kernel`) that writes into the
  preallocated statistics and the tile in place, and the gradient GEMMs accumulate in fp32 with
  `torch.addmm(..., out_dtype=torch.float32, out=acc)` (`_addmm_fp32`): neither allocates. On meta
  `_use_triton` is False, so the torch fallbacks (`_forward_tile`, `_backward_tile`, and
  `acc.addmm_(a.float(), b.float())`) would run, with their [n x c] fp32 temporaries, which a CUDA
  step never has: for a CUDA plan they are replaced by no-ops. For a CPU plan they run as they are
  (the CPU step runs them too).

- on CUDA the head scores only the positions with a valid label (`hidden_states[mask]`, `labels[mask]`,
  then `masked_scatter`: `trl.trainer.utils._use_triton` is True there), on other devices every
  position (`reshape`). For a CUDA plan `_use_triton` answers True for meta tensors too, and
  `torch.nonzero` on meta (behind boolean indexing; data-dependent) is allowed to assume every element
  nonzero (`torch.fx.experimental._config.meta_nonzero_assume_all_nonzero`).

NB: so a CUDA trace scores every position as valid: a padded batch's real step scores fewer (its
padded positions' labels are -100), at most [hidden] elements per padded position less.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .patches import patch_attr


@contextlib.contextmanager
def fused_head_patch(device: str) -> Iterator[None]:
    """Patch 13 for the emulated `device` (a no-op when trl is not installed)."""
    try:
        from trl.kernels import chunked_logprob as cl
    except ImportError:  # pragma: no cover - only sft plans import it, and they need trl
        yield
        return
    import torch

    orig_enabled, orig_dtype = cl.torch.is_autocast_enabled, cl.torch.get_autocast_dtype

    class _Torch:
        """`torch` as chunked_logprob sees it: autocast questions about "meta" go to the CPU carrier."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def is_autocast_enabled(device_type=None):
            return orig_enabled("cpu" if device_type in ("meta", "cuda") else device_type)

        @staticmethod
        def get_autocast_dtype(device_type):
            return orig_dtype("cpu" if device_type in ("meta", "cuda") else device_type)

    def nothing(*args, **kwargs) -> None:
        return None

    with contextlib.ExitStack() as st:
        st.enter_context(patch_attr(cl, "torch", _Torch()))
        if device == "cuda":
            import torch.fx.experimental._config as fx_config
            import trl.trainer.utils as tu

            orig_use_triton = tu._use_triton
            st.enter_context(patch_attr(tu, "_use_triton", lambda dev: dev.type == "meta" or orig_use_triton(dev)))
            st.enter_context(patch_attr(fx_config, "meta_nonzero_assume_all_nonzero", True))
            for name in ("_forward_tile", "_backward_tile", "_addmm_fp32"):
                st.enter_context(patch_attr(cl, name, nothing))
        yield
