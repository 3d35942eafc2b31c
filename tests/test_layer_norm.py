"""The fused dropout + residual + LayerNorm/RMSNorm (flash_attn.ops.triton.layer_norm and
the older names in flash_attn.ops.layer_norm / rms_norm).

CPU part (always runs): the argument checks, the errors without CUDA or Triton, the
plain PyTorch references against formulas written out here, the module defaults.

Kernel part: forward and backward against the reference, on CUDA with Triton (marked
``gpu(extension=False)``: they need the GPU, not flash_attn._C; each kernel call runs on
NaN-poisoned memory, gpu_poison.py, so an element the kernel does not write shows up).
The same tests run on the CPU through Triton's interpreter with ``TRITON_INTERPRET=1``
(small sizes; a check of the kernels' logic on a machine without a GPU). Rule, as
upstream: the error against the fp32 reference is at most 2x (outputs) / 3x (gradients)
the error of the same reference computed in the inputs' dtypes, plus a rounding term of
the output dtype.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from gpu_poison import poison_cuda_cache, poison_enabled

from flash_attn.errors import DeviceError, InputError

pytest.importorskip("triton", reason="flash_attn.ops.triton needs Triton to import")
from flash_attn.ops import layer_norm as old_ln  # noqa: E402
from flash_attn.ops import rms_norm as old_rms  # noqa: E402
from flash_attn.ops.triton import layer_norm as ln  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _kernel_device() -> str | None:
    if INTERPRET:
        return "cpu" if HAS_TRITON else None
    return "cuda" if torch.cuda.is_available() and HAS_TRITON else None


KERNEL_DEVICE = _kernel_device()
kernel_test = pytest.mark.skipif(
    KERNEL_DEVICE is None,
    reason="needs CUDA and Triton (or TRITON_INTERPRET=1 with Triton installed)",
)


def kernel(test):
    """A kernel test: skipped without CUDA and Triton; marked ``gpu`` (it needs no
    flash_attn._C) unless interpreted."""
    test = kernel_test(test)
    return test if INTERPRET else pytest.mark.gpu(extension=False)(test)


# the interpreter runs a program at a time in Python: keep its problems small
ROWS = 512 if KERNEL_DEVICE == "cuda" else 6
HIDDEN = [192, 768, 1024, 3000, 4096, 8192] if KERNEL_DEVICE == "cuda" else [192, 1000]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# =========================================================================== CPU


def meta(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(weight=meta(63)), ["weight has shape (63,)", "(64,)"]),
        (dict(weight=meta(64, dtype=torch.float64)), ["weight has dtype float64", "bfloat16"]),
        (dict(weight=meta(64, dtype=torch.int32)), ["weight has dtype int32"]),
        (dict(bias=meta(65)), ["bias has shape (65,)", "(64,)"]),
        (dict(dropout_p=1.0), ["dropout_p is 1.0", "0 <= dropout_p < 1"]),
        (dict(dropout_p=-0.1), ["dropout_p is -0.1", "0 <= dropout_p < 1"]),
        (dict(dropout_p=float("nan")), ["dropout_p is nan"]),
        (dict(eps=-1e-5), ["eps is -1e-05", ">= 0"]),
        (dict(residual=meta(3, 65)), ["residual has shape (3, 65)", "(3, 64)"]),
        (dict(x1=meta(3, 64, dtype=torch.float32)), ["x1 has dtype float32", "float16"]),
        (dict(weight1=meta(32)), ["weight1 has shape (32,)"]),
        (dict(bias1=meta(64)), ["bias1 is given without weight1"]),
        (dict(rowscale=meta(4)), ["rowscale has shape (4,)", "(3,)"]),
        (dict(rowscale=meta(3), x1=meta(3, 64)), ["rowscale is not supported together with x1"]),
        (dict(out_dtype=torch.int8), ["out_dtype has dtype int8"]),
    ],
)
def test_bad_arguments_are_named(kwargs, words):
    args = dict(x=meta(3, 64), weight=meta(64), bias=None)
    args.update(kwargs)
    with pytest.raises(InputError) as info:
        ln.layer_norm_fn(**args)
    for word in words:
        assert word in str(info.value), str(info.value)


_COMMON_CASES = [
    dict(),  # x, weight
    dict(bias=meta(64), residual=meta(3, 64)),
    dict(residual=meta(3, 64, dtype=torch.float32), dropout_p=0.1, eps=0.0),
    dict(weight=meta(64, dtype=torch.bfloat16)),  # the weight's dtype is its own
    dict(weight=meta(63)),
    dict(weight=meta(64, dtype=torch.float64)),
    dict(bias=meta(65)),
    dict(bias="b"),
    dict(residual=meta(3, 65)),
    dict(residual=meta(3, 64, dtype=torch.int32)),
    dict(dropout_p=1.0),
    dict(dropout_p=-0.1),
    dict(dropout_p=float("nan")),
    dict(dropout_p=True),
    dict(eps=-1e-5),
    dict(eps=float("inf")),
    dict(eps=float("nan")),
    dict(x=meta(3, 64, dtype=torch.float64)),
    dict(x=meta(3, ln.MAX_HIDDEN + 1), weight=meta(ln.MAX_HIDDEN + 1)),
    dict(x=torch.empty((), device="meta"), weight=meta(1)),  # 0-d x
]


@pytest.mark.parametrize("case", range(len(_COMMON_CASES)))
def test_common_call_fast_path_agrees_with_the_checks(case):
    """The fast test of the common call never accepts what check_norm_args refuses, and
    accepts the valid common calls."""
    args = dict(x=meta(3, 64), weight=meta(64), bias=None, residual=None, eps=1e-6, dropout_p=0.0)
    args.update(_COMMON_CASES[case])
    fast = ln._common_args_ok(
        args["x"], args["weight"], args["bias"], args["residual"], (None,) * 5, args["eps"],
        args["dropout_p"],
    )  # fmt: skip
    try:
        ln.check_norm_args("layer_norm_fn", **args)
    except InputError:
        assert not fast
        return
    assert fast  # every valid case here is a common one


def test_hidden_size_limit_is_named():
    n = ln.MAX_HIDDEN + 1
    with pytest.raises(InputError, match=f"hidden size .* is {n}; supported: 1 to {ln.MAX_HIDDEN}"):
        ln.rms_norm_fn(meta(2, n), meta(n), None)
    with pytest.raises(InputError, match="x has dtype float64"):
        ln.layer_norm_fn(meta(2, 8, dtype=torch.float64), meta(8), None)


def test_out_buffer_is_checked():
    with pytest.raises(InputError, match="out has shape .* dtype float32"):
        ln.layer_norm_fn(
            meta(2, 8), meta(8), None, out=torch.empty(2, 8, device="meta", dtype=torch.float32)
        )


@pytest.mark.skipif(INTERPRET, reason="CPU tensors are valid under TRITON_INTERPRET=1")
def test_cpu_tensors_get_a_device_error():
    x = torch.randn(4, 32)
    with pytest.raises(DeviceError, match="x is on cpu; the fused norm runs on CUDA"):
        ln.layer_norm_fn(x, torch.ones(32), torch.zeros(32))
    with pytest.raises(DeviceError, match="x is on cpu"):
        old_rms.rms_norm(x, torch.ones(32), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices: cpu and cuda")
def test_mixed_devices_are_named():
    with pytest.raises(DeviceError, match="one device; got x on cuda:0, weight on cpu"):
        ln.layer_norm_fn(torch.randn(2, 8, device="cuda"), torch.ones(8), None)


def _rows64(*tensors):
    return [t.double() if t is not None else None for t in tensors]


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
def test_reference_matches_written_out_formula(is_rms, prenorm):
    g = torch.Generator().manual_seed(1)
    n, p = 48, 0.25
    x, res, x1 = (torch.randn(5, n, generator=g) for _ in range(3))
    w, b, w1, b1 = (torch.randn(n, generator=g) for _ in range(4))
    keep, keep1 = (torch.rand(5, n, generator=g) > p for _ in range(2))
    ref = ln.rms_norm_ref if is_rms else ln.layer_norm_ref
    got = ref(x, w, b, residual=res, x1=x1, weight1=w1, bias1=b1, eps=1e-5, dropout_p=p,
              prenorm=prenorm, dropout_mask=keep, dropout_mask1=keep1)  # fmt: skip
    x_, res_, x1_, w_, b_, w1_, b1_ = _rows64(x, res, x1, w, b, w1, b1)
    s = x_ * keep / (1 - p) + x1_ * keep1 / (1 - p) + res_
    if is_rms:
        hat = s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-5)
    else:
        c = s - s.mean(-1, keepdim=True)
        hat = c / torch.sqrt((c * c).mean(-1, keepdim=True) + 1e-5)
    want = [hat * w_ + b_, hat * w1_ + b1_] + ([s] if prenorm else [])
    assert len(got) == len(want)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


def test_reference_rowscale_upcast_and_return_shapes():
    x = torch.randn(2, 3, 16, dtype=torch.float16)
    w = torch.randn(16, dtype=torch.float32)
    rs = torch.rand(2, 3, dtype=torch.float16)
    out = ln.layer_norm_ref(x, w, None, rowscale=rs, upcast=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float16 and out.shape == x.shape
    want = F.layer_norm(x.float() * rs.float()[..., None], (16,), w.float(), None, 1e-6)
    torch.testing.assert_close(out, want.half())
    out, s = ln.rms_norm_ref(x, w, None, residual=x.float(), prenorm=True)
    assert s.dtype == torch.float16  # the sum keeps x's dtype (2.x convention)
    with pytest.raises(InputError, match="rowscale or x1"):
        ln.layer_norm_ref(x, w, None, x1=x, rowscale=rs)


def test_module_defaults():
    assert torch.equal(ln.RMSNorm(8).weight, torch.ones(8)) and ln.RMSNorm(8).bias is None
    assert torch.equal(ln.RMSNorm(8, zero_centered_weight=True).weight, torch.zeros(8))
    m = ln.LayerNorm(8, dtype=torch.float16)
    assert torch.equal(m.bias, torch.zeros(8, dtype=torch.float16))
    assert m.weight.dtype == torch.float16
    assert torch.equal(old_ln.DropoutAddLayerNorm(8).bias, torch.zeros(8))
    assert old_rms.DropoutAddRMSNorm(8).bias is None and old_rms.RMSNorm(8).eps == 1e-5
    with pytest.raises(InputError, match="dropout_p is 1.5"):
        ln.RMSNorm(8, dropout_p=1.5)


def test_old_names_subset_and_layerscale_errors():
    with pytest.raises(NotImplementedError, match="dropout_add_layer_norm_subset"):
        old_ln.dropout_add_layer_norm_subset(None, None, None, None, 0.0, 1e-5)
    with pytest.raises(NotImplementedError, match="dropout_add_rms_norm_subset"):
        old_rms.dropout_add_rms_norm_subset(None, None, None, None, 0.0, 1e-5)
    with pytest.raises(InputError, match=r"layerscale has shape \(7,\); it must be \(8,\)"):
        old_ln.dropout_add_layer_norm(
            meta(2, 8), None, meta(8), meta(8), 0.0, 1e-5, layerscale=meta(7)
        )


# ======================================================================= kernels


def repoison() -> None:
    if KERNEL_DEVICE == "cuda" and poison_enabled():
        poison_cuda_cache()


def leaf(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def assert_close_to_ref(name, ours, ref32, ref_lo, factor):
    """|ours - ref32| <= factor * |ref_lo - ref32| + a rounding term of ours' dtype."""
    ours_dtype = ours.dtype
    ours, ref32, ref_lo = ours.float(), ref32.float(), ref_lo.float()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten memory?)"
    scale = ref32.abs().max().item()
    ulp = torch.finfo(ours_dtype).eps if ours_dtype != torch.float32 else 2e-5
    rounding = scale * ulp
    err = (ours - ref32).abs().max().item()
    ref_err = (ref_lo - ref32).abs().max().item()
    bound = factor * ref_err + rounding + 1e-6
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x {ref_err:.3e} + {rounding:.1e}"


