"""bitsandbytes and CUDA kernels on the meta device: what the real kernels allocate.

bitsandbytes kernels (patch 4; the tracker's ``bnb_impls``). The registered fake kernels only
allocate outputs. CPU: ``gemm_4bit`` runs bitsandbytes' default kernel (dequantized absmax + weight,
``F.linear``) and the 8-/32-bit optimizer updates run the CPU kernels (state dequantized to fp32,
requantized), all on meta. CUDA: ``gemm_4bit`` dequantizes + ``F.linear`` past
`GEMM_4BIT_CUSTOM_MAX_M` (1536) tokens (or an unaligned K), else the fused kernel (output only).
``int8_vectorwise_quant`` assumes no LLM.int8 outlier columns (their number depends on the data) and
on CPU the int8 training matmul is bitsandbytes' CPU one (``MatMul8bitFp``: dequantize + linear),
chosen there by device type (`int8_matmul_patch`).

CUDA kernel workspaces (patch 5; the tracker's ``kernel_temps``): flash-attention backward
allocates, for the duration of the op, ``softmax_d``, an fp32 ``dq_accum`` and for GQA expanded
``dk``/``dv`` (torch's flash_api.cpp ``mha_bwd``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

#: bitsandbytes' CUDA gemm_4bit uses its fused kernel up to this many rows (tokens), else dequantizes
#: (bitsandbytes.backends.cuda.ops)
GEMM_4BIT_CUSTOM_MAX_M = 1536


def bnb_impls(device: str) -> dict[str, Callable[..., Any]]:
    """Python kernels that reproduce the real device's bitsandbytes kernels' allocations on meta."""
    import torch

    def int8_vectorwise_quant(A, threshold=0.0):
        # LLM.int8 outlier columns are data-dependent: the simulation assumes none
        out_row = torch.empty(A.shape, device=A.device, dtype=torch.int8)
        row_stats = torch.empty(A.numel() // A.shape[-1], device=A.device, dtype=torch.float32)
        cols = None if threshold == 0.0 else torch.empty(0, device=A.device, dtype=torch.int64)
        return out_row, row_stats, cols

    if device == "cpu":
        impls: dict[str, Callable[..., Any]] = {"int8_vectorwise_quant.default": int8_vectorwise_quant}
        try:
            from bitsandbytes.backends.default import ops as dflt

            impls["gemm_4bit.default"] = dflt._gemm_4bit_default_impl
        except (ImportError, AttributeError):  # pragma: no cover - other bnb versions
            pass
        try:
            from bitsandbytes.backends.cpu import ops as cpu

            impls["optimizer_update_8bit_blockwise.default"] = cpu._optimizer_update_8bit_blockwise_cpu
            impls["optimizer_update_32bit.default"] = cpu._optimizer_update_32bit_cpu
        except (ImportError, AttributeError):  # pragma: no cover
            pass
        return impls

    def gemm_4bit_cuda(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                       absmax_code=None, absmax_offset=None):
        K = A.shape[-1]
        M = A.numel() // K
        N = shapeB[0]
        if M > GEMM_4BIT_CUSTOM_MAX_M or K % blocksize != 0:
            # bitsandbytes.backends.cuda.ops._dequant_linear_fallback
            if absmax_8bit is not None:
                absmax_dq = torch.empty_like(absmax_8bit, dtype=torch.float32)  # dequantized in place
                absmax = absmax_dq + absmax_offset  # noqa: F841 - alive (as in the kernel) until return
            B_dq = torch.empty(shapeB, dtype=A.dtype, device=A.device)
            return torch.nn.functional.linear(A, B_dq, bias)
        A = A.contiguous()
        return torch.empty((*A.shape[:-1], N), dtype=A.dtype, device=A.device)

    return {"gemm_4bit.default": gemm_4bit_cuda, "int8_vectorwise_quant.default": int8_vectorwise_quant}


def kernel_temps(device: str) -> dict[str, Callable[..., list]]:
    """Buffers the real device's kernels allocate internally (through the caching allocator).

    CUDA flash-attention backward (torch's flash_api.cpp `mha_bwd`, non-deterministic): `softmax_d`
    [B, H, ⌈Sq/128⌉·128] fp32, `dq_accum` [B, ⌈Sq/128⌉·128, H, D rounded to 32 (D ≤ 128) or 64]
    fp32 and, for GQA, `dk_expanded`/`dv_expanded` [B, Sk, H, D] in the input dtype (summed into dk/dv).
    """
    import torch

    if device != "cuda":
        return {}

    def r(x: int, m: int) -> int:
        return (x + m - 1) // m * m

    def flash_bwd(grad_out, q, k, v, out, lse, *args, **kwargs):
        if not q.is_meta:
            return []
        B, H, Sq, D = q.shape
        Hk, Sk = k.shape[1], k.shape[2]
        d8 = r(D, 8)
        temps = [torch.empty((B, H, r(Sq, 128)), dtype=torch.float32, device="meta"),
                 torch.empty((B, r(Sq, 128), H, r(d8, 32 if d8 <= 128 else 64)), dtype=torch.float32, device="meta")]
        if Hk != H:
            temps += [torch.empty((B, Sk, H, d8), dtype=q.dtype, device="meta") for _ in range(2)]
        return temps

    return {"_scaled_dot_product_flash_attention_backward.default": flash_bwd}


def int8_matmul_patch(device: str):
    """bitsandbytes picks its int8 training matmul by device type (CPU: dequantize + linear)."""
    if device != "cpu":
        return contextlib.nullcontext()
    import bitsandbytes as bnb
    from bitsandbytes.autograd import _functions as bf

    from .patches import patch_attr

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        state = state or bf.MatmulLtState()
        if threshold > 0.0:
            state.threshold = threshold
        if state.is_training and A.device.type == "meta":
            return bf.MatMul8bitFp.apply(A, B, out, bias, state)
        return orig(A, B, out=out, state=state, threshold=threshold, bias=bias)

    orig = bf.matmul
    st = contextlib.ExitStack()
    st.enter_context(patch_attr(bnb, "matmul", matmul))
    st.enter_context(patch_attr(bf, "matmul", matmul))
    return st
