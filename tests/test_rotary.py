"""Rotary embeddings: flash_attn.ops.triton.rotary and flash_attn.layers.rotary.

CPU part (runs everywhere): the input checks, the plain-PyTorch helpers and
RotaryEmbedding's cos/sin tables, each against a reference written here.

Kernel part: the Triton kernel against a float64 reference written here (complex
multiplication by e^(i theta) of each feature pair; its backward by autograd). Marked
``gpu`` (conftest.py: a CUDA GPU and a built flash_attn._C, NaN-poisoned memory) and
skipped without Triton. With ``TRITON_INTERPRET=1`` in the environment (and Triton
installed) the kernel part runs on CPU tensors through Triton's interpreter instead.

Rule: ours (computed in fp32, rounded once to the dtype) is within one unit of the
dtype's precision of the float64 reference, |ours - ref| <= eps(dtype) * |ref| +
8 * eps(fp32) * max|input|; features past rotary_dim are exactly the input's.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from gpu_poison import poison_cuda_cache, poison_enabled

from flash_attn.errors import DeviceError, InputError

pytest.importorskip("triton", reason="flash_attn.ops.triton needs Triton to import")
from flash_attn.layers.rotary import (  # noqa: E402
    RotaryEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_func,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
    apply_rotary_emb_torch,
    rotate_half,
)
from flash_attn.ops.triton.rotary import apply_rotary  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# a device that is not DEVICE, for the wrong-device checks
OTHER_DEVICE = "meta" if INTERPRET else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def kernel_test(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs the Triton kernel: needs Triton, and a GPU unless interpreted."""
    fn = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")(fn)
    return fn if INTERPRET else pytest.mark.gpu(fn)


def repoison() -> None:
    """NaN in the free blocks of the CUDA cache right before a kernel call allocates."""
    if DEVICE == "cuda" and poison_enabled():
        poison_cuda_cache()


# ------------------------------------------------------------------ references


def rotate_ref(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool,
) -> torch.Tensor:
    """x (b, s, h, d) float64 on the CPU; cos/sin (n, r/2), any device; positions (b, s).
    Pair (a, b) of the first r features is the complex number a + ib, multiplied by
    cos + i sin of the token's table row; a position outside [0, n) is not rotated."""
    half = cos.shape[1]
    r = 2 * half
    inside = ((positions >= 0) & (positions < cos.shape[0])).unsqueeze(-1)
    rows = positions.clamp(0, cos.shape[0] - 1)
    c = torch.where(inside, cos.double().cpu()[rows], 1.0)
    s = torch.where(inside, sin.double().cpu()[rows], 0.0)
    turn = torch.complex(c, s).unsqueeze(2)  # (b, s, 1, half)
    if interleaved:
        z = torch.complex(x[..., 0:r:2], x[..., 1:r:2]) * turn
        head = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        z = torch.complex(x[..., :half], x[..., half:r]) * turn
        head = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((head, x[..., r:]), dim=-1)


