"""FlashAttention-2 on the meta device (patch 15): flash-attn cannot be installed without CUDA.

transformers 5.24 runs its own code around the kernels (integrations/flash_attention.py: the transposes,
the cast of fp32 q/k/v to the autocast dtype; modeling_flash_attention_utils._flash_attention_forward:
the fixed-length call, or the varlen path for packed position ids with its contiguous copies); only the
flash-attn functions it imports (`_lazy_imports`) are replaced, by autograd Functions that allocate
and save what flash-attn 2.x allocates and saves (flash_attn/flash_attn_interface.py FlashAttnFunc /
FlashAttnVarlenFunc; csrc/flash_attn/flash_api.cpp mha_fwd / mha_varlen_fwd / mha_bwd / mha_varlen_bwd):

- forward: q/k/v padded to a multiple of 8 in head_dim (F.pad) when needed; `out = empty_like(q)`
  (q's strides: transformers' transposed [B, S, H, D] view of a [B, H, S, D] tensor); softmax_lse fp32
  [B, H, S] ([H, total] varlen); rng_state int64 [2]; saved: q, k, v, out, softmax_lse, rng_state
  (varlen: the cu_seqlens too, from the caller).
- backward: dq/dk/dv = empty_like(q/k/v); softmax_d fp32 [B, H, round128(S)] ([H, total + 128 *
  n_seqs] varlen); dq_accum fp32 [B, round128(S), H, hd_r] ([total + 128 * n_seqs, H, hd_r] varlen),
  hd_r = head_dim rounded to 32 (<= 128) or 64; GQA: dk/dv expanded to the query heads [.., H, D] in
  the input dtype, summed into dk/dv (at::sum_out) before they are freed.
- NB: the split-KV forward (softmax_lse_accum, out_accum) runs only when batch x heads x ceil(S/64)
  is below 0.8 x 2 x the GPU's SM count (small shapes); not emulated. Deterministic backward (its
  zero-filled split dq_accum) not emulated. Dropout is 0 in the models memplan plans.

Also: the availability check of `from_pretrained`/`from_config` (`PreTrainedModel._flash_attn_import_error`)
is skipped, and on meta `_is_packed_sequence` answers from the plan (a packed batch of one row) and
`prepare_fa_kwargs_from_position_ids` returns cu_seqlens for `n_seqs` sequences (runtime.step.packed_batch:
two per row) instead of reading the position ids. Known limitation: a padded batch (an attention_mask)
takes transformers' unpad path, which reads the mask's values: not emulated (`check_flash_plan` says so).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import UnsupportedArchitectureError
from ..plan import TrainPlan
from .patches import patch_attr


def _round(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pad8(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    hd = ts[0].size(-1)
    if hd % 8 == 0:
        return ts
    return tuple(F.pad(t, [0, 8 - hd % 8]) for t in ts)


def _contig(t: torch.Tensor) -> torch.Tensor:  # flash_attn_interface.maybe_contiguous
    return t.contiguous() if t.stride(-1) != 1 else t


def _bwd(dout, q, k, v, rows: int, seq_q: int, extra_rows: int, varlen: bool):
    """mha_bwd / mha_varlen_bwd's allocations; returns dq, dk, dv (the python side made them)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dout = _contig(_pad8(dout)[0])
    H, hd = q.size(-2), q.size(-1)
    hd_r = _round(hd, 32 if hd <= 128 else 64)
    if varlen:  # total_q rows, plus 128 per sequence
        softmax_d = torch.empty(H, seq_q + extra_rows, dtype=torch.float32, device=q.device)
        dq_accum = torch.empty(seq_q + extra_rows, H, hd_r, dtype=torch.float32, device=q.device)
    else:
        softmax_d = torch.empty(rows, H, _round(seq_q, 128), dtype=torch.float32, device=q.device)
        dq_accum = torch.empty(rows, _round(seq_q, 128), H, hd_r, dtype=torch.float32, device=q.device)
    if k.size(-2) != H:  # MQA / GQA: dk, dv expanded to the query heads, then summed
        dk_e = torch.empty(*k.shape[:-2], H, k.size(-1), dtype=k.dtype, device=k.device)
        dv_e = torch.empty(*v.shape[:-2], H, v.size(-1), dtype=v.dtype, device=v.device)
        del dk_e, dv_e
    del softmax_d, dq_accum, dout
    return dq, dk, dv


