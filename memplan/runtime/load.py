"""Loading and adapting the model the way an HF QLoRA/LoRA script does.

`load_model` is the one loader of memplan: `AutoModelForCausalLM.from_pretrained(path,
quantization_config=BitsAndBytesConfig(...))` from a checkpoint folder, by default one of random
weights written for the occasion (memory does not depend on weight values). `memplan.profile.weights`
hands it cached random checkpoints and real ones; `memplan.simulate.build` builds the same model on
the meta device with the same `hf_config` and `bnb_config`. `adapt` then applies
`prepare_model_for_kbit_training`, `get_peft_model` and gradient checkpointing as the HF Trainer sets
it.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch

from ..plan import TrainPlan

#: plan dtype names -> torch dtypes
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_config(config: dict[str, Any]):
    """A transformers PretrainedConfig from config.json values.

    A pre-quantized checkpoint's MXFP4 `quantization_config` (gpt-oss: experts stored as MXFP4
    blocks/scales) is dropped: training runs on the dequantized bf16 experts (what
    `Mxfp4Config(dequantize=True)` loads, and what a bf16 copy loaded with `BitsAndBytesConfig` holds;
    the MXFP4 checkpoint itself refuses a BitsAndBytesConfig: transformers 5.24 quantizers/auto.py
    `merge_quantization_configs` raises ValueError), so that is the model memplan builds.
    """
    from transformers import AutoConfig

    cfg = copy.deepcopy(dict(config))  # transformers edits nested dicts (rope_scaling) in place
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        cfg.pop("quantization_config")
    return AutoConfig.for_model(model_type, **cfg)


def text_vocab_size(config: dict[str, Any]) -> int:
    """The vocabulary the batch is drawn from: `vocab_size`, or the text tower's for a multimodal
    checkpoint (Gemma 3: `text_config`, whose hub file may leave it to Gemma3TextConfig's default)."""
    if isinstance(config.get("vocab_size"), int):
        return config["vocab_size"]
    return hf_config(config).get_text_config().vocab_size


def bnb_config(plan: TrainPlan):
    """The `BitsAndBytesConfig` of a qlora plan (4-bit nf4/fp4, or LLM.int8)."""
    from transformers import BitsAndBytesConfig

    if plan.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quant,
        bnb_4bit_use_double_quant=plan.double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPE[plan.compute_dtype],
    )


def from_pretrained_kwargs(config: dict[str, Any], plan: TrainPlan, device: str = "cpu") -> dict[str, Any]:
    """The keyword arguments a training script passes to `from_pretrained` for `plan`."""
    kw: dict[str, Any] = {"dtype": TORCH_DTYPE[plan.dtype], "attn_implementation": plan.attn_implementation}
    if config.get("experts_implementation"):  # a load-time option, not saved in config.json
        kw["experts_implementation"] = config["experts_implementation"]
    if plan.method == "qlora":
        kw["quantization_config"] = bnb_config(plan)
    if device != "cpu":
        kw["device_map"] = {"": device}
    return kw


def load_model(config: dict[str, Any], plan: TrainPlan, device: str = "cpu", seed: int = 0,
               checkpoint: str | None = None):
    """The model as `AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=...)` returns it.

    `checkpoint`: a folder with config.json and weights (a hub id works too). None: random weights
    (transformers' own initialisation, seeded by `seed`) are built from `config`, saved to a temporary
    folder and loaded back through the same `from_pretrained` path.
    """
    from transformers import AutoModelForCausalLM

    kw = from_pretrained_kwargs(config, plan, device)
    if checkpoint is not None:
        return AutoModelForCausalLM.from_pretrained(checkpoint, **kw)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="memplan-") as tmp:
        model = AutoModelForCausalLM.from_config(hf_config(config), dtype=TORCH_DTYPE[plan.dtype])
        model.save_pretrained(tmp)
        del model
        return AutoModelForCausalLM.from_pretrained(tmp, **kw)


def adapt(model, plan: TrainPlan):
    """prepare_model_for_kbit_training + get_peft_model + checkpointing, as an HF QLoRA script does."""
    if plan.prepare:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    if plan.method in ("qlora", "lora"):
        from peft import LoraConfig, get_peft_model

        tm = plan.target_modules if isinstance(plan.target_modules, str) else list(plan.target_modules)
        lcfg = LoraConfig(r=plan.lora_r, lora_alpha=plan.lora_alpha, lora_dropout=plan.lora_dropout,
                          target_modules=tm, task_type="CAUSAL_LM")
        # peft upcasts 16-bit adapters to fp32 unless told not to; "pure 16-bit" scripts keep them
        # 16-bit (autocast_adapter_dtype=False, or the whole model cast after get_peft_model)
        fp32 = plan.adapter_dtype == "fp32"
        model = get_peft_model(model, lcfg, autocast_adapter_dtype=fp32)
        if not fp32:
            for name, p in model.named_parameters():
                if "lora_" in name and p.dtype != TORCH_DTYPE[plan.adapter_dtype]:
                    p.data = p.data.to(TORCH_DTYPE[plan.adapter_dtype])
    if plan.gradient_checkpointing:
        # What the HF Trainer does (transformers' default: non-reentrant, plus an input-grad hook);
        # TrainingArguments.gradient_checkpointing_kwargs={"use_reentrant": True} picks torch's reentrant one.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": plan.use_reentrant})
    else:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
    model.train()
    return model
