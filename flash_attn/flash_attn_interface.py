"""The flash_attn 2.x functions: same names, argument order and defaults.

Every function validates its inputs before any launch (see flash_attn._checks),
puts them in the layout the kernels take, and returns ``out``, or
``(out, softmax_lse, S_dmask)`` when ``return_attn_probs`` is true: S_dmask is None
without dropout, and with dropout_p > 0 the probabilities with the dropped ones
negated, in flash_attn 2.x's convention (flash_attn._probs; computed in PyTorch, a
testing aid: it costs a (batch, nheads, seqlen_q, seqlen_k) tensor).

Dropout (dropout_p in [0, 1)) applies to the softmax's probabilities, whether or not
a gradient is needed (pass dropout_p=0.0 to evaluate, as with flash_attn 2.x). Each
call with dropout_p > 0 draws its (seed, offset) from torch's generator for q's
device on the device (torch.manual_seed reproduces a call; a CUDA graph replay draws
afresh); the backward regenerates the forward's mask from the same draw.

Layouts: q (batch, seqlen_q, nheads, head_dim), k and v (batch, seqlen_k,
nheads_k, head_dim); varlen packs the tokens of all sequences, (total, nheads,
head_dim), with int32 cu_seqlens of length batch + 1. nheads must be a multiple of
nheads_k (MQA/GQA). With seqlen_q != seqlen_k, causal and sliding-window masks are
aligned to the bottom-right corner of the score matrix: query i sees key j iff
``i + seqlen_k - seqlen_q - window_size[0] <= j <= i + seqlen_k - seqlen_q +
window_size[1]`` (-1 = unbounded; causal sets window_size[1] = 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional, Union

import torch

from flash_attn import _checks, _kvcache, _kvcache_checks, _ops, _probs
from flash_attn._autograd import (
    FlashAttnFunc,
    FlashAttnKVPackedFunc,
    FlashAttnQKVPackedFunc,
    OpArgs,
    PagedVarlenFunc,
    draw_rng_state,
    forward_no_grad,
)
from flash_attn._checks import AttnOptions, AttnShape
from flash_attn.errors import InputError

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

# out, or (out, softmax_lse, S_dmask or None) with return_attn_probs. (typing names:
# this alias is evaluated at runtime, and the package supports Python 3.9.)
AttnResult = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


def _needs_backward(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _op_args(shape: AttnShape, opts: AttnOptions) -> OpArgs:
    window_left, window_right = opts.window_for(shape.seqlen_q, shape.seqlen_k)
    return (
        shape.seqlen_q,
        shape.seqlen_k,
        opts.scale_for(shape.head_dim),
        window_left,
        window_right,
        opts.softcap,
    )


def _result(
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    return_attn_probs: bool,
    s_dmask: torch.Tensor | None = None,
) -> AttnResult:
    return (out, softmax_lse, s_dmask) if return_attn_probs else out


def _get_block_size_n(
    device: torch.device | str | None, head_dim: int, is_dropout: bool, is_causal: bool
) -> int:
    """The key-block width of the S_dmask convention (flash_attn._probs), which
    upstream's test helper normalize_flash_attn_S asks for. The same for every device,
    head dim and mask: S_dmask is computed in PyTorch, not read from a kernel's tiles.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise InputError(f"head_dim must be an int in 1..256; got {head_dim!r}")
    if not 1 <= head_dim <= _checks.MAX_HEAD_DIM:
        raise InputError(f"head_dim must be in 1..{_checks.MAX_HEAD_DIM}; got {head_dim}")
    return _probs.BLOCK_N


def _attn_probs(
    return_attn_probs: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    shape: AttnShape,
    opts: AttnOptions,
    args: OpArgs,
    alibi_slopes: torch.Tensor | None,
    rng_state: torch.Tensor | None,
) -> torch.Tensor | None:
    """S_dmask of a call with dropout and return_attn_probs (flash_attn._probs), from
    the mask that rng_state gives; None otherwise (no dropout, or not asked for)."""
    if not return_attn_probs or rng_state is None:
        return None
    keep = _ops.dropout_mask(
        rng_state, shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k, opts.dropout_p
    )
    return _probs.s_dmask(q, k, cu_seqlens_q, cu_seqlens_k, *args, alibi_slopes, keep)


