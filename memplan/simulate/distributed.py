"""Simulate one rank of a sharded (FSDP2, FSDP1, DDP) step on the meta device, with torch's fake process group.

`simulate_rank(config, plan, world, rank)` builds the model on meta as `simulate` does, shards it with
accelerate's own `fsdp2_prepare_model` (`runtime.distributed.shard_model`) inside a fake process group
of `world.num_processes` ranks (`torch.distributed.init_process_group("fake", store=FakeStore(), ...)`,
torch/testing/_internal/distributed/fake_pg.py: every collective returns at once, nothing is
communicated), then traces the step of `runtime.step.run_steps` under the tracker with FSDP2's
storage resizes reported (`runtime.distributed.fsdp_storage_hooks`). The real engine does the
sharding, the padding, the all-gather / reduce-scatter buffers and their lifetimes; memplan patches
only what the meta device cannot do (patches D1-D10 below, on top of `simulate.patches`). FSDP2 HYBRID_SHARD
traces on accelerate's 2-D mesh over the fake group, FSDP1 through `runtime.distributed.fsdp1_prepare_model`:

D1. ``FSDPParamGroup._validate_no_meta_params`` (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py,
    called from ``lazy_init`` at the first forward) raises for parameters still on meta ("FSDP parameters
    should be materialized from meta device before training"): a no-op here.
D2. FSDP2 takes its device from the mesh (`_fsdp_init._get_device_from_mesh`: "cpu" for a gloo/fake
    mesh) and allocates the all-gather outputs and reduce-scatter inputs there: it is "meta" here, so
    those buffers are meta tensors that the tracker counts (patched while sharding); the device handle
    for "meta" (streams, events: `torch.distributed.device_mesh._get_device_handle`) is `torch.cpu`'s,
    whose streams are no-ops as on a real CPU rank.
D4. accelerate's `fsdp2_prepare_model` reads `model.state_dict()` (kept for cpu_ram_efficient_loading,
    which it skips for Params4bit models and which the step does not depend on); bitsandbytes' state
    dict calls `.item()`, impossible on meta: the model's `state_dict` returns {} during that call.
D5. DDP (`strategy="ddp"`): `torch.nn.parallel.distributed._verify_param_shape_across_processes` reads the
    gathered shapes with `.item()`: a no-op (one traced rank has nothing to compare).
D6. The optimizer steps on the local shards of the DTensor parameters (`local_optimizer`): what a real
    rank's DTensor dispatch runs, without the sharding propagation that takes minutes on a 70B model.
D7. FSDP2 HYBRID_SHARD (a 2-D mesh): `FSDPParamGroup.post_backward` asserts that `foreach_reduce` returned an
    all-reduce event for a non-CPU device; the meta device's stream (`torch.cpu`'s) records none: the
    all-reduce event is a stand-in (`_NoEvent`) there. The all-reduce input (the reduce-scatter output in
    the reduce dtype) is kept in `_all_reduce_state` as on a real rank.
D8. FSDP2 CPU offload (`fsdp_offload_params`, CPUOffloadPolicy): FSDP2 skips the host copies of meta
    parameters (`FSDPParam._init_sharded_param`: `offload_to_cpu and not is_meta`) but would copy each
    sharded gradient to "cpu" (`foreach_reduce`: impossible from meta) and checks the parameters are on
    CPU (`FSDPParamGroup._validate_cpu_offload_params`, a no-op here): `offload_to_cpu` is cleared on every
    FSDPParam after sharding (`no_offload`). The trace is then the step a CPU rank runs, where offload moves
    nothing (device and host are one: `.to("cpu")` returns the tensor itself); a CUDA plan's split between
    device and host is the estimate's (`host`), not traced.
D9. FSDP1 (`fsdp_version=1`, FullyShardedDataParallel) on meta: `_init_utils._need_to_materialize_module`
    says no (the meta model is not materialised), `_get_compute_device` is "meta" for a meta model (the
    unsharded flat parameters and low-precision shards are meta tensors), the device handle of "meta" is
    the CPU's (`_FSDPDeviceHandle.from_device`), `_runtime_utils._check_flat_params_on_expected_device` is a
    no-op. The warm-up step is traced fully (its fast path left one more tensor per layer saved).
D10. FSDP1 tells storages apart by `data_ptr()` (`_runtime_utils._catch_all_reshard`,
    `_flat_param._same_storage`), which is 0 for every meta tensor: frozen units (no post-backward hook) were
    never resharded at the end of backward. On meta both compare the storages themselves (`_cdata`).
D3. The fake process group's collectives leave their output untouched and allocate nothing. gloo on
    CPU allocates, inside the collective and for its duration only, a buffer the size of the
    all-gather output (`c10d::_allgather_base_`) and one the size of the reduce-scatter input
    (`c10d::_reduce_scatter_base_`) -- measured with the allocator instrument of real 2-rank steps
    (`runtime.distributed`, `allocator.c10d_allocs`) -- so on "cpu" those ops get that buffer as a kernel
    temporary (`gloo_temps`, the tracker's `kernel_temps` hook). NB: gloo's copy of the reduce-scatter
    input belongs to its Work; it is usually freed as the op returns, but when gloo's worker thread drops
    the last reference it lives until that thread runs its next collective (a race, seen on real ranks). NCCL writes into the output directly
    (its own buffers are outside torch's allocator): nothing on "cuda".
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from typing import Any, Iterator


@contextlib.contextmanager
def fake_group(rank: int, world_size: int) -> Iterator[None]:
    """A fake process group of `world_size` ranks, this process being `rank` (destroyed after)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group exists already: simulate_rank needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def meta_fsdp_patches() -> Iterator[None]:
    """Patches D1 and D2 (see the module doc)."""
    import torch
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_init, _fsdp_param_group, _fsdp_state, \
        _fully_shard

    from .patches import patch_attr

    meta = torch.device("meta")

    def device_from_mesh(mesh):
        return meta

    def handle(fn):
        def get(device_type: str = "cuda"):
            if device_type == "meta":
                return torch.cpu
            return fn(device_type)
        return get

    with contextlib.ExitStack() as st:
        st.enter_context(patch_attr(_fsdp_param_group.FSDPParamGroup, "_validate_no_meta_params", lambda self: None))
        st.enter_context(patch_attr(_fully_shard, "_get_device_from_mesh", device_from_mesh))
        # D9: FSDP1 on meta
        from torch.distributed.fsdp import _init_utils, _runtime_utils

        st.enter_context(patch_attr(_init_utils, "_need_to_materialize_module", lambda *a, **k: (False, False)))
        st.enter_context(patch_attr(_runtime_utils, "_check_flat_params_on_expected_device", lambda *a, **k: None))
        compute_device = _init_utils._get_compute_device

        def get_compute_device(module, ignored_params, *args, **kwargs):
            p = next(iter(module.parameters()), None)
            return meta if p is not None and p.is_meta else compute_device(module, ignored_params, *args, **kwargs)

        st.enter_context(patch_attr(_init_utils, "_get_compute_device", get_compute_device))
        from torch.distributed.fsdp import _common_utils

        handle_cls = _common_utils._FSDPDeviceHandle
        from_device = handle_cls.from_device.__func__

        def fsdp1_handle(cls, device):
            return from_device(cls, torch.device("cpu") if device.type == "meta" else device)

        st.enter_context(patch_attr(handle_cls, "from_device", classmethod(fsdp1_handle)))
        # D10: FSDP1 tells storages apart by data_ptr(), 0 for every meta tensor
        from torch.distributed.fsdp import _flat_param

        same = _flat_param._same_storage

        def same_storage(a, b):
            a, b = getattr(a, "_local_tensor", a), getattr(b, "_local_tensor", b)
            if a.is_meta or b.is_meta:
                return a.untyped_storage()._cdata == b.untyped_storage()._cdata
            return same(a, b)

        st.enter_context(patch_attr(_flat_param, "_same_storage", same_storage))
        catch_all = _runtime_utils._catch_all_reshard

        def catch_all_reshard(state):
            h = state._handle
            if h and h.flat_param.is_meta:
                if same_storage(h.flat_param, h.flat_param._local_shard) and not h._skipped_use_sharded_views:
                    return
                _runtime_utils._reshard(state, h, _runtime_utils._should_free_in_backward(state, h))
                return
            catch_all(state)

        st.enter_context(patch_attr(_runtime_utils, "_catch_all_reshard", catch_all_reshard))
        # D8: offload on meta
        st.enter_context(patch_attr(_fsdp_param_group.FSDPParamGroup, "_validate_cpu_offload_params",
                                    lambda self: None))
        # D7: HSDP's all-reduce event on meta
        reduce = _fsdp_param_group.foreach_reduce

        def foreach_reduce(*args, **kwargs):
            out = list(reduce(*args, **kwargs))
            if out[4] is not None and out[5] is None and out[4].is_meta:
                out[5] = _NoEvent()
            return tuple(out)

        st.enter_context(patch_attr(_fsdp_param_group, "foreach_reduce", foreach_reduce))
        # D5: DDP's constructor checks that every rank has the same parameter shapes (an all-gather of
        # the shapes read back with .item()): one simulated rank has nothing to compare
        import torch.nn.parallel.distributed as ddp_mod

        st.enter_context(patch_attr(ddp_mod, "_verify_param_shape_across_processes", lambda *a, **k: None))
        for mod in (_fsdp_param_group, _fsdp_collectives, _fsdp_init, _fsdp_state):
            if hasattr(mod, "_get_device_handle"):
                st.enter_context(patch_attr(mod, "_get_device_handle", handle(mod._get_device_handle)))
        yield


