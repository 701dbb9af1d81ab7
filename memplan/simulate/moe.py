"""Mixture-of-experts layers on the meta device (patch 8).

transformers 5's default experts implementation (``grouped_mm``) is data-independent: all T·top_k
token slots go through one grouped matmul whatever the routing, so memory does not depend on it.
torch's meta ``grouped_mm`` checks CUDA's bf16-only rule; on ``"cpu"`` that check is lifted (the CPU
kernel takes fp32), on ``"cuda"`` fp32 experts (after prepare) raise, as the real CUDA kernel would
(`grouped_mm_patch`). With ``experts_implementation="eager"`` (the per-expert loop, which asks
``nonzero``/``where``) the loop runs with a deterministic balanced routing: token t's j-th choice is
expert (t·top_k + j) mod E, so every expert gets T·top_k/E slots (±1) (`eager_experts_balanced`,
which makes the same tensors as transformers' loop; `experts_patch` routes to it). Real routing is
unbalanced: per-expert transients then differ (0.3–0.4 % of the peak on the tiny test models); with
the same routing imposed on a real CPU step the two agree to the byte.

Both patches are entered by `patches.step_patches` and restored afterwards.
"""

from __future__ import annotations

import contextlib


def balanced_counts(tokens: int, top_k: int, experts: int) -> list[int]:
    """Token slots per expert under the simulation's routing: slot j of token t → expert (t·k + j) mod E."""
    slots = tokens * top_k
    return [slots // experts + (1 if e < slots % experts else 0) for e in range(experts)]


def balanced_expert_loop(top_k_index, num_experts: int, classes: int):
    """The mask and per-expert index tensors transformers' eager experts loops make, under the balanced
    routing (`balanced_counts`): F.one_hot(top_k_index, classes) (aminmax: the range check, zeros,
    scatter_), permute, the hit test and its ``nonzero``; then for each hit expert the 0-dim bool of
    `if expert_idx == num_experts`, ``torch.where`` on its mask row (a view) and the unbound
    (top_k_pos, token_idx), yielded as (expert, top_k_pos, token_idx) with the same shapes and dtypes.
    """
    import torch

    n_tok, k = top_k_index.shape
    counts = balanced_counts(n_tok, k, num_experts)
    hit = [e for e, n in enumerate(counts) if n]
    dev = top_k_index.device
    with torch.no_grad():
        torch.aminmax(top_k_index)
        expert_mask = torch.zeros((*top_k_index.shape, classes), dtype=torch.long, device=dev)
        expert_mask.scatter_(-1, top_k_index.unsqueeze(-1), 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        torch.greater(expert_mask.sum(dim=(-1, -2)), 0)
        expert_hit = torch.empty((len(hit), 1), dtype=torch.long, device=dev)  # .nonzero()
    for i, e in enumerate(hit):
        expert_idx = expert_hit[i][0]
        _ = expert_idx == num_experts  # `if expert_idx == num_experts` (a 0-dim bool)
        sel = expert_mask[e]  # a 0-dim index tensor indexes like an int (.item()): a view
        nz = torch.empty((counts[e], sel.dim()), dtype=torch.long, device=dev)  # torch.where(sel)
        top_k_pos, token_idx = nz.unbind(1)
        del sel, nz, expert_idx, _
        yield e, top_k_pos, token_idx


def eager_experts_balanced(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop (MixtralExperts.forward, 5.x) on meta, with balanced routing.

    The real loop asks the data which experts were hit (`nonzero`) and which tokens each got
    (`torch.where`); on meta there is no data. Here expert e gets `balanced_counts(...)[e]` token
    slots; every tensor the real loop makes (the one-hot mask, the per-expert index copies, the
    `nonzero` results, the gathered states, the expert weight copies made by tensor indexing) is made
    with the same shape and dtype.
    """
    import torch
    from torch import nn

    final_hidden_states = torch.zeros_like(hidden_states)
    for e, top_k_pos, token_idx in balanced_expert_loop(top_k_index, self.num_experts, self.num_experts + 1):
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[e]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[e])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def experts_patch():
    """Route the eager experts implementation to `eager_experts_balanced` on meta tensors."""
    from .patches import patch_attr

    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers without MoE integration
        return contextlib.nullcontext()
    orig = ALL_EXPERTS_FUNCTIONS.get_interface

    def get_interface(experts_implementation, default):
        fn = orig(experts_implementation, default)
        if experts_implementation != "eager":
            return fn

        def forward(self, hidden_states, *args, **kwargs):
            if (hidden_states.is_meta and hasattr(self, "gate_up_proj") and hasattr(self, "down_proj")
                    and not getattr(self, "has_bias", False) and getattr(self, "has_gate", True)
                    and not getattr(self, "is_transposed", False)):
                return eager_experts_balanced(self, hidden_states, *args, **kwargs)
            return fn(self, hidden_states, *args, **kwargs)

        return forward

    return patch_attr(ALL_EXPERTS_FUNCTIONS, "get_interface", get_interface)


def grouped_mm_patch(device: str):
    """`torch._meta_registrations._meta_grouped_mm_common` for the emulated device.

    torch's meta kernel mirrors the CUDA kernel: bf16 only, output rows padded to 16 bytes when torch
    is a CUDA build. The CPU kernel takes any float dtype and pads nothing.
    """
    import torch
    import torch._meta_registrations as mr

    from .driver import StepWouldFail
    from .patches import patch_attr

    orig = mr._meta_grouped_mm_common

    def common(mat_a, mat_b, scale_a=None, scale_b=None, offs=None, bias=None, scale_result=None,
               out_dtype=None, use_fast_accum=False):
        if device == "cpu":
            if scale_a is None and mat_a.dtype == mat_b.dtype:
                return mr._create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)
            return orig(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum)
        if scale_a is None and (mat_a.dtype != torch.bfloat16 or mat_b.dtype != torch.bfloat16):
            raise StepWouldFail(
                f"grouped_mm on CUDA takes bf16 inputs only (torch's kernel and meta function), but the experts "
                f"are {mat_b.dtype} (prepare_model_for_kbit_training upcasts them to fp32): the real CUDA step "
                f"would fail the same way. Try --no-prepare, or experts_implementation='eager' in the config.")
        out = orig(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum)
        if torch.version.cuda is None:  # pad as the CUDA kernel does
            size = list(out.shape)
            align = 16 // out.dtype.itemsize
            padded = (size[-1] + align - 1) // align * align
            stride = [size[1] * padded, padded, 1] if len(size) == 3 else [padded, 1]
            out = torch.empty_strided(size, stride, dtype=out.dtype, device=out.device)
        return out

    return patch_attr(mr, "_meta_grouped_mm_common", common)
