"""Rotary position embedding (RoPE) of a query/key tensor, as one Triton kernel.

``apply_rotary`` keeps the signature and semantics of ``flash_attn.ops.triton.rotary``
in flash_attn 2.x: feature pairs of the first ``rotary_dim`` features of every head are
rotated by the angle whose cosine and sine are the row of ``cos``/``sin`` at the
token's position; the other features pass through.

Triton is imported when this module is, if it is installed; without it the module still
imports (so do ``flash_attn.layers.rotary`` and the input checks), and only a launch on
a CUDA tensor fails, saying that Triton is missing. The kernel computes in fp32 whatever
the element type, and runs on CUDA tensors only; under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this module is imported) it also accepts CPU
tensors, which is how the kernel is debugged without a GPU.

No ``from __future__ import annotations`` here: Triton reads the kernel's
``tl.constexpr`` annotations as objects.
"""

import os
from typing import Optional, Union

import torch

from flash_attn.errors import DeviceError, InputError

try:
    import triton
    import triton.language as tl
except ImportError as _error:
    # flash_attn 2.x's contract: model code imports this module in a try block and
    # falls back to plain PyTorch rotary where it raises ImportError
    raise ImportError(
        f"flash_attn.ops.triton.rotary needs Triton, which does not import here ({_error}). "
        "Install the triton that matches your torch (`pip install triton`; CUDA builds of "
        "torch on Linux bring it)."
    ) from _error

# Triton's interpreter runs kernels on CPU tensors (read once: triton.jit reads it when
# the kernel is defined, below).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OFFSET_DTYPES = (torch.int32, torch.int64)
# CUDA grid limit of the y and z axes (heads, sequences)
MAX_GRID_YZ = 65535
# Elements of the rotated half (BLOCK_K) times rows (BLOCK_M) per program: the tile size
TILE_ELEMENTS = 2048
MAX_BLOCK_M = 32

__all__ = ["apply_rotary"]


if triton is not None:

    @triton.jit(do_not_specialize=["seqlen", "seqlen_ro", "offset"])
    def rotary_kernel(
        OUT,
        X,
        COS,
        SIN,
        CU_SEQLENS,  # (batch + 1,) sequence starts, or None (dense)
        OFFSETS,  # (batch,) positions of each sequence's first token, or None
        seqlen,  # rows of each sequence (dense) or the most rows of one (varlen)
        seqlen_ro,  # rows of cos and sin
        offset,  # the position of every first token when OFFSETS is None
        out_stride_b,
        out_stride_s,
        out_stride_h,
        out_stride_d,
        x_stride_b,
        x_stride_s,
        x_stride_h,
        x_stride_d,
        HALF: tl.constexpr,  # rotary_dim // 2: the pairs of one head
        BLOCK_K: tl.constexpr,  # HALF rounded up to a power of 2
        BLOCK_M: tl.constexpr,  # rows per program
        INTERLEAVED: tl.constexpr,
        CONJUGATE: tl.constexpr,
        IS_VARLEN: tl.constexpr,
        OFFSETS_TENSOR: tl.constexpr,
    ):
        # One program: BLOCK_M rows of one head of one sequence.
        block = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        seq = tl.program_id(2)
        if IS_VARLEN:
            first = tl.load(CU_SEQLENS + seq).to(tl.int64)
            rows_here = tl.load(CU_SEQLENS + seq + 1).to(tl.int64) - first
            x_ptr = X + first * x_stride_s
            out_ptr = OUT + first * out_stride_s
        else:
            rows_here = seqlen
            x_ptr = X + seq.to(tl.int64) * x_stride_b
            out_ptr = OUT + seq.to(tl.int64) * out_stride_b
        if block * BLOCK_M >= rows_here:
            return
        if OFFSETS_TENSOR:
            start = tl.load(OFFSETS + seq).to(tl.int64)
        else:
            start = offset
        x_ptr += head * x_stride_h
        out_ptr += head * out_stride_h

        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        pairs = tl.arange(0, BLOCK_K)
        row_in = rows < rows_here
        pair_in = pairs < HALF
        # cos/sin rows past the table (tensor offsets are not checked on the host)
        # read as the identity rotation: cos 1, sin 0
        pos = rows + start
        table_in = row_in & (pos >= 0) & (pos < seqlen_ro)
        table_at = pos[:, None] * HALF + pairs[None, :]
        table_mask = table_in[:, None] & pair_in[None, :]
        cos = tl.load(COS + table_at, mask=table_mask, other=1.0).to(tl.float32)
        sin = tl.load(SIN + table_at, mask=table_mask, other=0.0).to(tl.float32)
        if CONJUGATE:
            sin = -sin

        # feature pair p: (2p, 2p + 1) interleaved (GPT-J), (p, p + HALF) otherwise (NeoX)
        if INTERLEAVED:
            first_feat = pairs * 2
            second_feat = first_feat + 1
        else:
            first_feat = pairs
            second_feat = pairs + HALF
        mask = row_in[:, None] & pair_in[None, :]
        x_rows = x_ptr + rows[:, None] * x_stride_s
        out_rows = out_ptr + rows[:, None] * out_stride_s
        a = tl.load(x_rows + first_feat[None, :] * x_stride_d, mask=mask, other=0.0)
        b = tl.load(x_rows + second_feat[None, :] * x_stride_d, mask=mask, other=0.0)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        # both halves are read before either is written: in place is safe
        tl.store(out_rows + first_feat[None, :] * out_stride_d, a * cos - b * sin, mask=mask)
        tl.store(out_rows + second_feat[None, :] * out_stride_d, a * sin + b * cos, mask=mask)


