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
from kvcache_ref import BAD_VALUES as BAD_INDEX_VALUES
from kvcache_ref import WRITE_PATHS, Case, Inputs, append_ref, expected, make_inputs
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
        # dense prefills (the main kernel after the append; with leftpad, batch_idx,
        # rotary, local windows, ALiBi, softcap, an int cache_seqlens, and q and k_new of
        # different lengths)
        Case(batch=3, seqlen_q=200, seqlen_new=200, seqlen_cache=640, nheads=8, nheads_k=2,
             head_dim=128, leftpad=True, batch_idx=True, rotary="neox", rotary_dim=64),
        Case(batch=2, seqlen_q=150, seqlen_new=150, seqlen_cache=512, nheads=8, nheads_k=1,
             head_dim=64, window=(100, 0), alibi=True),
        Case(batch=2, seqlen_q=129, seqlen_new=129, seqlen_cache=400, nheads=4, nheads_k=4,
             head_dim=256, seqlens_int=True, softcap=5.0),
        Case(batch=2, seqlen_q=200, seqlen_new=77, seqlen_cache=500, nheads=8, nheads_k=2,
             head_dim=128),
        Case(batch=2, seqlen_q=130, seqlen_new=300, seqlen_cache=700, nheads=8, nheads_k=2,
             head_dim=128, causal=False),
        # the sm_90 kernel reads the new rows from k_new itself (and writes them to the cache):
        # an empty cache (cache_seqlens 0), and one whose first sequence holds 128 keys (its
        # new rows start on a key block), the other one a random count
        Case(batch=2, seqlen_q=384, seqlen_new=384, seqlen_cache=384, nheads=8, nheads_k=2,
             head_dim=128),
        Case(batch=2, seqlen_q=256, seqlen_new=256, seqlen_cache=384, nheads=8, nheads_k=8,
             head_dim=64),
    ],
    ids=["split0", "split16", "paged256-mqa", "paged16-split3", "prefill-dense",
         "prefill-paged16-rotary", "prefill-paged256-local", "prefill-leftpad-batch_idx-rotary",
         "prefill-d64-mqa-local-alibi", "prefill-d256-int-softcap", "prefill-q200-new77",
         "prefill-q130-new300", "prefill-empty-cache", "prefill-aligned-d64"],
)  # fmt: skip
def test_kvcache_long_and_prefill(c: Case) -> None:
    run_case(c)


