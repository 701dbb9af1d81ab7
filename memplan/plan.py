"""TrainPlan: how a run trains, in Hugging Face's names (see DESIGN.md, "The plan")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from operator import attrgetter
from typing import Any, Mapping

from .errors import InvalidSpecError
from .liger import kernel_config_problems, norm_kernel_config
from .optim import OPTIMIZERS

METHODS = ("qlora", "lora", "full")
QUANTS = ("nf4", "fp4", "int8", "none")
DTYPES = ("bf16", "fp16", "fp32")
ATTN = ("sdpa", "flash_attention_2", "eager")
MIXED = ("bf16", "fp16", "no")
#: tokenizer/collator padding: "none" (unpadded rows, no attention_mask: packed or equal-length), or
#: rows padded to the longest / to max_length, which come with an attention_mask
PADDING = ("none", "longest", "max_length")
DEVICES = ("cuda", "cpu")
#: whose training step: the transformers `Trainer` (the model's own forward and loss over full
#: [tokens x vocab] logits) or TRL's `SFTTrainer` (TRL 1.16: the fused, tiled LM head of
#: `trl.trainer.utils.add_fused_lm_head`, which never materializes the logits; and with a quantized
#: base it casts the trainable parameters to bf16: `adapter_dtype` is then bf16)
TRAINERS = ("trainer", "sft")
#: distributed plans (accelerate / TrainingArguments names; memplan/distributed.py models them)
STRATEGIES = ("auto", "single", "ddp", "fsdp", "deepspeed")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
FSDP_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")
OFFLOAD_DEVICES = ("none", "cpu")
QUANT_STORAGE = ("auto", "uint8", "bf16", "fp16", "fp32")

_DTYPE_ALIASES = {
    "bfloat16": "bf16", "torch.bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "half": "fp16", "torch.float16": "fp16", "fp16": "fp16",
    "float32": "fp32", "float": "fp32", "torch.float32": "fp32", "fp32": "fp32",
}
_AUTO = "auto"


def norm_dtype(value: Any) -> str:
    """'torch.bfloat16', torch.bfloat16, 'bfloat16', 'bf16' -> 'bf16' (unknown values pass through)."""
    s = str(value).strip().lower()
    return _DTYPE_ALIASES.get(s, s)


def dtype_bytes(name: str) -> int:
    """Bytes per element of a normalised dtype name (bf16, fp16, fp32)."""
    return 4 if name == "fp32" else 2


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each class of tensor, resolved once from a plan (FACTS.md, dtypes).

    params: every parameter that is neither 4-/8-bit nor a LoRA adapter, and the residual stream that
      the embedding starts: fp32 after prepare_model_for_kbit_training (it upcasts every 16-bit
      parameter that is not Params4bit), else the load dtype.
    load: the load dtype (`dtype=`): the quant_state dtype, buffers that prepare does not touch.
    compute: bnb_4bit_compute_dtype (the 4-bit layers' matmul dtype).
    autocast: 2 under bf16/fp16 autocast (HF Trainer `bf16=True`/`fp16=True`), 0 without.
    adapter: LoRA A/B: fp32 by default (get_peft_model(autocast_adapter_dtype=True) upcasts them),
      16-bit when the plan's `adapter_dtype` says so (autocast_adapter_dtype=False, or a model cast
      to bf16 after get_peft_model: "pure 16-bit" training).
    adapter_copies: whether autocast casts the adapters (16-bit copies, cached and saved) -- not when
      they are in the autocast dtype already.
    logits: the lm_head output: the autocast dtype, else the (frozen) lm_head's dtype.
    """

    params: int
    load: int
    compute: int
    autocast: int
    adapter: int = 4
    adapter_copies: bool = True

    @property
    def logits(self) -> int:
        return self.autocast or self.params


#: Non-shape fields of a plan (everything but batch_size, seq_len, gradient_accumulation_steps): their
#: normalisation and validation are cached, so a sweep over shapes re-checks only three integers.
_SHAPE_FIELDS = ("batch_size", "seq_len", "gradient_accumulation_steps")
_CHECKED: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_KEY_IDS: dict[tuple[Any, ...], int] = {}


