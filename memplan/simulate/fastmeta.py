"""Fast meta kernels: the outputs of simple ops on meta tensors, computed directly.

torch's meta kernels for elementwise ops, `*_like` factories and dropout are Python reference
implementations (~100 µs each); a 70B step runs ~10^5 of them. For the plain case (meta tensors,
contiguous or one shared dense layout, no 0-dim tensor operand on another device) the result is an
empty tensor of the right shape, dtype and strides, which costs ~2 µs. Anything else returns None and
falls back to torch's own meta kernel.

`FAST_KERNELS` (op -> fn(args, kwargs)) is what simulate hands to the live-tensor tracker
(`LiveTensorTracker(fast_kernels=...)`); with `LiveTensorTracker.check_fast` set, the tracker also runs
torch's kernel and compares the two (a test switch, tests/test_simulate.py).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _broadcast(shapes) -> tuple[int, ...] | None:
    nd = max(len(s) for s in shapes)
    out = [1] * nd
    for s in shapes:
        off = nd - len(s)
        for i, d in enumerate(s):
            j = off + i
            if d != 1:
                if out[j] != 1 and out[j] != d:
                    return None
                out[j] = d
    return tuple(out)


def _dense(shape, stride) -> bool:
    """Non-overlapping and dense (a permutation of a contiguous layout)."""
    dims = sorted((st, sz) for sz, st in zip(shape, stride) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def _binary(args, kwargs):
    """Elementwise ops (binary, scalar, unary and their backward): broadcast shape, promoted dtype."""
    dimmed = []
    contiguous = True
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.dim():
                if not a.is_meta:
                    return None
                contiguous = contiguous and a.is_contiguous()
                dimmed.append(a)
            elif a.device.type not in ("meta", "cpu"):
                return None
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            return None
    for k, v in kwargs.items():
        if k != "alpha" and not (k == "approximate" and isinstance(v, str)):
            return None
    if not dimmed:
        return None
    stride = None
    if not contiguous:
        # a permuted dense layout shared by every operand is preserved (TensorIterator); else fall back
        shape, stride = dimmed[0].shape, dimmed[0].stride()
        if any(t.shape != shape or t.stride() != stride for t in dimmed[1:]) or not _dense(shape, stride):
            return None
    else:
        shape = dimmed[0].shape if len(dimmed) == 1 else _broadcast([t.shape for t in dimmed])
        if shape is None:
            return None
    if len(args) == 1:
        dtype = args[0].dtype
    else:
        dtype = torch.result_type(args[0], args[1]) if len(args) == 2 else None
        if dtype is None or any(t.dtype != dtype for t in dimmed[2:]):
            return None
    if not dtype.is_floating_point:
        return None
    if stride is None:
        # TensorIterator keeps an operand's strides (they can differ from torch.empty's on size-1 dims)
        for t in dimmed:
            if t.shape == shape:
                stride = t.stride()
                break
        else:
            return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _reduce(args, kwargs):
    """mean.dim / sum.dim_IntList (x, dims, keepdim=False, *, dtype=None)."""
    x = args[0]
    if not x.is_meta or not x.is_contiguous() or not x.dtype.is_floating_point or len(args) < 2:
        return None
    dims = args[1]
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dtype = kwargs.get("dtype") or x.dtype
    if any(k not in ("keepdim", "dtype") for k in kwargs) or not isinstance(dims, (list, tuple)) or not dims:
        return None
    nd = x.dim()
    red = {d % nd for d in dims}
    shape = [1 if i in red else s for i, s in enumerate(x.shape)] if keep else \
        [s for i, s in enumerate(x.shape) if i not in red]
    return torch.empty(shape, dtype=dtype, device="meta")


def _like(args, kwargs):
    """empty_like / zeros_like / ones_like / native_dropout_backward: the input's layout."""
    x = args[0]
    if not x.is_meta or not x.is_contiguous():
        return None
    dtype = x.dtype
    keep = True
    for k, v in kwargs.items():
        if k == "dtype":
            dtype = v if v is not None else dtype
        elif k == "memory_format":
            if v not in (None, torch.preserve_format, torch.contiguous_format):
                return None
            keep = v is not torch.contiguous_format
        elif k in ("layout", "pin_memory"):
            if v not in (None, False, torch.strided):
                return None
        elif k == "device":
            if v is not None and torch.device(v).type != "meta":
                return None
        else:
            return None
    if keep:  # preserve_format keeps a dense input's exact strides
        return torch.empty_strided(x.shape, x.stride(), dtype=dtype, device="meta")
    return torch.empty(x.shape, dtype=dtype, device="meta")


def _dropout(args, kwargs):
    """native_dropout: the output and its bool mask."""
    x = args[0]
    if not x.is_meta or not x.is_contiguous() or kwargs:
        return None
    return (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta"),
            torch.empty_strided(x.shape, x.stride(), dtype=torch.bool, device="meta"))


_aten = torch.ops.aten
#: aten op -> fn(args, kwargs) returning its output on meta, or None (use torch's meta kernel)
FAST_KERNELS: dict[Any, Callable[[tuple, dict], Any]] = {}
for _name in ("add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "maximum.default", "minimum.default",
              "add.Scalar", "sub.Scalar", "mul.Scalar", "div.Scalar", "pow.Tensor_Scalar"):
    _pk, _, _ov = _name.partition(".")
    FAST_KERNELS[getattr(getattr(_aten, _pk), _ov)] = _binary
for _name in ("neg", "silu", "rsqrt", "exp", "tanh", "sigmoid", "sqrt", "reciprocal", "gelu", "relu", "sin", "cos",
              "silu_backward", "gelu_backward", "tanh_backward", "sigmoid_backward", "threshold_backward"):
    FAST_KERNELS[getattr(_aten, _name).default] = _binary
FAST_KERNELS[_aten.mean.dim] = _reduce
FAST_KERNELS[_aten.sum.dim_IntList] = _reduce
FAST_KERNELS[_aten.empty_like.default] = _like
FAST_KERNELS[_aten.zeros_like.default] = _like
FAST_KERNELS[_aten.ones_like.default] = _like
FAST_KERNELS[_aten.native_dropout.default] = _dropout
FAST_KERNELS[_aten.native_dropout_backward.default] = _like