def positions_of(offsets: int | torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    start = (
        offsets.long().cpu() if isinstance(offsets, torch.Tensor) else torch.full((batch,), offsets)
    )
    return start.unsqueeze(1) + torch.arange(seqlen)


def tables(n: int, rotary_dim: int, dtype: torch.dtype, device: str = DEVICE):
    angle = torch.rand(n, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
    return angle.cos().to(device, dtype), angle.sin().to(device, dtype)


def assert_rope_close(name: str, ours: torch.Tensor, ref: torch.Tensor, scale: float) -> None:
    ours64, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(ours64).all(), f"{name}: non-finite values"
    bound = torch.finfo(ours.dtype).eps * ref.abs() + 8 * torch.finfo(torch.float32).eps * scale
    err = (ours64 - ref).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{name}: error {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e}"
        f" ({int((err > bound).sum())} of {err.numel()} elements)"
    )


def make_offsets(kind: str, batch: int, seqlen: int, seqlen_ro: int) -> int | torch.Tensor:
    """'zero', 'int', or 'tensor': per-sequence offsets, the last one running 5 rows
    past the table (those rows stay unrotated)."""
    if kind == "zero":
        return 0
    if kind == "int":
        return seqlen_ro - seqlen - 1
    values = [(7 * i) % (seqlen_ro - seqlen + 1) for i in range(batch - 1)] + [
        seqlen_ro - seqlen + 5
    ]
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ------------------------------------------------------------------ CPU: checks


def valid_args(**change: Any) -> dict[str, Any]:
    """Arguments apply_rotary accepts but for the device (CPU tensors), with changes."""
    args: dict[str, Any] = dict(
        x=torch.randn(2, 6, 3, 16),
        cos=torch.randn(8, 4),
        sin=torch.randn(8, 4),
        seqlen_offsets=0,
        cu_seqlens=None,
        max_seqlen=None,
    )
    args.update(change)
    return args


BAD_INPUTS = {
    "rotary_dim > headdim": (
        dict(cos=torch.randn(8, 9), sin=torch.randn(8, 9)),
        "rotary_dim = 2 * cos.shape[1] = 18 exceeds x's headdim 16",
    ),
    "cos/sin shapes differ": (dict(sin=torch.randn(8, 3)), "cos and sin must have the same shape"),
    "cos 1-D": (dict(cos=torch.randn(8), sin=torch.randn(8)), "cos must have shape (seqlen_ro"),
    "cos with no column": (dict(cos=torch.randn(8, 0), sin=torch.randn(8, 0)), "0 columns"),
    "table shorter than seqlen": (
        dict(cos=torch.randn(5, 4), sin=torch.randn(5, 4)),
        "cos/sin have 5 rows, fewer than seqlen_offsets + seqlen = 0 + 6",
    ),
    "table shorter than offset + seqlen": (
        dict(seqlen_offsets=3),
        "cos/sin have 8 rows, fewer than seqlen_offsets + seqlen = 3 + 6",
    ),
    "negative offset": (dict(seqlen_offsets=-1), "seqlen_offsets must be >= 0; got -1"),
    "float offset": (dict(seqlen_offsets=1.0), "seqlen_offsets must be an int or"),
    "offsets of the wrong shape": (
        dict(seqlen_offsets=torch.zeros(3, dtype=torch.int32)),
        "tensor of shape (batch,) = (2,); got shape (3,)",
    ),
    "float offsets": (
        dict(seqlen_offsets=torch.zeros(2)),
        "seqlen_offsets has dtype torch.float32; valid: int32, int64",
    ),
    "x of rank 3 without cu_seqlens": (
        dict(x=torch.randn(6, 3, 16)),
        "x must have shape (batch, seqlen, nheads, headdim); got (6, 3, 16)",
    ),
    "x float64": (
        dict(x=torch.randn(2, 6, 3, 16, dtype=torch.float64)),
        "x has dtype torch.float64; valid: float16, bfloat16, float32",
    ),
    "x int": (dict(x=torch.zeros(2, 6, 3, 16, dtype=torch.int32)), "x has dtype torch.int32"),
    "cos of a third dtype": (
        dict(x=torch.randn(2, 6, 3, 16, dtype=torch.float16), cos=torch.randn(8, 4).bfloat16()),
        "cos has dtype torch.bfloat16; valid: float32 or x's dtype (torch.float16)",
    ),
    "cu_seqlens without max_seqlen": (
        dict(x=torch.randn(6, 3, 16), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)),
        "cu_seqlens is given without max_seqlen",
    ),
    "varlen x of rank 4": (
        dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), max_seqlen=6),
        "with cu_seqlens, x must have shape (total, nheads, headdim)",
    ),
    "float cu_seqlens": (
        dict(x=torch.randn(6, 3, 16), cu_seqlens=torch.tensor([0.0, 6.0]), max_seqlen=6),
        "cu_seqlens has dtype torch.float32; valid: int32, int64",
    ),
    "varlen table shorter than max_seqlen": (
        dict(
            x=torch.randn(9, 3, 16),
            cu_seqlens=torch.tensor([0, 9], dtype=torch.int32),
            max_seqlen=9,
        ),
        "fewer than seqlen_offsets + seqlen = 0 + 9",
    ),
    "negative max_seqlen": (
        dict(
            x=torch.randn(6, 3, 16),
            cu_seqlens=torch.tensor([0, 6], dtype=torch.int32),
            max_seqlen=-2,
        ),
        "max_seqlen must be an int >= 0; got -2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named(case: str) -> None:
    change, message = BAD_INPUTS[case]
    with pytest.raises(InputError) as info:
        apply_rotary(**valid_args(**change))
    assert message in str(info.value)


def test_valid_input_on_cpu_needs_cuda() -> None:
    if INTERPRET:
        pytest.skip("Triton's interpreter runs CPU tensors")
    with pytest.raises(DeviceError, match="apply_rotary needs a CUDA tensor; x is on cpu"):
        apply_rotary(**valid_args())
    with pytest.raises(DeviceError, match="needs a CUDA tensor"):
        apply_rotary_emb(torch.randn(1, 4, 2, 8), torch.randn(4, 4), torch.randn(4, 4))


QKV_BAD = {
    "5-D qkv without 3 in dim 2": (
        lambda: apply_rotary_emb_qkv_(torch.randn(1, 4, 2, 2, 8), *torch.randn(2, 4, 4)),
        "qkv must have shape (batch, seqlen, 3, nheads, headdim); got (1, 4, 2, 2, 8)",
    ),
    "4-D qkv without num_heads_q": (
        lambda: apply_rotary_emb_qkv_(torch.randn(1, 4, 6, 8), *torch.randn(2, 4, 4)),
        "pass num_heads_q",
    ),
    "num_heads_q leaving an odd rest": (
        lambda: apply_rotary_emb_qkv_(
            torch.randn(1, 4, 7, 8), *torch.randn(2, 4, 4), num_heads_q=2
        ),
        "num_heads_q = 2 does not split qkv's 7 heads",
    ),
    "num_heads_q leaving no k": (
        lambda: apply_rotary_emb_qkv_(
            torch.randn(1, 4, 4, 8), *torch.randn(2, 4, 4), num_heads_q=4
        ),
        "num_heads_q = 4 does not split qkv's 4 heads",
    ),
    "3-D qkv": (
        lambda: apply_rotary_emb_qkv_(torch.randn(4, 6, 8), *torch.randn(2, 4, 4)),
        "qkv must have shape",
    ),
    "kv with 3 in dim 2": (
        lambda: apply_rotary_emb_kv_(torch.randn(1, 4, 3, 2, 8), *torch.randn(2, 4, 4)),
        "kv must have shape (batch, seqlen, 2, nheads, headdim); got (1, 4, 3, 2, 8)",
    ),
    "odd RotaryEmbedding dim": (lambda: RotaryEmbedding(7), "dim must be an even int >= 2"),
    "negative scale_base": (
        lambda: RotaryEmbedding(8, scale_base=-1.0),
        "scale_base must be None or > 0; got -1.0",
    ),
}


@pytest.mark.parametrize("case", list(QKV_BAD))
def test_bad_packing_is_named(case: str) -> None:
    call, message = QKV_BAD[case]
    with pytest.raises(InputError) as info:
        call()
    assert message in str(info.value)


# ------------------------------------------------------------------ CPU: plain PyTorch


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 10])
@pytest.mark.parametrize("per_batch", [False, True])
def test_apply_rotary_emb_torch_matches_reference(
    interleaved: bool, rotary_dim: int, per_batch: bool
) -> None:
    torch.manual_seed(0)
    b, s, h, d = 2, 5, 3, 16
    x = torch.randn(b, s, h, d, dtype=torch.float64)
    cos, sin = tables(b * s, rotary_dim, torch.float64, "cpu")
    positions = torch.arange(b * s).view(b, s) if per_batch else torch.arange(s).expand(b, s)
    c, sn = (cos[positions], sin[positions]) if per_batch else (cos[:s], sin[:s])
    ours = apply_rotary_emb_torch(x, c, sn, interleaved=interleaved)
    torch.testing.assert_close(ours, rotate_ref(x, cos, sin, positions, interleaved))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotate_half_is_a_quarter_turn(interleaved: bool) -> None:
    """rotate_half is the rotation by pi/2: cos 0, sin 1."""
    x = torch.randn(2, 3, 4, 12, dtype=torch.float64)
    ones = torch.ones(3, 6, dtype=torch.float64)
    ref = rotate_ref(x, 0 * ones, ones, torch.arange(3).expand(2, 3), interleaved)
    torch.testing.assert_close(rotate_half(x, interleaved), ref)


