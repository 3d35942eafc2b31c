"""flash_attn_with_kvcache and flash_attn_varlen_func(block_table=...) on a GPU,
against the upstream-style reference of kvcache_ref.py.

    python3 -m pytest -q tests/test_kvcache_gpu.py
    FLASH_ATTN_DISABLE_SM90=1 python3 -m pytest -q tests/test_kvcache_gpu.py   # sm80 path

Rule (as test_flash_attn_gpu.py): the error of out against the fp32 reference is at
most 2x that of the same reference computed in the input dtype (plus one ulp and a
tiny epsilon); lse within 1e-3 of the fp32 one, +inf exactly where a query sees no
key. The caches after the call equal the reference's bit for bit, except the rotated
new keys (Triton's fp32 rotation against the reference's fp64: within one ulp). Each
call runs on memory whose free blocks hold NaN (gpu_poison.py), so an output element
the kernels do not write shows up.

Marked ``gpu``: skipped without a CUDA GPU or a loadable flash_attn._C; the rotary
cases are skipped without Triton.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import pytest
import torch
from gpu_poison import poison_cuda_cache, poison_enabled
from kvcache_ref import Case, Inputs, expected, make_inputs
from reference import attention_ref

pytestmark = pytest.mark.gpu

HAS_TRITON = importlib.util.find_spec("triton") is not None
HDIMS = [64, 128, 256, 59]


def fa() -> Any:
    import flash_attn

    return flash_attn


def repoison() -> None:
    if poison_enabled():
        poison_cuda_cache()


def assert_close_to_ref(name: str, ours, ref32, ref_lo, factor: float = 2.0, eps: float = 1e-5):
    ulp = ref32.float().abs().max().item() * torch.finfo(ours.dtype).eps
    ours, ref32, ref_lo = ours.float(), ref32.float(), ref_lo.float()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - ref32).abs().max().item()
    ref_err = (ref_lo - ref32).abs().max().item()
    bound = factor * ref_err + eps + ulp
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x {ref_err:.3e} + {ulp:.1e}"


def assert_lse(lse: torch.Tensor, lse32: torch.Tensor) -> None:
    finite = torch.isfinite(lse32)
    assert torch.equal(torch.isfinite(lse), finite), "lse: +inf rows differ"
    if finite.any():
        err = (lse[finite] - lse32[finite]).abs().max().item()
        assert err <= 1e-3, f"lse: error {err:.3e}"
    assert (lse[~finite] > 0).all(), "lse of a row without keys must be +inf"


def assert_caches(c: Case, inp: Inputs, ref: Any) -> None:
    """v_cache exactly the reference's; k_cache too, except rotated new keys (1 ulp)."""
    assert torch.equal(inp.v_cache, ref.v_cache), "v_cache differs from the reference"
    untouched = ~ref.written
    assert torch.equal(inp.k_cache[untouched], ref.k_cache[untouched]), (
        "k_cache changed outside the appended slots"
    )
    if c.rotary:
        torch.testing.assert_close(
            inp.k_cache[ref.written], ref.k_cache[ref.written], atol=1e-2, rtol=1e-2
        )
    else:
        assert torch.equal(inp.k_cache, ref.k_cache), "appended k differs"


def run_case(c: Case, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
    if c.rotary and not HAS_TRITON:
        pytest.skip("rotary needs Triton")
    torch.manual_seed(seed)
    inp = make_inputs(c, seed=seed, device="cuda", dtype=dtype)
    ref32 = expected(c, inp, upcast=True)
    ref_lo = expected(c, inp, upcast=False)
    repoison()
    out, lse = fa().flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=inp.cache_seqlens,
        return_softmax_lse=True, **inp.kwargs,
    )  # fmt: skip
    assert out.shape == inp.q.shape and out.dtype == dtype
    assert lse.shape == (c.batch, c.nheads, c.seqlen_q) and lse.dtype == torch.float32
    assert_close_to_ref("out", out, ref32.out, ref_lo.out)
    assert_lse(lse, ref32.lse)
    assert_caches(c, inp, ref32)


# --- the matrix: every head dim x layout x shape x num_splits, features rotating ----

FEATURES: list[dict[str, Any]] = [
    {},
    {"causal": False},
    {"window": (20, 0), "causal": False},
    {"alibi": True, "softcap": 10.0},
    {"rotary": "neox"},
    {"rotary": "interleaved", "causal": False},
    {"seqlens_int": True},
    {"seqlen_new": 0, "causal": True},
]
DENSE_ONLY: list[dict[str, Any]] = [
    {"leftpad": True},
    {"batch_idx": True},
    {"leftpad": True, "batch_idx": True, "alibi": True, "rotary": "neox"},
]
HEADS = [(8, 8), (8, 2), (8, 1)]  # MHA, GQA, MQA
SHAPES = [(1, 1), (4, 4), (7, 3)]  # (seqlen_q, seqlen_new): decode, chunk, speculative
LAYOUTS = [(0, 300), (16, 320), (256, 512)]  # (page_size, seqlen_cache)
SPLITS = [0, 1, 3]


