"""Distributed settings in users' files onto TrainPlan's distributed fields (standard library only).

- TrainingArguments `fsdp` (legacy words "full_shard offload auto_wrap" or a list) and `fsdp_config`
  (keys with or without the `fsdp_` prefix, as transformers' training_args.py strips it: version,
  reshard_after_forward, sharding_strategy, cpu_offload / offload_params, backward_prefetch,
  use_orig_params, cpu_ram_efficient_loading), `deepspeed` (a JSON path or a dict), `ddp_bucket_cap_mb`;
- an accelerate config YAML (`distributed_type`, `num_processes`, `num_machines`, `fsdp_config`,
  `deepspeed_config` with `zero_stage`, `offload_optimizer_device`, `offload_param_device`,
  `deepspeed_config_file`);
- a DeepSpeed JSON (`zero_optimization.stage`, `offload_optimizer.device`, `offload_param.device`,
  reduce_bucket_size / stage3_prefetch_bucket_size / stage3_param_persistence_threshold /
  stage3_max_live_parameters onto the plan's `zero_*` fields).

Each function returns (plan fields, notes); a note names what is read but not modelled
(allgather_bucket_size, ZeRO stage 0/1), never drops it silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["from_fsdp_args", "from_deepspeed", "from_accelerate", "load_deepspeed"]

_SHARDING_WORDS = {"full_shard": "FULL_SHARD", "shard_grad_op": "SHARD_GRAD_OP", "no_shard": "NO_SHARD",
                   "hybrid_shard": "HYBRID_SHARD", "hybrid_shard_zero2": "HYBRID_SHARD"}
_ACCEL_SHARDING = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD",
                   "5": "HYBRID_SHARD"}


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes", "on")
    return bool(v)


def _words(fsdp: Any) -> list[str]:
    if isinstance(fsdp, str):
        return [w for w in fsdp.replace(",", " ").split() if w]
    if isinstance(fsdp, (list, tuple)):
        return [str(getattr(w, "value", w)).strip().lower() for w in fsdp]
    return []


def from_fsdp_args(fsdp: Any, fsdp_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """TrainingArguments(fsdp=..., fsdp_config=...) -> fields (strategy fsdp), notes. Empty when FSDP is off."""
    words = _words(fsdp)
    if fsdp is True:
        words = ["full_shard"]
    if not words:
        return {}, []
    cfg = {(k[5:] if str(k).startswith("fsdp_") else str(k)): v for k, v in (fsdp_config or {}).items()}
    out: dict[str, Any] = {"strategy": "fsdp"}
    notes: list[str] = []
    for w in words:
        if w in _SHARDING_WORDS:
            out["fsdp_sharding_strategy"] = _SHARDING_WORDS[w]
        elif w == "offload":
            out["fsdp_offload_params"] = True
    out.update(_fsdp_config(cfg, notes))
    return out, notes


def _fsdp_config(cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """The fsdp_config keys (prefix stripped) of TrainingArguments and accelerate."""
    out: dict[str, Any] = {}
    v = cfg.get("version")
    if v is not None:
        out["fsdp_version"] = int(v)
    s = cfg.get("sharding_strategy")
    if s is not None:
        s = str(getattr(s, "name", s)).upper()
        out["fsdp_sharding_strategy"] = _ACCEL_SHARDING.get(s, s)
    raf = cfg.get("reshard_after_forward")
    if raf is not None:
        r = str(raf).strip().lower()
        out["fsdp_sharding_strategy"] = (_SHARDING_WORDS.get(r) or ("FULL_SHARD" if _truthy(raf) else "SHARD_GRAD_OP"))
    for key in ("offload_params", "cpu_offload"):
        if cfg.get(key) is not None:
            out["fsdp_offload_params"] = _truthy(cfg[key])
    bp = cfg.get("backward_prefetch")
    if bp is not None:
        out["fsdp_backward_prefetch"] = str(bp).upper() if str(bp).lower() not in ("none", "false") else "NO_PREFETCH"
    for key, field in (("use_orig_params", "fsdp_use_orig_params"), ("limit_all_gathers", "fsdp_limit_all_gathers"),
                       ("cpu_ram_efficient_loading", "fsdp_cpu_ram_efficient_loading")):
        if cfg.get(key) is not None:
            out[field] = _truthy(cfg[key])
    wrap = cfg.get("transformer_layer_cls_to_wrap")
    if wrap:  # accelerate: a comma-separated string; TrainingArguments fsdp_config: a list
        out["fsdp_transformer_layer_cls_to_wrap"] = (tuple(wrap) if isinstance(wrap, (list, tuple)) else
                                                     tuple(c.strip() for c in str(wrap).split(",") if c.strip()))
    if _truthy(cfg.get("activation_checkpointing", False)):
        out["gradient_checkpointing"] = True
        notes.append("fsdp_config activation_checkpointing: FSDP's own checkpointing, estimated as the HF "
                     "Trainer's non-reentrant gradient checkpointing")
    return out


def load_deepspeed(value: Any, base: str | os.PathLike | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """`deepspeed` of TrainingArguments / accelerate: a dict, or a JSON path (relative to the working
    folder, then to `base`, the config file's folder). (None, [note]) when the file is not there."""
    if isinstance(value, Mapping):
        return dict(value), []
    if not value:
        return None, []
    p = Path(os.path.expanduser(str(value)))
    if not p.is_file() and base is not None and not p.is_absolute():
        p = Path(base) / p
    if not p.is_file():
        return None, [f"deepspeed config {value!r} not found: estimated as DeepSpeed ZeRO-3 with no offload "
                      "(give the file, or --zero-stage / --offload-optimizer / --offload-param)"]
    try:
        return json.loads(p.read_text(encoding="utf-8")), []
    except (OSError, ValueError) as e:
        return None, [f"deepspeed config {value!r} could not be read ({e.__class__.__name__}); estimated as "
                      "DeepSpeed ZeRO-3 with no offload"]


def from_deepspeed(cfg: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """A DeepSpeed JSON config (dict) -> fields (strategy deepspeed), notes."""
    out: dict[str, Any] = {"strategy": "deepspeed"}
    notes: list[str] = []
    if not cfg:
        return out, notes
    z = cfg.get("zero_optimization") or {}
    stage = z.get("stage")
    if stage is not None:
        stage = int(stage)
        if stage in (2, 3):
            out["zero_stage"] = stage
        else:
            notes.append(f"zero_optimization.stage {stage} is not modelled (ZeRO-2 and ZeRO-3 are): estimated as "
                         f"ZeRO-{3 if stage > 3 else 2}")
            out["zero_stage"] = 3 if stage > 3 else 2
    for key, field in (("offload_optimizer", "offload_optimizer_device"), ("offload_param", "offload_param_device")):
        dev = (z.get(key) or {}).get("device")
        if dev is not None:
            dev = str(dev).lower()
            out[field] = "cpu" if dev in ("cpu", "nvme") else "none"
            if dev == "nvme":
                notes.append(f"zero_optimization.{key}.device nvme: estimated as cpu (host RAM holds the "
                             "pinned buffers; NVMe swap is not modelled)")
    for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
              "stage3_max_live_parameters"):  # plan fields zero_<key> ("auto" or elements; JSON 5e8 is a float)
        if k in z and str(z[k]).lower() != "auto":
            v = z[k]
            out[f"zero_{k}"] = int(v) if isinstance(v, float) and v.is_integer() else v
    if "allgather_bucket_size" in z and str(z["allgather_bucket_size"]) != "auto":
        notes.append(f"zero_optimization.allgather_bucket_size {z['allgather_bucket_size']} is not modelled "
                     "(ZeRO-2's parameter all-gather after the step)")
    for key in ("bf16", "fp16"):
        if _truthy((cfg.get(key) or {}).get("enabled", False)):
            out["mixed_precision"] = key
    return out, notes


def from_accelerate(d: Mapping[str, Any], base: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[str]]:
    """An accelerate config (the YAML of `accelerate config`) -> fields, notes."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, field in (("num_processes", "num_processes"), ("num_machines", "num_machines")):
        if d.get(key) is not None:
            out[field] = int(d[key])
    dt = str(d.get("distributed_type", "NO")).upper()
    if dt == "FSDP":
        out["strategy"] = "fsdp"
        out.update(_fsdp_config({(k[5:] if k.startswith("fsdp_") else k): v
                                 for k, v in (d.get("fsdp_config") or {}).items()}, notes))
    elif dt == "DEEPSPEED":
        ds = dict(d.get("deepspeed_config") or {})
        if ds.get("deepspeed_config_file"):
            cfg, more = load_deepspeed(ds["deepspeed_config_file"], base)
            notes += more
            f, more = from_deepspeed(cfg)
            out.update(f)
            notes += more
        else:
            out["strategy"] = "deepspeed"
            if ds.get("zero_stage") is not None:
                f, more = from_deepspeed({"zero_optimization": {"stage": ds["zero_stage"]}})
                out.update(f)
                notes += more
            for key, field in (("offload_optimizer_device", "offload_optimizer_device"),
                               ("offload_param_device", "offload_param_device")):
                if ds.get(key) is not None:
                    out[field] = "cpu" if str(ds[key]).lower() in ("cpu", "nvme") else "none"
    elif dt in ("MULTI_GPU", "MULTI_NPU", "MULTI_XPU"):
        out["strategy"] = "ddp"
    elif dt in ("NO", "CPU", "MULTI_CPU"):
        if dt == "MULTI_CPU":
            notes.append("distributed_type MULTI_CPU: estimated as DDP on the CPU device (--device cpu)")
            out["strategy"], out["device"] = "ddp", "cpu"
    else:
        notes.append(f"distributed_type {dt} is not modelled (ddp, FSDP and DeepSpeed are): estimated as DDP")
        out["strategy"] = "ddp"
    mp = d.get("mixed_precision")
    if mp is not None:
        out["mixed_precision"] = {"no": "no", "bf16": "bf16", "fp16": "fp16"}.get(str(mp).lower(), "no")
    return out, notes
