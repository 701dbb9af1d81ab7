"""The `simulate` entry point: build on meta, adapt, step under the tracker with the patches on.

`simulate(config, plan)` builds the model on meta (`build`), runs the very same `runtime.load.adapt`
(prepare_model_for_kbit_training, get_peft_model, checkpointing as the HF Trainer sets it), the HF
optimizer (`patches.make_meta_optimizer`) and `runtime.step.run_steps` on meta tensors under the
live-tensor tracker, configured with the emulated device's kernels (`kernels`, `fastmeta`), inside
the patches (`patches`, `emulation`, `moe`). It returns a `result.SimulateResult`.

The steps before the last only create the optimizer state (`run_steps(fast_warmup=True)`; the
optimizer state is all a step leaves behind); `simulate(full_warmup=True)` traces them too, with the
same result (tested).

Patch 9: ``gc`` is disabled during the run (the collector's passes over ~10^5 records cost ~40 % of
the time); warnings about transformers' own deprecations are silenced.

Failures: an exception raised by the HF stack itself (its innermost frame, standard-library frames
skipped, is in torch, transformers, peft, bitsandbytes or accelerate: the library refuses the
configuration, and the real step would fail the same way) becomes `StepWouldFail`, a one-line
`MemplanError` (AttributeError included: peft's all-linear wraps Llama 4's router, an nn.Linear subclass
returning a tuple, and peft's forward then fails with "'tuple' object has no attribute 'dtype'"). Anything else, memplan's own bugs in particular, propagates unchanged.
"""

from __future__ import annotations

import contextlib

import gc
import importlib.util
import sys
import time
import warnings
from typing import Any

from ..errors import MemplanError, MissingExtraError
from ..formulas import MODELED_VERSIONS
from ..model import ModelSpec
from ..plan import TrainPlan

_NEEDED = ("torch", "transformers", "peft", "bitsandbytes")
#: top-level packages whose exceptions mean "the HF stack refuses this plan": the libraries modelled
HF_STACK = (*MODELED_VERSIONS, "liger_kernel", "triton")


class StepWouldFail(MemplanError):
    """The traced step fails the way the real one would (a library refuses the configuration)."""


def _check_extras() -> None:
    for mod in _NEEDED:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtraError("simulate", "torch, transformers, peft and bitsandbytes", "sim")
    # bitsandbytes warns at import, on AVX512-BF16 CPUs, that an optional hub kernel is missing: not ours
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class Progress:
    """'memplan: building model…' lines on stderr, once the run has lasted `after` seconds.

    Short runs (tiny models, tests) stay silent; `enabled=None` means "when stderr is a terminal".
    """

    def __init__(self, enabled: bool | None, after: float = 2.0):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self.after = after

    def __call__(self, msg: str) -> None:
        if self.enabled and time.perf_counter() - self.t0 >= self.after:
            print(f"memplan: {msg}…", file=sys.stderr, flush=True)


