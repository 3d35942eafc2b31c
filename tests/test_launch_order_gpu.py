"""The attention kernels read their inputs only after the kernel before them is done.

On compute capability 9.0 and up the attention kernels (the training kernels, the split
kernel and its combine) go out as programmatic dependent launches: their CTAs may be
placed while the kernel before them on the stream still runs, and each waits for that
kernel before it reads anything (tile.cuh, call_aborted). Here the inputs of each call
are written by a kernel that lets the next one start at once
(griddepcontrol.launch_dependents) and stores its output a while later, into a buffer
first filled with NaN: a kernel that read before its wait would see NaN. Elsewhere the
launches are plain and the tests check the same results. Both kernel paths
(FLASH_ATTN_DISABLE_SM90=1 too); poisoned memory before each case (gpu_poison.py).

What they catch (H200, 2026-11-30): a build without the wait failed the dense and decode
cases on both paths, twice each (8 of 16). The KV-cache cases passed it: their first
kernel, the append, is a plain launch that waits for the writer, so they check the
append -> attention chain after it. With a writer that does not signal early (a matmul,
or one whose CTAs fill the SMs) the next grid started only as the writer ended, and a
build without the wait passed every case.
"""

from __future__ import annotations

import pytest
import torch
from reference import attention_ref
from test_split_kv_gpu import check, compiled, ops, repoison

pytestmark = pytest.mark.gpu

try:
    import triton
    import triton.language as tl
except ImportError:  # the tests skip
    triton = None

if triton is not None:

    @triton.jit
    def _late_copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        # a few programs (room left on every SM), each walking blocks of the buffer
        for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(src + offs, mask=mask)
            # let the next grid launch now, then sleep a few us an element before the store
            x = tl.inline_asm_elementwise(
                "griddepcontrol.launch_dependents;\nnanosleep.u32 4000;\nmov.b32 $0, $1;",
                "=r,r",
                [x],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
            tl.store(dst + offs, x, mask=mask)


def written_late(*values: torch.Tensor) -> list[torch.Tensor]:
    """Copies of values (one dtype), all written by one late-writing kernel, the last on
    the stream. The buffer holds them last first: the writer goes from its start, so the
    first value (what the call's first kernel reads first) is written last."""
    if triton is None:
        pytest.skip("triton is not installed")
    sizes = [v.numel() for v in values]
    total = sum(sizes) + sum(sizes) % 2  # whole int32 words
    src = torch.zeros(total, device=values[0].device, dtype=values[0].dtype)
    starts = [total - sum(sizes[: i + 1]) for i in range(len(values))]
    for v, at, n in zip(values, starts, sizes):
        src[at : at + n] = v.reshape(-1)
    out = torch.full_like(src, float("nan"))
    words = total // 2
    block = 1024
    _late_copy_kernel[(min(triton.cdiv(words, block), 64),)](
        src.view(torch.int32), out.view(torch.int32), words, BLOCK=block, num_warps=4
    )  # nothing may run between this and the call
    return [out[at : at + n].view(v.shape) for v, at, n in zip(values, starts, sizes)]


def warm_up(call) -> None:
    """One call on the plain inputs first: what a process's first call does once (the
    environment check, the kernel's shared-memory limit) is not what is under test."""
    call()
    torch.cuda.synchronize()


def references(q, k, v, **kw):
    return attention_ref(q, k, v, **kw)[0], attention_ref(q, k, v, upcast=False, **kw)[0]


DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_forward_reads_after_the_kernel_before(dtype):
    ops()
    if not compiled(128, dtype):
        pytest.skip("head dim 128 not in this build")
    import flash_attn

    repoison()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1024, 16, 128, device="cuda", dtype=dtype) for _ in range(3))
    ref, ref_lo = references(q, k, v, causal=True)
    warm_up(lambda: flash_attn.flash_attn_func(q, k, v, causal=True))
    q2, k2, v2 = written_late(q, k, v)
    out = flash_attn.flash_attn_func(q2, k2, v2, causal=True)
    check("dense", out, ref, ref_lo)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [0, 1, 8])
def test_decode_reads_after_the_kernel_before(dtype, num_splits):
    ops()
    if not compiled(128, dtype):
        pytest.skip("head dim 128 not in this build")
    import flash_attn

    repoison()
    torch.manual_seed(1)
    q = torch.randn(4, 1, 32, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(4, 4096, 8, 128, device="cuda", dtype=dtype) for _ in range(2))
    ref, ref_lo = references(q, k, v, causal=True)
    warm_up(lambda: flash_attn.flash_attn_with_kvcache(q, k, v, num_splits=num_splits, causal=True))
    q2, k2, v2 = written_late(q, k, v)
    out = flash_attn.flash_attn_with_kvcache(q2, k2, v2, num_splits=num_splits, causal=True)
    check(f"decode num_splits={num_splits}", out, ref, ref_lo)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("seqlen_new", [1, 300])
