"""The one vocabulary every producer (estimate, simulate, profile) reports in. See DESIGN.md."""

from __future__ import annotations

from enum import Enum


class Term(str, Enum):
    """Where device memory goes at the peak of one training step."""

    BASE_WEIGHTS = "base_weights"
    QUANT_STATE = "quant_state"
    OTHER_PARAMS = "other_params"
    ADAPTER_WEIGHTS = "adapter_weights"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATIONS = "activations"
    LOGITS = "logits"
    TEMPORARIES = "temporaries"
    WORKSPACE = "workspace"
    ALLOCATOR_OVERHEAD = "allocator_overhead"
    CUDA_CONTEXT = "cuda_context"

    def __str__(self) -> str:  # "activations", not "Term.ACTIVATIONS"
        return self.value


#: The terms that torch's allocator sees (sum = max_memory_allocated at the peak).
ALLOCATED_TERMS = tuple(Term)[:10]


class Phase(str, Enum):
    """Moments of a training step at which the peak can occur."""

    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"

    def __str__(self) -> str:
        return self.value
