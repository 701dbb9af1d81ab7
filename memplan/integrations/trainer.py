"""`MemplanCallback`: memory of a real `transformers.Trainer` (or TRL `SFTTrainer`) run, against the estimate.

    from memplan.integrations import MemplanCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MemplanCallback(record_path="run.json")])

Per optimizer step it measures
- CUDA: `torch.cuda.max_memory_allocated` / `max_memory_reserved` (reset at `on_step_begin`, read at
  `on_pre_optimizer_step` and `on_step_end`) and NVML device used memory (sampled on a thread);
- CPU: the peak of live tensor bytes from the live-tensor tracker, for the first `track_steps` steps
  (it slows every op, so it stops after those).
At each logging step it adds the peaks since the previous log to the Trainer's logs
(`memplan/peak_allocated_gib`, `memplan/peak_reserved_gib`, `memplan/nvml_used_gib`,
`memplan/estimate_gib`). On the first `compare_steps` steps it compares the peak with memplan's
estimate for the trainer's own arguments (model config, BitsAndBytesConfig, LoraConfig,
TrainingArguments, and the batch shape seen by the model's first forward) and warns when the
measurement exceeds the estimate by more than `margin`. At the end it can write a `memplan.run/1`
record (`record_path`).

What is compared: CUDA reserved bytes vs the estimate's `reserved_bytes` (torch's allocator cannot
see the CUDA context, so NVML is logged but not compared: the model was loaded before the callback
could take a baseline); CPU live bytes vs the estimate's `allocated_bytes`.

Known limitations: the batch inputs are built by the Trainer before `on_step_begin`, so on the CPU
they are not counted (a few bytes per token); a step that raises leaves the CPU tracker pushed.
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import datetime, timezone
from typing import Any

from transformers import TrainerCallback

from ..errors import MemplanError
from ..present import gib, share
from ..units import GiB

logger = logging.getLogger("memplan")


def _first_param(model: Any):
    return next(iter(model.parameters()))


def plan_for_trainer(model: Any, args: Any, batch_size: int, seq_len: int, padding: str | None = None):
    """The TrainPlan a Trainer run follows: model config, its quantization config, the PEFT LoraConfig,
    TrainingArguments and the batch shape. Raises MemplanError when memplan cannot express it.

    `padding`: "longest" when the batches come with an attention_mask (a padding collator: TRL's
    always), None to leave the plan's default. TRL's SFTTrainer is recognised by the fused LM head it
    adds to the model (`trainer="sft"`); the adapters' dtype is read off the model (SFTTrainer casts
    those of a quantized model to bf16)."""
    import torch

    from ..plan import plan_from
    from ..runtime.step import has_fused_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    q = getattr(cfg, "quantization_config", None)
    peft_cfg = getattr(model, "peft_config", None)
    lora = None
    if isinstance(peft_cfg, dict) and peft_cfg:
        lora = peft_cfg.get("default") or next(iter(peft_cfg.values()))
    quantized = bool(q is not None and (getattr(q, "load_in_4bit", False) or getattr(q, "load_in_8bit", False)
                                        or (isinstance(q, dict) and (q.get("load_in_4bit") or q.get("load_in_8bit")))))
    kw: dict[str, Any] = {"batch_size": int(batch_size), "seq_len": int(seq_len)}
    tm = getattr(lora, "target_modules", None) if lora is not None else None
    if tm is not None and not isinstance(tm, str):
        # peft 0.21 stores "all-linear" expanded to full module paths (model.layers.0.mlp.down_proj);
        # the estimator matches leaf names (applied to every layer)
        kw["target_modules"] = tuple(sorted({str(t).rsplit(".", 1)[-1] for t in tm}))
    if padding is not None:
        kw["padding"] = padding
    if has_fused_head(model):
        kw["trainer"] = "sft"
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    lora_a = next((p for n, p in model.named_parameters() if "lora_A" in n), None)
    if lora_a is not None and lora_a.dtype in names:
        kw["adapter_dtype"] = names[lora_a.dtype]
    dev = _first_param(model).device.type
    kw["device"] = "cuda" if dev == "cuda" else "cpu"
    attn = getattr(cfg, "_attn_implementation", None)
    if attn in ("sdpa", "eager", "flash_attention_2"):
        kw["attn_implementation"] = attn
    # load dtype: the quant state's dtype for 4-bit weights, else the frozen base Linear weights' dtype
    load_dt = None
    for mod in base.modules():
        w = getattr(mod, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None and getattr(qs, "dtype", None) is not None:
            load_dt = qs.dtype
            break
        if isinstance(mod, torch.nn.Linear) and w is not None and not w.requires_grad and w.is_floating_point():
            load_dt = w.dtype
            break
    if load_dt in names:
        kw["dtype"] = names[load_dt]
    if quantized:
        emb = base.get_input_embeddings()
        # prepare_model_for_kbit_training upcasts every non-4-bit floating parameter to fp32
        kw["prepare"] = emb is not None and emb.weight.dtype == torch.float32 and kw.get("dtype") != "fp32"
    else:
        kw["method"] = "lora" if lora is not None else "full"
        kw["quant"] = "none"
        kw["prepare"] = False
    return plan_from(bnb_config=q if quantized else None, lora_config=lora, training_args=args, **kw)


class MemplanCallback(TrainerCallback):
    """Logs peak allocated / reserved / NVML memory per logging step and checks it against the estimate.

    margin: warn when the measurement exceeds the estimate by more than this fraction (0.05 = 5 %).
    compare_steps: compare on optimizer steps 1..compare_steps (step 1 has no optimizer state yet, so
        it only warns when even that is over).
    track_steps: CPU only, steps measured with the live-tensor tracker (default: compare_steps).
    gpu: catalogue GPU for the estimate's overheads (default: the one NVML / torch reports).
    record_path: write a memplan.run/1 record there at the end of training (a .json file or a folder).
    """

    def __init__(self, margin: float = 0.05, compare_steps: int = 3, track_steps: int | None = None,
                 gpu: str | None = None, record_path: str | os.PathLike[str] | None = None, warn: bool = True):
        self.margin = margin
        self.compare_steps = compare_steps
        self.track_steps = compare_steps if track_steps is None else track_steps
        self.gpu = gpu
        self.record_path = record_path
        self.warn = warn
        self.history: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.estimate = None
        self.plan = None
        self.estimate_note: str | None = None
        self._since_log: list[dict[str, Any]] = []
        self._shape: tuple[int, int] | None = None
        self._padding: str | None = None
        self._hook = None
        self._device = "cpu"
        self._dev_index = 0
        self._nvml = None
        self._sampler = None
        self._tracker = None
        self._fb: tuple[int, int] | None = None
        self._model = None
        self._gpu_spec = None
        self._gpu_info: dict[str, Any] | None = None
        self._nvml_start: int | None = None

    # ---- setup ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        self._model = model
        p = _first_param(model)
        self._device = "cuda" if p.device.type == "cuda" else "cpu"
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)
        if self._device == "cuda":
            from ..profile.nvml import Nvml, NvmlSampler
            from ..profile.runner import match_gpu

            self._dev_index = p.device.index if p.device.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(self._dev_index)
            self._nvml = Nvml(index=self._dev_index)
            self._nvml.rebind_uuid(str(getattr(props, "uuid", "") or ""))
            self._nvml_start = self._nvml.used()
            self._sampler = NvmlSampler(self._nvml).start() if self._nvml.available else None
            self._gpu_spec = match_gpu(self.gpu, self._nvml.name(), props.name)
            self._gpu_info = {"name": self._gpu_spec.name if self._gpu_spec else None, "nvml_name": self._nvml.name(),
                              "torch_name": props.name, "memory_bytes": self._nvml.total() or int(props.total_memory),
                              "compute_capability": f"{props.major}.{props.minor}",
                              "catalogue": self._gpu_spec is not None}
        return control

    def _capture(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        shape = getattr(ids, "shape", None)
        if shape is not None and len(shape) == 2:
            b, s = int(shape[0]), int(shape[1])
            if self._shape is None or b * s > self._shape[0] * self._shape[1]:
                self._shape = (b, s)
            if kwargs.get("attention_mask") is not None:  # a padding collator's batch (TRL's always)
                self._padding = "longest"

    # ---- per step --------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self._device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self._dev_index)
            if self._sampler is not None:
                self._sampler.take()
            self._fb = None
        elif state.global_step < self.track_steps:
            self._start_cpu_tracker(kwargs.get("optimizer"))
        return control

    def _start_cpu_tracker(self, optimizer) -> None:
        import torch

        from ..runtime.classify import param_classifier
        from ..runtime.tracker import LiveTensorTracker
        from ..terms import Term

        t = LiveTensorTracker(device="cpu")
        t.register_model(self._model, param_classifier(self._model))
        for p in self._model.parameters():
            if p.grad is not None:
                t.register(p.grad, Term.GRADIENTS)
        for st in getattr(optimizer, "state", {}).values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    t.register(v, Term.OPTIMIZER_STATE)
        t.__enter__()
        t.set_phase("forward_backward")
        self._tracker = t

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._device == "cuda":
            import torch

            self._fb = (int(torch.cuda.max_memory_allocated(self._dev_index)),
                        int(torch.cuda.max_memory_reserved(self._dev_index)))
        elif self._tracker is not None:
            self._tracker.set_phase("optimizer")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        rec: dict[str, Any] = {"step": step}
        if self._device == "cuda":
            import torch

            a = int(torch.cuda.max_memory_allocated(self._dev_index))
            r = int(torch.cuda.max_memory_reserved(self._dev_index))
            if self._fb:
                a, r = max(a, self._fb[0]), max(r, self._fb[1])
            rec.update(allocated_bytes=a, reserved_bytes=r,
                       nvml_used_bytes=self._sampler.take() if self._sampler else None)
        elif self._tracker is not None:
            t, self._tracker = self._tracker, None
            t.__exit__(None, None, None)
            rec.update(allocated_bytes=int(t.peak), phase=t.peak_phase)
        else:
            return control
        self.history.append(rec)
        self._since_log.append(rec)
        if self.estimate is None and self.estimate_note is None and self._shape is not None:
            self._make_estimate(args)
        if self.estimate is not None and step <= self.compare_steps:
            self._compare(rec)
        return control

    def _make_estimate(self, args) -> None:
        from ..catalogue import resolve_model
        from ..estimate import compute

        try:
            base = self._model.get_base_model() if hasattr(self._model, "get_base_model") else self._model
            self.spec = resolve_model(base.config)
            self.plan = plan_for_trainer(self._model, args, *self._shape, padding=self._padding)
            self.estimate = compute(self.spec, self.plan, self._gpu_spec)
        except MemplanError as e:
            self.estimate_note = f"no estimate for this run: {e}"
            logger.warning("memplan: %s", self.estimate_note)

    def _compare(self, rec: dict[str, Any]) -> None:
        e = self.estimate
        key, est = ("reserved_bytes", e.reserved_bytes) if self._device == "cuda" else ("allocated_bytes",
                                                                                        e.allocated_bytes)
        meas = rec.get(key)
        if meas is None or est <= 0:
            return
        rec["estimate_bytes"] = est
        rec["error_pct"] = round(100.0 * (est - meas) / meas, 3)
        if meas > est * (1 + self.margin):
            what = key.replace("_bytes", "")
            msg = (f"memplan: step {rec['step']}: measured {what} {gib(meas, 3)} GiB exceeds the "
                   f"estimate {gib(est, 3)} GiB by {share(meas - est, est)} (margin "
                   f"{100 * self.margin:.0f}%); plan: {self.plan}")
            self.warnings.append(msg)
            logger.warning(msg)
            if self.warn:
                warnings.warn(msg, RuntimeWarning, stacklevel=2)

    # ---- logs and the end ------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._since_log or logs is None:
            return control
        rows, self._since_log = self._since_log, []
        add: dict[str, float] = {}
        for key, name in (("allocated_bytes", "peak_allocated_gib"), ("reserved_bytes", "peak_reserved_gib"),
                          ("nvml_used_bytes", "nvml_used_gib")):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                add[f"memplan/{name}"] = round(max(vals) / GiB, 4)
        if self.estimate is not None:
            est = self.estimate.reserved_bytes if self._device == "cuda" else self.estimate.allocated_bytes
            add["memplan/estimate_gib"] = round(est / GiB, 4)
        logs.update(add)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(add)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None
        if self._sampler is not None:
            self._sampler.stop()
        if self.record_path is not None:
            from ..profile.record import write_run

            write_run(self.run_record(), self.record_path)
        return control

    def run_record(self):
        """The measurement so far as a MeasuredRun (status success; per-term attribution: none)."""
        from ..profile.record import MeasuredRun
        from ..profile.runner import model_record, package_versions

        steady = [r for r in self.history if r["step"] >= 2] or self.history
        best = max(steady, key=lambda r: r.get("allocated_bytes") or 0) if steady else {}
        res = [r["reserved_bytes"] for r in steady if r.get("reserved_bytes") is not None]
        nv = [r["nvml_used_bytes"] for r in steady if r.get("nvml_used_bytes") is not None]
        measured = {"terms": None, "attribution": "none",
                    "peak": {"phase": best.get("phase"), "step": best.get("step"),
                             "allocated_bytes": best.get("allocated_bytes"),
                             "reserved_bytes": max(res) if res else None, "device_bytes": None,
                             "nvml_used_bytes": max(nv) if nv else None},
                    "steps": self.history, "phases": {}, "paged_bytes": None,
                    "nvml": {"available": bool(self._nvml and self._nvml.available),
                             "at_train_begin_used_bytes": self._nvml_start}}
        est = None
        if self.estimate is not None:
            d = self.estimate.to_dict()
            est = {"terms": d["terms"], "peak": d["peak"], "paged_bytes": d["paged_bytes"],
                   "gpu": d["gpu"]["name"] if d.get("gpu") else None}
        spec = getattr(self, "spec", None)
        if spec is None:
            from ..catalogue import resolve_model

            base = self._model.get_base_model() if hasattr(self._model, "get_base_model") else self._model
            spec = resolve_model(base.config)
        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        plan = self.plan.to_dict() if self.plan is not None else {}
        notes = ["measured by MemplanCallback inside a transformers Trainer run (no per-term attribution)"]
        if self.estimate_note:
            notes.append(self.estimate_note)
        notes += self.warnings
        return MeasuredRun(model=model_record(spec), plan=plan, device=self._device, status="success",
                           measured=measured, estimate=est, gpu=self._gpu_info,
                           versions=package_versions(self._nvml), steps=len(self.history), weights="pretrained",
                           run_id=created.replace("-", "").replace(":", "") + "-trainer", created=created,
                           notes=tuple(notes), source="MemplanCallback")
