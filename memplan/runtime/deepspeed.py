"""DeepSpeed ZeRO-2 / ZeRO-3 ranks on CPU (gloo), built as the HF Trainer + accelerate build them.

`runtime.distributed.rank_step` dispatches here for `strategy="deepspeed"`; the step is
`runtime.step.run_steps` with the engine as the model, `engine.backward` as its `backward` hook and
`EngineOptimizer` (engine.step) as its optimizer.

The engine (transformers 5.24 integrations/deepspeed.py `deepspeed_init`, accelerate 1.15
`Accelerator._prepare_deepspeed`, deepspeed 0.19.8 `deepspeed.initialize`):
- the config accelerate's `DeepSpeedPlugin` writes without a config file (`zero_optimization`: stage,
  offload_optimizer / offload_param devices, stage3_gather_16bit_weights_on_model_save False), with the
  bucket sizes at "auto" as the Trainer's example configs have them, filled by
  `HfTrainerDeepSpeedConfig.trainer_config_finalize` (reduce_bucket_size H*H; ZeRO-3:
  stage3_prefetch_bucket_size int(0.9*H*H), stage3_param_persistence_threshold 10*H) unless the plan
  sets `zero_reduce_bucket_size` & co.; `stage3_max_live_parameters` "auto" is DeepSpeed's default
  (1e9: the Trainer fills no value for it); train_micro_batch_size_per_gpu = batch size,
  gradient_accumulation_steps, gradient_clipping = max_grad_norm (1.0), `bf16.enabled` / `fp16.enabled`
  from the plan's mixed precision (`DeepSpeedPlugin.set_mixed_precision`), `zero_allow_untested_optimizer`;
- the Trainer's optimizer for `optim` (`Trainer.create_optimizer`, over the trainable parameters) passed
  as the client optimizer (the config has no "optimizer": `deepspeed_optim_sched`); with
  offload_optimizer accelerate maps a torch Adam/AdamW to DeepSpeedCPUAdam (`map_pytorch_optim_to_deepspeed`);
- no autocast: accelerate sets `native_amp` only outside DeepSpeed; DeepSpeed casts the module to bf16
  (engine `_configure_distributed_model`: `module.bfloat16()`), so the forward runs on bf16 parameters;
- ZeRO-3 + QLoRA: `bnb_4bit_quant_storage` = the 16-bit dtype (World.quant_storage), so that the packed
  4-bit weights are floating tensors ZeRO-3 partitions. NB the model is loaded whole and partitioned by
  `deepspeed.initialize` (DeepSpeedZeRoOffload converts the existing module's parameters, as
  `zero.Init(module=...)`), not under `zero.Init` at `from_pretrained` (the Trainer's path when the
  HfDeepSpeedConfig exists before loading): the partitions each rank keeps are the same; only the load
  transient differs.

What DeepSpeed allocates is classified by where it is made (`ds_register` at the start, `ds_hooks` during
the step): the fp32 master partition (ZeRO-2 `single_partition_of_fp32_groups`, ZeRO-3
`fp32_partitioned_groups_flat`) and the client optimizer's state over it: optimizer_state; the gradient
partition (ZeRO-2 `averaged_gradients` / the fp32 partition's `.grad`, ZeRO-3 `grad_partitions_flat_buffer`):
gradients; the flat 16-bit parameter partitions: their parameters' terms; the ipg reduce bucket(s), the
gathered ZeRO-3 parameters and the all-gather / reduce-scatter flats: comm_buffers.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (its accelerator is chosen then)

#: DeepSpeed's own default for stage3_max_live_parameters (deepspeed/runtime/zero/config.py)
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
#: the tags of DeepSpeed's buffers (comm_detail of a rank)
IPG = "ipg_buckets"
GATHERED = "gathered_params"


def ds_config(world: Any, plan: Any, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config the HF Trainer + accelerate hand `deepspeed.initialize` for this world."""
    from ..distributed import zero_bucket_values

    b = zero_bucket_values(hidden_size, world)
    zo: dict[str, Any] = {
        "stage": world.zero_stage,
        "offload_optimizer": {"device": world.offload_optimizer_device, "nvme_path": None},
        "offload_param": {"device": world.offload_param_device, "nvme_path": None},
        "stage3_gather_16bit_weights_on_model_save": False,
        "reduce_bucket_size": b["reduce_bucket_size"],
    }
    if world.zero_stage == 3:
        zo["stage3_prefetch_bucket_size"] = b["stage3_prefetch_bucket_size"]
        zo["stage3_param_persistence_threshold"] = b["stage3_param_persistence_threshold"]
        zo["stage3_max_live_parameters"] = b["stage3_max_live_parameters"]
    ga = plan.gradient_accumulation_steps
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.batch_size, "gradient_accumulation_steps": ga,
        "train_batch_size": plan.batch_size * ga * world.num_processes, "gradient_clipping": 1.0,
        "zero_optimization": zo, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 12,
    }
    if plan.mixed_precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif plan.mixed_precision == "fp16":
        cfg["fp16"] = {"enabled": True, "auto_cast": True}
    return cfg


