"""Triton kernels of the fused (dropout +) residual-add + LayerNorm / RMSNorm, and their launchers.

This module imports Triton at the top: ``flash_attn.ops.triton.layer_norm`` imports it
only when a kernel is about to run, so that module stays importable without Triton.
The launchers take tensors that the caller has checked, each either contiguous (of any
shape) or 2-D with unit stride along the hidden dimension: rows of ``hidden`` elements
``_row_stride`` apart, so that no reshape is needed. They allocate what the kernels
write, in the caller's shape.

Forward, a tile of ``rows`` x ``block_n`` per program, everything in fp32 registers::

    s   = drop(x * rowscale) [+ drop1(x1)] [+ residual]      (stored as residual_out)
    y   = norm(s) * (weight [+1]) [+ bias]                    (y1 likewise with weight1, bias1)

Backward, each program walks a contiguous run of rows, a tile of rows at a time, keeping
its partial sums of the weight and bias gradients in registers, and writes them to its
row of a partials buffer; a second small kernel sums that buffer over the programs, in
a fixed order, and writes the gradients in the parameters' dtypes. Nothing is added with
atomics, so the gradients are the same bit for bit from run to run.

Dropout. The masks are not stored for the backward: the program draws the same Philox
numbers again. Element (row, col) of branch k (0: x, 1: x1) is kept iff the 32-bit word
``col % 4`` of ``philox(key=seeds[k], counter=(col // 4, row, 0, 0))`` is at least
``floor(p * 2**32)``: one Philox evaluation gives the words of four neighbouring
columns. (The earlier kernels drew with ``tl.rand``, a whole evaluation for each element
of which a quarter was used; on an H200 their forward took about twice as long with
dropout as without at hidden 4096 and 8192, fp16: 0.70 vs 0.31 ms, 0.71 vs 0.38 ms.)

Launch overheads. Optional inputs and outputs are passed as None, which Triton
specialises as a compile-time constant (``X1 is not None`` below is resolved when the
kernel is compiled), instead of a pointer plus a flag: every argument costs host time at
each launch (Triton's binder specialises each one). Row counts are not specialised on
(``do_not_specialize``): a new number of tokens does not compile a new kernel.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The dropout's keep mask interleaves Philox words (tl.interleave: Triton 3.0 and newer).
HAS_INTERLEAVE = hasattr(tl, "interleave")


@triton.jit
def _keep_mask(seed, rows, threshold, BLOCK_N: tl.constexpr):
    """The keep mask of a (len(rows), BLOCK_N) tile: one Philox draw per 4 columns, its
    counter (col // 4, row) whatever the tile (the backward redraws the forward's)."""
    groups = tl.arange(0, BLOCK_N // 4)
    counter = rows[:, None] * 4294967296 + groups[None, :]  # low word: group, high: row
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # column 4 * g + j takes word j of group g
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return words >= threshold


@triton.jit(do_not_specialize=["M"])
def _norm_fwd_kernel(
    X,
    X1,  # the parallel branch, or None
    RES,  # the residual, or None
    ROWSCALE,  # (M,) or None
    W,
    B,  # or None
    W1,  # the second weight (y1), or None
    B1,  # or None
    SEEDS,  # (2,) int64 Philox keys, or None: no dropout
    Y,
    Y1,  # or None
    RES_OUT,  # the pre-norm sum, or None: not stored (it is x)
    MASK,  # (M, N) bool keep masks, or None: not stored
    MASK1,
    STATS,  # fp32: LayerNorm (2, M) = mean, rstd; RMSNorm (M,) = rstd
    stride_x,
    stride_x1,
    stride_res,
    M,
    N,
    eps,
    dropout_p,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    IS_RMS: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
):
    # Outputs (Y, Y1, RES_OUT, MASK, MASK1) are contiguous (M, N): row stride N.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    inside = row_ok[:, None] & col_ok[None, :]
    r = rows[:, None]
    c = cols[None, :]

    # every masked-off element is 0 in s (loads give 0 and each step keeps 0 at 0)
    s = tl.load(X + r * stride_x + c, mask=inside, other=0.0).to(tl.float32)
    if ROWSCALE is not None:
        s = s * tl.load(ROWSCALE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if SEEDS is not None:
        scale = 1.0 / (1.0 - dropout_p)
        threshold = tl.cast(dropout_p * 4294967296.0, tl.uint32)
        keep = _keep_mask(tl.load(SEEDS), rows, threshold, BLOCK_N)
        s = tl.where(keep, s * scale, 0.0)
        if MASK is not None:
            tl.store(MASK + r * N + c, keep, mask=inside)
    if X1 is not None:
        s1 = tl.load(X1 + r * stride_x1 + c, mask=inside, other=0.0).to(tl.float32)
        if SEEDS is not None:
            keep1 = _keep_mask(tl.load(SEEDS + 1), rows, threshold, BLOCK_N)
            s1 = tl.where(keep1, s1 * scale, 0.0)
            if MASK1 is not None:
                tl.store(MASK1 + r * N + c, keep1, mask=inside)
        s += s1
    if RES is not None:
        s += tl.load(RES + r * stride_res + c, mask=inside, other=0.0).to(tl.float32)
    if RES_OUT is not None:
        tl.store(RES_OUT + r * N + c, s, mask=inside)

    if IS_RMS:
        centered = s
        rstd_at = STATS + rows
    else:
        mean = tl.sum(s, axis=1) / N
        tl.store(STATS + rows, mean, mask=row_ok)
        centered = tl.where(col_ok[None, :], s - mean[:, None], 0.0)
        rstd_at = STATS + M + rows
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
    tl.store(rstd_at, rstd, mask=row_ok)
    xhat = centered * rstd[:, None]

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    y = xhat * w[None, :]
    if B is not None:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r * N + c, y, mask=inside)
    if W1 is not None:
        w1 = tl.load(W1 + cols, mask=col_ok, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w1 += 1.0
        y1 = xhat * w1[None, :]
        if B1 is not None:
            y1 += tl.load(B1 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y1 + r * N + c, y1, mask=inside)


@triton.jit(do_not_specialize=["M", "rows_per_program"])
def _norm_bwd_kernel(
    S,  # the pre-norm sum saved by the forward
    W,
    W1,  # or None
    DY,
    DY1,  # or None (no W1)
    DRES_OUT,  # the gradient of the returned pre-norm sum, or None
    ROWSCALE,  # or None
    SEEDS,  # or None: no dropout
    STATS,  # as the forward wrote it
    DX,
    DX1,  # or None: no x1
    DRES,  # or None: no residual input
    PARTIALS,  # fp32 (slots, programs, N): dw, [db], [dw1], [db1] of each program
    stride_s,
    stride_dy,
    stride_dy1,
    stride_dres_out,
    M,
    N,
    rows_per_program,  # a multiple of ROWS
    dropout_p,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_B1: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
):
    # Outputs (DX, DX1, DRES) are contiguous (M, N): row stride N.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    c = cols[None, :]

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    dw = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    if W1 is not None:
        w1 = tl.load(W1 + cols, mask=col_ok, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w1 += 1.0
        dw1 = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        db1 = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    if SEEDS is not None:
        seed = tl.load(SEEDS)
        seed1 = tl.load(SEEDS + 1)
        scale = 1.0 / (1.0 - dropout_p)
        threshold = tl.cast(dropout_p * 4294967296.0, tl.uint32)

    # The last program's run can pass the last row: such rows load zeros (so they add
    # nothing to the sums) and store nothing.
    first = pid.to(tl.int64) * rows_per_program
    for step in range(0, rows_per_program, ROWS):
        rows = first + step + tl.arange(0, ROWS)
        row_ok = rows < M
        inside = row_ok[:, None] & col_ok[None, :]
        r = rows[:, None]
        s = tl.load(S + r * stride_s + c, mask=inside, other=0.0).to(tl.float32)
        if IS_RMS:
            rstd = tl.load(STATS + rows, mask=row_ok, other=0.0)
            xhat = s * rstd[:, None]  # s is 0 outside the tile
        else:
            mean = tl.load(STATS + rows, mask=row_ok, other=0.0)
            rstd = tl.load(STATS + M + rows, mask=row_ok, other=0.0)
            xhat = tl.where(col_ok[None, :], (s - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + r * stride_dy + c, mask=inside, other=0.0).to(tl.float32)
        dw += dy * xhat
        if HAS_B:
            db += dy
        g = dy * w[None, :]  # the gradient reaching xhat
        if W1 is not None:
            dy1 = tl.load(DY1 + r * stride_dy1 + c, mask=inside, other=0.0).to(tl.float32)
            dw1 += dy1 * xhat
            if HAS_B1:
                db1 += dy1
            g += dy1 * w1[None, :]
        # d/ds of norm(s): rstd * (g - mean(g * xhat) * xhat [- mean(g)])
        ds = g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None]
        if not IS_RMS:
            ds -= (tl.sum(g, axis=1) / N)[:, None]
        ds = ds * rstd[:, None]
        if DRES_OUT is not None:
            ds += tl.load(DRES_OUT + r * stride_dres_out + c, mask=inside, other=0.0).to(
                tl.float32
            )
        if DRES is not None:
            tl.store(DRES + r * N + c, ds, mask=inside)
        dx = ds
        if SEEDS is not None:
            keep = _keep_mask(seed, rows, threshold, BLOCK_N)
            dx = tl.where(keep, dx * scale, 0.0)
        if ROWSCALE is not None:
            dx = dx * tl.load(ROWSCALE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(DX + r * N + c, dx, mask=inside)
        if DX1 is not None:
            dx1 = ds
            if SEEDS is not None:
                keep1 = _keep_mask(seed1, rows, threshold, BLOCK_N)
                dx1 = tl.where(keep1, dx1 * scale, 0.0)
            tl.store(DX1 + r * N + c, dx1, mask=inside)

    # this program's partial sums: slot-major (slot, program, column)
    slot_stride = tl.num_programs(0).to(tl.int64) * N
    part = PARTIALS + pid.to(tl.int64) * N + cols
    tl.store(part, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_B:
        part += slot_stride
        tl.store(part, tl.sum(db, axis=0), mask=col_ok)
    if W1 is not None:
        part += slot_stride
        tl.store(part, tl.sum(dw1, axis=0), mask=col_ok)
        if HAS_B1:
            part += slot_stride
            tl.store(part, tl.sum(db1, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=["programs"])
def _sum_partials_kernel(
    PARTIALS,  # fp32 (slots, programs, N)
    OUT0,  # slot 0's sum (N,), in its own dtype
    OUT1,  # slot 1's, or None where there are fewer slots; likewise OUT2, OUT3
    OUT2,
    OUT3,
    programs,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Column block ``program_id(0)`` of slot ``program_id(1)``: the partials summed over
    the programs in a fixed order (chunks of BLOCK_P in turn, then a fixed tree)."""
    slot = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    base = PARTIALS + slot.to(tl.int64) * programs * N
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for start in range(0, programs, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        at = base + p[:, None].to(tl.int64) * N + cols[None, :]
        acc += tl.load(at, mask=(p[:, None] < programs) & col_ok[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    if slot == 0:
        tl.store(OUT0 + cols, total, mask=col_ok)
    if OUT1 is not None:
        if slot == 1:
            tl.store(OUT1 + cols, total, mask=col_ok)
    if OUT2 is not None:
        if slot == 2:
            tl.store(OUT2 + cols, total, mask=col_ok)
    if OUT3 is not None:
        if slot == 3:
            tl.store(OUT3 + cols, total, mask=col_ok)


# ------------------------------------------------------------------ launch configurations


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel's tile: ``rows`` x ``block_n`` elements per program (forward) or per
    loop step (backward), over ``warps`` warps. ``programs_per_sm``: the backward's grid
    per SM (0: from the warps, :func:`_programs_per_sm`; benchmarks/bench_norms.py
    --sweep sets it)."""

    block_n: int
    rows: int
    warps: int
    programs_per_sm: int = 0


def _next_power_of_2(n: int) -> int:
    # plain Python: triton.next_power_of_2 is a constexpr_function (microseconds a call)
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(n: int, min_elements: int, per_thread: int) -> LaunchConfig:
    """A whole row (its next power of two, at least 16 columns: the dropout draws 4
    columns at a time), stacked to at least ``min_elements`` elements, ``per_thread`` of
    them per thread (at most 16 warps)."""
    block = max(16, _next_power_of_2(n))
    rows = max(1, min_elements // block)
    warps = max(1, min(16, rows * block // (32 * per_thread)))
    return LaunchConfig(block, rows, warps)


# Register counts below: ptxas for sm_90 through Triton 3.6 (compiled on a machine without
# a GPU: cuobjdump --dump-resource-usage), bf16, residual and prenorm, LayerNorm / RMSNorm.


@functools.cache
def forward_config(n: int, dropout: bool = False) -> LaunchConfig:
    """One row per program from hidden 1024 up, 8 elements per thread (16-byte loads of
    fp16/bf16). The forward holds few values per element (28-42 registers a thread at
    1024-8192 without dropout, up to 82 with it at 8192), so many programs are resident
    per SM and their independent loads keep the memory busy. Shorter rows are stacked up
    to 1024 elements a program: one-warp programs of one short row each would hit the
    limit of 32 resident programs per SM. With dropout, 16 elements per thread (half the
    warps): on an H200 (bench_norms --sweep, bf16) 0.136 ms against 0.156 at hidden 4096,
    0.040 against 0.042 at 1024, the same at 8192 (16 warps either way); without dropout
    the two were within 1%."""
    return _tile(n, 1024, 16 if dropout else 8)


@functools.cache
def backward_config(n: int, parallel: bool = False) -> LaunchConfig:
    """16 elements per thread, tiles of at least 2048 elements (two 1024-wide rows per
    loop step). A backward program loops over its rows, and each step waits for its loads
    before the row reductions, so the elements the resident programs hold decide how many
    bytes are in flight. The registers bound that: about 7-10 a held element (one row of
    1024 with 4 warps: 56 registers without dropout, 94 with; two rows with 4 warps: 128;
    4096 with 8 warps: 104, 160 with dropout; 8192 with 16 warps: 102-128), so an SM
    holds about 8K elements whatever the split, and 16 a thread needs the fewest
    programs (each adds a row of partial sums) to hold them. With the parallel branch
    (``parallel``: weight1, two more partial sums an element) 16 a thread spilled under
    the register cap (24-280 bytes a thread at 1024), so 8 a thread there."""
    return _tile(n, 1024, 8) if parallel else _tile(n, 2048, 16)


# The backward's register cap: with at most 128 a thread, 16 // warps programs fit on an
# SM (64K registers), the number the grid is sized for. Uncapped, ptxas gave a few
# variants more (2048 with dropout: 142; 4096 with dropout: 161), which would leave
# fewer programs resident than the grid has per SM: a second, part-empty wave.
BACKWARD_MAX_REGISTERS = 128


def _backward_options() -> dict[str, int]:
    """``maxnreg`` where this Triton's CUDA backend takes it (it rejects unknown options;
    ROCm builds of torch run Triton's AMD backend, which has none)."""
    if torch.version.hip is not None:
        return {}
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return {}
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return {"maxnreg": BACKWARD_MAX_REGISTERS} if "maxnreg" in fields else {}


_BACKWARD_OPTIONS = _backward_options()


def _programs_per_sm(config: LaunchConfig) -> int:
    """Backward programs one SM holds at about 128 registers a thread (16 elements of
    about 8 registers each): 64K registers / (128 x 32 x warps)."""
    if config.programs_per_sm > 0:
        return config.programs_per_sm
    return max(1, 16 // config.warps)


_SM_COUNTS: dict[int, int] = {}


def _sm_count(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 1  # the interpreter: one "SM"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    count = _SM_COUNTS.get(index)
    if count is None:
        count = torch.cuda.get_device_properties(index).multi_processor_count
        _SM_COUNTS[index] = count
    return count


def backward_programs(dev: torch.device, rows: int, config: LaunchConfig) -> tuple[int, int]:
    """(programs, rows per program) of the backward: as many programs as the SMs hold
    at once (more would only add rows of partial sums and a second wave), each a run of
    whole tiles. The earlier launch had 4 one-row programs of 4 warps per SM at hidden
    1024, 4K elements in flight per SM where the registers allow 8K."""
    programs = max(1, min(_cdiv(rows, config.rows), _programs_per_sm(config) * _sm_count(dev)))
    rows_per_program = _cdiv(_cdiv(rows, programs), config.rows) * config.rows
    return _cdiv(rows, rows_per_program), rows_per_program


# The partials' reduction reads programs x N fp32 a gradient (hidden 1024: 528 x 1024,
# 2 MiB; mostly still in L2, written just before). It is latency-bound: narrow column
# blocks (16 columns, 64-byte row segments) give it many programs (hidden 1024: 64 a
# gradient; 8192: 512), each summing up to 256 programs' rows a step.
SUM_BLOCK_C = 16
SUM_BLOCK_P = 256
SUM_WARPS = 4


def _on_device(dev: torch.device) -> AbstractContextManager[object]:
    """Launch on ``dev``: Triton launches on the current CUDA device, so switch to
    ``dev`` only where it is another one (the switch and back cost host time)."""
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return nullcontext()


def _row_stride(t: torch.Tensor) -> int:
    """The distance between rows of a tensor as the launchers take it (contiguous, or
    2-D with unit stride along the hidden dimension)."""
    return t.stride(-2) if t.dim() >= 2 else t.shape[-1]


@dataclass
class ForwardResult:
    """What the forward kernel wrote; ``residual_out`` is None where no pre-norm sum was
    stored (then it equals the input ``x``). ``stats``: fp32 mean and rstd of each row
    (LayerNorm, shape (2, M)) or rstd (RMSNorm, (M,)), for the backward."""

    y: torch.Tensor
    y1: torch.Tensor | None
    residual_out: torch.Tensor | None
    stats: torch.Tensor
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
    """Launch the forward over the rows of ``x`` (M rows of N); ``y`` and ``residual_out``
    are the caller's contiguous output buffers of x's shape (``residual_out`` None: the
    pre-norm sum is not stored)."""
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    shape = y.shape
    dev = x.device
    y1 = torch.empty_like(y) if weight1 is not None else None
    # sizes as ints: torch.empty parses them faster than a tuple or torch.Size
    stats = (
        torch.empty(m, dtype=torch.float32, device=dev)
        if is_rms_norm
        else torch.empty(2, m, dtype=torch.float32, device=dev)
    )
    seeds = mask = mask1 = None
    if dropout_p > 0.0:
        # two Philox keys from torch's generator of this device (torch.manual_seed
        # repeats them; a CUDA graph replays a fresh draw)
        seeds = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=dev)
        if store_mask:
            mask = torch.empty(shape, dtype=torch.bool, device=dev)
            if x1 is not None:
                mask1 = torch.empty(shape, dtype=torch.bool, device=dev)
    if m == 0:
        return ForwardResult(y, y1, residual_out, stats, seeds, mask, mask1)
    cfg = forward_config(n, dropout_p > 0.0)
    with _on_device(dev):
        _norm_fwd_kernel[(_cdiv(m, cfg.rows),)](
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
            stats,
            _row_stride(x),
            _row_stride(x1) if x1 is not None else 0,
            _row_stride(residual) if residual is not None else 0,
            m,
            n,
            eps,
            dropout_p,
            BLOCK_N=cfg.block_n,
            ROWS=cfg.rows,
            IS_RMS=is_rms_norm,
            ZERO_CENTERED=zero_centered_weight,
            num_warps=cfg.warps,
        )
    return ForwardResult(y, y1, residual_out, stats, seeds, mask, mask1)


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
    stats: torch.Tensor,
    dropout_p: float,
    is_rms_norm: bool,
    zero_centered_weight: bool,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    want_dx1: bool,
    shape: torch.Size,
) -> BackwardResult:
    """Launch the backward. ``s`` is the saved pre-norm sum (M rows of N); the gradients
    of x, x1 and residual are allocated in ``shape`` (x's); ``residual_dtype`` None means
    the forward had no residual input (no dresidual is written)."""
    n = s.shape[-1]
    m = s.numel() // n if n else 0
    dev = s.device
    dx = torch.empty(*shape, dtype=x_dtype, device=dev)
    dx1 = torch.empty(*shape, dtype=x_dtype, device=dev) if want_dx1 else None
    # Without dropout and rowscale the residual's gradient is dx itself (ds): one tensor,
    # written once, serves both (as upstream, which returns dx as dresidual then). A
    # second copy would be a whole extra tensor of writes in a memory-bound kernel.
    dres_is_dx = residual_dtype == x_dtype and seeds is None and rowscale is None
    dres = None
    if residual_dtype and not dres_is_dx:
        dres = torch.empty(*shape, dtype=residual_dtype, device=dev)
    params = [p for p in (weight, bias, weight1, bias1) if p is not None]
    grads = [torch.empty(n, dtype=p.dtype, device=dev) for p in params]
    if m == 0:
        for g in grads:
            g.zero_()
    else:
        cfg = backward_config(n, weight1 is not None)
        programs, rows_per_program = backward_programs(dev, m, cfg)
        partials = torch.empty(len(params), programs, n, dtype=torch.float32, device=dev)
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
                stats,
                dx,
                dx1,
                dres,
                partials,
                _row_stride(s),
                _row_stride(dy),
                _row_stride(dy1) if dy1 is not None else 0,
                _row_stride(dresidual_out) if dresidual_out is not None else 0,
                m,
                n,
                rows_per_program,
                dropout_p,
                BLOCK_N=cfg.block_n,
                ROWS=cfg.rows,
                IS_RMS=is_rms_norm,
                HAS_B=bias is not None,
                HAS_B1=bias1 is not None,
                ZERO_CENTERED=zero_centered_weight,
                num_warps=cfg.warps,
                **_BACKWARD_OPTIONS,
            )
            out = grads + [None] * (4 - len(grads))
            _sum_partials_kernel[(_cdiv(n, SUM_BLOCK_C), len(grads))](
                partials,
                out[0],
                out[1],
                out[2],
                out[3],
                programs,
                n,
                BLOCK_P=SUM_BLOCK_P,
                BLOCK_C=SUM_BLOCK_C,
                num_warps=SUM_WARPS,
            )
    it = iter(grads)
    return BackwardResult(
        dx=dx,
        dx1=dx1,
        dresidual=dx if dres_is_dx else dres,
        dweight=next(it),
        dbias=next(it) if bias is not None else None,
        dweight1=next(it) if weight1 is not None else None,
        dbias1=next(it) if bias1 is not None else None,
    )
