"""Moving between padded batches and the packed (varlen) token layout.

A padded batch is (batch, seqlen, ...) with an attention mask (batch, seqlen) that
is nonzero at real tokens. The packed layout keeps only the real tokens, in
row-major order, as (total, ...), with int32 ``cu_seqlens`` (batch + 1, leading
0) delimiting the sequences: the layout flash_attn_varlen_func takes.

    x_unpad, indices, cu_seqlens, max_seqlen, _ = unpad_input(x, mask)
    out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens,
                                 max_seqlen, max_seqlen)
    out_padded = pad_input(out, indices, batch, seqlen)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]


class IndexFirstAxis(torch.autograd.Function):
    """input[indices] along dim 0, with a backward that scatters (no atomics).

    The backward assumes the indices are distinct, as unpad_input's are.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        return input.index_select(0, indices)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (indices,) = ctx.saved_tensors
        grad_input = grad_output.new_zeros((ctx.first_axis_dim, *grad_output.shape[1:]))
        grad_input.index_copy_(0, indices.long(), grad_output)  # int32 too (transformers)
        return grad_input, None


class IndexPutFirstAxis(torch.autograd.Function):
    """A zero tensor of first_axis_dim rows with values written at rows indices."""

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int
    ) -> torch.Tensor:
        ctx.save_for_backward(indices)
        output = values.new_zeros((first_axis_dim, *values.shape[1:]))
        output.index_copy_(0, indices.long(), values)  # int32 too (transformers)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (indices,) = ctx.saved_tensors
        return grad_output.index_select(0, indices), None, None


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of input (first axis), differentiable: input[indices]."""
    return IndexFirstAxis.apply(input, indices)


def index_put_first_axis(
    values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int
) -> torch.Tensor:
    """(first_axis_dim, ...) zeros with ``values[i]`` at row ``indices[i]``."""
    return IndexPutFirstAxis.apply(values, indices, first_axis_dim)


def _flatten_batch(hidden_states: torch.Tensor) -> torch.Tensor:
    batch, seqlen = hidden_states.shape[:2]
    return hidden_states.reshape(batch * seqlen, *hidden_states.shape[2:])


def _cu_seqlens(seqlens: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))


def unpad_input(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    unused_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Keep the tokens the masks select.

    Arguments:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen), bool or int; nonzero at real tokens.
        unused_mask: (batch, seqlen), optional; nonzero at tokens that are
            allocated but unused. They are kept too, and counted in cu_seqlens,
            but not in the used lengths.
    Returns:
        hidden_states: (total, ...), the selected tokens in row-major order.
        indices: (total,) int64, their positions in the flattened (batch * seqlen).
        cu_seqlens: (batch + 1,) int32, cumulative lengths with a leading 0.
        max_seqlen_in_batch: int, the longest selected length.
        used_seqlens_in_batch: (batch,) int32, tokens per row in attention_mask.
    """
    selected = attention_mask.bool()
    if unused_mask is not None:
        selected = selected | unused_mask.bool()
    seqlens = selected.sum(dim=-1, dtype=torch.int32)
    used_seqlens = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(selected.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return (
        index_first_axis(_flatten_batch(hidden_states), indices),
        indices,
        _cu_seqlens(seqlens),
        max_seqlen,
        used_seqlens,
    )


def unpad_input_for_concatenated_sequences(
    hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Unpad rows that each hold several sequences packed back to back.

    attention_mask_in_length (batch, seqlen) lists, per row, the lengths of the
    sequences in it followed by zeros: [[2, 3, 0, 0, 0, 0]] means tokens 0-1 are
    one sequence and tokens 2-4 another, and token 5 is padding. Every sequence
    gets its own entry in cu_seqlens.

    Returns (hidden_states (total, ...), indices, cu_seqlens, max_seqlen_in_batch).
    """
    lengths = attention_mask_in_length
    seqlen = lengths.shape[-1]
    row_used = lengths.sum(dim=-1, keepdim=True)  # tokens per row
    positions = torch.arange(seqlen, device=lengths.device)
    selected = positions.unsqueeze(0) < row_used
    seqlens = lengths.flatten()
    seqlens = seqlens[seqlens > 0].to(torch.int32)
    indices = torch.nonzero(selected.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return (
        index_first_axis(_flatten_batch(hidden_states), indices),
        indices,
        _cu_seqlens(seqlens),
        max_seqlen,
    )


def pad_input(
    hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int
) -> torch.Tensor:
    """The inverse of unpad_input: (total, ...) -> (batch, seqlen, ...), zeros
    at the positions that were not selected."""
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.view(batch, seqlen, *hidden_states.shape[1:])
