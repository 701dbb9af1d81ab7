"""Run records: what `memplan profile` measured, as `memplan.run/1` JSON (profiles/runs/*.json).

Standard library only, so `memplan compare`, the report (`memplan.report.measured_run`) and the
tests that check the estimator against stored runs need no torch. This module is the one reader of
stored records (`read_run`, `iter_runs`, `stored_runs`); `MeasuredRun.train_plan()` and
`catalogue_gpu()` give what re-estimating a run needs. A record holds the model (with its
config.json values, so the estimate can be recomputed offline), the resolved plan, device, GPU,
package versions, status, the measurement (per phase, per step, per term at the steady-state peak)
and the estimate made at the time with its per-term error.

Shape (every size is int bytes):

```
{"schema": "memplan.run/1", "run_id": "...", "created": "2025-01-01T00:00:00Z",
 "status": "success" | "oom" | "failed",
 "failure": null | {"type", "message", "phase", "step"},
 "model": {"name", "architecture", "model_type", "params", "hub_id", "config": {...}},
 "weights": "random" | "pretrained", "seed": 0, "steps": 3,
 "plan": {... TrainPlan.to_dict() ...}, "device": "cpu" | "cuda",
 "gpu": null | {"name", "nvml_name", "torch_name", "memory_bytes", "compute_capability", "catalogue"},
 "versions": {"memplan", "python", "torch", "transformers", "peft", "bitsandbytes", "accelerate",
              "cuda", "cudnn", "driver", "nvidia-ml-py"},
 "terms": {12 terms} | null, "peak": {"phase", "allocated_bytes", "reserved_bytes", "device_bytes"},
 "paged_bytes": ...,            (the measured peak, in the shape of `memplan estimate --json`)
 "measured": {"terms": {12 terms}, "peak": {"phase", "step", "allocated_bytes", "reserved_bytes",
              "device_bytes", "tracked_bytes", "nvml_used_bytes"}, "paged_bytes",
              "phases": {"load": {...}, "adapters": {...}, "forward": {...}, ...},
              "steps": [{"step": 1, "allocated_bytes", "reserved_bytes", "nvml_used_bytes", "phase"}, ...],
              "phase_terms": {...}, "top": [...], "nvml": {...}, "wall_seconds": {...}},
 "estimate": {"terms", "peak" (with "moment"), "paged_bytes", "gpu", "versions"} | null,
 "estimate_error": {"terms": {term: {"estimate", "measured", "diff_bytes", "error_pct"}},
                    "peak": {"allocated_bytes": {...}, "reserved_bytes": {...}, "device_bytes": {...}}},
 "notes": ["..."]}
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from ..errors import MemplanError
from ..terms import ALLOCATED_TERMS, SINGLE_DEVICE_TERMS, Term

if TYPE_CHECKING:
    from ..plan import TrainPlan

SCHEMA = "memplan.run/1"
STATUSES = ("success", "oom", "failed")
TERMS = tuple(str(t) for t in SINGLE_DEVICE_TERMS)  # a stored run predating comm_buffers lacks it
PEAK_KEYS = ("allocated_bytes", "reserved_bytes", "device_bytes")


def error_pct(estimate: int | None, measured: int | None) -> float | None:
    """(estimate - measured) / measured in percent; None when either is missing or measured is 0."""
    if estimate is None or measured is None:
        return None
    if measured == 0:
        return 0.0 if estimate == 0 else None
    return 100.0 * (estimate - measured) / measured


def _cmp(estimate: int | None, measured: int | None) -> dict[str, Any]:
    diff = None if estimate is None or measured is None else int(estimate) - int(measured)
    pct = error_pct(estimate, measured)
    return {"estimate": estimate, "measured": measured, "diff_bytes": diff,
            "error_pct": None if pct is None else round(pct, 4)}


def estimate_error(estimate: Mapping[str, Any] | None, measured: Mapping[str, Any] | None,
                   device: str) -> dict[str, Any] | None:
    """Per-term and peak comparison of an estimate dict with a measurement dict (see the module doc).

    On the CPU only the allocated peak exists; on CUDA allocated, reserved and device are compared.
    """
    if not estimate or not measured or not measured.get("peak"):
        return None
    et, mt = estimate.get("terms") or {}, measured.get("terms") or {}
    terms = {t: _cmp(et.get(t), mt.get(t)) for t in TERMS} if mt else {}
    peaks = {}
    keys = PEAK_KEYS if device == "cuda" else ("allocated_bytes",)
    for k in keys:
        e = (estimate.get("peak") or {}).get(k)
        m = (measured.get("peak") or {}).get(k)
        if e is not None and m is not None:
            peaks[k] = _cmp(e, m)
    if device == "cuda" and estimate.get("paged_bytes") is not None and measured.get("paged_bytes") is not None:
        peaks["paged_bytes"] = _cmp(estimate["paged_bytes"], measured["paged_bytes"])
    return {"terms": terms, "peak": peaks}


@dataclass(frozen=True)
class MeasuredRun:
    """One profiled run (a `memplan.run/1` record). `to_dict()` is the JSON written to disk."""

    model: Mapping[str, Any]
    plan: Mapping[str, Any]
    device: str
    status: str
    measured: Mapping[str, Any]
    estimate: Mapping[str, Any] | None = None
    failure: Mapping[str, Any] | None = None
    gpu: Mapping[str, Any] | None = None
    versions: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 0
    weights: str = "random"
    seed: int = 0
    run_id: str = ""
    created: str = ""
    notes: tuple[str, ...] = ()
    source: str = "memplan profile"
    #: a distributed run (memplan.profile.distributed): each rank's {"rank", "terms", "peak", ...}; the
    #: top-level measured peak is the busiest rank's. Empty for one process (the record keeps its shape).
    ranks: tuple[Mapping[str, Any], ...] = ()
    #: the distributed fields of the run (runtime.distributed.World), {} for one process
    world: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    # ---- peaks -----------------------------------------------------------------------------------
    @property
    def peak(self) -> Mapping[str, Any]:
        return self.measured.get("peak") or {}

    @property
    def allocated_bytes(self) -> int | None:
        return self.peak.get("allocated_bytes")

    @property
    def reserved_bytes(self) -> int | None:
        return self.peak.get("reserved_bytes")

    @property
    def device_bytes(self) -> int | None:
        return self.peak.get("device_bytes")

    @property
    def ok(self) -> bool:
        return self.status == "success"

    # ---- what the estimator needs to re-estimate the run ------------------------------------------
    def train_plan(self) -> TrainPlan:
        """The run's plan as a TrainPlan; MemplanError when this memplan cannot read it (a field it
        does not know, or a value it refuses): never a plan with a field silently dropped."""
        from ..plan import TrainPlan

        d = dict(self.plan)
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = tuple(d["target_modules"])
        unknown = sorted(set(d) - set(TrainPlan.field_names()))
        if unknown:
            raise MemplanError(f"run {self.run_id or '?'}: plan field(s) {', '.join(unknown)} unknown to this "
                               "memplan version")
        try:
            return TrainPlan(**d)
        except MemplanError as e:
            raise MemplanError(f"run {self.run_id or '?'}: {e}") from None

    def catalogue_gpu(self) -> str | None:
        """The catalogue name of the run's GPU: its `catalogue` entry, else its `name`; None on the CPU
        or when the catalogue knows neither."""
        if self.device != "cuda" or not self.gpu:
            return None
        from ..catalogue import load_gpu

        for name in (self.gpu.get("catalogue"), self.gpu.get("name")):
            if name:
                try:
                    return load_gpu(str(name)).name
                except MemplanError:
                    continue
        return None

    def estimate_error(self) -> dict[str, Any] | None:
        """Per-term and peak error of the stored estimate (runs that completed only)."""
        if self.status != "success":
            return None
        return estimate_error(self.estimate, self.measured, self.device)

    def to_dict(self) -> dict[str, Any]:
        d = self._to_dict()
        if self.ranks:  # only distributed runs: a single-process record keeps its shape
            d["world"] = _plain(self.world)
            d["ranks"] = _plain(list(self.ranks))
        return d

    def _to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "created": self.created,
            "source": self.source,
            "status": self.status,
            "failure": dict(self.failure) if self.failure else None,
            "model": dict(self.model),
            "weights": self.weights,
            "seed": self.seed,
            "steps": self.steps,
            "plan": dict(self.plan),
            "device": self.device,
            "gpu": dict(self.gpu) if self.gpu else None,
            "versions": dict(self.versions),
            # the measured peak in the shape estimate/simulate --json use (DESIGN.md), then the details
            "terms": _plain(self.measured.get("terms")) if self.measured.get("terms") else None,
            "peak": {k: self.peak.get(k) for k in ("phase", "allocated_bytes", "reserved_bytes", "device_bytes")},
            "paged_bytes": self.measured.get("paged_bytes"),
            "measured": _plain(self.measured),
            "estimate": _plain(self.estimate) if self.estimate else None,
            "estimate_error": self.estimate_error(),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MeasuredRun":
        problems = validate(d)
        if problems:
            raise MemplanError("not a memplan.run/1 record: " + "; ".join(problems))
        return cls(model=d["model"], plan=d["plan"], device=d["device"], status=d["status"],
                   measured=d.get("measured") or {}, estimate=d.get("estimate"), failure=d.get("failure"),
                   gpu=d.get("gpu"), versions=d.get("versions") or {}, steps=int(d.get("steps") or 0),
                   weights=d.get("weights", "random"), seed=int(d.get("seed") or 0), run_id=d.get("run_id", ""),
                   created=d.get("created", ""), notes=tuple(d.get("notes") or ()),
                   source=d.get("source", "memplan profile"), ranks=tuple(d.get("ranks") or ()),
                   world=d.get("world") or {})


def _plain(x: Any) -> Any:
    """JSON-ready copy: mappings to dicts with str keys, tuples to lists, Enums to their values."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Term):
        return str(x)
    return x


