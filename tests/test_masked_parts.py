"""masked_parts.py on the CPU: the reference itself keeps the exact values it pins, and
every way of breaking them is reported with the tensor and the tokens."""

from __future__ import annotations

import itertools

import pytest
import torch
from masked_parts import Outputs, dense_parts, masked_part_problems, varlen_parts
from reference import attention_ref, attention_varlen_ref

DENSE = [
    (True, (-1, -1), (113, 400)),
    (True, (-1, -1), (400, 113)),
    (False, (0, 0), (113, 400)),
    (False, (16, 0), (400, 113)),
    (False, (100, 7), (113, 400)),
    (False, (-1, 33), (64, 64)),
]


def reference_outputs(q, k, v, fn, *args, **kw) -> Outputs:
    out, lse = fn(q, k, v, *args, **kw)
    g = torch.randn_like(out)
    return Outputs(out, lse, *torch.autograd.grad(out, (q, k, v), g))


def dense_reference(causal, window_size, seqlens, dtype=torch.float32) -> Outputs:
    torch.manual_seed(0)
    (sq, sk), h, hk, d = seqlens, 6, 2, 16
    q = torch.randn(2, sq, h, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, sk, hk, d, dtype=dtype, requires_grad=True) for _ in "kv")
    return reference_outputs(
        q, k, v, attention_ref, causal=causal, window_size=window_size, upcast=False
    )


@pytest.mark.parametrize("causal, window_size, seqlens", DENSE)
def test_reference_keeps_the_exact_values(causal, window_size, seqlens):
    parts = dense_parts(*seqlens, causal=causal, window_size=window_size)
    ours = dense_reference(causal, window_size, seqlens)
    assert masked_part_problems(ours, parts) == []


@pytest.mark.parametrize(
    "causal, window_size", [(True, (-1, -1)), (True, (59, 0)), (False, (16, 0))]
)
def test_reference_keeps_the_exact_values_varlen(causal, window_size):
    torch.manual_seed(1)
    lens_q, lens_k = [5, 0, 129, 1, 1, 17], [7, 3, 129, 0, 147, 200]
    q = torch.randn(sum(lens_q), 6, 16, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 16, requires_grad=True) for _ in "kv")
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)]) for n in (lens_q, lens_k))
    kw = dict(causal=causal, window_size=window_size)
    ours = reference_outputs(q, k, v, attention_varlen_ref, cu_q, cu_k, **kw)
    parts = varlen_parts(lens_q, lens_k, **kw)
    assert parts.blind_queries.any() and parts.unseen_keys.any()
    assert masked_part_problems(ours, parts) == []


def test_parts_of_the_issue_shapes():
    """(113, 400), window (0, 0): query i sees key i + 287 only; (400, 113) the mirror."""
    wide = dense_parts(113, 400, window_size=(0, 0))
    assert wide.unseen_keys.tolist() == [True] * 287 + [False] * 113
    assert not wide.blind_queries.any()
    tall = dense_parts(400, 113, causal=True)
    assert tall.blind_queries.tolist() == [True] * 287 + [False] * 113
    assert not tall.unseen_keys.any()
    decode = varlen_parts([1, 1, 0], [147, 0, 5], causal=True, window_size=(59, 0))
    assert decode.unseen_keys.tolist() == [True] * 87 + [False] * 60 + [True] * 5
    assert decode.blind_queries.tolist() == [False, True]


def corrupt(outputs: Outputs, name: str, index, value: float) -> Outputs:
    fields = {f: getattr(outputs, f) for f in ("out", "lse", "dq", "dk", "dv")}
    fields[name] = fields[name].detach().clone()
    fields[name][index] = value
    return Outputs(**fields)


@pytest.mark.parametrize(
    "name, index, value, message",
    [
        (
            "dk",
            (1, 5, 0, 3),
            1e-3,
            "dk: 1 elements owed 0 (seen by no query) in 1 keys (keys 5; e.g.",
        ),
        (
            "dv",
            (0, 286, 1, 0),
            -0.0625,
            "dv: 1 elements owed 0 (seen by no query) in 1 keys (keys 286",
        ),
        (
            "dk",
            (0, 3, 0, 0),
            float("nan"),
            "dk: 1 elements not finite in 1 keys (keys 3; e.g. nan)",
        ),
        ("dq", (0, 40, 2, 7), float("inf"), "dq: 1 elements not finite in 1 queries (queries 40"),
        ("out", (1, 0, 5, 1), float("nan"), "out: 1 elements not finite in 1 queries (queries 0"),
        ("lse", (0, 3, 100), float("inf"), "lse: 1 elements not finite in 1 queries (queries 100"),
    ],
)
def test_broken_values_are_named(name, index, value, message):
    parts = dense_parts(113, 400, window_size=(0, 0))
    broken = corrupt(dense_reference(False, (0, 0), (113, 400)), name, index, value)
    problems = masked_part_problems(broken, parts)
    assert any(p.startswith(message) for p in problems), problems


@pytest.mark.parametrize(
    "name, index, value, message",
    [
        (
            "out",
            (0, 7, 5, 1),
            0.5,
            "out: 1 elements owed 0 (no key visible) in 1 queries (queries 7",
        ),
        ("dq", (1, 286, 0, 0), -2.0, "dq: 1 elements owed 0 (no key visible) in 1 queries"),
        ("lse", (1, 4, 12), 3.0, "lse: 1 elements owed +inf (no key visible) in 1 queries"),
    ],
)
def test_broken_blind_queries_are_named(name, index, value, message):
    parts = dense_parts(400, 113, causal=True)
    broken = corrupt(dense_reference(True, (-1, -1), (400, 113)), name, index, value)
    problems = masked_part_problems(broken, parts)
    assert any(p.startswith(message) for p in problems), problems


def test_a_mask_of_the_wrong_length_is_an_error():
    ours = dense_reference(True, (-1, -1), (64, 64))
    with pytest.raises(ValueError, match="out has 64 tokens in dim 1; the mask has 65"):
        masked_part_problems(ours, dense_parts(65, 64, causal=True))
    with pytest.raises(ValueError, match="lens_q and lens_k differ in length: 2 != 1"):
        varlen_parts([1, 2], [3])
