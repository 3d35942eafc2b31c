"""flash_attn.bert_padding against straightforward loops and torch indexing."""

from __future__ import annotations

import pytest
import torch

from flash_attn.bert_padding import (
    index_first_axis,
    index_put_first_axis,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)

LENGTHS = [3, 0, 6, 1]
SEQLEN = 6


def left_aligned_mask(lengths: list[int], seqlen: int) -> torch.Tensor:
    return torch.arange(seqlen).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def loop_unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """The selected rows, their flat indices and the per-row counts, by loops."""
    rows, indices, counts = [], [], []
    for b in range(mask.shape[0]):
        count = 0
        for s in range(mask.shape[1]):
            if mask[b, s]:
                rows.append(x[b, s])
                indices.append(b * mask.shape[1] + s)
                count += 1
        counts.append(count)
    return torch.stack(rows), indices, counts


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(len(LENGTHS), SEQLEN, 3, 5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64])
def test_unpad_matches_a_loop(x: torch.Tensor, mask_dtype: torch.dtype) -> None:
    mask = left_aligned_mask(LENGTHS, SEQLEN)
    mask[2, 1] = False  # a hole: masks need not be left-aligned
    rows, indices, counts = loop_unpad(x, mask)

    unpadded, idx, cu_seqlens, max_seqlen, used = unpad_input(x, mask.to(mask_dtype))

    torch.testing.assert_close(unpadded, rows, rtol=0, atol=0)
    assert idx.dtype == torch.int64
    assert idx.tolist() == indices
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 3, 8, 9]
    assert cu_seqlens.tolist()[1:] == torch.tensor(counts).cumsum(0).tolist()
    assert isinstance(max_seqlen, int)
    assert max_seqlen == 5
    assert used.dtype == torch.int32
    assert used.tolist() == counts


def test_unused_tokens_are_kept_but_not_counted_as_used(x: torch.Tensor) -> None:
    mask = left_aligned_mask([2, 1, 3, 0], SEQLEN)
    unused = left_aligned_mask([4, 1, 5, 2], SEQLEN) & ~mask
    rows, indices, counts = loop_unpad(x, mask | unused)

    unpadded, idx, cu_seqlens, max_seqlen, used = unpad_input(x, mask, unused)

    torch.testing.assert_close(unpadded, rows, rtol=0, atol=0)
    assert idx.tolist() == indices
    assert cu_seqlens.tolist() == [0, 4, 5, 10, 12]
    assert max_seqlen == 5
    assert used.tolist() == [2, 1, 3, 0]
    assert counts == [4, 1, 5, 2]


def test_pad_inverts_unpad(x: torch.Tensor) -> None:
    mask = left_aligned_mask(LENGTHS, SEQLEN)
    unpadded, idx, _, _, _ = unpad_input(x, mask)

    padded = pad_input(unpadded, idx, len(LENGTHS), SEQLEN)

    assert padded.shape == x.shape
    torch.testing.assert_close(padded, x * mask[:, :, None, None], rtol=0, atol=0)


def test_unpad_takes_non_contiguous_hidden_states() -> None:
    base = torch.randn(SEQLEN, len(LENGTHS), 8)
    x = base.transpose(0, 1)  # (batch, seqlen, 8), not contiguous
    mask = left_aligned_mask(LENGTHS, SEQLEN)
    unpadded, idx, _, _, _ = unpad_input(x, mask)
    torch.testing.assert_close(unpadded, x[mask], rtol=0, atol=0)


def test_all_padding_gives_an_empty_batch(x: torch.Tensor) -> None:
    mask = torch.zeros(len(LENGTHS), SEQLEN, dtype=torch.bool)
    unpadded, idx, cu_seqlens, max_seqlen, used = unpad_input(x, mask)
    assert unpadded.shape == (0, 3, 5)
    assert idx.numel() == 0
    assert cu_seqlens.tolist() == [0, 0, 0, 0, 0]
    assert max_seqlen == 0
    assert pad_input(unpadded, idx, len(LENGTHS), SEQLEN).abs().sum() == 0


def test_index_first_axis_gradient_matches_plain_indexing() -> None:
    torch.manual_seed(1)
    x = torch.randn(10, 4, 3, requires_grad=True)
    indices = torch.tensor([7, 0, 3, 9])
    grad_out = torch.randn(4, 4, 3)

    out = index_first_axis(x, indices)
    (grad,) = torch.autograd.grad(out, x, grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(x_ref[indices], x_ref, grad_out)
    torch.testing.assert_close(out, x[indices], rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    assert grad[[1, 2, 4, 5, 6, 8]].abs().sum() == 0


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_index_put_first_axis_places_rows_and_zeros_the_rest(index_dtype: torch.dtype) -> None:
    """int32 indices too: transformers' own unpad gives them to pad_input (seen with 5.17)."""
    values = torch.arange(6.0).view(3, 2)
    out = index_put_first_axis(values, torch.tensor([4, 0, 2], dtype=index_dtype), 5)
    expected = torch.tensor([[2.0, 3.0], [0, 0], [4.0, 5.0], [0, 0], [0.0, 1.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_pad_input_gradient_matches_plain_indexing(index_dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    mask = left_aligned_mask(LENGTHS, SEQLEN)
    _, idx, _, _, _ = unpad_input(torch.zeros(len(LENGTHS), SEQLEN), mask)
    idx = idx.to(index_dtype)
    values = torch.randn(idx.numel(), 8, requires_grad=True)
    grad_out = torch.randn(len(LENGTHS), SEQLEN, 8)

    padded = pad_input(values, idx, len(LENGTHS), SEQLEN)
    (grad,) = torch.autograd.grad(padded, values, grad_out)

    torch.testing.assert_close(grad, grad_out.reshape(-1, 8)[idx.long()], rtol=0, atol=0)


def test_gradcheck_through_unpad_and_pad() -> None:
    torch.manual_seed(3)
    mask = left_aligned_mask([2, 4, 1], 4)
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)

    def roundtrip(t: torch.Tensor) -> torch.Tensor:
        unpadded, idx, _, _, _ = unpad_input(t, mask)
        return pad_input(unpadded * 2.0, idx, 3, 4)

    assert torch.autograd.gradcheck(roundtrip, (x,))
    assert torch.autograd.gradcheck(
        lambda v: index_put_first_axis(v, torch.tensor([3, 1]), 5),
        (torch.randn(2, 3, dtype=torch.float64, requires_grad=True),),
    )


def test_concatenated_sequences_get_one_cu_seqlens_entry_each() -> None:
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    x = torch.randn(3, 6, 4)

    unpadded, idx, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(x, lengths)

    expected_idx = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    assert idx.tolist() == expected_idx
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 2, 5, 8, 10, 16]
    assert max_seqlen == 6
    torch.testing.assert_close(unpadded, x.reshape(18, 4)[expected_idx], rtol=0, atol=0)
