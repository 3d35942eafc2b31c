"""Input validation of the KV-cache entry points (flash_attn_with_kvcache, and
flash_attn_varlen_func with block_table), before anything is written or launched.

Two stages, like flash_attn._checks:

1. ``check_kvcache`` / ``check_varlen_paged``: shapes, ranks, dtypes and plain
   values (tensor metadata only);
2. the values of the index tensors (cache_seqlens, cache_batch_idx, cache_leftpad,
   block_table), which guarantee that nothing is read or written outside the cache.
   Where the fwd_kv op reads and writes the caches itself (most calls), the op checks
   them on the device (``device_check_bound``, ``verdict_buffer``): it launches the
   check before the rest of the call, every kernel of the call writes nothing on a bad
   value, and the op returns once the verdict is in; only a refused call then reads
   the values on the host (``check_cache_values``), for the message. Elsewhere
   ``check_cache_values`` reads them before anything is launched (one device-to-host
   copy of a few integers: a wait for the GPU).

Each message names the value seen and what is valid.
"""

from __future__ import annotations

import operator
import os
import threading
from dataclasses import dataclass

import torch

from flash_attn._checks import (
    _check_alibi,
    _check_cu_seqlens,
    _check_dtypes,
    _check_heads,
    _check_max_seqlen,
    _check_rank,
    _heads_fast,
    _shape,
)
from flash_attn.errors import InputError

# A page of the paged KV cache holds a multiple of this many keys (upstream 2.x asks
# for a multiple of 256; every such size is one of ours).
PAGE_SIZE_MULTIPLE = 16
MAX_NUM_SPLITS = 128

CACHE_LAYOUT = "(batch_cache, seqlen_cache, nheads_k, head_dim)"
PAGED_LAYOUT = "(num_pages, page_size, nheads_k, head_dim)"


@dataclass
class CacheShape:
    """Sizes of one KV-cache call (made by the checks, read-only after: not frozen
    because a frozen dataclass costs 2-3 us more to make, on every call; no slots,
    which Python 3.9's dataclass does not take)."""

    batch: int
    seqlen_q: int
    nheads: int
    nheads_k: int
    head_dim: int
    seqlen_new: int  # rows of k and v appended (0: none)
    cache_rows: int  # dense: batch_cache; paged: num_pages
    page_size: int  # 0: dense
    pages_per_seq: int  # paged: columns of block_table
    capacity: int  # keys one sequence's cache row can hold
    rotary_rows: int  # rows of rotary_cos (0: no rotary)
    dtype: torch.dtype

    @property
    def paged(self) -> bool:
        return self.page_size > 0