# ------------------------------------------------------------------ CPU: the module's tables


def table_ref(dim: int, base: float, n: int, scale_base: float | None = None):
    """cos/sin (and XPos q/k tables) in float64: angle p * base ** (-2i / dim)."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    p = torch.arange(n, dtype=torch.float64)
    angle = p[:, None] * base ** (-2 * i / dim)
    cos, sin = angle.cos(), angle.sin()
    if scale_base is None:
        return cos, sin, None, None
    zeta = (2 * i + 0.4 * dim) / (1.4 * dim)
    scale = zeta[None, :] ** ((p[:, None] - n // 2) / scale_base)
    return cos * scale, sin * scale, cos / scale, sin / scale


def assert_table_close(ours: torch.Tensor | None, ref: torch.Tensor | None, n: int) -> None:
    assert ours is not None and ref is not None
    # fp32 angles: an error of a few ulps of the largest angle (n)
    atol = 8 * torch.finfo(torch.float32).eps * n
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("scale_base", [None, 512.0])
@pytest.mark.parametrize("dim,base", [(64, 10000.0), (32, 500000.0)])
def test_rotary_embedding_tables(dim: int, base: float, scale_base: float | None) -> None:
    n = 300
    rope = RotaryEmbedding(dim, base=base, scale_base=scale_base)
    rope._update_cos_sin_cache(n, device=torch.device("cpu"), dtype=torch.float32)
    ref = table_ref(dim, base, n, scale_base)
    assert_table_close(rope._cos_cached, ref[0], n)
    assert_table_close(rope._sin_cached, ref[1], n)
    if scale_base is not None:
        assert_table_close(rope._cos_k_cached, ref[2], n)
        assert_table_close(rope._sin_k_cached, ref[3], n)
    assert "inv_freq" not in rope.state_dict() and "scale" not in rope.state_dict()


def test_rotary_embedding_cache_updates() -> None:
    rope = RotaryEmbedding(16)
    cpu = torch.device("cpu")
    rope._update_cos_sin_cache(10, device=cpu, dtype=torch.float32)
    first = rope._cos_cached
    rope._update_cos_sin_cache(6, device=cpu, dtype=torch.float32)
    assert rope._cos_cached is first, "a shorter length reuses the tables"
    rope._update_cos_sin_cache(20, device=cpu, dtype=torch.float32)
    assert rope._cos_cached is not None and rope._cos_cached.shape == (20, 8)
    rope._update_cos_sin_cache(20, device=cpu, dtype=torch.bfloat16)
    assert rope._cos_cached.dtype == torch.bfloat16
    with torch.inference_mode():
        rope._update_cos_sin_cache(40, device=cpu, dtype=torch.float32)
    made_in_inference = rope._cos_cached
    rope.train()
    rope._update_cos_sin_cache(40, device=cpu, dtype=torch.float32)
    assert rope._cos_cached is not made_in_inference and not rope._cos_cached.is_inference()


def test_pos_idx_in_fp32() -> None:
    """Cast to bf16, positions in bf16 (pos_idx_in_fp32=False) make 256 and 257 one
    position; the default keeps them apart and matches the fp32 module's tables."""
    cpu = torch.device("cpu")
    fp32 = RotaryEmbedding(16)
    fp32._update_cos_sin_cache(300, device=cpu, dtype=torch.float32)
    for pos_idx_in_fp32 in (True, False):
        rope = RotaryEmbedding(16, pos_idx_in_fp32=pos_idx_in_fp32).to(torch.bfloat16)
        assert rope.inv_freq.dtype == torch.bfloat16
        rope._update_cos_sin_cache(300, device=cpu, dtype=torch.float32)
        cos = rope._cos_cached
        assert cos is not None
        assert torch.equal(cos[256], cos[257]) is not pos_idx_in_fp32
        if pos_idx_in_fp32:
            assert torch.equal(cos, fp32._cos_cached)


