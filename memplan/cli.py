"""The `memplan` command line. Each command is a parser, a data function (the Python API) and a printer.

Every MemplanError and every usage error becomes one `memplan: error: <message>` on stderr and exit
status 2; `fit` exits 1 when the plan does not fit. Heavy modules load only inside `simulate`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import warnings
from typing import Any, Callable, Sequence

from . import __version__
from .catalogue import list_gpus, list_models, load_gpu, load_model
from .errors import MemplanError
from .estimate import Estimate, estimate
from .fit import Fit, check_fit
from .headroom import reserve_from_gib
from .optim import OPTIMIZERS
from .plan import (ATTN, DEVICES, DTYPES, FSDP_PREFETCH, FSDP_SHARDING, METHODS, MIXED, OFFLOAD_DEVICES, PADDING,
                   QUANT_STORAGE, QUANTS, STRATEGIES, TRAINERS, TrainPlan, plan_from)
from .present import gib, host_line, pct, plan_dict, plan_lines, rank_lines, reserve_line, share, verdict, world_text
from .units import GiB

EXIT_OK, EXIT_NO_FIT, EXIT_BAD_INPUT = 0, 1, 2
SIM_MISSING = "simulate needs torch, transformers, peft and bitsandbytes: pip install 'memplan[sim]'"


class _UsageError(Exception):
    """An argparse error, turned into `memplan: error: ...` by main()."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--seq-len` must not silently become `--seq-lens`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # never print usage + exit from inside argparse
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# plan flags (DESIGN.md, "The plan")
# ---------------------------------------------------------------------------------------------
_D = TrainPlan()  # the resolved defaults, shown in --help


def _positive_int(text: str) -> int:
    # NB: 0 and negatives parse here so that TrainPlan reports them together with other problems.
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


#: The largest values the CLI accepts: beyond what any GPU could hold (a sequence of 10 million tokens
#: needs terabytes of activations), so a typo (`--batch-size 1000000000`) is an error, not a result.
MAX_BATCH = 1_000_000
MAX_SEQ = 10_000_000
MAX_ACCUM = 1_000_000
_LIMITS = {"batch_size": ("--batch-size", MAX_BATCH), "seq_len": ("--seq-len", MAX_SEQ),
           "gradient_accumulation_steps": ("--gradient-accumulation-steps", MAX_ACCUM)}


def _check_sizes(kwargs: dict[str, Any]) -> None:
    for k, (flag, most) in _LIMITS.items():
        v = kwargs.get(k)
        if isinstance(v, int) and v > most:
            raise MemplanError(f"{flag} {v:,} is beyond what any GPU could hold; give at most {most:,}")


def _check_plan_for_model(spec: Any, plan: TrainPlan) -> None:
    """Problems that need the model: a LoRA rank above the smallest hidden dimension it adapts."""
    if plan.method in ("qlora", "lora"):
        dims = [d for d in (getattr(spec, "hidden_size", 0), getattr(spec, "intermediate_size", 0)) if d]
        if dims and plan.lora_r > min(dims):
            raise MemplanError(f"--lora-r {plan.lora_r} is larger than {spec.name}'s hidden size ({min(dims)}): "
                               f"a rank cannot exceed the layer's dimensions; use e.g. --lora-r 16")


def _check_model_and_plan(args: argparse.Namespace) -> tuple[Any, TrainPlan]:
    """Load MODEL and the plan, and check both, before any work."""
    from .catalogue import resolution_note

    read_config_arg(args)
    spec = load_model(args.model)
    plan = plan_from_args(args)
    _check_plan_for_model(spec, plan)
    note = resolution_note(args.model)
    if note:
        print(f"memplan: note: {note}", file=sys.stderr)
    return spec, plan


class _Group:
    """An argument group that skips the flags a command replaces with its own (report's grids)."""

    def __init__(self, group: Any, exclude: Sequence[str]):
        self._g, self._exclude = group, set(exclude)

    def add_argument(self, flag: str, *aliases: str, **kw: Any) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        if dest not in self._exclude:
            self._g.add_argument(flag, **kw)
            for a in aliases:  # HF / TRL spellings, accepted but not listed in --help
                self._g.add_argument(a, **{**kw, "dest": kw.get("dest", dest), "help": argparse.SUPPRESS})


