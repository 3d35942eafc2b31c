"""Attention dropout through the Python layer, on a CPU-only machine.

Over the CPU stand-in for flash_attn._C (test_api_cpu.py), whose dropout_mask is
dropout_ref.stub_keep_mask and whose fwd/bwd apply that mask, what is tested is the
plumbing: every entry point draws rng_state (two int64 from torch's generator, on q's
device) when dropout_p > 0 and only then, hands it to fwd, and the same tensor to
bwd; outputs and gradients equal a reference that applies the mask recovered from
that draw; torch.manual_seed reproduces a call; the no-grad path drops too;
return_attn_probs gives S_dmask in flash_attn 2.x's convention, which our own
recovery and (where .upstream/test_flash_attn.py exists) upstream's helpers undo.
The GPU side (the real kernels and mask) is test_dropout_gpu.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dropout_ref import (
    attention_dropout_ref,
    attention_dropout_varlen_ref,
    attention_probs,
    dropout_threshold,
    load_upstream_helpers,
    recover_from_s_dmask,
    stub_keep_mask,
)
from reference import attention_ref, visible_keys
from test_api_cpu import (
    StubKernels,
    assert_close,
    cpu_qkv,
    grads,
    stub,  # noqa: F401  (the stand-in fixture)
    varlen_batch,
)

import flash_attn
from flash_attn import _probs
from flash_attn.errors import InputError
from flash_attn.flash_attn_interface import _get_block_size_n

P = 0.17


def drawn_rng_state(seed: int, device: str = "cpu") -> torch.Tensor:
    """The rng_state a call made right after torch.manual_seed(seed) draws: one draw of
    two int64 from torch's generator for q's device."""
    torch.manual_seed(seed)
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device=device)


def keep_for(seed: int, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, p: float = P):
    return stub_keep_mask(drawn_rng_state(seed), batch, nheads, seqlen_q, seqlen_k, p).bool()


@pytest.fixture
def kernels(stub: StubKernels) -> StubKernels:  # noqa: F811
    """flash_attn routed to the CPU stand-in (test_api_cpu.stub)."""
    return stub


def binomial_ok(dropped: int, total: int, p: float, sigmas: float = 5.0) -> bool:
    """dropped / total within sigmas binomial deviations of the quantised P(drop)."""
    q = dropout_threshold(p) / 256
    return abs(dropped - q * total) <= sigmas * math.sqrt(total * q * (1 - q)) + 1


def fwd_bwd_calls(kernels: StubKernels) -> list[tuple[str, dict[str, Any]]]:
    return [(name, call) for name, call in kernels.calls if name in ("fwd", "bwd")]


# --- the stand-in's mask (what the plumbing tests lean on) --------------------------


def test_stub_mask_is_a_function_of_the_position_alone() -> None:
    rng = torch.tensor([987654321012345, 42], dtype=torch.int64)
    small = stub_keep_mask(rng, 2, 3, 5, 7, 0.3)
    large = stub_keep_mask(rng, 3, 4, 9, 11, 0.3)
    assert small.dtype == torch.uint8 and small.shape == (2, 3, 5, 7)
    assert torch.equal(small, large[:2, :3, :5, :7])
    other = stub_keep_mask(torch.tensor([987654321012345, 43]), 3, 4, 9, 11, 0.3)
    assert not torch.equal(large, other)


@pytest.mark.parametrize("p", [0.05, P, 0.5, 0.9])
def test_stub_mask_drops_the_quantised_fraction(p: float) -> None:
    keep = stub_keep_mask(torch.tensor([123, 456]), 4, 8, 64, 96, p)
    assert binomial_ok(int((keep == 0).sum()), keep.numel(), p)


def test_stub_mask_quantises_p_to_8_bits() -> None:
    keep = stub_keep_mask(torch.tensor([1, 2]), 2, 2, 64, 64, 0.4 / 256)  # rounds to 0
    assert bool(keep.all())


# --- what reaches the ops -----------------------------------------------------------


def test_dropout_draws_rng_state_on_qs_device_and_bwd_gets_the_same(kernels: StubKernels) -> None:
    q, k, v = cpu_qkv(2, 5, 7, 4, 2, 32, requires_grad=True)
    expected = drawn_rng_state(11)
    torch.manual_seed(11)
    out = flash_attn.flash_attn_func(q, k, v, P, causal=True)
    out.sum().backward()
    (fwd, f), (bwd, b) = fwd_bwd_calls(kernels)
    assert (fwd, bwd) == ("fwd", "bwd")
    assert f["dropout_p"] == b["dropout_p"] == pytest.approx(P)
    assert torch.equal(f["rng_state"], expected)
    assert f["rng_state"].device == q.device and f["rng_state"].dtype == torch.int64
    assert b["rng_state"].data_ptr() == f["rng_state"].data_ptr()  # the saved tensor itself
    assert torch.equal(b["rng_state"], expected)


def test_without_dropout_nothing_is_drawn(kernels: StubKernels) -> None:
    q, k, v = cpu_qkv(requires_grad=True)
    before = torch.get_rng_state()
    flash_attn.flash_attn_func(q, k, v, 0.0, causal=True).sum().backward()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(call["rng_state"] is None for _, call in fwd_bwd_calls(kernels))
    flash_attn.flash_attn_func(q, k, v, P)
    assert not torch.equal(torch.get_rng_state(), before)  # with dropout: one draw


def test_each_call_draws_afresh(kernels: StubKernels) -> None:
    q, k, v = cpu_qkv(1, 16, 16, 2, 2, 32)
    torch.manual_seed(0)
    first = flash_attn.flash_attn_func(q, k, v, 0.5)
    second = flash_attn.flash_attn_func(q, k, v, 0.5)
    a, b = (call["rng_state"] for _, call in fwd_bwd_calls(kernels))
    assert not torch.equal(a, b)
    assert not torch.equal(first, second)


# --- outputs and gradients against the reference with the recovered mask ------------

DENSE_CASES = [
    # (seqlen_q, seqlen_k, nheads, nheads_k, head_dim, kwargs)
    (5, 5, 4, 4, 32, {}),
    (5, 9, 4, 2, 20, {"causal": True}),
    (9, 5, 6, 2, 40, {"causal": True, "window_size": (3, -1)}),
    (7, 7, 4, 1, 64, {"window_size": (2, 1), "softcap": 5.0}),
    (6, 8, 4, 2, 12, {"alibi_slopes": "batch", "softmax_scale": 0.2}),
    (16, 16, 4, 4, 16, {"alibi_slopes": "heads", "causal": True, "deterministic": True}),
]


def _kwargs(kwargs: dict[str, Any], batch: int, nheads: int) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "batch":
        kwargs["alibi_slopes"] = torch.rand(batch, nheads)
    elif kwargs.get("alibi_slopes") == "heads":
        kwargs["alibi_slopes"] = torch.rand(nheads)
    return kwargs


def _ref_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key != "deterministic"}


@pytest.mark.parametrize(("sq", "sk", "nheads", "nheads_k", "head_dim", "kwargs"), DENSE_CASES)
def test_flash_attn_func_with_dropout_matches_the_reference(
    kernels: StubKernels,
    sq: int,
    sk: int,
    nheads: int,
    nheads_k: int,
    head_dim: int,
    kwargs: dict[str, Any],
) -> None:
    torch.manual_seed(0)
    q, k, v = cpu_qkv(2, sq, sk, nheads, nheads_k, head_dim, requires_grad=True)
    kwargs = _kwargs(kwargs, 2, nheads)
    dout = torch.randn_like(q)
    torch.manual_seed(5)
    out = flash_attn.flash_attn_func(q, k, v, P, **kwargs)
    keep = keep_for(5, 2, nheads, sq, sk)
    out_ref, _ = attention_dropout_ref(q, k, v, keep, P, **_ref_kwargs(kwargs))
    assert_close(out, out_ref)
    for g, g_ref in zip(grads(out, (q, k, v), dout), grads(out_ref, (q, k, v), dout)):
        assert_close(g, g_ref)
    out_plain, _ = attention_ref(q, k, v, **_ref_kwargs(kwargs))
    assert not torch.allclose(out.float(), out_plain.float(), atol=1e-2)  # it did drop


def test_packed_functions_with_dropout(kernels: StubKernels) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3, 4, 24).half().requires_grad_(True)
    dout = torch.randn(2, 9, 4, 24).half()
    torch.manual_seed(1)
    out = flash_attn.flash_attn_qkvpacked_func(qkv, P, causal=True)
    (dqkv,) = grads(out, (qkv,), dout)
    q, k, v = (t.detach().requires_grad_(True) for t in qkv.unbind(2))
    out_ref, _ = attention_dropout_ref(q, k, v, keep_for(1, 2, 4, 9, 9), P, causal=True)
    assert_close(out, out_ref)
    assert_close(dqkv, torch.stack(grads(out_ref, (q, k, v), dout), dim=2))

    kv = qkv[:, :, 1:].detach().clone().requires_grad_(True)
    q1 = qkv[:, :, 0].detach().clone().requires_grad_(True)
    torch.manual_seed(2)
    out = flash_attn.flash_attn_kvpacked_func(q1, kv, P, window_size=(2, 2))
    dq, dkv = grads(out, (q1, kv), dout)
    out_ref, _ = attention_dropout_ref(q, k, v, keep_for(2, 2, 4, 9, 9), P, window_size=(2, 2))
    dq_r, dk_r, dv_r = grads(out_ref, (q, k, v), dout)
    assert_close(out, out_ref)
    assert_close(dq, dq_r)
    assert_close(dkv, torch.stack((dk_r, dv_r), dim=2))


VARLEN = [  # (lens_q, lens_k, nheads, nheads_k, head_dim, kwargs)
    ([3, 1, 5], [4, 6, 2], 4, 2, 36, {"causal": True, "alibi_slopes": "batch"}),
    ([4, 0, 6], [5, 3, 6], 4, 4, 16, {"window_size": (2, 1)}),
]


@pytest.mark.parametrize(("lens_q", "lens_k", "nheads", "nheads_k", "head_dim", "kwargs"), VARLEN)
def test_varlen_with_dropout_matches_the_reference(
    kernels: StubKernels,
    lens_q: list[int],
    lens_k: list[int],
    nheads: int,
    nheads_k: int,
    head_dim: int,
    kwargs: dict[str, Any],
) -> None:
    q, k, v, cu_q, cu_k = varlen_batch(lens_q, lens_k, nheads, nheads_k, head_dim)
    kwargs = _kwargs(kwargs, len(lens_q), nheads)
    dout = torch.randn_like(q)
    mq, mk = max(lens_q), max(lens_k)
    keep = keep_for(3, len(lens_q), nheads, mq, mk)
    out_ref, _ = attention_dropout_varlen_ref(q, k, v, cu_q, cu_k, keep, P, **kwargs)
    grads_ref = grads(out_ref, (q, k, v), dout)

    torch.manual_seed(3)
    out = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, P, **kwargs)
    assert_close(out, out_ref)
    for g, g_ref in zip(grads(out, (q, k, v), dout), grads_ref):
        assert_close(g, g_ref)

    kv = torch.stack([k, v], dim=1).detach().requires_grad_(True)
    torch.manual_seed(3)
    out = flash_attn.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, mq, mk, P, **kwargs)
    dq, dkv = grads(out, (q, kv), dout)
    assert_close(out, out_ref)
    assert_close(dq, grads_ref[0])
    assert_close(dkv, torch.stack(grads_ref[1:], dim=1))


def test_varlen_qkvpacked_with_dropout(kernels: StubKernels) -> None:
    lens = [3, 6, 2]
    q, k, v, cu, _ = varlen_batch(lens, lens, 2, 2, 16)
    qkv = torch.stack([q, k, v], dim=1).detach().requires_grad_(True)
    dout = torch.randn_like(q)
    torch.manual_seed(4)
    out = flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, 6, P, causal=True)
    (dqkv,) = grads(out, (qkv,), dout)
    keep = keep_for(4, 3, 2, 6, 6)
    out_ref, _ = attention_dropout_varlen_ref(q, k, v, cu, cu, keep, P, causal=True)
    assert_close(out, out_ref)
    assert_close(dqkv, torch.stack(grads(out_ref, (q, k, v), dout), dim=1))


def test_the_mask_is_the_same_for_dense_and_varlen(kernels: StubKernels) -> None:
    """Sequences of equal length: the varlen call with the same seed drops the same
    elements as the dense one (the mask depends on (b, h, i, j) alone). The two references
    sum in different orders (one ulp apart at times), so the outputs are compared within
    the float16 tolerance, far below what one entry dropped or kept otherwise moves at
    p = 0.5; another seed must move them past it."""
    torch.manual_seed(0)
    q, k, v = cpu_qkv(3, 6, 6, 4, 2, 32)
    torch.manual_seed(9)
    dense = flash_attn.flash_attn_func(q, k, v, 0.5, causal=True)
    cu = torch.arange(0, 19, 6, dtype=torch.int32)

    def varlen(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return flash_attn.flash_attn_varlen_func(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 6, 6, 0.5, causal=True
        )

    assert_close(varlen(9), dense.flatten(0, 1))
    assert (varlen(10).float() - dense.flatten(0, 1).float()).abs().max() > 0.1


def test_no_grad_path_drops_too(kernels: StubKernels) -> None:
    q, k, v = cpu_qkv(2, 8, 8, 4, 4, 32)
    torch.manual_seed(6)
    with torch.no_grad():
        out = flash_attn.flash_attn_func(q, k, v, P, causal=True)
    out_ref, _ = attention_dropout_ref(q, k, v, keep_for(6, 2, 4, 8, 8), P, causal=True)
    assert_close(out, out_ref)
    assert not torch.allclose(out.float(), attention_ref(q, k, v, causal=True)[0].float())


def test_manual_seed_reproduces_and_another_seed_differs(kernels: StubKernels) -> None:
    q, k, v = cpu_qkv(2, 12, 12, 4, 2, 32, requires_grad=True)
    dout = torch.randn_like(q)

    def run(seed: int) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(seed)
        out = flash_attn.flash_attn_func(q, k, v, 0.3, causal=True)
        return (out, *grads(out, (q, k, v), dout))

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[2], other[2])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_with_dropout(kernels: StubKernels, backend: str) -> None:
    """Traced without graph breaks; with the same seed the compiled step draws the same
    rng_state as the eager one (aot_eager runs the same randint op)."""
    torch._dynamo.reset()

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        return flash_attn.flash_attn_func(q, k, v, p, causal=True).float().square().sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    q, k, v = cpu_qkv(2, 8, 8, 4, 2, 32, requires_grad=True)
    for p in (0.25, 0.5):  # the float argument may be traced as a symbol
        torch.manual_seed(1)
        loss = compiled(q, k, v, p)
        g = torch.autograd.grad(loss, (q, k, v))
        torch.manual_seed(1)
        loss_ref = step(q, k, v, p)
        g_ref = torch.autograd.grad(loss_ref, (q, k, v))
        torch.testing.assert_close(loss, loss_ref)
        for a, b in zip(g, g_ref):
            assert_close(a, b)
    assert [c["dropout_p"] for n, c in kernels.calls if n == "fwd"][-1] == pytest.approx(0.5)


# --- bad input ----------------------------------------------------------------------

ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "flash_attn_func": lambda q, k, v, cu, p: flash_attn.flash_attn_func(q, k, v, p),
    "flash_attn_kvpacked_func": lambda q, k, v, cu, p: flash_attn.flash_attn_kvpacked_func(
        q, torch.stack([k, v], dim=2), p
    ),
    "flash_attn_qkvpacked_func": lambda q, k, v, cu, p: flash_attn.flash_attn_qkvpacked_func(
        torch.stack([q, q, q], dim=2), p
    ),
    "flash_attn_varlen_func": lambda q, k, v, cu, p: flash_attn.flash_attn_varlen_func(
        q[0], k[0], v[0], cu, cu, 5, 5, p
    ),
    "flash_attn_varlen_kvpacked_func": lambda q, k, v, cu, p: (
        flash_attn.flash_attn_varlen_kvpacked_func(
            q[0], torch.stack([k[0], v[0]], dim=1), cu, cu, 5, 5, p
        )
    ),
    "flash_attn_varlen_qkvpacked_func": lambda q, k, v, cu, p: (
        flash_attn.flash_attn_varlen_qkvpacked_func(torch.stack([q[0]] * 3, dim=1), cu, 5, p)
    ),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("p", "shown"), [(float("nan"), "nan"), (-0.5, "-0.5"), (1.0, "1.0"), (True, "bool True")]
)
def test_bad_dropout_p_is_refused_before_any_op(
    kernels: StubKernels, name: str, p: object, shown: str
) -> None:
    q, k, v = cpu_qkv(1, 5, 5, 2, 2, 32)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(InputError, match=rf"dropout_p must be a float in \[0, 1\).*{shown}"):
        ENTRY_POINTS[name](q, k, v, cu, p)
    assert kernels.calls == []


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_applies_dropout(kernels: StubKernels, name: str) -> None:
    q, k, v = cpu_qkv(1, 5, 5, 2, 2, 32)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    plain = ENTRY_POINTS[name](q, k, v, cu, 0.0)
    torch.manual_seed(0)
    dropped = ENTRY_POINTS[name](q, k, v, cu, 0.5)
    (_, f0), (_, f1) = fwd_bwd_calls(kernels)
    assert f0["rng_state"] is None and f1["rng_state"] is not None
    assert f1["dropout_p"] == 0.5
    assert not torch.equal(plain, dropped)


def test_paged_varlen_refuses_dropout(kernels: StubKernels) -> None:
    q = torch.randn(2, 2, 32).half()
    pool = torch.randn(2, 16, 2, 32).half()
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11], dtype=torch.int32)
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(InputError, match=r"dropout_p=0.1 with block_table.*dropout_p=0.0"):
        flash_attn.flash_attn_varlen_func(q, pool, pool, cu_q, cu_k, 1, 6, 0.1, block_table=table)
    assert kernels.calls == []


def test_get_block_size_n() -> None:
    for head_dim in (8, 59, 128, 256):
        for flags in ((False, False), (True, True)):
            assert _get_block_size_n("cpu", head_dim, *flags) == _probs.BLOCK_N
    assert _get_block_size_n(torch.device("cpu"), 64, True, False) == _probs.BLOCK_N
    with pytest.raises(InputError, match="head_dim must be in 1..256; got 300"):
        _get_block_size_n("cpu", 300, True, False)


# --- return_attn_probs: S_dmask -------------------------------------------------------

S_DMASK_CASES = [
    # (seqlen_q, seqlen_k, nheads, nheads_k, head_dim, kwargs): seqlen_k 300 = 3 blocks
    (40, 300, 4, 2, 32, {}),
    (40, 300, 4, 4, 24, {"causal": True}),
    (300, 260, 2, 1, 16, {"causal": True, "alibi_slopes": "batch"}),
    (70, 300, 2, 2, 32, {"window_size": (100, 20), "softcap": 3.0, "softmax_scale": 0.3}),
    (129, 129, 2, 2, 16, {"window_size": (0, 0)}),
]


@pytest.mark.parametrize(("sq", "sk", "nheads", "nheads_k", "head_dim", "kwargs"), S_DMASK_CASES)
def test_s_dmask_encodes_the_mask_and_the_probabilities(
    kernels: StubKernels,
    sq: int,
    sk: int,
    nheads: int,
    nheads_k: int,
    head_dim: int,
    kwargs: dict[str, Any],
) -> None:
    torch.manual_seed(0)
    q, k, v = cpu_qkv(2, sq, sk, nheads, nheads_k, head_dim)
    kwargs = _kwargs(kwargs, 2, nheads)
    torch.manual_seed(12)
    out, lse, s_dmask = flash_attn.flash_attn_func(q, k, v, P, return_attn_probs=True, **kwargs)
    keep = keep_for(12, 2, nheads, sq, sk)
    rounded = (2, nheads, -(-sq // 128) * 128, -(-sk // 128) * 128)
    assert s_dmask.shape == rounded and s_dmask.dtype == q.dtype
    assert s_dmask[:, :, sq:].count_nonzero() == 0 and s_dmask[..., sk:].count_nonzero() == 0

    probs, lse_ref, scores = attention_probs(q, k, **kwargs)
    torch.testing.assert_close(lse, lse_ref)
    visible = visible_keys(sq, sk, causal=kwargs.get("causal", False),
                           window_size=kwargs.get("window_size", (-1, -1)))  # fmt: skip
    corner = s_dmask[:, :, :sq, :sk]
    assert corner[:, :, ~visible].count_nonzero() == 0, "S_dmask nonzero where masked"
    kept, probs_rec = recover_from_s_dmask(s_dmask, scores.float(), lse_ref, _probs.BLOCK_N)
    assert torch.equal(kept[:, :, visible], keep[:, :, visible])
    torch.testing.assert_close(probs_rec, probs.float(), atol=2e-3, rtol=2e-3)
    out_rec = torch.einsum(
        "bhqk,bkhd->bqhd",
        probs_rec * kept / (1 - P),
        v.float().repeat_interleave(nheads // nheads_k, dim=2),
    )
    assert_close(out, out_rec)
    assert binomial_ok(int((~kept[:, :, visible]).sum()), int(visible.sum()) * 2 * nheads, P)


def test_s_dmask_blocks_hold_values_above_the_probabilities(kernels: StubKernels) -> None:
    """The blockwise form: in a block after the one holding a row's maximum, |S| =
    P * exp(lse - M) with M that block's own suffix maximum, far above P (the convention
    is not the probabilities themselves); in the maximum's block |S| <= 1 is P * e^lse-max."""
    q, k, v = cpu_qkv(1, 4, 256, 2, 2, 32, dtype=torch.float16)
    k[0, 10] = q[0, 0] * 2  # row 0's maximum in the first block
    torch.manual_seed(0)
    _, lse, s = flash_attn.flash_attn_func(q, k, v, 0.1, return_attn_probs=True)
    probs, _, scores = attention_probs(q, k)
    second = s[0, :, 0, 128:].float().abs()
    assert bool((second > probs[0, :, 0, 128:] * 100).all())
    first = s[0, :, 0, :128].float().abs()
    scale = torch.exp(lse[0, :, 0] - scores[0, :, 0].amax(-1)).unsqueeze(-1)
    torch.testing.assert_close(first, probs[0, :, 0, :128] * scale, atol=1e-3, rtol=1e-3)