@dataclass(frozen=True)
class TrainPlan:
    """One training configuration. Defaults are today's common HF QLoRA recipe.

    `quant="auto"` resolves to nf4 for qlora and none otherwise; `prepare=None` resolves to on for
    qlora. Construct with keyword arguments; every problem is reported at once (InvalidSpecError).
    """

    method: str = "qlora"
    quant: str = _AUTO
    double_quant: bool = True
    compute_dtype: str = "bf16"
    dtype: str = "bf16"
    prepare: bool | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"
    adapter_dtype: str = "fp32"
    batch_size: int = 1
    seq_len: int = 2048
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    use_reentrant: bool = False
    padding: str = "none"
    #: TRL `packing`: each of the `batch_size` rows holds `seq_len` tokens of several sequences, the
    #: position ids restarting at each (no attention_mask): SDPA/eager get a block-diagonal mask,
    #: FlashAttention-2 its varlen path (see `memplan.packing`)
    packing: bool = False
    #: TRL `padding_free` / transformers `DataCollatorWithFlattening`: the micro-batch's rows are
    #: flattened into one row of batch_size x seq_len tokens, position ids restarting per sequence
    padding_free: bool = False
    optim: str = "paged_adamw_8bit"
    attn_implementation: str = "sdpa"
    mixed_precision: str = "bf16"
    device: str = "cuda"
    #: TRL SFTConfig `activation_offloading`: saved tensors go to host memory during the step
    activation_offloading: bool = False
    #: axolotl `gradient_checkpointing: offload`: the checkpointed layers' inputs go to host memory
    checkpoint_offload: bool = False
    trainer: str = "trainer"
    #: Liger kernels (TrainingArguments/SFTConfig `use_liger_kernel`): what the Trainer's
    #: `apply_liger_kernel` switches on for the model's family (memplan/liger.py)
    use_liger_kernel: bool = False
    #: overrides of the family's default kernels (TrainingArguments' `liger_kernel_config` dict),
    #: kept as a sorted tuple of (kernel, on) pairs; a dict or "rope,rms_norm" (exactly those) is accepted
    liger_kernel_config: tuple[tuple[str, bool], ...] = ()
    # -- distributed (see DIST_FIELDS; all at their defaults = one process, today's single-GPU plan) --
    num_processes: int = 1
    num_machines: int = 1
    strategy: str = _AUTO
    fsdp_version: int = 2
    fsdp_sharding_strategy: str = "FULL_SHARD"
    fsdp_offload_params: bool = False
    fsdp_backward_prefetch: str = "BACKWARD_PRE"
    fsdp_use_orig_params: bool = False
    fsdp_cpu_ram_efficient_loading: bool = True
    zero_stage: int = 3
    offload_optimizer_device: str = "none"
    offload_param_device: str = "none"
    bnb_4bit_quant_storage: str = _AUTO
    ddp_bucket_cap_mb: int = 25
    #: DeepSpeed zero_optimization bucket sizes, in elements; "auto" = what the HF Trainer fills in
    #: (reduce H*H, prefetch int(0.9*H*H), persistence 10*H; max_live_parameters: DeepSpeed's 1e9)
    zero_reduce_bucket_size: int | str = _AUTO
    zero_stage3_prefetch_bucket_size: int | str = _AUTO
    zero_stage3_param_persistence_threshold: int | str = _AUTO
    zero_stage3_max_live_parameters: int | str = _AUTO
    #: FSDP1's rate limiter (accelerate `fsdp_limit_all_gathers`, FullyShardedDataParallel limit_all_gathers):
    #: at most two all-gathers in flight ahead of the compute (CUDA); False lets the CPU thread run ahead
    fsdp_limit_all_gathers: bool = True
    #: accelerate's `fsdp_transformer_layer_cls_to_wrap` (TrainingArguments fsdp_config
    #: `transformer_layer_cls_to_wrap`): the classes transformer_based_wrap makes units of; () = the model's
    #: `_no_split_modules` (memplan.distributed `units`)
    fsdp_transformer_layer_cls_to_wrap: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        given = _other_fields(self)
        raw = given + tuple(map(type, given))  # 16.0 == 16 and 1 == True, but not the same input
        try:
            done = _CHECKED.get(raw)
        except TypeError:  # an unhashable value (a list of target modules): no cache
            done = raw = None
        if done is None:
            done = self._normalise(given)
            if raw is not None and len(_CHECKED) < 4096:
                _CHECKED[raw] = done
        changes, problems, key, precision, key_id = done
        for k, v in changes:
            object.__setattr__(self, k, v)
        #: the normalised non-shape fields: equal for plans that differ only in batch/seq/accumulation
        object.__setattr__(self, "shape_free_key", key)
        #: a small int naming `shape_free_key` in this process (cheap to hash: the caches key on it)
        object.__setattr__(self, "shape_free_id", key_id)
        #: bytes per element of each class of tensor under this plan (see `Precision`)
        object.__setattr__(self, "precision", precision)
        b, s, g = self.batch_size, self.seq_len, self.gradient_accumulation_steps
        if type(b) is not int or type(s) is not int or type(g) is not int or b < 1 or s < 1 or g < 1:
            problems = (*problems, *self._shape_problems())
        if problems:
            raise InvalidSpecError("plan", list(problems))

    def _normalise(self, given: tuple[Any, ...]) -> tuple[tuple[tuple[str, Any], ...], tuple[str, ...],
                                                         tuple[Any, ...], Precision | None, int]:
        """What `__post_init__` caches for the non-shape fields: the normalised values that differ
        from the given ones, the problems, the shape-free key and the precision."""
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        method = str(self.method).lower()
        set_("method", method)
        for k in ("compute_dtype", "dtype", "adapter_dtype"):
            set_(k, norm_dtype(getattr(self, k)))
        set_("mixed_precision", {"none": "no", "false": "no", "fp32": "no"}.get(
            str(self.mixed_precision).lower(), str(self.mixed_precision).lower()))
        quant = str(self.quant).lower()
        if quant == _AUTO:
            quant = "nf4" if method == "qlora" else "none"
        set_("quant", quant)
        if self.prepare is None:
            set_("prepare", method == "qlora")
        tm = self.target_modules
        if isinstance(tm, str):
            tm = tm if tm == "all-linear" else tuple(t.strip() for t in tm.split(",") if t.strip())
        else:
            tm = tuple(tm)
        set_("target_modules", tm)
        wrap = self.fsdp_transformer_layer_cls_to_wrap
        if isinstance(wrap, str):
            wrap = tuple(t.strip() for t in wrap.split(",") if t.strip())
        elif isinstance(wrap, (list, tuple)):
            wrap = tuple(wrap)
        set_("fsdp_transformer_layer_cls_to_wrap", wrap)
        set_("optim", str(self.optim).lower())
        set_("trainer", {"sfttrainer": "sft", "transformers": "trainer"}.get(str(self.trainer).lower(),
                                                                           str(self.trainer).lower()))
        if self.trainer == "sft" and quant != "none":
            # SFTTrainer.__init__ (trl 1.16) casts every trainable parameter of a quantized model to bf16
            # (the QLoRA paper's recipe), whatever get_peft_model made them
            set_("adapter_dtype", "bf16")
        set_("padding", {"false": "none", "do_not_pad": "none", "true": "longest"}.get(
            str(self.padding).lower(), str(self.padding).lower()))
        set_("liger_kernel_config", norm_kernel_config(self.liger_kernel_config))
        if self.trainer == "sft" and self.use_liger_kernel and isinstance(self.liger_kernel_config, tuple) \
                and dict(self.liger_kernel_config).get("fused_linear_cross_entropy") is not True:
            # TRL 1.16's SFTTrainer switches Liger's fused linear cross-entropy off (it fuses the LM head its
            # own way, memplan/fused_head.py): Liger's layer kernels only
            set_("liger_kernel_config", tuple(sorted({**dict(self.liger_kernel_config),
                                                      "fused_linear_cross_entropy": False}.items())))
        strategy = str(self.strategy).lower()
        set_("strategy", {"fsdp2": "fsdp", "fsdp1": "fsdp", "zero": "deepspeed", "none": "single",
                          "no": "single", "multi_gpu": "ddp"}.get(strategy, strategy))
        for k in ("fsdp_sharding_strategy", "fsdp_backward_prefetch"):
            set_(k, _FSDP_ENUMS.get(str(getattr(self, k)).upper(), str(getattr(self, k)).upper()))
        for k in ("offload_optimizer_device", "offload_param_device"):
            set_(k, str(getattr(self, k)).lower())
        for k in ZERO_BUCKET_FIELDS:
            set_(k, _elements(getattr(self, k)))
        qs = str(self.bnb_4bit_quant_storage).lower()
        set_("bnb_4bit_quant_storage", "uint8" if qs in ("uint8", "torch.uint8") else qs if qs == _AUTO
             else norm_dtype(qs))
        problems = tuple(p for p in self.problems() if not p.startswith(_SHAPE_FLAGS))
        key = _other_fields(self)
        changes = tuple((k, v) for k, v, g in zip(_OTHER_FIELDS, key, given) if v is not g)
        precision = None
        if not problems:
            params = 4 if self.prepare else dtype_bytes(self.dtype)
            precision = Precision(params=params, load=dtype_bytes(self.dtype),
                                  compute=dtype_bytes(self.compute_dtype), autocast=2 if self.autocast else 0,
                                  adapter=dtype_bytes(self.adapter_dtype),
                                  adapter_copies=bool(self.autocast) and self.adapter_dtype != self.autocast)
        key_id = _KEY_IDS.setdefault(key, len(_KEY_IDS)) if not problems else -1
        return changes, problems, key, precision, key_id

    def _shape_problems(self) -> list[str]:
        p = []
        for flag, v in (("--batch-size", self.batch_size), ("--seq-len", self.seq_len),
                        ("--gradient-accumulation-steps", self.gradient_accumulation_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                p.append(f"{flag} must be a positive integer, got {v!r}")
        return p

    def problems(self) -> list[str]:
        """Every problem with this plan, in the words of the CLI flags."""
        p: list[str] = []

        def choice(flag: str, value: str, allowed) -> None:
            if value not in allowed:
                p.append(f"{flag} {value!r} is not one of: {', '.join(allowed)}")

        choice("--method", self.method, METHODS)
        choice("--quant", self.quant, QUANTS)
        choice("--compute-dtype", self.compute_dtype, DTYPES)
        choice("--dtype", self.dtype, DTYPES)
        choice("--adapter-dtype", self.adapter_dtype, DTYPES)
        choice("--attn-implementation", self.attn_implementation, ATTN)
        choice("--padding", self.padding, PADDING)
        choice("--mixed-precision", self.mixed_precision, MIXED)
        choice("--device", self.device, DEVICES)
        choice("--trainer", self.trainer, TRAINERS)
        if self.optim not in OPTIMIZERS:
            import difflib

            close = difflib.get_close_matches(self.optim, OPTIMIZERS, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            p.append(f"--optim {self.optim!r} is not a known optimizer{hint} (known: {', '.join(OPTIMIZERS)})")
        p += self._shape_problems()
        for flag, v in (("--activation-offloading", self.activation_offloading),
                        ("--checkpoint-offload", self.checkpoint_offload)):
            if not isinstance(v, bool):
                p.append(f"{flag} is on or off (true/false), got {v!r}")
        if self.checkpoint_offload is True and not self.gradient_checkpointing:
            p.append("--checkpoint-offload offloads the checkpointed layers' inputs: it needs "
                     "--gradient-checkpointing (or use --activation-offloading without checkpointing)")
        if self.method in ("qlora", "lora"):
            if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 1:
                p.append(f"--lora-r must be a positive integer, got {self.lora_r!r}")
            elif self.lora_r > 65536:  # larger than the hidden size of any model in use
                p.append(f"--lora-r {self.lora_r} is larger than any model's hidden size; use a rank like 8-256 "
                         "(at most 65536)")
            if (not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool)
                    or not self.lora_alpha > 0 or self.lora_alpha == float("inf")):
                p.append(f"--lora-alpha must be a positive number (peft scales the update by alpha/r), "
                         f"got {self.lora_alpha!r}; e.g. --lora-alpha {2 * self.lora_r if isinstance(self.lora_r, int) else 32}")
            if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
                p.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
            if not self.target_modules:
                p.append("--target-modules is empty; use all-linear or a comma-separated list like q_proj,v_proj")
        if self.method == "qlora" and self.quant == "none":
            p.append("--method qlora needs a quantized base (--quant nf4, fp4 or int8); for a 16-bit base use --method lora")
        if self.method in ("lora", "full") and self.quant != "none":
            p.append(f"--quant {self.quant} quantizes the base, which --method {self.method} does not do; use --method qlora")
        if self.mixed_precision == "bf16" and self.compute_dtype == "fp16":
            pass  # allowed: HF lets them differ
        if not isinstance(self.use_liger_kernel, bool):
            p.append(f"--use-liger-kernel takes no value (use_liger_kernel must be true or false), "
                     f"got {self.use_liger_kernel!r}")
        if self.liger_kernel_config:
            p += kernel_config_problems(self.liger_kernel_config)
            if self.trainer == "sft" and self.use_liger_kernel and isinstance(self.liger_kernel_config, tuple) \
                    and ("fused_linear_cross_entropy", True) in self.liger_kernel_config:
                p.append("Liger's fused_linear_cross_entropy is refused by TRL's SFTTrainer (--trainer sft fuses the "
                         "LM head its own way); drop it from --liger-kernels / --liger-kernel-config")
        for flag, v in (("--packing", self.packing), ("--padding-free", self.padding_free)):
            if not isinstance(v, bool):
                p.append(f"{flag} takes true or false, got {v!r}")
        if (self.packing or self.padding_free) and self.padding != "none":
            p.append(f"--padding {self.padding} pads rows that {'--packing' if self.packing else '--padding-free'} "
                     "leaves unpadded (packed rows carry no attention_mask); use --padding none")
        if self.attn_implementation == "flash_attention_2" and self.device == "cpu":
            p.append("--attn-implementation flash_attention_2 runs only on CUDA GPUs; with --device cpu use sdpa or eager")
        p += self._distributed_problems()
        return p

    def _distributed_problems(self) -> list[str]:
        """The distributed fields' problems, in the words of their CLI flags."""
        p: list[str] = []

        def count(flag: str, v: Any, most: int) -> bool:
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= most:
                p.append(f"{flag} must be a whole number from 1 to {most}, got {v!r}")
                return False
            return True

        ok = count("--num-processes", self.num_processes, 65536) & count("--num-machines", self.num_machines, 8192)
        if ok and self.num_processes % self.num_machines:
            p.append(f"--num-processes {self.num_processes} does not split evenly over --num-machines "
                     f"{self.num_machines}; give a multiple of {self.num_machines} processes")
        for flag, v, allowed in (("--strategy", self.strategy, STRATEGIES),
                                 ("--fsdp-sharding-strategy", self.fsdp_sharding_strategy, FSDP_SHARDING),
                                 ("--fsdp-backward-prefetch", self.fsdp_backward_prefetch, FSDP_PREFETCH),
                                 ("--offload-optimizer", self.offload_optimizer_device, OFFLOAD_DEVICES),
                                 ("--offload-param", self.offload_param_device, OFFLOAD_DEVICES),
                                 ("--bnb-4bit-quant-storage", self.bnb_4bit_quant_storage, QUANT_STORAGE)):
            if v not in allowed:
                p.append(f"{flag} {v!r} is not one of: {', '.join(allowed)}")
        if self.fsdp_version not in (1, 2) or isinstance(self.fsdp_version, bool):
            p.append(f"--fsdp-version must be 1 or 2, got {self.fsdp_version!r}")
        if self.zero_stage not in (2, 3) or isinstance(self.zero_stage, bool):
            p.append(f"--zero-stage must be 2 or 3 (DeepSpeed ZeRO), got {self.zero_stage!r}")
        for k in ("fsdp_offload_params", "fsdp_use_orig_params", "fsdp_cpu_ram_efficient_loading",
                  "fsdp_limit_all_gathers"):
            if not isinstance(getattr(self, k), bool):
                p.append(f"{k} must be True or False, got {getattr(self, k)!r}")
        v = self.ddp_bucket_cap_mb
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            p.append(f"--ddp-bucket-cap-mb must be a positive number of MiB, got {v!r}")
        for k in ZERO_BUCKET_FIELDS:
            v = getattr(self, k)
            if v != _AUTO and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                p.append(f"--{k.replace('_', '-')} must be 'auto' or a number of elements (an integer >= 0), got {v!r}")
        wrap = self.fsdp_transformer_layer_cls_to_wrap
        if not isinstance(wrap, tuple) or not all(isinstance(c, str) and c.isidentifier() for c in wrap):
            p.append(f"--fsdp-transformer-layer-cls-to-wrap must name classes (comma-separated, e.g. "
                     f"Gemma3DecoderLayer,SiglipEncoderLayer), got {wrap!r}")
        if self.strategy == "single" and self.num_processes > 1:
            p.append(f"--strategy single runs one process, but --num-processes is {self.num_processes}; use "
                     "--strategy ddp, fsdp or deepspeed (or --num-processes 1)")
        if (self.strategy == "deepspeed" and self.zero_stage == 2 and self.offload_param_device != "none"):
            p.append("--offload-param needs ZeRO stage 3 (DeepSpeed offloads parameters only at stage 3); use "
                     "--zero-stage 3 or drop --offload-param")
        return p

    @property
    def world_strategy(self) -> str:
        """The strategy the run uses: `strategy`, with auto resolved (single for one process, ddp otherwise)."""
        if self.strategy == _AUTO:
            return "single" if self.num_processes == 1 else "ddp"
        return self.strategy

    @property
    def is_distributed(self) -> bool:
        """Whether the plan names a distributed run (ddp, fsdp or deepspeed, even on one process)."""
        return self.world_strategy != "single"

    @property
    def ranks_per_node(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))

    def single_device(self) -> "TrainPlan":
        """The same step on one device, no distributed fields: what every rank computes (data parallel)."""
        return replace(self, **_DIST_DEFAULTS) if self.is_distributed or self._dist_changed() else self

    def _dist_changed(self) -> bool:
        return any(getattr(self, k) != v for k, v in _DIST_DEFAULTS.items())

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def autocast(self) -> str | None:
        """The autocast dtype the HF Trainer would run under, or None."""
        return None if self.mixed_precision == "no" else self.mixed_precision

    def replace(self, **changes: Any) -> "TrainPlan":
        return replace(self, **changes)

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuild from the fields (pickle, copy): the derived attributes (shape_free_id) are per process
        return (TrainPlan, tuple(getattr(self, f) for f in _FIELD_NAMES))

    def __hash__(self) -> int:  # plans key the estimator's caches: hash the fields once
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(self.shape_free_key + (self.batch_size, self.seq_len, self.gradient_accumulation_steps))
            object.__setattr__(self, "_hash", h)
        return h

    def to_dict(self) -> dict[str, Any]:
        """Every field; the distributed ones only when one differs from its default (a single-GPU
        plan's dict is unchanged since before distributed plans)."""
        d = asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        # recipe fields appear only when set, so plans without them keep their JSON (golden files)
        for k in _OMIT_AT_DEFAULT:
            if d[k] == _DEFAULTS[k]:
                del d[k]
        if "liger_kernel_config" in d:
            d["liger_kernel_config"] = dict(self.liger_kernel_config)
        if not self._dist_changed():
            for k in DIST_FIELDS:
                d.pop(k, None)  # (those omitted at their default are gone already)
        return d

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return _FIELD_NAMES


_FIELD_NAMES = tuple(f.name for f in fields(TrainPlan))
_DEFAULTS = {f.name: f.default for f in fields(TrainPlan)}
#: fields left out of `to_dict` at their default (recipe options added after the JSON contract), so
#: that plans (and the JSON, records and golden files made from them) that do not use them read as before
_OMIT_AT_DEFAULT = ("packing", "padding_free", "activation_offloading", "checkpoint_offload", "trainer",
                    "use_liger_kernel", "liger_kernel_config", "zero_reduce_bucket_size",
                    "zero_stage3_prefetch_bucket_size", "zero_stage3_param_persistence_threshold",
                    "zero_stage3_max_live_parameters", "fsdp_limit_all_gathers",
                    "fsdp_transformer_layer_cls_to_wrap")
#: DeepSpeed's bucket-size fields ("auto" or elements)
ZERO_BUCKET_FIELDS = ("zero_reduce_bucket_size", "zero_stage3_prefetch_bucket_size",
                      "zero_stage3_param_persistence_threshold", "zero_stage3_max_live_parameters")


def _elements(v: Any) -> Any:
    """A DeepSpeed bucket size as given (CLI text, JSON 5e8): "auto", or an int of elements when it is one."""
    if isinstance(v, str):
        t = v.strip().lower()
        if t == _AUTO:
            return _AUTO
        try:
            f = float(t)
        except ValueError:
            return v
        return int(f) if f.is_integer() else v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


#: the distributed fields (memplan/distributed.py; /work shared spec "dist-fields"), with their defaults
DIST_FIELDS = _FIELD_NAMES[_FIELD_NAMES.index("num_processes"):]
_DIST_DEFAULTS = {f.name: f.default for f in fields(TrainPlan) if f.name in DIST_FIELDS}
_FSDP_ENUMS = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD",
               "SHARDINGSTRATEGY.FULL_SHARD": "FULL_SHARD", "SHARDINGSTRATEGY.SHARD_GRAD_OP": "SHARD_GRAD_OP",
               "SHARDINGSTRATEGY.NO_SHARD": "NO_SHARD", "SHARDINGSTRATEGY.HYBRID_SHARD": "HYBRID_SHARD",
               "BACKWARDPREFETCH.BACKWARD_PRE": "BACKWARD_PRE", "BACKWARDPREFETCH.BACKWARD_POST": "BACKWARD_POST",
               "NONE": "NO_PREFETCH", "FALSE": "NO_PREFETCH"}
