"""Meta tensors that behave like the emulated device's: autocast, SDPA routing and dropout.

`MetaEmulation` is a ``TorchFunctionMode`` pushed for the steps (`patches.step_patches`).

SDPA routing (patch 2). On meta, ``scaled_dot_product_attention`` picks the math kernel and would
materialize the S×S scores. It is routed to the kernel the real device runs, whose saved tensors it
then has:
CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (any mask, GQA native; saves output +
logsumexp; dropout > 0 stays on math, as on CPU; a bool mask first becomes a float mask, as on CPU;
q/k/v head dims that differ, as in DeepSeek's MLA, stay on math as on CPU: `cpu_flash_head_dims`).
CUDA, torch's priority flash > mem-efficient > math: flash
(``aten._scaled_dot_product_flash_attention``: fp16/bf16, no mask, head_dim ≤ 256 and a multiple
of 8, GQA native) saves output + fp32 logsumexp [B, H, S] + rng state; mem-efficient
(``aten._scaled_dot_product_efficient_attention``: a mask, or fp32, or a v head dim that differs from
q/k's as in MLA, `cuda_mem_efficient_head_dims`) saves output + logsumexp
padded to a multiple of 32 (mask padded to a multiple of 16 and expanded); for GQA, k/v are
expanded to the query heads first (torch's meta backward cannot do GQA; an upper bound); else math.

Autocast emulation (patch 3). Meta tensors have no autocast dispatch key, so ``torch.autocast`` does
nothing to them. The step enters ``torch.autocast("cpu", dtype)`` as the state carrier (checkpoint
recomputation captures and restores it like the real one; code asking
``torch.autocast(device_type="meta")`` gets the carrier) and the mode applies the emulated device's
autocast op lists: lower precision for linear/matmul/bmm/baddbmm/addmm/mm/conv/SDPA (CUDA also
einsum/addmv/addr/mv...), fp32 for the losses (CUDA also exp/log/pow/rsqrt/layer_norm/softplus/...),
fp32-unless-dtype-given for softmax/log_softmax/sum/cumsum/prod (CUDA), widest-type promotion for
cat/stack/index_copy (+addcmul/addcdiv/... on CUDA). It keeps autocast's weight cache (low-precision
copies of fp32 leaf tensors that require grad, dropped when the outermost autocast exits:
``torch.clear_autocast_cache`` is wrapped). For ``"cuda"``, ``torch.is_autocast_enabled()`` (no
argument, i.e. CUDA) reports the carrier, as peft asks it to decide whether to cast the LoRA input to
fp32 (those three patches of torch are applied by `patches.step_patches`). ``Tensor.backward``
re-enters the mode, which torch pops while it handles a call.

Dropout (patch 6, CUDA): ``F.dropout`` on meta → ``native_dropout`` (output + bool mask saved), what
CUDA runs; on meta, as on CPU, torch would build full-dtype noise.

Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Any

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
            if dropout_p > 0.0 or not cpu_flash_head_dims(q, k, v):
                return math_path()
            if attn_mask is not None and attn_mask.dtype is t.bool:
                attn_mask = bool_mask_to_float(attn_mask, q.dtype)
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
        if cuda_mem_efficient_head_dims(q, k, v, align):
            if gqa:
                # torch (source) lets mem-efficient take GQA, but its meta backward cannot: expand k/v to
                # the query heads (an upper bound: the expanded copies are saved for backward)
                rep = q.size(1) // k.size(1)
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            bias = attn_mask
            if bias is not None:
                if bias.dtype is t.bool:
                    bias = bool_mask_to_float(bias, q.dtype)
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


def cpu_flash_head_dims(q, k, v) -> bool:
    """Whether torch's CPU flash SDPA takes these head dims (patch 2b, MLA attention).

    torch's CPU kernel choice (aten/src/ATen/native/transformers/sdp_utils_cpp.cpp
    `check_head_dim_size_cpp`) needs q, k and v to share the last dim; otherwise SDPA runs the math
    kernel, which materializes and saves the [B, heads, S, S] scores. DeepSeek's MLA attention
    (deepseek_v2/v3: q/k head dim qk_nope + qk_rope, v head dim v_head_dim) takes the math kernel on
    CPU (measured: aten.bmm + _safe_softmax with q/k 24, v 16). The meta flash kernel would return an
    output with q's head dim instead of v's. On CUDA, see `cuda_mem_efficient_head_dims`.
    """
    return q.size(-1) == k.size(-1) == v.size(-1)


def cuda_mem_efficient_head_dims(q, k, v, align: int) -> bool:
    """Whether torch's CUDA mem-efficient SDPA takes these head dims (patch 2c, MLA attention).

    torch's `check_head_dim_size_mem_efficient` (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp):
    q and k share the last dim, and q's and v's last dims are multiples of the GEMM alignment (8 for
    16-bit on sm80+, 4 for fp32). v may differ from q/k, as in DeepSeek's MLA (flash needs all three
    equal). With equal head dims this is the former condition `hd % align == 0`. NB: read from torch's
    source, not measured on a GPU; cuDNN attention (preferred on sm90+ with recent cuDNN) is not modelled.
    """
    return q.size(-1) == k.size(-1) and q.size(-1) % align == 0 and v.size(-1) % align == 0


def bool_mask_to_float(mask, dtype):
    """A boolean attention mask as the additive float mask torch builds from it (0 / -inf)."""
    import torch

    zero = torch.scalar_tensor(0.0, dtype=dtype, device=mask.device)
    ninf = torch.scalar_tensor(float("-inf"), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, ninf)