def test_s_dmask_varlen_holds_each_sequence_at_its_own_positions(kernels: StubKernels) -> None:
    lens_q, lens_k = [3, 0, 130, 7], [200, 5, 140, 0]
    q, k, v, cu_q, cu_k = varlen_batch(lens_q, lens_k, 4, 2, 16)
    torch.manual_seed(13)
    out, lse, s = flash_attn.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 130, 200, P, causal=True, return_attn_probs=True
    )
    assert s.shape == (4, 4, 256, 256)
    keep = keep_for(13, 4, 4, 130, 200)
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        rq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        assert s[b, :, lq:].count_nonzero() == 0 and s[b, :, :, lk:].count_nonzero() == 0
        if lq == 0 or lk == 0:
            continue
        probs, lse_b, scores = attention_probs(q[None, rq], k[None, rk], causal=True)
        kept, probs_rec = recover_from_s_dmask(s[b : b + 1], scores.float(), lse_b, 128)
        visible = visible_keys(lq, lk, causal=True)
        assert torch.equal(kept[0][:, visible], keep[b, :, :lq, :lk][:, visible])
        torch.testing.assert_close(probs_rec, probs.float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lse[:, rq], lse_b[0])


def test_s_dmask_is_none_without_dropout_and_has_no_grad(kernels: StubKernels) -> None:
    q, k, v = cpu_qkv(1, 5, 5, 2, 2, 32, requires_grad=True)
    assert flash_attn.flash_attn_func(q, k, v, 0.0, return_attn_probs=True)[2] is None
    out, _, s = flash_attn.flash_attn_func(q, k, v, P, return_attn_probs=True)
    assert not s.requires_grad and out.requires_grad


