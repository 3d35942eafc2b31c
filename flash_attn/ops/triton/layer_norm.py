"""Fused dropout + residual add + LayerNorm / RMSNorm on Triton, with the flash_attn 2.x names.

Code written against ``flash_attn.ops.triton.layer_norm`` of flash_attn 2.x runs unchanged:
``layer_norm_fn``, ``rms_norm_fn``, ``layer_norm_linear_fn``, the autograd Function
``LayerNormFn``, the modules ``RMSNorm`` (and ``LayerNorm``), and the plain PyTorch
references ``layer_norm_ref`` / ``rms_norm_ref`` keep the 2.x argument lists, defaults and
return conventions. What one call computes, per row of ``x`` (hidden size = last dim)::

    s  = dropout(x * rowscale) [+ dropout(x1)] [+ residual]     # the pre-norm sum
    y  = norm(s) * weight [+ bias]                               # norm: LayerNorm or RMSNorm
    y1 = norm(s) * weight1 [+ bias1]                             # only with weight1

and it returns ``y``, then ``y1`` (with ``weight1``), then ``s`` (with ``prenorm=True``, in
the residual's dtype: ``residual.dtype``, or fp32 with ``residual_in_fp32=True`` and no
residual, else ``x.dtype``), then the two boolean keep-masks of the dropout (with
``return_dropout_mask=True``; None where there is no dropout or no ``x1``). The gradients
reach ``x``, ``weight``, ``bias``, ``residual``, ``x1``, ``weight1`` and ``bias1``.

The dropout draws its two Philox keys from torch's generator of the tensors' device, so
``torch.manual_seed`` makes the masks repeat; the backward recomputes the masks from
those keys instead of storing them.

Host cost: a call checks its arguments, allocates the outputs and launches one kernel
(the backward two: the rows, then the weight/bias sums). Where no gradient is wanted
(grad mode off, or no input requires grad) it runs without an autograd Function.

The module imports without Triton or a GPU (the 2.x one does not); a call needs CUDA
tensors and Triton, and says so where either is missing. With ``TRITON_INTERPRET=1``
the kernels also run on CPU tensors (slowly, through Triton's interpreter).
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_attn.errors import DeviceError, FlashAttnError, InputError

# The largest hidden size (last dimension) the kernels take: one row lives in registers.
MAX_HIDDEN = 16384
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

Outputs = Union[Tensor, tuple[Optional[Tensor], ...]]


class TritonUnavailableError(FlashAttnError, ImportError):
    """Triton is not installed (or fails to import), so the fused norms cannot run."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_kernels() -> ModuleType:
    """The kernel module (it imports Triton). Without Triton this module's import fails,
    as flash_attn 2.x's does: model code imports it in a try block and falls back to
    plain PyTorch norms where it raises ImportError."""
    try:
        from flash_attn.ops.triton import _layer_norm_kernels
    except ImportError as e:
        raise TritonUnavailableError(
            f"the fused LayerNorm/RMSNorm needs Triton, which does not import here ({e}). "
            "Install the triton that matches your torch (`pip install triton`; CUDA builds "
            "of torch on Linux bring it), or use torch.nn.functional.layer_norm / rms_norm."
        ) from e
    return _layer_norm_kernels


_KERNELS = _import_kernels()


def _kernels() -> ModuleType:
    return _KERNELS


# ----------------------------------------------------------------------------- checks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_VALID_DTYPES = ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)