def build_engine(model, optimizer, world: Any, plan: Any, hidden_size: int):
    """`deepspeed.initialize` as accelerate's `_prepare_deepspeed` calls it (model, client optimizer, config)."""
    import deepspeed

    if world.offload_optimizer_device != "none":
        from accelerate.utils.deepspeed import map_pytorch_optim_to_deepspeed

        optimizer = map_pytorch_optim_to_deepspeed(optimizer)
    with _no_shm_comm_op():
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                 config_params=ds_config(world, plan, hidden_size))
    return engine, opt


@contextlib.contextmanager
def _no_shm_comm_op() -> Iterator[None]:
    """DS1: the CPU accelerator's comm backend JIT-builds a shared-memory all-reduce op at init
    (deepspeed/comm/torch.py `TorchBackend.__init__` -> `build_shm_op`: about a minute of C++ compile on a
    fresh machine). Only `inference_all_reduce` (DeepSpeed inference's module_inject) calls it; a training
    step's collectives go through torch.distributed, and the CUDA accelerator has no such op. So the rank
    does without it: the same step, no compile."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (the package's `torch` attribute is torch)
    orig = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = orig


class EngineOptimizer:
    """What `run_steps` calls on its optimizer, for a DeepSpeed engine: `step` is `engine.step()`
    (which also zeroes the gradients), `state` the client optimizer's state over the flat partition."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # engine.step() zeroes the gradients (DeepSpeedEngine._take_model_step)

    @property
    def state(self):
        return self.engine.optimizer.state


def _flat(x) -> list:
    if x is None:
        return []
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return [x]


def static_buffers(engine) -> list[tuple[str, Any, str]]:
    """(name, tensor, term) of what DeepSpeed keeps from `initialize` on: master partitions, gradient
    partitions, ipg buckets (read off the ZeRO optimizer's attributes, deepspeed 0.19.8)."""
    import torch

    from ..terms import Term

    opt = engine.optimizer
    out: list[tuple[str, Any, str]] = []

    def add(attr: str, term: Any) -> None:
        for k, t in enumerate(_flat(getattr(opt, attr, None))):
            if isinstance(t, torch.Tensor) and t.numel():
                out.append((f"zero.{attr}.{k}", t, term))

    add("single_partition_of_fp32_groups", Term.OPTIMIZER_STATE)  # ZeRO-1/2 master
    add("fp32_partitioned_groups_flat", Term.OPTIMIZER_STATE)  # ZeRO-3 master
    add("grad_partitions_flat_buffer", Term.GRADIENTS)  # ZeRO-3
    if getattr(opt, "offload_optimizer", False):  # ZeRO-3 offload: the fp32 master's gradient (pinned, kept)
        for k, g in enumerate(getattr(opt, "fp32_partitioned_groups_flat", None) or []):
            if isinstance(getattr(g, "grad", None), torch.Tensor) and g.grad.numel():
                out.append((f"zero.fp32_partitioned_groups_flat.{k}.grad", g.grad, Term.GRADIENTS))
    add("param_buffer_of_bit16_for_cpu_offload_groups", "comm")  # ZeRO-2 offload: 16-bit staging, made at the step
    for dtype, bucket in (getattr(opt, "ipg_buckets", None) or {}).items():  # ZeRO-3: one flat buffer per dtype
        for k, t in enumerate(_flat(bucket.buffer)):  # ZeRO-2: a list, made at the first backward
            if isinstance(t, torch.Tensor) and t.numel():
                out.append((f"zero.ipg_buckets.{str(dtype).replace('torch.', '')}.{k}", t, "comm"))
    return out


