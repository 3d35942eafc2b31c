"""References for attention dropout, for the CPU and the GPU tests.

    from dropout_ref import attention_dropout_ref, recover_from_s_dmask

    keep = _ops.dropout_mask(rng_state, batch, nheads, seqlen_q, seqlen_k, p).bool()
    out, lse = attention_dropout_ref(q, k, v, keep, p, causal=True)

Semantics (the dropout contract, notes/dropout_contract.md): the probabilities P of
reference.py's attention are masked by keep (batch, nheads, seqlen_q, seqlen_k),
1 = kept, and the kept ones scaled by 1 / (1 - p): out = (P * keep / (1 - p)) V.
lse is that of the scores before dropout.

- stub_keep_mask: the CPU stand-in's dropout_mask, a pure function of (seed, offset,
  b, h, i, j, p) computed in torch (any such function serves the plumbing tests);
- recover_from_s_dmask: the mask and the probabilities that S_dmask (the third value
  of return_attn_probs=True with dropout) encodes, written from the convention's
  definition (M_i(B) = max of row i over every key j >= B * block_n), independently
  of flash_attn._probs;
- load_upstream_helpers: upstream's own convert_flash_attn_S_to_softmax,
  normalize_flash_attn_S, get_dropout_fraction, attention_ref from the never-committed
  .upstream/test_flash_attn.py, where it exists (None otherwise).
"""

from __future__ import annotations

import ast
import math
import types
from pathlib import Path
from typing import Any

import torch
from reference import attention_probs, attention_ref, attention_varlen_ref

__all__ = [
    "attention_dropout_ref",
    "attention_dropout_varlen_ref",
    "attention_probs",
    "dropout_threshold",
    "load_upstream_helpers",
    "recover_from_s_dmask",
    "stub_keep_mask",
]

UPSTREAM_TESTS = Path(__file__).resolve().parent.parent / ".upstream" / "test_flash_attn.py"


def dropout_threshold(dropout_p: float) -> int:
    """round(p * 256), at most 255 (halves round up, as the kernels round): an element is
    dropped iff its 8-bit draw is below it, so P(drop) = dropout_threshold(p) / 256."""
    return min(int(dropout_p * 256 + 0.5), 255)


# --- the CPU stand-in's mask ------------------------------------------------------

_PRIME = 2_147_483_647  # 2**31 - 1: products of two residues stay below 2**62
_MULTIPLIERS = (1_103_515_245, 69_069, 1_664_525, 22_695_477, 134_775_813, 214_013)


def _mix(x: torch.Tensor, value: torch.Tensor | int, multiplier: int) -> torch.Tensor:
    x = ((x ^ value) % _PRIME) * multiplier % _PRIME
    return (x ^ (x >> 15)) * 48_271 % _PRIME


def stub_keep_mask(
    rng_state: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, p: float
) -> torch.Tensor:
    """uint8 (batch, nheads, seqlen_q, seqlen_k), 1 = kept: a hash of (seed, offset, b,
    h, i, j) gives each element 8 bits u, kept iff u >= dropout_threshold(p)."""
    seed, offset = (int(x) for x in rng_state.tolist())
    device = rng_state.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(nheads, device=device).view(1, -1, 1, 1)
    i = torch.arange(seqlen_q, device=device).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, 1, -1)
    x = torch.full((1, 1, 1, 1), seed % _PRIME, dtype=torch.int64, device=device)
    for value, multiplier in zip((offset % _PRIME, b, h, i, j), _MULTIPLIERS):
        x = _mix(x, value, multiplier)
    x = _mix(x, seed >> 31, _MULTIPLIERS[-1])
    u = (x >> 7) & 0xFF
    return (u >= dropout_threshold(p)).to(torch.uint8)


# --- attention with a given mask -------------------------------------------------


def attention_dropout_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    dropout_p: float,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.attention_ref with dropout: keep (batch, nheads, seqlen_q, seqlen_k),
    bool or 0/1 (larger is cropped). Differentiable in q, k, v. Returns (out in q's
    dtype, lse float32)."""
    return attention_ref(q, k, v, keep=keep, dropout_p=dropout_p, **kwargs)


def attention_dropout_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    keep: torch.Tensor,
    dropout_p: float,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.attention_varlen_ref with dropout: keep (batch, nheads, max_seqlen_q,
    max_seqlen_k) indexed within each sequence. Returns (out (total_q, nheads, d),
    lse (nheads, total_q))."""
    return attention_varlen_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, keep=keep, dropout_p=dropout_p, **kwargs
    )


# --- S_dmask ------------------------------------------------------------------------


def recover_from_s_dmask(
    s_dmask: torch.Tensor, scores: torch.Tensor, lse: torch.Tensor, block_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool, probs float32) of the (batch, nheads, seqlen_q, seqlen_k) corner of
    S_dmask, given the float32 scores it was made from (-inf where masked) and their
    lse (+inf for rows that see no key): probs = |S| * exp(M_i(B) - lse_i) with M_i(B)
    the max of row i over every key from block B's first on."""
    seqlen_q, seqlen_k = scores.shape[-2:]
    s = s_dmask[..., :seqlen_q, :seqlen_k].float()
    keep = ~torch.signbit(s)
    probs = torch.zeros_like(s)
    for start in range(0, seqlen_k, block_n):
        stop = min(start + block_n, seqlen_k)
        m = scores[..., start:].amax(-1, keepdim=True)  # every key from the block on
        scale = torch.exp(m - lse.unsqueeze(-1))  # -inf - x: 0 where nothing is visible
        probs[..., start:stop] = s[..., start:stop].abs() * torch.nan_to_num(scale, nan=0.0)
    return keep, probs


# --- upstream's helpers, where its test file is at hand -----------------------------

UPSTREAM_HELPERS = (
    "construct_local_mask",
    "attn_bias_from_alibi_slopes",
    "attention_ref",
    "convert_flash_attn_S_to_softmax",
    "normalize_flash_attn_S",
    "get_dropout_fraction",
)


def load_upstream_helpers(
    get_block_size_n: object, path: Path = UPSTREAM_TESTS
) -> types.SimpleNamespace | None:
    """Upstream's test helpers (UPSTREAM_HELPERS), taken from its test file by name and
    run as they are, with our _get_block_size_n; None where the file or einops is
    missing. Importing the file itself needs a GPU (it asks for the device's
    capability at import), so only these functions are compiled from it."""
    if not path.is_file():
        return None
    try:
        import einops
    except ImportError:
        return None
    import torch.nn.functional as F

    tree = ast.parse(path.read_text(), str(path))
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in UPSTREAM_HELPERS]
    if {n.name for n in wanted} != set(UPSTREAM_HELPERS):
        return None
    for node in wanted:
        node.decorator_list = []
    namespace: dict[str, object] = {
        "math": math, "torch": torch, "F": F, "rearrange": einops.rearrange,
        "repeat": einops.repeat, "_get_block_size_n": get_block_size_n,
    }  # fmt: skip
    module = ast.Module(body=wanted, type_ignores=[])  # type: ignore[list-item]
    exec(compile(module, str(path), "exec"), namespace)  # noqa: S102 (upstream's own helpers)
    return types.SimpleNamespace(**{name: namespace[name] for name in UPSTREAM_HELPERS})
