"""The Python API on a CPU-only machine.

- the signatures equal flash_attn 2.x's;
- the reference (tests/reference.py) agrees with SDPA and with a brute-force loop;
- the whole Python path (validation, head-dim padding, packing, autograd, the fake
  implementations under torch.compile) runs against a CPU stand-in for
  flash_attn._C that registers ops with the contract's schemas and computes them
  with the reference (dropout included: its dropout_mask is dropout_ref.stub_keep_mask
  and its fwd/bwd apply that mask); it also asserts what the Python layer hands the
  kernels (test_dropout_cpu.py holds the dropout tests over it);
- where flash_attn._C is importable, its schemas and fakes are checked too.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dropout_ref import (
    attention_dropout_ref,
    attention_dropout_varlen_ref,
    stub_keep_mask,
)
from kvcache_ref import append_ref, index_verdict_ref
from reference import alibi_bias, attention_ref, attention_varlen_ref, visible_keys

import flash_attn
from flash_attn import _checks, _ops
from flash_attn._layout import (
    last_dim_contiguous,
    pad_head_dim,
    padded_head_dim,
    unpad_head_dim,
)
from flash_attn.errors import BuildError, InputError

# --- the interface: names, argument order, defaults ---------------------------

REQUIRED = inspect.Parameter.empty
SHARED = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
UPSTREAM_SIGNATURES: dict[str, list[tuple[str, object]]] = {
    "flash_attn_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED), *SHARED],
    "flash_attn_qkvpacked_func": [("qkv", REQUIRED), *SHARED],
    "flash_attn_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED), *SHARED],
    "flash_attn_varlen_func": [
        ("q", REQUIRED),
        ("k", REQUIRED),
        ("v", REQUIRED),
        ("cu_seqlens_q", REQUIRED),
        ("cu_seqlens_k", REQUIRED),
        ("max_seqlen_q", REQUIRED),
        ("max_seqlen_k", REQUIRED),
        *SHARED,
        ("block_table", None),
    ],
    "flash_attn_varlen_qkvpacked_func": [
        ("qkv", REQUIRED),
        ("cu_seqlens", REQUIRED),
        ("max_seqlen", REQUIRED),
        *SHARED,
    ],
    "flash_attn_varlen_kvpacked_func": [
        ("q", REQUIRED),
        ("kv", REQUIRED),
        ("cu_seqlens_q", REQUIRED),
        ("cu_seqlens_k", REQUIRED),
        ("max_seqlen_q", REQUIRED),
        ("max_seqlen_k", REQUIRED),
        *SHARED,
    ],
    "flash_attn_with_kvcache": [
        ("q", REQUIRED),
        ("k_cache", REQUIRED),
        ("v_cache", REQUIRED),
        ("k", None),
        ("v", None),
        ("rotary_cos", None),
        ("rotary_sin", None),
        ("cache_seqlens", None),
        ("cache_batch_idx", None),
        ("cache_leftpad", None),
        ("block_table", None),
        ("softmax_scale", None),
        ("causal", False),
        ("window_size", (-1, -1)),
        ("softcap", 0.0),
        ("rotary_interleaved", True),
        ("alibi_slopes", None),
        ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
}


@pytest.mark.parametrize("name", sorted(UPSTREAM_SIGNATURES))
def test_signature_equals_flash_attn_2(name: str) -> None:
    params = inspect.signature(getattr(flash_attn, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == UPSTREAM_SIGNATURES[name]
    assert {p.kind for p in params} == {inspect.Parameter.POSITIONAL_OR_KEYWORD}


@pytest.mark.parametrize("module_name", ["flash_attn", "flash_attn.flash_attn_interface"])
def test_modules_export_every_function(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert set(UPSTREAM_SIGNATURES) <= set(module.__all__)
    for name in UPSTREAM_SIGNATURES:
        assert getattr(module, name) is getattr(flash_attn, name)


def test_fa3_top_level_module_reexports_the_functions() -> None:
    import flash_attn_interface

    for name in UPSTREAM_SIGNATURES:
        assert getattr(flash_attn_interface, name) is getattr(flash_attn, name)


def test_version_passes_feature_gates() -> None:
    parts = tuple(int(p) for p in flash_attn.__version__.split(".")[:3])
    assert len(parts) == 3
    assert parts >= (2, 6, 3)
    assert parts < (3, 0, 0)


def test_import_does_not_load_the_extension() -> None:
    code = (
        "import sys, flash_attn, flash_attn.bert_padding, flash_attn_interface; "
        "assert 'flash_attn._C' not in sys.modules, 'extension loaded at import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_repo_root())


def _repo_root() -> str:
    import pathlib

    return str(pathlib.Path(__file__).resolve().parent.parent)


# --- inputs ------------------------------------------------------------------------


def cpu_qkv(
    batch: int = 2,
    seqlen_q: int = 5,
    seqlen_k: int = 7,
    nheads: int = 4,
    nheads_k: int = 2,
    head_dim: int = 32,
    dtype: torch.dtype = torch.float16,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(batch, seqlen_q, nheads, head_dim).to(dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, head_dim).to(dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, head_dim).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))  # type: ignore[return-value]


# --- the head-dim padding helper -------------------------------------------------


@pytest.mark.parametrize(
    ("head_dim", "padded"),
    [(1, 8), (8, 8), (20, 24), (64, 64), (65, 72), (250, 256), (256, 256)],
)
def test_padded_head_dim(head_dim: int, padded: int) -> None:
    assert padded_head_dim(head_dim) == padded


def test_pad_head_dim_appends_zeros() -> None:
    x = torch.randn(2, 3, 4, 20)
    y = pad_head_dim(x)
    assert y.shape == (2, 3, 4, 24)
    assert torch.equal(y[..., :20], x)
    assert torch.count_nonzero(y[..., 20:]) == 0


def test_pad_head_dim_leaves_multiples_of_8_alone() -> None:
    x = torch.randn(2, 3, 4, 32)
    assert pad_head_dim(x) is x


def test_unpad_head_dim_undoes_the_padding_and_leaves_unpadded_alone() -> None:
    x = torch.randn(2, 3, 4, 20)
    assert torch.equal(unpad_head_dim(pad_head_dim(x), 20), x)
    y = torch.randn(2, 3, 4, 32)
    assert unpad_head_dim(y, 32) is y


def test_last_dim_contiguous_copies_only_when_needed() -> None:
    x = torch.randn(2, 8, 3)
    assert last_dim_contiguous(x) is x
    t = x.transpose(1, 2)
    assert t.stride(-1) != 1
    y = last_dim_contiguous(t)
    assert y.stride(-1) == 1
    assert torch.equal(y, t)


# --- the reference --------------------------------------------------------------


def brute_force(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention one query at a time, from the documented rules, in float64."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros(batch, seqlen_q, nheads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, nheads, seqlen_q), math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(nheads):
            hk = h // (nheads // nheads_k)
            for i in range(seqlen_q):
                diag = i + seqlen_k - seqlen_q
                keys = [
                    j
                    for j in range(seqlen_k)
                    if (left < 0 or j >= diag - left) and (right < 0 or j <= diag + right)
                ]
                if not keys:
                    continue
                scores = []
                for j in keys:
                    s = float(q[b, i, h].double() @ k[b, j, hk].double()) * softmax_scale
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if alibi_slopes is not None:
                        slope = alibi_slopes[b, h] if alibi_slopes.dim() == 2 else alibi_slopes[h]
                        s -= float(slope) * abs(diag - j)
                    scores.append(s)
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                lse[b, h, i] = top + math.log(total)
                for w, j in zip(weights, keys):
                    out[b, i, h] += w / total * v[b, j, hk].double()
    return out, lse


REFERENCE_CASES = [
    # (seqlen_q, seqlen_k, causal, window, softcap, alibi)
    (4, 4, False, (-1, -1), 0.0, None),
    (4, 4, True, (-1, -1), 0.0, None),
    (3, 6, True, (-1, -1), 0.0, None),
    (6, 3, True, (-1, -1), 0.0, None),  # first rows see no key
    (5, 5, False, (1, 2), 0.0, None),
    (4, 6, False, (2, 0), 0.0, None),
    (6, 4, False, (0, 1), 0.0, None),
    (5, 5, True, (2, 7), 0.0, None),  # causal overrides right
    (4, 4, False, (-1, -1), 2.0, None),
    (4, 6, True, (-1, -1), 0.0, "heads"),
    (5, 3, False, (-1, -1), 0.0, "batch"),
    (5, 5, False, (1, 1), 3.0, "batch"),
]


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "causal", "window", "softcap", "alibi"), REFERENCE_CASES
)
def test_reference_matches_brute_force(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window: tuple[int, int],
    softcap: float,
    alibi: str | None,
) -> None:
    torch.manual_seed(seqlen_q * 10 + seqlen_k)
    q, k, v = (t.double() for t in cpu_qkv(2, seqlen_q, seqlen_k, 4, 2, 8, torch.float32))
    slopes = {
        None: None,
        "heads": torch.rand(4),
        "batch": torch.rand(2, 4),
    }[alibi]
    kwargs: dict[str, Any] = {
        "causal": causal,
        "window_size": window,
        "softcap": softcap,
        "alibi_slopes": slopes,
        "softmax_scale": 0.4,
    }
    out, lse = attention_ref(q, k, v, **kwargs)
    out_bf, lse_bf = brute_force(q, k, v, **kwargs)
    torch.testing.assert_close(out, out_bf)
    torch.testing.assert_close(lse.double(), lse_bf)


# SDPA's causal mask is top-left aligned: the same as ours only when sq == sk.
@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "causal"), [(7, 7, False), (7, 7, True), (5, 9, False)]
)
def test_reference_matches_sdpa(seqlen_q: int, seqlen_k: int, causal: bool) -> None:
    torch.manual_seed(0)
    q, k, v = cpu_qkv(2, seqlen_q, seqlen_k, 6, 2, 16, torch.float32)
    out, _ = attention_ref(q, k, v, causal=causal, softmax_scale=0.3)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(3, dim=2).transpose(1, 2),
        v.repeat_interleave(3, dim=2).transpose(1, 2),
        is_causal=causal,
        scale=0.3,
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_lse_is_the_log_normaliser() -> None:
    torch.manual_seed(0)
    q, k, v = cpu_qkv(1, 3, 5, 2, 2, 8, torch.float32)
    _, lse = attention_ref(q, k, v, softmax_scale=0.5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
    torch.testing.assert_close(lse, scores.logsumexp(-1))


def test_fully_masked_rows_give_zero_output_infinite_lse_and_finite_grads() -> None:
    q, k, v = cpu_qkv(1, 6, 3, 2, 2, 8, torch.float32, requires_grad=True)
    out, lse = attention_ref(q, k, v, causal=True)
    assert torch.count_nonzero(out[:, :3]) == 0
    assert torch.isinf(lse[..., :3]).all() and (lse[..., :3] > 0).all()
    assert torch.isfinite(lse[..., 3:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert torch.count_nonzero(q.grad[:, :3]) == 0  # type: ignore[index]


def test_reference_in_dtype_stays_in_dtype_and_is_close() -> None:
    torch.manual_seed(0)
    q, k, v = cpu_qkv(2, 16, 16, 2, 2, 32, torch.bfloat16)
    out_fp32, lse_fp32 = attention_ref(q, k, v, causal=True)
    out_lp, lse_lp = attention_ref(q, k, v, causal=True, upcast=False)
    assert out_fp32.dtype == out_lp.dtype == torch.bfloat16
    assert lse_lp.dtype == torch.float32
    torch.testing.assert_close(out_lp, out_fp32, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse_lp, lse_fp32, atol=5e-2, rtol=5e-2)
    assert not torch.equal(lse_lp, lse_fp32)  # really computed in bf16


def test_varlen_reference_runs_each_sequence_alone() -> None:
    torch.manual_seed(0)
    lens_q, lens_k = [3, 1, 4], [5, 2, 4]
    q = torch.randn(sum(lens_q), 4, 8)
    k = torch.randn(sum(lens_k), 2, 8)
    v = torch.randn(sum(lens_k), 2, 8)
    cu_q = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 11], dtype=torch.int32)
    slopes = torch.rand(3, 4)
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, alibi_slopes=slopes)
    assert out.shape == q.shape
    assert lse.shape == (4, 8)
    for b in range(3):
        rq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        o, lse_b = attention_ref(
            q[None, rq], k[None, rk], v[None, rk], causal=True, alibi_slopes=slopes[b]
        )
        torch.testing.assert_close(out[rq], o[0])
        torch.testing.assert_close(lse[:, rq], lse_b[0])


def test_visible_keys_and_alibi_bias_shapes() -> None:
    mask = visible_keys(2, 5, causal=True)
    assert mask.tolist() == [
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    bias = alibi_bias(torch.tensor([0.5]), 2, 3)
    assert bias.shape == (1, 1, 2, 3)
    assert bias[0, 0].tolist() == [[-0.5, 0.0, -0.5], [-1.0, -0.5, 0.0]]


# --- a CPU stand-in for flash_attn._C ---------------------------------------------

STUB_NAMESPACE = "flash_attn_cpu_stub"
FULL_BUILD = {
    "head_dims": [32, 64, 96, 128, 160, 192, 224, 256],
    "dtypes": ["fp16", "bf16"],
    "backward": True,
    "cuda_archs": ["80", "90"],
}


class StubKernels:
    """What the stand-in ops were called with; what build they claim to be."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.build = dict(FULL_BUILD)
        self.device_checks = 0  # fwd_kv calls given a verdict (the device index check)
        self.refused = 0  # of those, refused: nothing written, not recorded in calls