def test_rotary_embedding_positional_device() -> None:
    """flash_attn >= 2.7 has device as its fifth parameter (no pos_idx_in_fp32)."""
    rope = RotaryEmbedding(8, 10000.0, False, None, "cpu")
    assert rope.pos_idx_in_fp32 is True and rope.inv_freq.device.type == "cpu"


def test_apply_rotary_emb_func_alias() -> None:
    assert apply_rotary_emb_func is apply_rotary_emb


# ------------------------------------------------------------------ kernel


@kernel_test
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("offsets_kind", ["zero", "int", "tensor"])
@pytest.mark.parametrize("headdim,rotary_dim", [(64, 64), (128, 64), (80, 40), (33, 32)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rotary_emb(dtype, interleaved, headdim, rotary_dim, offsets_kind, inplace) -> None:
    torch.manual_seed(headdim + rotary_dim)
    b, s, h, n = 3, 37, 4, 50
    x = torch.randn(b, s, h, headdim, device=DEVICE, dtype=dtype)
    # fp32 tables for one of the shapes, the input's dtype for the others
    cos, sin = tables(n, rotary_dim, torch.float32 if headdim == 80 else dtype)
    offsets = make_offsets(offsets_kind, b, s, n)
    g = torch.randn_like(x)
    x_in = x.clone().requires_grad_()
    repoison()
    out = apply_rotary_emb(x_in, cos, sin, interleaved, inplace, offsets)
    repoison()
    out.backward(g.clone())

    x64 = x.double().cpu().requires_grad_()
    ref = rotate_ref(x64, cos, sin, positions_of(offsets, b, s), interleaved)
    ref.backward(g.double().cpu())
    assert_rope_close("out", out, ref, x.abs().max().item())
    assert_rope_close("dx", x_in.grad, x64.grad, g.abs().max().item())
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    if inplace:
        assert out.data_ptr() == x_in.data_ptr() and torch.equal(x_in.detach(), out.detach())
    else:
        assert torch.equal(x_in.detach(), x)


@kernel_test
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("offsets_kind", ["int", "tensor"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_apply_rotary_emb_varlen(dtype, interleaved, offsets_kind, inplace) -> None:
    torch.manual_seed(1)
    lens, h, d, rotary_dim, n = [5, 0, 17, 33, 1], 3, 64, 48, 40
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)
    total, max_seqlen = sum(lens), max(lens)
    x = torch.randn(total, h, d, device=DEVICE, dtype=dtype)
    cos, sin = tables(n, rotary_dim, dtype)
    offsets = 2 if offsets_kind == "int" else make_offsets("tensor", len(lens), max_seqlen, n)
    g = torch.randn_like(x)
    x_in = x.clone().requires_grad_()
    repoison()
    out = apply_rotary_emb(
        x_in, cos, sin, interleaved, inplace, offsets, cu_seqlens=cu, max_seqlen=max_seqlen
    )
    repoison()
    out.backward(g.clone())

    # token t of sequence i sits at position offsets[i] + t: one (1, total) batch
    starts = positions_of(offsets, len(lens), 1)[:, 0]
    positions = torch.cat([starts[i] + torch.arange(length) for i, length in enumerate(lens)])
    x64 = x.double().cpu().requires_grad_()
    ref = rotate_ref(x64.unsqueeze(0), cos, sin, positions.unsqueeze(0), interleaved)[0]
    ref.backward(g.double().cpu())
    assert_rope_close("out", out, ref, x.abs().max().item())
    assert_rope_close("dx", x_in.grad, x64.grad, g.abs().max().item())
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    if not inplace:
        assert torch.equal(x_in.detach(), x)


@kernel_test
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_strided(interleaved, inplace) -> None:
    """x with heads outermost (a transposed view) and a strided last dimension."""
    torch.manual_seed(2)
    b, s, h, d, n = 2, 19, 3, 32, 19
    base = torch.randn(b, h, s, 2 * d, device=DEVICE, dtype=torch.float16)
    x = base.transpose(1, 2)[..., ::2]
    before, odd = x.clone(), base[..., 1::2].clone()
    cos, sin = tables(n, d, torch.float32)
    repoison()
    out = apply_rotary(x, cos, sin, interleaved=interleaved, inplace=inplace)
    ref = rotate_ref(before.double().cpu(), cos, sin, positions_of(0, b, s), interleaved)
    assert_rope_close("out", out, ref, before.abs().max().item())
    assert (out is x) is inplace
    assert torch.equal(base[..., 1::2], odd), "features between x's were written"
    if not inplace:
        assert torch.equal(x, before)


@kernel_test
@pytest.mark.parametrize("offsets_kind", ["zero", "int", "tensor"])
@pytest.mark.parametrize("separate_k", [False, True])
@pytest.mark.parametrize("layout", ["5d", "5d-strided", "gqa"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_qkv_(interleaved, layout, separate_k, offsets_kind) -> None:
    torch.manual_seed(3)
    b, s, h, d, rotary_dim, n = 2, 21, 4, 64, 32, 30
    dtype = torch.float16
    if layout == "5d":
        qkv = torch.randn(b, s, 3, h, d, device=DEVICE, dtype=dtype)
    elif layout == "5d-strided":  # not contiguous: q and k are rotated one after the other
        qkv = torch.randn(b, s, h, 3, d, device=DEVICE, dtype=dtype).transpose(2, 3)
    else:
        qkv = torch.randn(b, s, h + 2 * 2, d, device=DEVICE, dtype=dtype)
    cos, sin = tables(n, rotary_dim, dtype)
    cos_k, sin_k = tables(n, rotary_dim, dtype) if separate_k else (None, None)
    offsets = make_offsets(offsets_kind, b, s, n)
    g = torch.randn(qkv.shape, device=DEVICE, dtype=dtype)
    qkv_in = qkv.clone().requires_grad_()  # clone keeps the strides
    assert qkv_in.is_contiguous() is (layout != "5d-strided")
    repoison()
    out = apply_rotary_emb_qkv_(
        qkv_in,
        cos,
        sin,
        cos_k,
        sin_k,
        interleaved=interleaved,
        seqlen_offsets=offsets,
        num_heads_q=h if layout == "gqa" else None,
    )
    repoison()
    out.backward(g.clone())

    qkv64 = qkv.double().cpu().requires_grad_()
    if layout == "gqa":
        q, k, v = qkv64.split([h, 2, 2], dim=2)
    else:
        q, k, v = qkv64.unbind(2)
    positions = positions_of(offsets, b, s)
    q = rotate_ref(q, cos, sin, positions, interleaved)
    if cos_k is None or sin_k is None:
        cos_k, sin_k = cos, sin
    k = rotate_ref(k, cos_k, sin_k, positions, interleaved)
    ref = torch.cat((q, k, v), dim=2) if layout == "gqa" else torch.stack((q, k, v), dim=2)
    ref.backward(g.double().cpu())
    assert out.data_ptr() == qkv_in.data_ptr()
    assert_rope_close("qkv", out, ref, qkv.abs().max().item())
    assert_rope_close("dqkv", qkv_in.grad, qkv64.grad, g.abs().max().item())


@kernel_test
@pytest.mark.parametrize("offsets_kind", ["zero", "tensor"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_kv_(interleaved, offsets_kind) -> None:
    torch.manual_seed(4)
    b, s, h, d, n = 3, 25, 2, 64, 40
    dtype = torch.bfloat16
    kv = torch.randn(b, s, 2, h, d, device=DEVICE, dtype=dtype)
    cos, sin = tables(n, d, dtype)
    offsets = make_offsets(offsets_kind, b, s, n)
    g = torch.randn_like(kv)
    kv_in = kv.clone().requires_grad_()
    repoison()
    out = apply_rotary_emb_kv_(kv_in, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    repoison()
    out.backward(g.clone())

    kv64 = kv.double().cpu().requires_grad_()
    k = rotate_ref(kv64[:, :, 0], cos, sin, positions_of(offsets, b, s), interleaved)
    ref = torch.stack((k, kv64[:, :, 1]), dim=2)
    ref.backward(g.double().cpu())
    assert_rope_close("kv", out, ref, kv.abs().max().item())
    assert_rope_close("dkv", kv_in.grad, kv64.grad, g.abs().max().item())
    assert torch.equal(out[:, :, 1], kv[:, :, 1])


@kernel_test
@pytest.mark.parametrize("offset_kind", ["int", "tensor"])
@pytest.mark.parametrize("scale_base", [None, 512.0])
@pytest.mark.parametrize("packing", ["qkv", "gqa", "q+kv"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding(interleaved, packing, scale_base, offset_kind) -> None:
    torch.manual_seed(5)
    b, s, hq, hk, d, rotary_dim = 2, 17, 4, 2, 64, 32
    dtype = torch.float16
    rope = RotaryEmbedding(
        rotary_dim, interleaved=interleaved, scale_base=scale_base, device=DEVICE
    )
    if offset_kind == "int":
        offset, max_seqlen = 5, None
    else:
        offset = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
        max_seqlen = s + 9
    if packing == "qkv":
        qkv = torch.randn(b, s, 3, hq, d, device=DEVICE, dtype=dtype)
        inputs = (qkv.clone(),)
        kwargs: dict[str, Any] = {}
    elif packing == "gqa":
        qkv = torch.randn(b, s, hq + 2 * hk, d, device=DEVICE, dtype=dtype)
        inputs = (qkv.clone(),)
        kwargs = dict(num_heads_q=hq)
    else:
        q = torch.randn(b, s, hq, d, device=DEVICE, dtype=dtype)
        kv = torch.randn(b, s, 2, hk, d, device=DEVICE, dtype=dtype)
        inputs = (q.clone(), kv.clone())
        kwargs = {}
    repoison()
    result = rope(*inputs, seqlen_offset=offset, max_seqlen=max_seqlen, **kwargs)
    n = rope._seq_len_cached
    assert n >= (s + 9 if offset_kind == "tensor" else s + offset)
    # the tables the module made (checked against the formula on CPU above)
    cos_q, sin_q = rope._cos_cached, rope._sin_cached
    assert cos_q is not None and sin_q is not None and cos_q.dtype == dtype
    cos_k, sin_k = (rope._cos_k_cached, rope._sin_k_cached) if scale_base else (cos_q, sin_q)
    assert cos_k is not None and sin_k is not None
    positions = positions_of(offset, b, s)

    def rot(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate_ref(t.double().cpu(), cos, sin, positions, interleaved)

    if packing == "qkv":
        q_, k_, v_ = qkv.unbind(2)
        expected = torch.stack(
            (rot(q_, cos_q, sin_q), rot(k_, cos_k, sin_k), v_.double().cpu()), dim=2
        )
        outs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [(result, expected, qkv)]
    elif packing == "gqa":
        q_, k_, v_ = qkv.split([hq, hk, hk], dim=2)
        expected = torch.cat(
            (rot(q_, cos_q, sin_q), rot(k_, cos_k, sin_k), v_.double().cpu()), dim=2
        )
        outs = [(result, expected, qkv)]
    else:
        q_out, kv_out = result
        kv_ref = torch.stack((rot(kv[:, :, 0], cos_k, sin_k), kv[:, :, 1].double().cpu()), dim=2)
        outs = [(q_out, rot(q, cos_q, sin_q), q), (kv_out, kv_ref, kv)]
    for ours, ref, given in outs:
        scale = given.abs().max().item() * (2.0 if scale_base else 1.0)
        assert_rope_close(packing, ours, ref, scale)


@kernel_test
def test_tensors_on_another_device() -> None:
    x = torch.randn(1, 4, 2, 8, device=DEVICE)
    cos, sin = tables(4, 8, torch.float32)
    with pytest.raises(DeviceError, match=f"cos is on {OTHER_DEVICE}"):
        apply_rotary(x, cos.to(OTHER_DEVICE), sin)
    offsets = torch.zeros(1, dtype=torch.int32, device=OTHER_DEVICE)
    with pytest.raises(DeviceError, match=f"seqlen_offsets is on {OTHER_DEVICE}"):
        apply_rotary(x, cos, sin, seqlen_offsets=offsets)
