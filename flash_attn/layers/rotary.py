"""Rotary position embeddings: autograd functions and the RotaryEmbedding module.

The names, signatures and semantics are those of ``flash_attn.layers.rotary`` in
flash_attn 2.x, so code written for it runs unchanged:

- ``apply_rotary_emb`` (alias ``apply_rotary_emb_func``): rotate x, differentiably;
- ``apply_rotary_emb_qkv_`` / ``apply_rotary_emb_kv_``: rotate q and k of a packed
  qkv / k of a packed kv *in place*;
- ``RotaryEmbedding``: the nn.Module that keeps the cos/sin tables (and XPos scaling)
  and applies them to qkv or (q, kv);
- ``apply_rotary_emb_torch`` and ``rotate_half``: the same rotation in plain PyTorch
  (a reference; any device).

The rotation itself is ``flash_attn.ops.triton.rotary.apply_rotary`` (a Triton kernel,
CUDA tensors only). Its backward is the rotation by the opposite angle (a rotation's
inverse is its transpose), applied by the same kernel.

The in-place functions modify their input and return it, as 2.x does: use the returned
tensor for what follows, and do not feed them a tensor that another operation has saved
for its backward.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

from flash_attn.errors import InputError
from flash_attn.ops.triton.rotary import apply_rotary

Offsets = Union[int, Tensor]

__all__ = [
    "RotaryEmbedding",
    "apply_rotary_emb",
    "apply_rotary_emb_func",
    "apply_rotary_emb_kv_",
    "apply_rotary_emb_qkv_",
    "apply_rotary_emb_torch",
    "rotate_half",
]


# ------------------------------------------------------------------ plain PyTorch


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """The features of x rotated by 90 degrees: pair (a, b) becomes (-b, a).

    Pairs are (i, i + d/2) (GPT-NeoX), or (2i, 2i + 1) with ``interleaved`` (GPT-J).
    """
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_emb_torch(
    x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False
) -> Tensor:
    """apply_rotary_emb in plain PyTorch (no autograd.Function, any device).

    x: (batch, seqlen, nheads, headdim); cos, sin: (seqlen, rotary_dim / 2) or
    (batch, seqlen, rotary_dim / 2). The first rotary_dim features of x are rotated,
    the rest are returned as they are.
    """
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim > x.shape[-1]:
        raise InputError(
            f"rotary_dim = 2 * cos.shape[-1] = {rotary_dim} exceeds x's headdim {x.shape[-1]}"
        )

    def widen(t: Tensor) -> Tensor:  # (..., r/2) -> (..., 1, r): one value per feature
        full = t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1)
        return full.unsqueeze(-2)

    rotated = x[..., :rotary_dim]
    rotated = rotated * widen(cos) + rotate_half(rotated, interleaved) * widen(sin)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


# ------------------------------------------------------------------ autograd functions


def _writable(grad: Tensor) -> Tensor:
    """grad, or a copy of it where it has broadcast (stride 0) dimensions, which an
    in-place kernel must not write (e.g. the gradient of a sum)."""
    if any(stride == 0 and size > 1 for stride, size in zip(grad.stride(), grad.shape)):
        return grad.clone()
    return grad


def _save_offsets(ctx: Any, tensors: tuple[Tensor | None, ...], offsets: Offsets) -> None:
    """save_for_backward takes tensors only: an int offset goes on ctx."""
    if isinstance(offsets, Tensor):
        ctx.save_for_backward(*tensors, offsets)
        ctx.seqlen_offsets = None
    else:
        ctx.save_for_backward(*tensors)
        ctx.seqlen_offsets = offsets


def _saved_offsets(ctx: Any) -> tuple[tuple[Tensor | None, ...], Offsets]:
    saved = tuple(ctx.saved_tensors)
    if ctx.seqlen_offsets is None:
        return saved[:-1], saved[-1]
    return saved, ctx.seqlen_offsets


class ApplyRotaryEmb(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        interleaved: bool = False,
        inplace: bool = False,
        seqlen_offsets: Offsets = 0,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        out = apply_rotary(
            x,
            cos,
            sin,
            seqlen_offsets=seqlen_offsets,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            interleaved=interleaved,
            inplace=inplace,
        )
        _save_offsets(ctx, (cos, sin, cu_seqlens), seqlen_offsets)
        ctx.interleaved = interleaved
        ctx.inplace = inplace
        ctx.max_seqlen = max_seqlen
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (cos, sin, cu_seqlens), offsets = _saved_offsets(ctx)
        if ctx.inplace:
            grad_out = _writable(grad_out)
        grad_x = apply_rotary(
            grad_out,
            cos,
            sin,
            seqlen_offsets=offsets,
            cu_seqlens=cu_seqlens,
            max_seqlen=ctx.max_seqlen,
            interleaved=ctx.interleaved,
            inplace=ctx.inplace,
            conjugate=True,
        )
        return grad_x, None, None, None, None, None, None, None


def apply_rotary_emb(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: Offsets = 0,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """Rotary embedding of the first rotary_dim features of x, differentiable in x.

    Arguments:
        x: (batch, seqlen, nheads, headdim), or (total, nheads, headdim) with cu_seqlens.
        cos, sin: (seqlen_ro, rotary_dim / 2); rotary_dim <= headdim. Not differentiated.
        interleaved: rotate feature pairs (2i, 2i + 1) (GPT-J) instead of (i, i +
            rotary_dim / 2) (GPT-NeoX).
        inplace: write the result into x (the backward then rotates the incoming
            gradient in place as well).
        seqlen_offsets: int, or tensor (batch,): the position of each sequence's first
            token (e.g. the tokens already in a KV cache).
        cu_seqlens: (batch + 1,) or None; max_seqlen: the longest sequence, with cu_seqlens.
    Returns:
        x's shape: the rotated features, then x's features from rotary_dim on.
    """
    return ApplyRotaryEmb.apply(
        x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen
    )


# the 2.x name kept for older callers
apply_rotary_emb_func = apply_rotary_emb


def _qk_heads(qkv: Tensor, num_heads_q: int | None) -> tuple[int, int]:
    """(num_heads_q, num_heads_k) of a 4-D packed qkv (b, s, hq + 2 * hk, d); checks."""
    total = qkv.shape[2]
    if num_heads_q is None:
        raise InputError(
            f"qkv of shape {tuple(qkv.shape)} packs heads of q, k and v in dimension 2:"
            " pass num_heads_q (or use shape (batch, seqlen, 3, nheads, headdim))"
        )
    rest = total - num_heads_q
    if num_heads_q < 1 or rest < 2 or rest % 2:
        raise InputError(
            f"num_heads_q = {num_heads_q} does not split qkv's {total} heads into"
            " num_heads_q + 2 * num_heads_k with num_heads_k >= 1"
        )
    return num_heads_q, rest // 2


def _rotate_qk_(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cos_k: Tensor | None,
    sin_k: Tensor | None,
    *,
    interleaved: bool,
    seqlen_offsets: Offsets,
    num_heads_q: int | None,
    conjugate: bool,
) -> None:
    """Rotate the q and k heads of qkv in place (v untouched)."""
    kwargs = dict(
        seqlen_offsets=seqlen_offsets, interleaved=interleaved, inplace=True, conjugate=conjugate
    )
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise InputError(
                f"qkv must have shape (batch, seqlen, 3, nheads, headdim); got {tuple(qkv.shape)}"
            )
        batch, seqlen, _, nheads, headdim = qkv.shape
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        one_table = cos_k is None and sin_k is None
        if one_table and qkv.is_contiguous():
            # q and k side by side are one (batch, seqlen, 2 * nheads, headdim) view
            apply_rotary(qkv[:, :, :2].view(batch, seqlen, 2 * nheads, headdim), cos, sin, **kwargs)
            return
    elif qkv.dim() == 4:
        hq, hk = _qk_heads(qkv, num_heads_q)
        if cos_k is None and sin_k is None:
            apply_rotary(qkv[:, :, : hq + hk], cos, sin, **kwargs)
            return
        q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hk]
    else:
        raise InputError(
            "qkv must have shape (batch, seqlen, 3, nheads, headdim) or (batch, seqlen,"
            f" num_heads_q + 2 * num_heads_k, headdim); got {tuple(qkv.shape)}"
        )
    apply_rotary(q, cos, sin, **kwargs)
    apply_rotary(
        k, cos if cos_k is None else cos_k, sin if sin_k is None else sin_k, **kwargs
    )


class ApplyRotaryEmbQKV_(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        qkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        cos_k: Tensor | None = None,
        sin_k: Tensor | None = None,
        interleaved: bool = False,
        seqlen_offsets: Offsets = 0,
        num_heads_q: int | None = None,
    ) -> Tensor:
        _rotate_qk_(
            qkv,
            cos,
            sin,
            cos_k,
            sin_k,
            interleaved=interleaved,
            seqlen_offsets=seqlen_offsets,
            num_heads_q=num_heads_q,
            conjugate=False,
        )
        _save_offsets(ctx, (cos, sin, cos_k, sin_k), seqlen_offsets)
        ctx.interleaved = interleaved
        ctx.num_heads_q = num_heads_q
        return qkv

    @staticmethod
    def backward(ctx: Any, grad_qkv: Tensor) -> tuple[Tensor | None, ...]:
        (cos, sin, cos_k, sin_k), offsets = _saved_offsets(ctx)
        grad_qkv = _writable(grad_qkv)
        _rotate_qk_(
            grad_qkv,
            cos,
            sin,
            cos_k,
            sin_k,
            interleaved=ctx.interleaved,
            seqlen_offsets=offsets,
            num_heads_q=ctx.num_heads_q,
            conjugate=True,
        )
        return grad_qkv, None, None, None, None, None, None, None


def apply_rotary_emb_qkv_(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cos_k: Tensor | None = None,
    sin_k: Tensor | None = None,
    interleaved: bool = False,
    seqlen_offsets: Offsets = 0,
    num_heads_q: int | None = None,
) -> Tensor:
    """Rotary embedding of q and k, *in place* in the packed qkv, which is returned.

    Arguments:
        qkv: (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, num_heads_q + 2 *
            num_heads_k, headdim) (MQA/GQA: then pass num_heads_q).
        cos, sin: (seqlen_ro, rotary_dim / 2), for q (and k unless cos_k/sin_k are given).
        cos_k, sin_k: (seqlen_ro, rotary_dim / 2) for k, or None (XPos uses both).
        interleaved: GPT-J pairs (2i, 2i + 1) instead of GPT-NeoX pairs (i, i + r/2).
        seqlen_offsets: int, or tensor (batch,): position of each sequence's first token.
        num_heads_q: the q heads of a 4-D qkv.
    """
    return ApplyRotaryEmbQKV_.apply(
        qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q
    )


def _k_of(kv: Tensor) -> Tensor:
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise InputError(
            f"kv must have shape (batch, seqlen, 2, nheads, headdim); got {tuple(kv.shape)}"
        )
    return kv[:, :, 0]


class ApplyRotaryEmbKV_(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        kv: Tensor,
        cos: Tensor,
        sin: Tensor,
        interleaved: bool = False,
        seqlen_offsets: Offsets = 0,
    ) -> Tensor:
        k = _k_of(kv)
        apply_rotary(
            k, cos, sin, seqlen_offsets=seqlen_offsets, interleaved=interleaved, inplace=True
        )
        _save_offsets(ctx, (cos, sin), seqlen_offsets)
        ctx.interleaved = interleaved
        return kv

    @staticmethod
    def backward(ctx: Any, grad_kv: Tensor) -> tuple[Tensor | None, ...]:
        (cos, sin), offsets = _saved_offsets(ctx)
        grad_kv = _writable(grad_kv)
        apply_rotary(
            _k_of(grad_kv),
            cos,
            sin,
            seqlen_offsets=offsets,
            interleaved=ctx.interleaved,
            inplace=True,
            conjugate=True,
        )
        return grad_kv, None, None, None, None


def apply_rotary_emb_kv_(
    kv: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    seqlen_offsets: Offsets = 0,
) -> Tensor:
    """Rotary embedding of k, *in place* in the packed kv (batch, seqlen, 2, nheads,
    headdim), which is returned; v is untouched. cos, sin: (seqlen_ro, rotary_dim / 2);
    interleaved and seqlen_offsets as in apply_rotary_emb."""
    return ApplyRotaryEmbKV_.apply(kv, cos, sin, interleaved, seqlen_offsets)


# ------------------------------------------------------------------ the module


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoFormer, Su et al., https://arxiv.org/abs/2104.09864)
    of q and k, with the cos/sin tables cached.

    Frequencies: inv_freq[i] = base ** (-2i / dim), i < dim / 2; the token at position
    p is rotated by p * inv_freq[i] in pair i of the first ``dim`` features of each head.

    With ``scale_base`` (XPos, Sun et al., https://arxiv.org/abs/2212.10554; 512 is the
    value usually recommended), q is scaled by zeta ** ((p - n // 2) / scale_base) and k
    by its inverse, with zeta[i] = (2i + 0.4 dim) / (1.4 dim) and n the length of the
    cached table.
    """

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        scale_base: float | None = None,
        pos_idx_in_fp32: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        """
        dim: the rotated features of each head (rotary_dim), even, <= headdim.
        interleaved: rotate pairs (2i, 2i + 1) (GPT-J) instead of (i, i + dim / 2)
            (GPT-NeoX).
        pos_idx_in_fp32: compute positions (and the frequencies) in fp32 (the default).
            False computes positions in inv_freq's dtype, as models trained in pure
            bf16 before this option existed did (bf16 rounds e.g. 1995 to 2000).
        device: where the buffers live. flash_attn releases since 2.7 take it as the
            fifth positional argument: a device given there is taken as ``device``.
        """
        super().__init__()
        if isinstance(pos_idx_in_fp32, (torch.device, str)) and device is None:
            device, pos_idx_in_fp32 = pos_idx_in_fp32, True
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2 or dim % 2:
            raise InputError(f"dim must be an even int >= 2 (rotary_dim); got {dim!r}")
        if scale_base is not None and not scale_base > 0:
            raise InputError(f"scale_base must be None or > 0; got {scale_base!r}")
        self.dim = dim
        self.base = float(base)
        self.pos_idx_in_fp32 = bool(pos_idx_in_fp32)
        self.interleaved = interleaved
        self.scale_base = scale_base
        # not in the state_dict: both follow from the arguments
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        scale = None
        if scale_base is not None:
            even = torch.arange(0, dim, 2, device=device, dtype=torch.float32)
            scale = (even + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached: Tensor | None = None
        self._sin_cached: Tensor | None = None
        self._cos_k_cached: Tensor | None = None
        self._sin_k_cached: Tensor | None = None

    def _compute_inv_freq(self, device: torch.device | str | None = None) -> Tensor:
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        return 1.0 / (self.base**exponents)

    def _update_cos_sin_cache(
        self,
        seqlen: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Make the tables cover positions [0, seqlen) on device in dtype (recomputed
        when they are shorter, elsewhere, of another dtype, or made in inference mode
        and now needed for training)."""
        cached = self._cos_cached
        if (
            cached is not None
            and seqlen <= self._seq_len_cached
            and cached.device == device
            and cached.dtype == dtype
            and not (self.training and cached.is_inference())
        ):
            return
        self._seq_len_cached = seqlen
        # the angles in fp32 whatever the model's dtype: bf16 positions or products
        # would round large angles badly
        if self.pos_idx_in_fp32:
            positions = torch.arange(seqlen, device=device, dtype=torch.float32)
            inv_freq = self.inv_freq
            if inv_freq.dtype != torch.float32:  # the module was cast: recompute
                inv_freq = self._compute_inv_freq(device)
        else:
            positions = torch.arange(seqlen, device=device, dtype=self.inv_freq.dtype)
            inv_freq = self.inv_freq
        angles = torch.outer(positions, inv_freq.to(positions.device))  # not einsum: AMP
        cos, sin = torch.cos(angles), torch.sin(angles)
        if self.scale is None:
            self._cos_cached, self._sin_cached = cos.to(dtype), sin.to(dtype)
            return
        power = (torch.arange(seqlen, dtype=torch.float32, device=cos.device) - seqlen // 2) / (
            self.scale_base
        )
        zeta = self.scale.to(device=cos.device, dtype=torch.float32) ** power.unsqueeze(-1)
        self._cos_cached, self._sin_cached = (cos * zeta).to(dtype), (sin * zeta).to(dtype)
        self._cos_k_cached, self._sin_k_cached = (cos / zeta).to(dtype), (sin / zeta).to(dtype)

    def forward(
        self,
        qkv: Tensor,
        kv: Tensor | None = None,
        seqlen_offset: Offsets = 0,
        max_seqlen: int | None = None,
        num_heads_q: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Rotate q and k *in place*; returns qkv, or (q, kv) when kv is given.

        qkv: (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, num_heads_q + 2 *
            num_heads_k, headdim) with num_heads_q (MQA/GQA); when kv is given, q of
            shape (batch, seqlen, nheads, headdim).
        kv: (batch, seqlen, 2, nheads_k, headdim) or None.
        seqlen_offset: int, or tensor (batch,): position of each sequence's first token
            (the tokens already in a KV cache). With a tensor, pass max_seqlen (the
            largest offset + seqlen) so that the tables cover every position; positions
            past the tables are left unrotated.
        max_seqlen: make the tables at least this long.
        """
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            needed = max_seqlen
        elif isinstance(seqlen_offset, Tensor):
            needed = max(seqlen, self._seq_len_cached)
        else:
            needed = seqlen + seqlen_offset
        self._update_cos_sin_cache(needed, device=qkv.device, dtype=qkv.dtype)
        xpos = self.scale is not None
        cos_k = self._cos_k_cached if xpos else None
        sin_k = self._sin_k_cached if xpos else None
        if kv is None:
            return apply_rotary_emb_qkv_(
                qkv,
                self._cos_cached,
                self._sin_cached,
                cos_k,
                sin_k,
                interleaved=self.interleaved,
                seqlen_offsets=seqlen_offset,
                num_heads_q=num_heads_q,
            )
        q = apply_rotary_emb_func(
            qkv,
            self._cos_cached,
            self._sin_cached,
            interleaved=self.interleaved,
            inplace=True,
            seqlen_offsets=seqlen_offset,
        )
        kv = apply_rotary_emb_kv_(
            kv,
            cos_k if xpos else self._cos_cached,
            sin_k if xpos else self._sin_cached,
            interleaved=self.interleaved,
            seqlen_offsets=seqlen_offset,
        )
        return q, kv