STUB = StubKernels()
_STUB_LIBRARY: list[torch.library.Library] = []


def _check_kernel_layout(**tensors: torch.Tensor | None) -> None:
    """The contract: last dim contiguous, head_dim a multiple of 8."""
    for name, t in tensors.items():
        if t is None:
            continue
        assert t.stride(-1) == 1, f"{name} reached the kernel with stride {t.stride()}"
        if name in ("q", "k", "v", "out", "dout"):
            assert t.shape[-1] % 8 == 0, f"{name} head_dim {t.shape[-1]} not padded"


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs: dict[str, Any] = {
        "window_size": (window_left, window_right),
        "softcap": softcap,
        "alibi_slopes": alibi_slopes,
        "softmax_scale": softmax_scale,
    }
    if keep is not None:
        if cu_seqlens_q is None:
            return attention_dropout_ref(q, k, v, keep, dropout_p, **kwargs)
        assert cu_seqlens_k is not None
        return attention_dropout_varlen_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k, keep, dropout_p, **kwargs
        )
    if cu_seqlens_q is None:
        return attention_ref(q, k, v, **kwargs)
    assert cu_seqlens_k is not None
    return attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)


def _stub_keep(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    rng_state: torch.Tensor | None,
) -> torch.Tensor | None:
    """The mask the stand-in applies (None without dropout), after checking rng_state
    against the contract: absent without dropout; int64 (2,), contiguous, on q's device
    with it (the real binding wants it on the GPU; the stand-in runs on the CPU)."""
    assert 0.0 <= dropout_p < 1.0, dropout_p
    if dropout_p == 0.0:
        assert rng_state is None, "rng_state drawn without dropout"
        return None
    assert rng_state is not None, "dropout without rng_state"
    assert rng_state.dtype == torch.int64 and tuple(rng_state.shape) == (2,)
    assert rng_state.is_contiguous() and rng_state.device == q.device
    if cu_seqlens_q is None:
        batch, nheads = q.shape[0], q.shape[2]
    else:
        batch, nheads = cu_seqlens_q.shape[0] - 1, q.shape[1]
    return stub_keep_mask(rng_state, batch, nheads, max_seqlen_q, max_seqlen_k, dropout_p)