def _check_index(name: str, t: object, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """An int32 tensor of the given shape (the index tensors of the op contract)."""
    if not isinstance(t, torch.Tensor):
        raise InputError(
            f"{name} must be an int32 tensor of shape {layout}; got {type(t).__name__}"
        )
    if t.dtype != torch.int32:
        raise InputError(
            f"{name} must be an int32 tensor of shape {layout}; got dtype {t.dtype} "
            "(convert with .to(torch.int32))"
        )
    if _shape(t) != shape:
        raise InputError(f"{name} must have shape {layout} = {shape}; got {_shape(t)}")
    return t


def check_num_splits(num_splits: object) -> int:
    if isinstance(num_splits, bool) or not hasattr(num_splits, "__index__"):
        raise InputError(
            f"num_splits must be an int in 0..{MAX_NUM_SPLITS} (0: chosen by flash_attn, "
            f"1: no split); got {type(num_splits).__name__} {num_splits!r}"
        )
    n = operator.index(num_splits)  # type: ignore[arg-type]
    if not 0 <= n <= MAX_NUM_SPLITS:
        raise InputError(
            f"num_splits must be in 0..{MAX_NUM_SPLITS} (0: chosen by flash_attn, 1: no "
            f"split); got {n}"
        )
    return n


def _check_cache_layout(name: str, cache: torch.Tensor) -> None:
    if cache.stride(-1) != 1:
        raise InputError(
            f"{name} must have a contiguous last dimension (stride 1), since the new keys "
            f"are written into it in place; got strides {tuple(cache.stride())}"
        )


def _check_page_size(page_size: int) -> None:
    if page_size <= 0 or page_size % PAGE_SIZE_MULTIPLE != 0:
        raise InputError(
            f"the page size (dim 1 of the paged k_cache, {PAGED_LAYOUT}) must be a positive "
            f"multiple of {PAGE_SIZE_MULTIPLE}; got {page_size}"
        )


def _check_rotary(
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    has_new_kv: bool,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    """Rows of the rotary tables (0 without rotary)."""
    if rotary_cos is None and rotary_sin is None:
        return 0
    if rotary_cos is None or rotary_sin is None:
        given = "rotary_cos" if rotary_cos is not None else "rotary_sin"
        raise InputError(
            f"{given} was given without its partner: pass both rotary_cos and rotary_sin"
        )
    if not has_new_kv:
        raise InputError(
            "rotary_cos and rotary_sin rotate the new k (and q): they need k and v to be passed too"
        )
    layout = "(seqlen_ro, rotary_dim / 2)"
    _check_rank("rotary_cos", rotary_cos, 2, layout)
    _check_rank("rotary_sin", rotary_sin, 2, layout)
    if _shape(rotary_cos) != _shape(rotary_sin):
        raise InputError(
            f"rotary_cos and rotary_sin must have the same shape {layout}; got "
            f"{_shape(rotary_cos)} and {_shape(rotary_sin)}"
        )
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if t.dtype not in (torch.float32, dtype):
            raise InputError(f"{name} must be float32 or q's dtype ({dtype}); got {t.dtype}")
    rows, half = rotary_cos.shape
    if half < 1 or 2 * half > head_dim:
        raise InputError(
            f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * half} must be in 2..head_dim ({head_dim})"
        )
    return rows


def _kvcache_fast(
    q: object,
    k_cache: object,
    v_cache: object,
    k: object,
    v: object,
    cache_seqlens: object,
    block_table: object,
) -> CacheShape | None:
    """check_kvcache's shape of the common call, read in a few attribute lookups: a
    dense or paged cache, new k and v or none, cache_seqlens an int32 (batch,) tensor
    (or None without k and v), and no rotary tables, cache_batch_idx, cache_leftpad or
    alibi_slopes (the caller sees to those). None where any check might fail:
    check_kvcache then runs them one by one and names what is wrong. (Decode calls
    this once a layer and token.)"""
    if not (
        isinstance(q, torch.Tensor)
        and isinstance(k_cache, torch.Tensor)
        and isinstance(v_cache, torch.Tensor)
    ):
        return None
    qs, cs = q.shape, k_cache.shape
    if len(qs) != 4 or len(cs) != 4 or v_cache.shape != cs:
        return None
    batch, seqlen_q, nheads, head_dim = qs
    cache_rows, cache_len, nheads_k = cs[0], cs[1], cs[2]
    dtype = q.dtype
    if not (
        batch > 0
        and k_cache.stride(-1) == 1
        and v_cache.stride(-1) == 1
        and _heads_fast(q, k_cache, v_cache, nheads, nheads_k, head_dim, cs[3])
    ):
        return None
    seqlen_new = 0
    if k is not None or v is not None:
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            return None
        ks = k.shape
        if not (
            len(ks) == 4
            and v.shape == ks
            and k.dtype is dtype
            and v.dtype is dtype
            and ks[0] == batch
            and ks[2] == nheads_k
            and ks[3] == head_dim
        ):
            return None
        seqlen_new = ks[1]
        if not isinstance(cache_seqlens, torch.Tensor):
            return None  # an int (range checks) or None (refused): check_kvcache
    if cache_seqlens is not None and not (
        isinstance(cache_seqlens, torch.Tensor)
        and cache_seqlens.dtype is torch.int32
        and cache_seqlens.shape == (batch,)
    ):
        return None
    if block_table is None:
        if cache_rows < batch:
            return None
        return CacheShape(
            batch, seqlen_q, nheads, nheads_k, head_dim, seqlen_new, cache_rows, 0, 0,
            cache_len, 0, dtype,
        )  # fmt: skip
    if not (
        isinstance(block_table, torch.Tensor)
        and block_table.dtype is torch.int32
        and len(block_table.shape) == 2
        and block_table.shape[0] == batch
        and cache_len > 0
        and cache_len % PAGE_SIZE_MULTIPLE == 0
    ):
        return None
    pages_per_seq = block_table.shape[1]
    return CacheShape(
        batch, seqlen_q, nheads, nheads_k, head_dim, seqlen_new, cache_rows, cache_len,
        pages_per_seq, pages_per_seq * cache_len, 0, dtype,
    )  # fmt: skip


def check_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    cache_seqlens: int | torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
) -> CacheShape:
    """Shapes, ranks and dtypes of flash_attn_with_kvcache's arguments."""
    if (
        rotary_cos is None
        and rotary_sin is None
        and cache_batch_idx is None
        and cache_leftpad is None
        and alibi_slopes is None
    ):
        shape = _kvcache_fast(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
        if shape is not None:
            return shape
    # the checks in turn, raising at the first that fails
    paged = block_table is not None
    layout = PAGED_LAYOUT if paged else CACHE_LAYOUT
    _check_rank("q", q, 4, "(batch, seqlen_q, nheads, head_dim)")
    _check_rank("k_cache", k_cache, 4, layout)
    _check_rank("v_cache", v_cache, 4, layout)
    _check_dtypes(q, k_cache, v_cache)
    nheads, nheads_k, head_dim = _check_heads(q, k_cache, v_cache, layout)
    _check_cache_layout("k_cache", k_cache)
    _check_cache_layout("v_cache", v_cache)
    batch, seqlen_q = q.shape[:2]
    if batch <= 0:
        raise InputError(f"batch size must be positive; got {batch}")

    if (k is None) != (v is None):
        given = "k" if k is not None else "v"
        raise InputError(f"{given} was given without its partner: pass both k and v, or neither")
    seqlen_new = 0
    if k is not None and v is not None:
        new_layout = "(batch, seqlen_new, nheads_k, head_dim)"
        _check_rank("k", k, 4, new_layout)
        _check_rank("v", v, 4, new_layout)
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise InputError(
                f"k and v must have q's dtype ({q.dtype}); got k {k.dtype}, v {v.dtype}"
            )
        k_shape = k.shape
        if k_shape != v.shape or k_shape[0] != batch or k_shape[2:] != (nheads_k, head_dim):
            raise InputError(
                f"k and v must have shape {new_layout} = ({batch}, seqlen_new, {nheads_k}, "
                f"{head_dim}); got k {_shape(k)} and v {_shape(v)}"
            )
        seqlen_new = k_shape[1]
        if cache_seqlens is None:
            raise InputError(
                "k and v are appended at cache_seqlens: pass cache_seqlens (an int, or an "
                "int32 tensor of shape (batch,)) with them"
            )

    if isinstance(cache_seqlens, torch.Tensor):
        _check_index("cache_seqlens", cache_seqlens, (batch,), "(batch,)")
    elif cache_seqlens is not None:
        if isinstance(cache_seqlens, bool) or not hasattr(cache_seqlens, "__index__"):
            raise InputError(
                "cache_seqlens must be an int, an int32 tensor of shape (batch,) or None; "
                f"got {type(cache_seqlens).__name__}"
            )
        if operator.index(cache_seqlens) < 0:
            raise InputError(f"cache_seqlens must be >= 0; got {cache_seqlens}")

    if paged:
        assert block_table is not None
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise InputError(
                "block_table must be an int32 tensor of shape (batch, pages_per_seq); got "
                + (
                    f"shape {_shape(block_table)}"
                    if isinstance(block_table, torch.Tensor)
                    else type(block_table).__name__
                )
            )
        _check_index("block_table", block_table, (batch, block_table.shape[1]),
                     "(batch, pages_per_seq)")  # fmt: skip
        page_size = k_cache.shape[1]
        _check_page_size(page_size)
        pages_per_seq = block_table.shape[1]
        capacity = pages_per_seq * page_size
        if cache_batch_idx is not None:
            raise InputError(
                "cache_batch_idx cannot be combined with block_table: the block table "
                "already maps each sequence to its pages"
            )
        if cache_leftpad is not None:
            raise InputError(
                "cache_leftpad cannot be combined with block_table (as in flash_attn 2.x): "
                "start each sequence at key 0 of its first page"
            )
    else:
        page_size = pages_per_seq = 0
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            _check_index("cache_batch_idx", cache_batch_idx, (batch,), "(batch,)")
        elif k_cache.shape[0] < batch:
            raise InputError(
                f"k_cache has {k_cache.shape[0]} rows (dim 0 of {CACHE_LAYOUT}), fewer than "
                f"q's batch size {batch}; pass cache_batch_idx to map sequences to rows"
            )
        if cache_leftpad is not None:
            _check_index("cache_leftpad", cache_leftpad, (batch,), "(batch,)")

    rotary_rows = _check_rotary(rotary_cos, rotary_sin, seqlen_new > 0, head_dim, q.dtype)
    _check_alibi(alibi_slopes, batch, nheads)
    shape = CacheShape(
        batch=batch,
        seqlen_q=seqlen_q,
        nheads=nheads,
        nheads_k=nheads_k,
        head_dim=head_dim,
        seqlen_new=seqlen_new,
        cache_rows=k_cache.shape[0],
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        capacity=capacity,
        rotary_rows=rotary_rows,
        dtype=q.dtype,
    )
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        # a plain value: checked whatever FLASH_ATTN_KVCACHE_CHECKS says (no device sync)
        n = operator.index(cache_seqlens)
        _check_seqlens_range(shape, n, n, "cache_seqlens")
    return shape


def check_varlen_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_table: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
) -> CacheShape:
    """flash_attn_varlen_func with block_table: q (total_q, nheads, d), k and v paged."""
    _check_rank("q", q, 3, "(total_q, nheads, head_dim)")
    _check_rank("k", k_cache, 4, PAGED_LAYOUT + " with block_table")
    _check_rank("v", v_cache, 4, PAGED_LAYOUT + " with block_table")
    _check_dtypes(q, k_cache, v_cache)
    nheads, nheads_k, head_dim = _check_heads(q, k_cache, v_cache, PAGED_LAYOUT)
    batch = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    if _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k) != batch:
        raise InputError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1); got "
            f"{batch + 1} and {cu_seqlens_k.shape[0]}"
        )
    seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise InputError("block_table must be an int32 tensor of shape (batch, pages_per_seq)")
    _check_index("block_table", block_table, (batch, block_table.shape[1]),
                 "(batch, pages_per_seq)")  # fmt: skip
    for name, t in (("k", k_cache), ("v", v_cache)):
        if t.stride(-1) != 1:
            raise InputError(f"the paged {name} must have a contiguous last dimension")
    page_size = k_cache.shape[1]
    _check_page_size(page_size)
    _check_alibi(alibi_slopes, batch, nheads)
    return CacheShape(
        batch=batch,
        seqlen_q=seqlen_q,
        nheads=nheads,
        nheads_k=nheads_k,
        head_dim=head_dim,
        seqlen_new=0,
        cache_rows=k_cache.shape[0],
        page_size=page_size,
        pages_per_seq=block_table.shape[1],
        capacity=block_table.shape[1] * page_size,
        rotary_rows=0,
        dtype=q.dtype,
    )


