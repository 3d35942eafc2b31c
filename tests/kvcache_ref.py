"""The KV-cache cases and their reference, shared by the CPU tests (over the stand-in)
and the GPU tests (over the kernels).

The reference is written like upstream's test_flash_attn_kvcache: the cache updated by
hand (the new k rotated at positions cache_seqlens + i; q at cache_seqlens + i when
causal or local, else at cache_seqlens), then attention of each sequence's queries over
its keys [cache_leftpad, cache_seqlens + seqlen_new) of the updated cache row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from reference import attention_ref


def rotate_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    interleaved: bool,
) -> torch.Tensor:  # fmt: skip
    """x (b, s, h, d) with row i of sequence b rotated by the angle of row
    positions[b, i] of the tables: each feature pair (a, c) becomes
    (a cos - c sin, a sin + c cos), in float64."""
    r = 2 * cos.shape[1]
    part = x[..., :r].double()
    if interleaved:
        a, c = part[..., 0::2], part[..., 1::2]
    else:
        a, c = part[..., : r // 2], part[..., r // 2 :]
    co = cos.double()[positions][:, :, None, :]
    si = sin.double()[positions][:, :, None, :]
    a2, c2 = a * co - c * si, a * si + c * co
    rotated = torch.stack((a2, c2), -1).flatten(-2) if interleaved else torch.cat((a2, c2), -1)
    return torch.cat((rotated.to(x.dtype), x[..., r:]), dim=-1)


@dataclass(frozen=True)
class Case:
    batch: int = 3
    seqlen_q: int = 1
    seqlen_new: int = 1  # 0: no k, v
    seqlen_cache: int = 40
    nheads: int = 4
    nheads_k: int = 2
    head_dim: int = 32
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    batch_idx: bool = False
    leftpad: bool = False
    seqlens_int: bool = False
    rotary: str = ""  # "", "interleaved", "neox"
    rotary_dim: int = 16
    page_size: int = 0  # 0: dense
    num_splits: int = 0


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    cache_seqlens: int | torch.Tensor
    kwargs: dict[str, Any]
    seqlens: torch.Tensor  # (batch,) cache_seqlens as a tensor
    rows: torch.Tensor | None  # dense: the cache row of each sequence
    leftpad: torch.Tensor  # (batch,) zeros when not given

    def to(self, device: str) -> Inputs:
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        moved = {f.name: move(getattr(self, f.name)) for f in fields(self)}
        moved["kwargs"] = {name: move(x) for name, x in self.kwargs.items()}
        return Inputs(**moved)


def make_inputs(
    c: Case, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float16
) -> Inputs:
    """Random inputs of case c (drawn on the CPU, then moved: the same on every device)."""
    inp = _make_inputs(c, seed, dtype)
    return inp if device == "cpu" else inp.to(device)


def _make_inputs(c: Case, seed: int, dtype: torch.dtype) -> Inputs:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    q = randn(c.batch, c.seqlen_q, c.nheads, c.head_dim)
    k = v = None
    if c.seqlen_new:
        k = randn(c.batch, c.seqlen_new, c.nheads_k, c.head_dim)
        v = randn(c.batch, c.seqlen_new, c.nheads_k, c.head_dim)
    room = c.seqlen_cache - max(c.seqlen_new, c.seqlen_q if c.rotary else 0)
    low = 0 if c.seqlen_new else 1
    if c.seqlens_int:
        seqlens = torch.full((c.batch,), room - 3, dtype=torch.int32)
    else:
        seqlens = torch.randint(low, room + 1, (c.batch,), generator=g, dtype=torch.int32)
        seqlens[0] = room  # one sequence ends at the last key of the cache
    kwargs: dict[str, Any] = {"causal": c.causal, "window_size": c.window, "softcap": c.softcap}
    kwargs["num_splits"] = c.num_splits
    rows = None
    if c.page_size:
        pages_per_seq = c.seqlen_cache // c.page_size
        num_pages = pages_per_seq * c.batch + 3
        k_cache = randn(num_pages, c.page_size, c.nheads_k, c.head_dim)
        v_cache = randn(num_pages, c.page_size, c.nheads_k, c.head_dim)
        perm = torch.randperm(num_pages, generator=g)[: c.batch * pages_per_seq]
        kwargs["block_table"] = perm.view(c.batch, pages_per_seq).to(torch.int32)
    else:
        batch_cache = c.batch + 2 if c.batch_idx else c.batch
        k_cache = randn(batch_cache, c.seqlen_cache, c.nheads_k, c.head_dim)
        v_cache = randn(batch_cache, c.seqlen_cache, c.nheads_k, c.head_dim)
        rows = torch.arange(c.batch)
        if c.batch_idx:
            rows = torch.randperm(batch_cache, generator=g)[: c.batch]
            kwargs["cache_batch_idx"] = rows.to(torch.int32)
    leftpad = torch.zeros(c.batch, dtype=torch.int32)
    if c.leftpad:
        picks = [int(torch.randint(0, int(s) + 1, (1,), generator=g)) for s in seqlens]
        leftpad = torch.tensor(picks, dtype=torch.int32)
        kwargs["cache_leftpad"] = leftpad
    if c.alibi:
        kwargs["alibi_slopes"] = torch.rand(c.batch, c.nheads, generator=g) * 0.3
    if c.rotary:
        angle = torch.rand(c.seqlen_cache, c.rotary_dim // 2, generator=g) * 2 * math.pi
        kwargs["rotary_cos"], kwargs["rotary_sin"] = angle.cos().to(dtype), angle.sin().to(dtype)
        kwargs["rotary_interleaved"] = c.rotary == "interleaved"
    cache_seqlens: int | torch.Tensor = int(seqlens[0]) if c.seqlens_int else seqlens
    return Inputs(q, k_cache, v_cache, k, v, cache_seqlens, kwargs, seqlens, rows, leftpad)


def logical_cache(c: Case, inp: Inputs, k_cache: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen_cache, nheads_k, d): each sequence's cache row, in key order."""
    if c.page_size:
        table = inp.kwargs["block_table"].long()
        return k_cache[table].flatten(1, 2)
    assert inp.rows is not None
    return k_cache[inp.rows]


