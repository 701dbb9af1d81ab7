"""Optimizers by their Hugging Face `TrainingArguments.optim` names, and what state each keeps.

Sources: transformers trainer `get_optimizer_cls_and_kwargs`, torch/optim/adamw.py,
bitsandbytes/optim/optimizer.py (Optimizer8bit: `min_8bit_size=4096`, paged threshold 1e5 elements,
256-element blocks with one fp32 absmax each).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimSpec:
    """State layout of one optimizer family.

    states: state tensors of the parameter's size (Adam: exp_avg, exp_avg_sq).
    bits: 32 (fp32 state) or 8 (bitsandbytes blockwise 8-bit state).
    paged: bitsandbytes paged (cudaMallocManaged) state for tensors of >= 100,000 elements.
    impl: "foreach", "fused", "single" (torch), "bnb", "adafactor" -- decides step scratch.
    """

    name: str
    states: int
    bits: int = 32
    paged: bool = False
    impl: str = "bnb"
    factored: bool = False


OPTIMIZERS: dict[str, OptimSpec] = {
    o.name: o
    for o in (
        OptimSpec("adamw_torch", 2, impl="foreach"),
        OptimSpec("adamw_torch_fused", 2, impl="fused"),
        OptimSpec("adamw_torch_foreach", 2, impl="foreach"),
        OptimSpec("adamw_bnb_8bit", 2, bits=8),
        OptimSpec("adamw_8bit", 2, bits=8),
        OptimSpec("paged_adamw_8bit", 2, bits=8, paged=True),
        OptimSpec("paged_adamw_32bit", 2, paged=True),
        OptimSpec("paged_adamw", 2, paged=True),
        OptimSpec("lion_8bit", 1, bits=8),
        OptimSpec("lion_32bit", 1),
        OptimSpec("paged_lion_8bit", 1, bits=8, paged=True),
        OptimSpec("paged_lion_32bit", 1, paged=True),
        OptimSpec("rmsprop", 1, impl="foreach"),
        OptimSpec("adagrad", 1, impl="foreach"),
        OptimSpec("sgd", 0, impl="foreach"),
        OptimSpec("adafactor", 1, impl="adafactor", factored=True),
    )
}

#: bitsandbytes Optimizer8bit: tensors smaller than this keep 32-bit state.
MIN_8BIT_SIZE = 4096
#: bitsandbytes paged optimizers page only tensors with at least this many elements.
PAGED_MIN_NUMEL = 100_000
#: bitsandbytes blockwise 8-bit state: one fp32 absmax per 256 elements.
BNB_STATE_BLOCK = 256