_OTHER_FIELDS = tuple(f for f in _FIELD_NAMES if f not in _SHAPE_FIELDS)
_other_fields = attrgetter(*_OTHER_FIELDS)
_SHAPE_FLAGS = ("--batch-size", "--seq-len", "--gradient-accumulation-steps")


def plan_from(base: TrainPlan | None = None, *, bnb_config: Any = None, lora_config: Any = None,
              training_args: Any = None, config: Any = None, **kwargs: Any) -> TrainPlan:
    """Build a plan from keyword arguments and/or a user's real HF objects, read by attribute.

    `bnb_config` is a transformers BitsAndBytesConfig, `lora_config` a peft LoraConfig,
    `training_args` a transformers TrainingArguments (or anything with the same attributes, or a
    dict). `config` is a training config file (an axolotl YAML, a TRL SFTConfig or a TrainingArguments
    JSON/YAML: `memplan.integrations.configs.read_config`) or what `read_config` returned; the
    objects win over the file, and explicit keyword arguments win over both.
    """
    values: dict[str, Any] = {}
    if config is not None:
        from .integrations.configs import read_config

        values.update(read_config(config).plan_fields)
    values.update(fields_from_hf(bnb_config=bnb_config, lora_config=lora_config, training_args=training_args))
    unknown = sorted(k for k in kwargs if k not in TrainPlan.field_names())
    if unknown:
        raise InvalidSpecError("plan", [f"unknown plan field {k!r} (known: {', '.join(TrainPlan.field_names())})"
                                        for k in unknown])
    values.update({k: v for k, v in kwargs.items() if v is not None})
    if base is not None:
        return replace(base, **values) if values else base
    return TrainPlan(**values)


