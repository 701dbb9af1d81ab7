"""Sharded (multi-process) training steps, measured per rank: FSDP2 through accelerate, on gloo (CPU).

`World` holds the distributed fields of a plan, with the names /work/briefs/dist-fields.md and
accelerate/TrainingArguments use (`World.from_plan(plan)` reads them off a plan that has them).

The step of one rank (`rank_step`) is the single-process step of `runtime.step.run_steps` with the
model sharded the way the HF Trainer + accelerate 1.15 shard it for FSDP2:
- the model is loaded as `runtime.load.load_model` loads it, with
  `BitsAndBytesConfig(bnb_4bit_quant_storage=<16-bit>)` for QLoRA (FSDP-QLoRA needs a floating
  storage: accelerate's `fsdp2_prepare_model` leaves non-floating frozen Params4bit out of the
  sharding), and adapted by `runtime.load.adapt` (prepare, peft, checkpointing);
- `FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=..., cpu_offload=...,
  auto_wrap_policy="transformer_based_wrap")`, with `set_mixed_precision(<mixed_precision>)` as
  `AcceleratorState` does for a bf16/fp16 run (MixedPrecisionPolicy(param_dtype, reduce_dtype,
  output_dtype)); the Trainer's `update_fsdp_plugin_peft` (peft's wrap policy, quant-storage mixed
  precision) runs only when the optimizer creation is delayed, which transformers 5.24
  `Trainer._prepare_for_training` never does for FSDP2;
- accelerate's own `accelerate.utils.fsdp_utils.fsdp2_prepare_model`, called with a stand-in
  accelerator (`_Accel`: the plugin and the few attributes it reads): `fully_shard` per decoder
  layer (`_no_split_modules`), the input embedding, the tail [final norm, lm_head] with
  `reshard_after_forward=False`, then the root;
- the optimizer the Trainer builds for `optim`, over the sharded parameters (what
  `fsdp2_switch_optimizer_parameters` leaves after `accelerator.prepare`), and the forward under
  autocast as accelerate's `native_amp` wraps it.

Also (`shard_model`): FSDP2 HYBRID_SHARD on accelerate's `ParallelismConfig` 2-D mesh (`hsdp_mesh`), FSDP2
CPU offload (CPUOffloadPolicy, unpinned on a CPU rank), FSDP1 as the Trainer + accelerate build it
(`fsdp1_prepare_model`; its flat parameters split by term per rank: `flat_split`). `unrunnable` says in one
line why a world cannot run here and what to run instead.

Two instruments per rank (they must agree): the live-tensor tracker (`tracker.LiveTensorTracker`,
extended here with FSDP2's storage resizes: `fsdp_storage_hooks`) and torch.profiler's CPU allocator
events (`allocator.allocation_events`), which see every alloc/free including `resize_`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import types
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any, Iterator

#: the key of FSDP's collective buffers in per-rank terms (the `comm_buffers` Term of dist-fields.md)
COMM_BUFFERS = "comm_buffers"
#: the unsharded (all-gathered) parameters alive at a moment: part of `comm_buffers` in `terms`,
#: given apart in `comm_detail`
UNSHARDED = "unsharded_params"
#: the buffers a collective allocates for its own duration (gloo on CPU; in `comm_detail`)
GLOO = "gloo_buffers"
#: DDP's gradient buckets (in `comm_detail`)
DDP_BUCKETS = "ddp_buckets"
#: the flat all-gather outputs and reduce-scatter inputs/outputs alive at a moment (in `comm_detail`)
COLLECTIVE = "collective_buffers"


class _WorldMethods:
    """What `World` adds to the distributed fields it takes from `TrainPlan`."""

    def __post_init__(self):
        from ..plan import TrainPlan

        TrainPlan(**self.to_dict())  # the plan's own checks, in the words of the CLI flags

    @classmethod
    def from_plan(cls, plan: Any, **overrides) -> "World":
        """The World of a plan carrying these fields (missing ones take the defaults)."""
        kw = {f.name: getattr(plan, f.name) for f in fields(cls) if hasattr(plan, f.name)}
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kind(self) -> str:
        """The strategy in effect: "auto" is single for one process, ddp otherwise."""
        if self.strategy == "auto":
            return "single" if self.num_processes == 1 else "ddp"
        return self.strategy

    @property
    def runs_real(self) -> bool:
        """Whether the real ranks (`run_ranks`) cover this world (`unrunnable` says why not): DDP, FSDP2
        FULL_SHARD / SHARD_GRAD_OP / HYBRID_SHARD (2-D mesh) with or without CPU offload, FSDP1 FULL_SHARD /
        SHARD_GRAD_OP / NO_SHARD without CPU offload, DeepSpeed ZeRO-2/3 without offload_param."""
        return unrunnable(self) is None

    @property
    def traces_meta(self) -> bool:
        """Whether the meta trace (`simulate.distributed`) covers this world: the real ranks' worlds but
        DeepSpeed's (`unrunnable(..., meta=True)`)."""
        return unrunnable(self, meta=True) is None

    @property
    def runnable(self) -> bool:
        """Both the real ranks and the meta trace cover this world."""
        return self.runs_real and self.traces_meta

    @property
    def reshard_after_forward(self) -> bool:
        """FSDP2's `reshard_after_forward` for the sharding strategy (accelerate maps FULL_SHARD to True,
        SHARD_GRAD_OP to False)."""
        return self.fsdp_sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")

    def quant_storage(self, plan: Any) -> str:
        """The `bnb_4bit_quant_storage` in effect: "auto" is uint8 for single/ddp and the 16-bit load
        dtype when parameters are sharded (FSDP, ZeRO-3), as FSDP-QLoRA requires."""
        if self.bnb_4bit_quant_storage != "auto":
            return self.bnb_4bit_quant_storage
        sharded = self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)
        return plan.dtype if sharded else "uint8"


