"""flash_attn_with_kvcache and flash_attn_varlen_func(block_table=...) on a CPU-only
machine, over the CPU stand-in for flash_attn._C (test_api_cpu.py: its fwd_kv is the
op contract written out).

What is tested is the Python layer: the in-place append (dense, cache_batch_idx,
paged), the rotary positions, what reaches the op, the checks. The expected values
come from a reference written like upstream's test: the cache updated by hand, then
attention over each sequence's keys [cache_leftpad, cache_seqlens + seqlen_new).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from kvcache_ref import BAD_VALUES, WRITE_PATHS, Case, Inputs, expected, make_inputs, rotate_ref
from reference import attention_ref
from test_api_cpu import STUB_NAMESPACE, StubKernels, define_stub_ops, stub  # noqa: F401

import flash_attn
from flash_attn import _kvcache, _ops
from flash_attn.errors import InputError

DT = torch.float16


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-3, rtol=2e-3)


def _rotary_stand_in(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: int | torch.Tensor,
    interleaved: bool,
) -> torch.Tensor:  # fmt: skip
    """The Triton rotary's semantics on CPU: row i of sequence b at offsets[b] + i; a
    row whose position is outside the tables is left as it is."""
    batch, seqlen = x.shape[0], x.shape[1]
    start = offsets if isinstance(offsets, torch.Tensor) else torch.full((batch,), offsets)
    positions = start.long()[:, None] + torch.arange(seqlen)
    inside = (positions >= 0) & (positions < cos.shape[0])
    rotated = rotate_ref(x, cos, sin, positions.clamp(0, cos.shape[0] - 1), interleaved)
    return torch.where(inside[:, :, None, None], rotated, x)


@pytest.fixture
def kv(stub: StubKernels, monkeypatch: pytest.MonkeyPatch) -> Iterator[StubKernels]:  # noqa: F811
    monkeypatch.setattr(_kvcache, "_apply_rotary", _rotary_stand_in)
    yield stub


# --- the cases -----------------------------------------------------------------------


CASES = [
    Case(),
    Case(seqlen_q=4, seqlen_new=4),
    Case(seqlen_q=5, seqlen_new=2, causal=False),
    Case(seqlen_q=3, seqlen_new=3, window=(6, 0), causal=False),
    Case(seqlen_q=2, seqlen_new=2, softcap=3.0, alibi=True, num_splits=3),
    Case(seqlen_new=0, causal=False),
    Case(seqlen_q=3, seqlen_new=0, causal=True, seqlens_int=True),
    Case(batch_idx=True, seqlen_q=2, seqlen_new=2),
    Case(leftpad=True, seqlen_q=3, seqlen_new=3),
    Case(leftpad=True, batch_idx=True, alibi=True, seqlen_q=2, seqlen_new=1),
    Case(seqlens_int=True, seqlen_q=2, seqlen_new=2, nheads_k=1),
    Case(head_dim=20, seqlen_q=3, seqlen_new=3, rotary="neox", rotary_dim=12),
    Case(rotary="interleaved", seqlen_q=4, seqlen_new=4),
    Case(rotary="neox", seqlen_q=4, seqlen_new=2, causal=False),
    Case(rotary="interleaved", seqlen_q=3, seqlen_new=3, causal=False, window=(4, 1)),
    Case(rotary="neox", leftpad=True, seqlen_q=2, seqlen_new=2, seqlens_int=True),
    Case(page_size=16, seqlen_q=1, seqlen_new=1, seqlen_cache=48),
    Case(page_size=16, seqlen_q=3, seqlen_new=3, seqlen_cache=48, rotary="neox"),
    Case(page_size=16, seqlen_new=0, seqlen_cache=32, causal=False, alibi=True),
    Case(page_size=32, seqlen_q=70, seqlen_new=70, seqlen_cache=96, nheads=4, nheads_k=2),
    Case(
        page_size=16,
        seqlen_q=40,
        seqlen_new=40,
        seqlen_cache=64,
        nheads=8,
        nheads_k=2,
        seqlens_int=True,
        window=(8, 0),
    ),  # fmt: skip
]


@pytest.mark.parametrize("c", CASES, ids=[str(i) for i in range(len(CASES))])
def test_kvcache_matches_the_reference(kv: StubKernels, c: Case) -> None:
    inp = make_inputs(c)
    ref = expected(c, inp)
    out_ref, lse_ref, k_cache_ref, v_cache_ref = ref.out, ref.lse, ref.k_cache, ref.v_cache
    out, lse = flash_attn.flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=inp.cache_seqlens,
        return_softmax_lse=True, **inp.kwargs,
    )  # fmt: skip
    assert out.shape == inp.q.shape and out.dtype == DT
    assert lse.shape == (c.batch, c.nheads, c.seqlen_q) and lse.dtype == torch.float32
    assert_close(out, out_ref)
    torch.testing.assert_close(lse, lse_ref, atol=2e-3, rtol=2e-3)
    # the append, and nothing else, changed the caches (bit for bit)
    assert torch.equal(inp.k_cache, k_cache_ref)
    assert torch.equal(inp.v_cache, v_cache_ref)
    ((name, call),) = kv.calls
    assert name == "fwd_kv"
    assert call["num_splits"] == c.num_splits
    assert call["head_dim"] % 8 == 0
    group_rows = c.seqlen_q * c.nheads // c.nheads_k
    gathered = c.page_size > 0 and group_rows >= _kvcache.PAGED_PREFILL_ROWS
    assert call["paged"] == (c.page_size > 0 and not gathered)
    # the op appends (fused) unless it gets a copy of the caches
    assert call["appended"] == (c.seqlen_new > 0 and c.head_dim % 8 == 0 and not gathered)


def test_out_only_without_return_softmax_lse(kv: StubKernels) -> None:
    c = Case(seqlen_q=2, seqlen_new=2)
    inp = make_inputs(c)
    out = flash_attn.flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=inp.cache_seqlens,
        **inp.kwargs,
    )  # fmt: skip
    assert isinstance(out, torch.Tensor)


def test_whole_cache_without_cache_seqlens(kv: StubKernels) -> None:
    c = Case(seqlen_new=0, causal=False)
    inp = make_inputs(c)
    out = flash_attn.flash_attn_with_kvcache(inp.q, inp.k_cache, inp.v_cache)
    assert_close(out, attention_ref(inp.q, inp.k_cache, inp.v_cache)[0])


def test_decode_steps_fill_the_cache_like_one_prefill(kv: StubKernels) -> None:
    """Appending one token at a time gives the cache (and last output) that one call
    with all the tokens gives."""
    c = Case(batch=2, seqlen_q=6, seqlen_new=6, seqlen_cache=16, rotary="neox")
    inp = make_inputs(c)
    seqlens = torch.tensor([0, 5], dtype=torch.int32)
    k_step, v_step = inp.k_cache.clone(), inp.v_cache.clone()
    assert inp.k is not None and inp.v is not None
    for i in range(6):
        out_step = flash_attn.flash_attn_with_kvcache(
            inp.q[:, i : i + 1], k_step, v_step, inp.k[:, i : i + 1], inp.v[:, i : i + 1],
            cache_seqlens=seqlens + i, **inp.kwargs,
        )  # fmt: skip
    out_all = flash_attn.flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=seqlens, **inp.kwargs
    )
    assert torch.equal(k_step, inp.k_cache) and torch.equal(v_step, inp.v_cache)
    assert_close(out_step[:, 0], out_all[:, -1])


def test_no_gradient_and_leaf_caches_that_require_grad(kv: StubKernels) -> None:
    inp = make_inputs(Case(seqlen_q=2, seqlen_new=2))
    q = inp.q.requires_grad_(True)
    k_cache = inp.k_cache.requires_grad_(True)
    out = flash_attn.flash_attn_with_kvcache(
        q, k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=inp.cache_seqlens
    )
    assert out.grad_fn is None and not out.requires_grad


def test_paged_entries_past_the_last_page_are_not_read(kv: StubKernels) -> None:
    """transformers pads block_table with -1 past each sequence's pages."""
    c = Case(page_size=16, seqlen_cache=64, seqlen_new=1)
    inp = make_inputs(c)
    table = inp.kwargs["block_table"]
    seqlens = torch.tensor([3, 17, 40], dtype=torch.int32)
    for b, n in enumerate((seqlens + 1).tolist()):
        table[b, -(-n // 16) :] = -1
    inp.seqlens = seqlens
    ref = expected(c, replace(inp, kwargs={**inp.kwargs, "block_table": table}))
    out_ref, k_ref = ref.out, ref.k_cache
    out = flash_attn.flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=seqlens, **inp.kwargs
    )
    assert_close(out, out_ref)
    assert torch.equal(inp.k_cache, k_ref)


def _run_against_reference(kv: StubKernels, c: Case, inp: Inputs) -> dict[str, Any]:
    """flash_attn_with_kvcache on inp: its output and both caches against the reference
    (bit for bit for the caches); returns what the one fwd_kv call was given."""
    ref = expected(c, inp)
    out = flash_attn.flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=inp.cache_seqlens,
        **inp.kwargs,
    )  # fmt: skip
    assert_close(out, ref.out)
    assert torch.equal(inp.k_cache, ref.k_cache) and torch.equal(inp.v_cache, ref.v_cache)
    ((_, call),) = kv.calls
    return call


