"""Allocator-level live bytes of a real step, from torch.profiler: an instrument independent of the tracker.

`LiveTensorTracker` counts the storages that ops return at the Python dispatch key and learns of
their frees from weakref finalizers; a bug there cannot show in a comparison with itself. This
module measures the same step one level lower: with `profile_memory=True`, every allocation and free
made through a torch allocator (c10's CPU allocator, the CUDA caching allocator) is reported to the
profiler with its pointer and byte count, whoever asked for it: an op's output, a kernel's internal
buffer (oneDNN's scratchpad inside a CPU bf16 matmul, flash attention's CPU buffers), a tensor that
C++ builds outside any op (`torch.get_rng_state()`). The running sum of those deltas is the
allocator's own count of live bytes.

    trace = allocator_peak(fn, *args, **kwargs)   # runs fn under the profiler
    trace.peak_above_start                         # peak of the window - bytes alive at its start

`fn` may mark the part to measure with `window()` (a `record_function` range; enter/exit it by hand
from a callback if needed). The last window counts; without one, the whole call does. To compare
with the tracker, open the window where the tracker's `reset_peak` runs (run_steps calls `progress`
just before) and compare `trace.peak_above_start` with `tracker.peak - tracker.live` taken there:
both are the step's peak above what was alive when it began (tests/test_instrument.py).

How the events are read (torch 2.13): `prof.profiler.kineto_results.experimental_event_tree()`, the
tree that torch's own memory timeline (`torch.profiler._memory_profiler`) is built on. Its
`_EventType.Allocation` nodes carry `alloc_size` (> 0 allocation, < 0 free), `ptr` and `device`, a
nanosecond timestamp, and sit under the op or `record_function` range during which they happened
(`Allocation.op`/`scope`; `mark=` names the nearest range with a given prefix, as the tracker's
per-op ranges). The alternatives are weaker: `prof.profiler.kineto_results.events()` has every
`[memory]` event with `nbytes()` and `start_ns()` but no parent op; `prof.events()` folds an
allocation made inside an op into that op's `cpu_memory_usage` (only those outside any op stay
`[memory]` events) and has microsecond times.

Known limitations (NB):
- A free is reported only for a block allocated while the profiler ran: c10's CPU allocator drops
  the free of a block of unknown size (warning "Memory block of unknown size was allocated before the
  profiling started", CPUAllocator.cpp). Start profiling before anything the window frees is
  allocated (profile the warm-up step too and mark the measured step with `window()`).
  `start_bytes`/`peak_bytes` count from the profiler's start, not from process start.
- Only memory that goes through a torch allocator is seen: what a library mallocs itself (MKL's
  sgemm buffers: an fp32 `mm` on CPU shows no allocation besides its output), mmapped files, pinned
  memory and CUDA managed (paged) memory are not.
- CPU events carry the requested size (no rounding). CUDA events (the caching allocator's blocks)
  are read the same way but not checked here.
- Allocations from threads the profiler does not follow (e.g. OpenMP workers allocating on their
  own) are not reported; torch's kernels allocate on the calling thread before a parallel region.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

#: the `record_function` name that marks the measured window
WINDOW = "memplan.allocator.window"


@dataclass(frozen=True, slots=True)
class Allocation:
    """One block allocated inside the window."""

    ptr: int
    nbytes: int
    alloc_ns: int
    #: free time (ns), or None when the block outlived the profiled call
    free_ns: int | None
    #: the innermost op or record_function range that allocated it ("" outside any)
    op: str
    #: enclosing ops / ranges (and Python frames with `with_stack=True`), innermost first
    scope: tuple[str, ...]

    def alive_at(self, ns: int) -> bool:
        return self.alloc_ns <= ns and (self.free_ns is None or ns < self.free_ns)


@dataclass
class AllocatorTrace:
    """Live bytes of one device's allocator over the measured window (bytes since the profiler started)."""

    device: str
    #: bytes alive when the window opened (allocated after the profiler started and not yet freed)
    start_bytes: int
    #: most bytes alive at any moment in the window
    peak_bytes: int
    #: bytes alive when the window closed
    end_bytes: int
    start_ns: int
    peak_ns: int
    end_ns: int
    #: every block allocated in the window, in time order
    allocations: list[Allocation] = field(default_factory=list)
    #: allocation + free events inside the window
    n_events: int = 0
    #: number of windows fn opened (0: the whole call was measured)
    windows: int = 0
    #: what fn returned
    result: Any = None
    #: every allocator event of the call on this device (for `LiveTensorTracker.add_kernel_workspace`)
    events: list[AllocEvent] = field(default_factory=list, repr=False)

    @property
    def peak_above_start(self) -> int:
        """The window's peak minus the bytes alive at its start (what a tracker reset there reports
        as `peak - live at reset`)."""
        return self.peak_bytes - self.start_bytes

    def alive_at(self, ns: int) -> list[Allocation]:
        """Blocks allocated in the window and alive at `ns`."""
        return [a for a in self.allocations if a.alive_at(ns)]

    def top_at_peak(self, n: int = 20) -> list[Allocation]:
        return sorted(self.alive_at(self.peak_ns), key=lambda a: -a.nbytes)[:n]