def _stub_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    rng_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kernel_layout(q=q, k=k, v=v, alibi_slopes=alibi_slopes)
    keep = _stub_keep(q, cu_seqlens_q, max_seqlen_q, max_seqlen_k, dropout_p, rng_state)
    STUB.calls.append(
        (
            "fwd",
            {
                "head_dim": q.shape[-1],
                "max_seqlen_q": max_seqlen_q,
                "max_seqlen_k": max_seqlen_k,
                "softmax_scale": softmax_scale,
                "window": (window_left, window_right),
                "softcap": softcap,
                "dropout_p": dropout_p,
                "rng_state": rng_state,
            },
        )
    )
    out, lse = _reference(
        q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left,
        window_right, softcap, alibi_slopes, dropout_p, keep,
    )  # fmt: skip
    return out.contiguous(), lse.contiguous()  # contiguous, as the binding allocates


def _stub_fwd_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    kv_batch_idx: torch.Tensor | None,
    leftpad_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    num_splits: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    verdict: torch.Tensor | None = None,
    max_keys: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fwd_kv contract (flash_attn/_ops.py) written out: with a verdict, the index
    check first (nothing written on a bad value); k_new and v_new written into the
    caches row by row, then each sequence's keys gathered one by one, then the
    reference attention over them. With k_new, seqused_k counts the keys before the
    append (kvcache_ref's helpers take the counts after it)."""
    _check_kernel_layout(q=q, k=k, v=v, alibi_slopes=alibi_slopes)
    if seqused_k is not None:  # (the binding takes contiguous index tensors)
        assert seqused_k.dtype == torch.int32 and seqused_k.device == q.device
        assert seqused_k.is_contiguous()
    if k_new is not None and seqused_k is not None:
        seqused_k = seqused_k + k_new.shape[1]
    if verdict is not None:
        STUB.device_checks += 1
        assert verdict.dtype == torch.int32 and verdict.numel() == 1 and not verdict.is_cuda
        batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
        seqlen_new = 0 if k_new is None else k_new.shape[1]
        capacity = (block_table.shape[1] * k.shape[1] if block_table is not None
                    else max_seqlen_k if cu_seqlens_k is not None else k.shape[1])  # fmt: skip
        verdict[0] = index_verdict_ref(
            k, capacity, seqlen_new, max_keys, cu_seqlens_k, seqused_k, kv_batch_idx, leftpad_k,
            block_table, batch,
        )  # fmt: skip
        if int(verdict[0]) != 0:
            STUB.refused += 1
            return _ops.fwd_kv_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx,
                                    leftpad_k, block_table, max_seqlen_q, max_seqlen_k,
                                    softmax_scale, window_left, window_right, softcap,
                                    alibi_slopes, num_splits)  # fmt: skip
    if k_new is not None or v_new is not None:
        assert k_new is not None and v_new is not None and cu_seqlens_q is None
        append_ref(k, v, k_new, v_new, seqused_k, kv_batch_idx, block_table)
    index = {
        "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "seqused_k": seqused_k,
        "kv_batch_idx": kv_batch_idx, "leftpad_k": leftpad_k, "block_table": block_table,
    }  # fmt: skip
    for name, t in index.items():
        assert t is None or (
            t.dtype == torch.int32 and t.device == q.device and t.is_contiguous()
        ), name
    assert 0 <= num_splits <= 128
    STUB.calls.append(
        (
            "fwd_kv",
            {
                "head_dim": q.shape[-1],
                "max_seqlen_q": max_seqlen_q,
                "max_seqlen_k": max_seqlen_k,
                "softmax_scale": softmax_scale,
                "window": (window_left, window_right),
                "softcap": softcap,
                "num_splits": num_splits,
                "paged": block_table is not None,
                "k_shape": tuple(k.shape),
                "appended": k_new is not None,
            },
        )
    )
    varlen_q = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    outs, lses = [], []
    for b in range(batch):
        if cu_seqlens_q is not None:
            q_b = q[int(cu_seqlens_q[b]) : int(cu_seqlens_q[b + 1])]
        else:
            q_b = q[b]
        assert q_b.shape[0] <= max_seqlen_q
        if seqused_k is not None:
            n = int(seqused_k[b])
        elif cu_seqlens_k is not None:
            n = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        else:
            n = max_seqlen_k if block_table is not None else k.shape[1]
        assert 0 <= n <= max_seqlen_k, (n, max_seqlen_k)
        start = 0
        if block_table is not None:
            assert kv_batch_idx is None and leftpad_k is None
            page_size = k.shape[1]
            assert page_size % 16 == 0 and n <= block_table.shape[1] * page_size
            slots = [(int(block_table[b, j // page_size]), j % page_size) for j in range(n)]
            assert all(0 <= page < k.shape[0] for page, _ in slots), "page outside the pool"
            k_b = torch.stack([k[p, r] for p, r in slots]) if slots else k[0, :0]
            v_b = torch.stack([v[p, r] for p, r in slots]) if slots else v[0, :0]
        elif cu_seqlens_k is not None:
            first = int(cu_seqlens_k[b])
            k_b, v_b = k[first : first + n], v[first : first + n]
        else:
            row = b if kv_batch_idx is None else int(kv_batch_idx[b])
            assert 0 <= row < k.shape[0] and n <= k.shape[1]
            start = 0 if leftpad_k is None else int(leftpad_k[b])
            assert 0 <= start <= n
            k_b, v_b = k[row, start:n], v[row, start:n]
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        out_b, lse_b = attention_ref(
            q_b[None], k_b[None], v_b[None], window_size=(window_left, window_right),
            softcap=softcap, alibi_slopes=slopes, softmax_scale=softmax_scale,
        )  # fmt: skip
        outs.append(out_b[0])
        lses.append(lse_b[0])
    if varlen_q:
        return torch.cat(outs).contiguous(), torch.cat(lses, dim=-1).contiguous()
    return torch.stack(outs).contiguous(), torch.stack(lses).contiguous()


def _stub_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    dropout_p: float,
    rng_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_kernel_layout(dout=dout, q=q, k=k, v=v, out=out)
    keep = _stub_keep(q, cu_seqlens_q, max_seqlen_q, max_seqlen_k, dropout_p, rng_state)
    STUB.calls.append(
        (
            "bwd",
            {
                "head_dim": q.shape[-1],
                "deterministic": deterministic,
                "dropout_p": dropout_p,
                "rng_state": rng_state,
            },
        )
    )
    args = (softmax_scale, window_left, window_right, softcap)
    if cu_seqlens_q is None:
        dq, dk, dv = _dense_grads(dout, q, k, v, *args, alibi_slopes, dropout_p, keep)
    else:
        assert cu_seqlens_k is not None
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(len(bq) - 1):
            rq, rk = slice(bq[b], bq[b + 1]), slice(bk[b], bk[b + 1])
            slopes = alibi_slopes
            if slopes is not None and slopes.dim() == 2:
                slopes = slopes[b]
            keep_b = None if keep is None else keep[b : b + 1]
            grads_b = _dense_grads(
                dout[None, rq], q[None, rq], k[None, rk], v[None, rk], *args, slopes,
                dropout_p, keep_b,
            )  # fmt: skip
            dq[rq], dk[rk], dv[rk] = (g[0] for g in grads_b)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # as the binding allocates


def _dense_grads(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention backward written out (float32), as a kernel computes it:
    dV = Pd^T dO, dS = P * (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q, where with
    dropout (keep Z, r = 1 / (1 - p)) Pd = P * Z * r and dP = (dO V^T) * Z * r, and
    without Pd = P, dP = dO V^T."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    qf, do = q.float(), dout.float()
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k)
    visible = visible_keys(seqlen_q, seqlen_k, window_size=(window_left, window_right))
    any_visible = visible.any(-1, keepdim=True)
    scores = torch.where(any_visible, scores.masked_fill(~visible, float("-inf")), 0.0)
    probs = torch.softmax(scores, dim=-1) * any_visible
    if keep is None:
        dropped, z = probs, None
    else:
        z = keep[:, :, :seqlen_q, :seqlen_k].float() / (1.0 - dropout_p)
        dropped = probs * z
    out = torch.einsum("bhqk,bkhd->bqhd", dropped, vf)
    dv = torch.einsum("bhqk,bqhd->bkhd", dropped, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vf)
    if z is not None:
        dp = dp * z
    delta = (do * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # (b, h, sq, 1)
    ds = probs * (dp - delta)
    if softcap > 0:
        ds = ds * (1 - tanh.square())
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale

    def per_kv_head(g: torch.Tensor) -> torch.Tensor:
        return g.view(batch, seqlen_k, nheads_k, group, head_dim).sum(3)

    return (
        dq.to(q.dtype),
        per_kv_head(dk).to(k.dtype),
        per_kv_head(dv).to(v.dtype),
    )


def _stub_dropout_mask(
    rng_state: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, p: float
) -> torch.Tensor:
    STUB.calls.append(("dropout_mask", {"shape": (batch, nheads, seqlen_q, seqlen_k), "p": p}))
    return stub_keep_mask(rng_state, batch, nheads, seqlen_q, seqlen_k, p)


def _stub_build_info() -> str:
    return json.dumps(STUB.build)


def define_stub_ops() -> object:
    """The stand-in's 'import': define the ops once per process."""
    if not _STUB_LIBRARY:
        lib = torch.library.Library(STUB_NAMESPACE, "DEF")
        lib.define(_ops.FWD_SCHEMA)
        lib.define(_ops.FWD_KV_SCHEMA)
        lib.define(_ops.BWD_SCHEMA)
        lib.define(_ops.DROPOUT_MASK_SCHEMA)
        lib.define(_ops.BUILD_INFO_SCHEMA)
        lib.impl("fwd", _stub_fwd, "CPU")
        lib.impl("fwd_kv", _stub_fwd_kv, "CPU")
        lib.impl("bwd", _stub_bwd, "CPU")
        lib.impl("dropout_mask", _stub_dropout_mask, "CPU")
        lib.impl("build_info", _stub_build_info, "CompositeExplicitAutograd")
        _STUB_LIBRARY.append(lib)
    return _STUB_LIBRARY[0]


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubKernels]:
    """Route flash_attn's ops to the CPU stand-in and let CPU tensors through."""
    STUB.calls.clear()
    STUB.build = dict(FULL_BUILD)
    STUB.device_checks = STUB.refused = 0
    ext = _ops.Extension(namespace=STUB_NAMESPACE, importer=define_stub_ops)
    monkeypatch.setattr(_ops, "_EXTENSION", ext)
    monkeypatch.setattr(_checks, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(_checks, "check_capability", lambda device: (9, 0))
    yield STUB


def grads(
    out: torch.Tensor, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dout)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-3, rtol=2e-3)


DENSE_CASES = [
    # (seqlen_q, seqlen_k, nheads, nheads_k, head_dim, kwargs)
    (5, 5, 4, 4, 32, {}),
    (5, 9, 4, 2, 20, {"causal": True}),
    (9, 5, 6, 2, 40, {"causal": True, "window_size": (3, -1)}),
    (7, 7, 4, 1, 64, {"window_size": (2, 1), "softcap": 5.0}),
    (6, 8, 4, 2, 12, {"alibi_slopes": "batch", "softmax_scale": 0.2}),
    (6, 8, 4, 4, 16, {"alibi_slopes": "heads", "causal": True}),
]


def _kwargs(kwargs: dict[str, Any], batch: int, nheads: int) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "batch":
        kwargs["alibi_slopes"] = torch.rand(batch, nheads)
    elif kwargs.get("alibi_slopes") == "heads":
        kwargs["alibi_slopes"] = torch.rand(nheads)
    return kwargs


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "nheads", "nheads_k", "head_dim", "kwargs"), DENSE_CASES
)
def test_flash_attn_func_forward_and_backward(
    stub: StubKernels,
    seqlen_q: int,
    seqlen_k: int,
    nheads: int,
    nheads_k: int,
    head_dim: int,
    kwargs: dict[str, Any],
) -> None:
    torch.manual_seed(0)
    q, k, v = cpu_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, requires_grad=True)
    kwargs = _kwargs(kwargs, 2, nheads)
    dout = torch.randn_like(q)

    out = flash_attn.flash_attn_func(q, k, v, **kwargs)
    out_ref, _ = attention_ref(q, k, v, **kwargs)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, out_ref)
    for g, g_ref in zip(grads(out, (q, k, v), dout), grads(out_ref, (q, k, v), dout)):
        assert_close(g, g_ref)
    assert [name for name, _ in stub.calls] == ["fwd", "bwd"]


def test_the_kernels_see_padded_head_dim_and_unpadded_scale(stub: StubKernels) -> None:
    q, k, v = cpu_qkv(2, 5, 9, 4, 2, head_dim=20)
    flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(4, 3), softcap=-1.0)
    ((name, call),) = stub.calls
    assert name == "fwd"
    assert call == {
        "head_dim": 24,
        "max_seqlen_q": 5,
        "max_seqlen_k": 9,
        "softmax_scale": pytest.approx(20**-0.5),
        "window": (4, 0),
        "softcap": 0.0,
        "dropout_p": 0.0,
        "rng_state": None,
    }