def test_prefill_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dense prefill with the value checks off (FLASH_ATTN_KVCACHE_CHECKS=0): the op's
    append without a verdict."""
    monkeypatch.setenv("FLASH_ATTN_KVCACHE_CHECKS", "0")
    run_case(Case(batch=3, seqlen_q=150, seqlen_new=150, seqlen_cache=512, nheads=8, nheads_k=2,
                  head_dim=128, batch_idx=True))  # fmt: skip


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
        # pages that are no power of two (the split kernel divides by the page size)
        ([1, 1, 1], [47, 500, 3000], 8, 2, 128, 48, True),
        ([1, 2], [4000, 333], 16, 2, 64, 80, False),
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


# --- the index check on the device (the checked call's default where the op writes) ---


@pytest.mark.parametrize(
    ("path", "bad"), BAD_INDEX_VALUES, ids=[f"{p}-{b.__name__[1:]}" for p, b in BAD_INDEX_VALUES]
)
def test_bad_index_values_leave_the_cache_unchanged_on_every_path(path: str, bad: Any) -> None:
    """kvcache_ref's write paths and bad values on the GPU (the fused ones refused by the
    op's device check, the others by the host check first): the CPU tests' exact
    message, the caches bit-identical; then the same caches with good values give the
    reference (no verdict of the refused call lingers)."""
    from flash_attn.errors import InputError

    c = WRITE_PATHS[path]
    if c.rotary and not HAS_TRITON:
        pytest.skip("rotary needs Triton")
    changes, message = bad(c)
    inp = make_inputs(c, device="cuda", dtype=torch.bfloat16)
    args = {"cache_seqlens": inp.cache_seqlens, **inp.kwargs}
    args.update({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in changes.items()})
    before = (inp.k_cache.clone(), inp.v_cache.clone())
    ref, lo = expected(c, inp.to("cpu")), expected(c, inp.to("cpu"), upcast=False)
    repoison()
    with pytest.raises(InputError) as raised:
        fa().flash_attn_with_kvcache(inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, **args)
    assert str(raised.value) == message
    torch.cuda.synchronize()
    assert torch.equal(inp.k_cache, before[0]) and torch.equal(inp.v_cache, before[1])
    out = fa().flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=inp.cache_seqlens,
        **inp.kwargs,
    )  # fmt: skip
    assert_close_to_ref("out after a refusal", out.cpu(), ref.out, lo.out)


CHECKED_SHAPES = {  # the check before the split kernel (decode) and before the main one (prefill)
    "decode": Case(batch=3, seqlen_cache=64, seqlen_q=2, seqlen_new=2, head_dim=128),
    "prefill": Case(batch=3, seqlen_cache=128, seqlen_q=40, seqlen_new=40, nheads=8, nheads_k=2,
                    head_dim=128),
}  # fmt: skip


@pytest.mark.parametrize("shape", list(CHECKED_SHAPES))
@pytest.mark.parametrize("side_stream", [False, True], ids=["current-stream", "side-stream"])
def test_the_device_check_reads_the_values_the_stream_holds(side_stream: bool, shape: str) -> None:
    """The GPU held back (a 20 ms spin), cache_seqlens made bad, good, bad by kernels
    queued just before each call: the host launches each call long before the GPU reaches
    it, and must still refuse exactly the bad ones (the verdict of that call, not an
    earlier one), write nothing for them, and give the reference for the good one."""
    from flash_attn.errors import InputError

    c = CHECKED_SHAPES[shape]
    inp = make_inputs(c, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    good = inp.seqlens.cuda()
    before = (inp.k_cache.clone(), inp.v_cache.clone())
    ref, lo = expected(c, inp.to("cpu")), expected(c, inp.to("cpu"), upcast=False)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        for step, shift in enumerate((1000, 0, -1000)):
            torch.cuda._sleep(20_000_000)
            seqlens = good + shift  # queued behind the spin
            if shift:
                with pytest.raises(InputError, match=">= 0" if shift < 0 else "exceeds"):
                    fa().flash_attn_with_kvcache(
                        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=seqlens,
                        **inp.kwargs,
                    )  # fmt: skip
                stream.synchronize()
                assert torch.equal(inp.k_cache, before[0]), step
                assert torch.equal(inp.v_cache, before[1]), step
            else:
                out = fa().flash_attn_with_kvcache(
                    inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=seqlens,
                    **inp.kwargs,
                )  # fmt: skip
                stream.synchronize()
                assert_close_to_ref("out", out.cpu(), ref.out, lo.out)
                assert torch.equal(inp.k_cache.cpu(), ref.k_cache)
                before = (inp.k_cache.clone(), inp.v_cache.clone())


# --- the fused append: fwd_kv with k_new and v_new, against its contract -------------
#
# kvcache_ref.append_ref is the contract written out (row i of entry b at key
# keys(b) - seqlen_new + i, keys(b) its count after the append, which the op takes as
# seqused_k[b] + seqlen_new; rows out of range skipped). The caches after the op must
# equal it bit for bit, and the op's output must be that of the op over those caches
# without k_new, within rounding (the sm_90 prefill reads the new rows from k_new itself,
# in key blocks that start at the first new key: another summation order).


def make_append_case(
    layout: str, page_size: int, seqlen_new: int, odd_layouts: bool, dtype: torch.dtype,
    capacity: int = 512, batch: int = 3, nheads: int = 8, nheads_k: int = 2, head_dim: int = 128,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The op's inputs. odd_layouts: k_new and v_new transposed views, and caches that
    are views at a 2-byte offset with a head stride of head_dim + 1 (no 16-byte copies:
    the element path of the append, and a copy of the caches for the attention)."""
    g = torch.Generator().manual_seed(seed)
    dev = "cuda"

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(dev)

    if page_size:
        pages_per_seq = capacity // page_size
        rows, keys = batch * pages_per_seq + 3, page_size
        perm = torch.randperm(rows, generator=g)[: batch * pages_per_seq]
        table = perm.view(batch, pages_per_seq).to(torch.int32).to(dev)
    else:
        rows, keys, table = batch + (2 if layout == "batch_idx" else 0), capacity, None
    if odd_layouts:
        k_cache = randn(rows, keys, nheads_k, head_dim + 1)[..., 1:]
        v_cache = randn(rows, keys, nheads_k, head_dim + 1)[..., 1:]
        k_new = randn(batch, nheads_k, seqlen_new, head_dim).transpose(1, 2)
        v_new = randn(batch, nheads_k, seqlen_new, head_dim).transpose(1, 2)
    else:
        k_cache = randn(rows, keys, nheads_k, head_dim)
        v_cache = randn(rows, keys, nheads_k, head_dim)
        k_new, v_new = randn(batch, seqlen_new, nheads_k, head_dim), randn(
            batch, seqlen_new, nheads_k, head_dim)  # fmt: skip
    batch_idx = None
    if layout == "batch_idx":
        batch_idx = torch.randperm(rows, generator=g)[:batch].to(torch.int32).to(dev)
    seqused = torch.randint(seqlen_new, capacity + 1, (batch,), generator=g)
    seqused[0] = capacity  # one entry fills its row
    return {
        "q": randn(batch, seqlen_new, nheads, head_dim), "k_cache": k_cache, "v_cache": v_cache,
        "k_new": k_new, "v_new": v_new, "seqused_k": seqused.to(torch.int32).to(dev),
        "batch_idx": batch_idx, "table": table, "capacity": capacity,
    }  # fmt: skip