# --- upstream's own helpers undo our S_dmask ---------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Any:
    helpers = load_upstream_helpers(_get_block_size_n)
    if helpers is None:
        pytest.skip(
            "needs .upstream/test_flash_attn.py (python3 tools/upstream_suite.py populate "
            "<upstream git dir>) and einops"
        )
    return helpers


UPSTREAM_CASES = [  # (seqlen_q, seqlen_k, nheads, nheads_k, causal, window, alibi)
    (97, 97, 3, 3, False, (-1, -1), False),
    (113, 203, 4, 2, True, (-1, -1), False),
    (200, 150, 2, 1, False, (40, 7), False),
    (128, 300, 2, 2, True, (-1, -1), True),
]


@pytest.mark.parametrize(("sq", "sk", "h", "hk", "causal", "window", "alibi"), UPSTREAM_CASES)
def test_upstream_helpers_recover_mask_and_probabilities(
    kernels: StubKernels,
    upstream: Any,
    sq: int,
    sk: int,
    h: int,
    hk: int,
    causal: bool,
    window: tuple[int, int],
    alibi: bool,
) -> None:
    """As upstream's test_flash_attn_output does with dropout: convert, normalise,
    count; then its attention_ref with the recovered mask gives our output."""
    torch.manual_seed(0)
    batch, d = 2, 32
    q, k, v = cpu_qkv(batch, sq, sk, h, hk, d, requires_grad=True)
    slopes = torch.rand(batch, h) * 0.3 if alibi else None
    bias = upstream.attn_bias_from_alibi_slopes(slopes, sq, sk, causal=causal) if alibi else None
    torch.manual_seed(21)
    out, lse, s_dmask = flash_attn.flash_attn_func(
        q, k, v, P, causal=causal, window_size=window, alibi_slopes=slopes,
        return_attn_probs=True,
    )  # fmt: skip
    converted = upstream.convert_flash_attn_S_to_softmax(
        s_dmask, sq, sk, None, None, d, True, causal=causal, window_size=window
    )
    dropout_mask = converted >= 0
    k_rep, v_rep = (t.repeat_interleave(h // hk, dim=2) for t in (k, v))
    attn = upstream.normalize_flash_attn_S(
        converted.abs(), q, k_rep, v_rep, None, None, bias, True, causal=causal, window_size=window
    )
    fraction = upstream.get_dropout_fraction(
        dropout_mask, None, None, causal=causal, window_size=window
    ).item()
    out_ref, attn_ref = upstream.attention_ref(
        q, k, v, None, None, bias, P, dropout_mask, causal=causal, window_size=window
    )
    # ours against the masks we know the stand-in applied (where S_dmask did not
    # underflow to -0, which reads as kept: ALiBi's far keys)
    keep = keep_for(21, batch, h, sq, sk)
    readable = visible_keys(sq, sk, causal=causal, window_size=window) & (converted != 0)
    assert torch.equal(dropout_mask[readable], keep[readable])
    assert_close(out, out_ref)
    torch.testing.assert_close(attn.float(), attn_ref.float(), atol=2e-3, rtol=2e-3)
    if not alibi:  # as upstream: with ALiBi many values underflow to +-0
        assert abs(fraction - P) <= 0.01
    dout = torch.randn_like(out)
    for g, g_ref in zip(grads(out, (q, k, v), dout), grads(out_ref, (q, k, v), dout)):
        assert_close(g, g_ref)


def test_upstream_helpers_varlen_with_padding(kernels: StubKernels, upstream: Any) -> None:
    """As test_flash_attn_varlen_output: right-padded batches, S_dmask of the varlen
    call decoded with the padding masks."""
    torch.manual_seed(0)
    batch, sq, sk, h, d = 3, 150, 140, 2, 16
    q, k, v = cpu_qkv(batch, sq, sk, h, h, d)
    lens_q, lens_k = torch.tensor([150, 131, 97]), torch.tensor([120, 140, 3])
    qmask = torch.arange(sq)[None] < lens_q[:, None]
    kmask = torch.arange(sk)[None] < lens_k[:, None]
    cu_q = F.pad(lens_q.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(lens_k.cumsum(0), (1, 0)).to(torch.int32)
    torch.manual_seed(22)
    out, _, s_dmask = flash_attn.flash_attn_varlen_func(
        q[qmask], k[kmask], v[kmask], cu_q, cu_k, sq, sk, P, causal=True, return_attn_probs=True
    )
    converted = upstream.convert_flash_attn_S_to_softmax(
        s_dmask, sq, sk, qmask, kmask, d, True, causal=True
    )
    dropout_mask = converted >= 0
    attn = upstream.normalize_flash_attn_S(
        converted.abs(), q, k, v, qmask, kmask, None, True, causal=True
    )
    out_ref, attn_ref = upstream.attention_ref(
        q, k, v, qmask, kmask, None, P, dropout_mask, causal=True
    )
    torch.testing.assert_close(attn.float(), attn_ref.float(), atol=2e-3, rtol=2e-3)
    assert_close(out, out_ref[qmask])
    fraction = upstream.get_dropout_fraction(dropout_mask, qmask, kmask, causal=True).item()
    assert abs(fraction - P) <= 0.02