@pytest.mark.parametrize(
    ("window", "seqlen_q", "seqlen_k"), [((9, 5), 5, 9), ((8, 4), 5, 9), ((2**40, 3), 4, 4)]
)
def test_windows_past_every_key_reach_the_kernel_as_unbounded(
    stub: StubKernels, window: tuple[int, int], seqlen_q: int, seqlen_k: int
) -> None:
    q, k, v = cpu_qkv(1, seqlen_q, seqlen_k, 2, 2, 16)
    out = flash_attn.flash_attn_func(q, k, v, window_size=window)
    left, right = window
    expected = (-1 if left >= seqlen_k else left, -1 if right >= seqlen_q else right)
    assert stub.calls[0][1]["window"] == expected
    assert_close(out, attention_ref(q, k, v, window_size=window)[0])


def test_non_contiguous_last_dim_is_made_contiguous(stub: StubKernels) -> None:
    torch.manual_seed(0)
    base = torch.randn(2, 5, 4, 32).half()
    q = base.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) == 4
    assert q.stride(-1) != 1
    k = v = base
    out = flash_attn.flash_attn_func(q, k, v)  # the stub asserts stride 1
    assert_close(out, attention_ref(q, k, v)[0])


def test_strided_inputs_are_not_copied_needlessly(stub: StubKernels) -> None:
    # (batch, nheads, seqlen, d) transposed: strided, but last dim contiguous
    q, k, v = (t.transpose(1, 2) for t in cpu_qkv(2, 4, 4, 6, 6, 32))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = flash_attn.flash_attn_func(q, k, v)
    assert_close(out, attention_ref(q, k, v)[0])