def window():
    """A `record_function` range marking the part of `fn` to measure (a context manager; its
    `__enter__`/`__exit__` may also be called by hand, e.g. from a per-step callback)."""
    return torch.profiler.record_function(WINDOW)


def allocator_peak(fn: Callable[..., Any], *args, device: str = "cpu", with_stack: bool = False,
                   mark: str | None = None, **kwargs) -> AllocatorTrace:
    """Run `fn(*args, **kwargs)` under `torch.profiler` (CPU activity, `profile_memory=True`) and
    return the allocator's live bytes on `device` ("cpu", "cuda", ...) over the last `window()` that
    fn opened, or over the whole call. `mark`: see `allocation_events`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False,
                 with_stack=with_stack) as prof:
        result = fn(*args, **kwargs)
    roots = _events(prof)
    trace = trace_from_events(allocation_events(prof, roots, mark=mark), windows=window_ranges(prof, roots=roots),
                              device=device)
    trace.result = result
    return trace


# ---- reading the profiler's event tree -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AllocEvent:
    """One allocator event: `delta` > 0 allocates, < 0 frees."""

    ns: int
    seq: int  # tie-break: pre-order position in the event tree
    ptr: int
    delta: int
    device: str
    scope: tuple[str, ...]
    #: the nearest enclosing range whose name starts with `allocation_events(mark=...)` ("" if none)
    mark: str = ""


def _events(prof) -> list:
    return prof.profiler.kineto_results.experimental_event_tree()


def _walk(roots):
    """Pre-order over the event tree, parents before children, siblings in time order."""
    stack = list(reversed(sorted(roots, key=lambda e: e.start_time_ns)))
    while stack:
        e = stack.pop()
        yield e
        stack.extend(reversed(sorted(e.children, key=lambda c: c.start_time_ns)))


def _scope(e, mark: str | None, depth: int = 12) -> tuple[tuple[str, ...], str]:
    from torch._C._profiler import _EventType

    out = []
    found = ""
    p = e.parent
    while p is not None and (len(out) < depth or (mark and not found)):
        if p.tag == _EventType.TorchOp:
            if len(out) < depth:
                out.append(p.name)
            if mark and not found and p.name.startswith(mark):
                found = p.name
        elif p.tag == _EventType.PyCall and len(out) < depth:
            try:
                out.append(f"py:{p.name}")
            except UnicodeDecodeError:  # torch 2.13 sometimes garbles a frame's name
                pass
        p = p.parent
    return tuple(out), found


def allocation_events(prof, roots=None, mark: str | None = None) -> list[AllocEvent]:
    """Every allocator event of a finished `torch.profiler.profile(profile_memory=True)`, in time order.

    `mark`: also name, for each event, the nearest enclosing range whose name starts with it.
    """
    from torch._C._profiler import _EventType

    out = []
    for i, e in enumerate(_walk(_events(prof) if roots is None else roots)):
        if e.tag != _EventType.Allocation:
            continue
        f = e.typed[1]
        if not f.alloc_size:
            continue
        scope, found = _scope(e, mark)
        out.append(AllocEvent(e.start_time_ns, i, f.ptr, f.alloc_size, f.device.type, scope, found))
    out.sort(key=lambda a: (a.ns, a.seq))
    return out


def window_ranges(prof, name: str = WINDOW, roots=None) -> list[tuple[int, int]]:
    """(start_ns, end_ns) of every `record_function(name)` range, in time order."""
    from torch._C._profiler import _EventType

    return sorted((e.start_time_ns, e.end_time_ns) for e in _walk(_events(prof) if roots is None else roots)
                  if e.tag == _EventType.TorchOp and e.name == name)


#: the scope of a free that `with_unseen_frees` infers
UNSEEN_FREE = "memplan.unseen_free"


def with_unseen_frees(events: list[AllocEvent], op_ranges: list[tuple[int, int, str]] = ()) -> list[AllocEvent]:
    """`events` plus the frees the profiler did not report, in time order.

    A block freed on a thread the profiler does not follow (gloo's worker drops a collective's Work and
    with it the reduce-scatter's copy of its input) has no free event: read as is, it stays alive to the
    end. When the allocator hands the same address out again, that block was freed before: its free is
    put just before the op (`op_ranges`, e.g. `mark_ranges(prof, OP_MARK)`) that made the new allocation,
    or just before the allocation outside any op. A block never handed out again stays alive (NB: both
    instruments then count it to the end of the profile).
    """
    starts = [r[0] for r in op_ranges]
    open_: dict[tuple[str, int], AllocEvent] = {}
    added = []
    for e in events:
        key = (e.device, e.ptr)
        if e.delta > 0:
            old = open_.get(key)
            if old is not None:
                i = bisect.bisect_right(starts, e.ns) - 1
                ns = op_ranges[i][0] - 1 if i >= 0 and e.ns < op_ranges[i][1] else e.ns - 1
                added.append(AllocEvent(max(ns, old.ns), e.seq, e.ptr, -old.delta, e.device, (UNSEEN_FREE,)))
            open_[key] = e
        else:
            open_.pop(key, None)
    return sorted(events + added, key=lambda a: (a.ns, a.seq)) if added else events


def mark_ranges(prof, prefix: str, roots=None) -> list[tuple[int, int, str]]:
    """(start_ns, end_ns, name) of every `record_function` range whose name starts with `prefix`, in time
    order (e.g. the tracker's per-op ranges: which op ran at a given time on the main thread)."""
    from torch._C._profiler import _EventType

    return sorted((e.start_time_ns, e.end_time_ns, e.name) for e in _walk(_events(prof) if roots is None else roots)
                  if e.tag == _EventType.TorchOp and e.name.startswith(prefix))


def trace_from_events(events: list[AllocEvent], windows: list[tuple[int, int]] = (),
                      device: str = "cpu") -> AllocatorTrace:
    """Running sum of `events` on `device` over the last of `windows` (all events when none)."""
    evs = [e for e in events if e.device == device]
    if windows:
        w0, w1 = windows[-1]
    else:
        w0 = evs[0].ns if evs else 0
        w1 = evs[-1].ns if evs else 0
    live = 0
    start = None
    peak, peak_ns = None, w0
    n = 0
    open_: dict[int, int] = {}  # ptr -> index in allocs
    allocs: list[list] = []
    for e in evs:
        if start is None and e.ns >= w0:
            start = live
            peak, peak_ns = live, w0
        if e.ns > w1:
            break
        live += e.delta
        if start is None:
            continue
        n += 1
        if e.delta > 0:
            open_[e.ptr] = len(allocs)
            allocs.append([e.ptr, e.delta, e.ns, None, e.scope[0] if e.scope else "", e.scope])
        else:
            j = open_.pop(e.ptr, None)
            if j is not None:
                allocs[j][3] = e.ns
        if live > peak:
            peak, peak_ns = live, e.ns
    if start is None:  # nothing happened in the window
        start = peak = live
    return AllocatorTrace(device=device, start_bytes=start, peak_bytes=peak, end_bytes=live, start_ns=w0,
                          peak_ns=peak_ns, end_ns=w1, allocations=[Allocation(*a) for a in allocs],
                          n_events=n, windows=len(windows), events=evs)