@pytest.mark.parametrize(
    ("c", "fused"),
    [
        (Case(seqlen_q=2, seqlen_new=2), True),
        (Case(batch_idx=True, seqlen_new=3, seqlen_q=3), True),
        (Case(page_size=16, seqlen_cache=48, seqlen_new=2, seqlen_q=2), True),
        (Case(rotary="neox", seqlen_q=2, seqlen_new=2), True),  # the rotated k is appended
        (Case(head_dim=20, seqlen_q=2, seqlen_new=2), False),  # padded: the op gets a copy
        (Case(page_size=16, seqlen_q=40, seqlen_new=40, seqlen_cache=64, nheads=8, nheads_k=2),
         False),  # a paged prefill reads gathered pages: the real pages are written first
    ],
)  # fmt: skip
def test_the_op_appends_unless_it_reads_a_copy(
    kv: StubKernels, monkeypatch: pytest.MonkeyPatch, c: Case, fused: bool
) -> None:
    python_appends: list[int] = []
    python_append = _kvcache.append_

    def recording_append(*args: Any) -> None:
        python_appends.append(1)
        python_append(*args)

    monkeypatch.setattr(_kvcache, "append_", recording_append)
    inp = make_inputs(c)
    call = _run_against_reference(kv, c, inp)
    assert call["appended"] == fused
    assert python_appends == ([] if fused else [1])


# --- where the index values are checked: on the device by the op, or on the host ------


def _no_host_read(*args: Any, **kwargs: Any) -> int:
    raise AssertionError("the index values were read on the host")