# --- 2. values (one device sync) ------------------------------------------------


CHECKS_ENV = "FLASH_ATTN_KVCACHE_CHECKS"


def values_checkable(device: torch.device) -> bool:
    """Whether to check the index values (one device sync per call). False while a
    CUDA graph is being captured (reading a value would break the capture) and when
    FLASH_ATTN_KVCACHE_CHECKS=0: a decode loop that trusts its indices saves the sync
    (as upstream, which never checks: then a bad index reads or writes out of bounds)."""
    if os.environ.get(CHECKS_ENV, "1") == "0":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def device_check_bound(shape: CacheShape, q_positions: int) -> int | None:
    """The largest valid key count of a sequence (cache_seqlens + seqlen_new) for the
    op's device check (fwd_kv's max_keys), or None when no count is valid (then the
    host check gives the message). The capacity, and where rotary tables are given
    (they come with k, so with cache_seqlens), what they cover (check_cache_values'
    rule: cache_seqlens + max(seqlen_new, q_positions) <= their rows)."""
    bound = shape.capacity
    if shape.rotary_rows:
        reach = max(shape.seqlen_new, q_positions) - shape.seqlen_new  # past the last key
        bound = min(bound, shape.rotary_rows - reach)
    return bound if bound >= shape.seqlen_new else None


