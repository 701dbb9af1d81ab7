"""simulate: a real HF-Trainer-like QLoRA/LoRA training step, traced on the `meta` device.

The model is built from its config.json on `meta` the way `from_pretrained` builds it (the same
`HfQuantizer.preprocess_model`, so the same Linear replacement and skip rules: lm_head, tied weights),
each 4-bit weight is quantized on meta (`Params4bit._quantize("meta")`: bitsandbytes' fake kernels
give the true packed/absmax shapes), then the very same `step.adapt` (prepare_model_for_kbit_training,
get_peft_model, checkpointing as the HF Trainer sets it), the HF optimizer and `step.run_steps` run on
meta tensors under the live-storage tracker. No tensor memory is allocated: a Llama-3-70B step takes
seconds and < 1 GB of RAM (benchmarks/bench_simulate.py).

`plan.device` names the real device being emulated:

- ``"cpu"``: no rounding; the CPU kernels. tests/test_simulate.py checks this against real CPU steps
  (`step.cpu_step`): peak, every term and every phase peak agree to the byte on all tested configs.
- ``"cuda"``: each storage rounded up to 512 B (the caching allocator's granularity) and the CUDA
  kernels' allocations, as far as torch's and bitsandbytes' sources say (not measured on a GPU
  here); paged optimizer state (tensors of ≥ 100,000 elements) goes to `paged_bytes`, outside the
  device peak.

The steps before the last only create the optimizer state (`run_steps(fast_warmup=True)`; the
optimizer state is all a step leaves behind); `simulate(full_warmup=True)` traces them too, with the
same result (tested).

Patches (all applied only inside `simulate` and restored afterwards; the test suite checks that)
--------------------------------------------------------------------------------------------------
1. ``transformers.masking_utils.find_packed_sequence_indices`` → None for meta position ids. It asks
   the data (``.all()``) whether the position ids describe packed sequences; the step feeds one
   unpacked sequence per row, for which the real function returns None too.
2. SDPA routing (``MetaEmulation``, a ``TorchFunctionMode``). On meta, ``scaled_dot_product_attention``
   picks the math kernel and would materialize the S×S scores. It is routed to the kernel the real
   device runs, whose saved tensors it then has:
   CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (any mask, GQA native; saves output +
   logsumexp; dropout > 0 stays on math, as on CPU; a bool mask first becomes a float mask, as on CPU).
   CUDA, torch's priority flash > mem-efficient > math: flash
   (``aten._scaled_dot_product_flash_attention``: fp16/bf16, no mask, head_dim ≤ 256 and a multiple
   of 8, GQA native) saves output + fp32 logsumexp [B, H, S] + rng state; mem-efficient
   (``aten._scaled_dot_product_efficient_attention``: a mask, or fp32) saves output + logsumexp
   padded to a multiple of 32 (mask padded to a multiple of 16 and expanded); for GQA, k/v are
   expanded to the query heads first (torch's meta backward cannot do GQA; an upper bound); else math.
3. Autocast emulation (the same mode). Meta tensors have no autocast dispatch key, so
   ``torch.autocast`` does nothing to them. The step enters ``torch.autocast("cpu", dtype)`` as the
   state carrier (checkpoint recomputation captures and restores it like the real one; code asking
   ``torch.autocast(device_type="meta")`` gets the carrier) and the mode applies the emulated
   device's autocast op lists: lower precision for linear/matmul/bmm/baddbmm/addmm/mm/conv/SDPA
   (CUDA also einsum/addmv/addr/mv...), fp32 for the losses (CUDA also exp/log/pow/rsqrt/layer_norm/
   softplus/...), fp32-unless-dtype-given for softmax/log_softmax/sum/cumsum/prod (CUDA), widest-type
   promotion for cat/stack/index_copy (+addcmul/addcdiv/... on CUDA). It keeps autocast's weight
   cache (low-precision copies of fp32 leaf tensors that require grad, dropped when the outermost
   autocast exits: ``torch.clear_autocast_cache`` is wrapped). For ``"cuda"``,
   ``torch.is_autocast_enabled()`` (no argument, i.e. CUDA) reports the carrier, as peft asks it
   to decide whether to cast the LoRA input to fp32. ``Tensor.backward`` re-enters the mode, which
   torch pops while it handles a call.
4. bitsandbytes kernels (tracker ``bnb_impls``). The registered fake kernels only allocate outputs.
   CPU: ``gemm_4bit`` runs bitsandbytes' default kernel (dequantized absmax + weight, ``F.linear``)
   and the 8-/32-bit optimizer updates run the CPU kernels (state dequantized to fp32, requantized),
   all on meta. CUDA: ``gemm_4bit`` dequantizes + ``F.linear`` past 1536 tokens (or an unaligned K),
   else the fused kernel (output only). ``int8_vectorwise_quant`` assumes no LLM.int8 outlier
   columns (their number depends on the data) and on CPU the int8 training matmul is bitsandbytes'
   CPU one (``MatMul8bitFp``: dequantize + linear), chosen there by device type.
   ``bitsandbytes.functional.name2qmap`` is kept on CPU (quantizing on meta would otherwise leave
   a meta code table cached there for the rest of the process); 8-bit optimizers' code tables are
   moved to meta untracked on CPU (a no-op ``.to`` there, a tracked copy on CUDA).
5. CUDA kernel workspaces (tracker ``kernel_temps``): flash-attention backward allocates, for the
   duration of the op, ``softmax_d``, an fp32 ``dq_accum`` and for GQA expanded ``dk``/``dv``
   (torch's flash_api.cpp ``mha_bwd``).
6. Dropout (CUDA): ``F.dropout`` on meta → ``native_dropout`` (output + bool mask saved), what CUDA
   runs; on meta, as on CPU, torch would build full-dtype noise.
7. Optimizers: ``adamw_torch_fused`` needs "meta" in
   ``torch.optim.optimizer._get_fused_kernels_supported_devices``; on ``"cuda"`` AdamW/SGD get
   ``foreach=True`` (torch's CUDA default; on meta, as on CPU, torch picks the per-tensor loop).
   Paged bitsandbytes state on ``"cuda"`` (≥ 100,000 elements) is created outside the tracker and
   added to ``paged_bytes``; on ``"cpu"`` it is ordinary memory, as bitsandbytes does on CPU.
8. Mixture of experts. transformers 5's default experts implementation (``grouped_mm``) is
   data-independent: all T·top_k token slots go through one grouped matmul whatever the routing,
   so memory does not depend on it. torch's meta ``grouped_mm`` checks CUDA's bf16-only rule; on
   ``"cpu"`` that check is lifted (the CPU kernel takes fp32), on ``"cuda"`` fp32 experts (after
   prepare) raise, as the real CUDA kernel would. With ``experts_implementation="eager"`` (the
   per-expert loop, which asks ``nonzero``/``where``) the loop runs with a deterministic balanced
   routing: token t's j-th choice is expert (t·top_k + j) mod E, so every expert gets T·top_k/E
   slots (±1) (`eager_experts_balanced`, which makes the same tensors as transformers' loop). Real
   routing is unbalanced: per-expert transients then differ (0.3–0.4 % of the peak on the tiny
   test models); with the same routing imposed on a real CPU step the two agree to the byte.
9. ``gc`` is disabled during the run (the collector's passes over ~10^5 records cost ~40 % of the
   time); warnings about transformers' own deprecations are silenced.

The tracker also computes the outputs of simple elementwise ops, ``*_like`` and dropout on
contiguous meta tensors itself (torch's Python reference meta kernels cost ~100 µs each); a test
checks them against torch's own (`LiveTensorTracker.check_fast`).

Known limitations
-----------------
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
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys
import time
import warnings
from typing import Any, Callable, Iterator

from ..errors import MemplanError, MissingExtraError
from ..plan import TrainPlan

_NEEDED = ("torch", "transformers", "peft", "bitsandbytes")
_PAGED_MIN_NUMEL = 100_000
_GEMM_4BIT_CUSTOM_MAX_M = 1536


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


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class _Progress:
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


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def build_meta_model(config: dict[str, Any], plan: TrainPlan):
    """The model `from_pretrained(..., quantization_config=...)` would load, with meta tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from .step import _TORCH_DTYPE, bnb_config, hf_config

    dtype = _TORCH_DTYPE[plan.dtype]
    cfg = hf_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=plan.attn_implementation)
    if plan.quant != "none":
        from transformers.quantizers.auto import AutoHfQuantizer

        try:
            from transformers.modeling_utils import local_torch_dtype  # type: ignore[attr-defined]
            dtype_ctx = local_torch_dtype(dtype, type(model).__name__)
        except ImportError:  # pragma: no cover - older transformers
            dtype_ctx = contextlib.nullcontext()
        bcfg = bnb_config(plan)
        model.config.quantization_config = bcfg
        quantizer = AutoHfQuantizer.from_config(bcfg, pre_quantized=False)
        with dtype_ctx, torch.device("meta"):
            # replace_with_bnb_linear with from_pretrained's skip rules (lm_head, tied weights, ...)
            quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"})
        _quantize_on_meta(model, dtype)
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)  # is_loaded_in_4bit/8bit, config.quantization_config
    model.eval()  # as from_pretrained leaves it
    return model