@pytest.mark.parametrize(
    ("c", "on_device"),
    [
        (Case(seqlen_q=2, seqlen_new=2), True),
        (Case(seqlen_new=0, seqlen_q=3), True),  # no append: the attention alone
        (Case(batch_idx=True, leftpad=True, seqlen_new=3, seqlen_q=3), True),
        (Case(page_size=16, seqlen_cache=48, seqlen_new=2, seqlen_q=2), True),
        (Case(rotary="neox", seqlen_q=2, seqlen_new=2), True),
        (Case(seqlens_int=True, batch_idx=True, seqlen_q=2, seqlen_new=2), True),
        (Case(seqlens_int=True, seqlen_q=2, seqlen_new=2), False),  # no index tensor
        (Case(head_dim=20, seqlen_q=2, seqlen_new=2), False),  # the Python append writes
        (Case(page_size=16, seqlen_q=40, seqlen_new=40, seqlen_cache=64, nheads=8, nheads_k=2),
         False),  # a paged prefill gathers the pages it reads
    ],
)  # fmt: skip
def test_valid_values_are_checked_on_the_device_where_the_op_writes(
    kv: StubKernels, monkeypatch: pytest.MonkeyPatch, c: Case, on_device: bool
) -> None:
    """A checked call whose caches the op reads and writes itself hands the index check
    to the op (a verdict) and never reads the values on the host, so nothing waits for
    the GPU before the launch; the results are those of the reference."""
    if on_device:
        monkeypatch.setattr(_kvcache, "check_cache_values", _no_host_read)
    inp = make_inputs(c)
    _run_against_reference(kv, c, inp)
    assert (kv.device_checks, kv.refused) == ((1, 0) if on_device else (0, 0))


