"""The CUDA bookkeeping, NVML probing and the search logic, checked on the CPU with fakes.

`CudaMeter` needs only an object with torch.cuda's memory functions and `Nvml` only a module with
pynvml's functions, so their logic (phase resets, gradient-accumulation merges, context =
NVML - baseline - reserved - paged, device mapping, a missing NVML) runs here. What the fakes cannot
show -- that torch and the driver report what we expect -- is in the GPU checks (scripts/gpu_check.sh).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from memplan.profile.measure import CudaMeter, is_oom, is_oom_text, phases_max, steady_steps, summarize_cuda
from memplan.profile.nvml import Nvml, NvmlSampler

MiB = 2**20


class FakeCuda:
    """torch.cuda's allocator counters: allocate/free move `allocated`; reserved only grows."""

    def __init__(self):
        self.allocated = self.reserved = self.peak_alloc = self.peak_res = 0
        self.resets = 0

    def alloc(self, n):
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated + 2 * MiB)
        self.peak_alloc = max(self.peak_alloc, self.allocated)
        self.peak_res = max(self.peak_res, self.reserved)

    def free(self, n):
        self.allocated -= n

    def reset_peak_memory_stats(self, dev):
        self.peak_alloc, self.peak_res = self.allocated, self.reserved
        self.resets += 1

    def max_memory_allocated(self, dev):
        return self.peak_alloc

    def max_memory_reserved(self, dev):
        return self.peak_res

    def memory_reserved(self, dev):
        return self.reserved

    def synchronize(self, dev):
        pass


class FakeNvml:
    def __init__(self, cuda, baseline, context, paged):
        self.cuda, self.baseline, self.context, self.paged = cuda, baseline, context, paged
        self.available = True

    def used(self):
        return self.baseline + self.context + self.cuda.reserved + self.paged


def test_meter_phases_steps_and_context():
    cuda = FakeCuda()
    nv = FakeNvml(cuda, baseline=700 * MiB, context=400 * MiB, paged=0)
    paged = [0]
    m = CudaMeter(stats=cuda, nvml=nv, sampler=None, baseline_used=700 * MiB, paged_bytes=lambda: paged[0])
    cuda.alloc(100 * MiB)  # the model
    for step in (1, 2, 3):
        m.begin_step(step)
        m.start("forward")
        cuda.alloc(50 * MiB)
        m.start("backward")
        cuda.alloc(30 * MiB)
        cuda.free(80 * MiB)
        m.start("optimizer")
        if step == 1:
            cuda.alloc(20 * MiB)  # optimizer state, created at the first step
            paged[0] = nv.paged = 64 * MiB  # and some paged state in managed memory
        cuda.alloc(5 * MiB)
        cuda.free(5 * MiB)
    m.close()
    fwd = m.phase(2, "forward")
    assert fwd.allocated_bytes == 170 * MiB  # model + state + 50: the peak restarted at the phase start
    assert m.phase(2, "backward").allocated_bytes == 200 * MiB
    assert m.phase(2, "optimizer").allocated_bytes == 125 * MiB
    assert m.phase(1, "forward").allocated_bytes == 150 * MiB  # no optimizer state yet
    s = summarize_cuda(m, 3)
    assert (s["allocated_bytes"], s["phase"], s["step"]) == (200 * MiB, "backward", 2)
    assert s["reserved_bytes"] == 202 * MiB
    assert s["context_bytes"] == 400 * MiB  # NVML - baseline - reserved - paged
    phases = phases_max(m.readings, steady_steps(3))
    assert list(phases) == ["forward", "backward", "optimizer"]


def test_meter_merges_gradient_accumulation_and_marks_partial():
    cuda = FakeCuda()
    m = CudaMeter(stats=cuda)
    m.begin_step(1)
    for n in (10, 30, 20):  # three micro-batches: forward repeats within the step
        m.start("forward")
        cuda.alloc(n * MiB)
        cuda.free(n * MiB)
    m.start("backward")
    cuda.alloc(7 * MiB)
    r = m.close(partial=True)  # an OOM interrupted the phase
    assert m.phase(1, "forward").allocated_bytes == 30 * MiB
    assert r.partial and r.to_dict()["partial"] is True and r.allocated_bytes == 7 * MiB
    assert len(m.readings) == 2 and m.close() is None


def test_steady_steps():
    assert steady_steps(3) == [2, 3] and steady_steps(2) == [2] and steady_steps(1) == [1]


# ---- NVML ---------------------------------------------------------------------------------------------
class FakePynvml(SimpleNamespace):
    def __init__(self, uuids, used=(1000, 2000), fail_init=None):
        super().__init__()
        self.uuids, self._used, self.fail_init, self.shutdown = list(uuids), list(used), fail_init, 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.fail_init

    def nvmlShutdown(self):
        self.shutdown += 1

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("h", i)

    def nvmlDeviceGetHandleByUUID(self, u):
        return ("h", self.uuids.index(u))

    def nvmlDeviceGetUUID(self, h):
        return self.uuids[h[1]]

    def nvmlDeviceGetName(self, h):
        return "NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=150754820096, free=0, used=self._used[h[1]])

    def nvmlSystemGetDriverVersion(self):
        return "570.86.15"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        import os

        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=123)]


UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000"]


@pytest.mark.parametrize("env, expect_used", [(None, 1000), ("1", 2000), ("1,0", 2000), ("GPU-bbbb", 2000)],
                         ids=["unset", "index", "reordered", "uuid-prefix"])
