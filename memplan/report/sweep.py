"""sweep: one row per model x GPU x plan, every number from the closed form (`memplan.estimate`).

Columns: model, gpu, gpu_memory_bytes, method, quant, lora_r (<NA> for full fine-tuning, which has
no rank), seq_len, batch_size; one `<term>_bytes` column per Term; allocated/reserved/device/paged
bytes, peak_phase, fits, headroom_bytes (`Fit.of`: GPU memory - device bytes - reserve);
max_batch_size (the largest micro-batch that fits at the row's seq_len, everything else as in the
row) and max_seq_len (the longest sequence at the row's batch), both exact (`memplan.search.max_fitting`;
0 when even 1 does not fit); gpu_note (why the GPU cannot run the plan at all, e.g. no bf16) and gpu_fix (the flags that
make it runnable, `memplan.fit.gpu_fix`); error
(why the row could not be estimated, e.g. a mixture-of-experts model; its numbers are then <NA>) and
error_kind (the error's class, `MemplanError.error_kind`: "unsupported_architecture",
"invalid_spec", ...; "" when the row was estimated), which charts and tables classify by.

Several GPUs (`worlds` and/or `strategies`, `memplan report --num-processes 1,2,4,8 --strategy
fsdp,deepspeed`): every row also has a world: num_processes, num_machines (one node up to 8 GPUs, then
whole nodes of 8: memplan.distributed.world_fields), strategy (single for one GPU, once per row whatever
the strategies; else each strategy given) and host_bytes (host RAM per node: offloaded state and loading,
`Estimate.host_bytes`). device_bytes, fits, headroom_bytes and the limits are then per rank (the busiest);
fits checks the GPU (the host figure is reported, not checked). Without them the columns stay as above.

NB: a sweep never falls back to simulate (`fallback_simulate=False`): a trace takes seconds, a grid
has thousands of rows. Rows of a model without a closed form carry the reason instead; `memplan
recommend` or `memplan.estimate` give such a model its simulate trace.

Speed: the limits do not depend on the row's own batch (max batch) or sequence length (max seq len),
so each is searched once per group and shared; every evaluation inside a (model, GPU, method, rank)
group is memoised by (batch, seq_len).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Sequence

import pandas as pd

from ..catalogue import load_gpu, resolve_model
from ..errors import MemplanError
from ..estimate import Estimate, estimate
from ..fit import Fit, check_reserve, fit_limit_bytes, gpu_fix, gpu_support
from ..gpu import GPUSpec
from ..model import ModelSpec
from ..plan import METHODS, TrainPlan
from ..search import MAX_BATCH_SIZE, MAX_SEQ_LEN, max_fitting
from ..terms import Term

DEFAULT_SEQ_LENS = (512, 1024, 2048, 4096)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
DEFAULT_RANKS = (16,)
TERM_COLUMNS = tuple(f"{t.value}_bytes" for t in Term)
INT_COLUMNS = TERM_COLUMNS + ("allocated_bytes", "reserved_bytes", "device_bytes", "paged_bytes",
                              "headroom_bytes", "max_batch_size", "max_seq_len")
COLUMNS = ("model", "gpu", "gpu_memory_bytes", "method", "quant", "lora_r", "seq_len", "batch_size") + \
    TERM_COLUMNS + ("allocated_bytes", "reserved_bytes", "device_bytes", "paged_bytes", "peak_phase", "fits",
                    "headroom_bytes", "max_batch_size", "max_seq_len", "gpu_note", "gpu_fix", "error",
                    "error_kind")


#: the columns a sweep over worlds adds, after batch_size (see the module docstring)
WORLD_COLUMNS = ("num_processes", "num_machines", "strategy", "host_bytes")
#: the strategies of a world grid when none is given (each engine at the plan's own knobs)
DEFAULT_STRATEGIES = ("ddp", "fsdp", "deepspeed")
WORLD_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def world_columns() -> tuple[str, ...]:
    """COLUMNS with WORLD_COLUMNS after batch_size."""
    i = COLUMNS.index("batch_size") + 1
    return COLUMNS[:i] + WORLD_COLUMNS + COLUMNS[i:]


def world_grid(worlds: Sequence[int], strategies: Sequence[str]) -> list[dict[str, Any]]:
    """The plan fields of each (world, strategy) row: one GPU once (strategy single), then every
    larger world with each strategy (memplan.distributed.world_fields: whole nodes of 8 beyond 8)."""
    from ..distributed import GPUS_PER_NODE, world_fields

    out: list[dict[str, Any]] = []
    for n in worlds:
        if n == 1:
            out.append({"num_processes": 1, "num_machines": 1, "strategy": "single"})
            continue
        if n > GPUS_PER_NODE and n % GPUS_PER_NODE:
            raise MemplanError(f"--num-processes {n}: beyond one node of {GPUS_PER_NODE} GPUs give whole nodes "
                               f"(a multiple of {GPUS_PER_NODE}, e.g. {GPUS_PER_NODE * (n // GPUS_PER_NODE + 1)})")
        out += [world_fields(n, {"strategy": st}) for st in strategies]
    return out


class Progress:
    """A one-line progress bar on stderr (no dependency); redrawn at most every 0.1 s."""

    def __init__(self, total: int, enabled: bool = True, label: str = "sweep", stream: Any = None):
        self.total, self.enabled, self.label = max(total, 1), enabled, label
        self.stream = stream or sys.stderr
        self.n, self.t0, self._last = 0, time.perf_counter(), 0.0
        # NB: redraw in place only on a terminal; a log file gets the final line alone
        self.live = enabled and bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.live and (time.perf_counter() - self._last > 0.1 or self.n >= self.total):
            self._draw()

    def _draw(self) -> None:
        self._last = time.perf_counter()
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        dt = self._last - self.t0
        rate = self.n / dt if dt > 0 else 0.0
        start = "\r" if self.live else ""
        self.stream.write(f"{start}{self.label} [{bar}] {100 * frac:5.1f}%  {self.n}/{self.total} rows  "
                          f"{dt:5.1f} s  {rate:,.0f} rows/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, (str, ModelSpec, GPUSpec)) or not isinstance(x, Iterable):
        return [x]
    return list(x)


def _ints(name: str, values: Any) -> tuple[int, ...]:
    vals = tuple(_as_list(values))
    if not vals:
        raise MemplanError(f"{name} is empty; give at least one value")
    bad = [v for v in vals if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise MemplanError(f"{name} must be positive integers, got {', '.join(map(repr, bad))}")
    return tuple(dict.fromkeys(vals))  # keep order, drop repeats


def row_plan(base: dict[str, Any], method: str, rank: int | None, seq_len: int, batch_size: int) -> TrainPlan:
    """The plan of one sweep row: the shared keyword arguments plus the grid values."""
    kw = dict(base, method=method, seq_len=seq_len, batch_size=batch_size)
    if rank is not None:
        kw["lora_r"] = rank
    return TrainPlan(**kw)


def grid_plans(methods: Sequence[str], ranks: Sequence[int]) -> list[tuple[str, int | None]]:
    """(method, rank) pairs; full fine-tuning has no rank, so it appears once."""
    out: list[tuple[str, int | None]] = []
    for m in methods:
        out += [(m, None)] if m == "full" else [(m, r) for r in ranks]
    return out


def sweep(models: Any, gpus: Any, methods: Sequence[str] = ("qlora",), seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
          batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, ranks: Sequence[int] = DEFAULT_RANKS, *,
          progress: bool = True, reserve_bytes: int = 0, limits: bool = True, worlds: Sequence[int] | None = None,
          strategies: Sequence[str] | None = None, **plan_kwargs: Any) -> pd.DataFrame:
    """Estimate every model x GPU x (method, rank, seq_len, batch_size); one DataFrame row each.

    `models`/`gpus`: names (catalogue, hub id, path) or ModelSpec / GPUSpec objects. Other plan fields
    (optim, gradient_checkpointing, ...) come from `plan_kwargs` and apply to every row.
    `reserve_bytes` is kept free on every GPU (fits and headroom_bytes include it).
    `limits=False` skips the max_batch_size / max_seq_len searches (those columns are then <NA>).
    `worlds` (GPU counts) and `strategies` (ddp, fsdp, deepspeed; default all three) make it a grid over
    several GPUs too (the module docstring); the other distributed fields come from `plan_kwargs`.
    `df.attrs["memplan"]` keeps the specs, the shared plan fields and the timing for `write_report`.
    """
    t0 = time.perf_counter()
    model_list, gpu_list = _as_list(models), _as_list(gpus)
    if not model_list:
        raise MemplanError("no models given; name at least one (see `memplan models`)")
    if not gpu_list:
        raise MemplanError("no GPUs given; name at least one (see `memplan gpus`)")
    methods = tuple(dict.fromkeys(_as_list(methods)))
    if not methods:
        raise MemplanError("methods is empty; give at least one of: " + ", ".join(METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise MemplanError(f"unknown method {', '.join(map(repr, bad))} (known: {', '.join(METHODS)})")
    seq_lens, batch_sizes = _ints("seq_lens", seq_lens), _ints("batch_sizes", batch_sizes)
    ranks = _ints("ranks", ranks)
    reserve_bytes = check_reserve(reserve_bytes)
    grid = set(plan_kwargs) & {"method", "seq_len", "batch_size", "lora_r"}
    if grid:
        raise MemplanError(f"{', '.join(sorted(grid))} are grid dimensions: pass methods, seq_lens, batch_sizes "
                           "or ranks instead")
    world_rows: list[dict[str, Any]] | None = None
    if worlds is not None or strategies is not None:
        both = set(plan_kwargs) & {"num_processes", "num_machines", "strategy"}
        if both:
            raise MemplanError(f"{', '.join(sorted(both))} are grid dimensions here: pass worlds and strategies "
                               "instead")
        worlds = _ints("worlds", worlds if worlds is not None else (1, 2, 4, 8))
        strategies = tuple(dict.fromkeys(_as_list(strategies if strategies is not None else DEFAULT_STRATEGIES)))
        bad = [st for st in strategies if st not in WORLD_STRATEGIES]
        if bad or not strategies:
            raise MemplanError(f"strategies: {', '.join(map(repr, bad)) or 'none given'}; give any of "
                               f"{', '.join(WORLD_STRATEGIES)}")
        world_rows = world_grid(worlds, strategies)
    specs = {}
    for m in model_list:
        s = resolve_model(m)
        specs.setdefault(s.name, s)
    gspecs = {}
    for g in gpu_list:
        gs = load_gpu(g)
        gspecs.setdefault(gs.name, gs)
    pairs = grid_plans(methods, ranks)
    bases = [dict(plan_kwargs, **w) for w in world_rows] if world_rows is not None else [dict(plan_kwargs)]
    for base in bases:
        for method, rank in pairs:  # every problem with the shared fields, before any work
            row_plan(base, method, rank, seq_lens[0], batch_sizes[0])

    total = len(specs) * len(gspecs) * len(pairs) * len(bases) * len(seq_lens) * len(batch_sizes)
    bar = Progress(total, enabled=progress)
    rows: list[dict[str, Any]] = []
    try:
        for spec in specs.values():
            for gpu in gspecs.values():
                limit = fit_limit_bytes(gpu.memory_bytes, reserve_bytes)
                for base in bases:
                    for method, rank in pairs:
                        rows += _group(spec, gpu, method, rank, seq_lens, batch_sizes, base, limit,
                                       reserve_bytes, limits, bar, world_rows is not None)
    finally:
        bar.close()
    df = pd.DataFrame.from_records(rows, columns=list(world_columns() if world_rows is not None else COLUMNS))
    for c in INT_COLUMNS + ("lora_r",) + (("host_bytes",) if world_rows is not None else ()):
        df[c] = df[c].astype("Int64")
    for c in ("gpu_memory_bytes", "seq_len", "batch_size") + (("num_processes", "num_machines")
                                                              if world_rows is not None else ()):
        df[c] = df[c].astype("int64")
    df["fits"] = df["fits"].astype("boolean")
    seconds = time.perf_counter() - t0
    df.attrs["memplan"] = {
        "models": specs, "gpus": gspecs, "plan_kwargs": dict(plan_kwargs), "methods": methods,
        "ranks": ranks, "seq_lens": seq_lens, "batch_sizes": batch_sizes, "reserve_bytes": reserve_bytes,
        "seconds": seconds, "rows_per_second": len(df) / seconds if seconds > 0 else float("inf"),
    }
    if world_rows is not None:
        df.attrs["memplan"].update(worlds=worlds, strategies=strategies)
    return df


def _group(spec: ModelSpec, gpu: GPUSpec, method: str, rank: int | None, seq_lens: Sequence[int],
           batch_sizes: Sequence[int], base: dict[str, Any], limit: int, reserve: int, limits: bool,
           bar: Progress, world: bool = False) -> list[dict[str, Any]]:
    """The rows of one (model, GPU, method, rank[, world, strategy]): seq_lens x batch_sizes."""
    proto = row_plan(base, method, rank, seq_lens[0], batch_sizes[0])
    at = ({"num_processes": proto.num_processes, "num_machines": proto.num_machines,
           "strategy": base["strategy"]} if world else {})
    memo: dict[tuple[int, int], int] = {}

    def est(batch: int, seq: int) -> Estimate:
        return estimate(spec, proto.replace(batch_size=batch, seq_len=seq), gpu=gpu, fallback_simulate=False)

    def dev(batch: int, seq: int) -> int:
        key = (batch, seq)
        if key not in memo:
            memo[key] = est(batch, seq).device_bytes
        return memo[key]

    note = gpu_support(gpu, proto)
    fix = gpu_fix(gpu, proto)[1] if note else ""
    out = []
    for seq in seq_lens:
        for batch in batch_sizes:
            row: dict[str, Any] = {"model": spec.name, "gpu": gpu.name, "gpu_memory_bytes": gpu.memory_bytes,
                                   "method": method, "quant": proto.quant, "lora_r": rank, "seq_len": seq,
                                   "batch_size": batch, **at, "gpu_note": note, "gpu_fix": fix, "error": "",
                                   "error_kind": ""}
            try:
                e = est(batch, seq)
            except MemplanError as err:  # e.g. MoE (no closed form): not estimable at this grid point
                row.update(error=str(err), error_kind=err.error_kind)
                out.append(row)
                bar.update()
                continue
            memo[(batch, seq)] = e.device_bytes
            for t in Term:
                row[f"{t.value}_bytes"] = e.terms.get(t, 0)
            f = Fit.of(e, reserve)
            row.update(allocated_bytes=e.allocated_bytes, reserved_bytes=e.reserved_bytes,
                       device_bytes=e.device_bytes, paged_bytes=e.paged_bytes, peak_phase=e.peak_phase,
                       fits=f.fits, headroom_bytes=f.headroom_bytes)
            if world:
                row["host_bytes"] = e.host_bytes
            out.append(row)
            bar.update()
    if limits:  # after the rows, so that the grid points give every search a head start
        max_b: dict[int, int] = {}
        max_s: dict[int, int] = {}
        for row in out:
            if row["error"]:
                continue
            seq, batch = row["seq_len"], row["batch_size"]
            if seq not in max_b:
                known = {b: v for (b, s), v in memo.items() if s == seq}
                max_b[seq] = max_fitting(lambda n: dev(n, seq), limit, cap=MAX_BATCH_SIZE, known=known)[0]
            if batch not in max_s:
                known = {s: v for (b, s), v in memo.items() if b == batch}
                max_s[batch] = max_fitting(lambda n: dev(batch, n), limit, cap=MAX_SEQ_LEN, known=known)[0]
            row.update(max_batch_size=max_b[seq], max_seq_len=max_s[batch])
    return out