def _alibi(alibi_slopes: torch.Tensor | None) -> torch.Tensor | None:
    return None if alibi_slopes is None else alibi_slopes.contiguous()


def _distinct(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors, with a repeated one (q is k, cu_seqlens_q is cu_seqlens_k)
    replaced by a view of itself.

    torch.compile refuses the same tensor twice among an autograd.Function's
    inputs (torch 2.13: "duplicate tensor input"), and older releases (2.11 seen)
    silently dropped gradient contributions for it. A view is a distinct input
    whose gradient still reaches the original.
    """
    seen: list[torch.Tensor] = []
    result: list[torch.Tensor | None] = []
    for t in tensors:
        if t is not None:
            if any(t is other for other in seen):
                t = t.view(t.shape)
            seen.append(t)
        result.append(t)
    return result


def _options(
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: Sequence[int],
    softcap: float,
) -> AttnOptions:
    return _checks.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
    )


def _varlen_paged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    opts: AttnOptions,
    alibi_slopes: torch.Tensor | None,
    block_table: torch.Tensor,
    return_attn_probs: bool,
) -> AttnResult:
    """flash_attn_varlen_func over a paged KV cache (inference only)."""
    if opts.dropout_p > 0.0:
        raise InputError(
            f"dropout_p={opts.dropout_p} with block_table: flash_attn_varlen_func over a "
            "paged KV cache is inference only and applies no dropout; pass dropout_p=0.0 "
            "(valid with block_table: 0.0 only)."
        )
    shape = _kvcache_checks.check_varlen_paged(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
        alibi_slopes,
    )  # fmt: skip
    tensors = {
        "q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
        "block_table": block_table, "alibi_slopes": alibi_slopes,
    }  # fmt: skip
    attn_shape = AttnShape(
        shape.batch, max_seqlen_q, max_seqlen_k, shape.nheads, shape.nheads_k,
        shape.head_dim, shape.dtype,
    )  # fmt: skip
    _checks.check_launch(tensors, attn_shape, False)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return _kvcache.varlen_paged_forward(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                shape, opts, alibi_slopes, _kvcache_checks.values_checkable(q.device),
            )  # fmt: skip

    # inputs that require grad: the same forward, in the graph; its backward raises
    out, lse = PagedVarlenFunc.apply(q, k, v, run) if _needs_backward(q, k, v) else run()
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnResult:
    """Attention over qkv (batch, seqlen, 3, nheads, head_dim).

    Returns out (batch, seqlen, nheads, head_dim); with return_attn_probs,
    (out, softmax_lse (batch, nheads, seqlen) float32, S_dmask). The gradient of qkv
    comes back packed.
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap)
    layout = "(batch, seqlen, 3, nheads, head_dim)"
    _checks.check_packed("qkv", qkv, 3, layout)
    q, k, v = qkv.unbind(dim=-3)
    shape = _checks.check_dense(q, k, v, alibi_slopes)
    grad = _needs_backward(qkv)
    _checks.check_launch({"qkv": qkv, "alibi_slopes": alibi_slopes}, shape, grad)
    args, alibi = _op_args(shape, opts), _alibi(alibi_slopes)
    rng_state = draw_rng_state(opts.dropout_p, qkv.device)
    if not grad:
        out, lse = forward_no_grad(q, k, v, None, None, alibi, args, opts.dropout_p, rng_state)
    else:
        out, lse = FlashAttnQKVPackedFunc.apply(
            qkv, None, alibi, rng_state, args, opts.dropout_p, deterministic
        )
    probs = _attn_probs(return_attn_probs, q, k, None, None, shape, opts, args, alibi, rng_state)
    return _result(out, lse, return_attn_probs, probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnResult:
    """Attention of q (batch, seqlen_q, nheads, head_dim) over kv (batch, seqlen_k,
    2, nheads_k, head_dim).

    Returns out shaped like q; with return_attn_probs, (out, softmax_lse (batch,
    nheads, seqlen_q) float32, S_dmask). The gradient of kv comes back packed.
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap)
    _checks.check_packed("kv", kv, 2, "(batch, seqlen_k, 2, nheads_k, head_dim)")
    k, v = kv.unbind(dim=-3)
    shape = _checks.check_dense(q, k, v, alibi_slopes)
    grad = _needs_backward(q, kv)
    _checks.check_launch({"q": q, "kv": kv, "alibi_slopes": alibi_slopes}, shape, grad)
    args, alibi = _op_args(shape, opts), _alibi(alibi_slopes)
    rng_state = draw_rng_state(opts.dropout_p, q.device)
    if not grad:
        out, lse = forward_no_grad(q, k, v, None, None, alibi, args, opts.dropout_p, rng_state)
    else:
        out, lse = FlashAttnKVPackedFunc.apply(
            *_distinct(q, kv, None, None, alibi), rng_state, args, opts.dropout_p, deterministic
        )
    probs = _attn_probs(return_attn_probs, q, k, None, None, shape, opts, args, alibi, rng_state)
    return _result(out, lse, return_attn_probs, probs)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnResult:
    """Attention of q (batch, seqlen_q, nheads, head_dim) over k, v (batch,
    seqlen_k, nheads_k, head_dim).

    softmax_scale defaults to 1/sqrt(head_dim); softcap > 0 applies
    softcap * tanh(scores / softcap); alibi_slopes (nheads,) or (batch, nheads)
    float32 adds -slope * |i + seqlen_k - seqlen_q - j| to the scores.
    dropout_p in [0, 1): each probability (after the softmax) is dropped with that
    probability and the kept ones scaled by 1 / (1 - dropout_p); softmax_lse is that
    of the scores before dropout.
    Returns out shaped like q; with return_attn_probs, (out, softmax_lse (batch,
    nheads, seqlen_q) float32, S_dmask): S_dmask None without dropout, else (batch,
    nheads, seqlen_q and seqlen_k rounded up to 128) in q's dtype, the probabilities
    in flash_attn 2.x's blockwise form, negative where dropped (flash_attn._probs).
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap)
    shape = _checks.check_dense(q, k, v, alibi_slopes)
    grad = _needs_backward(q, k, v)
    _checks.check_launch({"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes}, shape, grad)
    args, alibi = _op_args(shape, opts), _alibi(alibi_slopes)
    rng_state = draw_rng_state(opts.dropout_p, q.device)
    if not grad:
        out, lse = forward_no_grad(q, k, v, None, None, alibi, args, opts.dropout_p, rng_state)
    else:
        out, lse = FlashAttnFunc.apply(
            *_distinct(q, k, v, None, None, alibi), rng_state, args, opts.dropout_p, deterministic
        )
    probs = _attn_probs(return_attn_probs, q, k, None, None, shape, opts, args, alibi, rng_state)
    return _result(out, lse, return_attn_probs, probs)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnResult:
    """Attention over qkv (total, 3, nheads, head_dim) holding the tokens of the
    sequences that int32 cu_seqlens (batch + 1) delimits; max_seqlen is the
    longest.

    Returns out (total, nheads, head_dim); with return_attn_probs, (out,
    softmax_lse (nheads, total) float32, S_dmask). The gradient of qkv comes back
    packed.
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap)
    _checks.check_packed("qkv", qkv, 3, "(total, 3, nheads, head_dim)")
    q, k, v = qkv.unbind(dim=-3)
    shape = _checks.check_varlen(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, alibi_slopes
    )
    grad = _needs_backward(qkv)
    _checks.check_launch(
        {"qkv": qkv, "cu_seqlens": cu_seqlens, "alibi_slopes": alibi_slopes}, shape, grad
    )
    cu, args, alibi = cu_seqlens.contiguous(), _op_args(shape, opts), _alibi(alibi_slopes)
    rng_state = draw_rng_state(opts.dropout_p, qkv.device)
    if not grad:
        out, lse = forward_no_grad(q, k, v, cu, cu, alibi, args, opts.dropout_p, rng_state)
    else:
        out, lse = FlashAttnQKVPackedFunc.apply(
            qkv, cu, alibi, rng_state, args, opts.dropout_p, deterministic
        )
    probs = _attn_probs(return_attn_probs, q, k, cu, cu, shape, opts, args, alibi, rng_state)
    return _result(out, lse, return_attn_probs, probs)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnResult:
    """Attention of q (total_q, nheads, head_dim) over kv (total_k, 2, nheads_k,
    head_dim), sequences delimited by int32 cu_seqlens_q / cu_seqlens_k.

    Returns out shaped like q; with return_attn_probs, (out, softmax_lse (nheads,
    total_q) float32, S_dmask). The gradient of kv comes back packed.
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap)
    _checks.check_packed("kv", kv, 2, "(total_k, 2, nheads_k, head_dim)")
    k, v = kv.unbind(dim=-3)
    shape = _checks.check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes
    )
    _checks.check_launch(
        {
            "q": q,
            "kv": kv,
            "cu_seqlens_q": cu_seqlens_q,
            "cu_seqlens_k": cu_seqlens_k,
            "alibi_slopes": alibi_slopes,
        },
        shape,
        _needs_backward(q, kv),
    )
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    args, alibi = _op_args(shape, opts), _alibi(alibi_slopes)
    rng_state = draw_rng_state(opts.dropout_p, q.device)
    if not _needs_backward(q, kv):
        out, lse = forward_no_grad(q, k, v, cu_q, cu_k, alibi, args, opts.dropout_p, rng_state)
    else:
        out, lse = FlashAttnKVPackedFunc.apply(
            *_distinct(q, kv, cu_q, cu_k, alibi), rng_state, args, opts.dropout_p, deterministic
        )
    probs = _attn_probs(return_attn_probs, q, k, cu_q, cu_k, shape, opts, args, alibi, rng_state)
    return _result(out, lse, return_attn_probs, probs)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> AttnResult:
    """Attention of q (total_q, nheads, head_dim) over k, v (total_k, nheads_k,
    head_dim); sequence b spans rows cu_seqlens[b] to cu_seqlens[b + 1] (int32,
    length batch + 1) and max_seqlen_q / max_seqlen_k are the longest.

    Returns out shaped like q; with return_attn_probs, (out, softmax_lse (nheads,
    total_q) float32, S_dmask).

    block_table (paged KV, inference only): int32 (batch, pages_per_seq); k and v are
    then the page pool (num_pages, page_size, nheads_k, head_dim), page_size a multiple
    of 16, and sequence b's keys are the first cu_seqlens_k[b + 1] - cu_seqlens_k[b]
    keys of its pages (key j in page block_table[b, j // page_size]). No gradient:
    with block_table, inputs that require grad give an output in the graph (as flash_attn
    2.x's) whose backward raises NotImplementedError. The lengths and
    the page entries used are checked as flash_attn_with_kvcache checks them (on the GPU;
    a prefill-sized call, which gathers its pages first, reads them on the host: one
    device sync).
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap)
    if block_table is not None:
        return _varlen_paged(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts,
            alibi_slopes, block_table, return_attn_probs,
        )  # fmt: skip
    shape = _checks.check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes
    )
    grad = _needs_backward(q, k, v)
    _checks.check_launch(
        {
            "q": q,
            "k": k,
            "v": v,
            "cu_seqlens_q": cu_seqlens_q,
            "cu_seqlens_k": cu_seqlens_k,
            "alibi_slopes": alibi_slopes,
        },
        shape,
        grad,
    )
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    args, alibi = _op_args(shape, opts), _alibi(alibi_slopes)
    rng_state = draw_rng_state(opts.dropout_p, q.device)
    if not grad:
        out, lse = forward_no_grad(q, k, v, cu_q, cu_k, alibi, args, opts.dropout_p, rng_state)
    else:
        out, lse = FlashAttnFunc.apply(
            *_distinct(q, k, v, cu_q, cu_k, alibi), rng_state, args, opts.dropout_p, deterministic
        )
    probs = _attn_probs(return_attn_probs, q, k, cu_q, cu_k, shape, opts, args, alibi, rng_state)
    return _result(out, lse, return_attn_probs, probs)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over a KV cache, after appending k and v to it in place
    (incremental decoding, chunked prefill, speculative decoding). Inference only: no
    gradient flows through it.

    Arguments (flash_attn 2.x's):
        q: (batch, seqlen_q, nheads, head_dim); seqlen_q may be 1 (decode) or more.
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, head_dim), or with
            block_table the page pool (num_pages, page_size, nheads_k, head_dim), page_size
            a multiple of 16 (upstream asks for a multiple of 256; all of those work).
            Last dim contiguous. Updated in place when k and v are given.
        k, v: (batch, seqlen_new, nheads_k, head_dim) or None: written into the caches at
            keys cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 of sequence b's
            cache row (with cache_batch_idx duplicated, any one of the duplicates wins).
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), float32 or q's dtype, with k
            and v only: rotate the new k at positions cache_seqlens + i, and q at
            cache_seqlens + i when causal or local (window_size != (-1, -1)), else every
            query at cache_seqlens. rotary_interleaved: pairs (0, 1), (2, 3), ... (GPT-J)
            instead of (i, i + rotary_dim / 2) (GPT-NeoX).
        cache_seqlens: int, or int32 (batch,): the keys in each cache row before the
            append; None: the whole cache row (seqlen_cache, or pages_per_seq *
            page_size). Required with k and v.
        cache_batch_idx: int32 (batch,): the cache row of each sequence (default b).
        cache_leftpad: int32 (batch,): sequence b's keys start at key cache_leftpad[b]
            (left padding); the masks and ALiBi see the keys from there on.
        block_table: int32 (batch, pages_per_seq): key j of sequence b is in page
            block_table[b, j // page_size]. Entries past a sequence's last page are not
            read (they may hold anything, e.g. -1).
        softmax_scale, causal, window_size, softcap, alibi_slopes: as flash_attn_func;
            masks are aligned to the bottom right (the last query sees the last key).
        num_splits: 0 lets the kernels choose how many ways to split the keys, 1 never
            splits, n in 2..128 splits them n ways.
        return_softmax_lse: also return softmax_lse (batch, nheads, seqlen_q) float32.

    Returns out (batch, seqlen_q, nheads, head_dim), or (out, softmax_lse).

    Checked before anything is written: shapes, dtypes and devices; and the values of
    cache_seqlens, cache_batch_idx, cache_leftpad and block_table (every key written or
    read lies in the cache, every page used is in the pool, the rotary tables cover
    every position rotated); a bad value raises InputError and nothing is written.
    Tensor values are checked on the GPU by a kernel launched before the others of the
    call (which write nothing on a bad value), the call returning once its verdict is
    in: one call in flight at a time, no wait before the launch. Where the cache is
    written before the op (a head_dim that is not a multiple of 8; a paged call large
    enough to gather its pages) they are read on the host first: one device sync. An
    int cache_seqlens with no other index tensor needs neither. While a CUDA graph is
    being captured the value checks are skipped; FLASH_ATTN_KVCACHE_CHECKS=0 skips them
    always. A head_dim that is not a multiple of 8 makes a padded copy of the cache for
    the kernel on every call.
    """
    opts = _options(0.0, softmax_scale, causal, window_size, softcap)
    num_splits = _kvcache_checks.check_num_splits(num_splits)
    shape = _kvcache_checks.check_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
        cache_leftpad, block_table, alibi_slopes,
    )  # fmt: skip
    tensors = {
        "q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
        "rotary_cos": rotary_cos, "rotary_sin": rotary_sin,
        "cache_seqlens": cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None,
        "cache_batch_idx": cache_batch_idx, "cache_leftpad": cache_leftpad,
        "block_table": block_table, "alibi_slopes": alibi_slopes,
    }  # fmt: skip
    attn_shape = AttnShape(
        shape.batch, shape.seqlen_q, shape.capacity, shape.nheads, shape.nheads_k,
        shape.head_dim, shape.dtype,
    )  # fmt: skip
    _checks.check_launch(tensors, attn_shape, False)
    rotary = None if rotary_cos is None or rotary_sin is None else (rotary_cos, rotary_sin)
    # no_grad costs about 2.5 us a call; inference loops have grad off already
    with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
        out, lse = _kvcache.kvcache_forward(
            q, k_cache, v_cache, k, v, rotary, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, shape, opts, rotary_interleaved, alibi_slopes, num_splits,
            check_values=_kvcache_checks.values_checkable(q.device),
        )  # fmt: skip
    return (out, lse) if return_softmax_lse else out