def test_kvcache_append_reads_after_the_kernel_before(dtype, paged, seqlen_new):
    """The call's first kernel reads k and v right after the late writer: the append, then
    the attention reading the cache right after it; or, for a dense prefill on the sm_90
    path, the attention reading k_new and v_new itself and writing them into the cache
    (whose keys are checked at the end, as the next kernel on the stream sees them)."""
    ops()
    if not compiled(128, dtype):
        pytest.skip("head dim 128 not in this build")
    import flash_attn

    repoison()
    torch.manual_seed(2)
    batch, cached, cap, h, hk, d, page = 3, 700, 1024, 16, 4, 128, 16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype)

    q = randn(batch, seqlen_new, h, d)
    k_new, v_new = randn(batch, seqlen_new, hk, d), randn(batch, seqlen_new, hk, d)
    k_cache, v_cache = randn(batch, cap, hk, d), randn(batch, cap, hk, d)
    keys = cached + seqlen_new
    k_all = torch.cat([k_cache[:, :cached], k_new], 1)
    v_all = torch.cat([v_cache[:, :cached], v_new], 1)
    ref, ref_lo = references(q, k_all, v_all, causal=True)
    kw: dict = {"cache_seqlens": cached}
    if paged:
        per_seq = cap // page
        order = torch.randperm(batch * per_seq, device="cuda")
        table = order.view(batch, per_seq).to(torch.int32)
        pool_k = torch.empty(batch * per_seq, page, hk, d, device="cuda", dtype=dtype)
        pool_v = torch.empty_like(pool_k)
        pool_k[table.long().view(-1)] = k_cache.view(batch * per_seq, page, hk, d)
        pool_v[table.long().view(-1)] = v_cache.view(batch * per_seq, page, hk, d)
        k_cache, v_cache = pool_k, pool_v
        kw = {"cache_seqlens": torch.full((batch,), cached, device="cuda", dtype=torch.int32),
              "block_table": table}  # fmt: skip
    warm_up(
        lambda: flash_attn.flash_attn_with_kvcache(
            q, k_cache.clone(), v_cache.clone(), k_new, v_new, causal=True, **kw
        )
    )
    # k and v last in the writer's buffer: the append, the first kernel, reads them
    v2, k2, q2 = written_late(v_new, k_new, q)
    out = flash_attn.flash_attn_with_kvcache(q2, k_cache, v_cache, k2, v2, causal=True, **kw)
    check(f"kvcache paged={paged} seqlen_new={seqlen_new}", out, ref, ref_lo)
    if paged:
        rows = table.long()[:, :, None] * page + torch.arange(page, device="cuda")
        got = k_cache.view(-1, hk, d)[rows.view(batch, -1)][:, :keys]
    else:
        got = k_cache[:, :keys]
    assert torch.equal(got, k_all), "the appended keys"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("seqlen_new", [1, 300])
def test_kvcache_index_values_read_after_the_kernel_before(dtype, paged, seqlen_new):
    """cache_seqlens (and block_table) written late: the call's first kernel is the index
    check, itself a dependent launch, which reads them first; the kernels after it read
    cache_seqlens as the key count before the append (they add seqlen_new). Read before
    the writer's store, a value is NaN's bits (0x7FC07FC0): refused, or keys far out."""
    ops()
    if not compiled(128, dtype):
        pytest.skip("head dim 128 not in this build")
    import flash_attn

    repoison()
    torch.manual_seed(3)
    batch, cap, h, hk, d, page = 3, 1024, 16, 4, 128, 16
    cached = torch.tensor([700, 0, 1024 - seqlen_new], dtype=torch.int32, device="cuda")

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype)

    q = randn(batch, seqlen_new, h, d)
    k_new, v_new = randn(batch, seqlen_new, hk, d), randn(batch, seqlen_new, hk, d)
    k_cache, v_cache = randn(batch, cap, hk, d), randn(batch, cap, hk, d)
    k_all = [torch.cat([k_cache[b, : int(n)], k_new[b]]) for b, n in enumerate(cached.tolist())]
    v_all = [torch.cat([v_cache[b, : int(n)], v_new[b]]) for b, n in enumerate(cached.tolist())]
    refs = [references(q[b : b + 1], k_all[b][None], v_all[b][None], causal=True)
            for b in range(batch)]  # fmt: skip
    table = None
    if paged:
        per_seq = cap // page
        table = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).to(torch.int32)
        pool_k = torch.empty(batch * per_seq, page, hk, d, device="cuda", dtype=dtype)
        pool_v = torch.empty_like(pool_k)
        pool_k[table.long().view(-1)] = k_cache.view(batch * per_seq, page, hk, d)
        pool_v[table.long().view(-1)] = v_cache.view(batch * per_seq, page, hk, d)
        k_cache, v_cache = pool_k, pool_v

    def call(seqlens, tbl, kc, vc):
        return flash_attn.flash_attn_with_kvcache(
            q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=tbl, causal=True
        )

    warm_up(lambda: call(cached, table, k_cache.clone(), v_cache.clone()))
    # each int32 index value as two 16-bit elements of the late writer's buffer (it copies
    # 32-bit words)
    late = [cached] if table is None else [table, cached]
    got = written_late(*(t.view(dtype) for t in late))
    seqlens2 = got[-1].view(torch.int32)
    table2 = None if table is None else got[0].view(torch.int32)
    out = call(seqlens2, table2, k_cache, v_cache)
    for b in range(batch):
        check(f"kvcache index values paged={paged} seqlen_new={seqlen_new} entry {b}",
              out[b : b + 1], *refs[b])  # fmt: skip
        keys = int(cached[b]) + seqlen_new
        if paged:
            rows = table.long()[b, :, None] * page + torch.arange(page, device="cuda")
            stored = k_cache.view(-1, hk, d)[rows.view(-1)][:keys]
        else:
            stored = k_cache[b, :keys]
        assert torch.equal(stored, k_all[b]), f"the appended keys of entry {b}"
