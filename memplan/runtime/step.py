"""One HF-Trainer-like QLoRA/LoRA training step, on real CPU/CUDA tensors or on the meta device.

The same code path for `simulate` (meta), the CPU checks in the tests and `profile`: the model loaded
through `from_pretrained(quantization_config=BitsAndBytesConfig(...))` (`runtime.load`) or built on
meta and quantized there (`simulate.build`), adapted (`runtime.load.adapt`), the optimizer that the
HF Trainer builds for the `optim` name, then N steps with autocast per `mixed_precision`, the outputs
dropped before backward (as `Trainer.training_step` does) and checkpointing as the Trainer sets it,
under the live-tensor tracker; parameters are labelled by `runtime.classify`.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan import TrainPlan
from ..terms import Phase, Term
from .classify import param_classifier, tower_modules
from .load import TORCH_DTYPE, adapt, load_model, text_vocab_size
from .tracker import LiveTensorTracker


@dataclass
class StepResult:
    """The last step's peak live bytes (rounded per storage as the device allocates), its terms and
    each phase's peak."""

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


def make_optimizer(model, plan: TrainPlan):
    """The optimizer the HF Trainer builds for `plan.optim` (weight decay grouping aside)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.gettempdir(), optim=plan.optim, learning_rate=1e-4,
                             use_cpu=plan.device == "cpu", report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(params, **kwargs)


def run_steps(model, plan: TrainPlan, vocab_size: int, steps: int = 2, device: str = "cpu",
              round_to: int = 1, optimizer=None, keep_outputs: bool = False, seed: int = 0,
              tracker: LiveTensorTracker | None = None, step_context=None, progress=None,
              fast_warmup: bool = False, kernel_workspace: bool = False) -> StepResult:
    """Run `steps` training steps under the tracker; return the peak of the last step, per term.

    `device="meta"` runs on meta tensors (memplan.simulate): autocast then uses the CPU autocast state
    as its carrier (meta has no autocast of its own) and `step_context()` supplies the emulation.
    `tracker` lets the caller configure the tracker (devices counted, bitsandbytes kernels);
    `progress(msg)` is called at the start of each step.
    `fast_warmup`: the steps before the last one only create the optimizer state (zero gradients,
    `opt.step()`, `zero_grad`) instead of running forward and backward. The optimizer state is the
    only thing a step leaves behind, so the last step sees the same memory (simulate uses this).
    `kernel_workspace` (real devices): also count the buffers kernels allocate internally, read from
    torch.profiler's allocator events (`LiveTensorTracker.add_kernel_workspace`; term `workspace`).
    """
    if tracker is None:
        tracker = LiveTensorTracker(round_to=round_to, device=None if device == "meta" else device,
                                    kernel_workspace=kernel_workspace and device != "meta")
    classify = param_classifier(model)
    tracker.register_model(model, classify)
    tracker.attach_modules(model)
    opt = optimizer or make_optimizer(model, plan)
    for name, t in getattr(opt, "name2qmap", {}).items():  # bitsandbytes' shared 8-bit maps, made at init
        if isinstance(t, torch.Tensor):
            tracker.register(t, Term.OPTIMIZER_STATE, f"optimizer.qmap.{name}")
    batch = make_batch(plan, vocab_size, device, seed)
    lm_head = model.get_output_embeddings()
    hook = lm_head.register_forward_hook(lambda *_: tracker.set_phase(Phase.LOSS))
    autocast = (torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                               dtype=TORCH_DTYPE[plan.autocast]) if plan.autocast else contextlib.nullcontext())
    capture = getattr(tracker, "capture_kernel_workspace", None)  # duck-typed trackers may lack it
    try:
        with (capture() if capture is not None else contextlib.nullcontext()), tracker, \
                (step_context() if step_context is not None else contextlib.nullcontext()):
            for step in range(steps):
                if progress is not None:
                    progress(f"step {step + 1}/{steps}")
                if step == steps - 1:
                    tracker.reset_peak()
                elif fast_warmup:
                    tracker.set_phase(Phase.OPTIMIZER)
                    # a multimodal model's other towers never run in a text-only step: their trainable
                    # parameters (LoRA on the vision Linears) get no gradient, so no optimizer state
                    idle = {id(p) for t in tower_modules(model) for p in t.parameters()}
                    for p in model.parameters():
                        if p.requires_grad and id(p) not in idle:
                            p.grad = torch.zeros_like(p)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    continue
                for _micro in range(plan.gradient_accumulation_steps):  # grads accumulate across micro-batches
                    tracker.set_phase(Phase.FORWARD)
                    with autocast:
                        out = model(**batch, use_cache=False)  # Trainer: use_cache=False
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
                    params = [(n, p, classify(n, p)) for n, p in model.named_parameters()]
                    params += [(n, b, Term.OTHER_PARAMS) for n, b in model.named_buffers()]
                    # longrope's long_inv_freq: model state kept as a plain attribute, not a buffer
                    params += [(f"{n}.{k}", v, Term.OTHER_PARAMS) for n, mod in model.named_modules()
                               for k, v in vars(mod).items() if k.endswith("long_inv_freq") and isinstance(v, torch.Tensor)]
                    tracker.label(grads=grads, optimizer_state=state, vocab_size=vocab_size, tokens=plan.tokens,
                                  params=params)
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


def make_batch(plan: TrainPlan, vocab_size: int, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """A random batch of `plan`'s shape, as a collator hands it to the model (labels = input ids).

    Padded plans (`plan.padding`) get an attention_mask with the last eighth of the first row padded
    (memory depends on the shapes, not on how much is padding) and -100 labels there.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (plan.batch_size, plan.seq_len), generator=g)
    batch: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if plan.padding != "none":
        mask = torch.ones_like(ids)
        mask[0, plan.seq_len - max(1, plan.seq_len // 8):] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if plan.packing or plan.padding_free:
        batch = packed_batch(ids, plan.padding_free)
    if device != "cpu":
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def packed_batch(ids, flatten: bool) -> dict[str, Any]:
    """The batch TRL's collator hands the model for packed rows `ids` [B, S] (no attention_mask).

    Each row holds two sequences (split at S // 2; one when S == 1) with position ids restarting at
    each, labels -100 at every sequence start (trl 1.16 DataCollatorForLanguageModeling). `flatten`
    (padding_free): the rows concatenated into one [1, B*S] row, as its padding-free collator and
    transformers' DataCollatorWithFlattening do (the flash varlen kwargs are left to the model, which
    derives them from the position ids). NB: memory depends on the row shape, not on where the
    boundaries fall (tests/test_packing.py checks two compositions on real steps); two sequences per
    row is the conservative case: a row holding one sequence gets no packed mask (SDPA then skips it).
    """
    B, S = ids.shape
    pos = torch.arange(S)
    if S > 1:
        pos = torch.where(pos < S // 2, pos, pos - S // 2)
    pos = pos.expand(B, S).contiguous()
    if flatten:
        ids, pos = ids.reshape(1, B * S), pos.reshape(1, B * S)
    return {"input_ids": ids, "position_ids": pos, "labels": ids.masked_fill(pos == 0, -100)}


def cpu_step(config: dict[str, Any], plan: TrainPlan, steps: int = 2, seed: int = 0,
             kernel_workspace: bool = False) -> StepResult:
    """A real CPU training step of `plan` on random weights built from `config`.

    `kernel_workspace`: also count what kernels allocate internally (oneDNN's scratchpad in bf16
    matmuls: up to ~200 KB per `mm` on 2 threads here, depending on shapes, threads and CPU ISA), as
    term `workspace`; off by default because estimate and simulate do not model it (see run_steps).
    """
    plan = plan.replace(device="cpu")
    model = load_model(config, plan, device="cpu", seed=seed)
    model = adapt(model, plan)
    return run_steps(model, plan, vocab_size=text_vocab_size(config), steps=steps, device="cpu", seed=seed,
                     kernel_workspace=kernel_workspace)
