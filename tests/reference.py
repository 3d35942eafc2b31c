"""Plain PyTorch attention, the yardstick for the kernels.

    from reference import attention_ref, attention_varlen_ref

    out, lse = attention_ref(q, k, v, causal=True)                 # fp32 reference
    out_lp, _ = attention_ref(q, k, v, causal=True, upcast=False)  # in q.dtype
    # kernel error vs fp32 ref <= 2x (outputs) / 3x (grads) the error of out_lp

Semantics (those of the flash_attn 2.x interface):

- scores = q @ k^T * softmax_scale (default 1/sqrt(head_dim));
- softcap > 0: scores = softcap * tanh(scores / softcap);
- alibi_slopes, (nheads,) or (batch, nheads): scores -= slope * |i + sk - sq - j|;
- key j is visible from query i iff i + sk - sq - left <= j <= i + sk - sq + right
  (window_size = (left, right), -1 = unbounded; causal sets right = 0), i.e. masks
  are aligned to the bottom-right corner when seqlen_q != seqlen_k;
- a query that sees no key gets output 0 and lse = +inf (what the kernels return);
- MQA/GQA: q head h uses kv head h // (nheads // nheads_k).

Differentiable: gradients flow to q, k and v (and are finite for fully masked
rows). Everything runs on any device, CPU included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["alibi_bias", "attention_probs", "attention_ref", "attention_varlen_ref", "visible_keys"]


def visible_keys(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(seqlen_q, seqlen_k) bool, True where query i may attend to key j."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    diag = i + seqlen_k - seqlen_q  # the key aligned with query i
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    return visible


def alibi_bias(alibi_slopes: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """-slope * |i + sk - sq - j| as float32, (1 or batch, nheads, sq, sk)."""
    slopes = alibi_slopes.float()
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0)
    i = torch.arange(seqlen_q, device=slopes.device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=slopes.device).unsqueeze(0)
    distance = (i + seqlen_k - seqlen_q - j).abs().float()
    return -slopes[:, :, None, None] * distance


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs (batch, nheads, seqlen_q, seqlen_k), lse (batch, nheads, seqlen_q)
    float32 (natural log), scores) of dense attention: probs 0 where masked and in
    rows that see no key, lse +inf there; scores -inf where masked (in the compute
    dtype: float32 when upcast, float64 for float64 inputs, else q's dtype)."""
    if upcast:  # to float32 (float64 inputs stay float64)
        compute = torch.promote_types(q.dtype, torch.float32)
        q, k = q.to(compute), k.to(compute)
    seqlen_q, nheads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    seqlen_k = k.shape[1]
    k = k.repeat_interleave(nheads // k.shape[2], dim=2)
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale

    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k).to(scores.dtype)
    visible = visible_keys(
        seqlen_q, seqlen_k, causal=causal, window_size=window_size, device=q.device
    )
    any_visible = visible.any(dim=-1, keepdim=True)  # (sq, 1)
    # Fully masked rows get scores 0 instead of -inf so softmax (and its gradient)
    # stays finite; their probabilities are zeroed below.
    scores = scores.masked_fill(~visible, float("-inf"))
    safe = torch.where(any_visible, scores, torch.zeros_like(scores))
    lse = torch.logsumexp(safe.float(), dim=-1)
    lse = torch.where(any_visible.squeeze(-1), lse, torch.full_like(lse, float("inf")))
    probs = torch.softmax(safe, dim=-1) * any_visible
    return probs, lse, scores


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    upcast: bool = True,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention.

    q (batch, seqlen_q, nheads, head_dim); k, v (batch, seqlen_k, nheads_k,
    head_dim). upcast=True computes in float32, or float64 for float64 inputs
    (the "fp32 reference");
    upcast=False computes in the input dtype (the "reference in dtype").
    keep (batch, nheads, >= seqlen_q, >= seqlen_k), bool or 0/1: attention dropout,
    the probabilities not kept are 0 and the kept ones scaled by 1 / (1 - dropout_p)
    (lse stays that of the scores).
    Returns out (batch, seqlen_q, nheads, head_dim) in q.dtype and lse (batch,
    nheads, seqlen_q) float32 (natural log).
    """
    dtype = q.dtype
    probs, lse, _ = attention_probs(
        q, k, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, softmax_scale=softmax_scale, upcast=upcast,
    )  # fmt: skip
    if upcast:
        v = v.to(torch.promote_types(dtype, torch.float32))
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    if keep is not None:
        kept = keep[:, :, : q.shape[1], : k.shape[1]].bool()
        probs = torch.where(kept, probs, torch.zeros_like(probs)) * (1.0 / (1.0 - dropout_p))
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out.to(dtype), lse


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    upcast: bool = True,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention: attention_ref on each sequence (keep, with dropout: (batch,
    nheads, max_seqlen_q, max_seqlen_k), indexed within each sequence).

    q (total_q, nheads, head_dim); k, v (total_k, nheads_k, head_dim); int
    cu_seqlens (batch + 1). Masks align per sequence (to its own seqlen_q and
    seqlen_k). alibi_slopes (batch, nheads) gives each sequence its row. Returns
    out (total_q, nheads, head_dim) and lse (nheads, total_q) float32.
    """
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(bounds_q) - 1):
        rows_q = slice(bounds_q[b], bounds_q[b + 1])
        rows_k = slice(bounds_k[b], bounds_k[b + 1])
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        out, lse = attention_ref(
            q[rows_q].unsqueeze(0),
            k[rows_k].unsqueeze(0),
            v[rows_k].unsqueeze(0),
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=slopes,
            softmax_scale=softmax_scale,
            upcast=upcast,
            keep=None if keep is None else keep[b : b + 1],
            dropout_p=dropout_p,
        )
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=-1)