def test_return_attn_probs_gives_out_lse_none(stub: StubKernels) -> None:
    q, k, v = cpu_qkv(2, 5, 7, 4, 2, 32)
    result = flash_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3
    out, lse, probs = result
    assert probs is None
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    out_ref, lse_ref = attention_ref(q, k, v, causal=True)
    assert_close(out, out_ref)
    torch.testing.assert_close(lse, lse_ref)


def test_deterministic_reaches_the_backward(stub: StubKernels) -> None:
    q, k, v = cpu_qkv(1, 4, 4, 2, 2, 32, requires_grad=True)
    flash_attn.flash_attn_func(q, k, v, deterministic=True).sum().backward()
    assert stub.calls[-1] == (
        "bwd",
        {"head_dim": 32, "deterministic": True, "dropout_p": 0.0, "rng_state": None},
    )


def test_qkvpacked_matches_separate_inputs_and_grad_is_packed(stub: StubKernels) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(2, 6, 3, 4, 20).half().requires_grad_(True)
    dout = torch.randn(2, 6, 4, 20).half()
    out = flash_attn.flash_attn_qkvpacked_func(qkv, causal=True)
    (dqkv,) = grads(out, (qkv,), dout)

    q, k, v = (t.detach().requires_grad_(True) for t in qkv.unbind(2))
    out_ref, _ = attention_ref(q, k, v, causal=True)
    assert_close(out, out_ref)
    assert dqkv.shape == qkv.shape
    assert_close(dqkv, torch.stack(grads(out_ref, (q, k, v), dout), dim=2))


