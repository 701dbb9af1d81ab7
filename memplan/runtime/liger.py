"""Liger kernels applied to a model as the HF Trainer applies them (`use_liger_kernel=True`).

transformers 5.24's `Trainer.train` calls `integrations.liger.apply_liger_kernel(model,
args.liger_kernel_config)`: the PEFT wrapper unwrapped, then liger_kernel 0.8.5's
`_apply_liger_kernel_to_instance(model=base_model, **config)`. That function patches the instance
(`model.forward` -> Liger's `lce_forward`, norms' and MLPs' `forward`) and also the family's
*modules* (`modeling_llama.apply_rotary_pos_emb`, `modeling_llama.LlamaRMSNorm`, ...) and, with
`cross_entropy`, `torch.nn.functional.cross_entropy`, for every later model: `applied` restores those
module attributes on exit, so a traced plan leaves no trace in the process.

Liger's kernels are Triton (GPU only): a real CPU step cannot run them (`simulate.liger` stubs the
launches on the meta device).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from ..plan import TrainPlan


def _patched_modules(model_type: str) -> list[object]:
    """Modules whose attributes apply_liger_kernel_to_<family> may rebind."""
    import torch.nn.functional

    mods: list[object] = [torch.nn.functional]
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers.models.") and name.rsplit(".", 1)[-1].startswith("modeling_"):
            mods.append(mod)
    return mods


@contextlib.contextmanager
def applied(model, plan: TrainPlan) -> Iterator[None]:
    """Apply Liger to `model` (a PeftModel or PreTrainedModel) per `plan`, as the Trainer does; on exit
    restore the module-level attributes Liger rebound (the instance keeps its patches)."""
    if not plan.use_liger_kernel:
        yield
        return
    from transformers.integrations.liger import apply_liger_kernel

    from ..liger import kernel_kwargs

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    import transformers.models  # noqa: F401

    # import the family's modeling module first so the snapshot holds its original attributes
    import importlib

    with contextlib.suppress(ImportError):
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    saved = [(m, dict(vars(m))) for m in _patched_modules(model_type)]
    try:
        apply_liger_kernel(model, kernel_kwargs(plan.liger_kernel_config))
        yield
    finally:
        for mod, before in saved:
            now = vars(mod)
            for k, v in before.items():
                if now.get(k) is not v:
                    setattr(mod, k, v)
            for k in [k for k in now if k not in before]:
                delattr(mod, k)