def _quantize_on_meta(model, dtype) -> None:
    import bitsandbytes as bnb
    import torch

    with _bnb_qmap_on_cpu():
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                old = mod.weight
                kw = {k: v for k, v in old.__dict__.items() if k != "data"}
                w = bnb.nn.Params4bit(torch.empty(old.shape, dtype=dtype, device="meta"), requires_grad=False, **kw)
                mod.weight = w._quantize("meta")
                mod._is_hf_initialized = True
            elif isinstance(mod, bnb.nn.Linear8bitLt):
                old = mod.weight
                kw = {k: v for k, v in old.__dict__.items() if k not in ("data", "SCB", "CB")}
                w = bnb.nn.Int8Params(torch.empty(old.shape, dtype=dtype, device="meta"), requires_grad=False, **kw)
                mod.weight = _int8_on_meta(w)
                mod._is_hf_initialized = True


def _int8_on_meta(w):
    """Int8Params._quantize on meta: int8 weight [out, in] + fp32 row scales SCB [out]."""
    import torch

    B = w.data.contiguous().to(torch.float16)
    CB, SCB, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(B)  # threshold 0: no outliers
    w.data = CB
    w.CB = CB
    w.SCB = SCB
    return w


@contextlib.contextmanager
def _bnb_qmap_on_cpu() -> Iterator[None]:
    from bitsandbytes import functional as bf

    saved = bf.name2qmap.get("dynamic")
    if saved is None or saved.is_meta:
        bf.name2qmap["dynamic"] = bf.create_dynamic_map()
    try:
        yield
    finally:
        if saved is None or saved.is_meta:
            bf.name2qmap["dynamic"] = bf.create_dynamic_map()


