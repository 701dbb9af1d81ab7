"""Device memory as the driver sees it, through NVML (`pynvml`, from the nvidia-ml-py package).

torch's allocator counters miss what lives outside the caching allocator: the CUDA context and
library state, and bitsandbytes' paged optimizer state (CUDA managed memory from
`cudaMallocManaged`, bitsandbytes `cget_managed_ptr`). NVML's `nvmlDeviceGetMemoryInfo(...).used`
counts everything resident on the device, for every process, so the profiler reads it *before* torch
initialises CUDA (the baseline) and subtracts.

API used (nvidia-ml-py 13.x `pynvml.py`): `nvmlInit`, `nvmlShutdown`, `nvmlDeviceGetCount`,
`nvmlDeviceGetHandleByIndex`, `nvmlDeviceGetHandleByUUID`, `nvmlDeviceGetUUID`, `nvmlDeviceGetName`,
`nvmlDeviceGetMemoryInfo` (fields total/free/used), `nvmlSystemGetDriverVersion`,
`nvmlDeviceGetComputeRunningProcesses` (pid, usedGpuMemory), `NVMLError`. Strings come back as str.

Device mapping: NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES; CUDA numbers
visible devices, fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID. Before CUDA is initialised
the index is read from CUDA_VISIBLE_DEVICES (integers or GPU-UUID prefixes); once torch knows the
device, `rebind_uuid` switches to the handle with the same UUID (`torch.cuda.get_device_properties(i).uuid`
prints without the "GPU-" prefix NVML uses).

When pynvml or the NVML library is missing, `Nvml.available` is False and `reason` says why; every
read then returns None and the profiler records that and carries on.

Known limitations: on a MIG slice NVML's device memory is the parent GPU's; `used` is device-wide,
so other processes' memory changes during a run show up (the per-process figure from
`nvmlDeviceGetComputeRunningProcesses` is recorded when the driver reports our pid, which it often
does not inside containers).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable


def _visible_index(index: int, env: str | None) -> tuple[int | None, str | None]:
    """(NVML index, UUID prefix) of CUDA device `index` per CUDA_VISIBLE_DEVICES (None: not set)."""
    if env is None:
        return index, None
    items = [s.strip() for s in env.split(",") if s.strip()]
    if index >= len(items):
        return None, None
    item = items[index]
    if item.lstrip("-").isdigit():
        return int(item), None
    return None, item  # GPU-xxxx (possibly abbreviated) or MIG-xxxx


class Nvml:
    """One GPU through NVML. Create it before torch initialises CUDA to get a clean baseline."""

    def __init__(self, index: int = 0, module: Any = None):
        self.available = False
        self.reason = ""
        self.handle = None
        self._nv = None
        self.index = index
        try:
            nv = module
            if nv is None:
                import pynvml as nv  # nvidia-ml-py
            nv.nvmlInit()
        except ImportError:
            self.reason = "pynvml not installed (pip install nvidia-ml-py, part of memplan[profile])"
            return
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.reason = f"NVML unavailable: {e}"
            return
        self._nv = nv
        try:
            nvml_index, uuid = _visible_index(index, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if uuid is not None:
                self.handle = self._by_uuid_prefix(uuid)
            elif nvml_index is not None:
                self.handle = nv.nvmlDeviceGetHandleByIndex(nvml_index)
            if self.handle is None:
                self.reason = f"no NVML device for CUDA device {index} (CUDA_VISIBLE_DEVICES=" \
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
                return
            nv.nvmlDeviceGetMemoryInfo(self.handle)
        except Exception as e:
            self.reason = f"NVML device query failed: {e}"
            self.handle = None
            return
        self.available = True

    def _by_uuid_prefix(self, prefix: str):
        nv = self._nv
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            if str(nv.nvmlDeviceGetUUID(h)).startswith(prefix):
                return h
        return None

    def rebind_uuid(self, torch_uuid: str) -> bool:
        """Use the NVML device whose UUID is "GPU-" + torch's uuid string; True when it changed."""
        if not self.available or not torch_uuid:
            return False
        nv = self._nv
        want = torch_uuid if torch_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{torch_uuid}"
        try:
            if str(nv.nvmlDeviceGetUUID(self.handle)) == want:
                return False
            self.handle = nv.nvmlDeviceGetHandleByUUID(want)
            return True
        except Exception as e:
            self.reason = f"could not match torch's device UUID {want} in NVML: {e}"
            return False

    # ---- reads (None when unavailable) ----------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        if not self.available:
            return None
        try:
            return fn()
        except Exception:
            return None

    def used(self) -> int | None:
        return self._call(lambda: int(self._nv.nvmlDeviceGetMemoryInfo(self.handle).used))

    def total(self) -> int | None:
        return self._call(lambda: int(self._nv.nvmlDeviceGetMemoryInfo(self.handle).total))

    def name(self) -> str | None:
        return self._call(lambda: str(self._nv.nvmlDeviceGetName(self.handle)))

    def uuid(self) -> str | None:
        return self._call(lambda: str(self._nv.nvmlDeviceGetUUID(self.handle)))

    def driver_version(self) -> str | None:
        return self._call(lambda: str(self._nv.nvmlSystemGetDriverVersion()))

    def process_used(self, pid: int | None = None) -> int | None:
        """This process's device memory per NVML, when the driver reports it (often not in containers)."""
        pid = os.getpid() if pid is None else pid

        def read():
            for p in self._nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
            return None

        return self._call(read)

    def close(self) -> None:
        if self.available:
            try:
                self._nv.nvmlShutdown()
            except Exception:
                pass
            self.available = False


class NvmlSampler:
    """Samples NVML used memory on a thread (every `period_s`) and keeps the maximum per label.

    `mark(label)` starts a new label; `take()` returns and clears the maximum seen since the last take
    (the profiler takes at each phase boundary). The thread touches only NVML, never torch.
    """

    def __init__(self, nvml: Nvml, period_s: float = 0.005):
        self.nvml = nvml
        self.period_s = period_s
        self._max: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "NvmlSampler":
        if self.nvml.available and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="memplan-nvml", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period_s)

    def sample(self) -> int | None:
        u = self.nvml.used()
        if u is not None:
            with self._lock:
                if self._max is None or u > self._max:
                    self._max = u
        return u

    def take(self) -> int | None:
        """Max used since the last take (including one fresh sample now)."""
        self.sample()
        with self._lock:
            m, self._max = self._max, None
        return m

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
