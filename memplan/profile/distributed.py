"""`memplan profile --num-processes N --strategy fsdp`: real ranks, one run record with every rank's peaks.

The ranks run `runtime.distributed.rank_step` (FSDP2 through accelerate's `fsdp2_prepare_model`, gloo on
CPU), launched with `torch.multiprocessing` spawn (`runtime.distributed.run_ranks`). The record is a
`memplan.run/1` record whose top-level `terms`/`peak` are the busiest rank's (rank 0 unless another is
larger) and whose `ranks` list holds, per rank, its terms, peak, phase peaks, the detail of the
collective buffers and the allocator instrument's figures (torch.profiler's allocator events: the
last step's peak above its start, per phase) -- so each rank is measured twice.

NB: CPU ranks only (gloo): NCCL ranks on CUDA (with NVML per GPU) wait for a machine with GPUs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from ..errors import MemplanError
from ..plan import TrainPlan
from .record import MeasuredRun


def rank_entry(r) -> dict[str, Any]:
    """One rank of the record, in the shape estimate/simulate use for `ranks` ({"rank", "terms", "peak"})."""
    return {"rank": r.rank, "terms": dict(r.terms),
            "peak": {"phase": r.peak_phase, "allocated_bytes": r.peak_bytes},
            "phase_peaks": dict(r.phase_peaks), "comm_detail": dict(r.comm_detail),
            "static_bytes": r.static_bytes, "allocator": dict(r.allocator),
            "tracker_above_start": r.tracker_above_start,
            "tracker_phase_above_start": dict(r.tracker_phase_above_start)}


def profile_distributed(spec: Any, plan: TrainPlan, world: Any, *, steps: int = 2, seed: int = 0,
                        progress: Callable[[str], None] | None = None) -> MeasuredRun:
    """Run `plan` on `world.num_processes` CPU ranks and return one run record with every rank."""
    from ..runtime.distributed import run_ranks
    from datetime import datetime, timezone

    from .runner import model_record, package_versions

    if plan.device != "cpu":
        raise MemplanError("distributed profile runs on the CPU (gloo) only here: pass --device cpu")
    from ..runtime.distributed import unrunnable

    why = unrunnable(world, plan)
    if why is not None:
        raise MemplanError(f"distributed profile cannot run this world: {why}; or use `memplan estimate` (per rank)")
    if progress is not None:
        progress(f"launching {world.num_processes} ranks (gloo)")
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    ranks = run_ranks(dict(spec.config), plan, world, steps=steps, seed=seed)
    busiest = max(ranks, key=lambda r: (r.peak_bytes, -r.rank))
    measured = {"peak": {"phase": busiest.peak_phase, "allocated_bytes": busiest.peak_bytes,
                         "reserved_bytes": None, "device_bytes": None, "step": steps},
                "terms": dict(busiest.terms), "phase_peaks": dict(busiest.phase_peaks), "rank": busiest.rank,
                "instrument": "live-tensor tracker + FSDP2 storage resizes + gloo buffers from allocator events; "
                              "cross-checked per rank with torch.profiler's allocator events"}
    rid = hashlib.sha1(f"{created}{spec.name}{plan}{world}{os.getpid()}".encode()).hexdigest()[:8]
    engine = ("FSDP1 via the Trainer's update_fsdp_plugin_peft + accelerate's FullyShardedDataParallel kwargs"
              if world.fsdp_version == 1 else "FSDP2 via accelerate fsdp2_prepare_model" + (
                  " on a 2-D (replicate, shard) mesh" if world.fsdp_sharding_strategy == "HYBRID_SHARD" else "") + (
                  " with CPUOffloadPolicy (on a CPU rank the host is the device: nothing moves)"
                  if world.fsdp_offload_params else ""))
    notes = ((f"distributed CPU run: {engine}, gloo process group; "
              "`comm_buffers` = unsharded parameters + all-gather/reduce-scatter buffers + gloo's own buffers")
             if world.kind == "fsdp" else
             ("distributed CPU run: DeepSpeed ZeRO-%d engine (deepspeed.initialize as the HF Trainer + accelerate "
              "call it, DS_ACCELERATOR=cpu), gloo process group; `comm_buffers` = ipg reduce buckets + gathered "
              "ZeRO-3 parameters + gloo's own buffers" % world.zero_stage)
             if world.kind == "deepspeed" else
             ("distributed CPU run: DistributedDataParallel as the Trainer wraps a PeftModel, gloo process group; "
              "`comm_buffers` = the reducer's gradient buckets + gloo's own buffers"),)
    return MeasuredRun(model=model_record(spec), plan=plan.to_dict(), device="cpu", status="success",
                       measured=measured, estimate=None, versions=package_versions(), steps=steps, seed=seed,
                       run_id=f"{created.replace('-', '').replace(':', '')}-{rid}", created=created, notes=notes,
                       ranks=tuple(rank_entry(r) for r in ranks), world=world.to_dict())