def fields_from_hf(*, bnb_config: Any = None, lora_config: Any = None, training_args: Any = None) -> dict[str, Any]:
    """The plan fields that a BitsAndBytesConfig, a LoraConfig and a TrainingArguments (objects or
    dicts with their attribute names) set, later ones winning; what `plan_from` reads from them."""
    values: dict[str, Any] = {}
    if bnb_config is not None:
        values.update(_from_bnb(bnb_config))
    if lora_config is not None:
        values.update(_from_lora(lora_config))
    if training_args is not None:
        values.update(_from_training_args(training_args))
    return values


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _from_bnb(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if _get(cfg, "load_in_4bit", False):
        out["method"] = "qlora"
        out["quant"] = str(_get(cfg, "bnb_4bit_quant_type", "fp4")).lower()
        out["double_quant"] = bool(_get(cfg, "bnb_4bit_use_double_quant", False))
        cd = _get(cfg, "bnb_4bit_compute_dtype", None)
        if cd is not None:
            out["compute_dtype"] = norm_dtype(cd)
    elif _get(cfg, "load_in_8bit", False):
        out["method"] = "qlora"
        out["quant"] = "int8"
    return out


def _from_lora(cfg: Any) -> dict[str, Any]:
    """A peft LoraConfig (or dict), or a PeftModel: its active adapter's config, and the adapters'
    dtype as they are (16-bit after get_peft_model(autocast_adapter_dtype=False) or a cast)."""
    out: dict[str, Any] = {}
    peft_config = getattr(cfg, "peft_config", None)
    if isinstance(peft_config, Mapping) and peft_config:  # a PeftModel
        model = cfg
        cfg = peft_config.get(getattr(model, "active_adapter", None)) or next(iter(peft_config.values()))
        for name, param in model.named_parameters():
            if "lora_A" in name:
                out["adapter_dtype"] = norm_dtype(param.dtype)
                break
    for ours, theirs in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        v = _get(cfg, theirs)
        if v is not None:
            out[ours] = v
    tm = _get(cfg, "target_modules")
    if tm is not None:
        if isinstance(tm, str):
            out["target_modules"] = tm
        else:
            # get_peft_model expands "all-linear" into full module paths (model.layers.0.mlp.down_proj):
            # peft matches names by suffix, so the leaf names say the same
            out["target_modules"] = tuple(sorted({str(t).rsplit(".", 1)[-1] for t in tm}))
    return out


def _from_training_args(args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bs = _get(args, "per_device_train_batch_size")
    if bs is not None:
        out["batch_size"] = bs
    ga = _get(args, "gradient_accumulation_steps")
    if ga is not None:
        out["gradient_accumulation_steps"] = ga
    gc = _get(args, "gradient_checkpointing")
    if gc is not None:
        out["gradient_checkpointing"] = bool(gc)
    gc_kwargs = _get(args, "gradient_checkpointing_kwargs")
    if isinstance(gc_kwargs, Mapping) and "use_reentrant" in gc_kwargs:
        out["use_reentrant"] = bool(gc_kwargs["use_reentrant"])
    optim = _get(args, "optim")
    if optim is not None:
        out["optim"] = str(getattr(optim, "value", optim))
    if _get(args, "bf16", False):
        out["mixed_precision"] = "bf16"
    elif _get(args, "fp16", False):
        out["mixed_precision"] = "fp16"
    elif _get(args, "bf16") is not None or _get(args, "fp16") is not None:
        out["mixed_precision"] = "no"
    if _get(args, "use_cpu", False):
        out["device"] = "cpu"
    if _get(args, "use_liger_kernel") is not None:
        out["use_liger_kernel"] = bool(_get(args, "use_liger_kernel"))
    if _get(args, "liger_kernel_config"):
        out["liger_kernel_config"] = _get(args, "liger_kernel_config")
    out.update(packing_fields(_get(args, "packing"), _get(args, "packing_strategy"), _get(args, "padding_free")))
    out.update(_world_from_training_args(args))
    return out


def _world_from_training_args(args: Any) -> dict[str, Any]:
    """TrainingArguments `fsdp` / `fsdp_config` / `deepspeed` / `ddp_bucket_cap_mb` -> the distributed
    fields (memplan.integrations.world, standard library only); {} when none is set."""
    fsdp, ds, bucket = _get(args, "fsdp"), _get(args, "deepspeed"), _get(args, "ddp_bucket_cap_mb")
    if not fsdp and not ds and bucket is None:
        return {}
    from .integrations.world import from_deepspeed, from_fsdp_args, load_deepspeed

    out: dict[str, Any] = {}
    if fsdp:
        out.update(from_fsdp_args(fsdp, _get(args, "fsdp_config") or {})[0])
    if ds:
        f = from_deepspeed(load_deepspeed(ds)[0])[0]
        f.pop("mixed_precision", None)  # the Trainer's bf16/fp16 win
        out.update(f)
    if bucket is not None:
        out["ddp_bucket_cap_mb"] = bucket
    return out


def packing_fields(packing: Any, strategy: Any, padding_free: Any) -> dict[str, Any]:
    """The plan fields a TRL SFTConfig's `packing`, `packing_strategy` and `padding_free` set
    (trl 1.16 trainer/sft_trainer.py SFTTrainer.__init__: `padding_free = args.padding_free or
    (args.packing and args.packing_strategy in {"bfd", "bfd_split"})`; its collator then flattens the
    packed rows into one). "wrapped" packing hands the model full rows with an all-ones
    attention_mask and no position ids: the plain step (packing stays off). Absent keys set nothing."""
    out: dict[str, Any] = {}
    strategy = "bfd" if strategy is None else str(strategy)
    if strategy == "bfd-requeue":  # trl renames it (SFTConfig.__post_init__)
        strategy = "bfd_split"
    if packing is not None:
        out["packing"] = bool(packing) and strategy != "wrapped"
    if padding_free is not None or packing is not None:
        out["padding_free"] = bool(padding_free) or (bool(packing) and strategy in ("bfd", "bfd_split"))
    return out


def gpu_over_use_cpu(plan: TrainPlan, base: TrainPlan | None, training_args: Any,
                     plan_kwargs: Mapping[str, Any], gpu_name: str | None) -> tuple[TrainPlan, str]:
    """`training_args` with `use_cpu=True` contradicts a GPU the caller names (`gpu=`): the GPU wins.

    Returns (the plan on cuda, the note saying so) when `plan` (from `plan_from`) is on the CPU only
    because of `use_cpu`; (plan, '') otherwise, also when the CPU comes from a `device` keyword or the
    `base` plan's own field (the caller asked for a CPU step)."""
    if (gpu_name is None or plan.device != "cpu" or not _get(training_args, "use_cpu", False)
            or plan_kwargs.get("device") is not None or (base is not None and base.device == "cpu")):
        return plan, ""
    return plan.replace(device="cuda"), (
        f"training_args has use_cpu=True but gpu={gpu_name!r} was given: estimated the step on the GPU "
        "(cuda); pass device='cpu' (--device cpu) to estimate a CPU step")


def shape_free_cache(maxsize: int = 4096):
    """Cache `fn(model, plan, flag)` by the model, the plan's non-shape fields and the flag: for
    quantities that do not depend on batch size, sequence length or gradient accumulation (the
    static terms, the symbolic layer walk), so a sweep over shapes computes them once.

    The key holds the model's `id` (hashing a ModelSpec costs a Python call); the entry keeps the
    model itself alive, so that id cannot name another object while the entry exists, and equal
    models loaded twice merely get two entries.
    """
    def wrap(fn):
        cache: dict[tuple[Any, ...], tuple[Any, Any]] = {}

        def cached(model: Any, plan: TrainPlan, flag: Any) -> Any:
            k = (id(model), plan.shape_free_id, flag)
            v = cache.get(k)
            if v is None:
                if len(cache) >= maxsize:
                    cache.clear()
                v = cache[k] = (model, fn(model, plan, flag))
            return v[1]

        cached.__doc__, cached.__name__, cached.cache = fn.__doc__, fn.__name__, cache
        return cached
    return wrap