def _check_dtype(fn: str, name: str, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{fn}: {name} has dtype {_dtype_name(dtype)}; valid: {_VALID_DTYPES}")


def _check_vector(fn: str, name: str, t: Tensor | None, n: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise InputError(f"{fn}: {name} must be a tensor or None; got {type(t).__name__}")
    if t.shape != (n,):  # torch.Size is a tuple
        raise InputError(
            f"{fn}: {name} has shape {tuple(t.shape)}; it must be ({n},), the hidden size "
            "(the last dimension of x)"
        )
    _check_dtype(fn, name, t.dtype)


def _check_like_x(fn: str, name: str, t: Tensor | None, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise InputError(f"{fn}: {name} must be a tensor or None; got {type(t).__name__}")
    if t.shape != x.shape:
        raise InputError(
            f"{fn}: {name} has shape {tuple(t.shape)}; it must have x's shape {tuple(x.shape)}"
        )
    _check_dtype(fn, name, t.dtype)


def _common_args_ok(
    x: object,
    weight: object,
    bias: object,
    residual: object,
    others: tuple[object, ...],
    eps: object,
    dropout_p: object,
) -> bool:
    """Whether a call passes check_norm_args for sure, read in a few attribute lookups:
    the common call (x, weight, optional bias and residual, float eps and dropout_p; no
    second branch, rowscale or out_dtype). False sends it through every check, which
    then names what is wrong. (A decode step calls the norms twice a layer.)"""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)) or any(
        o is not None for o in others
    ):
        return False
    shape = x.shape
    if not shape or not 1 <= shape[-1] <= MAX_HIDDEN or x.dtype not in SUPPORTED_DTYPES:
        return False
    n = shape[-1]
    if weight.shape != (n,) or weight.dtype not in SUPPORTED_DTYPES:
        return False
    if bias is not None and (
        not isinstance(bias, Tensor) or bias.shape != (n,) or bias.dtype not in SUPPORTED_DTYPES
    ):
        return False
    if residual is not None and (
        not isinstance(residual, Tensor)
        or residual.shape != shape
        or residual.dtype not in SUPPORTED_DTYPES
    ):
        return False
    return (
        type(dropout_p) is float
        and 0.0 <= dropout_p < 1.0
        and type(eps) is float
        and 0.0 <= eps < math.inf
    )


def check_norm_args(
    fn: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> None:
    """Shapes, dtypes and values of one call (tensor metadata only: no device needed).
    Raises InputError naming the value seen and what is valid."""
    if not isinstance(x, Tensor):
        raise InputError(f"{fn}: x must be a tensor; got {type(x).__name__}")
    if x.dim() < 1:
        raise InputError(f"{fn}: x must have at least one dimension (the hidden size); got 0-d")
    _check_dtype(fn, "x", x.dtype)
    n = x.shape[-1]
    if not 1 <= n <= MAX_HIDDEN:
        raise InputError(
            f"{fn}: hidden size (x.shape[-1]) is {n}; supported: 1 to {MAX_HIDDEN}"
        )
    if not isinstance(weight, Tensor):
        raise InputError(f"{fn}: weight must be a tensor; got {type(weight).__name__}")
    _check_vector(fn, "weight", weight, n)
    _check_vector(fn, "bias", bias, n)
    _check_vector(fn, "weight1", weight1, n)
    _check_vector(fn, "bias1", bias1, n)
    if bias1 is not None and weight1 is None:
        raise InputError(f"{fn}: bias1 is given without weight1; pass weight1 too, or no bias1")
    _check_like_x(fn, "residual", residual, x)
    _check_like_x(fn, "x1", x1, x)
    if x1 is not None and x1.dtype != x.dtype:
        raise InputError(
            f"{fn}: x1 has dtype {_dtype_name(x1.dtype)} and x {_dtype_name(x.dtype)}; "
            "they must be the same"
        )
    if rowscale is not None:
        if x1 is not None:
            raise InputError(f"{fn}: rowscale is not supported together with x1; pass one")
        if not isinstance(rowscale, Tensor) or rowscale.shape != x.shape[:-1]:
            seen = tuple(rowscale.shape) if isinstance(rowscale, Tensor) else type(rowscale)
            raise InputError(
                f"{fn}: rowscale has shape {seen}; it must be x.shape[:-1] = "
                f"{tuple(x.shape[:-1])} (one scale per row)"
            )
        _check_dtype(fn, "rowscale", rowscale.dtype)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise InputError(f"{fn}: dropout_p must be a float in [0, 1); got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise InputError(f"{fn}: dropout_p is {dropout_p}; valid: 0 <= dropout_p < 1")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
        math.isfinite(eps) and eps >= 0.0
    ):
        raise InputError(f"{fn}: eps is {eps!r}; it must be a finite float >= 0")
    if out_dtype is not None:
        if not isinstance(out_dtype, torch.dtype):
            raise InputError(f"{fn}: out_dtype must be a torch.dtype or None; got {out_dtype!r}")
        _check_dtype(fn, "out_dtype", out_dtype)


def check_norm_devices(fn: str, tensors: dict[str, Tensor | None]) -> torch.device:
    """All given tensors on one CUDA device (or the CPU, under TRITON_INTERPRET=1)."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise DeviceError(f"{fn}: the tensors must be on one device; got {where}")
    device = devices.pop()
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise DeviceError(
            f"{fn}: x is on {device}; the fused norm runs on CUDA tensors only "
            "(move them with .cuda(), or use torch.nn.functional.layer_norm on the CPU)"
        )
    return device


def _check_buffer(fn: str, name: str, buf: Tensor | None, x: Tensor, dtype: torch.dtype) -> None:
    if buf is None:
        return
    if buf.shape != x.shape or buf.dtype != dtype or not buf.is_contiguous():
        raise InputError(
            f"{fn}: {name} has shape {tuple(buf.shape)}, dtype {_dtype_name(buf.dtype)}"
            f"{'' if buf.is_contiguous() else ', not contiguous'}; it must be a contiguous "
            f"tensor of shape {tuple(x.shape)} and dtype {_dtype_name(dtype)}"
        )


# ------------------------------------------------------------------- the references


def _ref_dropout(t: Tensor, p: float, keep: Tensor | None) -> Tensor:
    if keep is None:
        return F.dropout(t, p=p)
    return torch.where(keep, t / (1.0 - p), torch.zeros((), dtype=t.dtype, device=t.device))


def _ref_prenorm_sum(
    x: Tensor,
    residual: Tensor | None,
    x1: Tensor | None,
    dropout_p: float,
    rowscale: Tensor | None,
    dropout_mask: Tensor | None,
    dropout_mask1: Tensor | None,
) -> Tensor:
    if x1 is not None and rowscale is not None:
        raise InputError("the reference takes rowscale or x1, not both (as the fused norm)")
    if rowscale is not None:
        x = x * rowscale.unsqueeze(-1)
    if dropout_p > 0.0:
        x = _ref_dropout(x, dropout_p, dropout_mask)
        if x1 is not None:
            x1 = _ref_dropout(x1, dropout_p, dropout_mask1)
    if x1 is not None:
        x = x + x1
    if residual is not None:
        x = (x + residual).to(x.dtype)
    return x


def _ref_norm(
    norm: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    x1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    eps: float,
    dropout_p: float,
    rowscale: Tensor | None,
    prenorm: bool,
    zero_centered_weight: bool,
    dropout_mask: Tensor | None,
    dropout_mask1: Tensor | None,
    upcast: bool,
) -> Outputs:
    out_dtype = x.dtype

    def up(t: Tensor | None) -> Tensor | None:
        return t.float() if upcast and t is not None else t

    x, weight, bias, residual = up(x), up(weight), up(bias), up(residual)  # type: ignore[assignment]
    x1, weight1, bias1 = up(x1), up(weight1), up(bias1)
    if zero_centered_weight:
        weight = weight + 1.0
        weight1 = weight1 + 1.0 if weight1 is not None else None
    s = _ref_prenorm_sum(x, residual, x1, dropout_p, rowscale, dropout_mask, dropout_mask1)

    def apply(w: Tensor, b: Tensor | None) -> Tensor:
        if norm == "layer":
            return F.layer_norm(s.to(w.dtype), s.shape[-1:], weight=w, bias=b, eps=eps)
        scaled = s * torch.rsqrt(s.square().mean(dim=-1, keepdim=True) + eps)
        return scaled * w + b if b is not None else scaled * w

    outs = [apply(weight, bias).to(out_dtype)]
    if weight1 is not None:
        outs.append(apply(weight1, bias1).to(out_dtype))
    if prenorm:
        outs.append(s)
    return outs[0] if len(outs) == 1 else tuple(outs)


def layer_norm_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None = None,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    prenorm: bool = False,
    zero_centered_weight: bool = False,
    dropout_mask: Tensor | None = None,
    dropout_mask1: Tensor | None = None,
    upcast: bool = False,
) -> Outputs:
    """Plain PyTorch LayerNorm with the fused op's inputs (dropout with the given keep-masks,
    or F.dropout without). Computes in the inputs' dtypes, or in fp32 with ``upcast``.
    Returns ``out``, ``(out, out1)``, ``(out, s)`` or ``(out, out1, s)`` (``s``: the
    pre-norm sum, with ``prenorm``), the outputs in ``x.dtype``."""
    return _ref_norm(
        "layer", x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale,
        prenorm, zero_centered_weight, dropout_mask, dropout_mask1, upcast,
    )  # fmt: skip


def rms_norm_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None = None,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    prenorm: bool = False,
    zero_centered_weight: bool = False,
    dropout_mask: Tensor | None = None,
    dropout_mask1: Tensor | None = None,
    upcast: bool = False,
) -> Outputs:
    """As :func:`layer_norm_ref`, with RMSNorm: ``s / sqrt(mean(s**2) + eps) * weight [+ bias]``."""
    return _ref_norm(
        "rms", x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale,
        prenorm, zero_centered_weight, dropout_mask, dropout_mask1, upcast,
    )  # fmt: skip


# ----------------------------------------------------------------- the fused op


def _rows(t: Tensor | None) -> Tensor | None:
    """``t`` as the kernels take it: as it is where it is contiguous or 2-D with unit
    stride along the hidden dimension (rows equally spaced), else (rows, hidden) with
    unit stride along the hidden dimension (a view where one exists, else a copy)."""
    if t is None:
        return None
    if t.is_contiguous() or (t.dim() == 2 and t.stride(-1) == 1):
        return t
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _dense(t: Tensor | None) -> Tensor | None:
    return t.contiguous() if t is not None else None


def _devices_ok(x: Tensor, others: tuple[Tensor | None, ...]) -> bool:
    """The fast path of :func:`check_norm_devices`: x on CUDA (or the CPU under
    TRITON_INTERPRET=1) and every other tensor on x's device."""
    dev = x.device
    if dev.type != "cuda" and not (dev.type == "cpu" and _interpreting()):
        return False
    for t in others:
        if t is not None and t.device != dev:
            return False
    return True


def _needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call must record a graph: grad mode on and a differentiable input that
    requires grad. Otherwise the op runs without the autograd Function, whose
    bookkeeping (about 10 us a call) buys nothing there."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _norm_forward(
    ctx: Any,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    x1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    eps: float,
    dropout_p: float,
    rowscale: Tensor | None,
    prenorm: bool,
    residual_in_fp32: bool,
    zero_centered_weight: bool,
    is_rms_norm: bool,
    return_dropout_mask: bool,
    out_dtype: torch.dtype | None,
    out: Tensor | None,
    residual_out: Tensor | None,
) -> Outputs:
    """The checks and the forward launch (2.x argument order); saves what the backward
    needs on ``ctx`` (None: no backward will run)."""
    fn = "rms_norm_fn" if is_rms_norm else "layer_norm_fn"
    if not _common_args_ok(
        x, weight, bias, residual, (x1, weight1, bias1, rowscale, out_dtype), eps, dropout_p
    ):
        check_norm_args(
            fn, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, out_dtype
        )
    if residual is not None:
        residual_dtype = residual.dtype
    else:
        residual_dtype = torch.float32 if residual_in_fp32 else x.dtype
    y_dtype = out_dtype if out_dtype is not None else x.dtype
    _check_buffer(fn, "out", out, x, y_dtype)
    _check_buffer(fn, "residual_out", residual_out, x, residual_dtype)
    others = (weight, bias, residual, x1, weight1, bias1, rowscale, out, residual_out)
    if not _devices_ok(x, others):  # the full check, for its error message
        check_norm_devices(
            fn,
            dict(x=x, weight=weight, bias=bias, residual=residual, x1=x1, weight1=weight1,
                 bias1=bias1, rowscale=rowscale, out=out, residual_out=residual_out),
        )  # fmt: skip
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and not _KERNELS.HAS_INTERLEAVE:
        raise TritonUnavailableError(
            f"{fn}: dropout needs Triton 3.0 or newer (tl.interleave); this is Triton "
            f"{_KERNELS.triton.__version__}. Upgrade triton, or pass dropout_p=0.0"
        )

    shape = x.shape
    x2 = _rows(x)
    assert x2 is not None
    rowscale2 = None
    if rowscale is not None:  # one scale per row, read as a flat array
        rowscale2 = rowscale if rowscale.is_contiguous() else rowscale.reshape(-1).contiguous()
    # the pre-norm sum is stored unless it is x itself
    store_sum = residual_out is not None or (
        residual is not None
        or residual_dtype != x.dtype
        or dropout_p > 0.0
        or rowscale is not None
        or x1 is not None
    )
    # outputs in x's shape, contiguous: the kernels write rows of n, no views needed
    # (empty_like: about half the host time of torch.empty(shape, ...) a buffer)
    contiguous = torch.contiguous_format
    y_buf = out if out is not None else torch.empty_like(x, dtype=y_dtype, memory_format=contiguous)
    if residual_out is not None:
        sum_buf: Tensor | None = residual_out
    elif store_sum:
        sum_buf = torch.empty_like(x, dtype=residual_dtype, memory_format=contiguous)
    else:
        sum_buf = None
    weight, bias = weight.contiguous(), _dense(bias)
    weight1, bias1 = _dense(weight1), _dense(bias1)
    res = _KERNELS.forward(
        x2,
        weight,
        bias,
        residual=_rows(residual),
        x1=_rows(x1),
        weight1=weight1,
        bias1=bias1,
        rowscale=rowscale2,
        eps=float(eps),
        dropout_p=dropout_p,
        is_rms_norm=bool(is_rms_norm),
        zero_centered_weight=bool(zero_centered_weight),
        store_mask=bool(return_dropout_mask),
        y=y_buf,
        residual_out=sum_buf,
    )
    # the sum the backward reads: the stored one, or x (as the kernel read it)
    s = res.residual_out if res.residual_out is not None else x2
    if ctx is not None:
        ctx.save_for_backward(s, weight, bias, weight1, bias1, rowscale2, res.seeds, res.stats)
        ctx.shape = shape
        ctx.dropout_p = dropout_p
        ctx.is_rms_norm = bool(is_rms_norm)
        ctx.zero_centered_weight = bool(zero_centered_weight)
        ctx.prenorm = bool(prenorm)
        ctx.has_x1 = x1 is not None
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None

    y = res.y
    if weight1 is None and not prenorm and not return_dropout_mask:
        return y
    outs: list[Tensor | None] = [y]
    if weight1 is not None:
        outs.append(res.y1)
    if prenorm:
        outs.append(res.residual_out if res.residual_out is not None else x)
    if return_dropout_mask:
        masks = [res.mask, res.mask1]
        if ctx is not None:
            ctx.mark_non_differentiable(*[m for m in masks if m is not None])
        outs += masks
    return tuple(outs)


