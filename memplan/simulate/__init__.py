"""simulate: a real HF-Trainer-like QLoRA/LoRA training step, traced on the `meta` device.

Needs the `sim` extra (torch, transformers, peft, bitsandbytes). `simulate(config, plan)` →
`SimulateResult`. The model is built from its config.json on `meta` the way `from_pretrained` builds
it and quantized there, then the very same `memplan.runtime` step (adapt, the HF optimizer,
`run_steps`, the live-tensor tracker) runs on meta tensors. No tensor memory is allocated: a
Llama-3-70B step takes seconds and < 1 GB of RAM (benchmarks/bench_simulate.py). Only what is
specific to the meta device lives here; the instrument itself is `memplan.runtime`.

`plan.device` names the real device being emulated:

- ``"cpu"``: no rounding; the CPU kernels. tests/test_simulate.py checks this against real CPU steps
  (`memplan.runtime.step.cpu_step`): peak, every term and every phase peak agree to the byte on all
  tested configs.
- ``"cuda"``: each storage rounded up to 512 B (the caching allocator's granularity) and the CUDA
  kernels' allocations, as far as torch's and bitsandbytes' sources say (not measured on a GPU
  here); paged optimizer state (tensors of ≥ 100,000 elements) goes to `paged_bytes`, outside the
  device peak.

Modules (each documents the patches it applies; all are applied only inside `simulate` and restored
afterwards, which the tests check):

- `driver`: the entry point, `StepWouldFail` (what the HF stack refuses), progress lines, patch 9
  (gc off, library deprecation warnings silenced).
- `build`: the model on meta with bitsandbytes' Linear replacement, 4-bit/int8 quantization on meta,
  bitsandbytes' `name2qmap` kept on CPU.
- `emulation`: `MetaEmulation`, SDPA routing (patch 2), autocast (patch 3), CUDA dropout (patch 6).
- `kernels`: bitsandbytes kernels (patch 4) and CUDA kernel workspaces (patch 5) on meta.
- `fastmeta`: outputs of simple ops computed directly instead of torch's slow Python meta kernels
  (checked against torch's by `LiveTensorTracker.check_fast`).
- `moe`: mixture-of-experts layers (patch 8).
- `moe_gpt_oss`: gpt_oss's eager experts loop with balanced routing (patch 12).
- `patches`: transformers' packed-sequence check (patch 1), the optimizer on meta (patch 7), the
  checkpoint's CPU RNG snapshot (patch 10), and the set of patches entered for the steps.
- `result`: `SimulateResult` and its `to_dict()` (the `memplan.simulate/1` JSON).

Known limitations
-----------------
- CPU kernel workspaces are not modelled: a bf16 matmul on CPU allocates oneDNN's scratchpad through
  torch's allocator for the duration of the op (40-200 KB per ``mm`` on the test shapes; it depends
  on the shapes, the thread count and the CPU's ISA; fp32 matmuls through MKL allocate none there).
  A real CPU step measures it with ``cpu_step(kernel_workspace=True)`` (tests/runtime/test_instrument.py).
- Other data-dependent ops (``.item()``, ``bool(tensor)``, ``torch.isnan(x).any()``, ``nonzero``
  outside the eager MoE loop, cross-entropy with ``num_items_in_batch``) raise on meta. The step
  calls none of them for llama, mistral, qwen2/3, gemma/2/3, phi3 and mixtral.
- CUDA: kernel choice and kernel-internal buffers follow torch's / bitsandbytes' sources (flash >
  mem-efficient > math for SDPA), not a GPU measurement. Recent torch prefers cuDNN attention on
  sm90/sm100 with cuDNN > 9.15 (`check_prefer_cudnn_attention`); it saves the same output + fp32
  softmax statistics as flash, but its backward workspace is not modelled.
  Not modelled: cuBLAS workspaces, mem-efficient attention's backward workspace, split-KV
  accumulators of flash forward (small problems only), and bitsandbytes' per-architecture choice
  of the fused ``gemm_4bit`` kernel for ≤ 1536 tokens (assumed fused; some GPUs dequantize there).
- Allocator segments, fragmentation and the CUDA context are not simulated (`allocator_overhead`,
  `cuda_context` and `workspace` stay 0): those come from the calibrated GPU profiles.
- LLM.int8 outlier columns are assumed absent.

Importing this package imports no heavy module.
"""

from __future__ import annotations

from typing import Any


def simulate(config: Any, plan, steps: int = 2, round_to: int | None = None,
             progress: bool | None = None, full_warmup: bool = False):
    """Trace `steps` training steps of `plan` on the meta device (see `memplan.simulate.driver.simulate`).

    `config`: a config.json dict or a `ModelSpec`. Returns a `SimulateResult` (`.to_dict()` is the
    `memplan simulate --json` output). Raises `memplan.errors.MissingExtraError` when torch,
    transformers, peft or bitsandbytes is missing, `StepWouldFail` when the HF stack refuses the plan.
    """
    from .driver import simulate as _simulate

    return _simulate(config, plan, steps=steps, round_to=round_to, progress=progress, full_warmup=full_warmup)


def __getattr__(name: str) -> Any:
    if name == "StepWouldFail":  # a MemplanError: no heavy import
        from .driver import StepWouldFail

        return StepWouldFail
    if name == "SimulateResult":
        from .result import SimulateResult

        return SimulateResult
    raise AttributeError(f"module 'memplan.simulate' has no attribute {name!r}")


__all__ = ["simulate", "StepWouldFail", "SimulateResult"]
