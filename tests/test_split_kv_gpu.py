"""The split-KV forward and the KV-cache layouts at the op level, on a GPU.

``torch.ops.flash_attn.fwd_kv`` against plain PyTorch attention over each entry's
keys, gathered by hand: split counts (0 = the kernels' choice, 1, several, more
than there are key blocks), grouped query heads packed into one tile, paged caches
(page sizes 16 and 256, pages in random order), seqused_k, kv_batch_idx, leftpad_k,
varlen queries, masks, softcap and ALiBi; the LSE too. Decode-shaped calls
(seqlen_q * nheads / nheads_k <= 32) take the split kernel; longer queries over a
dense cache take the training kernels, which read the same fields (both paths:
the session script runs this file again with FLASH_ATTN_DISABLE_SM90=1). Each call
runs on poisoned memory (gpu_poison.py).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from gpu_poison import poison_cuda_cache, poison_enabled
from reference import attention_ref

pytestmark = pytest.mark.gpu


def ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from flash_attn import _ops

    if _ops.load_error():
        pytest.skip(f"flash_attn._C does not load: {_ops.load_error()}")
    if not hasattr(torch.ops.flash_attn, "fwd_kv"):
        pytest.skip("this build has no fwd_kv op")
    return _ops


def compiled(head_dim: int, dtype: torch.dtype) -> bool:
    from flash_attn import _ops

    info = _ops.build_info()
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return name in info.dtypes and any(h >= head_dim for h in info.head_dims)


def repoison() -> None:
    if poison_enabled():
        poison_cuda_cache()


def check(name: str, ours: torch.Tensor, ref: torch.Tensor, ref_lo: torch.Tensor) -> None:
    """|ours - ref| <= 2 |ref_lo - ref| + eps (+ an ulp at |ref|), the suite's rule."""
    ours, ref, ref_lo = ours.float(), ref.float(), ref_lo.float()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ulp = ref.abs().max().item() * 2**-7
    err = (ours - ref).abs().max().item()
    bound = 2 * (ref_lo - ref).abs().max().item() + 1e-4 + ulp
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


def reference(q_b, k_b, v_b, kw, slopes_b):
    """fp32 and low-precision references for one entry: q (1, sq, h, d), k/v (1, sk, hk, d)."""
    group = q_b.shape[2] // k_b.shape[2]
    k_r = k_b.repeat_interleave(group, dim=2)
    v_r = v_b.repeat_interleave(group, dim=2)
    kw = dict(kw, alibi_slopes=slopes_b)
    out, lse = attention_ref(q_b, k_r, v_r, **kw)
    out_lo, _ = attention_ref(q_b, k_r, v_r, upcast=False, **kw)
    return out, lse, out_lo


def window_args(kw: dict, sq: int, sk: int) -> tuple[int, int]:
    left, right = kw.get("window_size", (-1, -1))
    if kw.get("causal"):
        right = 0
    return left, right


MASKS = {
    "none": {},
    "causal": {"causal": True},
    "local": {"window_size": (37, 5)},
    "softcap": {"softcap": 8.0, "causal": True},
    "alibi": {"alibi": True},
}