_VERDICTS = threading.local()


def verdict_buffer(device: torch.device) -> torch.Tensor:
    """This thread's int32 cell in page-locked memory (for a CUDA call) that fwd_kv's
    device check writes its verdict to. One a thread is enough: the op returns only once
    the verdict is in, and the caller reads it before the next call."""
    pinned = device.type == "cuda"
    cells: dict[bool, torch.Tensor] | None = getattr(_VERDICTS, "cells", None)
    if cells is None:
        cells = _VERDICTS.cells = {}
    cell = cells.get(pinned)
    if cell is None:
        cell = cells[pinned] = torch.empty(1, dtype=torch.int32, pin_memory=pinned)
    return cell


def check_cache_values(
    shape: CacheShape,
    seqused_k: torch.Tensor | None,
    cache_seqlens: int | torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    q_positions: int,
    seqlens_name: str = "cache_seqlens",
) -> int:
    """Check the index values; return the largest key count of a sequence.

    seqused_k: the keys each sequence has after the append (cache_seqlens +
    seqlen_new), or None (an int cache_seqlens says them; without cache_seqlens
    every sequence fills its cache row). q_positions: how far
    past cache_seqlens the rotary tables are read (seqlen_q for causal/local
    rotary, else 1). Reads the values of the tensors in one copy to the host (none
    when cache_seqlens is an int and there is no other index tensor).
    """
    # Everything read comes back in one copy: the (batch,) index tensors whole (their
    # min and max taken here: one device op fewer than reducing them there), a flag per
    # other check.
    parts: list[torch.Tensor] = []
    seqlens_is_tensor = isinstance(cache_seqlens, torch.Tensor)
    if seqlens_is_tensor:
        parts.append(cache_seqlens)  # type: ignore[arg-type]
    if cache_batch_idx is not None:
        parts.append(cache_batch_idx)
    if cache_leftpad is not None:
        upper: torch.Tensor | int = shape.capacity
        if seqused_k is not None:
            upper = seqused_k
        elif cache_seqlens is not None:
            upper = operator.index(cache_seqlens) + shape.seqlen_new  # type: ignore[arg-type]
        parts.append(((cache_leftpad < 0) | (cache_leftpad > upper)).any().view(1))
    if block_table is not None:
        parts.append(_bad_pages(shape, seqused_k, block_table).any().view(1))
    values: list[int] = []
    if parts:
        values = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
    batch = shape.batch

    most = shape.capacity
    if cache_seqlens is not None:
        if seqlens_is_tensor:
            lo, hi = min(values[:batch]), max(values[:batch])
            values = values[batch:]
        else:
            lo = hi = operator.index(cache_seqlens)  # type: ignore[arg-type]
        _check_seqlens_range(shape, lo, hi, seqlens_name)
        if shape.rotary_rows:
            check_rotary_rows(shape, hi, q_positions)
        most = hi + shape.seqlen_new
    if cache_batch_idx is not None:
        lo, hi = min(values[:batch]), max(values[:batch])
        values = values[batch:]
        if lo < 0 or hi >= shape.cache_rows:
            raise InputError(
                f"cache_batch_idx holds {lo if lo < 0 else hi}: each entry must index a row "
                f"of k_cache, 0..{shape.cache_rows - 1}"
            )
    if cache_leftpad is not None:
        bad = values[0]
        values = values[1:]
        if bad:
            raise InputError(
                "cache_leftpad must be in 0..cache_seqlens + seqlen_new for every sequence "
                "(its keys are [cache_leftpad, cache_seqlens + seqlen_new)); got "
                f"cache_leftpad {cache_leftpad.tolist()}"
                + ("" if seqused_k is None
                   else f" with cache_seqlens + seqlen_new = {seqused_k.tolist()}")
            )  # fmt: skip
    if block_table is not None and values[0]:
        _raise_bad_page(shape, seqused_k, block_table)
    return most


