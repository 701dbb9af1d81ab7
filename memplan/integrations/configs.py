"""Training config files in: an axolotl YAML, a TRL `SFTConfig` saved as JSON/YAML (or the one file
that `trl sft --config` reads, with ModelConfig's fields), or a transformers `TrainingArguments` JSON.

`read_config(path)` maps every field that changes the memory of a step onto TrainPlan fields and says
in `notes` what memplan does not model (Liger kernels, offloading, multi-GPU sharding...):
nothing that changes memory is dropped silently. JSON needs only the stdlib; YAML needs PyYAML
(imported lazily: the `config` extra).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import InvalidSpecError, MissingExtraError
from ..liger import AXOLOTL_KEYS, KERNELS
from ..optim import OPTIMIZERS
from ..plan import ATTN, PADDING, fields_from_hf, norm_dtype, packing_fields

KINDS = ("axolotl", "trl", "training_args", "accelerate", "deepspeed")

#: keys that only an axolotl config has
_AXOLOTL_KEYS = ("base_model", "micro_batch_size", "sequence_len", "adapter", "datasets", "lora_target_linear",
                 "sample_packing", "flash_attention", "sdp_attention", "xformers_attention", "plugins",
                 "pad_to_sequence_len", "optimizer", "base_model_config", "lora_target_linear")
#: keys of TRL's SFTConfig / ModelConfig that TrainingArguments lacks
_TRL_KEYS = ("max_length", "max_seq_length", "packing", "padding_free", "dataset_text_field", "completion_only_loss",
             "assistant_only_loss", "model_init_kwargs", "dataset_kwargs", "model_name_or_path", "use_peft",
             "activation_offloading", "packing_strategy", "dataset_num_proc", "eos_token", "pad_token")
#: keys of TrainingArguments
_TA_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "output_dir", "learning_rate", "optim",
            "num_train_epochs", "max_steps", "gradient_checkpointing", "bf16", "fp16")

NOT_MODELLED = "memplan does not model it yet (estimated without it)"
MULTI_GPU = "multi-GPU sharding is not modelled: the estimate is one GPU holding the whole model (no sharding)"

#: axolotl keys that change memory and that memplan does not model: a note names each one that is set
_AXOLOTL_UNMODELLED = ("lora_modules_to_save", "peft_use_dora", "unfrozen_parameters", "torch_compile",
                       "unsloth_lora_mlp", "unsloth_lora_qkv", "unsloth_lora_o", "unsloth_cross_entropy_loss",
                       "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "s2_attention", "lora_on_cpu",
                       "gpu_memory_limit", "max_memory", "float16", "bfloat16", "rl",
                       "relora_steps", "sequence_parallel_degree", "context_parallel_size",
                       "tensor_parallel_size", "pad_to_multiple_of")
#: TRL / TrainingArguments keys likewise
#: (not fsdp_config: a saved TrainingArguments holds its defaults with fsdp off; the fsdp note covers it)
_TRL_UNMODELLED = ("torch_compile", "auto_find_batch_size", "pad_to_multiple_of",
                   "torch_empty_cache_steps", "optim_target_modules", "use_dora", "lora_modules_to_save")


@dataclass(frozen=True)
class ConfigRead:
    """What a config file says about the step: TrainPlan fields, the model it names, the notes."""

    plan_fields: dict
    model: str | None
    notes: tuple[str, ...]
    kind: str
    path: str = ""


def _bad(path: str, problem: str) -> InvalidSpecError:
    return InvalidSpecError(f"config {path}", [problem])


def load_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The file's top-level mapping: JSON with the stdlib, YAML with PyYAML."""
    p = Path(os.path.expanduser(str(path)))
    name = str(path)
    if not p.is_file():
        raise _bad(name, "no such file" if not p.exists() else "not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(name, f"cannot read it ({e.__class__.__name__}: {e})") from None
    data: Any
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise _bad(name, f"not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise MissingExtraError("reading a YAML config", "PyYAML", "config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = " ".join(str(e).split())
            raise _bad(name, f"not valid YAML ({first[:160]})") from None
    if not isinstance(data, dict):
        raise _bad(name, f"the file holds a {type(data).__name__}, not a mapping of field names to values")
    return data


def detect_kind(data: Mapping[str, Any]) -> str:
    if "distributed_type" in data or "compute_environment" in data:
        return "accelerate"
    if "zero_optimization" in data:
        return "deepspeed"
    if any(k in data for k in _AXOLOTL_KEYS):
        return "axolotl"
    if any(k in data for k in _TRL_KEYS):
        return "trl"
    if any(k in data for k in _TA_KEYS):
        return "training_args"
    return ""


def read_config(path: Any) -> ConfigRead:
    """Read an axolotl YAML, a TRL SFTConfig or a TrainingArguments file (JSON or YAML), detecting
    the format from its keys. A `ConfigRead` passes through unchanged. A malformed or contradictory
    file raises InvalidSpecError naming the field."""
    if isinstance(path, ConfigRead):
        return path
    name = str(path)
    data = load_mapping(path)
    kind = detect_kind(data)
    if not kind:
        raise _bad(name, "not an axolotl, TRL SFTConfig or TrainingArguments config: none of its keys "
                         f"({', '.join(sorted(map(str, data))[:6]) or 'none'}) says which")
    reader = _Reader(name, data)
    if kind in ("accelerate", "deepspeed"):
        fields, model = reader.launcher(kind), None
    else:
        fields, model = (reader.axolotl() if kind == "axolotl" else reader.trl(kind))
    return ConfigRead(plan_fields=fields, model=model, notes=tuple(reader.notes), kind=kind, path=name)


class _Reader:
    def __init__(self, path: str, data: Mapping[str, Any]):
        self.path, self.d = path, data
        self.notes: list[str] = []

    # -- helpers ----------------------------------------------------------------------------------
    def bad(self, problem: str) -> InvalidSpecError:
        return _bad(self.path, problem)

    def note(self, text: str) -> None:
        self.notes.append(f"config file: {text}")

    def on(self, key: str, d: Mapping[str, Any] | None = None) -> bool:
        """A boolean-ish switch: true, 'true', 'auto', a non-empty string or list."""
        v = (self.d if d is None else d).get(key)
        if isinstance(v, str):
            return v.strip().lower() not in ("", "false", "no", "0", "none", "null")
        return bool(v)

    def int_(self, key: str, d: Mapping[str, Any] | None = None) -> int | None:
        v = (self.d if d is None else d).get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self.bad(f"{key} must be a positive integer, got {v!r}")
        return v

    def bool_(self, key: str, d: Mapping[str, Any] | None = None) -> bool | None:
        v = (self.d if d is None else d).get(key)
        if v is None or isinstance(v, bool):
            return v
        raise self.bad(f"{key} must be true or false, got {v!r}")

    def precision(self) -> tuple[bool, bool]:
        bf16, fp16 = self.on("bf16"), self.on("fp16")
        if bf16 and fp16:
            raise self.bad("bf16 and fp16 are both true; set one of them")
        return bf16, fp16

    def optim(self, key: str) -> str | None:
        v = self.d.get(key)
        if v is None:
            return None
        v = str(v).lower()
        if v not in OPTIMIZERS:
            raise self.bad(f"{key} {v!r} is not an optimizer memplan knows (known: {', '.join(OPTIMIZERS)})")
        return v

    def gc_kwargs(self) -> dict[str, Any]:
        kw = self.d.get("gradient_checkpointing_kwargs")
        if kw is None:
            return {}
        if not isinstance(kw, Mapping):
            raise self.bad(f"gradient_checkpointing_kwargs must be a mapping like {{use_reentrant: false}}, got {kw!r}")
        if "use_reentrant" in kw and not isinstance(kw["use_reentrant"], bool):
            raise self.bad(f"gradient_checkpointing_kwargs.use_reentrant must be true or false, "
                           f"got {kw['use_reentrant']!r}")
        return dict(kw)

    def unmodelled(self, keys: tuple[str, ...]) -> None:
        for k in keys:
            if self.on(k):
                self.note(f"{k}: {self.d[k]!r} changes memory; {NOT_MODELLED}")

    def launcher(self, kind: str) -> dict[str, Any]:
        """An accelerate config YAML or a DeepSpeed JSON: the distributed fields (memplan.integrations.world)."""
        from .world import from_accelerate, from_deepspeed

        try:
            if kind == "accelerate":
                out, notes = from_accelerate(self.d, base=Path(self.path).parent)
            else:
                out, notes = from_deepspeed(self.d)
                for key, field in (("train_micro_batch_size_per_gpu", "batch_size"),
                                   ("gradient_accumulation_steps", "gradient_accumulation_steps")):
                    if isinstance(self.d.get(key), int) and not isinstance(self.d.get(key), bool):
                        out[field] = self.int_(key)
        except (TypeError, ValueError) as e:
            raise self.bad(f"a distributed setting is not a number where one is needed ({e})") from None
        for n in notes:
            self.note(n)
        return out

    def world(self) -> dict[str, Any]:
        """TrainingArguments / SFTConfig `fsdp`, `fsdp_config`, `deepspeed`, `ddp_bucket_cap_mb` -> fields."""
        from .world import from_deepspeed, from_fsdp_args, load_deepspeed

        out: dict[str, Any] = {}
        try:
            f, notes = from_fsdp_args(self.d.get("fsdp"), self.d.get("fsdp_config") or {})
            if f:
                out.update(f)
                self.note(f"fsdp {_short(self.d['fsdp'])}: estimated per rank as FSDP{f.get('fsdp_version', 2)} "
                          f"{f.get('fsdp_sharding_strategy', 'FULL_SHARD')}; the launcher sets the number of "
                          "processes: give --num-processes N (accelerate launch / torchrun)")
            if self.on("deepspeed"):
                cfg, more = load_deepspeed(self.d["deepspeed"], base=Path(self.path).parent)
                f2, notes2 = from_deepspeed(cfg)
                f2.pop("mixed_precision", None)  # the Trainer's bf16/fp16 win ("auto" in the JSON)
                out.update(f2)
                notes += more + notes2
                self.note(f"deepspeed {_short(self.d['deepspeed'])}: estimated per rank as ZeRO-"
                          f"{f2.get('zero_stage', 3)}; the launcher sets the number of processes: give "
                          "--num-processes N")
        except (TypeError, ValueError) as e:
            raise self.bad(f"fsdp / fsdp_config / deepspeed: a setting is not what it should be ({e})") from None
        for n in notes:
            self.note(n)
        if self.d.get("ddp_bucket_cap_mb") is not None:
            out["ddp_bucket_cap_mb"] = self.d["ddp_bucket_cap_mb"]
        return out

    def multi_gpu(self) -> None:
        for k in ("deepspeed", "fsdp"):
            if self.on(k):
                self.note(f"{k} is set ({_short(self.d[k])}): {MULTI_GPU}")

    def attn(self, value: Any, key: str) -> str | None:
        v = str(value).strip().lower()
        if v in ATTN:
            return v
        if v in ("flash_attention_3", "flex_attention") or "flash" in v or "kernels-community" in v:
            self.note(f"{key} {value!r} is not modelled; estimated with flash_attention_2")
            return "flash_attention_2"
        self.note(f"{key} {value!r} is not modelled; estimated with sdpa")
        return "sdpa"

    # -- axolotl ----------------------------------------------------------------------------------
    def axolotl(self) -> tuple[dict[str, Any], str | None]:
        d = self.d
        out: dict[str, Any] = {}
        adapter = str(d.get("adapter") or "").strip().lower()
        if adapter not in ("", "qlora", "lora"):
            raise self.bad(f"adapter {d.get('adapter')!r} is not modelled (memplan plans qlora, lora or a full "
                           "fine-tune without adapter)")
        in4, in8 = self.bool_("load_in_4bit"), self.bool_("load_in_8bit")
        if in4 and in8:
            raise self.bad("load_in_4bit and load_in_8bit are both true; set one of them")
        if adapter == "qlora" and not in4:
            raise self.bad("adapter qlora needs load_in_4bit: true")
        if adapter == "lora" and in4:
            raise self.bad("load_in_4bit: true with adapter lora; axolotl trains a 4-bit base with adapter: qlora")
        if not adapter and (in4 or in8):
            raise self.bad(f"{'load_in_4bit' if in4 else 'load_in_8bit'}: true without an adapter; a quantized "
                           "base trains only with adapter: qlora or lora")
        bf16, fp16 = self.precision()
        # axolotl loads in bf16 under bf16, in fp16 under fp16 or 8-bit, else in fp32; the 4-bit layers
        # compute in that dtype unless bnb_4bit_compute_dtype says otherwise
        load = "bf16" if bf16 else "fp16" if (fp16 or in8) else "fp32"
        bnb_kw = d.get("bnb_config_kwargs") or {}
        if not isinstance(bnb_kw, Mapping):
            raise self.bad(f"bnb_config_kwargs must be a mapping, got {bnb_kw!r}")
        get = lambda k, default: d.get(k, bnb_kw.get(k, default))  # noqa: E731
        if adapter:
            out.update(fields_from_hf(bnb_config={
                "load_in_4bit": bool(in4), "load_in_8bit": bool(in8),
                "bnb_4bit_quant_type": get("bnb_4bit_quant_type", "nf4"),
                "bnb_4bit_use_double_quant": get("bnb_4bit_use_double_quant", True),
                "bnb_4bit_compute_dtype": get("bnb_4bit_compute_dtype", load)}))
            out.setdefault("method", "lora")
            lora: dict[str, Any] = {}
            for ours, theirs in (("r", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
                if d.get(theirs) is not None:
                    lora[ours] = d[theirs]
            if self.on("lora_target_linear"):
                lora["target_modules"] = "all-linear"
            elif d.get("lora_target_modules"):
                tm = d["lora_target_modules"]
                lora["target_modules"] = tm if isinstance(tm, str) else [str(t) for t in tm]
            out.update(fields_from_hf(lora_config=lora))
        else:
            out["method"] = "full"
        out["dtype"] = load
        out["mixed_precision"] = "bf16" if bf16 else "fp16" if fp16 else "no"
        if str(d.get("bf16")).lower() == "auto":
            self.note("bf16: auto estimated as bf16 (the GPU supports it); pass --mixed-precision to say otherwise")
        for ours, theirs in (("batch_size", "micro_batch_size"), ("seq_len", "sequence_len"),
                             ("gradient_accumulation_steps", "gradient_accumulation_steps")):
            v = self.int_(theirs)
            if v is not None:
                out[ours] = v
        gc = d.get("gradient_checkpointing")
        if gc is not None:
            if isinstance(gc, str) and gc.lower() == "offload":
                out["gradient_checkpointing"] = True
                out["checkpoint_offload"] = True  # the checkpointed layers' inputs in host memory
            elif isinstance(gc, str) and gc.lower() == "offload_disk":
                out["gradient_checkpointing"] = True
                self.note(f"gradient_checkpointing: {gc} moves checkpoints to disk; memplan does not "
                          "model it yet (estimated as checkpoints kept on the GPU)")
            elif isinstance(gc, bool):
                out["gradient_checkpointing"] = gc
            else:
                raise self.bad(f"gradient_checkpointing must be true, false or offload, got {gc!r}")
        kw = self.gc_kwargs()
        if "use_reentrant" in kw:
            out["use_reentrant"] = kw["use_reentrant"]
        optim = self.optim("optimizer")
        if optim:
            out["optim"] = optim
        attn = [k for k in ("flash_attention", "sdp_attention", "xformers_attention", "eager_attention")
                if self.on(k)]
        if len(attn) > 1:
            raise self.bad(f"{' and '.join(attn)} are all true; set one attention implementation")
        if d.get("attn_implementation"):
            out["attn_implementation"] = self.attn(d["attn_implementation"], "attn_implementation")
        elif attn:
            out["attn_implementation"] = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa",
                                          "eager_attention": "eager", "xformers_attention": "sdpa"}[attn[0]]
            if attn[0] == "xformers_attention":
                self.note(f"xformers_attention: {NOT_MODELLED}; estimated with sdpa")
        packing = self.on("sample_packing")
        if packing:
            out["padding"] = "none"
            out["packing"] = True
            self.note("sample_packing: true: axolotl's multipack collator fills micro_batch_size rows of "
                      "sequence_len tokens, position ids restarting per sample; estimated as transformers' packed "
                      "rows (--packing); axolotl's own attention patches are not traced")
        elif self.on("pad_to_sequence_len"):
            out["padding"] = "max_length"
        else:
            out["padding"] = "longest"  # axolotl's collator pads each batch to its longest row, with a mask
        if d.get("padding") is not None:
            out["padding"] = self.padding(d["padding"])
        self.out = out
        self.plugins()
        ao = d.get("activation_offloading")
        if isinstance(ao, str) and ao.lower() == "legacy":  # TRL's hooks on one stream (no CUDA streams)
            out["activation_offloading"] = True
        elif isinstance(ao, str) and ao.lower() == "disk":
            self.note(f"activation_offloading: {ao} moves saved activations to disk; {NOT_MODELLED}")
        elif ao is not None:
            out["activation_offloading"] = self.bool_("activation_offloading")
        for k in ("chunked_cross_entropy", "cut_cross_entropy"):
            if self.on(k):
                self.note(f"{k}: the loss never holds the full [tokens x vocab] logits; {NOT_MODELLED} "
                          "(the logits term is counted whole)")
        self.multi_gpu()
        self.unmodelled(_AXOLOTL_UNMODELLED)
        model = d.get("base_model")
        return out, (str(model) if model else None)

    def padding(self, value: Any) -> str:
        v = {"false": "none", "do_not_pad": "none", "true": "longest"}.get(str(value).lower(), str(value).lower())
        if v not in PADDING:
            raise self.bad(f"padding {value!r} is not one of: {', '.join(PADDING)}")
        return v

    def plugins(self) -> None:
        plugins = self.d.get("plugins") or []
        if isinstance(plugins, str):
            plugins = [plugins]
        if not isinstance(plugins, list):
            raise self.bad(f"plugins must be a list of plugin class paths, got {plugins!r}")
        liger_keys = [k for k in AXOLOTL_KEYS if self.on(k)]
        if liger_keys and not any("liger" in str(p).lower() for p in plugins):
            self.note(f"{', '.join(liger_keys)} set without plugins: [axolotl.integrations.liger.LigerPlugin]: "
                      "axolotl applies no Liger kernel (estimated without)")
        for p in plugins:
            low = str(p).lower()
            if "liger" in low:
                self.liger_axolotl(liger_keys)
            elif "cut_cross_entropy" in low:
                if not self.on("cut_cross_entropy"):
                    self.note(f"plugin {p}: cut cross-entropy; {NOT_MODELLED}")
            else:
                self.note(f"plugin {p}: its effect on memory is not modelled")

    def liger_axolotl(self, keys: list[str]) -> None:
        """axolotl's LigerPlugin: the kernels whose `liger_*` key is true, exactly (the plugin passes each
        key, unset = off, to apply_liger_kernel_to_<family>; liger_glu_activation is swiglu or geglu)."""
        for k in AXOLOTL_KEYS:
            if k in self.d and self.d[k] is not None and not isinstance(self.d[k], bool):
                raise self.bad(f"{k} must be true or false, got {self.d[k]!r}")
        kernels = {AXOLOTL_KEYS[k] for k in keys}
        if "swiglu" in kernels:
            kernels.add("geglu")
        self.out["use_liger_kernel"] = True
        self.out["liger_kernel_config"] = {k: k in kernels for k in KERNELS}
        self.note(f"Liger kernels via axolotl's LigerPlugin ({', '.join(keys) or 'no liger_* key set: none'}): "
                  "modelled as use_liger_kernel with exactly those kernels")

    def liger_trl(self, kind: str) -> None:
        """TrainingArguments / SFTConfig `use_liger_kernel` and `liger_kernel_config` (a dict of overrides of
        the family's defaults). TRL 1.16's SFTTrainer refuses fused_linear_cross_entropy=True in the
        config and otherwise switches it off (it fuses the LM head its own way: trl sft_trainer.py)."""
        d = self.d
        if "use_liger_kernel" in d:
            self.bool_("use_liger_kernel")
            self.out["use_liger_kernel"] = bool(d["use_liger_kernel"])
        cfg = d.get("liger_kernel_config")
        if cfg is not None and not isinstance(cfg, Mapping):
            raise self.bad(f"liger_kernel_config must be a mapping of kernel: true|false, got {cfg!r}")
        cfg = dict(cfg or {})
        if not self.on("use_liger_kernel"):
            if cfg:
                self.note("liger_kernel_config is set but use_liger_kernel is not: the Trainer applies no Liger "
                          "kernel (estimated without)")
            return
        if kind == "trl":
            if cfg.get("fused_linear_cross_entropy"):
                raise self.bad('liger_kernel_config {"fused_linear_cross_entropy": true} is refused by TRL\'s '
                               "SFTTrainer (it patches the model's forward with its own fused LM head); drop it")
            cfg["fused_linear_cross_entropy"] = False
            self.note("use_liger_kernel: true under TRL's SFTTrainer: Liger's layer kernels only (SFTTrainer switches "
                      "Liger's fused linear cross-entropy off and computes the loss with its own fused LM head, "
                      "which memplan does not model yet)")
        else:
            self.note("use_liger_kernel: true: Liger kernels as the HF Trainer applies them "
                      "(modelled: use_liger_kernel)")
        if cfg:
            self.out["liger_kernel_config"] = cfg

    # -- TRL SFTConfig / TrainingArguments ---------------------------------------------------------
    def trl(self, kind: str) -> tuple[dict[str, Any], str | None]:
        d = self.d = self.checkpointing_names(self.d)
        for k in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            self.int_(k)
        self.precision()
        if "gradient_checkpointing" in d:
            self.bool_("gradient_checkpointing")
        self.gc_kwargs()
        ta = {k: d[k] for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                "gradient_checkpointing", "gradient_checkpointing_kwargs", "bf16", "fp16")
              if k in d}
        optim = self.optim("optim")
        if optim:
            ta["optim"] = optim
        if kind == "trl" and "bf16" not in d and not self.on("fp16"):
            ta["bf16"] = True  # SFTConfig: bf16 defaults to `not fp16`
        elif kind == "training_args":
            ta.setdefault("bf16", False)  # TrainingArguments: both default to False (no autocast)
            ta.setdefault("fp16", False)
        out = fields_from_hf(training_args=ta)
        if self.on("use_cpu"):
            self.note("use_cpu: true ignored; pass --device cpu (device='cpu') to estimate a CPU step")
        mik = d.get("model_init_kwargs") or {}
        if not isinstance(mik, Mapping):
            raise self.bad(f"model_init_kwargs must be a mapping, got {mik!r}")
        # TRL's ModelConfig fields (`trl sft --config` reads them from the same file) win over model_init_kwargs
        attn = d.get("attn_implementation") or mik.get("attn_implementation")
        if attn:
            out["attn_implementation"] = self.attn(attn, "attn_implementation")
        dtype = d.get("dtype") or d.get("torch_dtype") or mik.get("dtype") or mik.get("torch_dtype")
        if dtype:
            nd = norm_dtype(dtype)
            if nd in ("bf16", "fp16", "fp32"):
                out["dtype"] = nd
            else:
                self.note(f"dtype {dtype!r}: the load dtype is the checkpoint's; estimated with bf16 "
                          "(pass --dtype to say otherwise)")
        qc = mik.get("quantization_config")
        if qc is not None and not isinstance(qc, Mapping):
            raise self.bad(f"model_init_kwargs.quantization_config must be a mapping, got {qc!r}")
        bnb = dict(qc or {})
        for theirs, ours in (("load_in_4bit", "load_in_4bit"), ("load_in_8bit", "load_in_8bit"),
                             ("bnb_4bit_quant_type", "bnb_4bit_quant_type"),
                             ("use_bnb_nested_quant", "bnb_4bit_use_double_quant")):
            if d.get(theirs) is not None:
                bnb[ours] = d[theirs]
        if bnb.get("load_in_4bit") and bnb.get("load_in_8bit"):
            raise self.bad("load_in_4bit and load_in_8bit are both true; set one of them")
        quantized = bool(bnb.get("load_in_4bit") or bnb.get("load_in_8bit"))
        if kind == "trl":
            # SFTTrainer's own step (trl 1.16): the fused LM head (memplan/fused_head.py), and, with a
            # quantized base, bf16 adapters (TrainPlan resolves them from trainer="sft")
            out["trainer"] = "sft"
            if self.on("label_smoothing_factor"):
                self.note(f"label_smoothing_factor: {self.d['label_smoothing_factor']!r}: SFTTrainer then computes "
                          "the loss from the full [tokens x vocab] logits and runs a second, no-grad forward "
                          f"through its fused head for the metrics; {NOT_MODELLED}")
            if not dtype and d.get("model_name_or_path"):
                out["dtype"] = "fp32"  # ModelConfig.dtype and create_model_from_path default to float32
                self.note("dtype not in the file: `trl sft` loads the model in float32 (ModelConfig's default); "
                          "estimated with --dtype fp32")
        if quantized:
            if bnb.get("load_in_4bit"):  # ModelConfig/BitsAndBytesConfig defaults
                bnb.setdefault("bnb_4bit_quant_type", "nf4")
                bnb.setdefault("bnb_4bit_compute_dtype", out.get("dtype", "bf16"))
            out.update(fields_from_hf(bnb_config=bnb))
            if kind == "trl":  # the trainer loads the model itself and never prepares it (trl 1.16)
                out["prepare"] = False
        use_peft = self.bool_("use_peft")
        if use_peft is False and quantized:
            raise self.bad("load_in_4bit/load_in_8bit with use_peft: false; a quantized base trains only with "
                           "a LoRA adapter (use_peft: true)")
        if use_peft or any(k in d for k in ("lora_r", "lora_target_modules")):
            lora: dict[str, Any] = {}
            for ours, theirs in (("r", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                                 ("target_modules", "lora_target_modules")):
                if d.get(theirs) is not None:
                    lora[ours] = d[theirs]
            out.update(fields_from_hf(lora_config=lora))
            out.setdefault("method", "lora")
        elif use_peft is False:
            out["method"] = "full"
        elif not quantized:
            self.note("the file does not say the adapter (the trainer's peft_config): estimated with memplan's "
                      "default (--method qlora, nf4, r 16, all-linear); pass --method/--lora-r to say otherwise")
        seq = self.seq_len(kind)
        if seq is not None:
            out["seq_len"] = seq
        packing, padding_free = self.on("packing"), self.on("padding_free")
        strategy = d.get("packing_strategy")
        if strategy is not None and str(strategy) not in ("bfd", "bfd_split", "bfd-requeue", "wrapped"):
            raise self.bad(f"packing_strategy {strategy!r} is not one of: bfd, bfd_split, wrapped")
        if packing or padding_free:
            out["padding"] = "none"
            out.update(packing_fields(packing, strategy, padding_free))
            if packing and not out["packing"]:
                self.note("packing_strategy: wrapped: full rows of max_length with an all-ones attention_mask and no "
                          "position ids (sequences attend across their boundaries): estimated as unpadded rows")
            elif packing and out["padding_free"] and not padding_free:
                self.note(f"packing: true with packing_strategy {strategy or 'bfd'}: TRL 1.16 turns padding_free on "
                          "(its collator flattens the micro-batch into one row)")
        elif kind == "trl":
            out["padding"] = "longest"  # TRL's collator pads each batch to its longest row, with a mask
        if d.get("padding") is not None:
            out["padding"] = self.padding(d["padding"])
        self.out = out
        self.liger_trl(kind)
        if d.get("activation_offloading") is not None:
            out["activation_offloading"] = self.bool_("activation_offloading")
        out.update(self.world())
        self.unmodelled(_TRL_UNMODELLED)
        model = d.get("model_name_or_path")
        return out, (str(model) if model else None)

    def checkpointing_names(self, d: Mapping[str, Any]) -> dict[str, Any]:
        """transformers 5 renames gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs) and
        saves both: either name is read, and two that disagree are an error."""
        d = dict(d)
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if d.get(new) is None:
                continue
            if d.get(old) is not None and d[old] != d[new]:
                raise self.bad(f"{old} {d[old]!r} and {new} {d[new]!r} disagree; set one of them")
            d[old] = d[new]
        return d

    def seq_len(self, kind: str) -> int | None:
        d = self.d
        given = {k: d[k] for k in ("max_length", "max_seq_length") if k in d}
        if len(given) == 2 and given["max_length"] != given["max_seq_length"] and None not in given.values():
            raise self.bad(f"max_length {given['max_length']} and max_seq_length {given['max_seq_length']} "
                           "disagree; set one of them")
        for k in ("max_length", "max_seq_length"):
            if given.get(k) is not None:
                return self.int_(k)
        if given:
            self.note(f"{next(iter(given))}: null (no truncation): estimated at memplan's --seq-len default; "
                      "pass --seq-len with your longest sequence")
            return None
        if kind == "trl":
            self.note("max_length not in the file: estimated at SFTConfig's default, 1024")
            return 1024
        self.note("a TrainingArguments file has no sequence length: pass --seq-len (estimated at memplan's default)")
        return None


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."