def test_kvpacked_matches_separate_inputs_and_grad_is_packed(stub: StubKernels) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 5, 6, 24).half().requires_grad_(True)
    kv = torch.randn(2, 8, 2, 3, 24).half().requires_grad_(True)
    dout = torch.randn_like(q)
    out = flash_attn.flash_attn_kvpacked_func(q, kv, window_size=(2, 2))
    dq, dkv = grads(out, (q, kv), dout)

    q_r = q.detach().requires_grad_(True)
    k_r, v_r = (t.detach().requires_grad_(True) for t in kv.unbind(2))
    out_ref, _ = attention_ref(q_r, k_r, v_r, window_size=(2, 2))
    dq_r, dk_r, dv_r = grads(out_ref, (q_r, k_r, v_r), dout)
    assert_close(out, out_ref)
    assert_close(dq, dq_r)
    assert dkv.shape == kv.shape
    assert_close(dkv, torch.stack((dk_r, dv_r), dim=2))


def varlen_batch(
    lens_q: list[int], lens_k: list[int], nheads: int, nheads_k: int, head_dim: int
) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q = torch.randn(sum(lens_q), nheads, head_dim).half().requires_grad_(True)
    k = torch.randn(sum(lens_k), nheads_k, head_dim).half().requires_grad_(True)
    v = torch.randn(sum(lens_k), nheads_k, head_dim).half().requires_grad_(True)
    cu_q = F.pad(torch.tensor(lens_q).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(torch.tensor(lens_k).cumsum(0), (1, 0)).to(torch.int32)
    return q, k, v, cu_q, cu_k


def test_varlen_forward_and_backward(stub: StubKernels) -> None:
    lens_q, lens_k = [3, 1, 5], [4, 6, 2]
    q, k, v, cu_q, cu_k = varlen_batch(lens_q, lens_k, 4, 2, 36)
    slopes = torch.rand(3, 4)
    dout = torch.randn_like(q)
    result = flash_attn.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 5, 6, causal=True, alibi_slopes=slopes,
        return_attn_probs=True,
    )  # fmt: skip
    out, lse, _ = result
    out_ref, lse_ref = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, alibi_slopes=slopes)
    assert lse.shape == (4, 9)
    torch.testing.assert_close(lse, lse_ref)
    assert_close(out, out_ref)
    for g, g_ref in zip(grads(out, (q, k, v), dout), grads(out_ref, (q, k, v), dout)):
        assert_close(g, g_ref)
    assert stub.calls[0][1]["max_seqlen_q"] == 5
    assert stub.calls[0][1]["max_seqlen_k"] == 6


