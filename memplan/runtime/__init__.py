"""The measuring instrument: an HF-Trainer-like training step and the live-tensor tracker.

`simulate` (meta device), `profile` (real CPU/CUDA steps), the Trainer callback and the tests all
measure through this package (needs torch, transformers, peft, bitsandbytes):

- `load`: the one model loader (`from_pretrained` with `BitsAndBytesConfig`), `hf_config`,
  `bnb_config`, `adapt` (prepare_model_for_kbit_training, get_peft_model, checkpointing).
- `classify`: which term each parameter and buffer is (the definitions of base_weights,
  quant_state, adapter_weights and other_params).
- `step`: the optimizer the HF Trainer builds, `run_steps` (N Trainer-like steps under the tracker),
  `cpu_step`, `StepResult`.
- `tracker`: `LiveTensorTracker`, a TorchDispatchMode that counts every live storage per phase and
  labels it with a term after the step.

Importing this package imports nothing heavy; the names below load their module on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "TORCH_DTYPE": "load", "hf_config": "load", "bnb_config": "load", "from_pretrained_kwargs": "load",
    "load_model": "load", "adapt": "load",
    "base_weight_names": "classify", "classify_param": "classify", "decoder_layers": "classify",
    "param_classifier": "classify",
    "StepResult": "step", "make_optimizer": "step", "run_steps": "step", "cpu_step": "step",
    "LiveTensorTracker": "tracker", "StorageRecord": "tracker", "PhasePeak": "tracker",
    "quant_state_tensors": "tracker",
}


def __getattr__(name: str) -> Any:
    mod = _NAMES.get(name)
    if mod is None:
        raise AttributeError(f"module 'memplan.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = sorted(_NAMES)