def run_case(
    *,
    dtype,
    hidden,
    is_rms,
    residual_dtype=None,
    residual_in_fp32=False,
    prenorm=False,
    dropout_p=0.0,
    x1=False,
    weight1=False,
    rowscale=False,
    weight_dtype=None,
    zero_centered=False,
    rows=ROWS,
):
    """Ours vs the reference in the inputs' dtypes and in fp32, forward and backward.
    Returns the keep masks and our gradients (x, weight, bias, residual, x1, weight1,
    bias1; None where there is no such input)."""
    dev = KERNEL_DEVICE
    torch.manual_seed(0)
    wdt = weight_dtype or dtype
    shape = (2, rows // 2, hidden) if rows % 2 == 0 else (rows, hidden)
    x = torch.randn(shape, device=dev, dtype=dtype)
    res = torch.randn(shape, device=dev, dtype=residual_dtype) if residual_dtype else None
    xx1 = torch.randn(shape, device=dev, dtype=dtype) if x1 else None
    w = torch.randn(hidden, device=dev, dtype=wdt)
    b = None if is_rms else torch.randn(hidden, device=dev, dtype=wdt)
    w1 = torch.randn(hidden, device=dev, dtype=wdt) if weight1 else None
    b1 = torch.randn(hidden, device=dev, dtype=wdt) if weight1 and not is_rms else None
    rs = torch.rand(shape[:-1], device=dev, dtype=dtype) + 0.5 if rowscale else None
    inputs = [x, w, b, res, xx1, w1, b1]
    ours_in = [leaf(t) for t in inputs]
    lo_in = [leaf(t) for t in inputs]
    hi_in = [leaf(t) for t in inputs]

    repoison()
    outs = ln.layer_norm_fn(
        ours_in[0], ours_in[1], ours_in[2], residual=ours_in[3], x1=ours_in[4],
        weight1=ours_in[5], bias1=ours_in[6], eps=1e-6, dropout_p=dropout_p, rowscale=rs,
        prenorm=prenorm, residual_in_fp32=residual_in_fp32, zero_centered_weight=zero_centered,
        is_rms_norm=is_rms, return_dropout_mask=True,
    )  # fmt: skip
    *ours, mask, mask1 = outs
    if dropout_p == 0.0:
        assert mask is None and mask1 is None
    ref = ln.rms_norm_ref if is_rms else ln.layer_norm_ref

    def run_ref(args, upcast):
        got = ref(args[0], args[1], args[2], residual=args[3], x1=args[4], weight1=args[5],
                  bias1=args[6], eps=1e-6, dropout_p=dropout_p, rowscale=rs, prenorm=prenorm,
                  zero_centered_weight=zero_centered, dropout_mask=mask, dropout_mask1=mask1,
                  upcast=upcast)  # fmt: skip
        return list(got) if isinstance(got, tuple) else [got]

    lo, hi = run_ref(lo_in, False), run_ref(hi_in, True)
    assert len(ours) == len(lo)
    names = ["y"] + (["y1"] if weight1 else []) + (["prenorm sum"] if prenorm else [])
    for name, o, r_lo, r_hi in zip(names, ours, lo, hi):
        if name == "prenorm sum":
            want = residual_dtype or (torch.float32 if residual_in_fp32 else dtype)
            assert o.dtype == want, f"{name}: dtype {o.dtype}, expected {want}"
        else:
            assert o.dtype == dtype
        assert_close_to_ref(name, o, r_hi, r_lo, 2)

    # a loss that uses every output (the prenorm sum too, through a nonlinearity)
    g = [torch.randn_like(o, dtype=torch.float32) for o in ours]

    def loss(outputs):
        return sum(((o.float() * gi).sum() if i == 0 else (torch.sigmoid(o.float()) * gi).sum())
                   for i, (o, gi) in enumerate(zip(outputs, g)))  # fmt: skip

    repoison()
    loss(ours).backward()
    loss(lo).backward()
    loss(hi).backward()
    for name, a, r_lo, r_hi in zip(["dx", "dweight", "dbias", "dresidual", "dx1", "dweight1",
                                    "dbias1"], ours_in, lo_in, hi_in):  # fmt: skip
        if a is None:
            continue
        assert a.grad is not None, f"{name}: no gradient"
        assert a.grad.dtype == a.dtype, f"{name}: dtype {a.grad.dtype}, expected {a.dtype}"
        assert_close_to_ref(name, a.grad, r_hi.grad, r_lo.grad, 3)
    return mask, mask1, [a.grad if a is not None else None for a in ours_in]


MODES = {
    "plain": dict(),
    "residual": dict(residual=True),
    "residual+prenorm": dict(residual=True, prenorm=True),
    "fp32 residual": dict(residual_fp32=True, prenorm=True),
    "residual_in_fp32": dict(residual_in_fp32=True, prenorm=True),
}


@kernel
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_backward(dtype, hidden, is_rms, mode):
    m = MODES[mode]
    residual_dtype = None
    if m.get("residual"):
        residual_dtype = dtype
    if m.get("residual_fp32"):
        residual_dtype = torch.float32
    run_case(dtype=dtype, hidden=hidden, is_rms=is_rms, residual_dtype=residual_dtype,
             residual_in_fp32=m.get("residual_in_fp32", False),
             prenorm=m.get("prenorm", False))  # fmt: skip


@kernel
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_parallel_branch_rowscale_fp32_weights(dtype, is_rms):
    hidden = HIDDEN[-1] if KERNEL_DEVICE == "cuda" else 96
    run_case(dtype=dtype, hidden=hidden, is_rms=is_rms, residual_dtype=dtype, x1=True,
             weight1=True, prenorm=True, dropout_p=0.1)  # fmt: skip
    run_case(dtype=dtype, hidden=hidden, is_rms=is_rms, residual_dtype=torch.float32,
             rowscale=True, weight_dtype=torch.float32, zero_centered=True,
             dropout_p=0.2)  # fmt: skip


def _binomial_bound(p: float, n: int) -> float:
    return 6 * math.sqrt(p * (1 - p) / n)


@kernel
@pytest.mark.parametrize("p", [0.1, 0.27, 0.5])
def test_dropout_fraction_gradients_and_seed(p):
    hidden = 1024 if KERNEL_DEVICE == "cuda" else 256
    mask, mask1, _ = run_case(dtype=torch.float16, hidden=hidden, is_rms=False,
                              residual_dtype=torch.float16, x1=True, prenorm=True,
                              dropout_p=p)  # fmt: skip
    for m in (mask, mask1):
        assert m is not None and m.dtype == torch.bool
        dropped = 1.0 - m.float().mean().item()
        assert abs(dropped - p) < _binomial_bound(p, m.numel()), (dropped, p, m.numel())
    assert not torch.equal(mask, mask1), "the two branches drew the same mask"
    # One Philox draw serves 4 neighbouring columns (one word each): neighbours must be
    # independent, P(both kept) = (1 - p)^2, at every offset within a group of 4.
    for m in (mask, mask1):
        cols = m.reshape(-1, hidden)
        for j in range(3):
            both = (cols[:, j::4] & cols[:, j + 1 :: 4]).float().mean().item()
            n_pairs = cols[:, j::4].numel()
            want = (1 - p) ** 2
            assert abs(both - want) < 6 * math.sqrt(want * (1 - want) / n_pairs), (j, both, want)
    # masks differ across rows (each row has its own Philox key)
    assert not torch.equal(mask.reshape(-1, hidden)[0], mask.reshape(-1, hidden)[1])

    x = torch.randn(ROWS, hidden, device=KERNEL_DEVICE, dtype=torch.bfloat16)
    w = torch.ones(hidden, device=KERNEL_DEVICE)

    def draw(seed):
        torch.manual_seed(seed)
        return ln.layer_norm_fn(x, w, None, dropout_p=p, return_dropout_mask=True)

    (y_a, m_a, _), (y_b, m_b, _), (_, m_c, _) = draw(7), draw(7), draw(8)
    assert torch.equal(m_a, m_b) and torch.equal(y_a, y_b), "same seed, different result"
    assert not torch.equal(m_a, m_c), "different seeds drew the same mask"


# (rows per step, warps, programs per SM) of the backward: one row a step in one program
# per SM, the default, and 4-row steps in 3 programs per SM
SPLITS = [(1, 4, 1), None, (4, 8, 3)]


@kernel
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
def test_backward_split_keeps_results_and_bits(is_rms, monkeypatch):
    """How the backward splits the rows among programs changes only the order of the
    weight/bias sums: each split stays within the reference bound (dx, dresidual, dw,
    db), and a split gives the same bits when run again (no atomics)."""
    k = ln._kernels()
    default = k.backward_config
    hidden, rows = (1000, 1037) if KERNEL_DEVICE == "cuda" else (96, 37)
    args = dict(dtype=torch.bfloat16, hidden=hidden, is_rms=is_rms, rows=rows,
                residual_dtype=torch.bfloat16, prenorm=True, dropout_p=0.1)  # fmt: skip
    for split in SPLITS:
        if split is None:
            monkeypatch.setattr(k, "backward_config", default)
        else:
            r, w, per_sm = split

            def config(n, parallel=False, *, r=r, w=w, per_sm=per_sm):
                return k.LaunchConfig(default(n).block_n, r, w, per_sm)

            monkeypatch.setattr(k, "backward_config", config)
        *_, grads = run_case(**args)
        *_, again = run_case(**args)
        for g, h in zip(grads, again):
            assert (g is None) == (h is None)
            if g is not None:
                assert torch.equal(g, h), f"split {split}: a second run gave other bits"


@kernel
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
def test_strided_inputs_give_the_same_bits(is_rms):
    """Inputs that are views (rows of a wider tensor, a transposed batch, a strided
    weight, an expanded output gradient) give exactly what their contiguous copies give,
    forward and backward: the kernels read rows with their stride, or the op copies."""
    dev, n = KERNEL_DEVICE, (768 if KERNEL_DEVICE == "cuda" else 96)
    torch.manual_seed(0)
    b, t = (4, 64) if KERNEL_DEVICE == "cuda" else (2, 3)
    wide = torch.randn(b, t, 2 * n, device=dev, dtype=torch.bfloat16)
    res_t = torch.randn(t, b, n, device=dev, dtype=torch.float32)
    w_wide = torch.randn(2 * n, device=dev, dtype=torch.bfloat16)
    bias = None if is_rms else torch.randn(n, device=dev, dtype=torch.bfloat16)
    rs = torch.rand(t, b, device=dev, dtype=torch.bfloat16) + 0.5
    g_y = torch.randn(1, 1, n, device=dev).expand(b, t, n)  # an expanded gradient
    g_s = torch.randn(b, t, n, device=dev)

    def run(x, res, w, rowscale):
        x, res, w = (v.detach().requires_grad_() for v in (x, res, w))
        y, s = ln.layer_norm_fn(x, w, bias, residual=res, eps=1e-5, dropout_p=0.2,
                                rowscale=rowscale, prenorm=True, is_rms_norm=is_rms)  # fmt: skip
        torch.autograd.backward((y, s), (g_y.to(y.dtype), g_s.to(s.dtype)))
        return y, s, x.grad, res.grad, w.grad

    views = (wide[..., :n], res_t.transpose(0, 1), w_wide[::2], rs.t())
    assert not any(v.is_contiguous() for v in views)
    torch.manual_seed(1)
    got = run(*views)
    torch.manual_seed(1)  # the same dropout seeds
    want = run(*(v.contiguous() for v in views))
    for name, a, e in zip(("y", "s", "dx", "dresidual", "dweight"), got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.equal(a, e), f"{name}: the strided inputs gave other values"


class _Recorder:
    """A Triton kernel stand-in: records each launch by name and computes nothing."""

    def __init__(self, name: str, launches: list[str]) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


@pytest.fixture
def launches(monkeypatch) -> list[str]:
    """The kernels replaced by recorders, CPU tensors accepted: the launch sequence."""
    seen: list[str] = []
    k = ln._kernels()
    for name in ("_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_partials_kernel"):
        monkeypatch.setattr(k, name, _Recorder(name, seen))
    monkeypatch.setattr(ln, "_interpreting", lambda: True)
    return seen


def test_one_launch_a_pass_and_no_graph_without_grad(launches):
    x = torch.randn(2, 3, 64, requires_grad=True)
    res = torch.randn(2, 3, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    with torch.no_grad():
        y, s = ln.layer_norm_fn(x, w, b, residual=res, prenorm=True)
    assert y.grad_fn is None and s.grad_fn is None and y.shape == s.shape == x.shape
    assert launches == ["_norm_fwd_kernel"]
    y, s = ln.rms_norm_fn(x, w, None, residual=res, prenorm=True, dropout_p=0.1)
    assert y.grad_fn is not None and s.grad_fn is not None
    (y.float().sum() + s.float().sum()).backward()
    assert launches == ["_norm_fwd_kernel"] * 2 + ["_norm_bwd_kernel", "_sum_partials_kernel"]
    for t in (x, res, w):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
    assert b.grad is None  # RMSNorm without bias here
    # flash_attn 2.x's Function, with its 18 arguments, runs the same passes
    launches.clear()
    y = ln.LayerNormFn.apply(x, w, b, res, None, None, None, 1e-6, 0.0, None, False)
    y.float().sum().backward()
    assert launches == ["_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_partials_kernel"]
    assert b.grad is not None and b.grad.shape == (64,)


def test_zero_rows_launch_nothing(launches):
    x = torch.randn(0, 32, dtype=torch.float16, requires_grad=True)
    w = torch.randn(32, dtype=torch.float16, requires_grad=True)
    b = torch.randn(32, dtype=torch.float32, requires_grad=True)
    y = ln.layer_norm_fn(x, w, b)
    assert y.shape == (0, 32) and y.dtype == torch.float16
    y.float().sum().backward()
    assert launches == []
    assert torch.equal(w.grad, torch.zeros(32, dtype=torch.float16))
    assert torch.equal(b.grad, torch.zeros(32))


@kernel
def test_modules_and_old_names_match_reference():
    dev, n = KERNEL_DEVICE, 768 if KERNEL_DEVICE == "cuda" else 64
    torch.manual_seed(0)
    x = torch.randn(4, 8, n, device=dev, dtype=torch.float16)
    res = torch.randn(4, 8, n, device=dev, dtype=torch.float16)
    tol = dict(rtol=2e-2, atol=2e-2)

    m = ln.LayerNorm(n, device=dev)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    y, s = m(x, residual=res, prenorm=True, residual_in_fp32=True)
    assert s.dtype == torch.float16  # residual given: its dtype wins
    want = F.layer_norm((x + res).float(), (n,), m.weight, m.bias, 1e-5)
    torch.testing.assert_close(y.float(), want, **tol)

    r = ln.RMSNorm(n, device=dev)
    want = ln.rms_norm_ref(x, r.weight, None, eps=1e-5, upcast=True)
    torch.testing.assert_close(r(x).float(), want.float(), **tol)
    torch.testing.assert_close(old_rms.RMSNorm(n, device=dev)(x), r(x))

    # the old API: layerscale and rowscale, uint8 masks, parallel residual
    w, b, ls = (torch.randn(n, device=dev) for _ in range(3))
    rs = torch.rand(4, 8, device=dev, dtype=torch.float16)
    z, xs, dmask = old_ln.dropout_add_layer_norm(
        x, res, w, b, 0.0, 1e-5, rowscale=rs, layerscale=ls, prenorm=True,
        return_dropout_mask=True,
    )  # fmt: skip
    assert dmask.dtype == torch.uint8 and bool((dmask == 1).all())
    s_want = x.float() * rs.float()[..., None] * ls + res.float()
    torch.testing.assert_close(xs.float(), s_want, **tol)
    torch.testing.assert_close(z.float(), F.layer_norm(s_want, (n,), w, b, 1e-5), **tol)
    z0, z1 = old_ln.dropout_add_layer_norm_parallel_residual(x, res, None, w, b, None, None,
                                                             0.0, 1e-5)  # fmt: skip
    assert z1 is None
    torch.testing.assert_close(z0.float(), F.layer_norm((x + res).float(), (n,), w, b, 1e-5),
                               **tol)  # fmt: skip
    z, dm = old_rms.dropout_add_rms_norm(x, None, w, None, 0.3, 1e-5, return_dropout_mask=True)
    assert dm.dtype == torch.uint8
    xd = torch.where(dm.bool(), x.float() / 0.7, 0.0)
    want = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(z.float(), want, **tol)


@kernel
@pytest.mark.parametrize("prenorm", [False, True])
def test_layer_norm_linear_fn(prenorm):
    dev, n = KERNEL_DEVICE, 512 if KERNEL_DEVICE == "cuda" else 64
    torch.manual_seed(0)
    x = torch.randn(64, n, device=dev, dtype=torch.float16, requires_grad=True)
    res = torch.randn(64, n, device=dev, dtype=torch.float32, requires_grad=True)
    nw, nb = torch.randn(n, device=dev), torch.randn(n, device=dev)
    lw = torch.randn(2 * n, n, device=dev) / math.sqrt(n)
    lb = torch.randn(2 * n, device=dev)
    dt = torch.float16 if dev == "cuda" else torch.bfloat16
    with torch.autocast(device_type=dev, dtype=dt):
        got = ln.layer_norm_linear_fn(x, nw, nb, lw, lb, residual=res, prenorm=prenorm)
    out = got[0] if prenorm else got
    assert out.dtype == dt
    s = x.float() + res
    want = F.linear(F.layer_norm(s, (n,), nw, nb, 1e-6), lw, lb)
    torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2)
    if prenorm:
        assert got[1].dtype == torch.float32
        torch.testing.assert_close(got[1], s)
    out.float().sum().backward()
    assert x.grad is not None and res.grad is not None
    assert torch.isfinite(x.grad).all()