def test_varlen_qkvpacked_grad_is_packed(stub: StubKernels) -> None:
    lens = [3, 5]
    q, k, v, cu, _ = varlen_batch(lens, lens, 2, 2, 16)
    qkv = torch.stack([q, k, v], dim=1).detach().requires_grad_(True)
    dout = torch.randn_like(q)
    out = flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, 5, causal=True)
    (dqkv,) = grads(out, (qkv,), dout)
    out_ref, _ = attention_varlen_ref(q, k, v, cu, cu, causal=True)
    assert_close(out, out_ref)
    assert dqkv.shape == qkv.shape
    assert_close(dqkv, torch.stack(grads(out_ref, (q, k, v), dout), dim=1))


def test_varlen_kvpacked_grad_is_packed(stub: StubKernels) -> None:
    lens_q, lens_k = [2, 4], [5, 3]
    q, k, v, cu_q, cu_k = varlen_batch(lens_q, lens_k, 4, 2, 8)
    kv = torch.stack([k, v], dim=1).detach().requires_grad_(True)
    dout = torch.randn_like(q)
    out = flash_attn.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 4, 5)
    dq, dkv = grads(out, (q, kv), dout)
    out_ref, _ = attention_varlen_ref(q, k, v, cu_q, cu_k)
    dq_r, dk_r, dv_r = grads(out_ref, (q, k, v), dout)
    assert_close(out, out_ref)
    assert_close(dq, dq_r)
    assert_close(dkv, torch.stack((dk_r, dv_r), dim=1))


def test_invalid_inputs_never_reach_a_kernel(stub: StubKernels) -> None:
    q, k, v = cpu_qkv(head_dim=32)
    with pytest.raises(InputError):
        flash_attn.flash_attn_func(q, k[..., :16], v)
    with pytest.raises(InputError):
        flash_attn.flash_attn_func(q.float(), k.float(), v.float())
    assert stub.calls == []


def test_build_without_backward_fails_only_when_grad_is_needed(stub: StubKernels) -> None:
    stub.build = {**FULL_BUILD, "backward": False}
    q, k, v = cpu_qkv(requires_grad=True)
    with pytest.raises(BuildError, match="FLASH_ATTN_BACKWARD=0"):
        flash_attn.flash_attn_func(q, k, v)
    assert stub.calls == []
    with torch.no_grad():
        flash_attn.flash_attn_func(q, k, v)
    flash_attn.flash_attn_func(q.detach(), k.detach(), v.detach())
    assert [name for name, _ in stub.calls] == ["fwd", "fwd"]


def test_build_without_the_head_dim(stub: StubKernels) -> None:
    stub.build = {**FULL_BUILD, "head_dims": [64, 128]}
    q, k, v = cpu_qkv(head_dim=96)
    flash_attn.flash_attn_func(q, k, v)  # served by the 128 bucket
    q, k, v = cpu_qkv(head_dim=160)
    with pytest.raises(BuildError, match="FLASH_ATTN_HEAD_DIMS=64,128,160"):
        flash_attn.flash_attn_func(q, k, v)


def test_build_without_the_dtype(stub: StubKernels) -> None:
    stub.build = {**FULL_BUILD, "dtypes": ["bf16"]}
    q, k, v = cpu_qkv(dtype=torch.float16)
    with pytest.raises(BuildError, match="FLASH_ATTN_DTYPES=fp16,bf16"):
        flash_attn.flash_attn_func(q, k, v)


# --- torch.compile traces through (the fakes), without graph breaks ---------------


def _train_step(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(q, k, v, causal=True).float().square().sum()

    return step


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(stub: StubKernels, dynamic: bool) -> None:
    torch._dynamo.reset()
    step = _train_step(flash_attn.flash_attn_func)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for seqlen in (6, 9):
        q, k, v = cpu_qkv(2, seqlen, seqlen, 4, 2, 20, requires_grad=True)
        loss = compiled(q, k, v)
        g = torch.autograd.grad(loss, (q, k, v))
        loss_ref = step(q, k, v)
        g_ref = torch.autograd.grad(loss_ref, (q, k, v))
        torch.testing.assert_close(loss, loss_ref)
        for a, b in zip(g, g_ref):
            assert_close(a, b)


@pytest.mark.parametrize("same_cu_seqlens", [False, True])
def test_torch_compile_varlen_fullgraph(stub: StubKernels, same_cu_seqlens: bool) -> None:
    torch._dynamo.reset()
    lens_k = [3, 4] if same_cu_seqlens else [5, 2]
    q, k, v, cu_q, cu_k = varlen_batch([3, 4], lens_k, 4, 2, 32)
    if same_cu_seqlens:
        cu_k = cu_q  # self-attention passes one tensor for both, as transformers does

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), step(q, k, v))


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_the_same_tensor_as_q_k_and_v(stub: StubKernels, backend: str | None) -> None:
    """Gradients of all three uses reach the one tensor, compiled or not."""
    torch._dynamo.reset()
    x = torch.randn(2, 6, 4, 16).half().requires_grad_(True)

    def loss(t: torch.Tensor) -> torch.Tensor:
        return flash_attn.flash_attn_func(t, t, t, causal=True).float().square().sum()

    fn = loss if backend is None else torch.compile(loss, backend=backend, fullgraph=True)
    (grad,) = torch.autograd.grad(fn(x), x)
    x_ref = x.detach().requires_grad_(True)
    out_ref, _ = attention_ref(x_ref, x_ref, x_ref, causal=True)
    (grad_ref,) = torch.autograd.grad(out_ref.float().square().sum(), x_ref)
    assert_close(grad, grad_ref)


# --- the fake implementations --------------------------------------------------