def _norm_backward(
    ctx: Any, dy: Tensor, grads: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """The gradients of x, weight, bias, residual, x1, weight1, bias1."""
    s, weight, bias, weight1, bias1, rowscale, seeds, stats = ctx.saved_tensors
    rest = list(grads)
    dy1 = rest.pop(0) if weight1 is not None else None
    dres_out = rest.pop(0) if ctx.prenorm else None
    g = _KERNELS.backward(
        _rows(dy),
        _rows(dy1),
        _rows(dres_out),
        s=s,
        weight=weight,
        bias=bias,
        weight1=weight1,
        bias1=bias1,
        rowscale=rowscale,
        seeds=seeds,
        stats=stats,
        dropout_p=ctx.dropout_p,
        is_rms_norm=ctx.is_rms_norm,
        zero_centered_weight=ctx.zero_centered_weight,
        x_dtype=ctx.x_dtype,
        residual_dtype=ctx.residual_dtype,
        want_dx1=ctx.has_x1,
        shape=ctx.shape,
    )
    return (g.dx, g.dweight, g.dbias, g.dresidual, g.dx1, g.dweight1, g.dbias1)


class LayerNormFn(torch.autograd.Function):
    """flash_attn 2.x's autograd Function of the fused norm, with its argument order.
    :func:`layer_norm_fn` runs the same forward and backward through a Function with
    fewer arguments (``_NormFn``), or without one where no gradient is wanted."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        residual: Tensor | None = None,
        x1: Tensor | None = None,
        weight1: Tensor | None = None,
        bias1: Tensor | None = None,
        eps: float = 1e-6,
        dropout_p: float = 0.0,
        rowscale: Tensor | None = None,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        zero_centered_weight: bool = False,
        is_rms_norm: bool = False,
        return_dropout_mask: bool = False,
        out_dtype: torch.dtype | None = None,
        out: Tensor | None = None,
        residual_out: Tensor | None = None,
    ) -> Outputs:
        return _norm_forward(
            ctx, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale,
            prenorm, residual_in_fp32, zero_centered_weight, is_rms_norm, return_dropout_mask,
            out_dtype, out, residual_out,
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        # no gradients for the 11 arguments from eps on
        return _norm_backward(ctx, dy, grads) + (None,) * 11


class _NormFn(torch.autograd.Function):
    """:class:`LayerNormFn` with the non-tensor arguments in one tuple ``opts`` = (eps,
    dropout_p, prenorm, residual_in_fp32, zero_centered_weight, is_rms_norm,
    return_dropout_mask, out_dtype): what layer_norm_fn / rms_norm_fn apply.
    ``Function.apply`` spends host time on every argument (about 0.3 us each)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        residual: Tensor | None,
        x1: Tensor | None,
        weight1: Tensor | None,
        bias1: Tensor | None,
        rowscale: Tensor | None,
        out: Tensor | None,
        residual_out: Tensor | None,
        opts: tuple[Any, ...],
    ) -> Outputs:
        eps, dropout_p, prenorm, in_fp32, zero_centered, is_rms, want_mask, out_dtype = opts
        return _norm_forward(
            ctx, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale,
            prenorm, in_fp32, zero_centered, is_rms, want_mask, out_dtype, out, residual_out,
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        # no gradients for rowscale, out, residual_out, opts
        return _norm_backward(ctx, dy, grads) + (None,) * 4


def _apply(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    x1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    eps: float,
    dropout_p: float,
    rowscale: Tensor | None,
    prenorm: bool,
    residual_in_fp32: bool,
    zero_centered_weight: bool,
    is_rms_norm: bool,
    return_dropout_mask: bool,
    out_dtype: torch.dtype | None,
    out: Tensor | None,
    residual_out: Tensor | None,
) -> Outputs:
    if not _needs_autograd(x, weight, bias, residual, x1, weight1, bias1):
        return _norm_forward(
            None, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale,
            prenorm, residual_in_fp32, zero_centered_weight, is_rms_norm, return_dropout_mask,
            out_dtype, out, residual_out,
        )  # fmt: skip
    opts = (eps, dropout_p, prenorm, residual_in_fp32, zero_centered_weight, is_rms_norm,
            return_dropout_mask, out_dtype)  # fmt: skip
    return _NormFn.apply(  # type: ignore[no-any-return]
        x, weight, bias, residual, x1, weight1, bias1, rowscale, out, residual_out, opts
    )


def layer_norm_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None = None,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
    return_dropout_mask: bool = False,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> Outputs:
    """Fused ``norm(dropout(x * rowscale) [+ dropout(x1)] + residual)`` (module docstring).

    Returns ``y`` alone, or a tuple ``(y, [y1], [s], [mask, mask1])``: ``y1`` with
    ``weight1``, the pre-norm sum ``s`` with ``prenorm``, the keep-masks with
    ``return_dropout_mask``. ``out`` / ``residual_out``: contiguous buffers to write ``y`` /
    ``s`` into. ``is_rms_norm=True`` is :func:`rms_norm_fn`."""
    return _apply(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
        residual_in_fp32, zero_centered_weight, is_rms_norm, return_dropout_mask, out_dtype,
        out, residual_out,
    )  # fmt: skip


def rms_norm_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None = None,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
    return_dropout_mask: bool = False,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> Outputs:
    """:func:`layer_norm_fn` with RMSNorm (no mean subtracted); same returns."""
    return _apply(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
        residual_in_fp32, zero_centered_weight, True, return_dropout_mask, out_dtype, out,
        residual_out,
    )  # fmt: skip


def layer_norm_linear_fn(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor | None,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    is_rms_norm: bool = False,
) -> Outputs:
    """``F.linear(norm(x + residual), linear_weight, linear_bias)``; with ``prenorm`` also
    the pre-norm sum. Under autocast the norm writes the autocast dtype and the linear runs
    in it. (Unlike 2.x, the normalized activations are kept for the backward rather than
    recomputed there.)"""
    dev_type = x.device.type
    autocast = torch.is_autocast_enabled(dev_type)
    out_dtype = torch.get_autocast_dtype(dev_type) if autocast else None
    normed = layer_norm_fn(
        x, norm_weight, norm_bias, residual=residual, eps=eps, prenorm=prenorm,
        residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm, out_dtype=out_dtype,
    )  # fmt: skip
    y, s = normed if prenorm else (normed, None)
    assert isinstance(y, Tensor)
    dtype = y.dtype
    bias = linear_bias.to(dtype) if linear_bias is not None else None
    out = F.linear(y, linear_weight.to(dtype), bias)
    return (out, s) if prenorm else out


# ------------------------------------------------------------------------- modules


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension with the fused kernel; ``forward(x, residual=None,
    prenorm=False, residual_in_fp32=False)`` adds ``residual`` first (and returns the sum
    too with ``prenorm``). ``dropout_p`` applies to ``x`` in training mode."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        dropout_p: float = 0.0,
        zero_centered_weight: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout_p < 1.0:
            raise InputError(f"RMSNorm: dropout_p is {dropout_p}; valid: 0 <= dropout_p < 1")
        self.eps = eps
        self.drop = torch.nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.zero_centered_weight = zero_centered_weight
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_weight else 1.0)

    def _dropout_p(self) -> float:
        return self.drop.p if self.drop is not None and self.training else 0.0

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None = None,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
    ) -> Outputs:
        return layer_norm_fn(
            x, self.weight, self.bias, residual=residual, eps=self.eps,
            dropout_p=self._dropout_p(), prenorm=prenorm, residual_in_fp32=residual_in_fp32,
            zero_centered_weight=self.zero_centered_weight, is_rms_norm=True,
        )  # fmt: skip


class LayerNorm(RMSNorm):
    """As :class:`RMSNorm`, with LayerNorm and a bias (initialised to zero)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        dropout_p: float = 0.0,
        zero_centered_weight: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(hidden_size, eps, dropout_p, zero_centered_weight, device, dtype)
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None = None,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
    ) -> Outputs:
        return layer_norm_fn(
            x, self.weight, self.bias, residual=residual, eps=self.eps,
            dropout_p=self._dropout_p(), prenorm=prenorm, residual_in_fp32=residual_in_fp32,
            zero_centered_weight=self.zero_centered_weight, is_rms_norm=False,
        )  # fmt: skip


__all__ = [
    "MAX_HIDDEN",
    "LayerNorm",
    "LayerNormFn",
    "RMSNorm",
    "TritonUnavailableError",
    "check_norm_args",
    "layer_norm_fn",
    "layer_norm_linear_fn",
    "layer_norm_ref",
    "rms_norm_fn",
    "rms_norm_ref",
]
