"""The KV-cache forward: rotary, the in-place append, and the call of the fwd_kv op.

flash_attn_with_kvcache (flash_attn_interface.py) validates its arguments
(_kvcache_checks.py), then ``kvcache_forward`` here

1. rotates q and the new k (``flash_attn.ops.triton.rotary``) when rotary tables
   are given: k at positions cache_seqlens + i; q at cache_seqlens + i when causal or
   local, else every query at cache_seqlens (flash_attn 2.x's rule);
2. writes the new k and v into k_cache and v_cache in place, at rows
   cache_seqlens .. cache_seqlens + seqlen_new - 1 of each sequence's cache row
   (dense: row cache_batch_idx[b], or b; paged: through block_table): the fwd_kv op
   does it (k_new, v_new: one kernel before the attention, or, where the sm_90 kernel
   reads the new rows from k_new / v_new itself, a dense prefill, that kernel as it
   starts) when it reads the caches themselves; where it reads a copy (a head_dim
   that is not a multiple of 8 is padded; a paged prefill gathers its pages)
   ``append_`` writes them first;
3. runs the fwd_kv op over the first cache_seqlens + seqlen_new keys of each row.

The index values are checked (_kvcache_checks.py) before anything is written: by the
op on the GPU (a verdict) where it reads and writes the caches itself, else here, on
the host, before step 1.

Inference only: everything runs without autograd.
"""

from __future__ import annotations

import operator

import torch

from flash_attn import _ops
from flash_attn._checks import AttnOptions
from flash_attn._kvcache_checks import (
    CacheShape,
    check_cache_values,
    check_rotary_rows,
    device_check_bound,
    verdict_buffer,
)
from flash_attn._layout import HEAD_DIM_MULTIPLE, kernel_layout, pad_head_dim, unpad_head_dim
from flash_attn.errors import InputError

# Paged calls with at least this many query rows per KV head (seqlen_q x nheads /
# nheads_k: a prefill or a long chunk) copy the pages they read into a contiguous
# cache first (gather_pages): the paged kernel is tuned for decode, and the copy is
# small next to a prefill's arithmetic.
PAGED_PREFILL_ROWS = 128


def _apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offsets: int | torch.Tensor,
    interleaved: bool,
) -> torch.Tensor:
    """x rotated (a new tensor), row i of each sequence at position offsets + i."""
    from flash_attn.ops.triton.rotary import apply_rotary  # imports Triton

    return apply_rotary(x, cos, sin, seqlen_offsets=offsets, interleaved=interleaved)


def rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_seqlens: int | torch.Tensor,
    positional_q: bool,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated as flash_attn 2.x's flash_attn_with_kvcache rotates them."""
    k = _apply_rotary(k, cos, sin, cache_seqlens, interleaved)
    if positional_q:
        return _apply_rotary(q, cos, sin, cache_seqlens, interleaved), k
    batch, seqlen_q, nheads, head_dim = q.shape
    flat = q.reshape(batch, 1, seqlen_q * nheads, head_dim)  # one position per sequence
    rotated = _apply_rotary(flat, cos, sin, cache_seqlens, interleaved)
    return rotated.view(batch, seqlen_q, nheads, head_dim), k


def append_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
) -> None:
    """Write k and v (batch, seqlen_new, nheads_k, d) into the caches in place, row i of
    sequence b at key cache_seqlens[b] + i of its cache row. The positions are checked
    (check_cache_values) to lie inside the cache."""
    batch, seqlen_new = k.shape[0], k.shape[1]
    keys = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=k.device)
    if block_table is None:
        if cache_batch_idx is None:
            rows = torch.arange(batch, device=k.device)
        else:
            rows = cache_batch_idx.long()
        index = (rows[:, None].expand_as(keys), keys)
    else:
        page_size = k_cache.shape[1]
        pages = block_table.long().gather(1, keys // page_size)
        index = (pages, keys % page_size)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, num_pages: int) -> torch.Tensor:
    """The first num_pages pages of each sequence, in order, as one contiguous cache
    (batch, num_pages * page_size, nheads_k, d): key j of sequence b is row j % page_size
    of page block_table[b, j // page_size], as the paged kernel reads it."""
    pages = block_table[:, :num_pages].long()
    return cache[pages].flatten(1, 2)


def _kernel_cache(cache: torch.Tensor) -> torch.Tensor:
    """The cache as the op takes it. A head_dim that is not a multiple of 8 is padded,
    which copies the whole cache (the kernels' head dims are multiples of 8)."""
    return pad_head_dim(cache)