def _check_seqlens_range(shape: CacheShape, lo: int, hi: int, name: str) -> None:
    if lo < 0:
        raise InputError(f"{name} must be >= 0 for every sequence; got {lo}")
    if hi + shape.seqlen_new > shape.capacity:
        where = (
            f"block_table's capacity: pages_per_seq ({shape.pages_per_seq}) x page_size "
            f"({shape.page_size}) = {shape.capacity} keys"
            if shape.paged
            else f"the cache: seqlen_cache (dim 1 of k_cache) is {shape.capacity}"
        )
        total = hi + shape.seqlen_new
        keys = f"{name} + seqlen_new = {hi} + {shape.seqlen_new} = {total}"
        bound = f"{name} + seqlen_new"
        if not shape.seqlen_new:
            keys, bound = f"{name} = {hi}", name
        raise InputError(
            f"{keys} keys for a sequence exceeds {where}; valid: {bound} <= {shape.capacity}"
        )


def check_rotary_rows(shape: CacheShape, hi: int, q_positions: int) -> None:
    needed = hi + max(shape.seqlen_new, q_positions)
    if needed > shape.rotary_rows:
        raise InputError(
            f"rotary_cos and rotary_sin have {shape.rotary_rows} rows, too few for positions "
            f"up to cache_seqlens + {max(shape.seqlen_new, q_positions)} = {needed} "
            f"(largest cache_seqlens {hi}; new k at cache_seqlens + 0..seqlen_new - 1"
            + (", q at cache_seqlens + 0..seqlen_q - 1 (causal or local)" if q_positions > 1
               else "")
            + f"); valid: at least {needed} rows"
        )  # fmt: skip


