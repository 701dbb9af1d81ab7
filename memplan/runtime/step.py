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
    #: host (CPU RAM) bytes alive at the device peak, by term (activation offloading's host copies)
    host: dict[str, int] = field(default_factory=dict)


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
              fast_warmup: bool = False, kernel_workspace: bool = False, offload: Any = None,
              backward: Any = None) -> StepResult:
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
    `offload`: an `OffloadRecord` to run each micro-batch under TRL's activation offloading
    (`runtime.offload.offload_context`, as `SFTTrainer.training_step` does) and fill with what it packed.
    `backward(loss)`: runs the backward instead of `loss.backward()` (a DeepSpeed engine's
    `engine.backward`, as accelerate's `backward` calls it; runtime/deepspeed.py).
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
    micro = contextlib.nullcontext()
    if offload is not None:
        from .offload import offload_context

        micro = offload_context(model, device, tracker, offload,
                                bring_back=device == "meta" and plan.device == "cuda")
    lm_head = model.get_output_embeddings()
    sft = plan.trainer == "sft"
    if sft:  # SFTTrainer never calls lm_head: its fused head starts when the backbone returns
        add_sft_head(model)
        lm_head = _base(model).base_model
    hook = lm_head.register_forward_hook(lambda *_: tracker.set_phase(Phase.LOSS))
    head_ops = _FusedHeadOps(tracker) if sft else contextlib.nullcontext()
    autocast = (torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                               dtype=TORCH_DTYPE[plan.autocast]) if plan.autocast else contextlib.nullcontext())
    capture = getattr(tracker, "capture_kernel_workspace", None)  # duck-typed trackers may lack it
    try:
        with (capture() if capture is not None else contextlib.nullcontext()), tracker, head_ops, \
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
                    with micro:  # SFTTrainer.training_step: forward and backward under the offloading hooks
                        tracker.set_phase(Phase.FORWARD)
                        if sft:
                            out, loss = sft_loss(model, batch, autocast)
                        else:
                            with autocast:
                                out = model(**batch, use_cache=False)  # Trainer: use_cache=False
                            loss = out.loss
                        if not keep_outputs:
                            del out
                        if plan.gradient_accumulation_steps > 1:
                            loss = loss / plan.gradient_accumulation_steps  # as Trainer.training_step does
                        tracker.set_phase(Phase.BACKWARD)
                        if backward is not None:
                            backward(loss)
                        else:
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
                    if sft:
                        head_ops.label_logits(vocab_size)
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
        host=tracker.host_at(at) if offload is not None else {},
    )


# ---- TRL's SFTTrainer step (plan.trainer == "sft") -----------------------------------------------------

#: the per-token fields SFTTrainer asks its fused LM head for (trl 1.16 trainer/sft_trainer.py
#: SFTTrainer.__init__): log_probs for the loss, entropy and is_top1 for its `entropy` and
#: `mean_token_accuracy` metrics
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_fused_head(model) -> bool:
    """Whether TRL's `add_fused_lm_head` patched the (base) model's forward: an instance `forward`
    whose code is trl's `_fused_forward` (functools.wraps keeps the original's name, not its code)."""
    f = _base(model).__dict__.get("forward")
    code = getattr(getattr(f, "__func__", f), "__code__", None)
    return code is not None and code.co_name == "_fused_forward"


def add_sft_head(model) -> None:
    """TRL's fused LM head on the base model, as `SFTTrainer.__init__` adds it (after get_peft_model):
    `trl.trainer.utils.add_fused_lm_head(base, outputs=SFT_OUTPUTS)`."""
    if not has_fused_head(model):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(_base(model), outputs=SFT_OUTPUTS)


def sft_loss(model, batch: dict[str, Any], autocast) -> tuple[Any, Any]:
    """`SFTTrainer.compute_loss` (trl 1.16, loss_type "nll", one process): the model called with
    `fused_lm_head=True` (per-token log-probabilities of the next-token labels, computed in
    [4096 x 32768] tiles by `trl.kernels.ChunkedLogProbFunction`), the loss summed over them and
    divided by the valid-label count, then its `entropy` and `mean_token_accuracy` metrics from the
    head's per-token outputs (scalars; `.item()` left out: it allocates nothing). Returns (outputs, loss):
    the caller drops the outputs before backward, as `compute_loss(return_outputs=False)` does."""
    with autocast:  # accelerate wraps the model's forward in autocast, not the loss
        outputs = model(**batch, use_cache=False, fused_lm_head=True)
    per_token_loss = -outputs.log_probs  # zero on ignored positions
    num_tokens = outputs.label_mask.sum()
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    del per_token_loss, num_tokens
    num_valid = outputs.label_mask.sum()
    entropy_sum = outputs.entropy.detach().sum()
    num_correct = outputs.is_top1.sum()
    _metrics = (entropy_sum / num_valid, num_correct / num_valid)  # noqa: F841 (logged with .item())
    if "attention_mask" in batch:
        _tokens = batch["attention_mask"].sum()  # noqa: F841 (the num_tokens metric)
    return outputs, loss


class _FusedHeadOps:
    """While the step runs: the tracker clock spans of `ChunkedLogProbFunction.forward/backward`, so
    that their [tokens x vocab-chunk] tiles can be labelled `logits` after the step (`label_logits`)."""

    def __init__(self, tracker: LiveTensorTracker) -> None:
        self.tracker = tracker
        self.spans: list[tuple[float, float]] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self):
        from trl.kernels import chunked_logprob as cl

        fn = cl.ChunkedLogProbFunction
        self._saved = {"forward": fn.__dict__["forward"], "backward": fn.__dict__["backward"]}
        for name, orig in self._saved.items():
            setattr(fn, name, staticmethod(self._timed(orig.__func__)))
        return self

    def _timed(self, f):
        def run(*args, **kwargs):
            start = self.tracker.clock
            try:
                return f(*args, **kwargs)
            finally:
                self.spans.append((start, self.tracker.clock + 1))
        return run

    def __exit__(self, *exc) -> None:
        from trl.kernels import chunked_logprob as cl

        for name, orig in self._saved.items():
            setattr(cl.ChunkedLogProbFunction, name, orig)

    def label_logits(self, vocab_size: int) -> None:
        """The 2-D tensors made inside the fused head whose last dimension is a vocabulary tile's width
        (the projection buffer, the fold's [n x c] temporaries, their fp32 copies) -> `logits`."""
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as c

        widths = {c, min(c, vocab_size), vocab_size % c or c}
        for rec in self.tracker.records:
            if (rec.term is None and len(rec.shape) == 2 and rec.shape[-1] in widths
                    and any(a <= rec.created < b for a, b in self.spans)):
                rec.term = Term.LOGITS


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
             kernel_workspace: bool = False, offload: Any = None) -> StepResult:
    """A real CPU training step of `plan` on random weights built from `config`.

    `kernel_workspace`: also count what kernels allocate internally (oneDNN's scratchpad in bf16
    matmuls: up to ~200 KB per `mm` on 2 threads here, depending on shapes, threads and CPU ISA), as
    term `workspace`; off by default because estimate and simulate do not model it (see run_steps).
    """
    plan = plan.replace(device="cpu")
    model = load_model(config, plan, device="cpu", seed=seed)
    model = adapt(model, plan)
    if offload is None and plan.activation_offloading:
        from .offload import OffloadRecord

        offload = OffloadRecord()
    return run_steps(model, plan, vocab_size=text_vocab_size(config), steps=steps, device="cpu", seed=seed,
                     kernel_workspace=kernel_workspace, offload=offload)
