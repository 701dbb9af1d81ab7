"""One HF-Trainer-like QLoRA/LoRA training step, on real CPU/CUDA tensors or on the meta device.

The same code path for `simulate` (meta), the CPU checks in the tests and `profile`: load through
`from_pretrained(quantization_config=BitsAndBytesConfig(...))` (real devices) or build on meta and
quantize there, `prepare_model_for_kbit_training`, `get_peft_model`, the optimizer that the HF
Trainer builds for the `optim` name, then N steps with autocast per `mixed_precision`, the outputs
dropped before backward (as `Trainer.training_step` does) and checkpointing as the Trainer sets it.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan import TrainPlan
from ..terms import Phase, Term
from .tracker import LiveTensorTracker

_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class StepResult:
    peak_bytes: int
    peak_phase: str
    terms: dict[str, int]
    phase_peaks: dict[str, int]
    top: list[dict[str, Any]] = field(default_factory=list)
    static_bytes: int = 0
    #: bitsandbytes paged optimizer state held in managed memory (not in `peak_bytes`)
    paged_bytes: int = 0
    #: per phase: the terms at that phase's own peak
    phase_terms: dict[str, dict[str, int]] = field(default_factory=dict)
    #: library versions whose behaviour was traced (simulate fills it)
    versions: dict[str, str] = field(default_factory=dict)
    #: assumptions worth telling the user (simulate fills it)
    notes: list[str] = field(default_factory=list)


def hf_config(config: dict[str, Any]):
    """A transformers PretrainedConfig from config.json values."""
    from transformers import AutoConfig

    import copy

    cfg = copy.deepcopy(dict(config))  # transformers edits nested dicts (rope_scaling) in place
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    return AutoConfig.for_model(model_type, **cfg)


def bnb_config(plan: TrainPlan):
    from transformers import BitsAndBytesConfig

    if plan.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quant,
        bnb_4bit_use_double_quant=plan.double_quant,
        bnb_4bit_compute_dtype=_TORCH_DTYPE[plan.compute_dtype],
    )


def load_model(config: dict[str, Any], plan: TrainPlan, device: str = "cpu", seed: int = 0):
    """Random weights from a config, saved and loaded back through the real `from_pretrained` path."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(config)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="memplan-") as tmp:
        model = AutoModelForCausalLM.from_config(cfg, dtype=_TORCH_DTYPE[plan.dtype])
        model.save_pretrained(tmp)
        del model
        kw: dict[str, Any] = {"dtype": _TORCH_DTYPE[plan.dtype], "attn_implementation": plan.attn_implementation}
        if config.get("experts_implementation"):  # a load-time option, not saved in config.json
            kw["experts_implementation"] = config["experts_implementation"]
        if plan.method == "qlora":
            kw["quantization_config"] = bnb_config(plan)
        if device != "cpu":
            kw["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(tmp, **kw)
    return model


def adapt(model, plan: TrainPlan):
    """prepare_model_for_kbit_training + get_peft_model + checkpointing, as an HF QLoRA script does."""
    if plan.prepare:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    if plan.method in ("qlora", "lora"):
        from peft import LoraConfig, get_peft_model

        tm = plan.target_modules if isinstance(plan.target_modules, str) else list(plan.target_modules)
        lcfg = LoraConfig(r=plan.lora_r, lora_alpha=plan.lora_alpha, lora_dropout=plan.lora_dropout,
                          target_modules=tm, task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    if plan.gradient_checkpointing:
        # What the HF Trainer does (transformers' default: non-reentrant, plus an input-grad hook).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
    model.train()
    return model


def make_optimizer(model, plan: TrainPlan):
    """The optimizer the HF Trainer builds for `plan.optim` (weight decay grouping aside)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.gettempdir(), optim=plan.optim, learning_rate=1e-4,
                             use_cpu=plan.device == "cpu", report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(params, **kwargs)


def classify_param(name: str, p: torch.Tensor) -> Term:
    if p.__class__.__name__ in ("Params4bit", "Int8Params"):
        return Term.BASE_WEIGHTS
    if p.requires_grad:
        return Term.ADAPTER_WEIGHTS
    return Term.OTHER_PARAMS


def run_steps(model, plan: TrainPlan, vocab_size: int, steps: int = 2, device: str = "cpu",
              round_to: int = 1, optimizer=None, keep_outputs: bool = False, seed: int = 0,
              tracker: LiveTensorTracker | None = None, step_context=None, progress=None,
              fast_warmup: bool = False) -> StepResult:
    """Run `steps` training steps under the tracker; return the peak of the last step, per term.

    `device="meta"` runs on meta tensors (see meta.py): autocast then uses the CPU autocast state as
    its carrier (meta has no autocast of its own) and `step_context()` supplies the emulation.
    `tracker` lets the caller configure the tracker (devices counted, bitsandbytes kernels);
    `progress(msg)` is called at the start of each step.
    `fast_warmup`: the steps before the last one only create the optimizer state (zero gradients,
    `opt.step()`, `zero_grad`) instead of running forward and backward. The optimizer state is the
    only thing a step leaves behind, so the last step sees the same memory (simulate uses this).
    """
    if tracker is None:
        tracker = LiveTensorTracker(round_to=round_to, device=None if device == "meta" else device)
    base_names = _base_weight_names(model, plan)
    tracker.register_model(model, lambda n, p: Term.BASE_WEIGHTS if n in base_names else classify_param(n, p))
    tracker.attach_modules(model)
    opt = optimizer or make_optimizer(model, plan)
    for name, t in getattr(opt, "name2qmap", {}).items():  # bitsandbytes' shared 8-bit maps, made at init
        if isinstance(t, torch.Tensor):
            tracker.register(t, Term.OPTIMIZER_STATE, f"optimizer.qmap.{name}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (plan.batch_size, plan.seq_len), generator=g)
    if device != "cpu":
        ids = ids.to(device)
    lm_head = model.get_output_embeddings()
    hook = lm_head.register_forward_hook(lambda *_: tracker.set_phase(Phase.LOSS))
    autocast = (torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                               dtype=_TORCH_DTYPE[plan.autocast]) if plan.autocast else contextlib.nullcontext())
    try:
        with tracker, (step_context() if step_context is not None else contextlib.nullcontext()):
            for step in range(steps):
                if progress is not None:
                    progress(f"step {step + 1}/{steps}")
                if step == steps - 1:
                    tracker.reset_peak()
                elif fast_warmup:
                    tracker.set_phase(Phase.OPTIMIZER)
                    for p in model.parameters():
                        if p.requires_grad:
                            p.grad = torch.zeros_like(p)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    continue
                for _micro in range(plan.gradient_accumulation_steps):  # grads accumulate across micro-batches
                    tracker.set_phase(Phase.FORWARD)
                    with autocast:
                        out = model(input_ids=ids, labels=ids, use_cache=False)  # Trainer: use_cache=False
                    loss = out.loss
                    if not keep_outputs:
                        del out
                    if plan.gradient_accumulation_steps > 1:
                        loss = loss / plan.gradient_accumulation_steps  # as Trainer.training_step does
                    tracker.set_phase(Phase.BACKWARD)
                    loss.backward()
                    del loss
                    if keep_outputs:
                        del out
                tracker.set_phase(Phase.OPTIMIZER)
                opt.step()
                if step == steps - 1:
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
                    tracker.label(grads=grads, optimizer_state=state, vocab_size=vocab_size, tokens=plan.tokens)
                opt.zero_grad(set_to_none=True)
    finally:
        hook.remove()
        tracker.detach()
    at = tracker.peak_at
    return StepResult(
        peak_bytes=tracker.peak,
        peak_phase=tracker.peak_phase,
        terms=tracker.terms_at(at),
        phase_peaks={k: v.bytes for k, v in tracker.phase_peaks.items()},
        top=tracker.top_at(at),
        static_bytes=sum(r.nbytes for r in tracker.records if r.created < 0 and r.freed == float("inf")),
        paged_bytes=tracker.paged_bytes,
        phase_terms={k: tracker.terms_at(v.at) for k, v in tracker.phase_peaks.items()},
    )


def _base_weight_names(model, plan: TrainPlan) -> set[str]:
    """Names of frozen Linear weights that a LoRA run keeps in 16 bits (the `base_weights` term)."""
    bases = set()
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        if base is not None and isinstance(getattr(base, "weight", None), torch.Tensor):
            bases.add(id(base.weight))
    if not bases:
        return set()
    return {name for name, p in model.named_parameters() if id(p) in bases}


def cpu_step(config: dict[str, Any], plan: TrainPlan, steps: int = 2, seed: int = 0) -> StepResult:
    """A real CPU training step of `plan` on random weights built from `config`."""
    plan = plan.replace(device="cpu")
    model = load_model(config, plan, device="cpu", seed=seed)
    model = adapt(model, plan)
    return run_steps(model, plan, vocab_size=config["vocab_size"], steps=steps, device="cpu", seed=seed)