@contextlib.contextmanager
def ds_hooks(tracker, engine=None) -> Iterator[dict[int, str]]:
    """Tag what DeepSpeed makes inside its collectives and buckets during the step: records created in
    ZeRO-3's parameter all-gathers (partitioned_param_coordinator.py
    `PartitionedParameterCoordinator.__all_gather_params`: the gathered parameters and their flat
    buffers: GATHERED; stage3.py `_post_step`: the persistent parameters re-gathered after the step), in the
    reduce paths (ZeRO-3 stage3.py `__reduce_and_partition_ipg_grads`;
    ZeRO-2 stage_1_and_2.py `reduce_ipg_grads`, `average_tensor`: IPG). Yields {id(record): tag}."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    from ..simulate.patches import patch_attr
    from .distributed import tag_records

    comm: dict[int, str] = {}

    def tagging(fn, what):
        return tag_records(tracker, comm, fn, what)

    from deepspeed.runtime.zero import partition_parameters as pp

    PC = ppc.PartitionedParameterCoordinator
    targets = [(stage3.DeepSpeedZeroOptimizer_Stage3, "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads", IPG),
               (stage_1_and_2.DeepSpeedZeroOptimizer, "reduce_ipg_grads", IPG),
               (stage_1_and_2.DeepSpeedZeroOptimizer, "average_tensor", IPG),
               (PC, "_PartitionedParameterCoordinator__all_gather_params", GATHERED),
               # the persistent (small) parameters, all-gathered whole again after every step
               (stage3.DeepSpeedZeroOptimizer_Stage3, "_post_step", GATHERED),
               # the gathered parameter is made when the handle is waited on (torch.cat of the partitions)
               (pp.AllGatherHandle, "wait", GATHERED), (pp.AllGatherCoalescedHandle, "wait", GATHERED)]
    with contextlib.ExitStack() as stack:
        for owner, name, what in targets:
            if hasattr(owner, name):
                stack.enter_context(patch_attr(owner, name, tagging(getattr(owner, name), what)))
        try:
            yield comm
        finally:
            if engine is not None:  # ZeRO-2's ipg buffers are made at the first backward
                for _name, t, _term in static_buffers(engine):
                    rec = tracker._by_id.get(id(t.untyped_storage())) if _term == "comm" else None
                    if rec is not None:
                        comm[id(rec)] = IPG


def register_engine(tracker, engine, classify) -> dict[int, str]:
    """Register what a rank holds after `deepspeed.initialize` (before the steps): each parameter's
    partition (ZeRO-3 `ds_tensor`; the parameter itself at ZeRO-2) and, for ZeRO-3 persistent parameters,
    the whole parameter, in the parameter's term (`classify` on the names before the engine); the quant
    state bitsandbytes keeps on each Linear4bit (replicated); buffers; and `static_buffers`. Returns
    {id(record): tag} of the ipg buckets (comm_buffers)."""
    from ..terms import Term
    from .distributed import orig_name, register_state_and_buffers

    module = engine.module
    for name, p in module.named_parameters(remove_duplicate=True):
        term = classify(orig_name(name), p)
        part = getattr(p, "ds_tensor", None)
        if part is not None and part.numel():
            tracker.register(part, term, f"{name}.ds_tensor")
        if p.numel():
            tracker.register(p.data, term, name)
    register_state_and_buffers(tracker, module)
    comm: dict[int, str] = {}
    for name, t, term in static_buffers(engine):
        if term == "comm":
            tracker.register(t, Term.WORKSPACE, name)
            rec = tracker._by_id.get(id(t.untyped_storage()))
            if rec is not None:
                comm[id(rec)] = IPG
        else:
            tracker.register(t, term, name)
    return comm


def engine_tracker_class():
    """`LiveTensorTracker` for a DeepSpeed engine: `register_model` is `register_engine` (once)."""
    from .tracker import LiveTensorTracker

    class EngineTracker(LiveTensorTracker):
        classify = None
        static_comm: dict[int, str] = {}

        def register_model(self, model, classify):
            if not self.records:
                self.static_comm = register_engine(self, model, self.classify or classify)

    return EngineTracker


def setup_rank(model, world: Any, plan: Any, config: dict[str, Any], classify):
    """(engine, optimizer for run_steps, tracker class, step hooks, plan for run_steps, backward) of one rank."""
    from .distributed import unrunnable
    from .step import make_optimizer

    why = unrunnable(world, plan)
    if why is not None:
        raise NotImplementedError(why)
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    opt = make_optimizer(model, plan)  # Trainer.create_optimizer, before deepspeed.initialize
    engine, _ = build_engine(model, opt, world, plan, hidden)
    cls = engine_tracker_class()
    cls.classify = staticmethod(classify)
    # no autocast: DeepSpeed runs the bf16-cast module (accelerate's native_amp is off under DeepSpeed)
    return (engine, EngineOptimizer(engine), cls, lambda tracker: ds_hooks(tracker, engine),
            plan.replace(mixed_precision="no"), engine.backward)
