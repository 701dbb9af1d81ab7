"""Presentation, once: a plan in words and sizes as text (standard library only).

Used by the CLI's tables, the HTML report and the profile printers, so that every output describes a
plan and formats a number the same way. Sizes are int bytes everywhere else (DESIGN.md); only these
functions turn them into GiB / MiB text.

Numbers: `gib`, `mib`, `pct` and `number` never print a negative zero: a value that rounds to zero
prints as "0.00" (no sign), whether or not `signed` asks for one. A missing value (None, NaN,
pandas' NA) prints as `na` ("-" unless given).

Plans: `plan_lines` (the full plan in two lines: the CLI's "plan:" block), `plan_text` (the same on
one line: the report's headline plan) and `plan_brief` (a compact summary: chart subtitles and the
profile printers). They take a `TrainPlan` or its `to_dict()` form (a run record's plan).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .units import GiB, MiB

NA = "-"
METHOD_LABELS = {"qlora": "QLoRA", "lora": "LoRA", "full": "full fine-tune"}

__all__ = ["NA", "METHOD_LABELS", "is_missing", "number", "gib", "mib", "pct", "share", "verdict",
           "plan_lines", "plan_text", "plan_brief", "reserve_line", "plan_dict", "world_text", "host_line",
           "rank_lines"]


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------
def is_missing(x: Any) -> bool:
    """None, NaN and pandas' NA are missing (a NaN is not equal to itself; NA refuses to be a bool)."""
    if x is None:
        return True
    if isinstance(x, float):
        return math.isnan(x)
    try:
        return bool(x != x)
    except TypeError:
        return True


def number(x: Any, digits: int = 2, *, signed: bool = False, sep: bool = False, na: str = NA) -> str:
    """`x` with `digits` decimals (`signed`: a + on positives, `sep`: thousands separators); a value
    that rounds to zero is "0.00", never "-0.00" or "+0.00"."""
    if is_missing(x):
        return na
    v = float(x)
    s = f"{v:{'+' if signed else ''}{',' if sep else ''}.{digits}f}"
    if math.isfinite(v) and float(s.replace(",", "")) == 0:
        return f"{0:.{digits}f}"
    return s


def gib(n_bytes: Any, digits: int = 2, *, signed: bool = False, na: str = NA) -> str:
    """Bytes as GiB (2**30), e.g. "12.34"; the unit is the caller's to print."""
    return na if is_missing(n_bytes) else number(float(n_bytes) / GiB, digits, signed=signed)


def mib(n_bytes: Any, digits: int = 2, *, signed: bool = False, na: str = NA) -> str:
    """Bytes as MiB (2**20) with thousands separators, e.g. "1,234.56"."""
    return na if is_missing(n_bytes) else number(float(n_bytes) / MiB, digits, signed=signed, sep=True)


def pct(p: Any, digits: int = 2, *, signed: bool = True, na: str = NA) -> str:
    """A percentage that is already in percent, e.g. "+5.26%" (signed by default: an error)."""
    return na if is_missing(p) else number(p, digits, signed=signed) + "%"


def share(part: Any, total: Any, digits: int = 1, *, na: str = NA) -> str:
    """part / total in percent, unsigned, e.g. "12.3%" (`na` when total is 0 or missing)."""
    if is_missing(part) or is_missing(total) or not float(total):
        return na
    return pct(100.0 * float(part) / float(total), digits, signed=False)


def verdict(fits: bool) -> str:
    return "fits" if fits else "DOES NOT FIT"


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
def _get(plan: Any, key: str, default: Any = None) -> Any:
    return plan.get(key, default) if isinstance(plan, Mapping) else getattr(plan, key, default)


def _targets(plan: Any) -> str:
    tm = _get(plan, "target_modules")
    return tm if isinstance(tm, str) else ",".join(tm)


def _base(plan: Any) -> str:
    """The stored form of the frozen Linear weights: "nf4 + double quant", "int8", "bf16"."""
    q = _get(plan, "quant")
    if q in (None, "none"):
        return str(_get(plan, "dtype"))
    dq = " + double quant" if _get(plan, "double_quant") and q in ("nf4", "fp4") else ""
    return f"{q}{dq}"


