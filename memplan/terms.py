"""The one vocabulary every producer (estimate, simulate, profile) reports in. See DESIGN.md.

Each term is defined once, here (`Term.definition`); the closed form (memplan/formulas.py and the
moments of memplan/estimate.py) and the runtime tracker that labels real and meta-device steps
(memplan/runtime) follow the same definitions, and tests/test_agreement_sim.py compares the two
term by term.
"""

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
    COMM_BUFFERS = "comm_buffers"

    def __str__(self) -> str:  # "activations", not "Term.ACTIVATIONS"
        return self.value

    @property
    def definition(self) -> str:
        """What the term counts, in the words every producer follows."""
        return DEFINITIONS[self]


DEFINITIONS: dict[Term, str] = {
    Term.BASE_WEIGHTS: "the weight of every Linear inside the decoder layers (the layers bitsandbytes "
                       "quantizes), whatever the method and whether LoRA targets it or not, in its stored "
                       "form: packed 4-bit, int8, or 16/32-bit for LoRA and full fine-tuning; not lm_head, "
                       "not the embeddings",
    Term.QUANT_STATE: "the quantization constants beside those weights: block absmax, nested absmax, code "
                      "tables, offsets (4-bit), row scales (int8)",
    Term.OTHER_PARAMS: "every other parameter and buffer: embeddings, lm_head, norms, biases, rotary "
                       "buffers, mixture-of-experts experts and routers, after any dtype change",
    Term.ADAPTER_WEIGHTS: "the LoRA adapters (A and B)",
    Term.GRADIENTS: "parameter gradients (.grad) alive at the peak",
    Term.OPTIMIZER_STATE: "optimizer state on the device (paged state in managed memory is paged_bytes)",
    Term.ACTIVATIONS: "tensors made by the forward (or a checkpointed recompute) that outlive the module "
                      "call that made them: saved for backward, module outputs, checkpoint inputs",
    Term.LOGITS: "the [tokens x vocab] logits, their fp32 copy, log-softmax and its gradients",
    Term.TEMPORARIES: "everything else alive at the peak: tensors made and freed inside one module call "
                      "(dequantized weights, casts), gradients in flight, optimizer scratch",
    Term.WORKSPACE: "cuBLAS/cuDNN workspaces allocated through torch's allocator",
    Term.ALLOCATOR_OVERHEAD: "torch reserved - allocated (segment rounding, fragmentation, cache)",
    Term.CUDA_CONTEXT: "the CUDA context and library state outside torch's allocator",
    Term.COMM_BUFFERS: "collective buffers of a distributed step held by torch's allocator: DDP's reducer "
                       "buckets, FSDP's reduce-scatter buffers, DeepSpeed ZeRO's gradient (ipg) and prefetch "
                       "buckets (torch/nn/parallel/distributed.py Reducer; torch/distributed/fsdp/_fully_shard/"
                       "_fsdp_collectives.py; deepspeed/runtime/zero/stage_1_and_2.py, stage3.py); NCCL's own "
                       "buffers live outside torch's allocator and are not counted (like cuda_context); 0 for a "
                       "single-GPU step",
}

#: The terms of a single-GPU result (every Term but `comm_buffers`, which only a distributed plan has):
#: the keys of a single-GPU estimate's JSON, unchanged since before distributed plans.
SINGLE_DEVICE_TERMS = tuple(Term)[:12]

#: The terms that torch's allocator sees (sum = max_memory_allocated at the peak).
ALLOCATED_TERMS = tuple(Term)[:10] + (Term.COMM_BUFFERS,)


class Phase(str, Enum):
    """Moments of a training step at which the peak can occur."""

    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"

    def __str__(self) -> str:
        return self.value