def _fused_append(shape: CacheShape, paged_gather: bool) -> bool:
    """Whether the op appends k and v itself (one kernel before the attention): it
    writes into the caches it reads, so not when the op gets a copy of them (a padded
    head_dim, or a paged prefill's gathered pages)."""
    return shape.head_dim % HEAD_DIM_MULTIPLE == 0 and not paged_gather


def kvcache_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    cache_seqlens: int | torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    shape: CacheShape,
    opts: AttnOptions,
    rotary_interleaved: bool,
    alibi_slopes: torch.Tensor | None,
    num_splits: int,
    check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of the module docstring; returns (out, softmax_lse)."""
    batch, seqlen_new = shape.batch, shape.seqlen_new
    paged = block_table is not None
    positional_q = opts.window_left >= 0 or opts.window_right >= 0  # causal or local
    q_positions = shape.seqlen_q if positional_q else 1
    paged_gather = paged and shape.seqlen_q * (shape.nheads // shape.nheads_k) >= (
        PAGED_PREFILL_ROWS
    )
    # Whether the op appends k and v: it then takes the key counts before the append
    # (cache_seqlens as they are) and adds seqlen_new on the device, so no kernel adds
    # them first; else seqused_k is each sequence's key count after the append. A dense
    # cache with an int cache_seqlens is instead cut to its first `cut` keys (a view).
    op_appends = k is not None and _fused_append(shape, paged_gather)
    seqused_k = None
    keys = cut = None  # int cache_seqlens: every sequence's key count after the append
    if isinstance(cache_seqlens, torch.Tensor):
        seqused_k = (
            _contiguous(cache_seqlens) if op_appends or not seqlen_new
            else cache_seqlens + seqlen_new
        )  # fmt: skip
    elif cache_seqlens is not None:
        keys = operator.index(cache_seqlens) + seqlen_new
        if paged or keys == 0:
            given = keys - seqlen_new if op_appends else keys
            seqused_k = torch.full((batch,), given, dtype=torch.int32, device=q.device)
        else:
            cut = keys

    def keys_after() -> torch.Tensor | None:
        """Each sequence's key count after the append, for the host checks."""
        if seqused_k is None or not op_appends or not seqlen_new:
            return seqused_k
        return seqused_k + seqlen_new

    # The index values: checked by the op on the device where it reads and writes the
    # caches itself (nothing waits for them before the launch), else here first.
    max_keys = None
    if check_values and (
        isinstance(cache_seqlens, torch.Tensor) or cache_batch_idx is not None
        or cache_leftpad is not None or block_table is not None
    ) and not paged_gather and (k is None or op_appends):  # fmt: skip
        max_keys = device_check_bound(shape, q_positions)
    if keys is not None and shape.rotary_rows:
        # an int cache_seqlens is a plain value: its rotary rows are checked here, always
        # (as its range is), before the rotary reads the tables
        check_rotary_rows(shape, keys - seqlen_new, q_positions)
    most_keys = shape.capacity
    if check_values and max_keys is None:
        most_keys = check_cache_values(
            shape, keys_after(), cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
            q_positions=q_positions,
        )  # fmt: skip
    elif keys is not None:
        most_keys = keys
    k_new = v_new = None
    if k is not None and v is not None:
        assert cache_seqlens is not None
        if rotary is not None:
            q, k = rotate(q, k, *rotary, cache_seqlens, positional_q, rotary_interleaved)
        if op_appends:
            k_new, v_new = k, v
        else:
            starts = cache_seqlens
            if not isinstance(starts, torch.Tensor):
                starts = torch.full((batch,), starts, dtype=torch.int32, device=q.device)
            append_(k_cache, v_cache, k, v, starts, cache_batch_idx, block_table)

    if not paged:
        if cache_batch_idx is None and k_cache.shape[0] > batch:
            k_cache, v_cache = k_cache[:batch], v_cache[:batch]  # the rows the batch uses
        if cut is not None and cut < k_cache.shape[1]:
            k_cache, v_cache = k_cache[:, :cut], v_cache[:, :cut]  # the keys used
    elif paged_gather:
        num_pages = -(-most_keys // shape.page_size)
        k_cache = gather_pages(k_cache, block_table, num_pages)
        v_cache = gather_pages(v_cache, block_table, num_pages)
        most_keys = min(most_keys, k_cache.shape[1])
        block_table = None
    window_left, window_right = opts.window_for(shape.seqlen_q, max(most_keys, 1))
    verdict = None if max_keys is None else verdict_buffer(q.device)
    out, lse = _ops.fwd_kv(
        kernel_layout(q),
        _kernel_cache(k_cache),
        _kernel_cache(v_cache),
        None,
        None,
        seqused_k,
        _contiguous(cache_batch_idx),
        _contiguous(cache_leftpad),
        _contiguous(block_table),
        shape.seqlen_q,
        most_keys,
        opts.scale_for(shape.head_dim),
        window_left,
        window_right,
        opts.softcap,
        _contiguous(alibi_slopes),
        num_splits,
        k_new,
        v_new,
        verdict,
        -1 if max_keys is None else max_keys,
    )
    if verdict is not None and (bad := int(verdict.item())) != 0:
        # nothing was written: the values, read here, say which is wrong
        check_cache_values(
            shape, keys_after(), cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
            q_positions=q_positions,
        )  # fmt: skip
        _refused(bad)
    return unpad_head_dim(out, shape.head_dim), lse


def _refused(verdict: int) -> None:
    """A device check's refusal that the host check of the same values let pass (they
    apply one rule, so this is a bug of ours): say what the device saw."""
    what = [name for bit, name in (
        (_ops.KV_BAD_KEYS, "a key count (cache_seqlens + seqlen_new) out of range"),
        (_ops.KV_BAD_ROW, "a cache_batch_idx out of range"),
        (_ops.KV_BAD_LEFTPAD, "a cache_leftpad out of range"),
        (_ops.KV_BAD_PAGE, "a block_table entry that is not a page of the pool"),
    ) if verdict & bit]  # fmt: skip
    raise InputError(
        f"the KV-cache index values were refused on the device ({', '.join(what) or verdict}) "
        "but pass the host check: please report this; nothing was written"
    )


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a contiguous copy of it where it is not (an index tensor for the op)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def varlen_paged_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_table: torch.Tensor,
    shape: CacheShape,
    opts: AttnOptions,
    alibi_slopes: torch.Tensor | None,
    check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_attn_varlen_func with block_table: sequence b's keys are the first
    cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys of its pages. A prefill-sized call
    (max_seqlen_q x nheads / nheads_k >= PAGED_PREFILL_ROWS) packs the keys it reads
    (gather_varlen) and runs the ordinary varlen forward."""
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()

    def check_lengths() -> None:
        lengths = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
        check_cache_values(
            shape, lengths, lengths, None, None, block_table, q_positions=0,
            seqlens_name="cu_seqlens_k[b + 1] - cu_seqlens_k[b]",
        )  # fmt: skip

    gather = max_seqlen_q * (shape.nheads // shape.nheads_k) >= PAGED_PREFILL_ROWS
    if check_values and gather:  # the gather reads the pages: checked before it
        check_lengths()
    window_left, window_right = opts.window_for(max_seqlen_q, max(max_seqlen_k, 1))
    args = (max_seqlen_q, max_seqlen_k, opts.scale_for(shape.head_dim), window_left,
            window_right, opts.softcap)  # fmt: skip
    alibi = None if alibi_slopes is None else alibi_slopes.contiguous()
    if gather:
        k_packed = gather_varlen(k_cache, block_table, cu_k)
        v_packed = gather_varlen(v_cache, block_table, cu_k)
        out, lse = _ops.fwd(
            kernel_layout(q), kernel_layout(k_packed), kernel_layout(v_packed), cu_q, cu_k,
            *args, alibi,
        )  # fmt: skip
    else:  # checked by the op on the device (kvcache_forward)
        verdict = verdict_buffer(q.device) if check_values else None
        out, lse = _ops.fwd_kv(
            kernel_layout(q), _kernel_cache(k_cache), _kernel_cache(v_cache), cu_q, cu_k,
            None, None, None, block_table.contiguous(), *args, alibi, 0, None, None, verdict, -1,
        )  # fmt: skip
        if verdict is not None and (bad := int(verdict.item())) != 0:
            check_lengths()
            _refused(bad)
    return unpad_head_dim(out, shape.head_dim), lse


def gather_varlen(
    cache: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor
) -> torch.Tensor:
    """The keys of every sequence packed as varlen k (total_k, nheads_k, d): row
    cu_seqlens_k[b] + j is key j of sequence b (page block_table[b, j // page_size])."""
    page_size = cache.shape[1]
    total = int(cu_seqlens_k[-1])  # one read of a device value
    token = torch.arange(total, device=cache.device)
    seq = torch.searchsorted(cu_seqlens_k[1:].long(), token, right=True)
    key = token - cu_seqlens_k.long()[seq]
    pages = block_table.long()[seq, key // page_size]
    return cache[pages, key % page_size]
