"""The third value of ``return_attn_probs=True`` with dropout: upstream's ``S_dmask``.

flash_attn 2.x returns, with dropout_p > 0, the attention scores as its kernel held
them, with the dropped entries negated; its test helpers recover from it the dropout
mask (``S_dmask >= 0``) and, with ``normalize_flash_attn_S``, the probabilities.
We compute the same quantity in PyTorch, outside the kernels (it is a testing aid):

    S_dmask[b, h, i, j] = +/- exp(score_ij - M_i(block(j)))

- score: the natural-log score of the forward: softmax_scale * q_i . k_j, then
  softcap * tanh(score / softcap) when softcap > 0, then - slope * |i + sk - sq - j|
  with ALiBi (i, j within the sequence; sq, sk its lengths);
- M_i(B): the largest visible score of row i over the keys of blocks B, B + 1, ...
  (blocks of BLOCK_N keys from key 0), i.e. over every key j >= B * BLOCK_N: the
  running maximum of a kernel that walks the keys from the last block to the first,
  which is what ``normalize_flash_attn_S`` undoes (exp(M_i(B) - lse_i) per block);
- negative where the element is dropped (dropout_mask says 0), 0 where masked
  (causal, window, a key or query past the sequence) and in the padding.

Shape (batch, nheads, round128(seqlen_q), round128(seqlen_k)), q's dtype; for varlen
the sequences' own positions, with max_seqlen_q / max_seqlen_k for the lengths.
Cost: that tensor, plus float32 temporaries of a few times nheads * seqlen_q *
seqlen_k per sequence (one sequence at a time), and one host read of cu_seqlens for
varlen; nothing of it is needed without return_attn_probs.
"""

from __future__ import annotations

import torch

# The key-block width of the convention (flash_attn_interface._get_block_size_n).
BLOCK_N = 128
# S_dmask's last two dims are the sequence lengths rounded up to a multiple of this.
ROUND = 128


def round_up(n: int, multiple: int = ROUND) -> int:
    return (n + multiple - 1) // multiple * multiple


def _visible(
    seqlen_q: int, seqlen_k: int, window_left: int, window_right: int, device: torch.device
) -> torch.Tensor:
    """(seqlen_q, seqlen_k) bool: key j is visible from query i (bottom-right aligned)."""
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    diag = i + seqlen_k - seqlen_q
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= j >= diag - window_left
    if window_right >= 0:
        visible &= j <= diag + window_right
    return visible


def scores(
    q: torch.Tensor,
    k: torch.Tensor,
    softmax_scale: float,
    softcap: float,
    slopes: torch.Tensor | None,
) -> torch.Tensor:
    """float32 (nheads, seqlen_q, seqlen_k) scores of one sequence: q (seqlen_q, nheads,
    d), k (seqlen_k, nheads_k, d), slopes (nheads,) or None."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", q.float(), kf) * softmax_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        seqlen_q, seqlen_k = q.shape[0], k.shape[0]
        i = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
        j = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
        distance = (i + seqlen_k - seqlen_q - j).abs().float()
        s = s - slopes.float()[:, None, None] * distance
    return s


def suffix_block_max(masked_scores: torch.Tensor, block_n: int = BLOCK_N) -> torch.Tensor:
    """M_i(block(j)) for every column j: the max of row i over the keys of j's block and
    every later block. masked_scores (..., seqlen_k) with -inf where masked."""
    seqlen_k = masked_scores.shape[-1]
    blocks = (seqlen_k + block_n - 1) // block_n
    padded = torch.nn.functional.pad(
        masked_scores, (0, blocks * block_n - seqlen_k), value=float("-inf")
    )
    block_max = padded.unflatten(-1, (blocks, block_n)).amax(-1)
    suffix = block_max.flip(-1).cummax(-1).values.flip(-1)
    return suffix.repeat_interleave(block_n, dim=-1)[..., :seqlen_k]


def signed_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    keep: torch.Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    slopes: torch.Tensor | None,
) -> torch.Tensor:
    """One sequence's S_dmask entries, float32 (nheads, seqlen_q, seqlen_k); keep
    (nheads, seqlen_q, seqlen_k) bool."""
    s = scores(q, k, softmax_scale, softcap, slopes)
    visible = _visible(q.shape[0], k.shape[0], window_left, window_right, q.device)
    s = s.masked_fill(~visible, float("-inf"))
    m = suffix_block_max(s)
    # where nothing is visible from a block on, m is -inf and so is s: exp(nan) unused
    value = torch.where(visible, torch.exp(s - m), 0.0)
    return torch.where(keep | ~visible, value, -value)  # masked: +0


def s_dmask(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    keep: torch.Tensor,
) -> torch.Tensor:
    """S_dmask (see the module docstring) of a forward with these arguments (those of
    the fwd op, on the unpadded q and k) and this keep mask (dropout_mask's, uint8
    (batch, nheads, max_seqlen_q, max_seqlen_k))."""
    with torch.no_grad():
        if cu_seqlens_q is None:
            batch, nheads = q.shape[0], q.shape[2]
            spans_q = [(b, 0, max_seqlen_q) for b in range(batch)]
            spans_k = [(b, 0, max_seqlen_k) for b in range(batch)]
        else:
            assert cu_seqlens_k is not None
            bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
            batch, nheads = len(bq) - 1, q.shape[1]
            spans_q = [(None, bq[b], bq[b + 1] - bq[b]) for b in range(batch)]
            spans_k = [(None, bk[b], bk[b + 1] - bk[b]) for b in range(batch)]
        shape = (batch, nheads, round_up(max_seqlen_q), round_up(max_seqlen_k))
        out = torch.zeros(shape, dtype=q.dtype, device=q.device)
        for b in range(batch):
            (row_q, first_q, len_q), (row_k, first_k, len_k) = spans_q[b], spans_k[b]
            if len_q == 0 or len_k == 0:
                continue
            q_b = (q[row_q] if row_q is not None else q)[first_q : first_q + len_q]
            k_b = (k[row_k] if row_k is not None else k)[first_k : first_k + len_k]
            slopes = alibi_slopes
            if slopes is not None and slopes.dim() == 2:
                slopes = slopes[b]
            keep_b = keep[b, :, :len_q, :len_k].bool()
            value = signed_probs(
                q_b, k_b, keep_b, softmax_scale, window_left, window_right, softcap, slopes
            )
            out[b, :, :len_q, :len_k] = value.to(q.dtype)
        return out
