"""Attention dropout on a GPU: the kernels' mask, outputs and gradients.

The keep mask comes from the op ``_ops.dropout_mask`` with the rng_state the call drew
(recorded on its way to the fwd op); the reference (dropout_ref.attention_dropout_ref)
applies that mask to reference.py's probabilities. Rule, as test_flash_attn_gpu.py:
the error against the fp32 reference is at most 2x (outputs) / 3x (gradients) that
of the same reference computed in the input dtype, plus an ulp.

- the mask: uint8 (batch, nheads, seqlen_q, seqlen_k), a function of the position
  alone, P(drop) within a binomial bound (5 sigma) of min(round(p * 256), 255) / 256
  over the visible entries;
- out, dq, dk, dv against the reference, dense and varlen, MHA and GQA, no mask /
  causal / local, fp16 and bf16, head dims 64, 128, 256 (those the build has), with
  the exact zeros masked_parts.py owes;
- the same seed gives bit-identical out and gradients, another seed others; the
  backward is bit-identical run to run (deterministic=True);
- a CUDA graph of forward + backward draws a new mask at each replay, matches the
  eager call with the replay's rng_state bit for bit, and torch.manual_seed before a
  replay reproduces it;
- return_attn_probs: S_dmask decodes (our decoding, and upstream's helpers where
  .upstream/test_flash_attn.py is present) to the mask and the probabilities.

The kernel path is chosen by the environment: run the file twice, once per path,

    python3 -m pytest -q tests/test_dropout_gpu.py                            # sm90 on H100/H200
    FLASH_ATTN_DISABLE_SM90=1 python3 -m pytest -q tests/test_dropout_gpu.py  # mma.sync (sm80)

Marked ``gpu``: skipped without a GPU or a loadable flash_attn._C (conftest.py), e.g.
an extension built before dropout_mask was registered.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from dropout_ref import (
    attention_dropout_ref,
    attention_probs,
    dropout_threshold,
    load_upstream_helpers,
    recover_from_s_dmask,
)
from gpu_poison import poison_cuda_cache, poison_enabled
from masked_parts import Outputs, dense_parts, masked_part_problems, varlen_parts
from reference import visible_keys

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
HDIMS = [64, 128, 256]
P = 0.17
HEADS = {"mha": (4, 4), "gqa": (6, 2)}
MASKS = {  # name: (causal, window_size)
    "none": (False, (-1, -1)),
    "causal": (True, (-1, -1)),
    "local": (False, (48, 16)),
}
DENSE_SEQLENS = (200, 333)  # seqlen_q != seqlen_k: the bottom-right alignment counts
LENS_Q = [5, 0, 129, 1, 300, 64]
LENS_K = [7, 3, 129, 0, 250, 64]


def fa() -> Any:
    import flash_attn

    return flash_attn


def ops() -> Any:
    from flash_attn import _ops

    return _ops


def needs_build(hdim: int, dtype: torch.dtype, backward: bool = True) -> None:
    """Skip what this build of flash_attn._C has no kernel for."""
    from flash_attn._build_info import DTYPE_NAMES

    info = ops().build_info()
    if info.bucket_for(hdim) is None:
        pytest.skip(f"this build has no kernel for head_dim {hdim} ({info.head_dims})")
    if DTYPE_NAMES[dtype] not in info.dtypes:
        pytest.skip(f"this build has no {DTYPE_NAMES[dtype]} kernels")
    if backward and not info.backward:
        pytest.skip("this build has no backward")


def repoison() -> None:
    if DEVICE == "cuda" and poison_enabled():
        poison_cuda_cache()


def rand(*shape: int, dtype: torch.dtype, requires_grad: bool = True) -> torch.Tensor:
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    return x.requires_grad_(requires_grad)


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], device=DEVICE, dtype=torch.int32)


def assert_close_to_ref(
    name: str, ours: torch.Tensor, ref32: torch.Tensor, ref_lo: torch.Tensor, factor: float,
    eps: float = 1e-5,
) -> None:  # fmt: skip
    """|ours - ref32| <= factor * |ref_lo - ref32| + eps + one ulp of ours' dtype at
    |ref32| (test_flash_attn_gpu.py's rule)."""
    ulp = ref32.float().abs().max().item() * torch.finfo(ours.dtype).eps
    ours, ref32, ref_lo = ours.float(), ref32.float(), ref_lo.float()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - ref32).abs().max().item()
    ref_err = (ref_lo - ref32).abs().max().item()
    bound = factor * ref_err + eps + ulp
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x {ref_err:.3e} + {ulp:.1e}"