def validate(d: Mapping[str, Any]) -> list[str]:
    """Every problem with a record dict (empty list: valid)."""
    p: list[str] = []
    if not isinstance(d, Mapping):
        return ["not a JSON object"]
    if d.get("schema") != SCHEMA:
        p.append(f"schema is {d.get('schema')!r}, expected {SCHEMA!r}")
    if d.get("status") not in STATUSES:
        p.append(f"status {d.get('status')!r} is not one of {', '.join(STATUSES)}")
    if d.get("device") not in ("cpu", "cuda"):
        p.append(f"device {d.get('device')!r} is not cpu or cuda")
    for k in ("model", "plan", "measured"):
        if not isinstance(d.get(k), Mapping):
            p.append(f"{k} missing")
    if isinstance(d.get("model"), Mapping) and not isinstance(d["model"].get("config"), Mapping):
        p.append("model.config (the config.json values) missing")
    m = d.get("measured")
    if d.get("status") == "success" and isinstance(m, Mapping) and m.get("attribution", "tracker") != "none":
        terms = m.get("terms") or {}
        missing = [t for t in TERMS if t not in terms]
        if missing:
            p.append(f"measured.terms lacks {', '.join(missing)}")
        elif (m.get("peak") or {}).get("allocated_bytes") is None:
            p.append("measured.peak.allocated_bytes missing")
    if d.get("status") in ("oom", "failed") and not isinstance(d.get("failure"), Mapping):
        p.append("failure missing for a run that did not succeed")
    return p


