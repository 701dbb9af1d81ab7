"""The model on the meta device, as `from_pretrained(quantization_config=...)` would load it.

The model is built from its config.json on `meta` the way `from_pretrained` builds it (the same
`HfQuantizer.preprocess_model`, so the same Linear replacement and skip rules: lm_head, tied weights),
and each 4-bit weight is quantized on meta (`Params4bit._quantize("meta")`: bitsandbytes' registered
fake kernels give the true packed/absmax shapes); int8 weights get their int8 data and fp32 row scales
(`int8_vectorwise_quant` on meta). `runtime.load` holds the `hf_config` and `bnb_config` shared with
the real loader.

``bitsandbytes.functional.name2qmap`` is kept on CPU (`bnb_qmap_on_cpu`): quantizing on meta would
otherwise leave a meta code table cached there for the rest of the process.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..plan import TrainPlan


def build_meta_model(config: dict[str, Any], plan: TrainPlan):
    """The model `from_pretrained(..., quantization_config=...)` would load, with meta tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..runtime.load import TORCH_DTYPE, bnb_config, hf_config

    dtype = TORCH_DTYPE[plan.dtype]
    cfg = hf_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=plan.attn_implementation)
    if plan.quant != "none":
        from transformers.quantizers.auto import AutoHfQuantizer

        try:
            from transformers.modeling_utils import local_torch_dtype  # type: ignore[attr-defined]
            dtype_ctx = local_torch_dtype(dtype, type(model).__name__)
        except ImportError:  # pragma: no cover - older transformers
            dtype_ctx = contextlib.nullcontext()
        bcfg = bnb_config(plan)
        model.config.quantization_config = bcfg
        quantizer = AutoHfQuantizer.from_config(bcfg, pre_quantized=False)
        with dtype_ctx, torch.device("meta"):
            # replace_with_bnb_linear with from_pretrained's skip rules (lm_head, tied weights, ...)
            quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"})
        quantize_on_meta(model, dtype)
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)  # is_loaded_in_4bit/8bit, config.quantization_config
    model.eval()  # as from_pretrained leaves it
    return model


def quantize_on_meta(model, dtype) -> None:
    """Quantize every bitsandbytes Linear's weight on meta (the fake kernels give the real shapes)."""
    import bitsandbytes as bnb
    import torch

    with bnb_qmap_on_cpu():
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                old = mod.weight
                kw = {k: v for k, v in old.__dict__.items() if k != "data"}
                w = bnb.nn.Params4bit(torch.empty(old.shape, dtype=dtype, device="meta"), requires_grad=False, **kw)
                mod.weight = w._quantize("meta")
                mod._is_hf_initialized = True
            elif isinstance(mod, bnb.nn.Linear8bitLt):
                old = mod.weight
                kw = {k: v for k, v in old.__dict__.items() if k not in ("data", "SCB", "CB")}
                w = bnb.nn.Int8Params(torch.empty(old.shape, dtype=dtype, device="meta"), requires_grad=False, **kw)
                mod.weight = int8_on_meta(w)
                mod._is_hf_initialized = True


def int8_on_meta(w):
    """Int8Params._quantize on meta: int8 weight [out, in] + fp32 row scales SCB [out]."""
    import torch

    B = w.data.contiguous().to(torch.float16)
    CB, SCB, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(B)  # threshold 0: no outliers
    w.data = CB
    w.CB = CB
    w.SCB = SCB
    return w


@contextlib.contextmanager
def bnb_qmap_on_cpu() -> Iterator[None]:
    """Keep `bitsandbytes.functional.name2qmap["dynamic"]` a CPU tensor across the block (see the module doc)."""
    from bitsandbytes import functional as bf

    saved = bf.name2qmap.get("dynamic")
    if saved is None or saved.is_meta:
        bf.name2qmap["dynamic"] = bf.create_dynamic_map()
    try:
        yield
    finally:
        if saved is None or saved.is_meta:
            bf.name2qmap["dynamic"] = bf.create_dynamic_map()
