"""Patch 13: Liger's Triton kernels on the meta device (plans with `use_liger_kernel`).

What: for the steps, (a) every Triton kernel launch (``kernel[grid](...)``: ``triton.runtime.jit.
KernelInterface.__getitem__``, which `JITFunction`, `Autotuner` and `Heuristics` share) returns a
no-op launcher; (b) ``Tensor.item()`` on a 0-dim meta tensor returns 1 (liger_kernel 0.8.5
ops/fused_linear_cross_entropy.py `fused_linear_cross_entropy_forward` counts the non-ignored targets
with ``target_mask.sum().item()``; the count only scales the loss); (c) ``torch.equal`` with a meta
argument returns True (`fused_linear_cross_entropy_backward` asks whether grad_output is 1.0 to skip
an in-place scaling kernel: no allocation either way); (d) Liger's `LigerFusedLinearCrossEntropyFunction.
forward` first sets the tracker's phase to "loss" (the HF path does it in a forward hook on lm_head,
which FLCE never calls as a module); (e) Liger's lazy discovery of kernel implementations runs before
the step (`_discover_impls`), so no exception it logs can keep a traced frame alive.

Why: Triton kernels cannot run on meta (nor on the CPU); what memory a Liger step uses is what
Liger's *Python wrappers* allocate around the launches (torch.empty/zeros/empty_like, .contiguous(),
the chunked matmuls, ctx.save_for_backward), and those run unchanged. The kernels write into buffers
the wrappers allocated (in place), so stubbing a launch changes values, never allocations.

Upstream functions run as they are: liger_kernel 0.8.5 ops/fused_linear_cross_entropy.py
(`LigerFusedLinearCrossEntropyFunction`), ops/rms_norm.py (`LigerRMSNormFunction`), ops/swiglu.py
(`LigerSiLUMulFunction`), ops/geglu.py, ops/rope.py (`LigerRopeFunction`), ops/cross_entropy.py;
transformers/model/<family>.py `lce_forward`. Known limitation (NB): on meta,
`_can_use_mm_out` is False (it asks for a CUDA tensor), so FLCE takes its out-of-place matmul path;
on CUDA that is also the path of the default plan (prepare's fp32 lm_head under bf16 autocast: the
input and weight dtypes differ from the autocast dtype). Plans with a 16-bit lm_head and no
autocast would, on CUDA, reuse one [chunk x vocab] buffer instead of one per chunk (same peak).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .patches import patch_attr


def _discover_impls() -> None:
    """Resolve Liger's kernel implementations (liger_kernel.backends.registry `_discover`) before the traced
    step. Discovery is lazy, at an op's first dispatch, and logs each backend it cannot import with the
    exception as an argument: a log handler that keeps records (pytest's) would then keep the exception's
    traceback, its frames and so the first layer's forward locals alive, which the tracker would count."""
    import logging

    from liger_kernel.backends import registry

    level = logging.getLogger(registry.__name__).level
    logging.getLogger(registry.__name__).setLevel(logging.ERROR)  # optional backends (CuTe DSL, Ascend): not ours
    try:
        for op in list(getattr(registry, "_DISCOVERY_MAP", {})):
            registry._discover(op)
    finally:
        logging.getLogger(registry.__name__).setLevel(level)


@contextlib.contextmanager
def liger_patches(tracker) -> Iterator[None]:
    """Patch 13 (see the module doc), for the duration of the steps."""
    import torch
    from triton.runtime.jit import KernelInterface

    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    from ..terms import Phase

    def launcher(self, grid):
        return lambda *args, **kwargs: None

    orig_item = torch.Tensor.item
    orig_equal = torch.equal

    def item(self):
        if self.is_meta:
            return 1 if not self.is_floating_point() else 1.0
        return orig_item(self)

    def equal(a, b):
        if (isinstance(a, torch.Tensor) and a.is_meta) or (isinstance(b, torch.Tensor) and b.is_meta):
            return True
        return orig_equal(a, b)

    orig_forward = LigerFusedLinearCrossEntropyFunction.forward
    _discover_impls()

    def forward(ctx, *args, **kwargs):
        tracker.set_phase(Phase.LOSS)
        return orig_forward(ctx, *args, **kwargs)

    with contextlib.ExitStack() as st:
        st.enter_context(patch_attr(KernelInterface, "__getitem__", launcher, own=True))
        st.enter_context(patch_attr(torch.Tensor, "item", item, own=True))
        st.enter_context(patch_attr(torch, "equal", equal))
        st.enter_context(patch_attr(LigerFusedLinearCrossEntropyFunction, "forward", staticmethod(forward), own=True))
        yield
