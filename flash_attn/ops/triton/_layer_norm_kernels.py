"""Triton kernels of the fused (dropout +) residual-add + LayerNorm / RMSNorm, and their launchers.

This module imports Triton at the top: ``flash_attn.ops.triton.layer_norm`` imports it
only when a kernel is about to run, so that module stays importable without Triton.
The launchers take 2-D tensors that the caller has checked (row-major rows, unit stride
along the hidden dimension) and allocate what the kernels write.

Forward, one program per row, everything in fp32 registers::

    s   = drop(x * rowscale) [+ drop1(x1)] [+ residual]      (stored as residual_out)
    y   = norm(s) * (weight [+1]) [+ bias]                    (y1 likewise with weight1, bias1)

Backward, each program walks a contiguous run of rows, keeping its partial sums of the
weight and bias gradients in registers, and writes them to one row of a partials buffer
that the launcher sums. The dropout masks are not stored for the backward: the program
draws the same Philox numbers again from the seed the forward used (key ``seed + row``,
counter = column), which gives the same mask bit for bit.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_fwd_kernel(
    X,
    X1,
    RES,
    ROWSCALE,
    W,
    B,
    W1,
    B1,
    SEEDS,
    Y,
    Y1,
    RES_OUT,
    MASK,
    MASK1,
    MEAN,
    RSTD,
    stride_x,
    stride_x1,
    stride_res,
    stride_y,
    stride_y1,
    stride_res_out,
    N,
    eps,
    dropout_p,
    BLOCK_N: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_X1: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    DROPOUT: tl.constexpr,
    STORE_MASK: tl.constexpr,
    STORE_RES_OUT: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N

    s = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_ROWSCALE:
        s = s * tl.load(ROWSCALE + row).to(tl.float32)
    if DROPOUT:
        keep = tl.rand(tl.load(SEEDS) + row, cols) >= dropout_p
        s = tl.where(keep, s / (1.0 - dropout_p), 0.0)
        if STORE_MASK:
            tl.store(MASK + row * N + cols, keep, mask=inside)
    if HAS_X1:
        s1 = tl.load(X1 + row * stride_x1 + cols, mask=inside, other=0.0).to(tl.float32)
        if DROPOUT:
            keep1 = tl.rand(tl.load(SEEDS + 1) + row, cols) >= dropout_p
            s1 = tl.where(keep1, s1 / (1.0 - dropout_p), 0.0)
            if STORE_MASK:
                tl.store(MASK1 + row * N + cols, keep1, mask=inside)
        s += s1
    if HAS_RES:
        s += tl.load(RES + row * stride_res + cols, mask=inside, other=0.0).to(tl.float32)
    if STORE_RES_OUT:
        tl.store(RES_OUT + row * stride_res_out + cols, s, mask=inside)

    if IS_RMS:
        centered = tl.where(inside, s, 0.0)
    else:
        mean = tl.sum(s, axis=0) / N
        tl.store(MEAN + row, mean)
        centered = tl.where(inside, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    xhat = centered * rstd

    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    y = xhat * w
    if HAS_B:
        y += tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y, mask=inside)
    if HAS_W1:
        w1 = tl.load(W1 + cols, mask=inside, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w1 += 1.0
        y1 = xhat * w1
        if HAS_B1:
            y1 += tl.load(B1 + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Y1 + row * stride_y1 + cols, y1, mask=inside)


@triton.jit
def _norm_bwd_kernel(
    S,
    W,
    W1,
    DY,
    DY1,
    DRES_OUT,
    ROWSCALE,
    SEEDS,
    MEAN,
    RSTD,
    DX,
    DX1,
    DRES,
    DW_PART,
    DB_PART,
    DW1_PART,
    DB1_PART,
    stride_s,
    stride_dy,
    stride_dy1,
    stride_dres_out,
    stride_dx,
    stride_dx1,
    stride_dres,
    M,
    N,
    rows_per_program,
    dropout_p,
    BLOCK_N: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_DRES_OUT: tl.constexpr,
    STORE_DRES: tl.constexpr,
    STORE_DX1: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    first = pid.to(tl.int64) * rows_per_program

    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_W1:
        w1 = tl.load(W1 + cols, mask=inside, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w1 += 1.0
        dw1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(SEEDS)
        seed1 = tl.load(SEEDS + 1)

    # The last program's run can pass the last row: such rows load zeros (so they add
    # nothing to the sums) and store nothing.
    for i in range(0, rows_per_program):
        row = first + i
        live_row = row < M
        live = inside & live_row
        s = tl.load(S + row * stride_s + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=live_row, other=0.0)
        if IS_RMS:
            xhat = tl.where(inside, s * rstd, 0.0)
        else:
            mean = tl.load(MEAN + row, mask=live_row, other=0.0)
            xhat = tl.where(inside, (s - mean) * rstd, 0.0)
        dy = tl.load(DY + row * stride_dy + cols, mask=live, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        g = dy * w  # the gradient reaching xhat
        if HAS_W1:
            dy1 = tl.load(DY1 + row * stride_dy1 + cols, mask=live, other=0.0).to(tl.float32)
            dw1 += dy1 * xhat
            db1 += dy1
            g += dy1 * w1
        # d/ds of norm(s): rstd * (g - mean(g * xhat) * xhat [- mean(g)])
        ds = g - xhat * (tl.sum(g * xhat, axis=0) / N)
        if not IS_RMS:
            ds -= tl.sum(g, axis=0) / N
        ds = ds * rstd
        if HAS_DRES_OUT:
            ds += tl.load(DRES_OUT + row * stride_dres_out + cols, mask=live, other=0.0).to(
                tl.float32
            )
        if STORE_DRES:
            tl.store(DRES + row * stride_dres + cols, ds, mask=live)
        dx = ds
        if DROPOUT:
            keep = tl.rand(seed + row, cols) >= dropout_p
            dx = tl.where(keep, dx / (1.0 - dropout_p), 0.0)
        if HAS_ROWSCALE:
            dx = dx * tl.load(ROWSCALE + row, mask=live_row, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx, mask=live)
        if STORE_DX1:
            dx1 = ds
            if DROPOUT:
                keep1 = tl.rand(seed1 + row, cols) >= dropout_p
                dx1 = tl.where(keep1, dx1 / (1.0 - dropout_p), 0.0)
            tl.store(DX1 + row * stride_dx1 + cols, dx1, mask=live)

    part = pid.to(tl.int64) * N + cols
    tl.store(DW_PART + part, dw, mask=inside)
    if HAS_B:
        tl.store(DB_PART + part, db, mask=inside)
    if HAS_W1:
        tl.store(DW1_PART + part, dw1, mask=inside)
        if HAS_B1:
            tl.store(DB1_PART + part, db1, mask=inside)


def _on_device(dev: torch.device) -> AbstractContextManager[object]:
    """Launch on ``dev`` (a CPU device only under TRITON_INTERPRET=1)."""
    return torch.cuda.device(dev) if dev.type == "cuda" else nullcontext()


def _block_and_warps(n: int) -> tuple[int, int]:
    """The row block (the next power of two of the hidden size) and a warp count that gives
    each thread 8 to 16 elements of it, between 1 and 16 warps."""
    block = triton.next_power_of_2(n)
    return block, max(1, min(16, block // 256))


@dataclass
class ForwardResult:
    """What the forward kernel wrote; ``residual_out`` is None where no pre-norm sum was
    stored (then it equals the input ``x``)."""

    y: torch.Tensor
    y1: torch.Tensor | None
    residual_out: torch.Tensor | None
    mean: torch.Tensor | None
    rstd: torch.Tensor
    seeds: torch.Tensor | None
    mask: torch.Tensor | None
    mask1: torch.Tensor | None


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    residual: torch.Tensor | None,
    x1: torch.Tensor | None,
    weight1: torch.Tensor | None,
    bias1: torch.Tensor | None,
    rowscale: torch.Tensor | None,
    eps: float,
    dropout_p: float,
    is_rms_norm: bool,
    zero_centered_weight: bool,
    store_mask: bool,
    y: torch.Tensor,
    residual_out: torch.Tensor | None,
) -> ForwardResult:
    """Launch the forward over the rows of ``x`` (M, N); ``y`` and ``residual_out`` are
    the caller's output buffers (``residual_out`` None: the pre-norm sum is not stored)."""
    m, n = x.shape
    dev = x.device
    y1 = torch.empty(m, n, dtype=y.dtype, device=dev) if weight1 is not None else None
    mean = None if is_rms_norm else torch.empty(m, dtype=torch.float32, device=dev)
    rstd = torch.empty(m, dtype=torch.float32, device=dev)
    dropout = dropout_p > 0.0
    # two Philox keys from torch's generator of this device (torch.manual_seed repeats them)
    seeds = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=dev) if dropout else None
    mask = torch.empty(m, n, dtype=torch.bool, device=dev) if dropout and store_mask else None
    mask1 = (
        torch.empty(m, n, dtype=torch.bool, device=dev)
        if dropout and store_mask and x1 is not None
        else None
    )
    block, warps = _block_and_warps(n)
    if m == 0:
        return ForwardResult(y, y1, residual_out, mean, rstd, seeds, mask, mask1)
    with _on_device(dev):
        _norm_fwd_kernel[(m,)](
            x,
            x1,
            residual,
            rowscale,
            weight,
            bias,
            weight1,
            bias1,
            seeds,
            y,
            y1,
            residual_out,
            mask,
            mask1,
            mean,
            rstd,
            x.stride(0),
            x1.stride(0) if x1 is not None else 0,
            residual.stride(0) if residual is not None else 0,
            y.stride(0),
            y1.stride(0) if y1 is not None else 0,
            residual_out.stride(0) if residual_out is not None else 0,
            n,
            eps,
            dropout_p,
            BLOCK_N=block,
            IS_RMS=is_rms_norm,
            HAS_X1=x1 is not None,
            HAS_RES=residual is not None,
            HAS_ROWSCALE=rowscale is not None,
            HAS_B=bias is not None,
            HAS_W1=weight1 is not None,
            HAS_B1=bias1 is not None,
            DROPOUT=dropout,
            STORE_MASK=mask is not None,
            STORE_RES_OUT=residual_out is not None,
            ZERO_CENTERED=zero_centered_weight,
            num_warps=warps,
        )
    return ForwardResult(y, y1, residual_out, mean, rstd, seeds, mask, mask1)


