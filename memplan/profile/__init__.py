"""Real training steps on the device, measured per phase and per term, saved as run records.

`profile(model, plan, ...)` -> `MeasuredRun` (a `memplan.run/1` record); `find_max(...)` -> the largest
micro-batch or sequence length that really fits; `read_run` / `write_run` / `stored_runs` for records
(`record`: the one reader of `memplan.run/1`); `compare_runs` for estimate-vs-measured tables
(`compare`). Needs the `profile` extra (torch, transformers, peft, bitsandbytes, accelerate,
nvidia-ml-py) to run steps; reading and comparing records needs nothing.
Importing this package imports nothing heavy.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .record import SCHEMA, MeasuredRun, iter_runs, read_run, run_paths, stored_runs, write_run


def profile(model: Any, plan: Any = None, **kwargs: Any) -> MeasuredRun:
    """Run real training steps of `plan` (default 3) on `device` ("cuda" or "cpu") and measure them.

    `model`: catalogue name, hub id, config path, config dict or PretrainedConfig. Plan fields come from
    `plan`, `bnb_config` / `lora_config` / `training_args` objects and keyword arguments (which win).
    Options: `steps`, `weights` ("random": random weights from the config, no download; "pretrained":
    the real checkpoint), `out` (a .json path or a folder), `memory_limit_bytes` (CPU: a peak above it
    is an "oom"; CUDA: caps torch's allocator), `track` (per-term attribution; off measures the
    tracker's overhead), `seed`, `progress` (callable taking a message), `gpu` (catalogue GPU to
    estimate against; default: the detected one).

    Never raises for an OOM or a failing step: the record's `status` says "oom" or "failed".
    Raises `memplan.errors.MissingExtraError` without torch & co.
    """
    from .runner import profile as _profile

    return _profile(model, plan, **kwargs)


def find_max(model: Any, plan: Any = None, **kwargs: Any):
    """The largest `dimension` ("batch_size" or "seq_len") that runs; see `memplan.profile.search`."""
    from .search import find_max as _find_max

    return _find_max(model, plan, **kwargs)


def compare_runs(paths: Any, stored: bool = False) -> list[dict[str, Any]]:
    """Estimate vs measured per term for run records (files or folders); see `memplan compare`."""
    from .compare import compare_runs as _compare

    return _compare(paths, stored=stored)


__all__ = ["profile", "find_max", "compare_runs", "MeasuredRun", "read_run", "write_run", "run_paths",
           "stored_runs", "iter_runs", "SCHEMA"]


class _CallableModule(types.ModuleType):
    """`memplan.profile(...)` calls `profile` while `memplan.profile` stays this package.

    NB: a function named like its package breaks `import memplan.profile.search as m` (Python resolves
    it through the parent's attribute) and is silently replaced by the module once anything imports a
    submodule; a callable module has neither problem.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> MeasuredRun:
        return profile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
