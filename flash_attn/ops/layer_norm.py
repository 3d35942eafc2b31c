"""The older flash_attn 2.x names of the fused dropout + residual + LayerNorm
(``dropout_add_layer_norm`` and friends), on the Triton kernels of
:mod:`flash_attn.ops.triton.layer_norm`.

Same argument lists, defaults and returns as 2.x: the output, then the pre-norm sum with
``prenorm=True``, then the dropout keep-mask(s) as uint8 tensors of ``x0``'s shape with
``return_dropout_mask=True`` (all ones where there is no dropout). The ``*_subset``
functions (the row-subset variants used by BERT's last layer) are not implemented and
raise NotImplementedError.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import init

from flash_attn.errors import InputError
from flash_attn.ops.triton.layer_norm import Outputs, layer_norm_fn


def _uint8_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(like.shape, dtype=torch.uint8, device=like.device)
    return mask.to(torch.uint8)


def _scaled(x0: Tensor, layerscale: Tensor | None, fn: str) -> Tensor:
    """``x0 * layerscale`` (a per-column scale: it commutes with the dropout and rowscale)."""
    if layerscale is None:
        return x0
    if not isinstance(layerscale, Tensor) or tuple(layerscale.shape) != (x0.shape[-1],):
        seen = tuple(layerscale.shape) if isinstance(layerscale, Tensor) else type(layerscale)
        raise InputError(
            f"{fn}: layerscale has shape {seen}; it must be ({x0.shape[-1]},), the hidden size"
        )
    return x0 * layerscale


def dropout_add_norm(
    fn: str,
    x0: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    rowscale: Tensor | None,
    layerscale: Tensor | None,
    dropout_p: float,
    epsilon: float,
    residual_in_fp32: bool,
    prenorm: bool,
    is_rms_norm: bool,
    return_dropout_mask: bool,
) -> Outputs:
    """The body of ``dropout_add_layer_norm`` / ``dropout_add_rms_norm`` (2.x returns)."""
    outs = layer_norm_fn(
        _scaled(x0, layerscale, fn), weight, bias, residual=residual, eps=epsilon,
        dropout_p=dropout_p, rowscale=rowscale, prenorm=prenorm,
        residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm,
        return_dropout_mask=return_dropout_mask,
    )  # fmt: skip
    if not return_dropout_mask:
        return outs
    assert isinstance(outs, tuple)
    *front, mask, _ = outs
    return (*front, _uint8_mask(mask, x0))


def dropout_add_norm_parallel_residual(
    fn: str,
    x0: Tensor,
    x1: Tensor | None,
    residual: Tensor | None,
    weight0: Tensor,
    bias0: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    dropout_p: float,
    epsilon: float,
    residual_in_fp32: bool,
    prenorm: bool,
    is_rms_norm: bool,
    return_dropout_mask: bool,
) -> tuple[Tensor | None, ...]:
    """The body of the ``*_parallel_residual`` functions: ``(z0, z1[, x][, mask0, mask1])``
    with ``z1`` None where ``weight1`` is None."""
    outs = layer_norm_fn(
        x0, weight0, bias0, residual=residual, x1=x1, weight1=weight1, bias1=bias1,
        eps=epsilon, dropout_p=dropout_p, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
        is_rms_norm=is_rms_norm, return_dropout_mask=return_dropout_mask,
    )  # fmt: skip
    rest = list(outs) if isinstance(outs, tuple) else [outs]
    z0 = rest.pop(0)
    z1 = rest.pop(0) if weight1 is not None else None
    result: list[Tensor | None] = [z0, z1]
    if prenorm:
        result.append(rest.pop(0))
    if return_dropout_mask:
        mask0, mask1 = rest
        result += [_uint8_mask(mask0, x0), _uint8_mask(mask1, x0)]
    return tuple(result)


def _subset_not_implemented(fn: str) -> NotImplementedError:
    return NotImplementedError(
        f"{fn} (the row-subset variant with x0_subset / out_subset) is not implemented in "
        "this flash_attn; compute the full rows with the non-subset function and index them"
    )


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, epsilon: float) -> Tensor:
    """LayerNorm over the last dimension (the fused kernel with nothing added)."""
    out = layer_norm_fn(x, weight, bias, eps=epsilon)
    assert isinstance(out, Tensor)
    return out


def dropout_add_layer_norm(
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
    """``layer_norm(dropout(x0 * rowscale * layerscale) + residual)``. residual_in_fp32 only
    matters where residual is None (else the sum has residual's dtype)."""
    return dropout_add_norm(
        "dropout_add_layer_norm", x0, residual, weight, bias, rowscale, layerscale, dropout_p,
        epsilon, residual_in_fp32, prenorm, False, return_dropout_mask,
    )  # fmt: skip


def dropout_add_layer_norm_subset(*args: Any, **kwargs: Any) -> Outputs:
    """Not implemented (raises NotImplementedError)."""
    raise _subset_not_implemented("dropout_add_layer_norm_subset")


def dropout_add_layer_norm_parallel_residual(
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
    """``s = dropout(x0) + dropout(x1) + residual``; returns ``(ln0(s), ln1(s))``, plus ``s``
    with prenorm, plus both uint8 keep-masks with return_dropout_mask."""
    return dropout_add_norm_parallel_residual(
        "dropout_add_layer_norm_parallel_residual", x0, x1, residual, weight0, bias0, weight1,
        bias1, dropout_p, epsilon, residual_in_fp32, prenorm, False, return_dropout_mask,
    )  # fmt: skip


class DropoutAddLayerNormFn:
    """2.x's ``DropoutAddLayerNormFn.apply(x0, residual, gamma, beta, rowscale, colscale,
    dropout_p, epsilon, residual_in_fp32=False, prenorm=False, is_rms_norm=False,
    return_dmask=False)``, as a thin entry onto the Triton Function."""

    @staticmethod
    def apply(
        x0: Tensor,
        residual: Tensor | None,
        gamma: Tensor,
        beta: Tensor | None,
        rowscale: Tensor | None,
        colscale: Tensor | None,
        dropout_p: float,
        epsilon: float,
        residual_in_fp32: bool = False,
        prenorm: bool = False,
        is_rms_norm: bool = False,
        return_dmask: bool = False,
    ) -> Outputs:
        return dropout_add_norm(
            "DropoutAddLayerNormFn", x0, residual, gamma, beta, rowscale, colscale, dropout_p,
            epsilon, residual_in_fp32, prenorm, is_rms_norm, return_dmask,
        )  # fmt: skip


class DropoutAddLayerNormParallelResidualFn:
    """2.x's ``DropoutAddLayerNormParallelResidualFn.apply(x0, x1, residual, gamma0, beta0,
    gamma1, beta1, dropout_p, epsilon, residual_in_fp32=False, prenorm=False,
    is_rms_norm=False, return_dmask=False)``."""

    @staticmethod
    def apply(
        x0: Tensor,
        x1: Tensor | None,
        residual: Tensor | None,
        gamma0: Tensor,
        beta0: Tensor | None,
        gamma1: Tensor | None,
        beta1: Tensor | None,
        dropout_p: float,
        epsilon: float,
        residual_in_fp32: bool = False,
        prenorm: bool = False,
        is_rms_norm: bool = False,
        return_dmask: bool = False,
    ) -> tuple[Tensor | None, ...]:
        return dropout_add_norm_parallel_residual(
            "DropoutAddLayerNormParallelResidualFn", x0, x1, residual, gamma0, beta0, gamma1,
            beta1, dropout_p, epsilon, residual_in_fp32, prenorm, is_rms_norm, return_dmask,
        )  # fmt: skip


class DropoutAddLayerNormSubsetFn:
    """2.x's row-subset Function: not implemented (``apply`` raises NotImplementedError)."""

    @staticmethod
    def apply(*args: Any, **kwargs: Any) -> Outputs:
        raise _subset_not_implemented("DropoutAddLayerNormSubsetFn")


class DropoutAddLayerNorm(torch.nn.Module):
    """``forward(x0, residual=None)``: :func:`dropout_add_layer_norm` with this module's
    weight (ones) and bias (zeros); dropout ``p`` in training mode only."""

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
        self.bias = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.ones_(self.weight)
        init.zeros_(self.bias)

    def forward(self, x0: Tensor, residual: Tensor | None = None) -> Outputs:
        return dropout_add_layer_norm(
            x0, residual, self.weight, self.bias, self.p if self.training else 0.0, self.eps,
            prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32,
        )  # fmt: skip


__all__ = [
    "DropoutAddLayerNorm",
    "DropoutAddLayerNormFn",
    "DropoutAddLayerNormParallelResidualFn",
    "DropoutAddLayerNormSubsetFn",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_parallel_residual",
    "dropout_add_layer_norm_subset",
    "layer_norm",
]