def fwd_kv_call(
    c: dict[str, Any], k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor | None = None,
    appends: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    from flash_attn import _ops

    q = c["q"] if q is None else q
    seqused = c["seqused_k"]  # the keys after the append; with k_new the op takes those before
    if appends:
        seqused = seqused - c["k_new"].shape[1]
    return _ops.fwd_kv(
        q, k_cache, v_cache, None, None, seqused, c["batch_idx"], None, c["table"],
        q.shape[1], c["capacity"], q.shape[-1] ** -0.5, -1, 0, 0.0, None, 0,
        c["k_new"] if appends else None, c["v_new"] if appends else None,
    )  # fmt: skip


def reference_caches(c: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches after the contract's append (computed on the CPU, moved back)."""
    k_ref, v_ref = c["k_cache"].cpu().clone(), c["v_cache"].cpu().clone()
    to_cpu = [None if c[n] is None else c[n].cpu() for n in ("seqused_k", "batch_idx", "table")]
    append_ref(k_ref, v_ref, c["k_new"].cpu(), c["v_new"].cpu(), *to_cpu)
    return k_ref.cuda(), v_ref.cuda()


def assert_same_attention(out, lse, out_ref, lse_ref) -> None:
    """The same attention within rounding: where the sm_90 kernel reads the new rows from
    k_new itself its key blocks start at the first new key, so it sums in another order
    than a call over the filled cache (a few ulps); keys it did not see, or read before
    they were written, move the output by far more."""
    torch.testing.assert_close(out, out_ref, atol=4e-3, rtol=1e-2, msg="the attention did not "
                               "see the appended keys")  # fmt: skip
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=1e-5)


APPEND_LAYOUTS = [("dense", 0), ("batch_idx", 0), ("paged", 16), ("paged", 256)]


@pytest.mark.parametrize("odd_layouts", [False, True], ids=["aligned", "odd-layouts"])
@pytest.mark.parametrize("seqlen_new", [1, 7, 300])
@pytest.mark.parametrize(("layout", "page_size"), APPEND_LAYOUTS,
                         ids=[f"{n}{p or ''}" for n, p in APPEND_LAYOUTS])  # fmt: skip
def test_fused_append_matches_the_contract(
    layout: str, page_size: int, seqlen_new: int, odd_layouts: bool
) -> None:
    from test_split_kv_gpu import compiled

    dtype = torch.float16 if odd_layouts else torch.bfloat16
    if not compiled(128, dtype):  # (the op is called directly: no KernelNotBuiltError)
        pytest.skip(f"head dim 128 / {dtype} not in this build")
    c = make_append_case(layout, page_size, seqlen_new, odd_layouts, dtype)
    k_ref, v_ref = reference_caches(c)
    k_before = c["k_cache"].clone()
    repoison()
    out, lse = fwd_kv_call(c, c["k_cache"], c["v_cache"])
    torch.cuda.synchronize()
    assert not torch.equal(c["k_cache"], k_before), "nothing was appended"
    assert torch.equal(c["k_cache"], k_ref), "k_cache differs from the contract's append"
    assert torch.equal(c["v_cache"], v_ref), "v_cache differs from the contract's append"
    out_ref, lse_ref = fwd_kv_call(c, k_ref.clone(), v_ref.clone(), appends=False)
    assert torch.isfinite(out).all()
    assert_same_attention(out, lse, out_ref, lse_ref)


# (head_dim, nheads, nheads_k, new rows, query rows): on the sm_90 path each CTA of an
# (entry, kv head) copies its slice of the new rows: 25 rows of 4 query heads' CTAs, 128 of
# one head's at head dims 64 and 256, 1024 of the one query block of a short q.
PREFILL_COPIES = [(128, 8, 2, 300, 300), (64, 4, 4, 256, 256), (256, 4, 4, 256, 256),
                  (64, 2, 2, 1024, 128)]  # fmt: skip


@pytest.mark.parametrize(("head_dim", "nheads", "nheads_k", "seqlen_new", "seqlen_q"),
                         PREFILL_COPIES, ids=["group4-d128", "group1-d64", "group1-d256",
                                              "short-q-d64"])  # fmt: skip
def test_prefill_append_across_shapes_matches_the_contract(
    head_dim: int, nheads: int, nheads_k: int, seqlen_new: int, seqlen_q: int
) -> None:
    from test_split_kv_gpu import compiled

    if not compiled(head_dim, torch.bfloat16):
        pytest.skip(f"head dim {head_dim} not in this build")
    c = make_append_case("batch_idx", 0, seqlen_new, False, torch.bfloat16, capacity=1536,
                         batch=2, nheads=nheads, nheads_k=nheads_k, head_dim=head_dim)  # fmt: skip
    q = c["q"][:, seqlen_new - seqlen_q :]
    k_ref, v_ref = reference_caches(c)
    repoison()
    out, lse = fwd_kv_call(c, c["k_cache"], c["v_cache"], q=q)
    torch.cuda.synchronize()
    assert torch.equal(c["k_cache"], k_ref), "k_cache differs from the contract's append"
    assert torch.equal(c["v_cache"], v_ref), "v_cache differs from the contract's append"
    out_ref, lse_ref = fwd_kv_call(c, k_ref.clone(), v_ref.clone(), q=q, appends=False)
    assert torch.isfinite(out).all()
    assert_same_attention(out, lse, out_ref, lse_ref)


def test_fused_append_through_flash_attn_with_kvcache_matches_the_python_append() -> None:
    """The prefill shape of issue 13 (batch 1, 32/8 heads, head_dim 128, 2048 new keys):
    the fused path leaves the caches the Python append_ leaves, and the same output."""
    from flash_attn import _kvcache

    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    q = torch.randn(1, 2048, 32, 128, device=dev, dtype=dt)
    k, v = torch.randn(1, 2048, 8, 128, device=dev, dtype=dt), torch.randn(1, 2048, 8, 128,
                                                                           device=dev, dtype=dt)
    k_cache = torch.randn(1, 4096, 8, 128, device=dev, dtype=dt)
    v_cache = torch.randn(1, 4096, 8, 128, device=dev, dtype=dt)
    k_py, v_py = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor([100], dtype=torch.int32, device=dev)
    out, lse = fa().flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                            causal=True, return_softmax_lse=True)  # fmt: skip
    _kvcache.append_(k_py, v_py, k, v, seqlens, None, None)
    assert torch.equal(k_cache, k_py) and torch.equal(v_cache, v_py)
    out_py, lse_py = fa().flash_attn_with_kvcache(
        q, k_py, v_py, cache_seqlens=seqlens + 2048, causal=True, return_softmax_lse=True
    )
    assert_same_attention(out, lse, out_py, lse_py)