def _checkpointing(plan: Any) -> str:
    """"checkpointing on", "checkpointing on (reentrant)" or "checkpointing off"."""
    if not _get(plan, "gradient_checkpointing"):
        return "checkpointing off"
    return "checkpointing on (reentrant)" if _get(plan, "use_reentrant") else "checkpointing on"


def _extras(plan: Any) -> list[str]:
    """What departs from the default recipe and has no place of its own: 16-bit adapters, padding."""
    out = []
    if _get(plan, "method") != "full" and _get(plan, "adapter_dtype", "fp32") not in (None, "fp32"):
        out.append(f"{_get(plan, 'adapter_dtype')} adapters")
    if _get(plan, "padding", "none") not in (None, "none"):
        out.append(f"padded ({_get(plan, 'padding')}, attention_mask)")
    if _get(plan, "activation_offloading", False):
        out.append("activation offloading")
    if _get(plan, "checkpoint_offload", False):
        out.append("checkpoint offload")
    if _get(plan, "trainer", "trainer") == "sft":
        out.append("TRL SFTTrainer (fused LM head)")
    if _get(plan, "padding_free", False):
        out.append("padding-free (one flattened row)")
    elif _get(plan, "packing", False):
        out.append("packed rows")
    w = world_text(plan)
    if w:
        out.append(w)
    return out


def world_text(plan: Any) -> str:
    """A distributed plan in words ("" for one process on one GPU): "2 processes, fsdp2 FULL_SHARD,
    offload params, 4-bit storage bf16"."""
    n = _get(plan, "num_processes")
    if n is None:  # a plan dict without distributed fields: a single-GPU plan
        return ""
    strategy = _get(plan, "strategy")
    if strategy == "auto":
        strategy = "single" if n == 1 else "ddp"
    if strategy == "single":
        return ""
    nodes = _get(plan, "num_machines", 1)
    out = [f"{n} process{'es' if n != 1 else ''}" + (f" on {nodes} nodes" if nodes > 1 else "")]
    if strategy == "fsdp":
        out.append(f"fsdp{_get(plan, 'fsdp_version')} {_get(plan, 'fsdp_sharding_strategy')}")
        if _get(plan, "fsdp_offload_params"):
            out.append("offload params")
    elif strategy == "deepspeed":
        out.append(f"ZeRO-{_get(plan, 'zero_stage')}")
        off = [k for k, f in (("optimizer", "offload_optimizer_device"), ("params", "offload_param_device"))
               if _get(plan, f) == "cpu"]
        if off:
            out.append("offload " + " + ".join(off))
    else:
        out.append(f"ddp (buckets {_get(plan, 'ddp_bucket_cap_mb')} MiB)")
    qs = _get(plan, "bnb_4bit_quant_storage")
    if qs not in (None, "auto"):
        out.append(f"4-bit storage {qs}")
    return ", ".join(out)


def host_line(host: Mapping[str, Any] | None) -> str:
    """"host RAM: X GiB (loading Y GiB, optimizer_state Z GiB)" ("" when nothing lives on the host).
    `host` is an estimate's `host` dict ({label: bytes}) or its JSON form ({"terms": ..., "bytes": N})."""
    if not host:
        return ""
    terms = host.get("terms", host) if isinstance(host.get("terms"), Mapping) else host
    total = sum(int(v) for v in terms.values())
    parts = ", ".join(f"{k} {gib(v)} GiB" for k, v in sorted(terms.items(), key=lambda kv: -int(kv[1])) if v)
    return f"host RAM: {gib(total)} GiB ({parts})"