def raising_package(exc: BaseException) -> str:
    """The top-level package of the innermost frame that raised `exc`, standard-library frames skipped
    (so `copy`/`inspect`/`contextlib` called by a library count as that library); "" when unknown."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        top = str(frame.f_globals.get("__name__") or "").partition(".")[0]
        if top and top in sys.stdlib_module_names:
            continue
        return top
    return ""


def _spec_of(config: dict[str, Any]) -> ModelSpec | None:
    from ..model import model_from_config

    try:
        return model_from_config(config)
    except MemplanError:  # an architecture outside memplan's table: simulate runs it all the same
        return None


def simulate(config: dict[str, Any] | ModelSpec, plan: TrainPlan, steps: int = 2, round_to: int | None = None,
             progress: bool | None = None, full_warmup: bool = False):
    """Trace `steps` training steps of `plan` on the meta device; return the last step's peak.

    `config` is a config.json dict (with `model_type`) or a `ModelSpec` (its config is traced, and the
    result's `to_dict()` names it). `plan.device` is the device emulated; `round_to` defaults to 512
    for "cuda" and 1 for "cpu". The steps before the last one only create the optimizer state (what a
    step leaves behind) unless `full_warmup`, which traces them fully (same result, twice the time;
    the tests check both). `progress`: lines on stderr (default: when stderr is a terminal). Returns a
    `SimulateResult`; raises `StepWouldFail` when the HF stack refuses the plan (see the module doc).
    """
    say = Progress(progress, after=0.0 if progress else 2.0)  # asked for (the CLI): every line
    _check_extras()
    from ..runtime.tracker import LiveTensorTracker
    from .fastmeta import FAST_KERNELS
    from .kernels import bnb_impls, kernel_temps

    if isinstance(config, ModelSpec):
        spec, config = config, dict(config.config)
    else:
        spec, config = _spec_of(config), dict(config)
    if round_to is None:
        round_to = 512 if plan.device == "cuda" else 1
    counted = ("meta", "cpu") if plan.device == "cpu" else ("meta",)
    tracker = LiveTensorTracker(round_to=round_to, device=counted, bnb_impls=bnb_impls(plan.device),
                                kernel_temps=kernel_temps(plan.device), fast_kernels=FAST_KERNELS)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # ~10^5 short-lived records and tensors: the cyclic collector would cost ~40% of the run
    try:
        with warnings.catch_warnings():
            # transformers' deprecation notices for gradient_checkpointing_enable & co. are not ours
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", module="peft")  # e.g. rank_pattern keys of a wrapped MoE
            return _simulate(config, spec, plan, steps, tracker, say, full_warmup)
    except MemplanError:
        raise
    except (ValueError, RuntimeError, NotImplementedError, TypeError, AttributeError) as e:
        pkg = raising_package(e)
        if pkg not in HF_STACK:
            raise  # memplan's own bug (or the caller's): not a verdict on the plan
        # transformers / peft / torch refusing the configuration: the real step would fail the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepWouldFail(f"the step cannot run with this plan ({type(e).__name__} from {pkg}): {first}") from e
    finally:
        if gc_was_enabled:
            gc.enable()


def _simulate(config, spec, plan, steps, tracker, say, full_warmup):
    import dataclasses

    import torch

    from ..runtime.load import adapt, text_vocab_size
    from ..runtime.step import StepResult, run_steps
    from .build import build_meta_model
    from .emulation import MetaEmulation
    from .flash import check_flash_plan, flash_patches
    from .patches import build_patches, make_meta_optimizer, step_patches
    from .result import SimulateResult

    round_to = tracker.round_to
    check_flash_plan(plan)
    packed = plan.packing or plan.padding_free
    with build_patches(packed=packed), (flash_patches(packed, 2 * plan.batch_size)  # packed_batch: 2 per row
                                        if plan.attn_implementation == "flash_attention_2" else contextlib.nullcontext()):
        say("building model")
        model = build_meta_model(config, plan)
        with torch.device("meta"):  # LoRA layers born on meta: no real init of ~10^9 numbers
            model = adapt(model, plan)
        opt = make_meta_optimizer(model, plan, tracker)
        emu = MetaEmulation(plan.device)
        offload = None
        if plan.activation_offloading:  # NB axolotl's checkpoint offload is traced without its host copies
            from ..runtime.offload import OffloadRecord

            offload = OffloadRecord()
        with _liger(model, plan, tracker):  # patch 14: Liger applied as the Trainer does, Triton stubbed
            step = run_steps(model, plan, vocab_size=text_vocab_size(config), steps=steps, device="meta",
                             round_to=round_to, optimizer=opt, tracker=tracker,
                             step_context=lambda: step_patches(emu, plan.device, plan.trainer), progress=say,
                             fast_warmup=not full_warmup, offload=offload)
    fields = {f.name: getattr(step, f.name) for f in dataclasses.fields(StepResult)}
    fields.update(versions=versions(plan), notes=_notes(config, plan, model))
    return SimulateResult(**fields, model=spec, plan=plan)


def _liger(model, plan: TrainPlan, tracker):
    """Liger's kernels applied to the model (`runtime.liger.applied`) with their Triton launches stubbed
    (`simulate.liger`, patch 14); nothing without `use_liger_kernel`."""
    import contextlib

    if not plan.use_liger_kernel:
        return contextlib.nullcontext()
    from ..runtime.liger import applied
    from .liger import liger_patches

    st = contextlib.ExitStack()
    st.enter_context(applied(model, plan))
    st.enter_context(liger_patches(tracker))
    return st


def versions(plan: TrainPlan | None = None) -> dict[str, str]:
    """Installed versions of the libraries whose behaviour the trace follows: those the estimate models,
    and the recipe libraries the plan uses (`estimate.recipe_versions`: TRL, liger-kernel; not deepspeed,
    which simulate does not trace)."""
    from importlib.metadata import PackageNotFoundError, version

    from ..estimate import recipe_versions

    out = {}
    recipes = [k for k in recipe_versions(plan) if k != "deepspeed"] if plan is not None else []
    for pkg in (*MODELED_VERSIONS, *recipes):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            pass
    return out


def _notes(config: dict[str, Any], plan: TrainPlan, model) -> list[str]:
    notes = [f"meta-device trace emulating {plan.device}"
             + (" (512 B allocation rounding; CUDA kernels per torch/bitsandbytes sources, not measured)"
                if plan.device == "cuda" else "")]
    if plan.quant == "int8":
        notes.append("LLM.int8 outlier columns assumed absent")
    if plan.use_liger_kernel:
        notes.append("Liger kernels applied as the HF Trainer applies them; their Triton launches are stubbed on "
                     "meta (what is counted is what Liger's Python wrappers allocate), not yet checked on hardware")
    if plan.attn_implementation == "flash_attention_2":
        notes.append("FlashAttention-2 emulated on meta: allocations and saved tensors per flash-attn 2.x's source "
                     "(memplan/simulate/flash.py), not yet checked on hardware")
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if config.get("model_type") in ("llama4", "llama4_text"):  # Llama4TextExperts: no experts interface
        notes.append("Llama 4 experts: every expert runs on all T tokens (bmm over [E, T, .], router scores "
                     "scale the input): memory independent of routing")
    elif config.get("num_local_experts") or config.get("num_experts"):
        if impl == "eager":
            notes.append("MoE eager experts loop: balanced routing (T*top_k slots spread evenly over experts)")
        else:
            notes.append(f"MoE experts implementation {impl!r}: memory independent of routing")
    return notes