def test_k_and_v_of_no_rows_append_nothing() -> None:
    c = Case(batch=3, seqlen_q=2, seqlen_new=0, seqlen_cache=64, head_dim=128, page_size=16)
    inp = make_inputs(c, device="cuda", dtype=torch.bfloat16)
    empty = torch.zeros(3, 0, c.nheads_k, 128, device="cuda", dtype=torch.bfloat16)
    k_before, v_before = inp.k_cache.clone(), inp.v_cache.clone()
    out = fa().flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, empty, empty, cache_seqlens=inp.cache_seqlens,
        **inp.kwargs,
    )  # fmt: skip
    assert torch.equal(inp.k_cache, k_before) and torch.equal(inp.v_cache, v_before)
    out_none = fa().flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, cache_seqlens=inp.cache_seqlens, **inp.kwargs
    )
    assert torch.equal(out, out_none)


def guarded(t: torch.Tensor, guard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a copy of t inside a buffer with `guard` random elements on each side."""
    buffer = torch.randn(guard + t.numel() + guard, device=t.device).to(t.dtype)
    view = buffer[guard : guard + t.numel()].view(t.shape)
    view.copy_(t)
    return buffer, view


def assert_guards_unchanged(*buffers: tuple[torch.Tensor, torch.Tensor], guard: int) -> None:
    """Each (buffer, its copy from before): the `guard` elements on each side of the
    cache inside it (guarded()) are bit-identical."""
    for buffer, before in buffers:
        n = buffer.numel() - 2 * guard
        assert torch.equal(buffer[:guard], before[:guard]), "written before the cache"
        assert torch.equal(buffer[guard + n :], before[guard + n :]), "written after it"


BAD_VALUES = {
    # name: (layout, page_size, seqused_k or cache_seqlens + seqlen_new, batch_idx, table edits)
    "keys-negative": ("dense", 0, [-5, 2, 3], None, None),
    "keys-past-the-end": ("dense", 0, [512 + 3, 512 + 4, 2**31 - 1], None, None),
    "rows-out-of-range": ("batch_idx", 0, [9, 9, 9], [-1, 5, 4], None),  # 5 rows: 0..4
    "pages-out-of-range": ("paged", 16, [40, 40, 34], None, [-1, 9999, 2**31 - 1]),
    "paged-keys-out-of-range": ("paged", 256, [-3, 512 + 2, -(2**31)], None, None),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_fused_append_writes_nothing_outside_the_cache(name: str) -> None:
    """Any index values, the value checks off: the rows out of range are skipped, the
    rest written, and the memory around the caches stays bit-identical. The op runs
    with 0 queries, so only the append reads the indices."""
    layout, page_size, seqused, batch_idx, table_edit = BAD_VALUES[name]
    c = make_append_case(layout, page_size, 4, False, torch.bfloat16)
    dev = "cuda"
    c["seqused_k"] = torch.tensor(seqused, dtype=torch.int32, device=dev)
    if batch_idx is not None:
        c["batch_idx"] = torch.tensor(batch_idx, dtype=torch.int32, device=dev)
    if table_edit is not None:
        c["table"][:, 2] = torch.tensor(table_edit, dtype=torch.int32, device=dev)
    row = c["k_cache"][0].numel()  # one cache row (or page): row -1 or row n lands in a guard
    k_buffer, c["k_cache"] = guarded(c["k_cache"], 2 * row)
    v_buffer, c["v_cache"] = guarded(c["v_cache"], 2 * row)
    k_before, v_before = k_buffer.clone(), v_buffer.clone()
    k_ref, v_ref = reference_caches(c)
    no_queries = c["q"][:, :0]
    out, lse = fwd_kv_call(c, c["k_cache"], c["v_cache"], q=no_queries)
    torch.cuda.synchronize()
    assert out.shape == no_queries.shape and lse.shape == (3, 8, 0)
    assert torch.equal(c["k_cache"], k_ref) and torch.equal(c["v_cache"], v_ref)
    assert_guards_unchanged((k_buffer, k_before), (v_buffer, v_before), guard=2 * row)


PREFILL_BAD_VALUES = {
    # name: (layout, seqused_k (keys after the append), batch_idx); 64 new rows an entry
    "keys-past-the-end": ("dense", [512 + 3, 512 + 40, 64], None),
    "rows-out-of-range": ("batch_idx", [70, 70, 70], [-1, 5, 4]),  # 5 rows: 0..4
}


@pytest.mark.parametrize("name", list(PREFILL_BAD_VALUES))
def test_prefill_append_writes_nothing_outside_the_cache(name: str) -> None:
    """As above with queries (64 new rows, 4 query heads a kv head: on the sm_90 path the
    attention kernel writes the new rows itself; on the sm80 path the append kernel runs
    first): keys past the capacity and cache rows out of range are skipped, the rest
    written, the memory around the caches bit-identical. The values stay where the
    attention's own reads fall inside the guards (its output is not checked)."""
    layout, seqused, batch_idx = PREFILL_BAD_VALUES[name]
    c = make_append_case(layout, 0, 64, False, torch.bfloat16)
    dev = "cuda"
    c["seqused_k"] = torch.tensor(seqused, dtype=torch.int32, device=dev)
    if batch_idx is not None:
        c["batch_idx"] = torch.tensor(batch_idx, dtype=torch.int32, device=dev)
    row = c["k_cache"][0].numel()
    k_buffer, c["k_cache"] = guarded(c["k_cache"], 2 * row)
    v_buffer, c["v_cache"] = guarded(c["v_cache"], 2 * row)
    k_before, v_before = k_buffer.clone(), v_buffer.clone()
    k_ref, v_ref = reference_caches(c)
    repoison()
    fwd_kv_call(c, c["k_cache"], c["v_cache"])
    torch.cuda.synchronize()
    assert torch.equal(c["k_cache"], k_ref) and torch.equal(c["v_cache"], v_ref)
    assert_guards_unchanged((k_buffer, k_before), (v_buffer, v_before), guard=2 * row)


@pytest.mark.parametrize("checks", ["off", "on"])
def test_flash_attn_with_kvcache_writes_nothing_outside_the_cache(
    monkeypatch: pytest.MonkeyPatch, checks: str
) -> None:
    """The bad values above through the API. With FLASH_ATTN_KVCACHE_CHECKS=0 (0 queries:
    the append alone) the memory around the caches stays bit-identical; with the checks
    on (the op's device check) the call is refused and not a byte is written, inside the
    caches or around them."""
    from flash_attn.errors import InputError

    if checks == "off":
        monkeypatch.setenv("FLASH_ATTN_KVCACHE_CHECKS", "0")
    for name in ("keys-past-the-end", "rows-out-of-range", "pages-out-of-range"):
        layout, page_size, seqused, batch_idx, table_edit = BAD_VALUES[name]
        c = make_append_case(layout, page_size, 4, False, torch.bfloat16)
        row = c["k_cache"][0].numel()
        k_buffer, k_cache = guarded(c["k_cache"], 2 * row)
        v_buffer, v_cache = guarded(c["v_cache"], 2 * row)
        k_before, v_before = k_buffer.clone(), v_buffer.clone()
        kwargs: dict[str, Any] = {}
        if batch_idx is not None:
            kwargs["cache_batch_idx"] = torch.tensor(batch_idx, dtype=torch.int32, device="cuda")
        if page_size:
            table = c["table"]
            if table_edit is not None:
                table[:, 2] = torch.tensor(table_edit, dtype=torch.int32, device="cuda")
            kwargs["block_table"] = table
        seqlens = torch.tensor(seqused, dtype=torch.int64) - 4
        seqlens = seqlens.clamp(-(2**31), 2**31 - 1).to(torch.int32).cuda()
        q = c["q"][:, :0] if checks == "off" else c["q"]
        args = (q, k_cache, v_cache, c["k_new"], c["v_new"])
        if checks == "on":
            with pytest.raises(InputError):
                fa().flash_attn_with_kvcache(*args, cache_seqlens=seqlens, **kwargs)
            torch.cuda.synchronize()
            assert torch.equal(k_buffer, k_before) and torch.equal(v_buffer, v_before), name
            continue
        fa().flash_attn_with_kvcache(*args, cache_seqlens=seqlens, **kwargs)
        torch.cuda.synchronize()
        for buffer, before in ((k_buffer, k_before), (v_buffer, v_before)):
            n = buffer.numel() - 4 * row
            assert torch.equal(buffer[: 2 * row], before[: 2 * row]), name
            assert torch.equal(buffer[2 * row + n :], before[2 * row + n :]), name


def test_a_call_this_build_has_no_kernel_for_appends_nothing() -> None:
    """The op plans the attention before it launches anything: with no kernel for the
    dtype, even the append that must run first (caches the kernels read as a copy) does
    not. Runs on a build that lacks a dtype (else skips: every call has its kernel)."""
    from test_split_kv_gpu import compiled

    from flash_attn import _ops

    missing = [dt for dt in (torch.float16, torch.bfloat16) if not compiled(64, dt)]
    if not missing:
        pytest.skip("this build has a forward kernel for every dtype")
    c = make_append_case("dense", 0, 4, True, missing[0])  # odd layouts: appended first
    k_before, v_before = c["k_cache"].clone(), c["v_cache"].clone()
    seqused = c["seqused_k"] - 4  # the keys before the append, as the op takes them
    with pytest.raises(RuntimeError, match="this build has no forward kernel"):
        _ops.fwd_kv(c["q"], c["k_cache"], c["v_cache"], None, None, seqused, None, None, None, 4,
                    512, 0.1, -1, 0, 0.0, None, 0, c["k_new"], c["v_new"])  # fmt: skip
    torch.cuda.synchronize()
    assert torch.equal(c["k_cache"], k_before) and torch.equal(c["v_cache"], v_before)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("v_new_only", "k_new and v_new go together"),
        ("shape", r"v_new must have shape \(batch, seqlen_new, .*\) = \(3, 4, 2, 128\)"),
        ("dtype", "k_new has dtype float16 but the cache k has bfloat16"),
        ("device", "k_new is on cpu but the cache k is on cuda"),
        ("varlen", "need a dense q"),
        ("cache_stride", "last dimension must be contiguous"),
    ],
)  # fmt: skip
def test_the_binding_refuses_bad_k_new(change: str, message: str) -> None:
    from flash_attn import _ops

    c = make_append_case("dense", 0, 4, False, torch.bfloat16)
    k_before = c["k_cache"].clone()
    args = [c["q"], c["k_cache"], c["v_cache"], None, None, c["seqused_k"], None, None, None, 4,
            512, 0.1, -1, 0, 0.0, None, 0, c["k_new"], c["v_new"]]  # fmt: skip
    if change == "v_new_only":
        args[17] = None
    elif change == "shape":
        args[18] = c["v_new"][:, :, :1]
    elif change == "dtype":
        args[17] = c["k_new"].half()
    elif change == "device":
        args[17] = c["k_new"].cpu()
    elif change == "varlen":
        q = c["q"].flatten(0, 1)
        cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device="cuda")
        args[0], args[1], args[2] = q, c["k_cache"].flatten(0, 1), c["v_cache"].flatten(0, 1)
        args[3], args[4], args[5] = cu, cu * 128, None
    else:
        args[1] = c["k_cache"].transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(RuntimeError, match=message):
        _ops.fwd_kv(*args)
    torch.cuda.synchronize()
    assert torch.equal(c["k_cache"], k_before)