def _is_int(value: object) -> bool:
    """A Python int, or a symbolic one under torch.compile (bool is not accepted)."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _check_inputs(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: Union[int, torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: Optional[int],
) -> tuple[int, int, int, int]:
    """Shapes, dtypes and values (tensor metadata only). Returns (batch, seqlen,
    nheads, rotary_dim); seqlen is max_seqlen for varlen."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise InputError(f"x has dtype {x.dtype}; valid: float16, bfloat16, float32")
    if cu_seqlens is None:
        if x.dim() != 4:
            raise InputError(
                f"x must have shape (batch, seqlen, nheads, headdim); got {tuple(x.shape)}"
                " (pass cu_seqlens and max_seqlen for x of shape (total, nheads, headdim))"
            )
        batch, seqlen, nheads, headdim = x.shape
    else:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise InputError(f"cu_seqlens must be a tensor; got {type(cu_seqlens).__name__}")
        if max_seqlen is None:
            raise InputError("cu_seqlens is given without max_seqlen; pass both for varlen x")
        if not _is_int(max_seqlen) or max_seqlen < 0:
            raise InputError(f"max_seqlen must be an int >= 0; got {max_seqlen!r}")
        if x.dim() != 3:
            raise InputError(
                f"with cu_seqlens, x must have shape (total, nheads, headdim); got {tuple(x.shape)}"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise InputError(
                f"cu_seqlens must have shape (batch + 1,); got {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype not in OFFSET_DTYPES:
            raise InputError(f"cu_seqlens has dtype {cu_seqlens.dtype}; valid: int32, int64")
        batch, seqlen = cu_seqlens.shape[0] - 1, max_seqlen
        nheads, headdim = x.shape[1], x.shape[2]
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 2:
            raise InputError(
                f"{name} must have shape (seqlen_ro, rotary_dim / 2); got {tuple(t.shape)}"
            )
        if t.dtype not in (torch.float32, x.dtype):
            raise InputError(
                f"{name} has dtype {t.dtype}; valid: float32 or x's dtype ({x.dtype})"
            )
    if cos.shape != sin.shape:
        raise InputError(
            f"cos and sin must have the same shape; got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    seqlen_ro, half = cos.shape
    rotary_dim = 2 * half
    if half < 1:
        raise InputError(f"cos and sin have {half} columns; rotary_dim / 2 must be >= 1")
    if rotary_dim > headdim:
        raise InputError(
            f"rotary_dim = 2 * cos.shape[1] = {rotary_dim} exceeds x's headdim {headdim};"
            " valid: rotary_dim <= headdim"
        )
    if isinstance(seqlen_offsets, torch.Tensor):
        if tuple(seqlen_offsets.shape) != (batch,):
            raise InputError(
                f"seqlen_offsets must be an int or a tensor of shape (batch,) = ({batch},);"
                f" got shape {tuple(seqlen_offsets.shape)}"
            )
        if seqlen_offsets.dtype not in OFFSET_DTYPES:
            raise InputError(
                f"seqlen_offsets has dtype {seqlen_offsets.dtype}; valid: int32, int64"
            )
    elif _is_int(seqlen_offsets):
        if seqlen_offsets < 0:
            raise InputError(f"seqlen_offsets must be >= 0; got {seqlen_offsets}")
        if seqlen_offsets + seqlen > seqlen_ro:
            raise InputError(
                f"cos/sin have {seqlen_ro} rows, fewer than seqlen_offsets + seqlen ="
                f" {seqlen_offsets} + {seqlen}; valid: seqlen_offsets + seqlen <= cos.shape[0]"
            )
    else:
        raise InputError(
            f"seqlen_offsets must be an int or an int32/int64 tensor of shape (batch,);"
            f" got {type(seqlen_offsets).__name__}"
        )
    if batch > MAX_GRID_YZ:
        raise InputError(f"batch (number of sequences) is {batch}; at most {MAX_GRID_YZ}")
    if nheads > MAX_GRID_YZ:
        raise InputError(f"nheads is {nheads}; at most {MAX_GRID_YZ}")
    return batch, seqlen, nheads, rotary_dim


def _check_devices(x: torch.Tensor, *others: tuple[str, object]) -> None:
    if not (x.is_cuda or (_INTERPRET and x.device.type == "cpu")):
        raise DeviceError(f"apply_rotary needs a CUDA tensor; x is on {x.device}")
    for name, t in others:
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise DeviceError(f"{name} is on {t.device}; it must be on x's device {x.device}")


def _block_sizes(rotary_dim: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_M): the pairs of one head padded to a power of 2, and rows per
    program so that a tile holds about TILE_ELEMENTS pairs. Neither depends on seqlen
    or batch, so those never cause a recompilation."""
    block_k = 1
    while block_k < rotary_dim // 2:
        block_k *= 2
    block_m = max(1, min(MAX_BLOCK_M, TILE_ELEMENTS // block_k))
    return block_k, block_m


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    interleaved: bool = False,
    inplace: bool = False,
    conjugate: bool = False,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of every head of ``x``.

    Arguments:
        x: (batch, seqlen, nheads, headdim), or (total, nheads, headdim) with cu_seqlens;
            float16, bfloat16 or float32, on a CUDA device. Any strides.
        cos, sin: (seqlen_ro, rotary_dim / 2), float32 or x's dtype; rotary_dim <= headdim.
        seqlen_offsets: the position of each sequence's first token: an int >= 0
            (checked: seqlen_offsets + seqlen <= seqlen_ro), or an int32/int64 tensor of
            shape (batch,) on x's device. Tensor values are not checked (that would wait
            for the GPU): a token whose position falls outside [0, seqlen_ro) is left
            unrotated.
        cu_seqlens: (batch + 1,) int32/int64 cumulative sequence lengths, or None.
        max_seqlen: with cu_seqlens: the longest sequence (required); rows of a sequence
            past max_seqlen are not rotated. Ignored without cu_seqlens.
        interleaved: rotate pairs (0, 1), (2, 3), ... (GPT-J) instead of (i, i +
            rotary_dim / 2) (GPT-NeoX).
        inplace: write into x and return it.
        conjugate: rotate by the opposite angle (sin negated): the backward of a rotation.
    Returns:
        the rotated tensor, x's shape and dtype (x itself with inplace); features from
        rotary_dim on are x's.
    """
    batch, seqlen, nheads, rotary_dim = _check_inputs(
        x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen
    )
    _check_devices(
        x,
        ("cos", cos),
        ("sin", sin),
        ("cu_seqlens", cu_seqlens),
        ("seqlen_offsets", seqlen_offsets),
    )
    out = x if inplace else torch.empty_like(x)
    if not inplace and rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    if batch == 0 or seqlen == 0 or nheads == 0 or x.numel() == 0:
        return out
    _launch(
        out,
        x,
        cos.contiguous(),
        sin.contiguous(),
        seqlen_offsets,
        cu_seqlens,
        batch=batch,
        seqlen=seqlen,
        nheads=nheads,
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        conjugate=conjugate,
    )
    return out


def _launch(
    out: torch.Tensor,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: Union[int, torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    *,
    batch: int,
    seqlen: int,
    nheads: int,
    rotary_dim: int,
    interleaved: bool,
    conjugate: bool,
) -> None:
    block_k, block_m = _block_sizes(rotary_dim)
    offsets_tensor = isinstance(seqlen_offsets, torch.Tensor)
    varlen = cu_seqlens is not None
    if varlen:
        cu_seqlens = cu_seqlens.contiguous()
    if offsets_tensor:
        seqlen_offsets = seqlen_offsets.contiguous()
    grid = (triton.cdiv(seqlen, block_m), nheads, batch)
    kernel = rotary_kernel
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is not None and not _INTERPRET:
        kernel = wrap(rotary_kernel)  # visible to torch.compile as a Triton kernel
    args = (
        out,
        x,
        cos,
        sin,
        cu_seqlens,
        seqlen_offsets if offsets_tensor else None,
        seqlen,
        cos.shape[0],
        0 if offsets_tensor else seqlen_offsets,
        0 if varlen else out.stride(0),
        out.stride(-3),
        out.stride(-2),
        out.stride(-1),
        0 if varlen else x.stride(0),
        x.stride(-3),
        x.stride(-2),
        x.stride(-1),
    )
    meta = dict(
        HALF=rotary_dim // 2,
        BLOCK_K=block_k,
        BLOCK_M=block_m,
        INTERLEAVED=bool(interleaved),
        CONJUGATE=bool(conjugate),
        IS_VARLEN=varlen,
        OFFSETS_TENSOR=offsets_tensor,
    )
    if x.is_cuda:
        # Triton launches on the current device; make it x's
        with torch.cuda.device(x.device.index):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