def test_nvml_maps_cuda_visible_devices(monkeypatch, env, expect_used):
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    n = Nvml(0, module=FakePynvml(UUIDS))
    assert n.available, n.reason
    assert n.used() == expect_used and n.name() == "NVIDIA H200" and n.driver_version() == "570.86.15"
    assert n.process_used() == 123


def test_nvml_rebinds_by_torch_uuid(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    n = Nvml(0, module=FakePynvml(UUIDS))
    assert n.rebind_uuid("bbbb2222-0000") and n.used() == 2000  # torch prints the uuid without "GPU-"
    assert not n.rebind_uuid("bbbb2222-0000")


def test_nvml_unavailable_says_why():
    class NVMLError_LibraryNotFound(Exception):
        pass

    n = Nvml(0, module=FakePynvml(UUIDS, fail_init=NVMLError_LibraryNotFound("NVML Shared Library Not Found")))
    assert not n.available and "NVML Shared Library Not Found" in n.reason
    assert n.used() is None and n.name() is None
    real = Nvml(0)  # this machine: pynvml installed, no driver
    assert real.available or real.reason


def test_sampler_keeps_the_max_between_takes():
    vals = iter([5, 9, 3, 4])
    fake = SimpleNamespace(available=True, used=lambda: next(vals))
    s = NvmlSampler(fake)
    s.sample()
    s.sample()
    assert s.take() == 9  # 5, 9 and a fresh 3
    assert s.take() == 4


# ---- failures -------------------------------------------------------------------------------------------
def test_oom_classification():
    torch = pytest.importorskip("torch")
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom(ValueError("out of memory"))  # not a runtime failure
    assert is_oom_text("Error out of memory at line 42 in file csrc/pythonInterface.cpp")


# ---- a CUDA record, assembled from fake readings ------------------------------------------------------
def test_cuda_record_terms_peaks_and_comparison():
    """Session._measure_cuda on fake allocator/NVML readings: workspace, allocator overhead, context, device."""
    from memplan.profile.record import MeasuredRun, validate
    from memplan.profile.runner import Session
    from memplan.terms import Term

    cuda = FakeCuda()
    nv = FakeNvml(cuda, baseline=700 * MiB, context=400 * MiB, paged=0)
    paged = [0]
    meter = CudaMeter(stats=cuda, nvml=nv, baseline_used=700 * MiB, paged_bytes=lambda: paged[0])
    cuda.alloc(100 * MiB)
    for step in (1, 2, 3):
        meter.begin_step(step)
        meter.start("forward")
        cuda.alloc(100 * MiB)
        cuda.free(100 * MiB)
        meter.start("optimizer")
        if step == 1:
            cuda.alloc(20 * MiB)
            paged[0] = nv.paged = 64 * MiB
    meter.close()
    s = Session.__new__(Session)  # no device needed for the bookkeeping
    s.meter, s.track, s._load_terms, s.memory_limit_bytes = meter, True, {}, None
    s.nvml_info = {"available": True, "baseline_used_bytes": 700 * MiB}
    tracked = 210 * MiB  # what the live-tensor tracker saw at the last step's peak
    terms = {str(t): 0 for t in Term}
    terms.update(base_weights=100 * MiB, optimizer_state=20 * MiB, activations=90 * MiB)
    res = SimpleNamespace(terms=terms, peak_bytes=tracked, phase_terms={}, top=[])
    tracker = SimpleNamespace(phase_peaks={"forward": SimpleNamespace(bytes=tracked)},
                              step_peaks=[{"step": k, "allocated_bytes": tracked} for k in (1, 2, 3)])
    m = s._measure_cuda(res, tracker, 3, paged=64 * MiB)
    t = m["terms"]
    assert t["workspace"] == 220 * MiB - tracked  # torch's peak - the tracker's peak
    assert t["allocator_overhead"] == 2 * MiB  # reserved 222 - allocated 220
    assert t["cuda_context"] == 400 * MiB  # NVML - baseline - reserved - paged
    pk = m["peak"]
    assert (pk["allocated_bytes"], pk["reserved_bytes"], pk["device_bytes"]) == (220 * MiB, 222 * MiB, 622 * MiB)
    assert sum(t[str(x)] for x in list(Term)[:10]) == pk["allocated_bytes"]
    assert pk["nvml_used_bytes"] == 400 * MiB + 222 * MiB + 64 * MiB  # this run's NVML footprint, paged included
    assert m["paged_bytes"] == 64 * MiB and [r["step"] for r in m["steps"]] == [1, 2, 3]
    assert m["nvml"]["paged_seen_bytes"] == 64 * MiB  # NVML growth over step 1's optimizer phase - reserved growth
    m.pop("_notes")
    est = {"terms": dict(t, activations=t["activations"] + 4 * MiB), "paged_bytes": 64 * MiB,
           "peak": {"allocated_bytes": 224 * MiB, "reserved_bytes": 226 * MiB, "device_bytes": 626 * MiB}}
    run = MeasuredRun(model={"name": "x", "config": {}}, plan={}, device="cuda", status="success", measured=m,
                      estimate=est)
    assert validate(run.to_dict()) == []
    cmp = run.estimate_error()
    assert set(cmp["peak"]) == {"allocated_bytes", "reserved_bytes", "device_bytes", "paged_bytes"}
    assert cmp["peak"]["reserved_bytes"]["diff_bytes"] == 4 * MiB