def fwd_args(varlen: bool, device: str = "meta") -> tuple[Any, ...]:
    """Arguments of the fwd op (random values unless on meta)."""

    def tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    if varlen:
        q = tensor(9, 4, 32, dtype=torch.float16)
        k, v = tensor(11, 2, 32, dtype=torch.float16), tensor(11, 2, 32, dtype=torch.float16)
        cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 6, 11], dtype=torch.int32, device=device)
        return (q, k, v, cu_q, cu_k, 5, 6, 0.2, -1, 0, 0.0, None, 0.0, None)
    q = tensor(2, 5, 4, 32, dtype=torch.bfloat16)
    k, v = tensor(2, 7, 2, 32, dtype=torch.bfloat16), tensor(2, 7, 2, 32, dtype=torch.bfloat16)
    alibi = torch.rand(2, 4, device=device)
    rng_state = torch.tensor([12345, 678], dtype=torch.int64, device=device)
    return (q, k, v, None, None, 5, 7, 0.2, 3, -1, 4.0, alibi, 0.25, rng_state)


@pytest.mark.parametrize("varlen", [False, True])
def test_fake_fwd_shapes(varlen: bool) -> None:
    args = fwd_args(varlen)
    out, lse = _ops.fwd_fake(*args)
    q = args[0]
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.dtype == torch.float32 and lse.device == q.device
    assert lse.shape == ((4, 9) if varlen else (2, 4, 5))


def test_fake_outputs_are_contiguous_as_the_binding_allocates_them() -> None:
    q = torch.empty(2, 4, 5, 32, dtype=torch.float16, device="meta").transpose(1, 2)
    k = torch.empty(2, 4, 7, 32, dtype=torch.float16, device="meta").transpose(1, 2)
    args = (q, k, k, *fwd_args(False)[3:])
    out, lse = _ops.fwd_fake(*args)
    assert out.shape == q.shape and out.is_contiguous() and lse.is_contiguous()
    grads = _ops.bwd_fake(out, q, k, k, out, lse, *args[3:12], False, *args[12:])
    assert all(g.is_contiguous() for g in grads)


@pytest.mark.parametrize("varlen", [False, True])
def test_fake_bwd_shapes(varlen: bool) -> None:
    q, k, v, cu_q, cu_k, mq, mk, scale, left, right, softcap, alibi, p, rng = fwd_args(varlen)
    out, lse = _ops.fwd_fake(
        q, k, v, cu_q, cu_k, mq, mk, scale, left, right, softcap, alibi, p, rng
    )
    dq, dk, dv = _ops.bwd_fake(
        torch.empty_like(out), q, k, v, out, lse, cu_q, cu_k, mq, mk, scale, left,
        right, softcap, alibi, False, p, rng,
    )  # fmt: skip
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype


def test_fakes_are_registered_once_and_opcheck_clean() -> None:
    define_stub_ops()
    _ops.register_fakes(STUB_NAMESPACE)
    assert _ops.register_fakes(STUB_NAMESPACE) == []  # the second call adds nothing
    for name in ("fwd", "fwd_kv", "bwd", "dropout_mask"):
        qualname = f"{STUB_NAMESPACE}::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")
    ops = getattr(torch.ops, STUB_NAMESPACE)
    for varlen in (False, True):
        args = fwd_args(varlen, device="cpu")
        torch.library.opcheck(ops.fwd.default, args)
        out, lse = ops.fwd(*args)
        q, k, v, cu_q, cu_k, mq, mk, scale, left, right, softcap, alibi, p, rng = args
        bwd_args = (
            torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, mq, mk, scale,
            left, right, softcap, alibi, True, p, rng,
        )  # fmt: skip
        torch.library.opcheck(ops.bwd.default, bwd_args)
    rng_state = torch.tensor([3, 4], dtype=torch.int64)
    torch.library.opcheck(ops.dropout_mask.default, (rng_state, 2, 3, 5, 7, 0.5))
    mask = _ops.dropout_mask_fake(rng_state.to("meta"), 2, 3, 5, 7, 0.5)
    assert mask.shape == (2, 3, 5, 7) and mask.dtype == torch.uint8 and mask.device.type == "meta"


def test_register_fakes_skips_missing_ops() -> None:
    assert _ops.register_fakes("flash_attn_namespace_without_ops") == []


# --- the real extension, where it imports -----------------------------------------


@pytest.fixture
def real_extension() -> object:
    if _ops.load_error():
        pytest.skip(f"flash_attn._C does not load: {_ops.load_error()}")
    return torch.ops.flash_attn


def test_extension_schemas_match_the_contract(real_extension: Any) -> None:
    for op, schema in (
        (real_extension.fwd.default, _ops.FWD_SCHEMA),
        (real_extension.fwd_kv.default, _ops.FWD_KV_SCHEMA),
        (real_extension.bwd.default, _ops.BWD_SCHEMA),
        (real_extension.dropout_mask.default, _ops.DROPOUT_MASK_SCHEMA),
        (real_extension.build_info.default, _ops.BUILD_INFO_SCHEMA),
    ):
        assert str(op._schema) == str(torch._C.parse_schema(f"flash_attn::{schema}"))


def test_extension_build_info_parses(real_extension: Any) -> None:
    info = _ops.build_info()
    assert info.head_dims and set(info.head_dims) <= {32, 64, 96, 128, 160, 192, 224, 256}
    assert info.dtypes and set(info.dtypes) <= {"fp16", "bf16"}


@pytest.mark.parametrize("varlen", [False, True])
def test_extension_fakes_on_meta_tensors(real_extension: Any, varlen: bool) -> None:
    args = fwd_args(varlen)
    torch.library.opcheck(
        real_extension.fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )
    out, lse = real_extension.fwd(*args)
    assert lse.shape == ((4, 9) if varlen else (2, 4, 5))
