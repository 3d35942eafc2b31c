"""Correctness of our kernels on a GPU against a plain PyTorch reference.

Rule (as upstream): the error of our result against the fp32 reference is at
most 2x (outputs) / 3x (gradients) the error of the same reference computed
in the input dtype, plus a tiny absolute epsilon.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import attention_ref

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
HDIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
SEQLENS = [(1, 1), (113, 203), (128, 128), (239, 128), (1023, 1024), (256, 1)]


def fa():
    import flash_attn

    return flash_attn


def assert_close_to_ref(name: str, ours, ref32, ref_lo, factor: float, eps: float = 1e-5) -> None:
    """|ours - ref32| <= factor * |ref_lo - ref32| + eps + one ulp of ours' dtype at |ref32|.

    The ulp term keeps the rule meaningful where the low-precision reference
    happens to round exactly like the fp32 one (e.g. a single key: P == 1),
    while a sum in another order may land one ulp away.
    """
    ulp = ref32.float().abs().max().item() * torch.finfo(ours.dtype).eps
    ours, ref32, ref_lo = ours.float(), ref32.float(), ref_lo.float()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - ref32).abs().max().item()
    ref_err = (ref_lo - ref32).abs().max().item()
    bound = factor * ref_err + eps + ulp
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x {ref_err:.3e} + {ulp:.1e}"


def rand(*shape, dtype, requires_grad=True):
    return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=requires_grad)


def run_and_compare(
    q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, backward=True
):
    out, lse, _ = fa().flash_attn_func(
        q,
        k,
        v,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        return_attn_probs=True,
    )
    kw = dict(causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
    ref32, lse32 = attention_ref(q, k, v, upcast=True, **kw)
    ref_lo, _ = attention_ref(q, k, v, upcast=False, **kw)
    assert_close_to_ref("out", out, ref32, ref_lo, 2.0)
    finite = torch.isfinite(lse32)
    assert torch.equal(torch.isfinite(lse), finite), "lse: +inf rows differ"
    assert (lse[finite] - lse32[finite]).abs().max().item() <= 1e-3 if finite.any() else True
    if not backward:
        return
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads32 = torch.autograd.grad(ref32, (q, k, v), g)
    grads_lo = torch.autograd.grad(ref_lo, (q, k, v), g)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, grads32, grads_lo):
        assert_close_to_ref(name, a, b, c, 3.0, eps=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", HDIMS)
@pytest.mark.parametrize("seqlens", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
def test_dense(dtype, hdim, seqlens, causal):
    torch.manual_seed(hdim * 1000 + seqlens[0])
    sq, sk = seqlens
    q, k, v = (
        rand(2, sq, 4, hdim, dtype=dtype),
        rand(2, sk, 4, hdim, dtype=dtype),
        rand(2, sk, 4, hdim, dtype=dtype),
    )
    run_and_compare(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("window_size", [(0, 0), (16, 0), (100, 7), (-1, 33), (50, -1)])
@pytest.mark.parametrize("seqlens", [(239, 239), (113, 400), (400, 113)])
def test_sliding_window(dtype, hdim, window_size, seqlens):
    torch.manual_seed(0)
    sq, sk = seqlens
    q, k, v = (
        rand(1, sq, 2, hdim, dtype=dtype),
        rand(1, sk, 2, hdim, dtype=dtype),
        rand(1, sk, 2, hdim, dtype=dtype),
    )
    run_and_compare(q, k, v, window_size=window_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", [64, 96, 192])
@pytest.mark.parametrize("heads", [(8, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(dtype, hdim, heads, causal):
    torch.manual_seed(1)
    h, hk = heads
    q = rand(2, 177, h, hdim, dtype=dtype)
    k, v = rand(2, 311, hk, hdim, dtype=dtype), rand(2, 311, hk, hdim, dtype=dtype)
    run_and_compare(q, k, v, causal=causal)


@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize(
    "shape",
    [
        (3, 300, 6, 2),  # 18 (batch, head) pairs: a group of 16 and one of 2
        (1, 8320, 2, 1),  # 65 tiles of 128 queries / keys: the grids go head by head
    ],
    ids=["grouped-remainder", "over-64-tiles"],
)
@pytest.mark.parametrize("causal", [False, True])
def test_tile_order(hdim, shape, causal):
    """Every (tile, head, batch) is computed once whichever order the grid takes."""
    torch.manual_seed(4)
    b, s, h, hk = shape
    q = rand(b, s, h, hdim, dtype=torch.bfloat16)
    k, v = rand(b, s, hk, hdim, dtype=torch.bfloat16), rand(b, s, hk, hdim, dtype=torch.bfloat16)
    run_and_compare(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_and_alibi(dtype, hdim, causal):
    torch.manual_seed(2)
    q, k, v = (rand(2, 300, 4, hdim, dtype=dtype) for _ in range(3))
    run_and_compare(q * 4, k, v, causal=causal, softcap=30.0)
    slopes = torch.rand(4, device="cuda", dtype=torch.float32) * 0.3
    run_and_compare(q, k, v, causal=causal, alibi_slopes=slopes)
    slopes_b = torch.rand(2, 4, device="cuda", dtype=torch.float32) * 0.3
    run_and_compare(q, k, v, causal=causal, alibi_slopes=slopes_b, softcap=20.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", [40, 128, 224])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", [(-1, -1), (32, 8)])
def test_varlen(dtype, hdim, causal, window_size):
    torch.manual_seed(3)
    lens_q = [5, 0, 129, 1, 300, 64]
    lens_k = [7, 3, 129, 0, 250, 64]
    h, hk = 4, 2
    cu_q = torch.tensor([0] + list(itertools_accumulate(lens_q)), device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools_accumulate(lens_k)), device="cuda", dtype=torch.int32)
    q = rand(sum(lens_q), h, hdim, dtype=dtype)
    k, v = rand(sum(lens_k), hk, hdim, dtype=dtype), rand(sum(lens_k), hk, hdim, dtype=dtype)
    out, lse, _ = fa().flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(lens_q),
        max(lens_k),
        causal=causal,
        window_size=window_size,
        return_attn_probs=True,
    )
    assert lse.shape == (h, sum(lens_q))
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    for i in range(len(lens_q)):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        qi, ki, vi = (
            x.detach()[s].unsqueeze(0).requires_grad_() for x, s in ((q, qs), (k, ks), (v, ks))
        )
        kw = dict(causal=causal, window_size=window_size)
        ref32, _ = attention_ref(qi, ki, vi, upcast=True, **kw)
        ref_lo, _ = attention_ref(qi, ki, vi, upcast=False, **kw)
        if lens_q[i]:
            assert_close_to_ref(f"seq{i} out", out[qs].unsqueeze(0), ref32, ref_lo, 2.0)
        if lens_q[i] and lens_k[i]:
            gi = g[qs].unsqueeze(0)
            r32 = torch.autograd.grad(ref32, (qi, ki, vi), gi)
            rlo = torch.autograd.grad(ref_lo, (qi, ki, vi), gi)
            for name, a, b, c in zip(("dq", "dk", "dv"), (dq[qs], dk[ks], dv[ks]), r32, rlo):
                assert_close_to_ref(f"seq{i} {name}", a.unsqueeze(0), b, c, 3.0, eps=1e-4)
        elif lens_k[i]:
            assert (dk[ks] == 0).all() and (dv[ks] == 0).all()
        if lens_q[i] and not lens_k[i]:
            assert (out[qs] == 0).all() and torch.isinf(lse[:, qs]).all()


def itertools_accumulate(xs):
    total = 0
    for x in xs:
        total += x
        yield total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", [64, 128, 256])
def test_deterministic_backward(dtype, hdim):
    torch.manual_seed(4)
    q, k, v = (rand(2, 517, 4, hdim, dtype=dtype) for _ in range(3))
    g = torch.randn(2, 517, 4, hdim, device="cuda", dtype=dtype)
    results = []
    for _ in range(3):
        out = fa().flash_attn_func(q, k, v, causal=True, deterministic=True)
        results.append(torch.autograd.grad(out, (q, k, v), g))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_strided_inputs():
    torch.manual_seed(5)
    dtype = torch.bfloat16
    base = rand(2, 200, 3, 8, 64, dtype=dtype, requires_grad=False)
    q, k, v = base[:, :, 0], base[:, :, 1], base[:, :, 2]  # head stride 64, row stride 3*8*64
    for x in (q, k, v):
        x.requires_grad_()
    run_and_compare(q, k, v, causal=True)
    # batch-major permutation and a non-contiguous last dim
    q2 = rand(200, 2, 8, 64, dtype=dtype, requires_grad=False).transpose(0, 1).requires_grad_()
    k2 = rand(2, 150, 8, 64, dtype=dtype, requires_grad=False)
    k2 = k2.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    v2 = rand(2, 150, 8, 64, dtype=dtype)
    assert k2.stride(-1) != 1
    run_and_compare(q2, k2, v2)


def test_packed_variants_match_unpacked():
    torch.manual_seed(6)
    dtype = torch.float16
    qkv = rand(2, 130, 3, 4, 64, dtype=dtype)
    out_packed = fa().flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.detach().unbind(2)
    out = fa().flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out_packed, out)
    kv = qkv[:, :, 1:]
    out_kv = fa().flash_attn_kvpacked_func(qkv[:, :, 0], kv, causal=True)
    assert torch.equal(out_kv, out)
    g = torch.randn_like(out_packed)
    (dqkv,) = torch.autograd.grad(out_packed, (qkv,), g)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad(fa().flash_attn_func(qs, ks, vs, causal=True), (qs, ks, vs), g)
    for packed, single in zip(dqkv.unbind(2), grads):
        assert torch.equal(packed, single)


def test_softmax_scale_and_lse():
    torch.manual_seed(7)
    q, k, v = (rand(1, 64, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    out, lse, probs = fa().flash_attn_func(q, k, v, softmax_scale=0.05, return_attn_probs=True)
    ref, ref_lse = attention_ref(q, k, v, softmax_scale=0.05, upcast=True)
    assert probs is None
    assert (lse - ref_lse).abs().max().item() < 1e-3
    assert (out.float() - ref.float()).abs().max().item() < 2e-2


def test_torch_compile_no_graph_break():
    torch.manual_seed(8)
    q, k, v = (rand(2, 96, 4, 64, dtype=torch.bfloat16) for _ in range(3))

    def f(q, k, v):
        return fa().flash_attn_func(q, k, v, causal=True).sum()

    compiled = torch.compile(f, fullgraph=True)
    eager = f(q, k, v)
    assert torch.allclose(compiled(q, k, v), eager, rtol=1e-3, atol=1e-2)
    g1 = torch.autograd.grad(compiled(q, k, v), (q,))[0]
    g2 = torch.autograd.grad(f(q, k, v), (q,))[0]
    assert torch.equal(g1, g2)


def test_large_seqlen_memory_is_linear():
    q, k, v = (rand(1, 16384, 8, 128, dtype=torch.bfloat16) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fa().flash_attn_func(q, k, v, causal=True)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    quadratic = 16384 * 16384 * 8 * 2  # one bf16 score matrix
    assert peak < quadratic / 8, f"peak {peak / 2**20:.0f} MiB looks quadratic"
    assert math.isfinite(out.float().sum().item())
