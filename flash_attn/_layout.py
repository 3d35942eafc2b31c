"""Tensor layout the kernels need: head_dim a multiple of 8, last dim contiguous."""

from __future__ import annotations

import torch
import torch.nn.functional as F

HEAD_DIM_MULTIPLE = 8


def padded_head_dim(head_dim: int) -> int:
    """head_dim rounded up to the next multiple of 8 (what the kernels receive)."""
    return (head_dim + HEAD_DIM_MULTIPLE - 1) // HEAD_DIM_MULTIPLE * HEAD_DIM_MULTIPLE


def pad_head_dim(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dim of x up to a multiple of 8; x itself when it is one.

    Zero columns add nothing to q.k^T and give zero output columns, so slicing the
    result back to the original head_dim gives the unpadded answer.
    """
    head_dim = x.shape[-1]
    extra = padded_head_dim(head_dim) - head_dim
    return F.pad(x, [0, extra]) if extra else x


def unpad_head_dim(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x cut back to head_dim in its last dim (pad_head_dim undone); x itself when it was
    not padded (the slice is a view op of its own, ~1.5 us a decode call)."""
    return x if x.size(-1) == head_dim else x[..., :head_dim]


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with stride 1 in its last dim (a copy only when it is not already)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: last dim contiguous and padded to a multiple of 8."""
    return pad_head_dim(last_dim_contiguous(x))
