"""GPUSpec: one GPU as the driver reports it, with calibrated overheads (profiles/gpus/*.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .units import MiB

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
