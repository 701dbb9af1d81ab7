"""Which static term each parameter and buffer of a loaded model belongs to.

The definitions, the same in all three paths (estimate, simulate, profile), whatever the method
(qlora, lora, full) and whichever modules LoRA targets:

- `base_weights`: the weight of every Linear inside the decoder layers (the layers bitsandbytes
  quantizes; not lm_head, not the embeddings), in its stored form: packed 4-bit, int8, or the
  16/32-bit weight for lora and full (trainable or not, LoRA-wrapped or not).
- `quant_state`: their quantization constants (4-bit absmax, nested absmax, code tables, offsets;
  int8 row scales).
- `adapter_weights`: the LoRA A/B matrices (peft's `lora_*` parameters) and nothing else.
- `other_params`: every other parameter and buffer: embeddings, lm_head, norms, biases, rotary
  buffers, and mixture-of-experts expert tensors and routers that are not `nn.Linear` modules (the
  fused 3-D experts of transformers 5), trainable or not.

A Linear "inside the decoder layers" is an `nn.Linear` (bitsandbytes' `Linear4bit`/`Linear8bitLt`
are subclasses; under peft, the wrapped `base_layer`) found under one of the model's decoder layers
(`get_decoder().layers`, else the modules named in `_no_split_modules`), peft's own `lora_A`/`lora_B`
Linears excepted. A multimodal checkpoint's other towers (Gemma 3's SigLIP vision tower: the modules
outside `get_decoder()`, the output embedding excepted) count alike: from_pretrained quantizes their
Linears as well (ModelSpec.vision_linears).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..terms import Term


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = None
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):  # pragma: no cover - models without a decoder accessor
            decoder = None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        return list(layers)
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def _is_lora_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def tower_modules(model) -> list[torch.nn.Module]:
    """The non-text towers of a multimodal model (vision encoder, projector): the base model's children
    other than the decoder `get_decoder()` returns; none for a plain causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    inner = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if not callable(get_decoder) or not isinstance(inner, torch.nn.Module):
        return []
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError):  # pragma: no cover
        return []
    if decoder is inner or decoder is base:
        return []
    return [m for m in inner.children() if m is not decoder]


def base_weight_names(model) -> set[str]:
    """Names (as `model.named_parameters()` gives them) of the `base_weights` parameters."""
    ids = set()
    for layer in decoder_layers(model) + tower_modules(model):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) and not _is_lora_name(name):
                w = getattr(mod, "weight", None)
                if isinstance(w, torch.Tensor):
                    ids.add(id(w))
    return {name for name, p in model.named_parameters() if id(p) in ids}


def classify_param(name: str, base_names: set[str]) -> Term:
    """The term of parameter `name`, given the model's `base_weight_names`."""
    if name in base_names:
        return Term.BASE_WEIGHTS
    if _is_lora_name(name):
        return Term.ADAPTER_WEIGHTS
    return Term.OTHER_PARAMS


def param_classifier(model) -> Callable[[str, torch.Tensor], Term]:
    """`classify(name, param) -> Term` for `LiveTensorTracker.register_model(model, classify)`."""
    base = base_weight_names(model)
    return lambda name, _p: classify_param(name, base)
