"""TrainPlan: how a run trains, in Hugging Face's names (see DESIGN.md, "The plan")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from operator import attrgetter
from typing import Any, Mapping

from .errors import InvalidSpecError
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
        set_("optim", str(self.optim).lower())
        set_("padding", {"false": "none", "do_not_pad": "none", "true": "longest"}.get(
            str(self.padding).lower(), str(self.padding).lower()))
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
        if self.optim not in OPTIMIZERS:
            import difflib

            close = difflib.get_close_matches(self.optim, OPTIMIZERS, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            p.append(f"--optim {self.optim!r} is not a known optimizer{hint} (known: {', '.join(OPTIMIZERS)})")
        p += self._shape_problems()
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
        for flag, v in (("--packing", self.packing), ("--padding-free", self.padding_free)):
            if not isinstance(v, bool):
                p.append(f"{flag} takes true or false, got {v!r}")
        if (self.packing or self.padding_free) and self.padding != "none":
            p.append(f"--padding {self.padding} pads rows that {'--packing' if self.packing else '--padding-free'} "
                     "leaves unpadded (packed rows carry no attention_mask); use --padding none")
        if self.attn_implementation == "flash_attention_2" and self.device == "cpu":
            p.append("--attn-implementation flash_attention_2 runs only on CUDA GPUs; with --device cpu use sdpa or eager")
        return p

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
        d = asdict(self)
        for k in _OMIT_DEFAULT:  # fields added after the JSON contract was fixed: shown when set
            if d[k] is False:
                del d[k]
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return _FIELD_NAMES


_FIELD_NAMES = tuple(f.name for f in fields(TrainPlan))
#: fields `to_dict` leaves out at their default (False), so plans that do not use them keep their JSON
_OMIT_DEFAULT = ("packing", "padding_free")
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
    out.update(packing_fields(_get(args, "packing"), _get(args, "packing_strategy"), _get(args, "padding_free")))
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