class _NoEvent:
    """Patch D7: a recorded event on the meta device's (no-op) stream."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def gloo_temps() -> dict[str, Any]:
    """Patch D3: the buffers gloo's collectives allocate while they run (CPU ranks), as `kernel_temps`."""
    import torch

    def allgather(output, input, *args, **kwargs):
        return [torch.empty_like(output, device="meta")] if output.is_meta else []

    def reduce_scatter(output, input, *args, **kwargs):
        return [torch.empty_like(input, device="meta")] if input.is_meta else []

    return {"_allgather_base_.default": allgather, "_reduce_scatter_base_.default": reduce_scatter}


def no_offload(model) -> None:
    """Patch D8: FSDP2's parameters on meta do not go to the host (`offload_to_cpu` cleared)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in group.fsdp_params if group is not None else ():
                fp.offload_to_cpu = fp.pin_memory = False


def local_optimizer(opt) -> None:
    """Patch D6: step `opt` on the local shards of its DTensor parameters (in place).

    On a real rank every optimizer op on a DTensor runs the same op on the local shard (pointwise ops on
    Shard(0) parameters): the memory is the local op's. DTensor's sharding propagation of a foreach /
    fused op over ~10^3 tensors costs minutes on a 70B model (torch/distributed/tensor/_sharding_prop.py),
    so the trace runs the optimizer on the local shards directly: the param groups hold each DTensor's
    `_local_tensor` (a stable object, so the state persists across steps), whose `.grad` is the local
    shard of the DTensor's gradient during `step()`; `zero_grad` clears the DTensor gradients too.
    """
    pairs = []
    for g in opt.param_groups:
        locs = []
        for p in g["params"]:
            lt = getattr(p, "_local_tensor", None)
            if lt is None:
                locs.append(p)
                continue
            pairs.append((p, lt))
            locs.append(lt)
        g["params"] = locs
    if not pairs:
        return

    def pre(_opt, _args, _kwargs):
        for p, lt in pairs:
            lt.grad = None if p.grad is None else p.grad._local_tensor

    def post(_opt, _args, _kwargs):
        for _p, lt in pairs:
            lt.grad = None

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    zero_grad = opt.zero_grad

    def zero_all(set_to_none: bool = True):
        zero_grad(set_to_none=set_to_none)
        for p, _lt in pairs:
            p.grad = None

    opt.zero_grad = zero_all


def simulate_rank(config: dict[str, Any], plan: Any, world: Any, rank: int = 0, steps: int = 2,
                  full_warmup: bool = False):
    """Trace rank `rank`'s step of `plan` sharded over `world` on meta; a `runtime.distributed.RankResult`."""
    import torch

    from ..runtime.distributed import RankResult, comm_terms, ddp_bucket_hook, fsdp_storage_hooks, \
        quant_storage, shard_model, sharded_tracker_class, top_records
    from ..runtime.classify import param_classifier
    from ..runtime.load import adapt, text_vocab_size
    from ..runtime.step import run_steps
    from .build import build_meta_model
    from .emulation import MetaEmulation
    from .fastmeta import FAST_KERNELS
    from .kernels import bnb_impls, kernel_temps
    from .patches import build_patches, make_meta_optimizer, step_patches

    t0 = time.perf_counter()
    # DDP: the Reducer rebuilds its buckets after the first backward and the bucket buffers are seen
    # (ddp_bucket_hook) at the first reduction: trace the warm-up step fully
    # FSDP1: the warm-up step's fast path leaves the flat parameters' views in a state that keeps one more
    # tensor per layer saved in the traced step (measured: +262,144 B per layer on the tiny QLoRA plan without
    # checkpointing, against the real ranks): trace it fully too
    full_warmup = full_warmup or world.kind == "ddp" or (world.kind == "fsdp" and world.fsdp_version == 1)
    counted = ("meta", "cpu") if plan.device == "cpu" else ("meta",)
    round_to = 512 if plan.device == "cuda" else 1
    temps = {**kernel_temps(plan.device), **(gloo_temps() if plan.device == "cpu" else {})}
    tracker = sharded_tracker_class()(round_to=round_to, device=counted, bnb_impls=bnb_impls(plan.device),
                                       kernel_temps=temps, fast_kernels=FAST_KERNELS)
    state = {"live0": 0}

    def progress(msg):
        if msg.startswith(f"step {steps}/"):
            state["live0"] = tracker.live

    gc_was = gc.isenabled()
    gc.disable()
    try:
        with warnings.catch_warnings(), fake_group(rank, world.num_processes), build_patches(), \
                meta_fsdp_patches():
            warnings.simplefilter("ignore")
            with quant_storage(world.quant_storage(plan)):
                model = build_meta_model(config, plan)
            with torch.device("meta"):
                model = adapt(model, plan)
            classify = param_classifier(model)
            # D4: fsdp2_prepare_model takes `model.state_dict()` for cpu_ram_efficient_loading (off here:
            # it is skipped for Params4bit models, and loading is not the step); on meta bitsandbytes'
            # state dict reads `.item()` of the nested offset, so it is skipped for the call
            base = model
            base.state_dict = lambda *a, **k: {}
            try:
                model = shard_model(model, world, plan, rank=rank)
            finally:
                del base.state_dict
            if world.kind == "fsdp" and world.fsdp_offload_params:
                no_offload(model)  # D8
            opt = make_meta_optimizer(model, plan, tracker)
            local_optimizer(opt)  # D6
            tracker.register_model(model, classify)
            static = tracker.live
            emu = MetaEmulation(plan.device)
            with fsdp_storage_hooks(tracker) as comm, ddp_bucket_hook(tracker, model):
                res = run_steps(model, plan, vocab_size=text_vocab_size(config), steps=steps, device="meta",
                                round_to=round_to, optimizer=opt, tracker=tracker,
                                step_context=lambda: step_patches(emu, plan.device), progress=progress,
                                fast_warmup=not full_warmup)
    finally:
        if gc_was:
            gc.enable()
    terms, detail = comm_terms(tracker, tracker.peak_at, comm)
    live0 = state["live0"]
    return RankResult(rank=rank, peak_bytes=res.peak_bytes, peak_phase=res.peak_phase, terms=terms,
                      phase_peaks=res.phase_peaks, comm_detail=detail, static_bytes=static,
                      tracker_above_start=res.peak_bytes - live0,
                      tracker_phase_above_start={k: v - live0 for k, v in res.phase_peaks.items()},
                      top=top_records(tracker, tracker.peak_at, comm), seconds=time.perf_counter() - t0)


def simulate_ranks(config: dict[str, Any], plan: Any, world: Any, steps: int = 2, full_warmup: bool = False,
                   ranks: list[int] | None = None):
    """`simulate_rank` for every rank (or the given ones), one after the other in this process."""
    return [simulate_rank(config, plan, world, rank=r, steps=steps, full_warmup=full_warmup)
            for r in (range(world.num_processes) if ranks is None else ranks)]
