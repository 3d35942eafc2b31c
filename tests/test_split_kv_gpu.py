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
    _ops = ops()
    if not compiled(d, dtype):
        pytest.skip(f"head_dim {d} / {dtype} not compiled")
    if sq * (h // hk) > 32 and num_splits > 1 and layout != "paged" and mask != "none":
        pytest.skip("explicit splits of long queries: covered by the unmasked case")
    torch.manual_seed(zlib.crc32(repr((layout, sq, cap, h, num_splits, mask)).encode()))
    batch = 3
    kw = dict(MASKS[mask])
    use_alibi = kw.pop("alibi", False)
    k, v, logical, extras, cap_eff = make_cache(layout, batch, cap, hk, d, dtype, page)
    q = torch.randn(batch, sq, h, d, device="cuda", dtype=dtype)
    # Entry lengths: one empty (when sq allows a causal alignment), one full, one between.
    used = torch.tensor(
        [cap_eff, max(sq, cap_eff // 3), 0 if sq == 1 else sq + 1], dtype=torch.int32
    )
    leftpad = None
    if layout == "leftpad":
        leftpad = torch.tensor([5, 0, 1 if sq == 1 else 0], dtype=torch.int32)
        leftpad = torch.minimum(leftpad, used)
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