def _pages_used(shape: CacheShape, seqused_k: torch.Tensor | None) -> torch.Tensor | int:
    if seqused_k is None:
        return shape.pages_per_seq
    return (seqused_k.long() + shape.page_size - 1) // shape.page_size


def _bad_pages(
    shape: CacheShape, seqused_k: torch.Tensor | None, block_table: torch.Tensor
) -> torch.Tensor:
    """(batch, pages_per_seq) bool: entries the call reads or writes that are not a
    page of the pool. Entries past a sequence's last page are not read (they may be
    -1, as transformers pads them)."""
    used = _pages_used(shape, seqused_k)
    column = torch.arange(shape.pages_per_seq, device=block_table.device)
    if isinstance(used, torch.Tensor):
        read = column[None, :] < used[:, None]
    else:
        read = (column < used)[None, :].expand_as(block_table)
    out_of_pool = (block_table < 0) | (block_table >= shape.cache_rows)
    return out_of_pool & read


def _raise_bad_page(
    shape: CacheShape, seqused_k: torch.Tensor | None, block_table: torch.Tensor
) -> None:
    b, j = (int(i) for i in _bad_pages(shape, seqused_k, block_table).nonzero()[0].tolist())
    raise InputError(
        f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page of the pool: the "
        f"paged k_cache has {shape.cache_rows} pages, so the entries a sequence uses "
        f"(its first ceil(keys / page_size) columns) must be in 0..{shape.cache_rows - 1}"
    )