def matrix() -> list[Any]:
    cases = []
    n = 0
    for head_dim in HDIMS:
        for page_size, seqlen_cache in LAYOUTS:
            features = FEATURES + ([] if page_size else DENSE_ONLY)
            for seqlen_q, seqlen_new in SHAPES:
                for num_splits in SPLITS:
                    feature = features[n % len(features)]
                    nheads, nheads_k = HEADS[n % len(HEADS)]
                    n += 1
                    c = Case(
                        batch=3, seqlen_q=seqlen_q, seqlen_new=seqlen_new,
                        seqlen_cache=seqlen_cache, nheads=nheads, nheads_k=nheads_k,
                        head_dim=head_dim, page_size=page_size, num_splits=num_splits,
                        rotary_dim=head_dim // 2 // 2 * 2,
                    )  # fmt: skip
                    c = replace(c, **feature)
                    if c.seqlen_new == 0 and feature.get("seqlen_new") == 0:
                        c = replace(c, seqlen_new=0)
                    name = (
                        f"d{head_dim}-p{page_size}-q{seqlen_q}n{c.seqlen_new}-s{num_splits}"
                        f"-h{nheads}k{nheads_k}-" + ("+".join(sorted(feature)) or "plain")
                    )
                    cases.append(pytest.param(c, id=name))
    return cases


@pytest.mark.parametrize("c", matrix())
def test_kvcache(c: Case) -> None:
    run_case(c)


# Every feature at every head dim, dense and paged, fp16 this time.
def feature_cases() -> list[Any]:
    cases = []
    for head_dim in HDIMS:
        for i, feature in enumerate(FEATURES + DENSE_ONLY):
            page_size = 16 if i % 2 and feature not in DENSE_ONLY else 0
            c = Case(
                batch=2, seqlen_q=5, seqlen_new=5, seqlen_cache=160, nheads=6, nheads_k=2,
                head_dim=head_dim, page_size=page_size, rotary_dim=min(32, head_dim // 2 * 2),
            )  # fmt: skip
            c = replace(c, **feature)
            name = f"d{head_dim}-p{page_size}-" + ("+".join(sorted(feature)) or "plain")
            cases.append(pytest.param(c, id=name))
    return cases


@pytest.mark.parametrize("c", feature_cases())
def test_kvcache_features_fp16(c: Case) -> None:
    run_case(c, dtype=torch.float16, seed=1)


@pytest.mark.parametrize(
    "c",
    [
        # long caches: the keys split across CTAs (0: the heuristic; 3 and 16 forced)
        Case(batch=2, seqlen_cache=8192, nheads=32, nheads_k=8, head_dim=128, num_splits=0),
        Case(batch=2, seqlen_cache=8192, nheads=32, nheads_k=8, head_dim=128, num_splits=16),
        Case(batch=1, seqlen_cache=16384, nheads=8, nheads_k=1, head_dim=128, page_size=256),
        Case(batch=2, seqlen_cache=4096, nheads=16, nheads_k=2, head_dim=64, page_size=16,
             num_splits=3),
        # prefill-sized chunks: dense, and paged (gathered into a contiguous cache)
        Case(batch=2, seqlen_q=300, seqlen_new=300, seqlen_cache=1024, nheads=8, nheads_k=2,
             head_dim=128),
        Case(batch=2, seqlen_q=200, seqlen_new=200, seqlen_cache=512, nheads=8, nheads_k=2,
             head_dim=128, page_size=16, rotary="neox", rotary_dim=64),
        Case(batch=2, seqlen_q=64, seqlen_new=64, seqlen_cache=768, nheads=8, nheads_k=2,
             head_dim=64, page_size=256, window=(100, 0)),
    ],
    ids=["split0", "split16", "paged256-mqa", "paged16-split3", "prefill-dense",
         "prefill-paged16-rotary", "prefill-paged256-local"],
)  # fmt: skip
def test_kvcache_long_and_prefill(c: Case) -> None:
    run_case(c)


def test_decode_steps_equal_one_call() -> None:
    """Token-by-token decode leaves the same cache as one call, and its last output."""
    c = Case(batch=2, seqlen_q=6, seqlen_new=6, seqlen_cache=64, head_dim=128, nheads=8,
             nheads_k=2, page_size=16)  # fmt: skip
    inp = make_inputs(c, device="cuda", dtype=torch.bfloat16)
    k_step, v_step = inp.k_cache.clone(), inp.v_cache.clone()
    seqlens = inp.seqlens.clone()
    assert inp.k is not None and inp.v is not None
    for i in range(6):
        last = fa().flash_attn_with_kvcache(
            inp.q[:, i : i + 1], k_step, v_step, inp.k[:, i : i + 1], inp.v[:, i : i + 1],
            cache_seqlens=seqlens + i, **inp.kwargs,
        )  # fmt: skip
    full = fa().flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=seqlens, **inp.kwargs
    )
    assert torch.equal(k_step, inp.k_cache) and torch.equal(v_step, inp.v_cache)
    torch.testing.assert_close(last[:, 0].float(), full[:, -1].float(), atol=2e-2, rtol=2e-2)