def _world_fields() -> list[tuple[str, Any, Any]]:
    from ..plan import DIST_FIELDS, TrainPlan

    return [(f.name, f.type, field(default=f.default)) for f in fields(TrainPlan) if f.name in DIST_FIELDS]


#: how many processes and how the model is spread over them: the distributed fields of `TrainPlan`
#: (accelerate / TrainingArguments names), same names, defaults and checks
World = make_dataclass("World", _world_fields(), bases=(_WorldMethods,), frozen=True)
World.__module__ = __name__


# ---- building the sharded model ----------------------------------------------------------------------
@contextlib.contextmanager
def quant_storage(name: str) -> Iterator[None]:
    """`runtime.load.bnb_config` (used by `load_model` and `simulate.build`) gives
    `bnb_4bit_quant_storage=<name>` inside the block."""
    from . import load

    orig = load.bnb_config

    def bnb_config(plan):
        cfg = orig(plan)
        if name != "uint8" and getattr(cfg, "load_in_4bit", False):
            cfg.bnb_4bit_quant_storage = load.TORCH_DTYPE[name]
        return cfg

    load.bnb_config = bnb_config
    try:
        yield
    finally:
        load.bnb_config = orig


class _Accel(types.SimpleNamespace):
    """What `accelerate.utils.fsdp_utils.fsdp2_prepare_model` reads off its `accelerator`."""


def fsdp_plugin(world: World, plan: Any):
    """The `FullyShardedDataParallelPlugin` accelerate builds for `world` and a `plan` with mixed precision."""
    from accelerate.utils.dataclasses import FullyShardedDataParallelPlugin

    kw: dict[str, Any] = dict(fsdp_version=world.fsdp_version, auto_wrap_policy="transformer_based_wrap",
                              cpu_ram_efficient_loading=False)
    if world.fsdp_transformer_layer_cls_to_wrap:
        kw["transformer_cls_names_to_wrap"] = list(world.fsdp_transformer_layer_cls_to_wrap)
    if world.fsdp_version == 2:
        kw["reshard_after_forward"] = world.reshard_after_forward
        if world.fsdp_offload_params:
            from torch.distributed.fsdp import CPUOffloadPolicy

            # accelerate: CPUOffloadPolicy() (pinned). NB: pinning needs a CUDA (accelerator) runtime; a CPU
            # rank cannot pin (pin_memory raises without one), and pinned or not the bytes are the same
            kw["cpu_offload"] = CPUOffloadPolicy(pin_memory=plan.device != "cpu")
    else:
        kw["sharding_strategy"] = world.fsdp_sharding_strategy
        kw["backward_prefetch"] = world.fsdp_backward_prefetch
        kw["use_orig_params"] = world.fsdp_use_orig_params
        kw["limit_all_gathers"] = world.fsdp_limit_all_gathers
        kw["cpu_offload"] = world.fsdp_offload_params
    plug = FullyShardedDataParallelPlugin(**kw)
    if plan.mixed_precision != "no":  # AcceleratorState: fsdp_plugin.set_mixed_precision(mixed_precision)
        plug.set_mixed_precision(plan.mixed_precision)
    return plug