def make_cache(layout: str, batch: int, cap: int, hk: int, d: int, dtype, page: int):
    """Returns (k, v, logical view fn, extras): logical(b) gives the (cap, hk, d) rows
    of entry b in key order."""
    dev = "cuda"
    if layout == "paged":
        pages_per_seq = math.ceil(cap / page)
        num_pages = pages_per_seq * batch + 3
        k = torch.randn(num_pages, page, hk, d, device=dev, dtype=dtype)
        v = torch.randn(num_pages, page, hk, d, device=dev, dtype=dtype)
        table = torch.randperm(num_pages, device=dev)[: batch * pages_per_seq].view(
            batch, pages_per_seq
        )
        table = table.to(torch.int32)

        def logical(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = table[b].long()
            return k[idx].flatten(0, 1), v[idx].flatten(0, 1)

        return k, v, logical, {"block_table": table}, pages_per_seq * page
    rows = batch + 2 if layout == "batch_idx" else batch
    k = torch.randn(rows, cap, hk, d, device=dev, dtype=dtype)
    v = torch.randn(rows, cap, hk, d, device=dev, dtype=dtype)
    extras = {}
    order = list(range(batch))
    if layout == "batch_idx":
        perm = torch.randperm(rows)[:batch]
        order = perm.tolist()
        extras["kv_batch_idx"] = perm.to(device=dev, dtype=torch.int32)

    def logical(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return k[order[b]], v[order[b]]

    return k, v, logical, extras, cap


CASES = [
    # (layout, seqlen_q, cap, nheads, nheads_k, head_dim, page, dtype)
    ("dense", 1, 4100, 32, 8, 128, 0, torch.bfloat16),
    ("dense", 1, 77, 8, 8, 64, 0, torch.float16),
    ("dense", 3, 1000, 8, 1, 128, 0, torch.bfloat16),
    ("dense", 1, 2049, 16, 2, 256, 0, torch.float16),
    ("dense", 2, 333, 6, 3, 80, 0, torch.bfloat16),
    ("batch_idx", 1, 1500, 8, 2, 128, 0, torch.bfloat16),
    ("leftpad", 1, 1500, 8, 2, 64, 0, torch.float16),
    ("leftpad", 4, 700, 4, 4, 128, 0, torch.bfloat16),
    ("paged", 1, 3000, 32, 8, 128, 16, torch.bfloat16),
    ("paged", 1, 3000, 8, 1, 64, 256, torch.float16),
    ("paged", 5, 900, 8, 2, 128, 16, torch.bfloat16),
    ("paged", 1, 1024, 16, 4, 256, 256, torch.bfloat16),
    ("paged", 40, 600, 4, 2, 64, 32, torch.float16),  # 80 packed rows: several row tiles
    ("dense", 100, 900, 4, 2, 128, 0, torch.bfloat16),  # the training kernels, seqused_k
    ("leftpad", 100, 900, 4, 1, 64, 0, torch.float16),  # the training kernels, leftpad
    ("batch_idx", 70, 500, 8, 8, 128, 0, torch.float16),  # the training kernels, batch idx
]


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("num_splits", [0, 1, 3, 128])
@pytest.mark.parametrize(("layout", "sq", "cap", "h", "hk", "d", "page", "dtype"), CASES)
def test_fwd_kv_matches_reference(layout, sq, cap, h, hk, d, page, dtype, num_splits, mask):
    if sq * (h // hk) > 32 and num_splits > 1 and layout != "paged" and mask != "none":
        pytest.skip("explicit splits of long queries: covered by the unmasked case")
    check_fwd_kv(layout, 3, sq, cap, h, hk, d, page, dtype, num_splits, mask)


def check_fwd_kv(layout, batch, sq, cap, h, hk, d, page, dtype, num_splits, mask) -> None:
    """fwd_kv over `batch` entries against the reference, entry by entry."""
    _ops = ops()
    if not compiled(d, dtype):
        pytest.skip(f"head_dim {d} / {dtype} not compiled")
    torch.manual_seed(zlib.crc32(repr((layout, batch, sq, cap, h, num_splits, mask)).encode()))
    kw = dict(MASKS[mask])
    use_alibi = kw.pop("alibi", False)
    k, v, logical, extras, cap_eff = make_cache(layout, batch, cap, hk, d, dtype, page)
    q = torch.randn(batch, sq, h, d, device="cuda", dtype=dtype)
    # Entry lengths: one empty (when sq allows a causal alignment), one full, one between;
    # past three entries, lengths drawn between sq and full.
    first = [cap_eff, max(sq, cap_eff // 3), 0 if sq == 1 else sq + 1]
    more = torch.randint(sq, cap_eff + 1, (max(0, batch - 3),)).tolist()
    used = torch.tensor((first + more)[:batch], dtype=torch.int32)
    leftpad = None
    if layout == "leftpad":
        pads = [5, 0, 1 if sq == 1 else 0] + [b % 7 for b in range(3, batch)]
        leftpad = torch.minimum(torch.tensor(pads[:batch], dtype=torch.int32), used)
        extras["leftpad_k"] = leftpad.cuda()
    slopes = torch.rand(batch, h, device="cuda") * 0.3 if use_alibi else None
    scale = d**-0.5
    left, right = window_args(kw, sq, cap)
    repoison()
    out, lse = _ops.fwd_kv(
        q, k, v, None, None, used.cuda(), extras.get("kv_batch_idx"), extras.get("leftpad_k"),
        extras.get("block_table"), sq, cap_eff, scale, left, right, kw.get("softcap", 0.0), slopes,
        num_splits,
    )  # fmt: skip
    torch.cuda.synchronize()
    assert out.shape == q.shape and lse.shape == (batch, h, sq)
    for b in range(batch):
        kb, vb = logical(b)
        start = 0 if leftpad is None else int(leftpad[b])
        stop = int(used[b])
        k_b, v_b = kb[start:stop].unsqueeze(0), vb[start:stop].unsqueeze(0)
        if k_b.shape[1] == 0:
            assert (out[b] == 0).all() and torch.isinf(lse[b]).all() and (lse[b] > 0).all()
            continue
        ref, ref_lse, ref_lo = reference(
            q[b : b + 1], k_b, v_b, kw, None if slopes is None else slopes[b]
        )
        check(f"out[{b}]", out[b : b + 1], ref, ref_lo)
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(
            lse[b : b + 1][finite], ref_lse.float()[finite], atol=2e-3, rtol=1e-3
        )
        assert torch.equal(torch.isinf(lse[b : b + 1]), ~finite)


# Calls with an (entry, kv head) tile for every SM: on sm_90 the four-warp kernel with
# 64-key stages, two CTAs an SM, at head dims 65-128 (split_plan.h, shape()), and the
# one-warp kernel for pages shorter than a 128-key stage there; at head dim 64 the same
# shape four CTAs an SM at two to three tiles an SM (2.5 below: dense, left-padded,
# pages shorter than its stage). The planner's count (0) leaves tiles that fit the SMs'
# slots unsplit and splits past them: one CTA an SM at head dim 256, and 2.2 tiles an
# SM (a partial second wave of two-CTA slots).
MANY_TILE_CASES = [
    # (layout, seqlen_q, cap, nheads, nheads_k, head_dim, page, dtype, tiles an SM)
    ("dense", 1, 700, 32, 8, 128, 0, torch.bfloat16, 1),
    ("dense", 1, 700, 32, 8, 128, 0, torch.bfloat16, 2.2),
    ("dense", 2, 450, 16, 4, 96, 0, torch.float16, 1),
    ("leftpad", 1, 333, 8, 8, 128, 0, torch.float16, 1),
    ("paged", 1, 700, 32, 8, 128, 256, torch.bfloat16, 1),
    ("paged", 1, 500, 16, 8, 128, 64, torch.bfloat16, 1),
    ("paged", 3, 300, 8, 4, 96, 16, torch.float16, 1),
    ("dense", 1, 600, 8, 8, 64, 0, torch.bfloat16, 1),
    ("dense", 1, 700, 32, 8, 64, 0, torch.bfloat16, 2.5),
    ("leftpad", 2, 300, 8, 2, 64, 0, torch.bfloat16, 2.5),
    ("paged", 1, 500, 16, 4, 64, 16, torch.float16, 2.5),
    ("dense", 1, 700, 16, 8, 256, 0, torch.bfloat16, 1),
]


@pytest.mark.parametrize("mask", ["none", "causal", "local", "softcap", "alibi"])
@pytest.mark.parametrize("num_splits", [0, 1])
@pytest.mark.parametrize(
    ("layout", "sq", "cap", "h", "hk", "d", "page", "dtype", "per_sm"), MANY_TILE_CASES
)
def test_fwd_kv_with_a_tile_for_every_sm(
    layout, sq, cap, h, hk, d, page, dtype, per_sm, num_splits, mask
):
    ops()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = -(-sq * (h // hk) // 16)  # 16-row tiles of packed queries an (entry, kv head)
    batch = math.ceil(per_sm * sms / (hk * rows)) + 1
    check_fwd_kv(layout, batch, sq, cap, h, hk, d, page, dtype, num_splits, mask)


@pytest.mark.parametrize("num_splits", [0, 1, 4])
@pytest.mark.parametrize("page", [0, 16])
def test_fwd_kv_varlen_queries(num_splits, page):
    """Varlen q (cu_seqlens_q) over a paged or packed cache, each entry with its own length."""
    _ops = ops()
    dtype, d, h, hk = torch.bfloat16, 128, 8, 2
    if not compiled(d, dtype):
        pytest.skip("head_dim 128 bf16 not compiled")
    torch.manual_seed(3)
    seqlens_q = [1, 3, 2, 1]
    seqlens_k = [600, 45, 1, 1200]
    batch = len(seqlens_q)
    cu_q = torch.tensor(
        [0, *torch.tensor(seqlens_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
    )
    q = torch.randn(sum(seqlens_q), h, d, device="cuda", dtype=dtype)
    if page:
        k, v, logical, extras, cap_eff = make_cache(
            "paged", batch, max(seqlens_k), hk, d, dtype, page
        )
        cu_k = torch.zeros(batch + 1, dtype=torch.int32, device="cuda")
        cu_k[1:] = torch.tensor(seqlens_k).cumsum(0).to(torch.int32)
        table = extras["block_table"]
    else:
        k = torch.randn(sum(seqlens_k), hk, d, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        cu_k = torch.tensor(
            [0, *torch.tensor(seqlens_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
        )
        table, cap_eff = None, max(seqlens_k)
    repoison()
    out, lse = _ops.fwd_kv(
        q, k, v, cu_q, cu_k, None, None, None, table, max(seqlens_q), cap_eff, d**-0.5, -1, 0, 0.0,
        None, num_splits,
    )  # fmt: skip
    torch.cuda.synchronize()
    assert lse.shape == (h, q.shape[0])
    for b in range(batch):
        qs, qe = int(cu_q[b]), int(cu_q[b + 1])
        if page:
            kb, vb = logical(b)
            kb, vb = kb[: seqlens_k[b]], vb[: seqlens_k[b]]
        else:
            ks, ke = int(cu_k[b]), int(cu_k[b + 1])
            kb, vb = k[ks:ke], v[ks:ke]
        ref, ref_lse, ref_lo = reference(
            q[qs:qe].unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0), {"causal": True}, None
        )
        check(f"out[{b}]", out[qs:qe].unsqueeze(0), ref, ref_lo)
        torch.testing.assert_close(lse[:, qs:qe], ref_lse[0].float(), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("num_splits", [0, 1, 5])
@pytest.mark.parametrize(("h", "hk", "d"), [(32, 8, 128), (8, 1, 64), (4, 4, 256)])
def test_flash_attn_func_decode_takes_the_split_kernel(num_splits, h, hk, d):
    """flash_attn_func with one query token (the path transformers' generate takes):
    the forward runs the split kernel; its LSE feeds the usual backward."""
    ops()
    import flash_attn

    dtype = torch.bfloat16
    if not compiled(d, dtype):
        pytest.skip(f"head_dim {d} not compiled")
    torch.manual_seed(5)
    q = torch.randn(2, 1, h, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 3000, hk, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 3000, hk, d, device="cuda", dtype=dtype, requires_grad=True)
    repoison()
    out = flash_attn.flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, ref_lo = reference(q.detach(), k.detach(), v.detach(), {"causal": True}, None)
    check("out", out, ref, ref_lo)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(
        qr, kr.repeat_interleave(h // hk, 2), vr.repeat_interleave(h // hk, 2), causal=True
    )
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout.float())
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, atol=3e-2, rtol=3e-2, msg=f"d{name}")


# Several splits: the split kernel writes partials into a workspace the call allocates
# (stream-ordered, from the caching allocator) and the combine, a dependent launch,
# merges them. Below: the call replayed from a CUDA graph (its workspace in the graph's
# pool, reused by every replay), calls queued back to back whose workspaces reuse the
# memory the one before gave back, and two streams decoding at once.
MERGE_SHAPES = [
    # (batch, seqlen_k, nheads, nheads_k, head_dim)
    (2, 3000, 32, 8, 128),
    (3, 2500, 8, 1, 64),
]


def dense_decode(batch: int, sk: int, h: int, hk: int, d: int, dtype=torch.bfloat16):
    q = torch.randn(batch, 1, h, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, sk, hk, d, device="cuda", dtype=dtype)
    return q, k, v


def run_fwd_kv(_ops, q, k, v, num_splits: int):
    d, sk = q.shape[-1], k.shape[1]
    return _ops.fwd_kv(
        q, k, v, None, None, None, None, None, None, 1, sk, d**-0.5, -1, 0, 0.0, None, num_splits
    )


def check_decode(name: str, q, k, v, out, lse) -> None:
    for b in range(q.shape[0]):
        ref, ref_lse, ref_lo = reference(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], {"causal": True}, None
        )
        check(f"{name} out[{b}]", out[b : b + 1], ref, ref_lo)
        torch.testing.assert_close(
            lse[b : b + 1], ref_lse.float(), atol=2e-3, rtol=1e-3, msg=f"{name} lse[{b}]"
        )


@pytest.mark.parametrize("num_splits", [0, 3, 16])
@pytest.mark.parametrize(("batch", "sk", "h", "hk", "d"), MERGE_SHAPES)
def test_split_merge_across_cuda_graph_replays(batch, sk, h, hk, d, num_splits):
    """Each replay, with new inputs, gives their attention (an eager call with another
    split count runs between replays)."""
    _ops = ops()
    if not compiled(d, torch.bfloat16):
        pytest.skip(f"head_dim {d} bf16 not compiled")
    torch.manual_seed(11)
    q, k, v = dense_decode(batch, sk, h, hk, d)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_fwd_kv(_ops, q, k, v, num_splits)  # warm-up, as graph capture asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    repoison()
    with torch.cuda.graph(graph):
        out, lse = run_fwd_kv(_ops, q, k, v, num_splits)
    for step in range(4):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        check_decode(f"replay {step}", q, k, v, out, lse)
        repoison()
        eager_out, eager_lse = run_fwd_kv(_ops, q, k, v, 2 + step)
        torch.cuda.synchronize()
        check_decode(f"eager {step}", q, k, v, eager_out, eager_lse)


def test_split_merge_calls_back_to_back_reusing_memory():
    """Calls queued without a sync, split counts changing, each workspace taken from
    memory the calls before gave back."""
    _ops = ops()
    if not compiled(128, torch.bfloat16):
        pytest.skip("head_dim 128 bf16 not compiled")
    torch.manual_seed(12)
    q, k, v = dense_decode(2, 3000, 32, 8, 128)
    repoison()
    results = [run_fwd_kv(_ops, q, k, v, n) for n in (2, 2, 7, 128, 3, 3, 0, 16, 16, 5)]
    torch.cuda.synchronize()
    for n, (out, lse) in enumerate(results):
        check_decode(f"call {n}", q, k, v, out, lse)


def test_split_merge_on_two_streams_at_once():
    """Two streams decoding at once: their CTAs share the SMs, their workspaces differ."""
    _ops = ops()
    if not compiled(128, torch.bfloat16) or not compiled(64, torch.bfloat16):
        pytest.skip("head_dim 64 / 128 bf16 not compiled")
    torch.manual_seed(13)
    inputs = [dense_decode(*MERGE_SHAPES[0]), dense_decode(*MERGE_SHAPES[1])]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    repoison()
    results: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(6):
        for i, (stream, (q, k, v)) in enumerate(zip(streams, inputs)):
            with torch.cuda.stream(stream):
                results[i].append(run_fwd_kv(_ops, q, k, v, 0))
    torch.cuda.synchronize()
    for i, (q, k, v) in enumerate(inputs):
        for n, (out, lse) in enumerate(results[i]):
            check_decode(f"stream {i} call {n}", q, k, v, out, lse)