def binomial_bound(total: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """(expected dropped count, allowed deviation) for total Bernoulli(P(drop)) trials."""
    q = dropout_threshold(p) / 256
    return q * total, sigmas * math.sqrt(total * q * (1 - q)) + 1


@contextmanager
def recorded_rng_states() -> Iterator[dict[str, list[torch.Tensor | None]]]:
    """The rng_state every fwd and bwd op call of the block got (the tensors themselves)."""
    mod = ops()
    seen: dict[str, list[torch.Tensor | None]] = {"fwd": [], "bwd": []}
    original = {name: getattr(mod, name) for name in seen}

    def fwd(*args: Any) -> Any:
        seen["fwd"].append(args[13] if len(args) > 13 else None)
        return original["fwd"](*args)

    def bwd(*args: Any) -> Any:
        seen["bwd"].append(args[17] if len(args) > 17 else None)
        return original["bwd"](*args)

    mod.fwd, mod.bwd = fwd, bwd
    try:
        yield seen
    finally:
        mod.fwd, mod.bwd = original["fwd"], original["bwd"]


def assert_same_tensor(rng_fwd: torch.Tensor | None, rng_bwd: torch.Tensor | None) -> None:
    """The backward op got the forward's rng_state: the saved tensor itself."""
    assert rng_fwd is not None and rng_bwd is not None, (rng_fwd, rng_bwd)
    assert rng_bwd.data_ptr() == rng_fwd.data_ptr(), "bwd did not get the forward's rng_state"
    assert rng_fwd.dtype == torch.int64 and tuple(rng_fwd.shape) == (2,)
    assert rng_fwd.is_contiguous()


def keep_mask(rng_state: torch.Tensor, batch: int, nheads: int, sq: int, sk: int, p: float):
    keep = ops().dropout_mask(rng_state, batch, nheads, sq, sk, p)
    assert keep.dtype == torch.uint8 and tuple(keep.shape) == (batch, nheads, sq, sk)
    assert keep.device == rng_state.device
    return keep.bool()


# --- the mask --------------------------------------------------------------------


def seeded_rng_state(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device=DEVICE)


def test_dropout_mask_is_a_function_of_the_position() -> None:
    rng = seeded_rng_state(0)
    small = ops().dropout_mask(rng, 2, 3, 100, 130, P)
    large = ops().dropout_mask(rng, 3, 5, 257, 300, P)
    assert torch.equal(small, large[:2, :3, :100, :130])
    assert torch.equal(small, ops().dropout_mask(rng.clone(), 2, 3, 100, 130, P))
    assert set(torch.unique(large).tolist()) <= {0, 1}
    assert not torch.equal(large, ops().dropout_mask(seeded_rng_state(1), 3, 5, 257, 300, P))


@pytest.mark.parametrize("p", [0.05, P, 0.5, 0.9])
@pytest.mark.parametrize("layout", ["dense", "varlen"])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_dropout_fraction_is_binomial_around_the_quantised_p(
    p: float, layout: str, mask: str
) -> None:
    causal, window = MASKS[mask]
    rng = seeded_rng_state(2)
    nheads = 8
    if layout == "dense":
        sq, sk = 1000, 1200
        keep = keep_mask(rng, 4, nheads, sq, sk, p)
        visible = visible_keys(sq, sk, causal=causal, window_size=window, device=DEVICE)
        dropped = int((~keep & visible).sum())
        total = int(visible.sum()) * 4 * nheads
    else:
        lens_q, lens_k = [700, 1, 1000, 64], [900, 1000, 1000, 3]
        keep = keep_mask(rng, 4, nheads, max(lens_q), max(lens_k), p)
        dropped = total = 0
        for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
            visible = visible_keys(lq, lk, causal=causal, window_size=window, device=DEVICE)
            dropped += int((~keep[b, :, :lq, :lk] & visible).sum())
            total += int(visible.sum()) * nheads
    expected, allowed = binomial_bound(total, p)
    assert abs(dropped - expected) <= allowed, (
        f"{dropped} of {total} dropped, {expected:.0f} +- {allowed:.0f} expected"
    )


def test_dropout_probability_is_quantised_to_8_bits() -> None:
    rng = seeded_rng_state(3)
    assert bool(keep_mask(rng, 2, 4, 512, 512, 0.4 / 256).all())  # rounds to 0
    keep = keep_mask(rng, 8, 8, 1024, 1024, 3.4 / 256)  # rounds to 3 / 256
    expected, allowed = binomial_bound(keep.numel(), 3.4 / 256)
    assert abs(int((~keep).sum()) - expected) <= allowed


# --- out, dq, dk, dv against the reference --------------------------------------


def run_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, causal: bool,
    window: tuple[int, int], **kwargs: Any,
) -> tuple[Outputs, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Our forward + backward on poisoned memory: (outputs, dout, rng_state)."""
    with recorded_rng_states() as seen:
        repoison()
        out, lse, _ = fa().flash_attn_func(
            q, k, v, p, causal=causal, window_size=window, return_attn_probs=True, **kwargs
        )
        g = torch.randn_like(out)
        repoison()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    (rng_fwd,), (rng_bwd,) = seen["fwd"], seen["bwd"]
    assert_same_tensor(rng_fwd, rng_bwd)
    assert rng_fwd.device == q.device
    return Outputs(out, lse, dq, dk, dv), g, rng_fwd


def compare_to_reference(
    name: str, ours: Outputs, g: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, keep: torch.Tensor, p: float, **kw: Any,
) -> None:  # fmt: skip
    """ours (one dense batch) against the reference with keep, fp32 and in dtype."""
    ref32, lse32 = attention_dropout_ref(q, k, v, keep, p, upcast=True, **kw)
    ref_lo, _ = attention_dropout_ref(q, k, v, keep, p, upcast=False, **kw)
    assert_close_to_ref(f"{name} out", ours.out, ref32, ref_lo, 2.0)
    finite = torch.isfinite(lse32)
    assert torch.equal(torch.isfinite(ours.lse), finite), f"{name} lse: +inf rows differ"
    if finite.any():
        assert (ours.lse[finite] - lse32[finite]).abs().max().item() <= 1e-3, f"{name} lse"
    grads32 = torch.autograd.grad(ref32, (q, k, v), g)
    grads_lo = torch.autograd.grad(ref_lo, (q, k, v), g)
    mine = (ours.dq, ours.dk, ours.dv)
    for grad, a, b, c in zip(("dq", "dk", "dv"), mine, grads32, grads_lo):
        assert_close_to_ref(f"{name} {grad}", a, b, c, 3.0, eps=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", HDIMS)
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_dense_forward_and_backward(dtype: torch.dtype, hdim: int, heads: str, mask: str) -> None:
    needs_build(hdim, dtype)
    torch.manual_seed(hdim + len(mask))
    (h, hk), (causal, window) = HEADS[heads], MASKS[mask]
    sq, sk = DENSE_SEQLENS
    q, k, v = rand(2, sq, h, hdim, dtype=dtype), *(rand(2, sk, hk, hdim, dtype=dtype) for _ in "kv")
    ours, g, rng = run_dense(q, k, v, P, causal, window)
    problems = masked_part_problems(
        ours, dense_parts(sq, sk, causal=causal, window_size=window, device=DEVICE)
    )
    assert not problems, "\n".join(problems)
    keep = keep_mask(rng, 2, h, sq, sk, P)
    compare_to_reference("dense", ours, g, q, k, v, keep, P, causal=causal, window_size=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", HDIMS)
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_varlen_forward_and_backward(dtype: torch.dtype, hdim: int, heads: str, mask: str) -> None:
    needs_build(hdim, dtype)
    torch.manual_seed(hdim + 7 * len(mask))
    (h, hk), (causal, window) = HEADS[heads], MASKS[mask]
    q = rand(sum(LENS_Q), h, hdim, dtype=dtype)
    k, v = (rand(sum(LENS_K), hk, hdim, dtype=dtype) for _ in "kv")
    cu_q, cu_k = cu_seqlens(LENS_Q), cu_seqlens(LENS_K)
    mq, mk = max(LENS_Q), max(LENS_K)
    with recorded_rng_states() as seen:
        repoison()
        out, lse, _ = fa().flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, mq, mk, P, causal=causal, window_size=window,
            return_attn_probs=True,
        )  # fmt: skip
        g = torch.randn_like(out)
        repoison()
        ours = Outputs(out, lse, *torch.autograd.grad(out, (q, k, v), g))
    (rng,), (rng_bwd,) = seen["fwd"], seen["bwd"]
    assert_same_tensor(rng, rng_bwd)
    parts = varlen_parts(LENS_Q, LENS_K, causal=causal, window_size=window, device=DEVICE)
    problems = masked_part_problems(ours, parts)
    assert not problems, "\n".join(problems)
    keep = keep_mask(rng, len(LENS_Q), h, mq, mk, P)
    for b in range(len(LENS_Q)):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if LENS_Q[b] == 0 or LENS_K[b] == 0:
            continue  # masked_parts checked these
        qb, kb, vb = (x.detach()[r][None].requires_grad_() for x, r in ((q, rq), (k, rk), (v, rk)))
        seq = Outputs(
            out[rq][None], lse[:, rq][None], ours.dq[rq][None], ours.dk[rk][None],  # type: ignore[index]
            ours.dv[rk][None],  # type: ignore[index]
        )  # fmt: skip
        compare_to_reference(
            f"seq{b}", seq, g[rq][None], qb, kb, vb, keep[b : b + 1], P, causal=causal,
            window_size=window,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_and_decode_shaped_calls_drop_too(dtype: torch.dtype) -> None:
    """Without a gradient (the op alone) and for decode shapes (one query token: the
    split-KV kernel's shape, which dropout must not take)."""
    needs_build(128, dtype, backward=False)
    torch.manual_seed(5)
    for sq, sk, h, hk in ((1, 1000, 8, 1), (3, 517, 8, 2), (300, 300, 4, 4)):
        q = rand(2, sq, h, 128, dtype=dtype, requires_grad=False)
        k, v = (rand(2, sk, hk, 128, dtype=dtype, requires_grad=False) for _ in "kv")
        with recorded_rng_states() as seen, torch.no_grad():
            out = fa().flash_attn_func(q, k, v, 0.3, causal=True)
        (rng,) = seen["fwd"]
        assert rng is not None
        keep = keep_mask(rng, 2, h, sq, sk, 0.3)
        ref32, _ = attention_dropout_ref(q, k, v, keep, 0.3, causal=True)
        ref_lo, _ = attention_dropout_ref(q, k, v, keep, 0.3, causal=True, upcast=False)
        assert_close_to_ref(f"{sq}x{sk} out", out, ref32, ref_lo, 2.0)


# --- reproducibility -------------------------------------------------------------


@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_same_seed_same_bits_other_seed_other_bits(hdim: int, causal: bool) -> None:
    needs_build(hdim, torch.bfloat16)
    torch.manual_seed(6)
    q, k, v = (rand(2, 517, 4, hdim, dtype=torch.bfloat16) for _ in range(3))
    g = torch.randn(2, 517, 4, hdim, device=DEVICE, dtype=torch.bfloat16)

    def run(seed: int) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(seed)
        out = fa().flash_attn_func(q, k, v, P, causal=causal)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    first, again, other = run(10), run(10), run(11)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), first, again, other):
        assert torch.equal(a, b), f"{name}: the same seed gave other bits"
        assert not torch.equal(a, c), f"{name}: another seed gave the same bits"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", HDIMS)
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_deterministic_backward_is_bit_identical(
    dtype: torch.dtype, hdim: int, layout: str
) -> None:
    needs_build(hdim, dtype)
    torch.manual_seed(7)
    if layout == "dense":
        q, k, v = (rand(2, 517, 6, hdim, dtype=dtype) for _ in range(3))
        out = fa().flash_attn_func(q, k, v, P, causal=True, deterministic=True)
    else:
        q = rand(sum(LENS_Q), 6, hdim, dtype=dtype)
        k, v = (rand(sum(LENS_K), 2, hdim, dtype=dtype) for _ in "kv")
        out = fa().flash_attn_varlen_func(
            q, k, v, cu_seqlens(LENS_Q), cu_seqlens(LENS_K), max(LENS_Q), max(LENS_K), P,
            causal=True, deterministic=True,
        )  # fmt: skip
    g = torch.randn_like(out)
    runs = []
    for _ in range(3):
        repoison()
        runs.append(torch.autograd.grad(out, (q, k, v), g, retain_graph=True))
    for i, other in enumerate(runs[1:], start=2):
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], other):
            diff = int((a != b).sum())
            assert diff == 0, f"{name}: {diff} elements differ between call 1 and call {i}"