def add_plan_flags(p: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """Flags for every TrainPlan field; each defaults to None so an unset flag keeps TrainPlan's default.
    `exclude`: TrainPlan field names to leave out."""
    g = _Group(p.add_argument_group("plan (defaults: today's common HF QLoRA recipe)"), exclude)
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument("--method", choices=METHODS, help=f"training method (default {_D.method})")
    g.add_argument("--quant", choices=QUANTS, help="base weight quantization (default nf4 for qlora, none otherwise)")
    g.add_argument("--double-quant", action=bool_flag, default=None,
                   help="bitsandbytes nested quantization of the absmax constants (default on)")
    g.add_argument("--compute-dtype", choices=DTYPES, help=f"bnb_4bit_compute_dtype (default {_D.compute_dtype})")
    g.add_argument("--dtype", choices=DTYPES, help=f"load dtype of unquantized weights (default {_D.dtype})")
    g.add_argument("--prepare", action=bool_flag, default=None,
                   help="run prepare_model_for_kbit_training; --no-prepare skips it (default on for qlora)")
    g.add_argument("--lora-r", "--lora_r", type=_positive_int, metavar="R", help=f"LoRA rank (default {_D.lora_r})")
    g.add_argument("--lora-alpha", "--lora_alpha", type=_positive_int, metavar="A",
                   help=f"LoRA alpha (default {_D.lora_alpha})")
    g.add_argument("--lora-dropout", "--lora_dropout", type=float, metavar="P",
                   help=f"LoRA dropout (default {_D.lora_dropout})")
    g.add_argument("--adapter-dtype", choices=DTYPES,
                   help="dtype of the LoRA adapters, their gradients and torch optimizer state: fp32 is peft's "
                        "get_peft_model(autocast_adapter_dtype=True); bf16/fp16 for pure 16-bit training "
                        f"(autocast_adapter_dtype=False, or the model cast after get_peft_model) (default {_D.adapter_dtype})")
    g.add_argument("--target-modules", metavar="MODS",
                   help="LoRA targets: all-linear (peft: every Linear but the output layer) or a comma-separated "
                        "list like q_proj,v_proj (default all-linear)")
    g.add_argument("--batch-size", "--per_device_train_batch_size", "--per-device-train-batch-size",
                   "--batch_size", type=_positive_int, metavar="N",
                   help=f"per-device micro-batch size (default {_D.batch_size})")
    g.add_argument("--seq-len", "--max-seq-length", "--max_seq_length", "--max_length", "--max-length", "--seq_len",
                   type=_positive_int, metavar="N",
                   help=f"tokens per sequence (default {_D.seq_len}; TRL's --max_seq_length/--max_length also work)")
    g.add_argument("--gradient-accumulation-steps", "--gradient_accumulation_steps", type=_positive_int, metavar="N",
                   help=f"micro-batches per optimizer step (default {_D.gradient_accumulation_steps})")
    g.add_argument("--gradient-checkpointing", action=bool_flag, default=None,
                   help="activation checkpointing, non-reentrant as the HF Trainer sets it (default on)")
    g.add_argument("--gradient-checkpointing-kwargs", "--gradient_checkpointing_kwargs", type=_gc_kwargs,
                   metavar="JSON", dest="use_reentrant",
                   help='TrainingArguments.gradient_checkpointing_kwargs, e.g. \'{"use_reentrant": true}\' '
                        "(reentrant checkpointing, as older recipes and the FSDP-QLoRA script pass; "
                        "default non-reentrant)")
    g.add_argument("--optim", metavar="NAME",
                   help=f"HF TrainingArguments.optim name (default {_D.optim}); one of: {', '.join(OPTIMIZERS)}")
    g.add_argument("--attn-implementation", choices=ATTN,
                   help=f"attention kernel (default {_D.attn_implementation})")
    g.add_argument("--padding", choices=PADDING,
                   help="batches padded by the collator (to the longest row or to max_length, with an "
                        "attention_mask: transformers then builds [batch x 1 x seq x seq] masks) or none "
                        f"(unpadded or packed rows, no mask) (default {_D.padding})")
    g.add_argument("--packing", action=bool_flag, default=None,
                   help="TRL packing: each row holds seq_len tokens of several sequences, position ids restarting "
                        "at each (SDPA/eager: block-diagonal masks; flash_attention_2: varlen) (default off)")
    g.add_argument("--padding-free", "--padding_free", action=bool_flag, default=None,
                   help="TRL padding_free / DataCollatorWithFlattening: the micro-batch flattened into one row of "
                        "batch x seq_len tokens; meant for --attn-implementation flash_attention_2 (default off)")
    g.add_argument("--mixed-precision", choices=MIXED,
                   help=f"HF Trainer autocast: bf16=True, fp16=True, or no (default {_D.mixed_precision}; "
                        "the HF flags --bf16 and --fp16 also work)")
    g.add_argument("--bf16", dest="mixed_precision", action="store_const", const="bf16", help=argparse.SUPPRESS)
    g.add_argument("--fp16", dest="mixed_precision", action="store_const", const="fp16", help=argparse.SUPPRESS)
    g.add_argument("--device", choices=DEVICES, help=f"device the step runs on (default {_D.device})")
    g.add_argument("--activation-offloading", "--activation_offloading", action=bool_flag, default=None,
                   help="TRL SFTConfig activation_offloading: saved tensors go to host memory during the step "
                        "(the result gains a host RAM figure) (default off)")
    g.add_argument("--checkpoint-offload", action=bool_flag, default=None,
                   help="axolotl gradient_checkpointing: offload: the checkpointed layers' inputs go to host "
                        "memory; needs --gradient-checkpointing (default off)")
    g.add_argument("--trainer", choices=TRAINERS,
                   help="whose training step: trainer (transformers' Trainer: full [tokens x vocab] logits) or "
                        "sft (TRL's SFTTrainer: its fused LM head projects in [4096 x 32768] tiles, no full "
                        f"logits) (default {_D.trainer})")
    g.add_argument("--use-liger-kernel", "--use_liger_kernel", action=bool_flag, default=None,
                   help="Liger kernels as the HF Trainer applies them (use_liger_kernel=True): the family's defaults, "
                        "e.g. llama: fused linear cross-entropy (no [tokens x vocab] logits), RMSNorm, RoPE, SwiGLU "
                        "(default off)")
    g.add_argument("--liger-kernels", dest="liger_kernel_config", metavar="NAMES",
                   help="exactly these Liger kernels, comma-separated (implies --use-liger-kernel): "
                        "fused_linear_cross_entropy, rms_norm, rope, swiglu, geglu, layer_norm, cross_entropy")
    g.add_argument("--liger-kernel-config", "--liger_kernel_config", dest="liger_kernel_config", type=_liger_json,
                   metavar="JSON", help='TrainingArguments.liger_kernel_config: overrides of the family\'s defaults, '
                                        'e.g. \'{"rope": false}\'')
    add_distributed_flags(p, exclude)


def add_distributed_flags(p: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """Flags of the distributed plan fields (accelerate / TrainingArguments names; memplan.distributed)."""
    g = _Group(p.add_argument_group("distributed (default: one process, one GPU)"), exclude)
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument("--num-processes", "--num_processes", "--nproc-per-node", type=_positive_int, metavar="N",
                   help="total processes (GPUs) of the job, accelerate's num_processes (default 1)")
    g.add_argument("--num-machines", "--num_machines", "--nnodes", type=_positive_int, metavar="N",
                   help="nodes; processes per node = num_processes / num_machines (default 1)")
    g.add_argument("--strategy", choices=STRATEGIES,
                   help="auto (single for one process, ddp otherwise), single, ddp, fsdp or deepspeed (default auto)")
    g.add_argument("--fsdp-version", "--fsdp_version", type=int, choices=(1, 2), help="FSDP1 or FSDP2 (default 2)")
    g.add_argument("--fsdp-sharding-strategy", "--fsdp_sharding_strategy", type=str.upper, choices=FSDP_SHARDING,
                   help="FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD (default FULL_SHARD)")
    g.add_argument("--fsdp-backward-prefetch", "--fsdp_backward_prefetch", type=str.upper, choices=FSDP_PREFETCH,
                   help="FSDP1 backward prefetch (FSDP2 always prefetches one unit) (default BACKWARD_PRE)")
    g.add_argument("--fsdp-use-orig-params", action=bool_flag, default=None, help="FSDP1 use_orig_params")
    g.add_argument("--fsdp-limit-all-gathers", action=bool_flag, default=None,
                   help="FSDP1 limit_all_gathers: the rate limiter of in-flight all-gathers (default on)")
    g.add_argument("--fsdp-cpu-ram-efficient-loading", action=bool_flag, default=None,
                   help="load the model on each node's local rank 0 only (host RAM) (default on)")
    g.add_argument("--cpu-offload", action="store_true", default=None,
                   help="CPU offload: FSDP offload_params; DeepSpeed offload_optimizer (and offload_param at ZeRO-3)")
    g.add_argument("--fsdp-offload-params", "--fsdp_offload_params", action=bool_flag, default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--zero-stage", "--zero_stage", type=int, choices=(2, 3), help="DeepSpeed ZeRO stage (default 3)")
    g.add_argument("--offload-optimizer", dest="offload_optimizer_device", choices=OFFLOAD_DEVICES,
                   help="DeepSpeed zero_optimization.offload_optimizer.device (default none)")
    g.add_argument("--offload-param", dest="offload_param_device", choices=OFFLOAD_DEVICES,
                   help="DeepSpeed ZeRO-3 zero_optimization.offload_param.device (default none)")
    for flag, what in (("reduce-bucket-size", "zero_optimization.reduce_bucket_size (auto: hidden^2)"),
                       ("stage3-prefetch-bucket-size", "zero_optimization.stage3_prefetch_bucket_size "
                                                       "(auto: 0.9 hidden^2)"),
                       ("stage3-param-persistence-threshold", "zero_optimization.stage3_param_persistence_threshold "
                                                              "(auto: 10 hidden)"),
                       ("stage3-max-live-parameters", "zero_optimization.stage3_max_live_parameters "
                                                      "(auto: DeepSpeed's 1e9)")):
        g.add_argument(f"--zero-{flag}", f"--zero_{flag.replace('-', '_')}", metavar="ELEMENTS",
                       help=f"DeepSpeed {what}: 'auto' or a number of elements (default auto)")
    g.add_argument("--bnb-4bit-quant-storage", "--bnb_4bit_quant_storage", type=str.lower,
                   choices=QUANT_STORAGE + ("bfloat16", "float16", "float32"),
                   help="dtype that holds the packed 4-bit weights: auto (uint8 on one GPU and DDP, the 16-bit "
                        "load dtype for FSDP/ZeRO, which FSDP-QLoRA needs), uint8, bf16, fp16, fp32")
    g.add_argument("--ddp-bucket-cap-mb", "--ddp_bucket_cap_mb", type=float, metavar="MiB",
                   help="DDP gradient bucket size, TrainingArguments ddp_bucket_cap_mb (default 25)")
    g.add_argument("--fsdp-transformer-layer-cls-to-wrap", "--fsdp_transformer_layer_cls_to_wrap", metavar="CLASSES",
                   help="accelerate's fsdp_transformer_layer_cls_to_wrap, comma-separated (default: the model's "
                        "_no_split_modules); e.g. Gemma3DecoderLayer,SiglipEncoderLayer for Gemma 3's multimodal "
                        "checkpoints")


def _gc_kwargs(text: str) -> bool:
    """`--gradient-checkpointing-kwargs '{"use_reentrant": true}'` -> use_reentrant."""
    import json

    try:
        d = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}; e.g. '{{\"use_reentrant\": true}}'") from None
    if not isinstance(d, dict) or set(d) - {"use_reentrant"} or not isinstance(d.get("use_reentrant", False), bool):
        raise argparse.ArgumentTypeError(f"{text!r}: memplan models only {{\"use_reentrant\": true|false}}")
    return d.get("use_reentrant", False)


def _liger_json(text: str) -> dict:
    """`--liger-kernel-config '{"rope": false}'` -> the dict (kernel names are checked by the plan)."""
    import json

    try:
        d = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}; e.g. '{{\"rope\": false}}'") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: give a JSON object of kernel: true|false, e.g. '{{\"rope\": false}}'")
    return d


def plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the plan flags the user gave (unset ones keep TrainPlan's defaults)."""
    kw = {k: getattr(args, k) for k in TrainPlan.field_names() if getattr(args, k, None) is not None}
    if "liger_kernel_config" in kw and "use_liger_kernel" not in kw:
        kw["use_liger_kernel"] = True  # --liger-kernels names the kernels to use
    if getattr(args, "cpu_offload", None):  # one switch for both engines (accelerate's --cpu-offload words)
        kw.setdefault("fsdp_offload_params", True)
        kw.setdefault("offload_optimizer_device", "cpu")
        if kw.get("zero_stage", TrainPlan.zero_stage) == 3:
            kw.setdefault("offload_param_device", "cpu")
    if isinstance(kw.get("ddp_bucket_cap_mb"), float) and kw["ddp_bucket_cap_mb"].is_integer():
        kw["ddp_bucket_cap_mb"] = int(kw["ddp_bucket_cap_mb"])
    _check_sizes(kw)
    return kw


def read_config_arg(args: argparse.Namespace) -> None:
    """`--config FILE`: read the file once (args.config_read); MODEL defaults to the model it names.
    The plan flags the user typed override the file (unset flags are None: see plan_kwargs)."""
    from .estimate import with_config

    if getattr(args, "config", None) is not None and getattr(args, "config_read", None) is None:
        args.model, args.config_read, _ = with_config(getattr(args, "model", None), args.config)
    elif getattr(args, "model", "") is None:
        raise MemplanError("give MODEL (a catalogue name, hub id or config.json path), or --config FILE "
                           "with a file that names the model")


def plan_from_args(args: argparse.Namespace) -> TrainPlan:
    read_config_arg(args)
    return plan_from(config=getattr(args, "config_read", None), **plan_kwargs(args))


# ---------------------------------------------------------------------------------------------
# data functions (thin wrappers over the API, so tests can call them)
# ---------------------------------------------------------------------------------------------
def estimate_data(args: argparse.Namespace) -> Estimate:
    _check_model_and_plan(args)
    return estimate(args.model, gpu=args.gpu, config=args.config_read, **plan_kwargs(args))


def fit_data(args: argparse.Namespace) -> Fit:
    reserve = reserve_from_gib(args.reserve)
    _check_model_and_plan(args)
    return check_fit(args.model, args.gpu, reserve_bytes=reserve, config=args.config_read,
                     host_ram_bytes=_host_ram(args), **plan_kwargs(args))


def _one_device(command: str, plan: TrainPlan) -> None:
    """simulate and profile run one process here: a distributed plan is `estimate`'s (per rank)."""
    if plan.is_distributed:
        raise MemplanError(f"{command} runs one process; for a distributed plan (--num-processes / --strategy) "
                           "use `memplan estimate` (per rank), or drop the distributed flags")


def _host_ram(args: argparse.Namespace) -> int | None:
    """`--host-ram GiB` (per node) in bytes, or None (host RAM reported, not checked)."""
    v = getattr(args, "host_ram", None)
    if v is None:
        return None
    if not v >= 0 or v == float("inf"):
        raise MemplanError(f"--host-ram must be a non-negative number of GiB, got {v!r}")
    return int(v * GiB)


def recommend_data(args: argparse.Namespace) -> Any:
    from .recommend import DEFAULT_SIMULATE_BUDGET, recommend

    reserve = reserve_from_gib(args.reserve)
    _check_model_and_plan(args)
    return recommend(args.model, args.gpu, reserve_bytes=reserve,
                     simulate_budget=DEFAULT_SIMULATE_BUDGET if args.simulate_budget is None else args.simulate_budget,
                     config=args.config_read, host_ram_bytes=_host_ram(args), **plan_kwargs(args))


def _int_list(flag: str, text: str | None, default: tuple[int, ...], most: int | None = None) -> tuple[int, ...]:
    if text is None:
        return default
    example = ",".join(map(str, default))
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise MemplanError(f"{flag} is empty; give a comma-separated list like {example}")
    if not all(items):
        raise MemplanError(f"{flag} {text!r} has an empty item; give a comma-separated list like {example}")
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        raise MemplanError(f"{flag} takes comma-separated integers, got {text!r}; e.g. {flag} {example}") from None
    bad = [v for v in values if v < 1]
    if bad:
        raise MemplanError(f"{flag} values must be positive integers, got {', '.join(map(str, bad))}")
    big = [v for v in values if most is not None and v > most]
    if big:
        raise MemplanError(f"{flag} value {big[0]:,} is beyond what any GPU could hold; give at most {most:,}")
    return values


def check_out_path(flag: str, out: Any, *, folder: bool) -> None:
    """Fail before any work when `out` cannot be written: a file where a folder is needed (or on the
    way to it), or a place this user may not write. Creates nothing."""
    import os
    from pathlib import Path

    if out is None or not str(out).strip():
        raise MemplanError(f"{flag} is empty; give a path")
    path = Path(os.path.expanduser(str(out)))
    target_dir = path if folder else path.parent
    if folder and path.exists() and not path.is_dir():
        raise MemplanError(f"{flag} {str(path)!r} is a file, not a folder; give a folder")
    if not folder and path.is_dir():
        raise MemplanError(f"{flag} {str(path)!r} is a folder; give a .json file path or a folder without .json")
    probe = target_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MemplanError(f"{flag} {str(path)!r} goes through {str(probe)!r}, which is a file; give a folder path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise MemplanError(f"{flag} {str(path)!r}: cannot write in {str(probe)!r} (permission denied); "
                           "give a path you can write to")


def _name_list(flag: str, text: str | None, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = tuple(t.strip() for t in (text or "").split(",") if t.strip())
    if not items:
        if default is not None and text is None:
            return default
        raise MemplanError(f"{flag} is empty; give a comma-separated list (see `memplan report --help`)")
    return items


def report_data(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything (names, grids, the output folder) before the sweep, then sweep and write."""
    check_out_path("--out", args.out, folder=True)  # before pandas and matplotlib load (seconds)
    reserve = reserve_from_gib(args.reserve)
    from .report import DEFAULT_BATCH_SIZES, DEFAULT_RANKS, DEFAULT_SEQ_LENS, prepare_out_dir, run_report

    models = _name_list("--models", args.models)
    gpus = _name_list("--gpus", args.gpus)
    methods = _name_list("--methods", args.methods, ("qlora",))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise MemplanError(f"--methods: unknown method {', '.join(map(repr, bad))} (known: {', '.join(METHODS)})")
    grids = dict(seq_lens=_int_list("--seq-lens", args.seq_lens, DEFAULT_SEQ_LENS, MAX_SEQ),
                 batch_sizes=_int_list("--batch-sizes", args.batch_sizes, DEFAULT_BATCH_SIZES, MAX_BATCH),
                 ranks=_int_list("--ranks", args.ranks, DEFAULT_RANKS, 65536))
    worlds = _int_list("--num-processes", args.world_list, (1,), 4096)
    strategies = _name_list("--strategy", args.strategy_list, ())
    bad = [st for st in strategies if st not in ("ddp", "fsdp", "deepspeed", "single", "auto")]
    if bad:
        raise MemplanError(f"--strategy: unknown strategy {', '.join(map(repr, bad))} (a grid takes ddp, fsdp, "
                           "deepspeed)")
    if len(worlds) > 1 or len(strategies) > 1:  # a grid over several GPUs (sweep's worlds / strategies)
        if set(strategies) & {"single", "auto"}:
            raise MemplanError("--strategy: a grid over several GPUs takes ddp, fsdp, deepspeed (one GPU is in it "
                               "with --num-processes 1)")
        grids.update(worlds=worlds, strategies=strategies or None)
    else:  # one world: plan fields, as any other command
        args.num_processes = worlds[0] if args.world_list is not None else None
        args.strategy = strategies[0] if strategies else None
    plan_from_args(args)  # the plan flags, checked before any work
    specs = [load_model(m) for m in models]  # unknown names fail here, before any work
    gspecs = [load_gpu(g) for g in gpus]
    for spec in specs:
        for r in grids["ranks"] if "lora" in "".join(methods) else ():
            _check_plan_for_model(spec, TrainPlan(lora_r=r))
        _warn_plan(spec, None, grids["seq_lens"])
    made, before = _report_folder_state(args.out)
    out = prepare_out_dir(args.out, force=args.force)
    with undo_on_interrupt(lambda: _remove_report_output(out, made, before)):
        try:
            return run_report(specs, gspecs, methods=methods, out=out, checked=True,
                              reserve_bytes=reserve, progress=not args.quiet, **grids,
                              **plan_kwargs(args))
        except OSError as e:  # a full disk, a quota, a folder made read-only meanwhile: keep nothing
            _remove_report_output(out, made, before)
            raise MemplanError(f"cannot write the report to {str(out)!r}: {e.strerror or e} (nothing was kept); "
                               "free some space or pass another --out") from None


def _report_folder_state(out: Any) -> tuple[list[Any], set[str] | None]:
    """Before `prepare_out_dir`: the folders it will create (deepest first) and, for an existing folder,
    the names already in it, so that an interrupted report removes exactly what it created."""
    from pathlib import Path

    path = Path(os.path.expanduser(str(out)))
    made = []
    probe = path
    while not probe.exists() and probe.parent != probe:
        made.append(probe)
        probe = probe.parent
    before = {p.name for p in path.iterdir()} if path.is_dir() else None
    return made, before


def _remove_report_output(out: Any, made: list[Any], before: set[str] | None) -> None:
    import shutil
    from pathlib import Path

    path = Path(out)
    if before is not None:  # the folder was there: remove only the files this run added
        for p in path.iterdir():
            if p.name not in before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return
    shutil.rmtree(path, ignore_errors=True)
    for d in made[1:]:  # parents created on the way, if nothing else was put in them meanwhile
        try:
            d.rmdir()
        except OSError:
            break


def models_data() -> list[dict[str, Any]]:
    return [{"name": m.name, "hub_id": m.hub_id, "aliases": list(m.aliases), "architecture": m.architecture,
             "model_type": m.model_type, "params": m.params, "num_layers": m.num_layers,
             "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
             "max_position_embeddings": m.max_position_embeddings}
            for m in list_models()]


def gpus_data() -> list[dict[str, Any]]:
    return [{"name": g.name, "full_name": g.full_name, "aliases": list(g.aliases), "memory_bytes": g.memory_bytes,
             "compute_capability": g.compute_capability, "bf16": g.bf16}
            for g in list_gpus()]


#: What `simulate` traces: stated in its --help and in its error for a config it cannot build.
SIM_COVERS = ("simulate covers causal language models that transformers' AutoModelForCausalLM builds from a "
              "config.json: decoder-only LMs such as llama, mistral, mixtral, qwen2/3, gemma/2/3, phi3 (the closed "
              "form's architectures, with an estimate beside the trace) and gpt2 (Conv1D layers, quantized by "
              "bitsandbytes like Linear), gpt_neox, falcon, opt, bloom (traced without a closed-form estimate); "
              "encoder-decoder configs (t5, bart as seq2seq), vision and audio models are not covered, and an "
              "encoder-only config (bert) runs only as transformers' causal-LM head, not as it is fine-tuned")


def _config_outside_table(model: str, err: MemplanError) -> dict[str, Any]:
    """The raw config.json of a local MODEL whose architecture the closed form does not cover."""
    from pathlib import Path

    path = Path(os.path.expanduser(str(model).strip()))
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise err
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        raise err from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise MemplanError(f"{str(cfg_path)!r} has no model_type; pass a Hugging Face config.json") from None
    cfg.setdefault("_name_or_path", path.name if path.is_dir() else path.parent.name)
    return cfg


def _not_covered(config: dict[str, Any], e: Exception) -> MemplanError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". Should contain")[0]
    return MemplanError(f"model_type {config.get('model_type')!r} cannot be simulated: transformers says "
                        f"{first[:200]!r}; {SIM_COVERS}")


def simulate_data(args: argparse.Namespace) -> dict[str, Any]:
    """Run the meta-device trace; returns the estimate-shaped dict with schema memplan.simulate/1.

    A local config.json outside the closed form's architecture table is traced all the same when
    AutoModelForCausalLM builds it (gpt2, gpt_neox, falcon, ...); otherwise the error says what
    simulate covers (SIM_COVERS)."""
    from .errors import UnsupportedArchitectureError

    config: dict[str, Any] | None = None
    try:
        spec, plan = _check_model_and_plan(args)
    except UnsupportedArchitectureError as e:
        config = _config_outside_table(args.model, e)
        spec, plan = None, plan_from_args(args)
    else:
        _warn_plan(spec, plan)
    try:
        from .simulate import simulate
    except ImportError:
        raise MemplanError(SIM_MISSING) from None
    if plan.is_distributed:
        if spec is None:
            raise MemplanError("a distributed simulate needs a model of the closed form's table; drop the "
                               "distributed flags to trace this one on one device")
        return _simulate_distributed(spec, plan, args)
    read = getattr(args, "config_read", None)
    if spec is not None:  # SimulateResult.to_dict: the trace, and the estimate beside it
        d = simulate(spec, plan, progress=not args.quiet).to_dict()
        if read is not None and read.notes:
            d["notes"] = list(read.notes) + list(d.get("notes") or [])
        return d
    try:
        d = simulate(config, plan, progress=not args.quiet).to_dict()
    except MemplanError as e:
        cause = e.__cause__
        if cause is not None and "Unrecognized" in str(cause):  # no AutoModelForCausalLM class for it
            raise _not_covered(config, cause) from None
        raise
    arch = (config.get("architectures") or [config["model_type"]])[0]
    d["model"] = {"name": config["_name_or_path"], "architecture": arch, "params": None,
                  "model_type": config["model_type"]}
    d["notes"] = list(d.get("notes") or []) + [
        f"model_type {config['model_type']!r} is outside the closed-form estimator's table: the trace only, "
        "no estimate beside it"]
    return d


def _simulate_distributed(spec: Any, plan: TrainPlan, args: argparse.Namespace) -> dict[str, Any]:
    """`simulate --num-processes N --strategy fsdp|ddp`: rank 0's step traced on meta with torch's fake
    process group (memplan.simulate.distributed), beside the per-rank estimate. FSDP2 pads every
    parameter's dim 0 to the world size, so every rank holds the same shapes: one rank is traced."""
    from .runtime.distributed import World, unrunnable
    from .terms import Term
    from .simulate.distributed import simulate_rank

    world = World.from_plan(plan)
    why = unrunnable(world, plan, meta=True)
    if why is not None:
        raise MemplanError(f"simulate cannot trace {world_text(plan.to_dict())}: {why}; or use `memplan estimate` "
                           "(per rank)")
    r = simulate_rank(dict(spec.config), plan, world, rank=0)
    terms = {str(t): 0 for t in Term}
    terms.update({str(k): int(v) for k, v in r.terms.items()})
    est = estimate(spec, plan)
    rank = {"rank": 0, "terms": terms, "peak": {"phase": r.peak_phase, "allocated_bytes": int(r.peak_bytes)}}
    return {"schema": "memplan.simulate/1", "model": spec.to_dict(), "plan": plan.to_dict(), "device": plan.device,
            "gpu": None, "terms": terms,
            "peak": {"phase": r.peak_phase, "allocated_bytes": int(r.peak_bytes), "reserved_bytes": None,
                     "device_bytes": None},
            "phase_peaks": {str(k): int(v) for k, v in r.phase_peaks.items()}, "paged_bytes": 0, "fits": None,
            "headroom_bytes": None, "ranks": [rank],
            "estimate": {"allocated_bytes": est.allocated_bytes,
                         "error_pct": round(100 * (est.allocated_bytes / r.peak_bytes - 1), 4) if r.peak_bytes else None},
            "notes": [f"rank 0 of {world.num_processes} traced on the meta device with torch's fake process group "
                      f"({r.seconds:.1f} s); " + ("every rank holds the same shapes (FSDP2 pads dim 0 to the world size)"
                                                  if world.kind != "fsdp" or world.fsdp_version == 2 else
                                                  "FSDP1: every rank holds the same sizes; the terms of a flat "
                                                  "parameter's shard differ by rank where its boundary falls"),
                      "simulate traces logical bytes; allocator overhead, workspace, CUDA context and NCCL's own "
                      "buffers are not traced"]}


# ---------------------------------------------------------------------------------------------
# printers
# ---------------------------------------------------------------------------------------------
# Numbers and plans are formatted by memplan.present (shared with the report and the profile printers).
def _table(d: dict[str, Any], out: Callable[[str], None], reserve_bytes: int = 0) -> None:
    """The estimate-shaped dict (estimate, fit, simulate) as a table."""
    terms, peak = d["terms"], d["peak"]
    gpu = d.get("gpu")
    m = d["model"]
    where = f" on {gpu['name']} ({gib(gpu['memory_bytes'])} GiB)" if gpu else ""
    params = f", {m['params'] / 1e9:.2f} B params" if m.get("params") else ""
    out(f"{m['name']} ({m['architecture']}{params}){where}")
    out("plan: " + "\n      ".join(plan_lines(d["plan"])))
    out("")
    total = peak["device_bytes"] or peak["allocated_bytes"] or 1
    out(f"{'term':<20} {'GiB':>9} {'share':>7}")
    for name, v in terms.items():
        out(f"{name:<20} {gib(v):>9} {share(v, total):>7}")
    out("-" * 38)
    out(f"peak phase: {peak['phase']}")
    of = f" of {gib(gpu['memory_bytes'])} GiB" if gpu else ""
    for label, key in (("allocated", "allocated_bytes"), ("reserved", "reserved_bytes"), ("device", "device_bytes")):
        if peak.get(key) is not None:
            used = f" ({share(peak[key], gpu['memory_bytes'])})" if gpu else ""
            out(f"{label:<20} {gib(peak[key]):>9} GiB{of}{used}")
    if reserve_bytes:
        out(f"{'reserve kept free':<20} {gib(reserve_bytes):>9} GiB")
    for line in rank_lines(d.get("ranks")):
        out(f"per rank: {line}")
    if d.get("host"):
        out(host_line(d["host"]) + (f" of {gib(d['host_ram_bytes'])} GiB per node -> "
                                    f"{'fits' if d.get('host_fits') else 'DOES NOT FIT'}"
                                    if d.get("host_ram_bytes") else " per node (not checked: --host-ram GiB)"))
    if d.get("headroom_bytes") is not None:
        out(f"{'headroom':<20} {gib(d['headroom_bytes']):>9} GiB  -> {d.get('verdict_text') or verdict(d['fits'])}")
    if d.get("paged_bytes"):
        out(f"{'paged (managed mem)':<20} {gib(d['paged_bytes']):>9} GiB  paged optimizer state, outside the allocator")
    if d.get("estimate"):
        e = d["estimate"]
        out(f"{'closed-form estimate':<20} {gib(e['allocated_bytes']):>9} GiB  "
            f"({pct(e['error_pct'], 3)} vs this trace)")
    if d.get("top"):
        out("largest tensors alive at the peak:")
        for t in d["top"][:8]:
            out(f"  {gib(t['bytes']):>7} GiB  {t['term']:<16} {t['dtype']:<9} {str(tuple(t['shape'])):<20} {t['name']}")
    if d.get("notes"):
        out("notes:")
        for n in d["notes"]:
            out(f"  - {n}")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
_VERDICT_KEYS = ("fits", "verdict", "verdict_text", "blocked", "fix", "paging", "notes")


def estimate_dict(e: Estimate) -> dict[str, Any]:
    """The estimate's --json: with a GPU, the verdict is `fit`'s (one rule: `Fit.of`, no reserve)."""
    d = e.to_dict()
    d["plan"] = plan_dict(e.plan)
    if e.gpu is not None:
        f = Fit.of(e).to_dict()
        d.update({k: f[k] for k in _VERDICT_KEYS})
    return d


def cmd_estimate(args: argparse.Namespace) -> int:
    e = estimate_data(args)
    _warn_plan(e.model, e.plan)
    d = estimate_dict(e)
    _print_json(d) if args.json else _table(d, print)
    return EXIT_OK


def _warn(message: str) -> None:
    print(f"memplan: warning: {message}", file=sys.stderr)


def _warn_plan(model: Any, plan: Any, seq_lens: Sequence[int] | None = None) -> None:
    """Warnings every command prints on stderr: sequences past the model's max_position_embeddings."""
    mpe = getattr(model, "max_position_embeddings", None)
    lens = sorted(set(seq_lens if seq_lens is not None else [plan.seq_len]))
    past = [n for n in lens if mpe and n > mpe]
    if past:
        _warn(f"--seq-len {','.join(map(str, past))} is longer than {model.name}'s max_position_embeddings ({mpe}); "
              "training past it needs RoPE scaling or a long-context variant of the model")


def cmd_fit(args: argparse.Namespace) -> int:
    f = fit_data(args)
    _warn_plan(f.estimate.model, f.estimate.plan)
    d = f.to_dict()
    _print_json(d) if args.json else _table(d, print, reserve_bytes=f.reserve_bytes)
    return EXIT_OK if f.fits else EXIT_NO_FIT


def _recommend_table(r: Any, out: Callable[[str], None]) -> None:
    e, g, p = r.estimate, r.gpu, r.plan
    out(f"{r.model.to_dict()['name']} ({r.model.architecture}, {r.model.params / 1e9:.2f} B params) "
        f"on {g.name} ({gib(g.memory_bytes)} GiB)")
    out("plan: " + "\n      ".join(plan_lines(p)))
    out(reserve_line(r.reserve_bytes))
    out("")
    verdict_text = r.fit.verdict_text if r.fit is not None else verdict(r.fits)
    out(f"as given: {gib(e.device_bytes)} GiB on the device at the peak ({e.peak_phase}), "
        f"headroom {gib(r.headroom_bytes)} GiB -> {verdict_text}")
    if r.run_plan is not None and r.run_plan != r.plan:
        p = r.run_plan
        out(f"with {r.fit.fix}: the limits and changes below are for this plan")
    cap = " (search limit)" if r.max_batch_capped else ""
    mb = ("not searched (see notes)" if r.max_batch_size is None else
          f"{r.max_batch_size}{cap}" if r.max_batch_size else "none (batch 1 does not fit)")
    out(f"largest micro-batch at seq len {p.seq_len}: {mb}")
    cap = " (search limit)" if r.max_seq_len_capped else ""
    ms = ("not searched (see notes)" if r.max_seq_len is None else
          f"{r.max_seq_len} tokens{cap}" if r.max_seq_len else "none (1 token does not fit)")
    out(f"longest seq len at micro-batch {p.batch_size}: {ms}")

    def change(i: int | str, c: Any) -> None:
        out(f"  {i}. {c.summary}: {c.flags}")
        out(f"     -> {gib(c.device_bytes)} GiB, headroom {gib(c.headroom_bytes)} GiB")
        out(f"     cost: {c.cost}")

    paging = r.fit is not None and r.fit.paging
    if not r.fits or paging:
        out("")
        if r.margin_bytes:
            out(f"suggested changes keep at least {gib(r.margin_bytes)} GiB free beyond the reserve (2% of the GPU's "
                "memory: the estimator's error target) and must not page optimizer state")
        ranked = ([r.combined] if r.combined is not None and r.combined.fits else []) + list(r.changes)
        if ranked:
            out("changes that make it fit, cheapest first:")
            for i, c in enumerate(ranked, 1):
                change(i, c)
        elif r.combined is not None:
            out("no change fits on its own; all of them together:")
            out(f"  * {r.combined.flags}")
            out(f"     -> {gib(r.combined.device_bytes)} GiB, headroom {gib(r.combined.headroom_bytes)} GiB"
                f"  (still {verdict(False)})")
        if r.not_enough:
            out("not enough on their own:")
            for c in r.not_enough:
                out(f"  - {c.summary}: {c.flags} -> {gib(c.device_bytes)} GiB, "
                    f"headroom {gib(c.headroom_bytes)} GiB")
    if r.multi_gpu:
        out("")
        out(f"on several {g.name} (per strategy, the fewest GPUs that fit; at the same count the cheapest first: "
            "communication a step, then host RAM; FSDP and ZeRO alike in both: the larger micro-batch, then the "
            "smaller host RAM):")
        for o in r.multi_gpu:
            if o.num_processes is None:
                out(f"  - {o.strategy}: does not fit on up to 64 GPUs" +
                    ("" if r.host_ram_bytes is None else f" with {gib(r.host_ram_bytes)} GiB of host RAM per node"))
                continue
            host = (f"host RAM {gib(o.host_bytes)} GiB per node" +
                    ("" if o.host_fits is None else " (fits)" if o.host_fits else " (DOES NOT FIT)"))
            out(f"  - {o.num_processes} x {g.name}, {o.strategy}: {gib(o.device_bytes)} GiB per GPU, micro-batch "
                f"up to {o.max_batch_size} per GPU, {host}")
            out(f"      {o.flags}")
            out(f"      cost: {o.cost}")
    out("")
    if r.smallest_gpu:
        s = next(f for f in r.gpus if f.name == r.smallest_gpu)
        out(f"smallest catalogue GPU for the plan as given: {s.name} ({gib(s.memory_bytes)} GiB, "
            f"headroom {gib(s.headroom_bytes)} GiB)")
    else:
        out("smallest catalogue GPU for the plan as given: none fits")
    if r.notes:
        out("notes:")
        for n in r.notes:
            out(f"  - {n}")


def cmd_recommend(args: argparse.Namespace) -> int:
    r = recommend_data(args)
    _warn_plan(r.model, r.plan)
    _print_json(r.to_dict()) if args.json else _recommend_table(r, print)
    return EXIT_OK if r.fits else EXIT_NO_FIT


def cmd_report(args: argparse.Namespace) -> int:
    d = report_data(args)
    if args.json:
        _print_json(d)
    else:
        print(f"{d['rows']} rows in {d['seconds']:.1f} s ({d['rows_per_second']:.0f} rows/s)")
        print(f"report: {d['html']}")
        for f in d["files"]:
            print(f"  {f}")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    d = simulate_data(args)
    _print_json(d) if args.json else _table(d, print)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    rows = models_data()
    if args.json:
        _print_json({"schema": "memplan.models/1", "models": rows})
        return EXIT_OK
    print(f"{'name':<24} {'params':>8} {'layers':>6} {'hidden':>6} {'vocab':>7}  hub id")
    for r in rows:
        print(f"{r['name']:<24} {r['params'] / 1e9:>7.2f}B {r['num_layers']:>6} {r['hidden_size']:>6} "
              f"{r['vocab_size']:>7}  {r['hub_id']}")
    return EXIT_OK


def cmd_gpus(args: argparse.Namespace) -> int:
    rows = gpus_data()
    if args.json:
        _print_json({"schema": "memplan.gpus/1", "gpus": rows})
        return EXIT_OK
    print(f"{'name':<16} {'GiB':>7} {'cc':>5} {'bf16':>5}  full name")
    for r in rows:
        print(f"{r['name']:<16} {gib(r['memory_bytes']):>7} {r['compute_capability']:>5} "
              f"{'yes' if r['bf16'] else 'no':>5}  {r['full_name']}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# profile / compare (memplan.profile: real steps on the device, run records)
# ---------------------------------------------------------------------------------------------
def _check_pretrained_source(model: str) -> None:
    """--weights pretrained needs real weights: a local folder must hold a checkpoint (safetensors or
    PyTorch .bin files, sharded or not), a config.json path or catalogue name has none."""
    import os

    path = os.path.expanduser(model)
    if os.path.isdir(path):
        names = os.listdir(path)
        if not any(n.endswith((".safetensors", ".bin")) for n in names):
            raise MemplanError(f"--weights pretrained: {model!r} holds no checkpoint (no *.safetensors or *.bin "
                               "files, only the config); point MODEL at the folder with the weights, or use "
                               "--weights random (memory does not depend on the weights' values)")
    elif path.endswith(".json") or os.path.isfile(path):
        raise MemplanError(f"--weights pretrained needs the folder with the weights, not the file {model!r}; "
                           "or use --weights random")
    elif "/" not in model:
        raise MemplanError(f"--weights pretrained needs a hub id (org/name) or a local folder with the weights, "
                           f"not the catalogue name {model!r}; or use --weights random")


def profile_data(args: argparse.Namespace) -> Any:
    """A MeasuredRun, or a SearchResult with --find-max-batch / --find-max-seq.

    Everything that can be checked is checked before torch loads and before the run: the model, the
    plan, --gpu, --steps, --memory-limit and that --out can be written."""
    import math

    limit = None
    if args.memory_limit is not None:
        if not math.isfinite(args.memory_limit) or args.memory_limit <= 0:
            raise MemplanError(f"--memory-limit must be a finite number of GiB > 0, got {args.memory_limit}")
        limit = int(args.memory_limit * GiB)
    if args.steps is not None and args.steps < 2:
        raise MemplanError(f"--steps must be >= 2, got {args.steps}: the peak is taken over steady-state steps "
                           "(step >= 2, once optimizer state exists); use --steps 2 or more (default 3)")
    if args.granularity is not None and args.granularity < 1:
        raise MemplanError(f"--granularity must be >= 1, got {args.granularity}")
    if args.max_trials < 1:
        raise MemplanError(f"--max-trials must be >= 1, got {args.max_trials}")
    if args.gpu is not None:
        load_gpu(args.gpu)  # an unknown or ambiguous name fails here, not after the run
    if args.weights == "pretrained":
        _check_pretrained_source(args.model)
    spec, plan = _check_model_and_plan(args)
    _warn_plan(spec, plan)
    if args.out is not None:
        folder = args.find_max_batch or args.find_max_seq or not str(args.out).lower().endswith(".json")
        check_out_path("--out", args.out, folder=folder)
    if plan.is_distributed:  # real ranks (memplan.profile.distributed)
        return _profile_distributed(args, spec, plan)
    from .profile.runner import profile
    from .profile.search import find_max

    progress = None if args.quiet else (lambda msg: print(f"memplan: {msg}", file=sys.stderr, flush=True))
    try:  # transformers' own "Loading weights" bars; memplan prints its progress unless --quiet
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if progress is not None:
        _profile_notice(spec, plan_from_args(args), args, progress)
    common = dict(weights=args.weights, memory_limit_bytes=limit, track=not args.no_track, seed=args.seed,
                  progress=progress, gpu=args.gpu)
    dim = "batch_size" if args.find_max_batch else "seq_len" if args.find_max_seq else None
    if dim is not None:
        return find_max(args.model, plan_from_args(args), dimension=dim, steps=args.steps or 2,
                        granularity=args.granularity, max_trials=args.max_trials, out=args.out, **common)
    return profile(args.model, plan_from_args(args), steps=args.steps or 3, out=args.out, **common)


def _profile_distributed(args: argparse.Namespace, spec: Any, plan: TrainPlan) -> Any:
    """`profile --num-processes N`: one run record with every rank (memplan.profile.distributed)."""
    from .profile.distributed import profile_distributed
    from .runtime.distributed import World
    from .profile.record import write_run

    if args.find_max_batch or args.find_max_seq:
        raise MemplanError("--find-max-batch/--find-max-seq run on one process; drop --num-processes")
    progress = None if args.quiet else (lambda msg: print(f"memplan: {msg}", file=sys.stderr, flush=True))
    run = profile_distributed(spec, plan, World.from_plan(plan), steps=args.steps or 2, seed=args.seed,
                              progress=progress)
    if args.out is not None:
        write_run(run, args.out)
    if not args.json:
        for r in run.ranks:
            print(f"rank {r['rank']}: peak {r['peak']['allocated_bytes']:,} B ({r['peak']['phase']}); allocator "
                  f"instrument {r['allocator'].get('peak_above_start', 0):,} B above the step's start, tracker "
                  f"{r['tracker_above_start']:,} B", file=sys.stderr)
    return run


#: a CPU's effective rate on a QLoRA step (bf16 autocast, 4-bit dequantize): ~1B params x 2048 tokens
#: took ~10 min a step on a 2-core runner. A rough figure: the notice says "roughly".
CPU_FLOPS = 3e10


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _profile_notice(spec: Any, plan: TrainPlan, args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """Say up front what profile will write and, on the CPU, roughly how long the steps take."""
    if args.weights == "random":
        try:
            from .profile.weights import checkpoint_notice

            note = checkpoint_notice(dict(spec.config), plan.dtype, args.seed, int(spec.params))
        except ImportError:
            note = None
        if note:
            say(note)
    if plan.device == "cpu":
        steps = args.steps or (2 * min(args.max_trials, 12) if (args.find_max_batch or args.find_max_seq) else 3)
        flops = 6 * spec.params * plan.batch_size * plan.seq_len * (4 / 3 if plan.gradient_checkpointing else 1)
        secs = steps * flops / CPU_FLOPS
        span = f"{secs / 60:.0f} min" if secs >= 90 else f"{max(secs, 1):.0f} s"
        say(f"{steps} CPU step(s) of {_count(spec.params)} params x {plan.batch_size * plan.seq_len} tokens: "
            f"roughly {span} (plus loading); Ctrl-C stops it")


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile.compare import print_run, print_search
    from .profile.search import SearchResult

    res = profile_data(args)
    if isinstance(res, SearchResult):
        _print_json(res.to_dict()) if args.json else print_search(res)
        return EXIT_OK if res.largest > 0 else EXIT_NO_FIT
    _print_json(res.to_dict()) if args.json else print_run(res)
    if args.out and not args.json:
        from .profile.record import run_filename

        path = args.out if str(args.out).lower().endswith(".json") else f"{args.out.rstrip('/')}/{run_filename(res)}"
        print(f"run record written to {path}")
    return EXIT_OK if res.status == "success" else EXIT_NO_FIT


def cmd_compare(args: argparse.Namespace) -> int:
    from .profile.compare import compare_runs, print_compare

    from .profile.record import run_paths

    if not run_paths(args.runs):
        raise MemplanError(f"no run records (*.json) in {', '.join(map(repr, args.runs))}; pass RUN.json files or a "
                           "folder written by `memplan profile --out`, such as profiles/runs")
    rows = compare_runs(args.runs, stored=args.stored)
    _print_json({"schema": "memplan.compare/1", "runs": rows}) if args.json else print_compare(rows)
    return EXIT_OK


PROFILE_CACHE_HELP = (
    "Checkpoint cache: --weights random writes a checkpoint of random weights (safetensors, about 2 bytes per "
    "parameter in bf16/fp16, 4 in fp32: ~2.5 GB for a 1B model, ~16 GB for 8B) once per config and dtype into "
    "$MEMPLAN_CACHE_DIR/random-weights (default $XDG_CACHE_HOME/memplan, else ~/.cache/memplan) and reuses it; "
    "profile says on stderr what it will write before it writes it. Delete the folder to reclaim the space. "
    "On the CPU, steps of a 1B model at seq 2048 take minutes each: start with --seq-len 128 or a small model.")


MODEL_HELP = ("catalogue name or alias (see `memplan models`), Hugging Face repo id, "
              "or a path to a directory or config.json")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memplan",
        description="GPU memory for QLoRA/LoRA fine-tuning: where every byte of a training step goes, "
                    "and whether it fits.",
        epilog="Run `memplan COMMAND --help` for the plan flags. Exit status: 0 ok (fit, recommend: fits), "
               "1 does not fit, 2 bad input.")
    parser.add_argument("--version", action="version", version=f"memplan {__version__}")
    parser.commands = {}  # type: ignore[attr-defined]  # name -> subparser, for "did you mean" on flags
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help_: str, *, model: bool = True,
                plan: bool = True, config: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        parser.commands[name] = p
        if model:
            if config:
                p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                               help=MODEL_HELP + "; may be left out when --config names the model")
            else:
                p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
        if plan:
            add_plan_flags(p)
        if config:
            p.add_argument("--config", metavar="FILE", default=None,
                           help="an axolotl YAML, a TRL SFTConfig (JSON/YAML) or a TrainingArguments JSON: the "
                                "plan (and MODEL, when the file names it) comes from the file; plan flags given "
                                "here override it; what the file switches on that memplan does not model is "
                                "listed in the notes (YAML needs PyYAML: pip install 'memplan[config]')")
            p.set_defaults(config_read=None)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(func=func)
        return p

    p = command("estimate", cmd_estimate, "per-term breakdown of the peak memory of one training step", config=True)
    p.add_argument("--gpu", metavar="GPU", help="GPU name for overheads and fit (see `memplan gpus`)")
    p = command("fit", cmd_fit, "does it fit? exit 0 fits, 1 does not fit, 2 bad input", config=True)
    p.add_argument("--gpu", metavar="GPU", required=True, help="GPU name (see `memplan gpus`)")
    p.add_argument("--host-ram", metavar="GiB", type=float, default=None,
                   help="host (CPU) RAM per node for a distributed plan's offload and loading (default: reported, "
                        "not checked)")
    p.add_argument("--reserve", metavar="GiB", type=float, default=None,
                   help="GiB to keep free for other processes or as a margin (default 0)")
    p = command("recommend", cmd_recommend,
                "largest micro-batch and sequence length that fit, the cheapest changes that make a plan fit, "
                "and the smallest GPU for it; exit 0 fits as given, 1 does not fit, 2 bad input", config=True)
    p.add_argument("--gpu", metavar="GPU", required=True, help="GPU name (see `memplan gpus`)")
    p.add_argument("--host-ram", metavar="GiB", type=float, default=None,
                   help="host (CPU) RAM per node: the several-GPU options must fit it too (default: reported, "
                        "not checked)")
    p.add_argument("--reserve", metavar="GiB", type=float, default=None,
                   help="GiB to keep free for other processes or as a margin (default 0, as fit: the estimate "
                        "already counts CUDA context, workspace and allocator overhead)")
    p.add_argument("--simulate-budget", metavar="N", type=_positive_int, default=None,
                   help="for a model without a closed form (mixture-of-experts): how many simulate traces "
                        "(seconds each) to spend; the searches that need more are skipped and named in the notes "
                        "(default 1: the plan as given)")
    p = command("report", cmd_report,
                "capacity planning: sweep models x GPUs x plans into a CSV table and an HTML report with charts",
                model=False, plan=False)
    p.add_argument("--models", metavar="A,B", required=True, help="comma-separated models (see `memplan models`)")
    p.add_argument("--gpus", metavar="X,Y", required=True, help="comma-separated GPUs (see `memplan gpus`)")
    p.add_argument("--methods", metavar="M,M", help="comma-separated methods: qlora, lora, full (default qlora)")
    p.add_argument("--seq-lens", metavar="N,N", help="comma-separated sequence lengths (default 512,1024,2048,4096)")
    p.add_argument("--batch-sizes", metavar="N,N", help="comma-separated micro-batch sizes (default 1,2,4,8)")
    p.add_argument("--ranks", metavar="R,R", help="comma-separated LoRA ranks (default 16)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for report.html, sweep.csv and the PNG charts")
    p.add_argument("--force", action="store_true", help="overwrite the report files in an existing non-empty --out")
    p.add_argument("--reserve", metavar="GiB", type=float, default=None,
                   help="GiB to keep free on every GPU (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress or status lines on stderr (errors and warnings still print)")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # the old name
    p.add_argument("--num-processes", "--num_processes", dest="world_list", metavar="N,N",
                   help="comma-separated GPU counts (processes): more than one value (or several --strategy) "
                        "makes a grid over several GPUs, one row per count and strategy, e.g. 1,2,4,8 (default 1)")
    p.add_argument("--strategy", "--strategies", dest="strategy_list", metavar="S,S",
                   help="comma-separated strategies of that grid: ddp, fsdp, deepspeed (default: all three when "
                        "several counts are given; the knobs --fsdp-sharding-strategy, --zero-stage, ... apply "
                        "to every row)")
    add_plan_flags(p, exclude=("method", "batch_size", "seq_len", "lora_r", "num_processes", "strategy"))
    p = command("simulate", cmd_simulate,
                "exact meta-device trace of a real training step (needs the sim extra: torch, transformers, "
                "peft, bitsandbytes). " + SIM_COVERS[0].upper() + SIM_COVERS[1:] + ".", config=True)
    p.add_argument("--quiet", action="store_true", help="no progress or status lines on stderr (errors and warnings still print)")
    p = command("profile", cmd_profile,
                "run real training steps on the device and measure them per phase and per term against the "
                "estimate (needs the profile extra); exit 0 ran, 1 out of memory or failed, 2 bad input")
    p.epilog = PROFILE_CACHE_HELP
    p.add_argument("--steps", type=_positive_int, metavar="N", default=None,
                   help="training steps; the peak is taken over steps >= 2 (default 3; 2 per search trial)")
    p.add_argument("--weights", choices=("random", "pretrained"), default="random",
                   help="random: random weights from the config, no download (memory does not depend on the "
                        "values), written once per config and dtype to the checkpoint cache (see below); "
                        "pretrained: the real checkpoint from MODEL's folder or hub id (default random)")
    p.add_argument("--out", metavar="PATH", help="write the run record (memplan.run/1) to PATH: a .json file or a "
                                                  "folder such as profiles/runs (a search writes every trial)")
    p.add_argument("--memory-limit", metavar="GiB", type=float, default=None,
                   help="CPU: a measured peak above this is an out-of-memory result; CUDA: caps torch's allocator "
                        "(set_per_process_memory_fraction)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--find-max-batch", action="store_true",
                   help="search the largest micro-batch that runs: start from the estimate, confirm with real steps")
    g.add_argument("--find-max-seq", action="store_true", help="search the longest sequence that runs, likewise")
    p.add_argument("--granularity", type=_positive_int, metavar="N", default=None,
                   help="search step: batch 1, seq 64 by default")
    p.add_argument("--max-trials", type=_positive_int, metavar="N", default=12, help="search trial budget (default 12)")
    p.add_argument("--no-track", action="store_true",
                   help="no per-term attribution (the live-tensor tracker is off): allocator/NVML peaks only")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and tokens (default 0)")
    p.add_argument("--gpu", metavar="GPU", help="catalogue GPU to estimate against (default: the one detected)")
    p.add_argument("--quiet", action="store_true", help="no progress or status lines on stderr (errors and warnings still print)")
    p = command("compare", cmd_compare, "estimate vs measured, term by term, for run records written by profile",
                model=False, plan=False)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run record files (RUN.json) or folders of them")
    p.add_argument("--stored", action="store_true",
                   help="use the estimate stored in each record (made at run time) instead of the current one")
    command("models", cmd_models, "list the bundled model catalogue", model=False, plan=False)
    p = sub.add_parser("completion", help="print a bash or zsh completion script",
                       description="print a shell completion script for memplan, e.g. "
                                   "`memplan completion bash > ~/.local/share/bash-completion/completions/memplan` "
                                   "or, in ~/.zshrc, `eval \"$(memplan completion zsh)\"`")
    parser.commands["completion"] = p
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    p.set_defaults(func=cmd_completion)
    command("gpus", cmd_gpus, "list the bundled GPU catalogue", model=False, plan=False)
    return parser


# ---------------------------------------------------------------------------------------------
# library warnings, Ctrl-C
# ---------------------------------------------------------------------------------------------
#: (message regex, category) of library warnings that memplan's own calls trigger: not the user's to act on
LIBRARY_WARNINGS = (
    (r"`?gradient_checkpointing\w*`? is deprecated", FutureWarning),  # transformers: -> activation_checkpointing
    (r"`?is_gradient_checkpointing`? is deprecated", FutureWarning),
    (r".*gradient_checkpointing.*activation_checkpointing", Warning),
    (r"Paged optimizers are not supported on CPU", UserWarning),  # bitsandbytes on a CPU profile
)


def filter_library_warnings() -> None:
    """Hide the deprecation notices and fallbacks that memplan's own calls into transformers and
    bitsandbytes trigger (call inside `warnings.catch_warnings()`); bitsandbytes' log line about the
    optional kernels-community CPU kernel goes too."""
    import logging

    for message, category in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


#: seconds the command gets to unwind after Ctrl-C before the process exits anyway (a long CPU kernel
#: in a profile's backward does not return to Python for minutes)
INTERRUPT_GRACE_S = 2.0
_cleanups: list[Callable[[], None]] = []
_cleanup_lock = threading.Lock()


def _run_cleanups() -> None:
    while _cleanups:
        fn = _cleanups.pop()
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


@contextlib.contextmanager
def undo_on_interrupt(fn: Callable[[], None]) -> Any:
    """Run `fn` (remove partial output) when Ctrl-C interrupts the block, also when the process is
    ended by the watchdog because the main thread is stuck in a long native call."""
    _cleanups.append(fn)
    try:
        yield
    except KeyboardInterrupt:
        with _cleanup_lock:
            _run_cleanups()
        raise
    finally:
        if fn in _cleanups:
            _cleanups.remove(fn)


def _random_weight_tmp() -> None:
    """The half-written random-weight checkpoints of this process (profile/weights.py names them)."""
    import glob
    import shutil

    from .profile.weights import cache_root, tmp_prefix

    for d in glob.glob(str(cache_root() / "random-weights" / f"{tmp_prefix()}*")):
        shutil.rmtree(d, ignore_errors=True)


class _InterruptWatch:
    """Ctrl-C: `memplan: interrupted` on stderr, exit 130, partial output removed.

    Python runs its SIGINT handler (KeyboardInterrupt) only between bytecodes, so a main thread inside
    one long native call (a CPU backward of a 1B model) would not stop for minutes. The C-level handler
    also writes the signal to a wakeup fd: a watcher thread reads it, gives the main thread
    INTERRUPT_GRACE_S to unwind, and otherwise runs the cleanups itself and ends the process."""

    def __init__(self) -> None:
        self.active = False
        self.done = threading.Event()

    def __enter__(self) -> "_InterruptWatch":
        import signal
        import socket

        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return self
        r, w = socket.socketpair()
        w.setblocking(False)
        try:
            self.old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):
            r.close()
            w.close()
            return self
        self.r, self.w, self.active = r, w, True
        threading.Thread(target=self._watch, name="memplan-interrupt", daemon=True).start()
        return self

    def _watch(self) -> None:
        import signal

        try:
            while True:
                data = self.r.recv(64)
                if not data or self.done.is_set():
                    return
                if signal.SIGINT in data:
                    break
        except OSError:
            return
        if self.done.wait(INTERRUPT_GRACE_S):
            return
        with _cleanup_lock:
            if self.done.is_set():
                return
            _run_cleanups()
            try:
                _random_weight_tmp()
            except Exception:  # noqa: BLE001
                pass
            os.write(2, b"memplan: interrupted\n")
            os._exit(130)

    def interrupted(self) -> int:
        self.done.set()
        with _cleanup_lock:
            _run_cleanups()
        print("memplan: interrupted", file=sys.stderr, flush=True)
        return 130

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if not self.active:
            return
        import signal

        signal.set_wakeup_fd(self.old_fd)
        try:
            self.w.send(b"\0")  # wake the watcher, which sees `done` and returns
        except OSError:
            pass
        self.w.close()


# ---------------------------------------------------------------------------------------------
# shell completion, generated from the parser
# ---------------------------------------------------------------------------------------------
def _completion_data(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """{command: {"flags": [...], "model": bool, "choices": {flag: [...]}}}, plus catalogue names."""
    cmds: dict[str, Any] = {}
    for name, sub in parser.commands.items():  # type: ignore[attr-defined]
        flags, choices, takes = [], {}, []
        positional = None
        for a in sub._actions:
            if a.help == argparse.SUPPRESS:
                continue
            if not a.option_strings:
                positional = a.metavar or a.dest
                if a.choices:
                    choices[""] = list(a.choices)
                continue
            for o in a.option_strings:
                if o.startswith("--"):
                    flags.append(o)
                    if a.choices:
                        choices[o] = list(a.choices)
                    elif a.nargs != 0 and not isinstance(a, (argparse._StoreTrueAction, argparse._StoreConstAction,
                                                             argparse.BooleanOptionalAction)):
                        takes.append(o)
        cmds[name] = {"flags": flags, "positional": positional, "choices": choices, "takes": takes}
    models = sorted({m.name for m in list_models()})
    gpus = sorted({g.name for g in list_gpus()})
    return {"commands": cmds, "models": models, "gpus": gpus}


def completion_script(shell: str, parser: argparse.ArgumentParser | None = None) -> str:
    """A bash or zsh completion script for `memplan`: subcommands, each one's flags, the choices of
    flags that have them, catalogue model names for MODEL/--models and GPU names for --gpu/--gpus."""
    d = _completion_data(parser or build_parser())
    cmds = d["commands"]
    models, gpus = " ".join(d["models"]), " ".join(d["gpus"])
    lines = []
    for name, c in cmds.items():
        lines.append(f'        {name}) flags="{" ".join(c["flags"] + ["--help"])}" ;;')
    flag_cases = []
    seen: dict[str, str] = {}
    for c in cmds.values():
        for flag, ch in c["choices"].items():
            if flag:
                seen.setdefault(flag, " ".join(map(str, ch)))
    for flag, words in seen.items():
        flag_cases.append(f'        {flag}) words="{words}" ;;')
    flag_cases.append(f'        --gpu|--gpus) words="{gpus}" ;;')
    flag_cases.append(f'        --models) words="{models}" ;;')
    takes = sorted({t for c in cmds.values() for t in c["takes"]} - set(seen) - {"--gpu", "--gpus", "--models"})
    path_flags = [t for t in takes if t in ("--out", "--config")]
    other = [t for t in takes if t not in path_flags]
    if path_flags:
        flag_cases.append(f'        {"|".join(path_flags)}) COMPREPLY=($(compgen -f -- "$cur")); return 0 ;;')
    if other:
        flag_cases.append(f'        {"|".join(other)}) return 0 ;;')
    model_cmds = "|".join(n for n, c in cmds.items() if c["positional"] == "MODEL")
    shell_cmd = "|".join(n for n, c in cmds.items() if "" in c["choices"])
    shell_words = " ".join(next((c["choices"][""] for c in cmds.values() if "" in c["choices"]), []))
    bash = f"""# bash completion for memplan (generated by `memplan completion bash`)
_memplan() {{
    local cur prev cmd words flags i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "{" ".join(cmds)} --help --version" -- "$cur"))
        return 0
    fi
    words=""
    case "$prev" in
{chr(10).join(flag_cases)}
    esac
    if [[ -n "$words" ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
        return 0
    fi
    case "$cmd" in
{chr(10).join(lines)}
        *) flags="--help" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        return 0
    fi
    case "$cmd" in
        {model_cmds or "_none_"}) COMPREPLY=($(compgen -W "{models}" -- "$cur")); compopt -o default 2>/dev/null ;;
        {shell_cmd or "_none_"}) COMPREPLY=($(compgen -W "{shell_words}" -- "$cur")) ;;
        compare) COMPREPLY=($(compgen -f -- "$cur")) ;;
    esac
    return 0
}}
complete -F _memplan memplan
"""
    if shell == "bash":
        return bash
    if shell == "zsh":
        return ("#compdef memplan\n# zsh completion for memplan (generated by `memplan completion zsh`): "
                "zsh's bashcompinit runs the bash completion\n"
                "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"
                + bash.split("\n", 1)[1])
    raise MemplanError(f"unknown shell {shell!r}; give bash or zsh")


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(args.shell), end="")
    return EXIT_OK


def _unrecognized(parser: argparse.ArgumentParser, command: str | None, extra: Sequence[str]) -> str:
    """'unrecognized arguments' with the closest flags of the command, pointing at its help."""
    import difflib

    sub = parser.commands.get(command) if command else None  # type: ignore[attr-defined]
    where = f"memplan {command} --help" if sub is not None else "memplan --help"
    msg = f"unrecognized arguments: {' '.join(extra)}"
    flags = [s for a in (sub._actions if sub is not None else []) if a.help != argparse.SUPPRESS
             for s in a.option_strings if s.startswith("--")]
    first = next((e.split("=", 1)[0] for e in extra if e.startswith("-")), None)
    if first and flags:
        norm = first.replace("_", "-").lower()
        close = difflib.get_close_matches(norm, flags, n=2, cutoff=0.6)
        if close:
            msg += f"; did you mean {' or '.join(close)}?"
    return f"{msg} (see `{where}`)"


def _error(message: str) -> int:
    print(f"memplan: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: library warnings memplan's own calls trigger are filtered, Ctrl-C exits 130."""
    with warnings.catch_warnings(), _InterruptWatch() as watch:
        filter_library_warnings()
        try:
            return _main(argv)
        except KeyboardInterrupt:
            return watch.interrupted()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            return _error(_unrecognized(parser, getattr(args, "command", None), extra))
        if not getattr(args, "command", None):
            return _error("give a command: estimate, fit, recommend, report, simulate, profile, compare, models, gpus "
                          "or completion (see `memplan --help`)")
        return args.func(args)
    except _UsageError as e:
        return _error(str(e))
    except MemplanError as e:
        return _error(str(e))
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BAD_INPUT)
    except BrokenPipeError:  # `memplan models | head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
