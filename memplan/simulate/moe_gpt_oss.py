"""gpt_oss's eager experts loop on the meta device (patch 12).

With ``experts_implementation="eager"`` (the fix for fp32 experts on CUDA, where ``grouped_mm``
takes bf16 only) transformers 5.24 runs `GptOssExperts.forward` itself (modeling_gpt_oss.py): a loop
over the experts the routing hit, which asks the data which experts were hit (``nonzero``) and which
tokens each got (``torch.where``). `moe.experts_patch` covers Mixtral-style experts only (no bias,
[E, 2I, H] layout); this module covers gpt_oss's transposed, biased experts with their clamped
SwiGLU (`_apply_gate`). As in `moe`, the simulation routes evenly: slot j of token t goes to expert
(t·top_k + j) mod E (`moe.balanced_counts`); a real step with that routing imposed agrees to the
byte (tests/test_simulate_gpt_oss.py). Entered by `patches.step_patches` and restored afterwards.
"""

from __future__ import annotations

import contextlib

from .moe import balanced_expert_loop


def gpt_oss_experts_balanced(self, hidden_states, router_indices=None, routing_weights=None):
    """`GptOssExperts.forward` (transformers 5.24) on meta with balanced routing: the same tensors,
    shapes and dtypes as the real loop (the one-hot mask, the ``nonzero`` results, the per-expert
    gathers, matmuls, biases, clamped SwiGLU, weighting and ``index_add_``)."""
    import torch

    next_states = torch.zeros_like(hidden_states, dtype=hidden_states.dtype, device=hidden_states.device)
    for e, top_k_pos, token_idx in balanced_expert_loop(router_indices, self.num_experts, self.num_experts):
        current_state = hidden_states[token_idx]
        gate_up = current_state @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gated_output = self._apply_gate(gate_up)
        out = gated_output @ self.down_proj[e] + self.down_proj_bias[e]
        weighted_output = out * routing_weights[token_idx, top_k_pos, None]
        next_states.index_add_(0, token_idx, weighted_output.to(hidden_states.dtype))
    return next_states


def gpt_oss_experts_patch():
    """Route gpt_oss's eager experts loop to `gpt_oss_experts_balanced` on meta tensors."""
    from .patches import patch_attr

    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:  # pragma: no cover - transformers without gpt_oss
        return contextlib.nullcontext()
    orig = GptOssExperts.forward  # the eager path: use_experts_implementation's wrapper calls it

    def forward(self, hidden_states, *args, **kwargs):
        if getattr(self.config, "_experts_implementation", None) == "eager" and hidden_states.is_meta:
            return gpt_oss_experts_balanced(self, hidden_states, *args, **kwargs)
        return orig(self, hidden_states, *args, **kwargs)

    return patch_attr(GptOssExperts, "forward", forward)
