"""Autograd Functions over the compiled forward and backward ops.

One Function per input form: separate q, k, v; packed qkv; packed kv. Each serves
the dense and the varlen layout (varlen passes cu_seqlens, dense passes None). The
inputs arrive validated; here they are put in kernel layout (last dim contiguous,
head_dim padded to a multiple of 8) and the results are sliced back. Gradients of
packed inputs come back packed.

Dropout: the caller draws rng_state (draw_rng_state) when dropout_p > 0 and hands it
in (drawn before the Function, so that return_attn_probs can rebuild the mask too);
the forward passes it to the op and saves it, and the backward passes the same
tensor to the backward op, which regenerates the same mask from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flash_attn import _ops
from flash_attn._layout import kernel_layout, unpad_head_dim

# The non-tensor arguments every Function takes after its tensors, in op order.
# (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap)
OpArgs = tuple[int, int, float, int, int, float]

# rng_state's values are drawn from [0, RNG_HIGH): every non-negative int64 but the last.
RNG_HIGH = 2**63 - 1


def draw_rng_state(dropout_p: float, device: torch.device) -> torch.Tensor | None:
    """The (seed, offset) of one dropout call: None without dropout; else an int64 (2,)
    tensor of values in [0, 2**63 - 1) drawn on device from torch's generator for it.

    The draw runs on the device (no host sync): torch.manual_seed reproduces it, and a
    CUDA graph draws afresh at each replay, as torch's own random ops do. (randint, not
    the in-place Tensor.random_, which torch.compile cannot trace without a graph
    break; both draw from the same generator.)
    """
    if dropout_p > 0.0:
        return torch.randint(0, RNG_HIGH, (2,), dtype=torch.int64, device=device)
    return None


def _forward(
    ctx: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    rng_state: torch.Tensor | None,
    args: OpArgs,
    dropout_p: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = q.shape[-1]
    q, k, v = kernel_layout(q), kernel_layout(k), kernel_layout(v)
    out_padded, lse = _ops.fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, *args, alibi_slopes, dropout_p, rng_state
    )
    ctx.save_for_backward(
        q, k, v, out_padded, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state
    )
    ctx.op_args = args
    ctx.dropout_p = dropout_p
    ctx.deterministic = deterministic
    ctx.head_dim = head_dim
    ctx.mark_non_differentiable(lse)
    return out_padded[..., :head_dim], lse


def forward_no_grad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    args: OpArgs,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward alone, for calls that need no gradient: the op, without an
    autograd.Function around it (whose bookkeeping costs more than the op's own
    dispatch; decode calls it once per layer and token). Dropout applies here too
    (as in flash_attn 2.x: evaluation passes dropout_p=0)."""
    head_dim = q.shape[-1]
    out_padded, lse = _ops.fwd(
        kernel_layout(q), kernel_layout(k), kernel_layout(v), cu_seqlens_q, cu_seqlens_k,
        *args, alibi_slopes, dropout_p, rng_state,
    )  # fmt: skip
    return unpad_head_dim(out_padded, head_dim), lse


def _backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (q, k, v, out_padded, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state) = (
        ctx.saved_tensors
    )
    dq, dk, dv = _ops.bwd(
        kernel_layout(dout),
        q,
        k,
        v,
        out_padded,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        *ctx.op_args,
        alibi_slopes,
        ctx.deterministic,
        ctx.dropout_p,
        rng_state,
    )
    d = ctx.head_dim
    return dq[..., :d], dk[..., :d], dv[..., :d]


class FlashAttnFunc(torch.autograd.Function):
    """Attention over separate q, k, v."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_k: torch.Tensor | None,
        alibi_slopes: torch.Tensor | None,
        rng_state: torch.Tensor | None,
        args: OpArgs,
        dropout_p: float,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(
            ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, args,
            dropout_p, deterministic,
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor) -> tuple[Any, ...]:
        dq, dk, dv = _backward(ctx, dout)
        return dq, dk, dv, None, None, None, None, None, None, None


class FlashAttnQKVPackedFunc(torch.autograd.Function):
    """Attention over qkv packed as (..., 3, nheads, head_dim); dqkv comes back packed."""

    @staticmethod
    def forward(
        ctx: Any,
        qkv: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        alibi_slopes: torch.Tensor | None,
        rng_state: torch.Tensor | None,
        args: OpArgs,
        dropout_p: float,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = qkv.unbind(dim=-3)
        return _forward(
            ctx, q, k, v, cu_seqlens, cu_seqlens, alibi_slopes, rng_state, args, dropout_p,
            deterministic,
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor) -> tuple[Any, ...]:
        dqkv = torch.stack(_backward(ctx, dout), dim=-3)
        return dqkv, None, None, None, None, None, None


class FlashAttnKVPackedFunc(torch.autograd.Function):
    """Attention over q and kv packed as (..., 2, nheads_k, head_dim); dkv comes back packed."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        kv: torch.Tensor,
        cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_k: torch.Tensor | None,
        alibi_slopes: torch.Tensor | None,
        rng_state: torch.Tensor | None,
        args: OpArgs,
        dropout_p: float,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = kv.unbind(dim=-3)
        return _forward(
            ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, args,
            dropout_p, deterministic,
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor) -> tuple[Any, ...]:
        dq, dk, dv = _backward(ctx, dout)
        return dq, torch.stack((dk, dv), dim=-3), None, None, None, None, None, None, None


class PagedVarlenFunc(torch.autograd.Function):
    """flash_attn_varlen_func over a paged KV cache called on inputs that require grad:
    the forward as without grad, its output attached to the graph as flash_attn 2.x's
    is (code written for it, upstream's tests among it, runs such forwards in grad
    mode); a backward through it raises, as none exists."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        run: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = run()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor) -> None:
        raise NotImplementedError(
            "flash_attn_varlen_func with block_table (paged KV) has no backward: its "
            "forward is inference only. Compute gradients with k and v as dense varlen "
            "tensors (no block_table), or run the paged call under torch.no_grad()."
        )