@dataclass
class BackwardResult:
    """Gradients the backward kernel wrote (None where not asked for)."""

    dx: torch.Tensor
    dx1: torch.Tensor | None
    dresidual: torch.Tensor | None
    dweight: torch.Tensor
    dbias: torch.Tensor | None
    dweight1: torch.Tensor | None
    dbias1: torch.Tensor | None


def _program_count(dev: torch.device, rows: int) -> int:
    """Programs of the backward: a few per SM (each keeps N partial sums in registers)."""
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))


def backward(
    dy: torch.Tensor,
    dy1: torch.Tensor | None,
    dresidual_out: torch.Tensor | None,
    *,
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight1: torch.Tensor | None,
    bias1: torch.Tensor | None,
    rowscale: torch.Tensor | None,
    seeds: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    dropout_p: float,
    is_rms_norm: bool,
    zero_centered_weight: bool,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    want_dx1: bool,
) -> BackwardResult:
    """Launch the backward. ``s`` is the saved pre-norm sum (M, N); ``residual_dtype`` None
    means the forward had no residual input (no dresidual is written)."""
    m, n = s.shape
    dev = s.device
    dx = torch.empty(m, n, dtype=x_dtype, device=dev)
    dx1 = torch.empty(m, n, dtype=x_dtype, device=dev) if want_dx1 else None
    dres = torch.empty(m, n, dtype=residual_dtype, device=dev) if residual_dtype else None
    if m == 0:

        def zeros(like: torch.Tensor | None) -> torch.Tensor | None:
            return None if like is None else torch.zeros_like(like)

        return BackwardResult(
            dx, dx1, dres, torch.zeros_like(weight), zeros(bias), zeros(weight1), zeros(bias1)
        )
    programs = _program_count(dev, m)
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)

    def partials(wanted: bool) -> torch.Tensor | None:
        return torch.empty(programs, n, dtype=torch.float32, device=dev) if wanted else None

    dw_part = partials(True)
    db_part = partials(bias is not None)
    dw1_part = partials(weight1 is not None)
    db1_part = partials(bias1 is not None)
    block, warps = _block_and_warps(n)
    with _on_device(dev):
        _norm_bwd_kernel[(programs,)](
            s,
            weight,
            weight1,
            dy,
            dy1,
            dresidual_out,
            rowscale,
            seeds,
            mean,
            rstd,
            dx,
            dx1,
            dres,
            dw_part,
            db_part,
            dw1_part,
            db1_part,
            s.stride(0),
            dy.stride(0),
            dy1.stride(0) if dy1 is not None else 0,
            dresidual_out.stride(0) if dresidual_out is not None else 0,
            dx.stride(0),
            dx1.stride(0) if dx1 is not None else 0,
            dres.stride(0) if dres is not None else 0,
            m,
            n,
            rows_per_program,
            dropout_p,
            BLOCK_N=block,
            IS_RMS=is_rms_norm,
            HAS_B=bias is not None,
            HAS_W1=weight1 is not None,
            HAS_B1=bias1 is not None,
            HAS_DRES_OUT=dresidual_out is not None,
            STORE_DRES=dres is not None,
            STORE_DX1=dx1 is not None,
            HAS_ROWSCALE=rowscale is not None,
            DROPOUT=dropout_p > 0.0,
            ZERO_CENTERED=zero_centered_weight,
            num_warps=warps,
        )

    def total(part: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        if part is None or like is None:
            return None
        return part.sum(0).to(like.dtype)

    dweight = total(dw_part, weight)
    assert dweight is not None
    return BackwardResult(
        dx=dx,
        dx1=dx1,
        dresidual=dres,
        dweight=dweight,
        dbias=total(db_part, bias),
        dweight1=total(dw1_part, weight1),
        dbias1=total(db1_part, bias1),
    )