def rank_lines(ranks: Any) -> list[str]:
    """One line per rank ({"rank", "terms", "peak"} dicts): device bytes, peak moment, comm buffers;
    ranks with the same figures share one line."""
    out: list[str] = []
    groups: list[tuple[tuple[Any, ...], list[int]]] = []
    for r in ranks or ():
        pk = r["peak"]
        key = (pk.get("device_bytes") or pk.get("allocated_bytes"), pk.get("moment") or pk.get("phase"),
               r["terms"].get("comm_buffers", 0))
        if groups and groups[-1][0] == key:
            groups[-1][1].append(r["rank"])
        else:
            groups.append((key, [r["rank"]]))
    for (dev, moment, comm), rs in groups:
        who = f"rank {rs[0]}" if len(rs) == 1 else f"ranks {rs[0]}-{rs[-1]}"
        out.append(f"{who}: {gib(dev)} GiB at {moment} (comm_buffers {gib(comm)} GiB)")
    return out


def plan_lines(plan: Any) -> tuple[str, str]:
    """The plan in two lines: what is trained and stored, then the shape of the step and the run."""
    if _get(plan, "method") == "full":
        head = "full fine-tune"
    else:
        head = (f"{_get(plan, 'method')}: {_base(plan)} base, LoRA r={_get(plan, 'lora_r')} "
                f"alpha={_get(plan, 'lora_alpha')} dropout={_get(plan, 'lora_dropout')} on {_targets(plan)}")
    head += (f"; compute {_get(plan, 'compute_dtype')}, load {_get(plan, 'dtype')}"
             f"{', prepare_model_for_kbit_training' if _get(plan, 'prepare') else ''}")
    run = (f"batch {_get(plan, 'batch_size')} x seq {_get(plan, 'seq_len')}, "
           f"grad accum {_get(plan, 'gradient_accumulation_steps')}, "
           f"{_checkpointing(plan)}, {_get(plan, 'optim')}, "
           f"{_get(plan, 'attn_implementation')}, mixed precision {_get(plan, 'mixed_precision')}, "
           f"{_get(plan, 'device')}")
    extras = _extras(plan)
    if extras:
        run += ", " + ", ".join(extras)
    return head, run


def plan_text(plan: Any, shape: bool = True) -> str:
    """`plan_lines` on one line (`shape=False`: the first line only)."""
    head, run = plan_lines(plan)
    return f"{head}; {run}" if shape else head


def plan_brief(plan: Any, *, seq: bool = True, batch: bool = True) -> str:
    """A compact summary, e.g. "QLoRA r=16 (nf4 + double quant base), micro-batch 1 x seq 2048,
    checkpointing on, paged_adamw_8bit, sdpa, mixed precision bf16"; `seq`/`batch`=False leave out
    what a chart varies along an axis. Gradient accumulation is named when it is above 1."""
    method = _get(plan, "method")
    label = METHOD_LABELS.get(method, str(method))
    if method == "full":
        parts = [f"{label} ({_base(plan)})"]
    else:
        parts = [f"{label} r={_get(plan, 'lora_r')} ({_base(plan)} base)"]
    shape = [f"micro-batch {_get(plan, 'batch_size')}"] if batch else []
    shape += [f"seq {_get(plan, 'seq_len')}"] if seq else []
    if shape:
        parts.append(" x ".join(shape))
    ga = _get(plan, "gradient_accumulation_steps")
    if ga and ga > 1:
        parts.append(f"grad accum {ga}")
    parts += [_checkpointing(plan), str(_get(plan, "optim")),
              str(_get(plan, "attn_implementation")), f"mixed precision {_get(plan, 'mixed_precision')}"]
    return ", ".join(parts + _extras(plan))


def plan_dict(plan: Any) -> dict[str, Any]:
    """A plan's --json form: `double_quant` is null when the base is not 4-bit (it means nothing there)."""
    d = dict(plan.to_dict() if hasattr(plan, "to_dict") else plan)
    if d.get("quant") not in ("nf4", "fp4"):
        d["double_quant"] = None
    return d


def reserve_line(reserve_bytes: int) -> str:
    """One line stating the margin kept free on the GPU."""
    if not reserve_bytes:
        return (f"reserve: {gib(reserve_bytes)} GiB kept free (default, as `memplan fit`: the estimate already "
                "counts CUDA context, workspace and allocator overhead; --reserve GiB keeps a margin)")
    return f"reserve: {gib(reserve_bytes)} GiB kept free (--reserve)"