def allocated_of_terms(terms: Mapping[str, int]) -> int:
    return sum(int(terms.get(str(t), 0)) for t in ALLOCATED_TERMS)


# ---- files -----------------------------------------------------------------------------------------
from ..fileio import write_json_atomic  # noqa: E402  (re-exported: matrix.py imports it from here)


def run_filename(run: MeasuredRun) -> str:
    p = run.plan
    name = str(run.model.get("name", "model")).replace("/", "_").replace(" ", "_")
    gc = "gc" if p.get("gradient_checkpointing") else "nogc"
    rid = run.run_id.rsplit("-", 1)[-1] if run.run_id else "run"
    return (f"{run.device}-{name}-{p.get('method')}-{gc}-{p.get('optim')}-b{p.get('batch_size')}"
            f"-s{p.get('seq_len')}-{rid}.json")


def write_run(run: MeasuredRun, out: str | os.PathLike[str]) -> Path:
    """Write a record to `out`: a file path (*.json) or a folder (created; file named after the run)."""
    out = Path(out)
    if out.suffix.lower() != ".json":
        out = out / run_filename(run)
    return write_json_atomic(out, run.to_dict())


def read_run(path: str | os.PathLike[str]) -> MeasuredRun:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise MemplanError(f"cannot read run record {str(path)!r}: {e}") from None
    try:
        return MeasuredRun.from_dict(d)
    except MemplanError as e:
        raise MemplanError(f"{path}: {e}") from None


def run_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders to their *.json files (sorted); keep files as given."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(q for q in p.glob("*.json") if not q.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise MemplanError(f"no run record at {str(p)!r}; pass RUN.json files or a folder such as profiles/runs")
    return out


def runs_dir() -> Path:
    """profiles/runs of the bundled catalogue."""
    from ..catalogue import profiles_dir

    return profiles_dir() / "runs"


def iter_runs(folder: str | os.PathLike[str] | None = None, *, strict: bool = True
              ) -> Iterator[tuple[Path, MeasuredRun]]:
    """(path, record) for every *.json in `folder` (default profiles/runs), by file name. The one
    reader of stored records: `strict=False` skips files that are not `memplan.run/1` records
    (broken JSON, another schema, a record missing what its status requires) instead of raising."""
    d = Path(folder) if folder is not None else runs_dir()
    if not d.is_dir():
        return
    for p in run_paths([d]):
        try:
            yield p, read_run(p)
        except MemplanError:
            if strict:
                raise


def stored_runs(folder: str | os.PathLike[str] | None = None, *, strict: bool = True) -> list[MeasuredRun]:
    """Every record in `folder` (default profiles/runs); see `iter_runs`."""
    return [r for _, r in iter_runs(folder, strict=strict)]
