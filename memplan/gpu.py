"""GPUSpec: one GPU as the driver reports it, with calibrated overheads (profiles/gpus/*.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from .units import MiB

if TYPE_CHECKING:
    from .plan import TrainPlan

#: Overheads of a GPU whose profile does not give them (literature values; profiles/gpus/README).
DEFAULT_CUDA_CONTEXT_BYTES = 500 * MiB
DEFAULT_WORKSPACE_BYTES = 8 * MiB
DEFAULT_RESERVE_RATIO = 0.03


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int
    full_name: str = ""
    aliases: tuple[str, ...] = ()
    nvml_names: tuple[str, ...] = ()
    compute_capability: str = ""
    bf16: bool = True
    architecture: str = ""
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    reserve_ratio: float = DEFAULT_RESERVE_RATIO
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPUSpec":
        o = d.get("overheads", {})
        return cls(
            name=d["name"], memory_bytes=int(d["memory_bytes"]), full_name=d.get("full_name", ""),
            aliases=tuple(d.get("aliases", ())), nvml_names=tuple(d.get("nvml_names", ())),
            compute_capability=str(d.get("compute_capability", "")), bf16=bool(d.get("bf16", True)),
            architecture=d.get("architecture", ""),
            cuda_context_bytes=int(o.get("cuda_context_bytes", DEFAULT_CUDA_CONTEXT_BYTES)),
            workspace_bytes=int(o.get("workspace_bytes", DEFAULT_WORKSPACE_BYTES)),
            reserve_ratio=float(o.get("reserve_ratio", DEFAULT_RESERVE_RATIO)),
            sources={k: v for k, v in {**d, **o}.items() if k.endswith("_source")},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "memory_bytes": self.memory_bytes}


def _no_flash_attention(gpu: GPUSpec, plan: TrainPlan) -> bool:
    """flash_attention_2 planned on a CUDA GPU older than compute capability 8.0 (Ampere)."""
    if plan.device != "cuda" or plan.attn_implementation != "flash_attention_2" or not gpu.compute_capability:
        return False
    try:
        return float(gpu.compute_capability) < 8.0
    except ValueError:
        return False


def gpu_support(gpu: GPUSpec, plan: TrainPlan) -> str:
    """Why `gpu` cannot run `plan` as planned ('' when it can): the one rule every command applies
    (fit, estimate, recommend, the report)."""
    if plan.device != "cuda":
        return ""
    if not gpu.bf16 and plan.mixed_precision == "bf16":
        return (f"{gpu.name} has no bf16 (compute capability {gpu.compute_capability}); the HF Trainer refuses "
                "bf16=True (--mixed-precision bf16)")
    if _no_flash_attention(gpu, plan):
        return f"flash_attention_2 needs compute capability >= 8.0; {gpu.name} is {gpu.compute_capability}"
    return ""


def gpu_fix(gpu: GPUSpec, plan: TrainPlan) -> tuple[dict[str, Any], str]:
    """The smallest edit that lets `gpu` run `plan` (({}, '') when it already can): (plan fields, flags)."""
    changes: dict[str, Any] = {}
    if plan.device == "cuda" and not gpu.bf16:
        for k in ("mixed_precision", "compute_dtype", "dtype"):
            if getattr(plan, k) == "bf16":
                changes[k] = "fp16"
    if _no_flash_attention(gpu, plan):
        changes["attn_implementation"] = "sdpa"
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
    return changes, flags


def gpu_notes(gpu: GPUSpec | None, plan: "TrainPlan") -> list[str]:
    """The estimate's note when `gpu` cannot run `plan` as planned: the reason and the fix."""
    reason = gpu_support(gpu, plan) if gpu is not None else ""
    if not reason:
        return []
    fix = gpu_fix(gpu, plan)[1]
    return [f"cannot run as planned on {gpu.name}: {reason}" + (f"; fix: {fix}" if fix else "")]