# --- CUDA graphs -------------------------------------------------------------------


@pytest.mark.parametrize("hdim", [64, 128])
def test_cuda_graph_replays_draw_a_new_mask_each(
    hdim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_build(hdim, torch.bfloat16)
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    import flash_attn.flash_attn_interface as interface

    torch.manual_seed(8)
    q, k, v = (rand(2, 384, 4, hdim, dtype=torch.bfloat16) for _ in range(3))
    g = torch.randn(2, 384, 4, hdim, device=DEVICE, dtype=torch.bfloat16)

    def step() -> tuple[torch.Tensor, ...]:
        out = fa().flash_attn_func(q, k, v, P, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the graph, as torch's docs ask
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with recorded_rng_states() as seen, torch.cuda.graph(graph):
        static = step()
    (rng_static,), (rng_bwd,) = seen["fwd"], seen["bwd"]
    assert_same_tensor(rng_static, rng_bwd)
    assert rng_static is not None

    def replay() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        graph.replay()
        torch.cuda.synchronize()
        return rng_static.clone(), tuple(t.clone() for t in static)

    rng1, res1 = replay()
    rng2, res2 = replay()
    assert not torch.equal(rng1, rng2), "two replays drew the same rng_state"
    for name, a, b in zip(("out", "dq", "dk", "dv"), res1, res2):
        assert not torch.equal(a, b), f"{name}: two replays gave the same bits"
    # each replay is the eager call with that replay's rng_state, bit for bit
    for rng, res in ((rng1, res1), (rng2, res2)):
        monkeypatch.setattr(interface, "draw_rng_state", lambda p, device, r=rng: r.clone())
        eager = step()
        monkeypatch.undo()
        for name, a, b in zip(("out", "dq", "dk", "dv"), res, eager):
            assert torch.equal(a, b), f"{name}: replay and eager call with its rng_state differ"
        keep = keep_mask(rng, 2, 4, 384, 384, P)
        ref32, _ = attention_dropout_ref(q, k, v, keep, P, causal=True)
        ref_lo, _ = attention_dropout_ref(q, k, v, keep, P, causal=True, upcast=False)
        assert_close_to_ref("graph out", res[0], ref32, ref_lo, 2.0)
    # torch.manual_seed before a replay reproduces it
    torch.manual_seed(1234)
    rng3, res3 = replay()
    torch.manual_seed(1234)
    rng4, res4 = replay()
    assert torch.equal(rng3, rng4)
    for a, b in zip(res3, res4):
        assert torch.equal(a, b)


# --- return_attn_probs: S_dmask ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("alibi", [False, True])
def test_s_dmask_decodes_to_the_mask_and_the_probabilities(
    dtype: torch.dtype, mask: str, alibi: bool
) -> None:
    needs_build(64, dtype, backward=False)
    from flash_attn import _probs

    torch.manual_seed(9)
    (causal, window), (h, hk) = MASKS[mask], HEADS["gqa"]
    sq, sk = DENSE_SEQLENS
    q = rand(2, sq, h, 64, dtype=dtype, requires_grad=False)
    k, v = (rand(2, sk, hk, 64, dtype=dtype, requires_grad=False) for _ in "kv")
    slopes = torch.rand(2, h, device=DEVICE) * 0.3 if alibi else None
    kw: dict[str, Any] = {"causal": causal, "window_size": window, "alibi_slopes": slopes}
    with recorded_rng_states() as seen:
        out, lse, s_dmask = fa().flash_attn_func(q, k, v, P, return_attn_probs=True, **kw)
    (rng,) = seen["fwd"]
    assert s_dmask.shape == (2, h, -(-sq // 128) * 128, -(-sk // 128) * 128)
    assert s_dmask.dtype == dtype
    probs, lse_ref, scores = attention_probs(q, k, **kw)
    kept, probs_rec = recover_from_s_dmask(s_dmask, scores.float(), lse_ref, _probs.BLOCK_N)
    visible = visible_keys(sq, sk, causal=causal, window_size=window, device=DEVICE)
    keep = keep_mask(rng, 2, h, sq, sk, P)
    assert torch.equal(kept[:, :, visible], keep[:, :, visible])
    torch.testing.assert_close(probs_rec, probs.float(), atol=2e-3, rtol=2e-2)
    # the kernel's output is the reference's with the mask read from S_dmask
    ref32, _ = attention_dropout_ref(q, k, v, kept, P, **kw)
    ref_lo, _ = attention_dropout_ref(q, k, v, kept, P, upcast=False, **kw)
    assert_close_to_ref("out", out, ref32, ref_lo, 2.0)


@pytest.fixture(scope="module")
def upstream() -> Any:
    from flash_attn.flash_attn_interface import _get_block_size_n

    helpers = load_upstream_helpers(_get_block_size_n)
    if helpers is None:
        pytest.skip(
            "needs .upstream/test_flash_attn.py (tools/upstream_suite.py populate) and einops"
        )
    return helpers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_upstream_style_recovery(upstream: Any, dtype: torch.dtype, hdim: int, mask: str) -> None:
    """Upstream's test_flash_attn_output with dropout, its helpers and its asserts: our
    out / probabilities / gradients within 2x the error of upstream's in-dtype
    reference, the dropout fraction within 0.01 (0.025 local) of p."""
    needs_build(hdim, dtype)
    causal, window = MASKS[mask]
    torch.manual_seed(0)
    sq, sk, h, hk = 113, 203, 6, 2
    q = rand(4, sq, h, hdim, dtype=dtype)
    k, v = (rand(4, sk, hk, hdim, dtype=dtype) for _ in "kv")
    out, lse, s_dmask = fa().flash_attn_func(
        q, k, v, P, causal=causal, window_size=window, return_attn_probs=True
    )
    converted = upstream.convert_flash_attn_S_to_softmax(
        s_dmask, sq, sk, None, None, hdim, True, causal=causal, window_size=window
    )
    dropout_mask = converted >= 0
    k_rep, v_rep = (t.repeat_interleave(h // hk, dim=2) for t in (k, v))
    attn = upstream.normalize_flash_attn_S(
        converted.abs(), q, k_rep, v_rep, None, None, None, True, causal=causal,
        window_size=window,
    )  # fmt: skip
    fraction = upstream.get_dropout_fraction(
        dropout_mask, None, None, causal=causal, window_size=window
    ).item()
    kw = {"causal": causal, "window_size": window}
    out_ref, attn_ref = upstream.attention_ref(q, k, v, None, None, None, P, dropout_mask, **kw)
    out_pt, attn_pt = upstream.attention_ref(
        q, k, v, None, None, None, P, dropout_mask, upcast=False, reorder_ops=True, **kw
    )
    assert (out - out_ref).abs().max().item() <= 2 * (out_pt - out_ref).abs().max().item()
    assert (attn - attn_ref).abs().max().item() <= 2 * (attn_pt - attn_ref).abs().max().item()
    assert abs(fraction - P) <= (0.025 if mask == "local" else 0.01)
    g = torch.randn_like(out)
    dqkv = torch.autograd.grad(out, (q, k, v), g)
    dqkv_ref = torch.autograd.grad(out_ref, (q, k, v), g)
    dqkv_pt = torch.autograd.grad(out_pt, (q, k, v), g)
    for name, a, b, c in zip(("dq", "dk", "dv"), dqkv, dqkv_ref, dqkv_pt):
        err, ref_err = (a - b).abs().max().item(), (c - b).abs().max().item()
        assert err <= 2 * ref_err, f"{name}: {err:.3e} > 2 x {ref_err:.3e}"