def test_no_device_check_with_the_checks_off(
    kv: StubKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_ATTN_KVCACHE_CHECKS", "0")
    c = Case(seqlen_q=2, seqlen_new=2)
    _run_against_reference(kv, c, make_inputs(c))
    assert kv.device_checks == 0


def test_the_device_check_covers_the_rotary_tables(kv: StubKernels) -> None:
    """Rotary tables one row short for sequence 1's new keys: refused on the device
    (the Triton rotary leaves such rows unrotated, so the op must say no), with the host
    check's message, the caches unchanged."""
    c = Case(rotary="neox", seqlen_q=2, seqlen_new=2)
    inp = make_inputs(c)
    rows = c.seqlen_cache - 8
    seqlens = torch.zeros(c.batch, dtype=torch.int32)
    seqlens[1] = rows - c.seqlen_new + 1  # its keys fit the cache, not the tables
    args = {**inp.kwargs, "cache_seqlens": seqlens}
    args["rotary_cos"], args["rotary_sin"] = args["rotary_cos"][:rows], args["rotary_sin"][:rows]
    k_before = inp.k_cache.clone()
    with pytest.raises(InputError, match=f"rotary_cos and rotary_sin have {rows} rows"):
        flash_attn.flash_attn_with_kvcache(inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, **args)
    assert torch.equal(inp.k_cache, k_before)
    assert (kv.device_checks, kv.refused) == (1, 1)


def test_an_int_cache_seqlens_has_its_rotary_rows_checked_on_the_host(kv: StubKernels) -> None:
    c = Case(rotary="neox", seqlens_int=True, page_size=16, seqlen_cache=48, seqlen_q=2,
             seqlen_new=2)  # fmt: skip
    inp = make_inputs(c)
    rows = 20
    args = {**inp.kwargs, "cache_seqlens": rows - 1}  # + 2 new keys: inside the cache
    args["rotary_cos"], args["rotary_sin"] = args["rotary_cos"][:rows], args["rotary_sin"][:rows]
    with pytest.raises(InputError, match=f"rotary_cos and rotary_sin have {rows} rows"):
        flash_attn.flash_attn_with_kvcache(inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, **args)
    assert kv.device_checks == 0 and kv.calls == []


def test_a_device_refusal_the_host_check_passes_is_reported(
    kv: StubKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two checks apply one rule; should they disagree, the call still fails, saying
    what the device saw (nothing was written)."""
    import test_api_cpu

    monkeypatch.setattr(test_api_cpu, "index_verdict_ref", lambda *a: _ops.KV_BAD_PAGE)
    c = Case(page_size=16, seqlen_cache=48, seqlen_new=2, seqlen_q=2)
    inp = make_inputs(c)
    k_before = inp.k_cache.clone()
    with pytest.raises(InputError, match="refused on the device .a block_table entry"):
        flash_attn.flash_attn_with_kvcache(
            inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v, cache_seqlens=inp.cache_seqlens,
            **inp.kwargs,
        )  # fmt: skip
    assert torch.equal(inp.k_cache, k_before)


def test_verdict_cells_are_per_thread() -> None:
    import threading

    from flash_attn._kvcache_checks import verdict_buffer

    mine = verdict_buffer(torch.device("cpu"))
    assert verdict_buffer(torch.device("cpu")) is mine
    assert mine.dtype == torch.int32 and mine.numel() == 1 and not mine.is_pinned()
    theirs: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: theirs.append(verdict_buffer(torch.device("cpu"))))
    t.start()
    t.join()
    assert theirs[0] is not mine


def test_k_and_v_of_no_rows_append_nothing(kv: StubKernels) -> None:
    c = Case(seqlen_new=0, seqlen_q=2)
    inp = make_inputs(c)
    empty = torch.zeros(c.batch, 0, c.nheads_k, c.head_dim, dtype=DT)
    k_before = inp.k_cache.clone()
    out = flash_attn.flash_attn_with_kvcache(
        inp.q, inp.k_cache, inp.v_cache, empty, empty, cache_seqlens=inp.cache_seqlens,
        **inp.kwargs,
    )  # fmt: skip
    assert_close(out, expected(c, inp).out)
    assert torch.equal(inp.k_cache, k_before)


@pytest.mark.parametrize("seqlen_new", [0, 2])
def test_a_strided_cache_seqlens_reaches_the_op_contiguous(
    kv: StubKernels, seqlen_new: int
) -> None:
    """With an append the op takes cache_seqlens as it is (it adds seqlen_new itself): a
    strided view is made contiguous first, as the binding requires."""
    c = Case(seqlen_q=2, seqlen_new=seqlen_new)
    inp = make_inputs(c)
    assert isinstance(inp.cache_seqlens, torch.Tensor)
    wide = torch.stack([inp.cache_seqlens, torch.full_like(inp.cache_seqlens, 10**6)], 1)
    inp.cache_seqlens = wide[:, 0]  # every other element of a buffer
    assert not inp.cache_seqlens.is_contiguous()
    _run_against_reference(kv, c, inp)


@pytest.mark.parametrize("seqlen_new", [0, 2])
def test_an_int_cache_seqlens_cuts_a_dense_cache_to_its_keys(
    kv: StubKernels, seqlen_new: int
) -> None:
    """No seqused_k tensor is made: the op gets the first cache_seqlens + seqlen_new keys."""
    c = Case(seqlens_int=True, seqlen_q=2, seqlen_new=seqlen_new, batch_idx=True)
    inp = make_inputs(c)
    call = _run_against_reference(kv, c, inp)
    assert isinstance(inp.cache_seqlens, int)
    assert call["k_shape"][1] == inp.cache_seqlens + seqlen_new
    assert call["max_seqlen_k"] == inp.cache_seqlens + seqlen_new


def test_an_int_cache_seqlens_is_checked_with_the_value_checks_off(
    kv: StubKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An int is a plain value: checking it costs no device sync, so it is always done."""
    monkeypatch.setenv("FLASH_ATTN_KVCACHE_CHECKS", "0")
    inp, args = _bad(Case(seqlens_int=True), cache_seqlens=40)
    before = inp.k_cache.clone()
    with pytest.raises(InputError, match="exceeds the cache"):
        flash_attn.flash_attn_with_kvcache(inp.q, inp.k_cache, inp.v_cache, **args)
    assert torch.equal(inp.k_cache, before) and kv.calls == []


def test_gather_pages_orders_keys_as_the_block_table() -> None:
    cache = torch.arange(6 * 16).view(6, 16, 1, 1).float()
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    got = _kvcache.gather_pages(cache, table, 2)
    assert got.shape == (2, 32, 1, 1)
    for b in range(2):
        for j in range(32):
            page = int(table[b, j // 16])
            assert got[b, j, 0, 0] == cache[page, j % 16, 0, 0]


# --- bad input: a clear error, nothing written, nothing launched ---------------------


def _bad(c: Case, **changes: Any) -> tuple[Inputs, dict[str, Any]]:
    inp = make_inputs(c)
    args = {"k": inp.k, "v": inp.v, "cache_seqlens": inp.cache_seqlens, **inp.kwargs}
    args.update(changes)
    return inp, args


def _i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


BAD = [
    # (case, changes, message)
    (Case(), {"cache_seqlens": _i32(39, 40, 2)}, r"cache_seqlens \+ seqlen_new = 40 \+ 1"),
    (Case(seqlens_int=True), {"cache_seqlens": 40}, "exceeds the cache"),
    (Case(), {"cache_seqlens": _i32(1, -1, 2)}, "cache_seqlens must be >= 0"),
    (Case(), {"cache_seqlens": -2}, "cache_seqlens must be >= 0"),
    (Case(), {"cache_seqlens": _i32(1, 2, 3).long()}, "int32"),
    (Case(), {"cache_seqlens": _i32(1, 2)}, r"shape \(batch,\)"),
    (Case(), {"cache_seqlens": None}, "pass cache_seqlens"),
    (Case(), {"cache_seqlens": 2.0}, "cache_seqlens must be an int"),
    (Case(), {"v": None}, "k was given without its partner"),
    (Case(seqlen_new=0), {"v": torch.zeros(3, 1, 2, 32, dtype=DT)}, "v was given without"),
    (Case(), {"k": torch.zeros(3, 1, 4, 32, dtype=DT)}, "k and v must have shape"),
    (Case(), {"k": torch.zeros(3, 1, 2, 32), "v": torch.zeros(3, 1, 2, 32)}, "q's dtype"),
    (Case(page_size=16, seqlen_cache=32), {"block_table": _i32(0, 1, 2, 3, 4, 5).view(3, 2)
                                           .index_fill(0, torch.tensor([1]), 99)},
     r"block_table\[1, 0\] = 99 is not a page of the pool"),  # fmt: skip
    (Case(page_size=16, seqlen_cache=32), {"cache_seqlens": _i32(32, 1, 1)},
     "block_table's capacity"),  # fmt: skip
    (Case(page_size=16, seqlen_cache=32), {"block_table": _i32(0, 1, 2).view(3, 1)},
     "block_table's capacity"),  # fmt: skip
    (Case(page_size=16), {"cache_batch_idx": _i32(0, 1, 2)}, "cache_batch_idx cannot"),
    (Case(page_size=16), {"cache_leftpad": _i32(0, 0, 0)}, "cache_leftpad cannot"),
    (Case(page_size=16), {"block_table": torch.zeros(3, 3, dtype=torch.int64)}, "int32"),
    (Case(batch_idx=True), {"cache_batch_idx": _i32(0, 5, 1)}, "cache_batch_idx holds 5"),
    (Case(batch_idx=True), {"cache_batch_idx": _i32(0, -1, 1)}, "cache_batch_idx holds -1"),
    (Case(), {"cache_leftpad": _i32(0, 0, 99)}, "cache_leftpad must be in"),
    (Case(rotary="neox", seqlen_q=4, seqlen_new=4),
     {"rotary_cos": torch.zeros(20, 8, dtype=DT), "rotary_sin": torch.zeros(20, 8, dtype=DT)},
     "rotary_cos and rotary_sin have 20 rows"),  # fmt: skip
    (Case(rotary="neox"), {"rotary_sin": None}, "rotary_cos was given without"),
    (Case(rotary="neox", seqlen_new=0), {}, "need k and v"),
    (Case(rotary="neox"), {"rotary_cos": torch.zeros(40, 20, dtype=DT),
                           "rotary_sin": torch.zeros(40, 20, dtype=DT)}, "rotary_dim"),
    (Case(rotary="neox"), {"rotary_cos": torch.zeros(40, 8, dtype=torch.float64),
                           "rotary_sin": torch.zeros(40, 8, dtype=torch.float64)}, "float32"),
    (Case(), {"num_splits": -1}, "num_splits must be in 0..128"),
    (Case(), {"num_splits": 129}, "num_splits must be in 0..128"),
    (Case(), {"num_splits": 1.5}, "num_splits must be an int"),
    (Case(), {"alibi_slopes": torch.zeros(4, dtype=DT)}, "float32"),
    (Case(), {"window_size": (1, 2, 3)}, "window_size"),
]  # fmt: skip


@pytest.mark.parametrize(("c", "changes", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_refused_before_anything_is_written(
    kv: StubKernels, c: Case, changes: dict[str, Any], message: str
) -> None:
    inp, args = _bad(c, **changes)
    k_before, v_before = inp.k_cache.clone(), inp.v_cache.clone()
    with pytest.raises(InputError, match=message):
        flash_attn.flash_attn_with_kvcache(inp.q, inp.k_cache, inp.v_cache, **args)
    assert torch.equal(inp.k_cache, k_before) and torch.equal(inp.v_cache, v_before)
    assert kv.calls == []


@pytest.mark.parametrize(
    ("path", "bad"), BAD_VALUES, ids=[f"{p}-{b.__name__[1:]}" for p, b in BAD_VALUES]
)
def test_bad_index_values_leave_the_cache_unchanged_on_every_path(
    kv: StubKernels, path: str, bad: Any
) -> None:
    """The values are checked before anything writes the cache: the exact message, the
    caches unchanged bit for bit. Where the op writes the caches itself (fused) it checks
    them on the device and refuses the call; elsewhere the host check comes first and
    nothing is launched."""
    c = WRITE_PATHS[path]
    changes, message = bad(c)
    inp, args = _bad(c, **changes)
    k_before, v_before = inp.k_cache.clone(), inp.v_cache.clone()
    with pytest.raises(InputError) as raised:
        flash_attn.flash_attn_with_kvcache(inp.q, inp.k_cache, inp.v_cache, **args)
    assert str(raised.value) == message
    assert torch.equal(inp.k_cache, k_before) and torch.equal(inp.v_cache, v_before)
    assert kv.calls == []
    fused = path.startswith("fused")
    assert (kv.device_checks, kv.refused) == ((1, 1) if fused else (0, 0))


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("page_size", "multiple of 16"),
        ("cache_dtype", "same dtype"),
        ("cache_stride", "contiguous last dimension"),
        ("heads", "multiple of that of k and v"),
        ("cache_rows", "fewer than q's batch size"),
        ("q_rank", "q must have 4 dimensions"),
    ],
)
def test_bad_cache_layouts(kv: StubKernels, what: str, message: str) -> None:
    c = Case(page_size=16) if what == "page_size" else Case()
    inp = make_inputs(c)
    q, k_cache, v_cache = inp.q, inp.k_cache, inp.v_cache
    kwargs = dict(inp.kwargs)
    if what == "page_size":
        k_cache, v_cache = k_cache[:, :12], v_cache[:, :12]
    elif what == "cache_dtype":
        k_cache = k_cache.float()
    elif what == "cache_stride":
        k_cache = k_cache.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif what == "heads":
        q = q[:, :, :3]
    elif what == "cache_rows":
        k_cache, v_cache = k_cache[:2], v_cache[:2]
    elif what == "q_rank":
        q = q[0]
    with pytest.raises(InputError, match=message):
        flash_attn.flash_attn_with_kvcache(
            q, k_cache, v_cache, inp.k, inp.v, cache_seqlens=inp.cache_seqlens, **kwargs
        )
    assert kv.calls == []


def test_paged_block_table_bounds_as_upstream(kv: StubKernels) -> None:
    """upstream's test_flash_attn_kvcache_paged_block_table_bounds, on CPU."""
    page = 256
    k_cache = torch.randn(4, page, 1, 64).to(DT)
    v_cache = torch.randn(4, page, 1, 64).to(DT)
    table = torch.zeros(1, 1, dtype=torch.int32)
    q = torch.randn(1, 1, 1, 64).to(DT)
    k_new = torch.randn(1, 1, 1, 64).to(DT)
    for k, seqlens in ((k_new, page), (None, page + 1)):
        with pytest.raises(RuntimeError, match="block_table"):
            flash_attn.flash_attn_with_kvcache(
                q, k_cache, v_cache, k=k, v=k, cache_seqlens=_i32(seqlens), block_table=table
            )
    out = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=_i32(page), block_table=table
    )
    assert out.shape == (1, 1, 1, 64) and not out.isnan().any()


def test_a_device_mismatch_is_refused(kv: StubKernels) -> None:
    inp = make_inputs(Case())
    with pytest.raises(RuntimeError, match="same CUDA device"):
        flash_attn.flash_attn_with_kvcache(
            inp.q, inp.k_cache, inp.v_cache, inp.k, inp.v,
            cache_seqlens=inp.seqlens.to("meta"),
        )  # fmt: skip
    assert kv.calls == []


# --- flash_attn_varlen_func with block_table ------------------------------------------


def paged_varlen(
    lens_q: list[int], lens_k: list[int], nheads: int, nheads_k: int, head_dim: int,
    page_size: int, pages_per_seq: int, seed: int = 0,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    batch = len(lens_q)
    num_pages = batch * pages_per_seq + 2
    q = torch.randn(sum(lens_q), nheads, head_dim, generator=g).to(DT)
    k_pool = torch.randn(num_pages, page_size, nheads_k, head_dim, generator=g).to(DT)
    v_pool = torch.randn(num_pages, page_size, nheads_k, head_dim, generator=g).to(DT)
    table = torch.randperm(num_pages, generator=g)[: batch * pages_per_seq]
    table = table.view(batch, pages_per_seq).to(torch.int32)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_pool, v_pool, table, cu_q, cu_k


@pytest.mark.parametrize(
    ("lens_q", "lens_k", "nheads", "nheads_k", "kwargs"),
    [
        ([1, 1, 1], [5, 17, 32], 4, 2, {"causal": True}),  # decode: the paged op
        ([3, 1, 2], [9, 20, 2], 4, 4, {"causal": True, "alibi_slopes": "batch"}),
        ([40, 70], [40, 90], 4, 1, {"causal": True, "window_size": (16, 0)}),  # gathered
        ([130, 5], [130, 64], 2, 2, {"softcap": 4.0}),  # gathered
    ],
)
def test_varlen_block_table(
    kv: StubKernels, lens_q: list[int], lens_k: list[int], nheads: int, nheads_k: int,
    kwargs: dict[str, Any],
) -> None:  # fmt: skip
    q, k_pool, v_pool, table, cu_q, cu_k = paged_varlen(lens_q, lens_k, nheads, nheads_k, 24, 16, 9)
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "batch":
        kwargs["alibi_slopes"] = torch.rand(len(lens_q), nheads)
    out, lse, _ = flash_attn.flash_attn_varlen_func(
        q, k_pool, v_pool, cu_q, cu_k, max(lens_q), max(lens_k), block_table=table,
        return_attn_probs=True, **kwargs,
    )  # fmt: skip
    keys_k = k_pool[table.long()].flatten(1, 2)
    keys_v = v_pool[table.long()].flatten(1, 2)
    slopes = kwargs.pop("alibi_slopes", None)
    for b in range(len(lens_q)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        o, lse_b = attention_ref(
            q[None, rows], keys_k[b : b + 1, : lens_k[b]], keys_v[b : b + 1, : lens_k[b]],
            alibi_slopes=None if slopes is None else slopes[b], **kwargs,
        )  # fmt: skip
        assert_close(out[rows], o[0])
        torch.testing.assert_close(lse[:, rows], lse_b[0], atol=2e-3, rtol=2e-3)
    ((name, call),) = kv.calls
    gathered = max(lens_q) * nheads // nheads_k >= _kvcache.PAGED_PREFILL_ROWS
    assert name == ("fwd" if gathered else "fwd_kv")


def test_varlen_block_table_has_no_backward(kv: StubKernels) -> None:
    """On inputs that require grad (upstream's tests call it so) the paged forward runs and
    gives what it gives without grad, in the graph; a backward through it raises."""
    q, k_pool, v_pool, table, cu_q, cu_k = paged_varlen([1, 1], [5, 6], 2, 2, 16, 16, 1)
    q.requires_grad_(True)
    out, lse, _ = flash_attn.flash_attn_varlen_func(
        q, k_pool, v_pool, cu_q, cu_k, 1, 6, block_table=table, return_attn_probs=True
    )
    assert out.requires_grad and not lse.requires_grad
    with torch.no_grad():
        out_ng = flash_attn.flash_attn_varlen_func(
            q, k_pool, v_pool, cu_q, cu_k, 1, 6, block_table=table
        )
    assert torch.equal(out.detach(), out_ng)
    with pytest.raises(NotImplementedError, match="block_table .* has no backward"):
        out.sum().backward()
    assert q.grad is None
    assert [name for name, _ in kv.calls] == ["fwd_kv", "fwd_kv"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("long_seq", r"cu_seqlens_k\[b \+ 1\] - cu_seqlens_k\[b\] = 17 keys"),
        ("bad_page", "is not a page of the pool"),
        ("page_size", "multiple of 16"),
    ],
)
def test_varlen_block_table_bad_input(kv: StubKernels, change: str, message: str) -> None:
    q, k_pool, v_pool, table, cu_q, cu_k = paged_varlen([1, 1], [5, 6], 2, 2, 16, 16, 1)
    if change == "long_seq":
        cu_k = _i32(0, 5, 22)
    elif change == "bad_page":
        table[1, 0] = k_pool.shape[0]
    else:
        k_pool, v_pool = k_pool[:, :8], v_pool[:, :8]
    with pytest.raises(InputError, match=message):
        flash_attn.flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, 1, 17, block_table=table)
    assert kv.calls == []


# --- fwd_kv's k_new and v_new: the schema, the fake, the contract --------------------


def fwd_kv_args(
    device: str = "meta", paged: bool = False, seqlen_new: int = 3
) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
    """(the op's 19 arguments, k_new, v_new) for batch 2, 4/2 heads, head_dim 32."""
    g = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16).to(device)

    def i32(*values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    q = tensor(2, seqlen_new, 4, 32)
    k_new, v_new = tensor(2, seqlen_new, 2, 32), tensor(2, seqlen_new, 2, 32)
    if paged:
        k, v, table, max_k = tensor(5, 16, 2, 32), tensor(5, 16, 2, 32), i32(3, 1, 0, 4), 32
        table = table.view(2, 2)
    else:
        k, v, table, max_k = tensor(2, 24, 2, 32), tensor(2, 24, 2, 32), None, 24
    seqused_k = i32(7, 20)
    args = [q, k, v, None, None, seqused_k, None, None, table, seqlen_new, max_k, 0.2, -1, 0,
            0.0, None, 0, k_new, v_new]  # fmt: skip
    return args, k_new, v_new


def test_the_schema_ends_with_optional_k_new_v_new_and_the_check() -> None:
    schema = torch._C.parse_schema(f"flash_attn::{_ops.FWD_KV_SCHEMA}")
    *_, k_new, v_new, verdict, max_keys = schema.arguments
    assert (k_new.name, v_new.name) == ("k_new", "v_new")
    assert k_new.default_value is None and v_new.default_value is None
    assert (verdict.name, verdict.default_value) == ("verdict", None)
    assert verdict.alias_info is not None and verdict.alias_info.is_write  # the check writes it
    assert (max_keys.name, max_keys.default_value) == ("max_keys", -1)
    k, v = schema.arguments[1], schema.arguments[2]
    assert k.alias_info is not None and k.alias_info.is_write  # the caches are written
    assert v.alias_info is not None and v.alias_info.is_write


@pytest.mark.parametrize("paged", [False, True])
def test_fake_fwd_kv_shapes_with_k_new(paged: bool) -> None:
    args, _, _ = fwd_kv_args(paged=paged)
    out, lse = _ops.fwd_kv_fake(*args)
    assert out.shape == (2, 3, 4, 32) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    without, _ = _ops.fwd_kv_fake(*args[:17])  # old callers: 17 arguments
    assert without.shape == out.shape


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("v_new_only", "k_new and v_new go together"),
        ("varlen", "need a dense q"),
        ("rank", r"k_new must have shape \(batch, seqlen_new, .*\), got \[2, 3, 64\]"),
        ("heads", r"v_new must have shape .* = \(2, 3, 2, 32\) .*got \[2, 3, 1, 32\]"),
        ("seqlen", r"v_new must have shape .* = \(2, 3, 2, 32\) .*got \[2, 2, 2, 32\]"),
        ("batch", r"k_new must have shape .* = \(2, 3, 2, 32\) .*got \[1, 3, 2, 32\]"),
        ("dtype", "k_new has dtype float16 but the cache k has bfloat16"),
    ],
)  # fmt: skip
def test_fake_fwd_kv_refuses_bad_k_new(change: str, message: str) -> None:
    args, k_new, v_new = fwd_kv_args()
    if change == "v_new_only":
        args[17] = None
    elif change == "varlen":
        args[3] = args[4] = torch.zeros(3, dtype=torch.int32, device="meta")
    elif change == "rank":
        args[17] = k_new.flatten(2)
    elif change == "heads":
        args[18] = v_new[:, :, :1]
    elif change == "seqlen":
        args[18] = v_new[:, :2]
    elif change == "batch":
        args[17] = k_new[:1]
    else:
        args[17] = k_new.half()
    with pytest.raises(RuntimeError, match=message):
        _ops.fwd_kv_fake(*args)


@pytest.mark.parametrize("verdict", [False, True])
@pytest.mark.parametrize("paged", [False, True])
def test_fwd_kv_with_k_new_is_opcheck_clean(paged: bool, verdict: bool) -> None:
    """The stand-in writes k_new and v_new into k and v, and the check's verdict: the
    schema must say so (a mutation the schema does not declare fails test_schema), and
    the fake must agree."""
    define_stub_ops()
    _ops.register_fakes(STUB_NAMESPACE)
    op = getattr(torch.ops, STUB_NAMESPACE).fwd_kv.default
    args, _, _ = fwd_kv_args(device="cpu", paged=paged)
    if verdict:
        args += [torch.full((1,), -1, dtype=torch.int32), -1]
    torch.library.opcheck(op, tuple(args), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("paged", [False, True])
def test_the_append_contract_skips_rows_out_of_range(paged: bool) -> None:
    """kvcache_ref.append_ref (what the stand-in and the GPU tests take as the contract):
    any index values, nothing written outside the cache."""
    from kvcache_ref import append_ref

    args, k_new, v_new = fwd_kv_args(device="cpu", paged=paged, seqlen_new=4)
    k, v, table = args[1], args[2], args[8]
    capacity = 32 if paged else 24
    # entry 0: keys 0..1 of its 4 new rows are at negative positions; entry 1: past the end
    seqused_k = torch.tensor([2, capacity + 2], dtype=torch.int32)
    batch_idx = None if paged else torch.tensor([1, 0], dtype=torch.int32)
    k_ref, v_ref = k.clone(), v.clone()
    append_ref(k_ref, v_ref, k_new, v_new, seqused_k, batch_idx, table)
    changed = (k_ref != k).flatten(2).any(-1)  # (rows, keys)
    # (cache row or page, key in it) -> (entry, new row)
    if paged:
        expected_slots = {(3, 0): (0, 2), (3, 1): (0, 3), (4, 14): (1, 0), (4, 15): (1, 1)}
    else:
        expected_slots = {(1, 0): (0, 2), (1, 1): (0, 3), (0, 22): (1, 0), (0, 23): (1, 1)}
    assert {(int(r), int(j)) for r, j in changed.nonzero()} == set(expected_slots)
    for (r, j), (b, i) in expected_slots.items():
        assert torch.equal(k_ref[r, j], k_new[b, i]) and torch.equal(v_ref[r, j], v_new[b, i])
    assert torch.equal(k_ref[~changed], k[~changed]) and torch.equal(v_ref[~changed], v[~changed])


# --- the checks' fast path agrees with the checks one by one -----------------------


def _kv_variants() -> list[dict[str, Any]]:
    """Common KV-cache calls, valid and not (meta tensors): each overrides the valid
    dense decode call (batch 2, 4/2 heads, head_dim 64, cache of 32 keys)."""

    def t(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    def i32(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    cache = t(2, 32, 2, 64)
    pool = t(9, 16, 2, 64)
    return [
        {},  # decode, no append
        dict(k=t(2, 1, 2, 64), v=t(2, 1, 2, 64)),  # decode with append
        dict(q=t(2, 40, 4, 64), k=t(2, 40, 2, 64), v=t(2, 40, 2, 64)),  # prefill
        dict(k_cache=t(3, 32, 2, 64), v_cache=t(3, 32, 2, 64)),  # more cache rows
        dict(cache_seqlens=None),  # the whole cache
        dict(k_cache=pool, v_cache=pool, block_table=i32(2, 4)),  # paged
        dict(k_cache=pool, v_cache=pool, block_table=i32(2, 4), k=t(2, 1, 2, 64), v=t(2, 1, 2, 64)),
        dict(k_cache=t(9, 24, 2, 64), v_cache=t(9, 24, 2, 64), block_table=i32(2, 4)),  # page 24
        dict(block_table=i32(2, 4, dtype=torch.int64), k_cache=pool, v_cache=pool),
        dict(block_table=i32(3, 4), k_cache=pool, v_cache=pool),  # batch differs
        dict(k_cache=t(1, 32, 2, 64), v_cache=t(1, 32, 2, 64)),  # fewer rows than batch
        dict(k=t(2, 1, 2, 64)),  # k without v
        dict(k=t(2, 1, 2, 64), v=t(2, 1, 2, 64), cache_seqlens=None),  # append needs seqlens
        dict(k=t(2, 1, 2, 64), v=t(2, 1, 2, 64), cache_seqlens=3),  # int: the range check
        dict(k=t(2, 1, 2, 64, dtype=torch.bfloat16), v=t(2, 1, 2, 64, dtype=torch.bfloat16)),
        dict(k=t(2, 1, 3, 64), v=t(2, 1, 3, 64)),  # k's heads differ from the cache's
        dict(k=t(2, 1, 2, 64), v=t(2, 2, 2, 64)),  # k and v differ
        dict(cache_seqlens=i32(2, dtype=torch.int64)),
        dict(cache_seqlens=i32(3)),
        dict(v_cache=t(2, 32, 2, 64, dtype=torch.bfloat16)),  # cache dtypes differ
        dict(q=t(2, 1, 3, 64)),  # heads not a multiple
        dict(q=t(2, 1, 4, 32)),  # head_dim differs
        dict(k_cache=cache.transpose(1, 2).transpose(1, 2)[..., ::2], v_cache=cache[..., ::2]),
        dict(q=t(2, 1, 4, 64, dtype=torch.float32), k_cache=t(2, 32, 2, 64, dtype=torch.float32),
             v_cache=t(2, 32, 2, 64, dtype=torch.float32)),  # fmt: skip
        dict(q=t(0, 1, 4, 64)),  # batch 0
        dict(q=t(2, 4, 64)),  # rank 3
    ]


@pytest.mark.parametrize("case", range(len(_kv_variants())))
def test_kvcache_fast_path_agrees_with_the_checks(
    case: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flash_attn import _kvcache_checks as kc

    def t(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float16, device="meta")

    args: dict[str, Any] = dict(
        q=t(2, 1, 4, 64), k_cache=t(2, 32, 2, 64), v_cache=t(2, 32, 2, 64), k=None, v=None,
        cache_seqlens=torch.empty(2, dtype=torch.int32, device="meta"), block_table=None,
    )  # fmt: skip
    args.update(_kv_variants()[case])
    fast = kc._kvcache_fast(**args)
    monkeypatch.setattr(kc, "_kvcache_fast", lambda *args: None)  # the checks in turn
    try:
        slow = kc.check_kvcache(
            args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], None, None,
            args["cache_seqlens"], None, None, args["block_table"], None,
        )  # fmt: skip
    except InputError:
        assert fast is None  # never accepts what the checks refuse
        return
    if isinstance(args["cache_seqlens"], int):
        assert fast is None  # an int's range is checked one by one
    else:
        assert fast == slow