# ---------------------------------------------------------------------------------------------
# the emulation mode (autocast, SDPA, dropout)
# ---------------------------------------------------------------------------------------------
_LOWER_CPU = frozenset({
    "conv1d", "conv2d", "conv3d", "bmm", "mm", "linalg_vecdot", "baddbmm", "addmm", "addbmm", "linear",
    "_convolution", "matmul", "__matmul__", "__rmatmul__", "conv_tbc", "mkldnn_rnn_layer", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention", "_native_multi_head_attention",
    # einsum is not on the CPU list, but decomposes into bmm, which is
    "einsum",
})
_LOWER_CUDA = frozenset({
    "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
    "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
})
_FP32_COMMON = frozenset({
    "nll_loss", "nll_loss2d", "cross_entropy", "cross_entropy_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
    "huber_loss", "kl_div", "binary_cross_entropy_with_logits", "poisson_nll_loss", "cosine_embedding_loss",
    "hinge_embedding_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "cdist", "grid_sampler",
})
_FP32_CPU = _FP32_COMMON | frozenset({
    "avg_pool3d", "binary_cross_entropy", "polar", "prod", "quantile", "nanquantile", "stft", "trace",
    "view_as_complex", "cholesky", "cholesky_inverse", "cholesky_solve", "inverse", "lu_solve", "orgqr", "ormqr",
    "pinverse", "max_pool3d", "max_unpool2d", "max_unpool3d", "adaptive_avg_pool3d", "reflection_pad1d",
    "reflection_pad2d", "replication_pad1d", "replication_pad2d", "replication_pad3d", "ctc_loss",
})
_FP32_CUDA = _FP32_COMMON | frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "native_layer_norm", "group_norm",
    "frobenius_norm", "nuclear_norm", "cosine_similarity", "dist", "pdist", "renorm", "logsumexp",
})
_FP32_OPT_CUDA = frozenset({
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum",
    "_softmax", "_log_softmax",
})
_PROMOTE_CPU = frozenset({"stack", "cat", "index_copy"})
_PROMOTE_CUDA = frozenset({
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
    "scatter_add", "stack", "cat", "index_copy",
})


_EMULATION_CLS: list[type] = []