def unrunnable(world: World, plan: Any = None, meta: bool = False) -> str | None:
    """Why the real ranks (`meta`: the meta trace of `simulate.distributed`) cannot run `world` here (one
    line: why, and what to run instead); None if they can."""
    if world.kind == "ddp":
        return None
    if world.kind == "deepspeed":
        if meta:
            return ("the meta trace covers torch's FSDP and DDP engines, not DeepSpeed's: use `memplan profile "
                    "--device cpu` (real ranks)")
        if world.offload_param_device != "none":
            return ("ZeRO-3 offload_param is not run on CPU ranks here (the parameter partitions would move from "
                    "host to host): drop --offload-param to measure the rest")
        if plan is not None and plan.gradient_accumulation_steps != 1:
            return "DeepSpeed real ranks run one micro-batch a step: use --gradient-accumulation-steps 1"
        return None
    if world.kind != "fsdp":
        return f"the real ranks run DDP, FSDP and DeepSpeed only, not {world.kind}"
    s = world.fsdp_sharding_strategy
    if world.fsdp_version == 2 and s == "NO_SHARD":
        return ("FSDP2 has no NO_SHARD (transformers refuses fsdp=no_shard with FSDP2; accelerate to-fsdp2 maps it "
                "to reshard_after_forward=False, i.e. SHARD_GRAD_OP): use --fsdp-version 1 or --strategy ddp")
    if world.fsdp_version == 2 and s == "HYBRID_SHARD" and (world.num_machines < 2 or
                                                            world.num_processes % world.num_machines
                                                            or world.num_processes // world.num_machines < 2):
        return ("FSDP2 HYBRID_SHARD needs a 2-D mesh (replicate = --num-machines >= 2, shard = ranks per node >= 2): "
                "use e.g. --num-processes 4 --num-machines 2")
    if world.fsdp_version == 1 and world.fsdp_offload_params:
        return ("FSDP1 CPU offload pins its host shards (FlatParamHandle: pin_memory), which needs an accelerator: a "
                "CPU rank cannot run it ('Cannot access accelerator device'); use --fsdp-version 2 (CPUOffloadPolicy)")
    if world.fsdp_version == 1 and plan is not None and plan.method == "qlora" and plan.prepare:
        return ("FSDP1 flattens a unit's parameters into one flat parameter of one dtype, and "
                "prepare_model_for_kbit_training's fp32 norms beside the 16-bit 4-bit storage fail ('Must flatten "
                "tensors with uniform dtype'): add --no-prepare (as FSDP-QLoRA recipes do) or use --fsdp-version 2")
    if world.fsdp_version == 1 and s == "HYBRID_SHARD":
        return ("FSDP1 HYBRID_SHARD on CPU: accelerate passes no device mesh and FSDP1 takes a node's size from the "
                "device count (1 for CPU), so the CPU ranks cannot form 2 nodes: use --fsdp-version 2 (a 2-D mesh)")
    return None


def shard_model(model, world: World, plan: Any, rank: int = 0):
    """Shard `model` as `accelerator.prepare` does: FSDP2 (accelerate's `fsdp2_prepare_model`, HYBRID_SHARD on
    the 2-D mesh of `hsdp_mesh`), FSDP1 (`fsdp1_prepare_model`) or DDP."""
    import torch
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    why = unrunnable(world, plan)
    if why is not None:
        raise NotImplementedError(why)
    if world.kind == "ddp":
        return wrap_ddp(model, world)
    if world.fsdp_version == 1:
        return fsdp1_prepare_model(model, world, plan)
    plug = fsdp_plugin(world, plan)
    mesh = pc = None
    if world.fsdp_sharding_strategy == "HYBRID_SHARD":
        mesh, pc = hsdp_mesh(world)
    acc = _Accel(state=types.SimpleNamespace(fsdp_plugin=plug), is_main_process=rank == 0,
                 mixed_precision=plan.mixed_precision, device=torch.device("cpu"), torch_device_mesh=mesh,
                 parallelism_config=pc)
    return fsdp2_prepare_model(acc, model)


def hsdp_mesh(world: World):
    """FSDP2 HYBRID_SHARD as accelerate builds it: `ParallelismConfig(dp_replicate_size=<nodes>,
    dp_shard_size=<ranks per node>)` and its `build_device_mesh` (a 2-D mesh ("dp_replicate", "dp_shard"),
    flattened "dp_shard_cp"); `fsdp2_prepare_model` shards on `mesh[fsdp_dim_names]`
    (("dp_replicate", "dp_shard_cp")): parameters sharded within a node, replicated across nodes, gradients
    reduce-scattered within the node then all-reduced across nodes."""
    from accelerate.parallelism_config import ParallelismConfig

    n = world.num_machines
    pc = ParallelismConfig(dp_replicate_size=n, dp_shard_size=world.num_processes // n)
    return pc.build_device_mesh("cpu"), pc


def fsdp1_prepare_model(model, world: World, plan: Any):
    """FSDP1 as the HF Trainer + accelerate 1.15 build it (the optimizer is created after the model is
    wrapped: transformers 5.24 `Trainer._prepare_for_training`, delay_optimizer_creation for FSDP1):
    `update_fsdp_plugin_peft` (peft's `fsdp_auto_wrap_policy`: decoder layers and every LoRA module are
    units; QLoRA with a floating quant storage: `set_mixed_precision(<storage dtype>, override=True)`), then
    `Accelerator.prepare_model`'s `FullyShardedDataParallel(model, sharding_strategy, cpu_offload,
    auto_wrap_policy, mixed_precision, sync_module_states, backward_prefetch, forward_prefetch,
    use_orig_params, param_init_fn, ignored_modules, limit_all_gathers, device_id=<cpu>)` and its upcast of
    trainable flat parameters that are not fp32 (mixed precision on)."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plug = fsdp_plugin(world, plan)
    if hasattr(model, "active_peft_config"):
        from peft.utils.other import fsdp_auto_wrap_policy

        plug.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        qc = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        storage = getattr(qc, "bnb_4bit_quant_storage", None)
        if getattr(model, "quantization_method", None) == "bitsandbytes" and getattr(storage, "is_floating_point",
                                                                                    False):
            plug.set_mixed_precision(storage, override=True)
    plug.set_auto_wrap_policy(model)
    model = FSDP(model, sharding_strategy=plug.sharding_strategy or plug.reshard_after_forward,
                 cpu_offload=plug.cpu_offload, auto_wrap_policy=plug.auto_wrap_policy,
                 mixed_precision=plug.mixed_precision_policy, sync_module_states=plug.sync_module_states,
                 backward_prefetch=plug.backward_prefetch, forward_prefetch=plug.forward_prefetch,
                 use_orig_params=plug.use_orig_params, limit_all_gathers=plug.limit_all_gathers,
                 device_id=torch.device("cpu"))
    if plan.mixed_precision != "no":
        for m in FSDP.fsdp_modules(model):
            if not m._has_params:
                continue
            p = m._flat_param
            if p.dtype != torch.float32 and p.device != torch.device("meta") and p.requires_grad:
                p.data = p.data.to(torch.float32)
                m._handle._orig_param_dtype = torch.float32
    return model


def wrap_ddp(model, world: World):
    """`DistributedDataParallel` as accelerate (MULTI_CPU: `Accelerator.prepare_model`) builds it from the HF
    Trainer's `DistributedDataParallelKwargs` (transformers 5.24 `Trainer._build_accelerator_args`):
    `find_unused_parameters=True` for a PeftModel (not a PreTrainedModel), `bucket_cap_mb` when given.
    The wrapper forwards `get_output_embeddings` (run_steps hooks lm_head) to the model."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, find_unused_parameters=True, bucket_cap_mb=world.ddp_bucket_cap_mb)
    ddp.get_output_embeddings = model.get_output_embeddings
    return ddp


@contextlib.contextmanager
def ddp_bucket_hook(tracker, model) -> Iterator[None]:
    """Count DDP's gradient buckets: the Reducer allocates them in C++ at construction (no op reaches the
    tracker); a comm hook (the default all-reduce, `torch.distributed.algorithms.ddp_comm_hooks.
    default_hooks.allreduce_hook`) registers each bucket's flat buffer the first time it is reduced."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):  # FSDP1 has a register_comm_hook of its own
        yield
        return
    seen: set[int] = set()

    def hook(state, bucket):
        buf = bucket.buffer()
        key = id(buf.untyped_storage())
        if key not in seen:
            seen.add(key)
            tracker.register(buf, _term_comm(), f"ddp.bucket{bucket.index()}")
        if buf.is_meta:  # simulate: the fake group's future has no value; the hook's in-place div_ only
            import torch

            buf.div_(torch.distributed.get_world_size())
            fut = torch.futures.Future()
            fut.set_result(buf)
            return fut
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, hook)
    yield


def _term_comm():
    from ..terms import Term

    return Term.WORKSPACE  # relabelled `comm_buffers` by comm_terms (name starts "ddp.bucket")


# ---- instrumenting FSDP2 for the live-tensor tracker --------------------------------------------------
def local(t):
    """The local shard of a DTensor (the tensor itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and type(t).__name__ == "DTensor" else t


def register_sharded_model(tracker, model, classify) -> None:
    """`LiveTensorTracker.register_model` for a sharded model: the local shard of every DTensor
    parameter, the quant state that bitsandbytes keeps on each Linear4bit (replicated: FSDP2 shards
    parameters only), buffers."""
    for name, p in model.named_parameters(remove_duplicate=True):
        split = flat_split(name, p, classify)
        if split is not None:  # FSDP1: one flat parameter per unit, its shard split by term (`split_flat`)
            tracker.register(p, max(split, key=split.get), name)
            tracker.flat_split[name] = split
            continue
        tracker.register(local(p), classify(orig_name(name), p), name)
    register_state_and_buffers(tracker, model)


def register_state_and_buffers(tracker, model) -> None:
    """Register what every rank holds whole beside its parameter shards: the quant state bitsandbytes keeps
    on each Linear4bit (a module attribute, not a parameter: FSDP and ZeRO shard parameters only) and the
    module buffers."""
    from ..terms import Term
    from .tracker import quant_state_tensors

    for name, mod in model.named_modules():
        qs = getattr(mod, "quant_state", None) or getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is not None:
            for qname, qt in quant_state_tensors(qs):
                tracker.register(qt, Term.QUANT_STATE, f"{name}.weight.{qname}")
    for name, b in model.named_buffers(remove_duplicate=True):
        tracker.register(b, Term.OTHER_PARAMS, name)


def flat_split(name: str, p, classify) -> dict | None:
    """FSDP1 (`use_orig_params=False`): a FlatParameter holds a unit's parameters flattened and concatenated,
    padded to a multiple of the world size, of which each rank keeps one shard
    (torch/distributed/fsdp/_flat_param.py FlatParamHandle). Its local shard's bytes by Term: each original
    parameter's part of the shard (`_shard_param_infos`), classified by its name; the shard's padding
    (`_shard_numel_padded`) and the alignment padding go to the term of the unit's largest part. None if `p` is
    not a FlatParameter."""
    if not hasattr(p, "_shard_param_infos") or not hasattr(p, "_fqns"):  # FlatParameter is an nn.Parameter
        return None
    prefix = orig_name(name)
    prefix = prefix[:-len("_flat_param")] if prefix.endswith("_flat_param") else prefix
    el = p.element_size()
    out: dict = {}
    for fqn, info in zip(p._fqns, p._shard_param_infos):
        if info.in_shard:
            term = classify(prefix + fqn, None)
            out[term] = out.get(term, 0) + info.numel_in_shard * el
    top = max(out, key=out.get) if out else None
    if top is not None:
        out[top] += p.numel() * el - sum(out.values())
    return out or None


def split_flat(tracker, terms: dict[str, int], at: float) -> None:
    """Move the bytes of FSDP1's flat parameters alive at `at` from the term they were registered under to
    their terms by `flat_split` (in place)."""
    split = getattr(tracker, "flat_split", None)
    if not split:
        return
    for r in tracker.alive_at(at):
        parts = split.get(r.name) if r.op != "resize_" else None
        if parts is None or sum(parts.values()) != r.nbytes:
            continue
        terms[str(r.term)] -= r.nbytes
        for t, b in parts.items():
            terms[str(t)] += b


def sharded_tracker_class():
    """`LiveTensorTracker` for a sharded model: DTensor parameters, gradients and optimizer state are
    registered and labelled by their local shard (`local`)."""
    from .tracker import LiveTensorTracker

    class ShardedTracker(LiveTensorTracker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.flat_split: dict[str, dict] = {}

        def register_model(self, model, classify):
            if not self.records:  # registered once, before the steps (run_steps calls it again)
                register_sharded_model(self, model, classify)

        def label(self, grads=(), optimizer_state=(), vocab_size=None, tokens=None, params=()):
            super().label(grads=[local(g) for g in grads], optimizer_state=[local(t) for t in optimizer_state],
                          vocab_size=vocab_size, tokens=tokens, params=[(n, local(t), c) for n, t, c in params])

    return ShardedTracker


def orig_name(name: str) -> str:
    """A parameter's name as before wrapping (checkpoint and FSDP1 wrappers; DDP's / a DeepSpeed engine's
    `module.`)."""
    name = name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")
    return name[len("module."):] if name.startswith("module.") else name  # DDP's wrapper


def tag_records(tracker, comm: dict[int, str], fn, what: str):
    """`fn` wrapped so that the tracker's records created while it runs are tagged `what` in `comm`
    ({id(record): tag}; a record tagged by an inner wrapped call keeps its tag)."""
    def wrapper(*args, **kwargs):
        n = len(tracker.records)
        try:
            return fn(*args, **kwargs)
        finally:
            comm.update((id(r), what) for r in tracker.records[n:] if id(r) not in comm)
    return wrapper


@contextlib.contextmanager
def fsdp_storage_hooks(tracker) -> Iterator[dict[int, str]]:
    """Tell `tracker` about FSDP2's in-place storage resizes and tag FSDP2's collective buffers.

    FSDP2 (torch/distributed/fsdp/_fully_shard/_fsdp_param.py `alloc_storage`/`free_storage`) frees
    an unsharded parameter with `untyped_storage().resize_(0)` and brings it back with `resize_(n)`:
    no op reaches a dispatch mode and the storage object lives on, so the weakref tracker would keep
    its first size. The two functions are wrapped here (in `_fsdp_param` and `_fsdp_param_group`,
    which imports `alloc_storage`) to call `tracker.resized(storage)` after the resize.

    Records created inside `foreach_all_gather`, `foreach_all_gather_copy_out` and `foreach_reduce`
    (_fsdp_collectives.py, as `_fsdp_param_group` calls them) are yielded ({id: UNSHARDED for the
    per-parameter all-gather outputs made in the copy-out, COLLECTIVE for the flat all-gather output
    and reduce-scatter buffers}), so a caller can label them `comm_buffers` unless they end up
    gradients or parameters; resized storages are the unsharded parameters.
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    from ..simulate.patches import patch_attr

    comm: dict[int, str] = {}

    def resized(fn):
        def wrapper(tensor):
            fn(tensor)
            tracker.resized(tensor.untyped_storage(), tensor)
        return wrapper

    def tagging(fn, what):
        return tag_records(tracker, comm, fn, what)

    with contextlib.ExitStack() as stack:
        # FSDP1 (torch/distributed/fsdp/_flat_param.py): the unsharded flat parameter (`_full_param_padded`)
        # and the low-precision shard copy (`_mp_shard`, mixed precision) are allocated and freed the same way
        # (torch.distributed.utils `_alloc_storage` / `_free_storage`, resizing their storage)
        from torch.distributed.fsdp import _flat_param

        def resized2(fn):
            def wrapper(tensor, *args):
                out = fn(tensor, *args)
                tracker.resized(tensor.untyped_storage(), tensor)
                return out
            return wrapper

        stack.enter_context(patch_attr(_flat_param, "_alloc_storage", resized2(_flat_param._alloc_storage)))
        stack.enter_context(patch_attr(_flat_param, "_free_storage", resized2(_flat_param._free_storage)))
        alloc = resized(_fsdp_param.alloc_storage)
        stack.enter_context(patch_attr(_fsdp_param, "alloc_storage", alloc))
        stack.enter_context(patch_attr(_fsdp_param_group, "alloc_storage", alloc))
        stack.enter_context(patch_attr(_fsdp_param, "free_storage", resized(_fsdp_param.free_storage)))
        for name, what in (("foreach_all_gather", COLLECTIVE), ("foreach_all_gather_copy_out", UNSHARDED),
                           ("foreach_reduce", COLLECTIVE)):
            stack.enter_context(patch_attr(_fsdp_param_group, name, tagging(getattr(_fsdp_param_group, name), what)))
        yield comm


def _gloo_buffer(r) -> bool:
    """A collective's own buffer: kernel workspace seen inside a c10d op (real) or its stand-in (simulate)."""
    return r.op.startswith(("c10d::", "temp:_allgather", "temp:_reduce_scatter", "temp:allreduce"))


def comm_terms(tracker, at: float, comm: dict[int, str]) -> tuple[dict[str, int], dict[str, int]]:
    """Terms alive at `at` with FSDP's buffers under `comm_buffers`; and the detail of those:
    `unsharded_params` (all-gathered parameters: resized storages and all-gather outputs still held)
    and the rest (flat all-gather / reduce-scatter buffers)."""
    from ..terms import Term

    terms = {str(k): 0 for k in Term}
    terms[COMM_BUFFERS] = 0
    detail = {UNSHARDED: 0, COLLECTIVE: 0, GLOO: 0, DDP_BUCKETS: 0}
    keep = {Term.GRADIENTS, Term.OPTIMIZER_STATE, Term.BASE_WEIGHTS, Term.QUANT_STATE, Term.OTHER_PARAMS,
            Term.ADAPTER_WEIGHTS}
    flat = getattr(tracker, "flat_split", {})
    for r in tracker.alive_at(at):
        if r.op == "resize_" and r.name in flat:  # FSDP1's unsharded flat parameter, named after it by `label`
            terms[COMM_BUFFERS] += r.nbytes
            detail[UNSHARDED] += r.nbytes
            continue
        what = (UNSHARDED if r.op == "resize_" else GLOO if _gloo_buffer(r)
                else DDP_BUCKETS if r.name.startswith("ddp.bucket") else comm.get(id(r)))
        if what is not None and r.term not in keep:
            terms[COMM_BUFFERS] += r.nbytes
            detail[what] = detail.get(what, 0) + r.nbytes
        else:
            terms[str(r.term or Term.TEMPORARIES)] += r.nbytes
    split_flat(tracker, terms, at)
    return terms, detail


# ---- one rank's step -------------------------------------------------------------------------------
@dataclass
class RankResult:
    """One rank's last-step peak, by both instruments."""

    rank: int
    peak_bytes: int
    peak_phase: str
    terms: dict[str, int]
    phase_peaks: dict[str, int]
    comm_detail: dict[str, int] = field(default_factory=dict)
    static_bytes: int = 0
    #: torch.profiler's allocator: peak of the last step above what was alive when it began, per phase
    allocator: dict[str, Any] = field(default_factory=dict)
    #: the tracker's same quantity (peak - live at the last step's start), gloo's buffers with their
    #: observed lifetimes (before `rank_step` counts them for the collective's duration only) and every
    #: kernel's internal buffers (oneDNN's in a CPU bf16 mm; left out of the rank's peak and terms)
    tracker_above_start: int = 0
    tracker_phase_above_start: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: the largest storages alive at the peak (tracker)
    top: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: profiler range names marking the tracker's phases (for the allocator instrument)
PHASE_MARK = "memplan.phase:"


def rank_step(rank: int, world: World, config: dict[str, Any], plan: Any, steps: int = 2, seed: int = 0,
              instrument: bool = True) -> RankResult:
    """The sharded training step of this rank (the caller's `_lazy_init` joins the process group when
    `adapt` returns, after the model is loaded).

    `instrument`: also run torch.profiler (allocator events) around the steps, as the second
    instrument. Both measure the last of `steps` steps.
    """
    import torch
    import torch.distributed as dist

    from .allocator import allocation_events, trace_from_events, window
    from .classify import param_classifier
    from .load import adapt, load_model, text_vocab_size
    from .step import make_optimizer, run_steps
    from .tracker import OP_MARK

    ShardedTracker = sharded_tracker_class()
    t0 = time.perf_counter()
    plan = plan.replace(device="cpu")
    with quant_storage(world.quant_storage(plan)):
        model = load_model(config, plan, device="cpu", seed=seed)
    model = adapt(model, plan)
    classify_orig = param_classifier(model)  # the names as before sharding (FSDP2 keeps them)
    hooks, step_plan, backward = fsdp_storage_hooks, plan, None
    if world.kind == "deepspeed":  # runtime/deepspeed.py: the engine as the Trainer + accelerate build it
        from .deepspeed import setup_rank

        model, opt, ShardedTracker, hooks, step_plan, backward = setup_rank(model, world, plan, config, classify_orig)
    else:
        model = shard_model(model, world, plan, rank=rank)
        opt = make_optimizer(model, plan)
    # kernel_workspace: every op runs in a profiler range, so that what a collective allocates inside
    # (gloo's buffers) can be added from the allocator events after the step (see below)
    tracker = ShardedTracker(round_to=1, device="cpu", kernel_workspace=instrument)
    tracker.register_model(model, classify_orig)
    static = tracker.live

    marks: list[Any] = []
    orig_set_phase = tracker.set_phase

    def set_phase(phase):
        orig_set_phase(phase)
        if instrument:
            with torch.profiler.record_function(f"{PHASE_MARK}{phase}"):
                pass

    tracker.set_phase = set_phase
    state = {"win": None, "live0": 0}

    def progress(msg):
        if msg.startswith(f"step {steps}/"):
            state["live0"] = tracker.live
            if instrument:
                state["win"] = window()
                state["win"].__enter__()

    # the step's batch differs per rank (a DistributedSampler's shard); memory does not depend on it
    def step():
        with hooks(tracker) as comm, ddp_bucket_hook(tracker, model):
            comm.update(getattr(tracker, "static_comm", {}))
            res = run_steps(model, step_plan, vocab_size=text_vocab_size(config), steps=steps, device="cpu",
                            optimizer=opt, tracker=tracker, seed=seed + rank, progress=progress, backward=backward)
        if state["win"] is not None:
            state["win"].__exit__(None, None, None)
        return res, comm

    if instrument:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            res, comm = step()
        from .allocator import mark_ranges, window_ranges, with_unseen_frees

        ops = mark_ranges(prof, OP_MARK)
        events = with_unseen_frees(allocation_events(prof, mark=OP_MARK), ops)
        n = len(tracker.records)
        before = (tracker.peak, tracker.peak_at, tracker.peak_phase, dict(tracker.phase_peaks))

        def keep(records) -> None:  # the tracker's records without the added ones not in `records`
            drop = {id(r) for r in tracker.records[n:]} - {id(r) for r in records}
            tracker.records = [r for r in tracker.records if id(r) not in drop]
            tracker.peak, tracker.peak_at, tracker.peak_phase = before[:3]
            tracker.phase_peaks = dict(before[3])
            tracker._recompute_peaks()

        # the collectives' own buffers (gloo allocates inside c10d ops, below the dispatch mode), then every
        # other kernel's internal buffers (oneDNN's inside a CPU bf16 mm): the latter for the cross-check
        # of the two instruments only (the rank's result, like simulate's, leaves kernels' workspace out)
        in_c10d = [any(x.startswith("c10d::") for x in e.scope) for e in events]
        tracker.add_kernel_workspace([e for e, c in zip(events, in_c10d) if e.delta < 0 or c], op_ranges=ops)
        gloo = tracker.records[n:]
        for r in gloo:
            r.op = "c10d::collective"
        tracker.add_kernel_workspace([e for e, c in zip(events, in_c10d) if not c], op_ranges=ops)
        # NB: gloo sometimes drops a collective's buffer (the reduce-scatter's copy of its input, held by
        # the Work) on its worker thread, whose free the profiler does not see: with_unseen_frees puts it
        # before the next allocation at that address; a block never handed out again stays alive to the
        # end for the allocator and in the raw figures below; the rank's result leaves it out
        unseen = [r for r in gloo if r.freed == float("inf")]
        gloo = [r for r in gloo if r.freed != float("inf")]
        # the raw figures (what the allocator saw) for the cross-check of the two instruments ...
        raw_peak = tracker.peak
        # (a buffer made before the last step and still held when it began counts in its start)
        raw_live0 = state["live0"] + sum(r.nbytes for r in tracker.records[n:] if r.alive_at(tracker._reset_clock))
        raw_phase = {k: v.bytes for k, v in tracker.phase_peaks.items()}
        # ... then gloo's buffers only, counted for the collective's duration only. NB: gloo frees its buffer
        # (held by the Work) on whichever thread drops the last reference: right after the op, or when
        # its worker thread next runs (on a loaded CPU, up to its next collective): a scheduling race, so
        # the rank's result counts the deterministic part (simulate does the same)
        held = [r for r in gloo if r.freed > r.created + 0.25]
        for r in held:
            r.freed = r.created + 0.25
        keep(gloo)
        res.peak_bytes, res.peak_phase = tracker.peak, tracker.peak_phase
        res.phase_peaks = {k: v.bytes for k, v in tracker.phase_peaks.items()}
        wins = window_ranges(prof)
        trace = trace_from_events(events, windows=wins, device="cpu")
        marks = _marks(prof)
        allocator = _allocator_phases(trace, events, marks)
        allocator["c10d_unseen_frees"] = len(unseen)
        allocator["c10d_held_past_op"] = len(held)
    else:
        res, comm = step()
        allocator = {}
        raw_peak, raw_phase, raw_live0 = res.peak_bytes, dict(res.phase_peaks), state["live0"]
    terms, detail = comm_terms(tracker, tracker.peak_at, comm)
    dist.barrier()
    return RankResult(rank=rank, peak_bytes=res.peak_bytes, peak_phase=res.peak_phase, terms=terms,
                      phase_peaks=res.phase_peaks, comm_detail=detail, static_bytes=static, allocator=allocator,
                      tracker_above_start=raw_peak - raw_live0,
                      tracker_phase_above_start={k: v - raw_live0 for k, v in raw_phase.items()},
                      top=top_records(tracker, tracker.peak_at, comm),
                      seconds=time.perf_counter() - t0)


def top_records(tracker, at: float, comm: dict[int, str], n: int = 12) -> list[dict[str, Any]]:
    alive = sorted(tracker.alive_at(at), key=lambda r: -r.nbytes)[:n]
    return [{"name": r.name or r.module, "shape": list(r.shape), "dtype": r.dtype, "bytes": r.nbytes,
             "term": str(r.term), "op": r.op, "comm": comm.get(id(r), "resize" if r.op == "resize_" else ""), "phase": r.phase} for r in alive]


def _marks(prof) -> list[tuple[int, str]]:
    """(start ns, phase) of every phase mark (`set_phase` in `rank_step`), in time order."""
    from ..terms import Phase
    from .allocator import window_ranges

    return sorted((t0, str(ph)) for ph in Phase for t0, _t1 in window_ranges(prof, name=f"{PHASE_MARK}{ph}"))


def _allocator_phases(trace, events, marks) -> dict[str, Any]:
    """The allocator's peak above the window's start, overall and per phase (phases from the marks)."""
    from .allocator import UNSEEN_FREE

    evs = [e for e in events if e.device == "cpu"]
    live = 0
    start = None
    per_phase: dict[str, int] = {}
    mi = 0
    phase = "setup"
    w0, w1 = trace.start_ns, trace.end_ns
    for e in evs:
        while mi < len(marks) and marks[mi][0] <= e.ns:
            phase = marks[mi][1]
            mi += 1
        if start is None and e.ns >= w0:
            start = live
        if e.ns > w1:
            break
        live += e.delta
        if start is not None:
            per_phase[phase] = max(per_phase.get(phase, 0), live - start)
    top = [{"bytes": a.nbytes, "op": a.op, "scope": list(a.scope[:4])} for a in trace.top_at_peak(8)]
    c10d: dict[str, list[int]] = {}  # what each collective allocates inside (gloo's own buffers)
    for e in evs:
        op = next((s for s in e.scope if s.startswith("c10d::")), None)
        if op is not None and e.delta > 0 and len(c10d.setdefault(op, [])) < 12:
            c10d[op].append(e.delta)
    # frees the profiler did not report (allocator.with_unseen_frees): the only bytes the two instruments
    # may place differently (the tracker learns of a storage's end from its weakref, on whichever thread)
    unseen = sum(-e.delta for e in evs if e.scope[:1] == (UNSEEN_FREE,) and w0 <= e.ns <= w1)
    return {"peak_above_start": trace.peak_above_start, "phase_above_start": per_phase, "unseen_free_bytes": unseen,
            "n_events": trace.n_events, "top": top, "c10d_allocs": c10d}


# ---- launching the ranks ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: World, config, plan, steps, seed, instrument, port, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if world.kind == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world.num_processes),
                          LOCAL_SIZE=str(world.num_processes))
    try:
        # transformers' save_pretrained (the random checkpoint of load_model) writes config.json on the
        # main process only once a process group exists: load first (in rank_step), then join the group
        dist_init = _lazy_init(rank, world.num_processes)
        with dist_init:
            res = rank_step(rank, world, config, plan, steps=steps, seed=seed, instrument=instrument)
        queue.put((rank, res.to_dict(), None))
    except BaseException as e:  # report to the parent, which raises
        import traceback

        queue.put((rank, None, "".join(traceback.format_exception(e))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _lazy_init(rank: int, world_size: int):
    """Initialise the gloo group right after the model is loaded and adapted (see `_worker`)."""
    import torch.distributed as dist

    from . import load

    orig = load.adapt

    def adapt(model, plan):
        out = orig(model, plan)
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        return out

    load.adapt = adapt
    try:
        yield
    finally:
        load.adapt = orig


def run_ranks(config: dict[str, Any], plan: Any, world: World, steps: int = 2, seed: int = 0,
              instrument: bool = True, timeout: float = 600.0) -> list[RankResult]:
    """Run the sharded step on `world.num_processes` CPU processes (gloo); each rank's result."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, config, plan, steps, seed, instrument, port, queue))
             for r in range(world.num_processes)]
    for p in procs:
        p.start()
    out: dict[int, RankResult] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(out) + len(errors) < len(procs):
        if not queue.empty():
            rank, res, err = queue.get()
            if err is not None:
                errors.append(f"rank {rank}: {err}")
                break
            out[rank] = RankResult(**res)
            continue
        if time.monotonic() > deadline or all(not p.is_alive() for p in procs) and queue.empty():
            errors.append("ranks ended without a result" if time.monotonic() <= deadline else "timed out")
            break
        time.sleep(0.05)
    for p in procs:
        p.join(timeout=5 if not errors else 1)
        if p.is_alive():
            p.terminate()
            p.join()
    if errors:
        raise RuntimeError("distributed step failed: " + errors[0])
    return [out[r] for r in sorted(out)]