class FlashAttnFunc(torch.autograd.Function):
    """flash_attn_interface.FlashAttnFunc, allocations only."""

    @staticmethod
    def forward(ctx, q, k, v):
        hd = q.size(3)
        q, k, v = (_contig(t) for t in _pad8(q, k, v))
        out = torch.empty_like(q)
        B, S, H = q.shape[:3]
        lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
        rng = torch.empty(2, dtype=torch.int64, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, rng)
        ctx.hd = hd
        return out[..., :hd]

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, rng = ctx.saved_tensors
        dq, dk, dv = _bwd(dout, q, k, v, q.size(0), q.size(1), 0, varlen=False)
        hd = ctx.hd
        return dq[..., :hd], dk[..., :hd], dv[..., :hd]


class FlashAttnVarlenFunc(torch.autograd.Function):
    """flash_attn_interface.FlashAttnVarlenFunc, allocations only."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k):
        hd = q.size(2)
        q, k, v = (_contig(t) for t in _pad8(q, k, v))
        out = torch.empty_like(q)
        lse = torch.empty(q.size(1), q.size(0), dtype=torch.float32, device=q.device)
        rng = torch.empty(2, dtype=torch.int64, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng)
        ctx.hd = hd
        return out[..., :hd]

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k, rng = ctx.saved_tensors
        n_seqs = cu_q.numel() - 1
        dq, dk, dv = _bwd(dout, q, k, v, n_seqs, q.size(0), 128 * n_seqs, varlen=True)
        hd = ctx.hd
        return dq[..., :hd], dk[..., :hd], dv[..., :hd], None, None


# the signatures transformers inspects (`_lazy_define_process_function`) to pick the kwargs it passes
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    return FlashAttnFunc.apply(q, k, v)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k)


def check_flash_plan(plan: TrainPlan) -> None:
    """Refuse, in one line, what the emulation does not cover: FlashAttention-2 on a padded batch."""
    if plan.attn_implementation == "flash_attention_2" and plan.padding != "none":
        raise UnsupportedArchitectureError(
            f"simulate does not emulate FlashAttention-2 on a padded batch yet (--padding {plan.padding}: "
            "transformers unpads q/k/v by the attention_mask's values); trace it with --padding none or --padding-free")


@contextlib.contextmanager
def flash_patches(packed: bool, n_seqs: int) -> Iterator[None]:
    """Patch 13 (see the module doc): FlashAttention-2 built and run on meta. `packed`: the batch holds
    packed sequences; `n_seqs`: how many in a one-row batch (the varlen path's cu_seqlens)."""
    import transformers.modeling_flash_attention_utils as fu
    from transformers.modeling_utils import PreTrainedModel

    orig_is_packed, orig_prepare = fu._is_packed_sequence, fu.prepare_fa_kwargs_from_position_ids

    def lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        return flash_attn_func, flash_attn_varlen_func, None, fu._pad_input, fu._unpad_input

    def is_packed_sequence(position_ids, batch_size):
        if position_ids is not None and position_ids.is_meta:
            return packed and batch_size == 1 and position_ids.shape[-1] > 1
        return orig_is_packed(position_ids, batch_size)

    def prepare_from_position_ids(position_ids):
        if not position_ids.is_meta:
            return orig_prepare(position_ids)
        total = position_ids.numel()
        cu = torch.empty(n_seqs + 1, dtype=torch.int32, device=position_ids.device)
        longest = total - total // n_seqs * (n_seqs - 1)
        return (cu, cu), (longest, longest)

    import transformers.integrations.flash_attention as fa

    orig_target = fa.get_target_dtype

    def get_target_dtype(query, module):
        """integrations/flash_attention.get_target_dtype, with meta's autocast carried by the CPU's state
        (meta has no autocast of its own: patches.step_patches)."""
        if not query.is_meta or query.dtype != torch.float32:
            return orig_target(query, module)
        if torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
        if hasattr(module.config, "_is_quantized"):
            return module.config.dtype
        return next(m for m in module.modules() if isinstance(m, torch.nn.Linear)).weight.dtype

    with contextlib.ExitStack() as st:
        st.enter_context(patch_attr(fa, "get_target_dtype", get_target_dtype))
        st.enter_context(patch_attr(PreTrainedModel, "_flash_attn_import_error", lambda self, *a, **k: None))
        st.enter_context(patch_attr(fu, "_lazy_imports", lazy_imports))
        st.enter_context(patch_attr(fu, "_loaded_implementation", None))  # re-import through the patch
        st.enter_context(patch_attr(fu, "_is_packed_sequence", is_packed_sequence))
        st.enter_context(patch_attr(fu, "prepare_fa_kwargs_from_position_ids", prepare_from_position_ids))
        yield