# --- varlen with block_table -----------------------------------------------------------


@pytest.mark.parametrize(
    ("lens_q", "lens_k", "nheads", "nheads_k", "head_dim", "page_size", "causal"),
    [
        ([1, 1, 1, 1], [1, 77, 300, 512], 8, 2, 128, 16, True),  # decode
        ([1, 1], [1000, 4000], 32, 8, 128, 256, True),
        ([5, 1, 9], [40, 700, 9], 8, 8, 64, 16, True),
        ([3, 2], [512, 17], 4, 1, 256, 256, False),
        ([128, 300], [128, 700], 8, 2, 128, 16, True),  # prefill: gathered
        ([33, 60], [90, 60], 6, 2, 59, 16, True),
    ],
)
def test_varlen_block_table(lens_q, lens_k, nheads, nheads_k, head_dim, page_size, causal) -> None:
    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    batch = len(lens_q)
    pages_per_seq = -(-max(lens_k) // page_size)
    num_pages = batch * pages_per_seq + 3
    q = torch.randn(sum(lens_q), nheads, head_dim, device=dev, dtype=dt)
    k_pool = torch.randn(num_pages, page_size, nheads_k, head_dim, device=dev, dtype=dt)
    v_pool = torch.randn(num_pages, page_size, nheads_k, head_dim, device=dev, dtype=dt)
    table = torch.randperm(num_pages, device=dev)[: batch * pages_per_seq]
    table = table.view(batch, pages_per_seq).to(torch.int32)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32,
                        device=dev)  # fmt: skip
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32,
                        device=dev)  # fmt: skip
    pools = (k_pool.clone(), v_pool.clone())
    repoison()
    out, lse, _ = fa().flash_attn_varlen_func(
        q, k_pool, v_pool, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
        block_table=table, return_attn_probs=True,
    )  # fmt: skip
    assert torch.equal(k_pool, pools[0]) and torch.equal(v_pool, pools[1])
    keys_k = k_pool[table.long()].flatten(1, 2)
    keys_v = v_pool[table.long()].flatten(1, 2)
    for b in range(batch):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        args = (q[None, rows], keys_k[b : b + 1, : lens_k[b]], keys_v[b : b + 1, : lens_k[b]])
        o32, lse32 = attention_ref(*args, causal=causal)
        o_lo, _ = attention_ref(*args, causal=causal, upcast=False)
        assert_close_to_ref(f"out[{b}]", out[rows], o32[0], o_lo[0])
        assert_lse(lse[:, rows], lse32[0])


# --- bad input on the GPU: the error, and nothing written ----------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cache_seqlens": "past"}, "exceeds"),
        ({"block_table": "bad_page"}, "is not a page of the pool"),
        ({"cache_seqlens": "negative"}, ">= 0"),
    ],
)
def test_bad_values_raise_before_any_write(changes: dict[str, str], message: str) -> None:
    from flash_attn.errors import InputError

    c = Case(batch=3, seqlen_cache=64, page_size=16, head_dim=128)
    inp = make_inputs(c, device="cuda", dtype=torch.bfloat16)
    kwargs = dict(inp.kwargs)
    seqlens = inp.seqlens.clone()
    if changes.get("cache_seqlens") == "past":
        seqlens[1] = 64
    elif changes.get("cache_seqlens") == "negative":
        seqlens[2] = -5
    if changes.get("block_table") == "bad_page":
        table = kwargs["block_table"].clone()
        table[2, 0] = inp.k_cache.shape[0]
        kwargs["block_table"] = table
    before = (inp.k_cache.clone(), inp.v_cache.clone())
    with pytest.raises(InputError, match=message):
        fa().flash_attn_with_kvcache(
            inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=seqlens, **kwargs
        )
    torch.cuda.synchronize()
    assert torch.equal(inp.k_cache, before[0]) and torch.equal(inp.v_cache, before[1])