@dataclass
class Expected:
    out: torch.Tensor  # (batch, seqlen_q, nheads, d), q's dtype
    lse: torch.Tensor  # (batch, nheads, seqlen_q) float32
    k_cache: torch.Tensor  # the caches after the append
    v_cache: torch.Tensor
    written: torch.Tensor  # (dim 0, dim 1) of the cache: bool, True where a key was appended


def updated_caches(
    c: Case, inp: Inputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q rotated, k_cache, v_cache, written) after the append, as the reference makes them."""
    k_cache, v_cache = inp.k_cache.clone(), inp.v_cache.clone()
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    q = inp.q
    dev = q.device
    local = c.causal or c.window != (-1, -1)
    if c.seqlen_new:
        assert inp.k is not None and inp.v is not None
        k_new = inp.k
        new_positions = inp.seqlens.long()[:, None] + torch.arange(c.seqlen_new, device=dev)
        if c.rotary:
            cos, sin = inp.kwargs["rotary_cos"], inp.kwargs["rotary_sin"]
            inter = c.rotary == "interleaved"
            k_new = rotate_ref(inp.k, cos, sin, new_positions, inter)
            steps = torch.arange(c.seqlen_q, device=dev) if local else torch.zeros(
                c.seqlen_q, dtype=torch.long, device=dev)  # fmt: skip
            q = rotate_ref(inp.q, cos, sin, inp.seqlens.long()[:, None] + steps, inter)
        if c.page_size:
            table = inp.kwargs["block_table"].long()
            rows = table.gather(1, new_positions // c.page_size)
            slots = new_positions % c.page_size
        else:
            assert inp.rows is not None
            rows = inp.rows.to(dev).long()[:, None].expand_as(new_positions)
            slots = new_positions
        for b in range(c.batch):  # one by one, as the docstring of the API says
            for i in range(c.seqlen_new):
                slot = (int(rows[b, i]), int(slots[b, i]))
                k_cache[slot] = k_new[b, i]
                v_cache[slot] = inp.v[b, i]
                written[slot] = True
    return q, k_cache, v_cache, written


def expected(c: Case, inp: Inputs, upcast: bool = True) -> Expected:
    """The outputs and the caches as upstream's test computes them (upcast: in float32,
    else in the inputs' dtype)."""
    q, k_cache, v_cache, written = updated_caches(c, inp)
    keys_k, keys_v = logical_cache(c, inp, k_cache), logical_cache(c, inp, v_cache)
    outs, lses = [], []
    for b in range(c.batch):
        first, end = int(inp.leftpad[b]), int(inp.seqlens[b]) + c.seqlen_new
        slopes = inp.kwargs.get("alibi_slopes")
        out, lse = attention_ref(
            q[b : b + 1], keys_k[b : b + 1, first:end], keys_v[b : b + 1, first:end],
            causal=c.causal, window_size=c.window, softcap=c.softcap,
            alibi_slopes=None if slopes is None else slopes[b], upcast=upcast,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    return Expected(torch.cat(outs), torch.cat(lses), k_cache, v_cache, written)


def append_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    seqused_k: torch.Tensor | None,
    kv_batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
) -> None:
    """fwd_kv's append (flash_api.h, FlashAppendKvParams) written out row by row, in
    place: row i of entry b goes to key keys(b) - seqlen_new + i of its cache row
    (keys(b): seqused_k[b], else the row's capacity); a row whose key, cache row or page
    is out of range is skipped."""
    batch, seqlen_new = k_new.shape[0], k_new.shape[1]
    page_size = k_cache.shape[1]
    paged = block_table is not None
    capacity = block_table.shape[1] * page_size if paged else page_size
    for b in range(batch):
        keys = capacity if seqused_k is None else int(seqused_k[b])
        for i in range(seqlen_new):
            pos = keys - seqlen_new + i
            if not 0 <= pos < capacity:
                continue
            if paged:
                row, slot = int(block_table[b, pos // page_size]), pos % page_size
            else:
                row, slot = b if kv_batch_idx is None else int(kv_batch_idx[b]), pos
            if 0 <= row < k_cache.shape[0]:
                k_cache[row, slot] = k_new[b, i]
                v_cache[row, slot] = v_new[b, i]


def index_verdict_ref(
    k_cache: torch.Tensor,
    capacity: int,
    seqlen_new: int,
    max_keys: int,
    cu_seqlens_k: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    kv_batch_idx: torch.Tensor | None,
    leftpad_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
    batch: int,
) -> int:
    """fwd_kv's device index check (flash_api.h, flash_attn_kv_check) written out: the
    KV_BAD_* bits of the values that fail. capacity: the keys a cache row holds (paged:
    pages_per_seq x page_size; varlen: max_seqlen_k). Entry b's keys: seqused_k[b], else
    the length cu_seqlens_k gives, else the capacity; valid in [seqlen_new if seqused_k
    is given else 0, max_keys] (max_keys < 0 or past the capacity: the capacity)."""
    from flash_attn import _ops

    paged = block_table is not None
    page_size = k_cache.shape[1]
    bound = capacity if max_keys < 0 or max_keys > capacity else max_keys
    low = seqlen_new if seqused_k is not None else 0
    bad = 0
    for b in range(batch):
        if seqused_k is not None:
            keys = int(seqused_k[b])
        elif cu_seqlens_k is not None:
            keys = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        else:
            keys = capacity
        if not low <= keys <= bound:
            bad |= _ops.KV_BAD_KEYS
        if kv_batch_idx is not None and not 0 <= int(kv_batch_idx[b]) < k_cache.shape[0]:
            bad |= _ops.KV_BAD_ROW
        if leftpad_k is not None and not 0 <= int(leftpad_k[b]) <= keys:
            bad |= _ops.KV_BAD_LEFTPAD
        if paged:
            used = block_table[b, : max(0, -(-keys // page_size))]
            if bool(((used < 0) | (used >= k_cache.shape[0])).any()):
                bad |= _ops.KV_BAD_PAGE
    return bad


# Every way the cache is written: the op's fused append (dense, paged), the Python
# append_ before the op reads a copy (a padded head_dim; a paged prefill's gathered
# pages), each with and without rotary.
WRITE_PATHS = {
    "fused dense": Case(seqlen_q=2, seqlen_new=2),
    "fused dense rotary": Case(seqlen_q=2, seqlen_new=2, rotary="neox"),
    "fused dense batch_idx leftpad": Case(seqlen_q=2, seqlen_new=2, batch_idx=True, leftpad=True),
    # prefill-sized (10 row tiles a KV head): the check and the append before the main
    # kernel rather than the split kernel
    "fused dense prefill": Case(
        seqlen_q=40, seqlen_new=40, seqlen_cache=128, nheads=8, head_dim=64
    ),
    "fused dense prefill batch_idx leftpad rotary": Case(
        seqlen_q=40, seqlen_new=40, seqlen_cache=128, nheads=8, head_dim=128, batch_idx=True,
        leftpad=True, rotary="neox",
    ),
    "python append padded": Case(head_dim=20, seqlen_q=2, seqlen_new=2),
    "python append padded rotary": Case(
        head_dim=20, seqlen_q=2, seqlen_new=2, rotary="interleaved", rotary_dim=12
    ),
    "fused paged": Case(page_size=16, seqlen_cache=48, seqlen_q=2, seqlen_new=2),
    "fused paged rotary": Case(page_size=16, seqlen_cache=48, seqlen_q=2, seqlen_new=2,
                               rotary="neox"),
    "python append gathered pages": Case(
        page_size=16, seqlen_q=40, seqlen_new=40, seqlen_cache=64, nheads=8, nheads_k=2
    ),
    "python append gathered pages rotary": Case(
        page_size=16, seqlen_q=40, seqlen_new=40, seqlen_cache=64, nheads=8, nheads_k=2,
        rotary="neox",
    ),
}  # fmt: skip


def _too_long(c: Case) -> tuple[dict[str, Any], str]:
    """cache_seqlens one key past the cache for sequence 1, and the message it gets."""
    seqlens = make_inputs(c).seqlens.clone()
    seqlens[1] = c.seqlen_cache - c.seqlen_new + 1
    hi = int(seqlens.max())
    where = (
        f"block_table's capacity: pages_per_seq ({c.seqlen_cache // c.page_size}) x page_size "
        f"({c.page_size}) = {c.seqlen_cache} keys"
        if c.page_size
        else f"the cache: seqlen_cache (dim 1 of k_cache) is {c.seqlen_cache}"
    )
    message = (
        f"cache_seqlens + seqlen_new = {hi} + {c.seqlen_new} = {hi + c.seqlen_new} keys for a "
        f"sequence exceeds {where}; valid: cache_seqlens + seqlen_new <= {c.seqlen_cache}"
    )
    return {"cache_seqlens": seqlens}, message


def _negative(c: Case) -> tuple[dict[str, Any], str]:
    seqlens = make_inputs(c).seqlens.clone()
    seqlens[2] = -3
    return {"cache_seqlens": seqlens}, "cache_seqlens must be >= 0 for every sequence; got -3"


def _bad_page(c: Case) -> tuple[dict[str, Any], str]:
    """Sequence 1's first page (always read: it holds the new keys or those before them)
    out of the pool."""
    inp = make_inputs(c)
    table = inp.kwargs["block_table"].clone()
    pool = inp.k_cache.shape[0]
    table[1, 0] = pool
    message = (
        f"block_table[1, 0] = {pool} is not a page of the pool: the paged k_cache has {pool} "
        f"pages, so the entries a sequence uses (its first ceil(keys / page_size) columns) "
        f"must be in 0..{pool - 1}"
    )
    return {"block_table": table}, message


BAD_VALUES = [
    (path, bad)
    for path, c in WRITE_PATHS.items()
    for bad in (_too_long, _negative, *((_bad_page,) if c.page_size else ()))
]
