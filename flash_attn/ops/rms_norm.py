"""The older flash_attn 2.x names of the fused dropout + residual + RMSNorm
(``rms_norm``, ``dropout_add_rms_norm``, ``RMSNorm``, ``DropoutAddRMSNorm`` ...), on the
Triton kernels; same conventions as :mod:`flash_attn.ops.layer_norm`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import init

from flash_attn.ops.layer_norm import (
    DropoutAddLayerNormFn,
    DropoutAddLayerNormParallelResidualFn,
    DropoutAddLayerNormSubsetFn,
    _subset_not_implemented,
    dropout_add_norm,
    dropout_add_norm_parallel_residual,
)
from flash_attn.ops.triton.layer_norm import Outputs, rms_norm_fn


def rms_norm(x: Tensor, weight: Tensor, epsilon: float) -> Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + epsilon) * weight``."""
    out = rms_norm_fn(x, weight, None, eps=epsilon)
    assert isinstance(out, Tensor)
    return out


def dropout_add_rms_norm(
    x0: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    dropout_p: float,
    epsilon: float,
    rowscale: Tensor | None = None,
    layerscale: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> Outputs:
    """``rms_norm(dropout(x0 * rowscale * layerscale) + residual)`` (+ bias); returns as
    :func:`flash_attn.ops.layer_norm.dropout_add_layer_norm`."""
    return dropout_add_norm(
        "dropout_add_rms_norm", x0, residual, weight, bias, rowscale, layerscale, dropout_p,
        epsilon, residual_in_fp32, prenorm, True, return_dropout_mask,
    )  # fmt: skip


def dropout_add_rms_norm_subset(*args: Any, **kwargs: Any) -> Outputs:
    """Not implemented (raises NotImplementedError)."""
    raise _subset_not_implemented("dropout_add_rms_norm_subset")


def dropout_add_rms_norm_parallel_residual(
    x0: Tensor,
    x1: Tensor | None,
    residual: Tensor | None,
    weight0: Tensor,
    bias0: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    dropout_p: float,
    epsilon: float,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> tuple[Tensor | None, ...]:
    """As :func:`flash_attn.ops.layer_norm.dropout_add_layer_norm_parallel_residual`, with
    RMSNorm."""
    return dropout_add_norm_parallel_residual(
        "dropout_add_rms_norm_parallel_residual", x0, x1, residual, weight0, bias0, weight1,
        bias1, dropout_p, epsilon, residual_in_fp32, prenorm, True, return_dropout_mask,
    )  # fmt: skip


class RMSNorm(torch.nn.Module):
    """``forward(x)``: :func:`rms_norm` with this module's weight (ones)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class DropoutAddRMSNorm(torch.nn.Module):
    """``forward(x0, residual=None)``: :func:`dropout_add_rms_norm` with this module's
    weight (ones) and no bias; dropout ``p`` in training mode only."""

    def __init__(
        self,
        hidden_size: int,
        prenorm: bool = False,
        p: float = 0.0,
        eps: float = 1e-5,
        residual_in_fp32: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.p = p
        self.eps = eps
        self.residual_in_fp32 = residual_in_fp32
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.ones_(self.weight)

    def forward(self, x0: Tensor, residual: Tensor | None = None) -> Outputs:
        return dropout_add_rms_norm(
            x0, residual, self.weight, None, self.p if self.training else 0.0, self.eps,
            prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32,
        )  # fmt: skip


__all__ = [
    "DropoutAddLayerNormFn",
    "DropoutAddLayerNormParallelResidualFn",
    "DropoutAddLayerNormSubsetFn",
    "DropoutAddRMSNorm",
    "RMSNorm",
    "dropout_add_rms_norm",
    "dropout_add_rms_norm_parallel_residual",
    "dropout_add_rms_norm_subset",
    "rms_norm",
]