class MetaEmulation:
    """A TorchFunctionMode making meta tensors behave like the emulated device's (see module doc).

    The class mixes in torch's TorchFunctionMode when first instantiated, so that importing this
    module does not import torch.
    """

    def __new__(cls, *a, **k):
        if cls is MetaEmulation:
            if not _EMULATION_CLS:
                from torch.overrides import TorchFunctionMode

                _EMULATION_CLS.append(type("MetaEmulation", (MetaEmulation, TorchFunctionMode), {}))
            cls = _EMULATION_CLS[0]
        return object.__new__(cls)

    def __init__(self, device: str):
        import torch

        super().__init__()
        self.device = device
        self.cuda = device == "cuda"
        self.lower = _LOWER_CUDA if self.cuda else _LOWER_CPU
        self.fp32 = _FP32_CUDA if self.cuda else _FP32_CPU
        self.fp32_opt = _FP32_OPT_CUDA if self.cuda else frozenset()
        self.promote = _PROMOTE_CUDA if self.cuda else _PROMOTE_CPU
        self.interesting = (self.lower | self.fp32 | self.fp32_opt | self.promote
                            | {"scaled_dot_product_attention", "dropout", "backward"})
        self.cache: dict[int, tuple[Any, Any]] = {}
        self._torch = torch
        self._sdpa = torch.nn.functional.scaled_dot_product_attention

    # -- autocast ------------------------------------------------------------------------------
    def _autocast(self):
        t = self._torch
        if not t.is_autocast_enabled("cpu"):  # the carrier (see run_steps)
            return None
        return t.get_autocast_dtype("cpu")

    def _eligible(self, x) -> bool:
        t = self._torch
        return isinstance(x, t.Tensor) and x.is_floating_point() and x.dtype is not t.float64

    def _cast(self, x, dtype, cache_ok: bool):
        t = self._torch
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, dtype, cache_ok) for v in x)
        if not self._eligible(x) or x.dtype is dtype:
            return x
        if (cache_ok and x.dtype is t.float32 and x.requires_grad and x.is_leaf and not x._is_view()
                and t.is_autocast_cache_enabled()):
            hit = self.cache.get(id(x))
            if hit is not None and hit[0] is x:
                return hit[1]
            y = x.to(dtype)
            self.cache[id(x)] = (x, y)
            return y
        return x.to(dtype)

    def clear_cache(self) -> None:
        self.cache.clear()

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in self.interesting:
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        ac = self._autocast()
        if ac is not None and name:
            if name in self.lower:
                args = self._cast(args, ac, True)
                kwargs = {k: self._cast(v, ac, True) for k, v in kwargs.items()}
            elif name in self.fp32:
                args = self._cast(args, self._torch.float32, False)
                kwargs = {k: self._cast(v, self._torch.float32, False) for k, v in kwargs.items()}
            elif name in self.fp32_opt:
                if kwargs.get("dtype") is None and any(self._eligible(a) and a.dtype is not self._torch.float32
                                                       for a in args[:1]):
                    kwargs = dict(kwargs, dtype=self._torch.float32)
            elif name in self.promote:
                args = self._promote(args)
        if name == "backward":
            # Tensor.backward: the handler runs with this mode popped, but backward (checkpoint
            # recomputation) needs it; torch.autograd.backward does not re-enter __torch_function__
            return self._backward(*args, **kwargs)
        if name == "scaled_dot_product_attention":
            return self.sdpa(*args, **kwargs)
        if name == "dropout" and self.cuda:
            return self.dropout(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _backward(self, tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None,
                  grad_tensors=None):
        """torch.autograd.backward's tail, run with this mode pushed (it would be popped here)."""
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        t = self._torch
        tensors = (tensor,) if isinstance(tensor, t.Tensor) else tuple(tensor)
        grads = gradient if gradient is not None else grad_tensors
        inputs_t = () if inputs is None else ((inputs,) if isinstance(inputs, t.Tensor) else tuple(inputs))
        with self:
            g = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
            _engine_run_backward(tensors, g, create_graph if retain_graph is None else retain_graph, create_graph,
                                 inputs_t, allow_unreachable=True, accumulate_grad=True)

    def _promote(self, args):
        t = self._torch
        flat = args[0] if len(args) and isinstance(args[0], (list, tuple)) else args
        dts = {a.dtype for a in flat if self._eligible(a)}
        if len(dts) <= 1:
            return args
        wide = None
        for d in dts:
            wide = d if wide is None else t.promote_types(wide, d)
        return self._cast(args, wide, False)

    # -- SDPA ----------------------------------------------------------------------------------
    def sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        t = self._torch
        aten = t.ops.aten
        if not q.is_meta:
            return self._sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
        math_path = lambda: self._sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,  # noqa: E731
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if q.dim() != 4:
            return math_path()
        gqa = k.size(1) != q.size(1)
        if gqa and not enable_gqa:
            return math_path()  # shape error, as torch would raise
        if not self.cuda:
            if dropout_p > 0.0:
                return math_path()
            if attn_mask is not None and attn_mask.dtype is t.bool:
                attn_mask = _bool_mask_to_float(attn_mask, q.dtype)
            out, _lse = aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
            return out
        hd = q.size(-1)
        same_hd = hd == k.size(-1) == v.size(-1)
        if attn_mask is None and q.dtype in (t.float16, t.bfloat16) and same_hd and hd <= 256:
            # torch pads the head dim to a multiple of 8 for flash (pad_last_dim<8>) and slices back
            scale = scale if scale is not None else hd ** -0.5
            if hd % 8:
                pad = (0, 8 - hd % 8)
                q, k, v = (t.nn.functional.pad(x, pad) for x in (q, k, v))
            out = aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
            return out[..., :hd] if hd % 8 else out
        align = 4 if q.dtype is t.float32 else 8
        if same_hd and hd % align == 0:
            if gqa:
                # torch (source) lets mem-efficient take GQA, but its meta backward cannot: expand k/v to
                # the query heads (an upper bound: the expanded copies are saved for backward)
                rep = q.size(1) // k.size(1)
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            bias = attn_mask
            if bias is not None:
                if bias.dtype is t.bool:
                    bias = _bool_mask_to_float(bias, q.dtype)
                last = bias.size(-1)
                if last % 16:
                    pad = t.nn.functional.pad(bias, (0, 16 - last % 16))
                    bias = pad[..., :last]
                bias = bias.expand(q.size(0), q.size(1), q.size(2), k.size(2))
            need_lse = t.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            out = aten._scaled_dot_product_efficient_attention(q, k, v, bias, need_lse, dropout_p, is_causal,
                                                               scale=scale)[0]
            return out
        return math_path()

    # -- dropout (CUDA) ------------------------------------------------------------------------
    def dropout(self, func, input, p=0.5, training=True, inplace=False):
        t = self._torch
        if input.is_meta and training and 0.0 < p < 1.0 and not inplace and input.numel() > 0:
            return t.native_dropout(input, p, True)[0]
        return func(input, p, training, inplace)


def balanced_counts(tokens: int, top_k: int, experts: int) -> list[int]:
    """Token slots per expert under the simulation's routing: slot j of token t → expert (t·k + j) mod E."""
    slots = tokens * top_k
    return [slots // experts + (1 if e < slots % experts else 0) for e in range(experts)]


def eager_experts_balanced(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop (MixtralExperts.forward, 5.x) on meta, with balanced routing.

    The real loop asks the data which experts were hit (`nonzero`) and which tokens each got
    (`torch.where`); on meta there is no data. Here expert e gets `balanced_counts(...)[e]` token
    slots; every tensor the real loop makes (the one-hot mask, the per-expert index copies, the
    `nonzero` results, the gathered states, the expert weight copies made by tensor indexing) is made
    with the same shape and dtype.
    """
    import torch
    from torch import nn

    final_hidden_states = torch.zeros_like(hidden_states)
    n_tok, k = top_k_index.shape
    counts = balanced_counts(n_tok, k, self.num_experts)
    hit = [e for e, n in enumerate(counts) if n]
    dev = hidden_states.device
    with torch.no_grad():
        # F.one_hot: aminmax (checks the range, then .item()), zeros, scatter_
        torch.aminmax(top_k_index)
        expert_mask = torch.zeros((*top_k_index.shape, self.num_experts + 1), dtype=torch.long, device=dev)
        expert_mask.scatter_(-1, top_k_index.unsqueeze(-1), 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        torch.greater(expert_mask.sum(dim=(-1, -2)), 0)
        expert_hit = torch.empty((len(hit), 1), dtype=torch.long, device=dev)  # .nonzero()
    for i, e in enumerate(hit):
        expert_idx = expert_hit[i][0]
        _ = expert_idx == self.num_experts  # `if expert_idx == num_experts` (a 0-dim bool)
        sel = expert_mask[e]  # a 0-dim index tensor indexes like an int (.item()): a view
        nz = torch.empty((counts[e], sel.dim()), dtype=torch.long, device=dev)  # torch.where(sel)
        top_k_pos, token_idx = nz.unbind(1)
        del sel, nz, expert_idx, _
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[e]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[e])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def _experts_patch():
    """Route the eager experts implementation to `eager_experts_balanced` on meta tensors."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers without MoE integration
        return contextlib.nullcontext()
    orig = ALL_EXPERTS_FUNCTIONS.get_interface

    def get_interface(experts_implementation, default):
        fn = orig(experts_implementation, default)
        if experts_implementation != "eager":
            return fn

        def forward(self, hidden_states, *args, **kwargs):
            if (hidden_states.is_meta and hasattr(self, "gate_up_proj") and hasattr(self, "down_proj")
                    and not getattr(self, "has_bias", False) and getattr(self, "has_gate", True)
                    and not getattr(self, "is_transposed", False)):
                return eager_experts_balanced(self, hidden_states, *args, **kwargs)
            return fn(self, hidden_states, *args, **kwargs)

        return forward

    return _setattr(ALL_EXPERTS_FUNCTIONS, "get_interface", get_interface)


def _bool_mask_to_float(mask, dtype):
    import torch

    zero = torch.scalar_tensor(0.0, dtype=dtype, device=mask.device)
    ninf = torch.scalar_tensor(float("-inf"), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, ninf)


# ---------------------------------------------------------------------------------------------
# bitsandbytes kernels on meta
# ---------------------------------------------------------------------------------------------
def bnb_impls(device: str) -> dict[str, Callable[..., Any]]:
    """Python kernels that reproduce the real device's bitsandbytes kernels' allocations on meta."""
    import torch

    def int8_vectorwise_quant(A, threshold=0.0):
        # LLM.int8 outlier columns are data-dependent: the simulation assumes none
        out_row = torch.empty(A.shape, device=A.device, dtype=torch.int8)
        row_stats = torch.empty(A.numel() // A.shape[-1], device=A.device, dtype=torch.float32)
        cols = None if threshold == 0.0 else torch.empty(0, device=A.device, dtype=torch.int64)
        return out_row, row_stats, cols

    if device == "cpu":
        impls: dict[str, Callable[..., Any]] = {"int8_vectorwise_quant.default": int8_vectorwise_quant}
        try:
            from bitsandbytes.backends.default import ops as dflt

            impls["gemm_4bit.default"] = dflt._gemm_4bit_default_impl
        except (ImportError, AttributeError):  # pragma: no cover - other bnb versions
            pass
        try:
            from bitsandbytes.backends.cpu import ops as cpu

            impls["optimizer_update_8bit_blockwise.default"] = cpu._optimizer_update_8bit_blockwise_cpu
            impls["optimizer_update_32bit.default"] = cpu._optimizer_update_32bit_cpu
        except (ImportError, AttributeError):  # pragma: no cover
            pass
        return impls

    def gemm_4bit_cuda(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                       absmax_code=None, absmax_offset=None):
        K = A.shape[-1]
        M = A.numel() // K
        N = shapeB[0]
        if M > _GEMM_4BIT_CUSTOM_MAX_M or K % blocksize != 0:
            # bitsandbytes.backends.cuda.ops._dequant_linear_fallback
            if absmax_8bit is not None:
                absmax_dq = torch.empty_like(absmax_8bit, dtype=torch.float32)  # dequantized in place
                absmax = absmax_dq + absmax_offset  # noqa: F841 - alive (as in the kernel) until return
            B_dq = torch.empty(shapeB, dtype=A.dtype, device=A.device)
            return torch.nn.functional.linear(A, B_dq, bias)
        A = A.contiguous()
        return torch.empty((*A.shape[:-1], N), dtype=A.dtype, device=A.device)

    return {"gemm_4bit.default": gemm_4bit_cuda, "int8_vectorwise_quant.default": int8_vectorwise_quant}


def kernel_temps(device: str) -> dict[str, Callable[..., list]]:
    """Buffers the real device's kernels allocate internally (through the caching allocator).

    CUDA flash-attention backward (torch's flash_api.cpp `mha_bwd`, non-deterministic): `softmax_d`
    [B, H, ⌈Sq/128⌉·128] fp32, `dq_accum` [B, ⌈Sq/128⌉·128, H, D rounded to 32 (D ≤ 128) or 64]
    fp32 and, for GQA, `dk_expanded`/`dv_expanded` [B, Sk, H, D] in the input dtype (summed into dk/dv).
    """
    import torch

    if device != "cuda":
        return {}

    def r(x: int, m: int) -> int:
        return (x + m - 1) // m * m

    def flash_bwd(grad_out, q, k, v, out, lse, *args, **kwargs):
        if not q.is_meta:
            return []
        B, H, Sq, D = q.shape
        Hk, Sk = k.shape[1], k.shape[2]
        d8 = r(D, 8)
        temps = [torch.empty((B, H, r(Sq, 128)), dtype=torch.float32, device="meta"),
                 torch.empty((B, r(Sq, 128), H, r(d8, 32 if d8 <= 128 else 64)), dtype=torch.float32, device="meta")]
        if Hk != H:
            temps += [torch.empty((B, Sk, H, d8), dtype=q.dtype, device="meta") for _ in range(2)]
        return temps

    return {"_scaled_dot_product_flash_attention_backward.default": flash_bwd}


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _setattr(obj, name: str, value) -> Iterator[None]:
    missing = object()
    old = getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def build_patches() -> Iterator[None]:
    """Patches needed while building, adapting and stepping (see the module docstring)."""
    import torch.optim.optimizer as topt
    import transformers.masking_utils as mu

    orig_fused = topt._get_fused_kernels_supported_devices

    def fused_devices():
        return list(orig_fused()) + ["meta"]

    def find_packed(position_ids):
        if position_ids is not None and position_ids.is_meta:
            return None
        return orig_find(position_ids)

    orig_find = mu.find_packed_sequence_indices
    with contextlib.ExitStack() as st:
        st.enter_context(_setattr(mu, "find_packed_sequence_indices", find_packed))
        st.enter_context(_setattr(topt, "_get_fused_kernels_supported_devices", fused_devices))
        st.enter_context(_bnb_qmap_on_cpu())
        yield


def _grouped_mm_meta_patch(device: str):
    """`torch._meta_registrations._meta_grouped_mm_common` for the emulated device.

    torch's meta kernel mirrors the CUDA kernel: bf16 only, output rows padded to 16 bytes when torch
    is a CUDA build. The CPU kernel takes any float dtype and pads nothing.
    """
    import torch
    import torch._meta_registrations as mr

    orig = mr._meta_grouped_mm_common

    def common(mat_a, mat_b, scale_a=None, scale_b=None, offs=None, bias=None, scale_result=None,
               out_dtype=None, use_fast_accum=False):
        if device == "cpu":
            if scale_a is None and mat_a.dtype == mat_b.dtype:
                return mr._create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)
            return orig(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum)
        if scale_a is None and (mat_a.dtype != torch.bfloat16 or mat_b.dtype != torch.bfloat16):
            raise StepWouldFail(
                f"grouped_mm on CUDA takes bf16 inputs only (torch's kernel and meta function), but the experts "
                f"are {mat_b.dtype} (prepare_model_for_kbit_training upcasts them to fp32): the real CUDA step "
                f"would fail the same way. Try --no-prepare, or experts_implementation='eager' in the config.")
        out = orig(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum)
        if torch.version.cuda is None:  # pad as the CUDA kernel does
            size = list(out.shape)
            align = 16 // out.dtype.itemsize
            padded = (size[-1] + align - 1) // align * align
            stride = [size[1] * padded, padded, 1] if len(size) == 3 else [padded, 1]
            out = torch.empty_strided(size, stride, dtype=out.dtype, device=out.device)
        return out

    return _setattr(mr, "_meta_grouped_mm_common", common)


def _int8_matmul_patch(device: str):
    """bitsandbytes picks its int8 training matmul by device type (CPU: dequantize + linear)."""
    if device != "cpu":
        return contextlib.nullcontext()
    import bitsandbytes as bnb
    from bitsandbytes.autograd import _functions as bf

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        state = state or bf.MatmulLtState()
        if threshold > 0.0:
            state.threshold = threshold
        if state.is_training and A.device.type == "meta":
            return bf.MatMul8bitFp.apply(A, B, out, bias, state)
        return orig(A, B, out=out, state=state, threshold=threshold, bias=bias)

    orig = bf.matmul
    st = contextlib.ExitStack()
    st.enter_context(_setattr(bnb, "matmul", matmul))
    st.enter_context(_setattr(bf, "matmul", matmul))
    return st


@contextlib.contextmanager
def step_patches(emu: "MetaEmulation", device: str) -> Iterator[None]:
    """Patches active during the steps: the emulation mode, autocast cache and flag."""
    import torch

    orig_clear = torch.clear_autocast_cache
    orig_enabled = torch.is_autocast_enabled

    def clear_autocast_cache():
        emu.clear_cache()
        return orig_clear()

    def is_autocast_enabled(device_type=None):
        if device_type is None or device_type == "cuda":
            return orig_enabled("cpu")
        return orig_enabled(device_type)

    class autocast(torch.amp.autocast_mode.autocast):  # noqa: N801 - stands in for torch.autocast
        """torch.autocast(device_type="meta", ...) → the CPU carrier (meta has no autocast state)."""

        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    with contextlib.ExitStack() as st:
        st.enter_context(_setattr(torch, "clear_autocast_cache", clear_autocast_cache))
        st.enter_context(_setattr(torch, "autocast", autocast))
        st.enter_context(_setattr(torch.amp, "autocast", autocast))
        st.enter_context(_grouped_mm_meta_patch(device))
        st.enter_context(_experts_patch())
        st.enter_context(_int8_matmul_patch(device))
        if device == "cuda":
            st.enter_context(_setattr(torch, "is_autocast_enabled", is_autocast_enabled))
        st.enter_context(emu)
        yield


# ---------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------
def make_meta_optimizer(model, plan: TrainPlan, tracker):
    """`step.make_optimizer`, adjusted so that it behaves on meta as it would on `plan.device`."""
    import torch

    from .step import make_optimizer

    opt = make_optimizer(model, plan)
    if isinstance(opt, torch.optim.Optimizer) and plan.device == "cuda":
        for g in opt.param_groups:
            if "foreach" in g and g.get("foreach") is None and not g.get("fused"):
                g["foreach"] = True  # torch's default for CUDA tensors
    if hasattr(opt, "get_state_buffer") and hasattr(opt, "is_paged"):
        def get_state_buffer(p, dtype=torch.float32, _opt=opt):
            if plan.device == "cuda" and _opt.is_paged and p.numel() >= _PAGED_MIN_NUMEL:
                from torch.utils._python_dispatch import _disable_current_modes

                with _disable_current_modes():
                    buf = torch.zeros_like(p, dtype=dtype, device=p.device)
                tracker.add_paged(buf)
                return buf
            return torch.zeros_like(p, dtype=dtype, device=p.device)

        opt.get_state_buffer = get_state_buffer
    if plan.device == "cpu" and isinstance(getattr(opt, "name2qmap", None), dict):
        # bitsandbytes builds its code tables on CPU at construction and moves them to the parameters'
        # device at the first step: a no-op on CPU, a copy on meta. Move them now, untracked, as on CPU.
        opt.name2qmap = {k: v.to("meta") for k, v in opt.name2qmap.items()}
    return opt


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
class StepWouldFail(MemplanError):
    """The traced step fails the way the real one would (a library refuses the configuration)."""


def simulate(config: dict[str, Any], plan: TrainPlan, steps: int = 2, round_to: int | None = None,
             progress: bool | None = None, full_warmup: bool = False):
    """Trace `steps` training steps of `plan` on the meta device; return the last step's peak.

    `config` is a config.json dict (with `model_type`). `plan.device` is the device emulated;
    `round_to` defaults to 512 for "cuda" and 1 for "cpu". The steps before the last one only create
    the optimizer state (what a step leaves behind) unless `full_warmup`, which traces them fully
    (same result, twice the time; the tests check both). `progress`: lines on stderr (default: when
    stderr is a terminal). Returns a `step.StepResult`.
    """
    say = _Progress(progress)
    _check_extras()
    from .tracker import LiveTensorTracker

    if round_to is None:
        round_to = 512 if plan.device == "cuda" else 1
    counted = ("meta", "cpu") if plan.device == "cpu" else ("meta",)
    tracker = LiveTensorTracker(round_to=round_to, device=counted, bnb_impls=bnb_impls(plan.device),
                                kernel_temps=kernel_temps(plan.device))
    gc_was_enabled = gc.isenabled()
    gc.disable()  # ~10^5 short-lived records and tensors: the cyclic collector would cost ~40% of the run
    try:
        with warnings.catch_warnings():
            # transformers' deprecation notices for gradient_checkpointing_enable & co. are not ours
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", module="peft")  # e.g. rank_pattern keys of a wrapped MoE
            return _simulate(config, plan, steps, tracker, say, full_warmup)
    except MemplanError:
        raise
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as e:
        # transformers / peft / torch refusing the configuration: the real step would fail the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepWouldFail(f"the step cannot run with this plan ({type(e).__name__} from the HF stack): {first}") from e
    finally:
        if gc_was_enabled:
            gc.enable()


def _simulate(config, plan, steps, tracker, say, full_warmup):
    import torch

    from .step import adapt, run_steps

    round_to = tracker.round_to
    with build_patches():
        say("building model")
        model = build_meta_model(config, plan)
        with torch.device("meta"):  # LoRA layers born on meta: no real init of ~10^9 numbers
            model = adapt(model, plan)
        opt = make_meta_optimizer(model, plan, tracker)
        emu = MetaEmulation(plan.device)
        result = run_steps(model, plan, vocab_size=config["vocab_size"], steps=steps, device="meta",
                           round_to=round_to, optimizer=opt, tracker=tracker,
                           step_context=lambda: step_patches(emu, plan.device), progress=say,
                           fast_warmup=not full_warmup)
    result.versions = _versions()
    result.notes = _notes(config, plan, model)
    return result


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
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
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if config.get("num_local_experts") or config.get("num_experts"):
        if impl == "eager":
            notes.append("MoE eager experts loop: balanced routing (T*top_k slots spread evenly over experts)")
        else:
            notes.append(f"MoE experts implementation {impl!r}: memory independent of routing")
    return notes
