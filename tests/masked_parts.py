"""What attention must write where a mask leaves nothing to compute.

Semantics (those of reference.py, the flash_attn 2.x interface):

- a query that sees no key gets output exactly 0, lse = +inf and dQ exactly 0;
- a key that no query sees gets dK and dV exactly 0 (its probabilities are all 0);
- every other element of out, lse, dQ, dK and dV is finite.

The sets come from reference.visible_keys, per sequence for varlen. The values of the
rest are the reference comparison's business (test_flash_attn_gpu.py); this module
only says where the exact values are owed, and lists what breaks them:

    parts = dense_parts(seqlen_q, seqlen_k, causal=True, device="cuda")
    problems = masked_part_problems(Outputs(out, lse, dq, dk, dv), parts)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from reference import visible_keys

__all__ = ["MaskedParts", "Outputs", "dense_parts", "masked_part_problems", "varlen_parts"]


@dataclass(frozen=True)
class MaskedParts:
    """Per token: the queries that see no key, the keys that no query sees."""

    blind_queries: torch.Tensor  # (seqlen_q,) or (total_q,) bool
    unseen_keys: torch.Tensor  # (seqlen_k,) or (total_k,) bool


@dataclass(frozen=True)
class Outputs:
    """One forward (and backward) in the public layouts.

    Dense: out, dq (batch, seqlen_q, nheads, d), dk, dv (batch, seqlen_k, nheads_k, d),
    lse (batch, nheads, seqlen_q). Varlen: out, dq (total_q, nheads, d), dk, dv
    (total_k, nheads_k, d), lse (nheads, total_q). dq, dk, dv are None without a backward.
    """

    out: torch.Tensor
    lse: torch.Tensor
    dq: torch.Tensor | None = None
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None

    @property
    def varlen(self) -> bool:
        return self.out.dim() == 3


def dense_parts(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    device: torch.device | str | None = None,
) -> MaskedParts:
    visible = visible_keys(
        seqlen_q, seqlen_k, causal=causal, window_size=window_size, device=device
    )
    return MaskedParts(blind_queries=~visible.any(dim=1), unseen_keys=~visible.any(dim=0))


def varlen_parts(
    lens_q: Sequence[int],
    lens_k: Sequence[int],
    *,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    device: torch.device | str | None = None,
) -> MaskedParts:
    """dense_parts of each sequence (masks align per sequence), concatenated."""
    if len(lens_q) != len(lens_k):
        raise ValueError(f"lens_q and lens_k differ in length: {len(lens_q)} != {len(lens_k)}")
    parts = [
        dense_parts(sq, sk, causal=causal, window_size=window_size, device=device)
        for sq, sk in zip(lens_q, lens_k)
    ]
    return MaskedParts(
        blind_queries=torch.cat([p.blind_queries for p in parts]),
        unseen_keys=torch.cat([p.unseen_keys for p in parts]),
    )


def _by_token(x: torch.Tensor, dim: int, mask: torch.Tensor, name: str) -> torch.Tensor:
    """x with its token dim first and the rest flattened: (tokens, -1)."""
    if x.shape[dim] != mask.shape[0]:
        raise ValueError(
            f"{name} has {x.shape[dim]} tokens in dim {dim}; the mask has {mask.shape[0]}"
        )
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)


def _describe(name: str, what: str, bad: torch.Tensor, values: torch.Tensor, kind: str) -> str:
    """'name: N elements what (tokens a, b, ...; e.g. v)' for a (tokens, -1) bool bad."""
    tokens = bad.any(dim=1).nonzero().flatten()
    example = values[bad][0].item()
    shown = ", ".join(str(t) for t in tokens[:5].tolist())
    more = ", ..." if tokens.numel() > 5 else ""
    kinds = "queries" if kind == "query" else f"{kind}s"
    return (
        f"{name}: {int(bad.sum())} elements {what} in {tokens.numel()} {kinds} "
        f"({kinds} {shown}{more}; e.g. {example!r})"
    )


def masked_part_problems(outputs: Outputs, parts: MaskedParts) -> list[str]:
    """Every way ``outputs`` break the module's semantics, as readable lines ([] if none)."""
    q_dim, lse_dim = (0, 1) if outputs.varlen else (1, 2)
    k_dim = q_dim
    blind, unseen = parts.blind_queries, parts.unseen_keys
    problems = []
    tensors = [("out", outputs.out, q_dim, blind, "query")]
    tensors += [
        (name, t, dim, mask, kind)
        for name, t, dim, mask, kind in (
            ("dq", outputs.dq, q_dim, blind, "query"),
            ("dk", outputs.dk, k_dim, unseen, "key"),
            ("dv", outputs.dv, k_dim, unseen, "key"),
        )
        if t is not None
    ]
    for name, t, dim, mask, kind in tensors:
        rows = _by_token(t, dim, mask, name)
        nonfinite = ~torch.isfinite(rows)
        if nonfinite.any():
            problems.append(_describe(name, "not finite", nonfinite, rows, kind))
        owed_zero = (rows != 0) & mask.unsqueeze(1)
        if owed_zero.any():
            where = "owed 0 (no key visible)" if kind == "query" else "owed 0 (seen by no query)"
            problems.append(_describe(name, where, owed_zero, rows, kind))
    lse = _by_token(outputs.lse, lse_dim, blind, "lse")
    bad_finite = ~torch.isfinite(lse) & ~blind.unsqueeze(1)
    if bad_finite.any():
        problems.append(_describe("lse", "not finite", bad_finite, lse, "query"))
    not_inf = (lse != float("inf")) & blind.unsqueeze(1)
    if not_inf.any():
        problems.append(_describe("lse", "owed +inf (no key visible)", not_inf, lse, "query"))
    return problems
