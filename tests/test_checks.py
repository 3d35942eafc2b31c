"""Input validation: every check raises before a launch, with a message that names
the value seen and what is valid. All of it runs on a CPU-only machine: shape and
dtype checks read metadata (CPU or meta tensors), the GPU and the build are
monkeypatched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import flash_attn
from flash_attn import _checks, _ops
from flash_attn._build_info import BuildInfo
from flash_attn.errors import (
    BuildError,
    DeviceError,
    ExtensionNotBuiltError,
    FlashAttnError,
    InputError,
    KernelNotBuiltError,
)

FP16 = torch.float16
BF16 = torch.bfloat16


def qkv(
    batch: int = 2,
    seqlen_q: int = 5,
    seqlen_k: int = 7,
    nheads: int = 4,
    nheads_k: int = 2,
    head_dim: int = 32,
    dtype: torch.dtype = FP16,
    device: str = "meta",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.empty(batch, seqlen_q, nheads, head_dim, dtype=dtype, device=device)
    k = torch.empty(batch, seqlen_k, nheads_k, head_dim, dtype=dtype, device=device)
    return q, k, torch.empty_like(k)


def varlen(
    batch: int = 3, total_q: int = 9, total_k: int = 11, head_dim: int = 32
) -> dict[str, object]:
    q = torch.empty(total_q, 4, head_dim, dtype=FP16, device="meta")
    k = torch.empty(total_k, 2, head_dim, dtype=FP16, device="meta")
    return {
        "q": q,
        "k": k,
        "v": torch.empty_like(k),
        "cu_seqlens_q": torch.zeros(batch + 1, dtype=torch.int32, device="meta"),
        "cu_seqlens_k": torch.zeros(batch + 1, dtype=torch.int32, device="meta"),
        "max_seqlen_q": 4,
        "max_seqlen_k": 5,
        "alibi_slopes": None,
    }


# --- errors are RuntimeErrors, as upstream's C++ checks -----------------------


@pytest.mark.parametrize(
    "cls", [InputError, DeviceError, BuildError, KernelNotBuiltError, ExtensionNotBuiltError]
)
def test_errors_are_runtime_errors(cls: type[Exception]) -> None:
    assert issubclass(cls, FlashAttnError)
    assert issubclass(cls, RuntimeError)


def test_not_built_is_also_an_import_error() -> None:
    assert issubclass(ExtensionNotBuiltError, ImportError)
    assert issubclass(InputError, ValueError)


# --- shapes, ranks, dtypes: metadata only (meta tensors) ---------------------


def test_check_dense_accepts_meta_tensors_and_reports_the_shape() -> None:
    q, k, v = qkv(batch=2, seqlen_q=5, seqlen_k=7, nheads=4, nheads_k=2, head_dim=40)
    shape = _checks.check_dense(q, k, v, None)
    assert shape == _checks.AttnShape(
        batch=2, seqlen_q=5, seqlen_k=7, nheads=4, nheads_k=2, head_dim=40, dtype=FP16
    )


def test_check_varlen_accepts_meta_tensors() -> None:
    shape = _checks.check_varlen(**varlen(batch=3))  # type: ignore[arg-type]
    assert (shape.batch, shape.seqlen_q, shape.seqlen_k) == (3, 4, 5)
    assert (shape.nheads, shape.nheads_k, shape.head_dim) == (4, 2, 32)


def test_float32_is_rejected_naming_the_dtype() -> None:
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(InputError, match=r"float16 and torch\.bfloat16") as err:
        _checks.check_dense(q, k, v, None)
    assert "torch.float32" in str(err.value)


def test_float32_is_rejected_by_the_public_function_on_cpu() -> None:
    q, k, v = qkv(dtype=torch.float32, device="cpu")
    with pytest.raises(InputError, match=r"dtype torch\.float32"):
        flash_attn.flash_attn_func(q, k, v)


def test_mixed_dtypes_are_rejected_naming_each() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match="same dtype") as err:
        _checks.check_dense(q, k.to(torch.bfloat16), v, None)
    assert "q torch.float16, k torch.bfloat16, v torch.float16" in str(err.value)


def test_head_dim_above_256_is_rejected() -> None:
    q, k, v = qkv(head_dim=264)
    with pytest.raises(InputError, match=r"head_dim 264 is not supported.*1\.\.256"):
        _checks.check_dense(q, k, v, None)


def test_256_is_the_largest_head_dim_accepted() -> None:
    assert _checks.check_dense(*qkv(head_dim=256), None).head_dim == 256


def test_differing_head_dims_are_rejected_naming_each() -> None:
    q, _, _ = qkv(head_dim=64)
    _, k, v = qkv(head_dim=32)
    with pytest.raises(InputError, match="q 64, k 32, v 32"):
        _checks.check_dense(q, k, v, None)


def test_v_head_dim_must_match_k() -> None:
    q, k, _ = qkv(head_dim=64)
    v = torch.empty(*k.shape[:-1], 128, dtype=FP16, device="meta")
    with pytest.raises(InputError, match="q 64, k 64, v 128"):
        _checks.check_dense(q, k, v, None)


def test_nheads_not_a_multiple_of_nheads_k() -> None:
    q, k, v = qkv(nheads=6, nheads_k=4)
    with pytest.raises(InputError, match=r"q \(6\).*multiple.*\(4\)"):
        _checks.check_dense(q, k, v, None)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_dense_needs_rank_4(name: str) -> None:
    tensors = dict(zip("qkv", qkv()))
    tensors[name] = tensors[name][0]  # drop the batch dim
    with pytest.raises(InputError, match=f"{name} must have 4 dimensions.*got 3"):
        _checks.check_dense(tensors["q"], tensors["k"], tensors["v"], None)


def test_non_tensor_input_is_rejected() -> None:
    _, k, v = qkv()
    with pytest.raises(InputError, match="q must be a torch.Tensor.*got list"):
        _checks.check_dense([1, 2], k, v, None)  # type: ignore[arg-type]


def test_k_and_v_shapes_must_agree() -> None:
    q, k, _ = qkv(seqlen_k=7)
    v = torch.empty(2, 6, 2, 32, dtype=FP16, device="meta")
    with pytest.raises(InputError, match=r"k \(2, 7, 2, 32\) and v \(2, 6, 2, 32\)"):
        _checks.check_dense(q, k, v, None)


def test_batch_sizes_must_agree() -> None:
    q, _, _ = qkv(batch=2)
    _, k, v = qkv(batch=3)
    with pytest.raises(InputError, match="same batch size; got q 2, k 3"):
        _checks.check_dense(q, k, v, None)


def test_empty_batch_is_rejected() -> None:
    with pytest.raises(InputError, match="batch size must be positive; got 0"):
        _checks.check_dense(*qkv(batch=0), None)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_varlen_needs_rank_3(name: str) -> None:
    args = varlen()
    args[name] = args[name].unsqueeze(0)  # type: ignore[union-attr]
    with pytest.raises(InputError, match=f"{name} must have 3 dimensions.*got 4"):
        _checks.check_varlen(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_must_be_int32(name: str) -> None:
    args = varlen()
    args[name] = torch.zeros(4, dtype=torch.int64, device="meta")
    with pytest.raises(InputError, match=f"{name} must be a 1-D int32.*torch.int64"):
        _checks.check_varlen(**args)  # type: ignore[arg-type]


def test_cu_seqlens_must_be_1d() -> None:
    args = varlen()
    args["cu_seqlens_q"] = torch.zeros(2, 2, dtype=torch.int32, device="meta")
    with pytest.raises(InputError, match=r"1-D.*got shape \(2, 2\)"):
        _checks.check_varlen(**args)  # type: ignore[arg-type]


def test_cu_seqlens_needs_batch_plus_one_entries() -> None:
    args = varlen()
    args["cu_seqlens_k"] = torch.zeros(1, dtype=torch.int32, device="meta")
    expected = r"cu_seqlens_k must have length batch \+ 1 >= 2.*got length 1"
    with pytest.raises(InputError, match=expected):
        _checks.check_varlen(**args)  # type: ignore[arg-type]


def test_cu_seqlens_q_and_k_must_describe_one_batch() -> None:
    args = varlen(batch=3)
    args["cu_seqlens_k"] = torch.zeros(5, dtype=torch.int32, device="meta")
    with pytest.raises(InputError, match="same length.*got 4 and 5"):
        _checks.check_varlen(**args)  # type: ignore[arg-type]


def test_cu_seqlens_must_be_a_tensor() -> None:
    args = varlen()
    args["cu_seqlens_q"] = [0, 3, 5]
    with pytest.raises(InputError, match="cu_seqlens_q must be a 1-D int32.*got list"):
        _checks.check_varlen(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [4.0, "4", None, True])
def test_max_seqlen_must_be_an_int(value: object) -> None:
    args = varlen()
    args["max_seqlen_q"] = value
    with pytest.raises(InputError, match="max_seqlen_q must be an int"):
        _checks.check_varlen(**args)  # type: ignore[arg-type]


def test_max_seqlen_accepts_integer_like_values() -> None:
    args = varlen()
    args["max_seqlen_k"] = torch.tensor(6)
    assert _checks.check_varlen(**args).seqlen_k == 6  # type: ignore[arg-type]


def test_alibi_slopes_must_be_float32() -> None:
    q, k, v = qkv(nheads=4)
    slopes = torch.ones(4, dtype=FP16, device="meta")
    with pytest.raises(InputError, match="alibi_slopes must be float32; got torch.float16"):
        _checks.check_dense(q, k, v, slopes)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 2), (1, 2, 4)])
def test_alibi_slopes_shape(shape: tuple[int, ...]) -> None:
    q, k, v = qkv(batch=2, nheads=4)
    slopes = torch.ones(shape, device="meta")
    with pytest.raises(InputError) as err:
        _checks.check_dense(q, k, v, slopes)
    msg = str(err.value)
    assert "(nheads,) = (4,)" in msg
    assert "(batch, nheads) = (2, 4)" in msg
    assert f"got {shape}" in msg


@pytest.mark.parametrize("shape", [(4,), (2, 4)])
def test_alibi_slopes_valid_shapes(shape: tuple[int, ...]) -> None:
    q, k, v = qkv(batch=2, nheads=4)
    _checks.check_dense(q, k, v, torch.ones(shape, device="meta"))


def test_varlen_alibi_batch_comes_from_cu_seqlens() -> None:
    args = varlen(batch=3)
    args["alibi_slopes"] = torch.ones(3, 4, device="meta")
    _checks.check_varlen(**args)  # type: ignore[arg-type]
    args["alibi_slopes"] = torch.ones(2, 4, device="meta")
    with pytest.raises(InputError, match=r"\(batch, nheads\) = \(3, 4\)"):
        _checks.check_varlen(**args)  # type: ignore[arg-type]


def test_packed_qkv_needs_3_in_dim_minus_3() -> None:
    bad = torch.empty(2, 5, 2, 4, 32, device="meta")
    with pytest.raises(InputError, match=r"qkv must have shape.*\(2, 5, 2, 4, 32\)"):
        _checks.check_packed("qkv", bad, 3, "(batch, seqlen, 3, nheads, head_dim)")


def test_packed_kv_rank() -> None:
    bad = torch.empty(5, 2, 4, 32, device="meta")
    with pytest.raises(InputError, match="kv must have 5 dimensions.*got 4"):
        _checks.check_packed("kv", bad, 2, "(batch, seqlen_k, 2, nheads_k, head_dim)")


# --- options ---------------------------------------------------------------


def options(**overrides: object) -> _checks.AttnOptions:
    args: dict[str, object] = {
        "dropout_p": 0.0,
        "softmax_scale": None,
        "causal": False,
        "window_size": (-1, -1),
        "softcap": 0.0,
    }
    args.update(overrides)
    return _checks.check_options(**args)  # type: ignore[arg-type]


def test_causal_sets_window_right_to_zero_and_keeps_left() -> None:
    opts = options(causal=True, window_size=(5, 3))
    assert (opts.window_left, opts.window_right) == (5, 0)
    opts = options(causal=True)
    assert (opts.window_left, opts.window_right) == (-1, 0)
    opts = options(window_size=[4, 2])
    assert (opts.window_left, opts.window_right) == (4, 2)


def test_default_scale_is_one_over_sqrt_head_dim() -> None:
    assert options().scale_for(20) == pytest.approx(20**-0.5)
    assert options(softmax_scale=0.5).scale_for(20) == 0.5
    assert options(softmax_scale=0.0).scale_for(20) == 0.0


def test_nonpositive_softcap_turns_it_off() -> None:
    assert options(softcap=-1.0).softcap == 0.0
    assert options(softcap=30.0).softcap == 30.0


@pytest.mark.parametrize(
    "window",
    [
        (3, 4),
        [3, 4],
        torch.tensor([3, 4]),
        torch.tensor([3, 4], dtype=torch.int32),
        (torch.tensor(3), torch.tensor(4)),
        (np.int64(3), np.int64(4)),
        np.array([3, 4], dtype=np.uint16),
    ],
    ids=["tuple", "list", "tensor", "tensor-int32", "0d-tensors", "np-int64", "np-array"],
)
def test_window_size_accepts_int_convertible_pairs(window: object) -> None:
    """Upstream accepts any pair of int-convertible values; its tests pass a tensor."""
    opts = options(window_size=window)
    assert (opts.window_left, opts.window_right) == (3, 4)
    assert type(opts.window_left) is int and type(opts.window_right) is int


@pytest.mark.parametrize(
    "window",
    [
        (0,),
        (1, 2, 3),
        "ab",
        (1.5, 2),
        (True, 1),
        None,
        5,
        torch.tensor([1.5, 2.0]),
        torch.tensor([True, False]),
        torch.tensor([[1, 2]]),
        torch.tensor([1, 2, 3]),
        (np.float64(1.0), 2),
        (np.bool_(True), 1),
        np.array([1.0, 2.0]),
    ],
)
def test_bad_window_size(window: object) -> None:
    with pytest.raises(InputError, match=r"window_size must be a pair.*got"):
        options(window_size=window)


def test_any_negative_window_side_is_unbounded() -> None:
    opts = options(window_size=(-5, -2))
    assert (opts.window_left, opts.window_right) == (-1, -1)


def test_window_sides_past_every_key_become_unbounded() -> None:
    opts = options(window_size=(10, 4))
    assert opts.window_for(seqlen_q=5, seqlen_k=11) == (10, 4)
    assert opts.window_for(seqlen_q=4, seqlen_k=10) == (-1, -1)
    assert options(window_size=(2**40, 0)).window_for(8, 8) == (-1, 0)


@pytest.mark.parametrize("p", [0.0, 0, 0.1, 0.5, 0.999, np.float32(0.25), np.float64(0.0)])
def test_dropout_in_range_is_accepted_as_a_float(p: object) -> None:
    opts = options(dropout_p=p)
    assert type(opts.dropout_p) is float and opts.dropout_p == pytest.approx(float(p))  # type: ignore[arg-type]


def test_dropout_defaults_to_none_applied() -> None:
    assert options().dropout_p == 0.0


@pytest.mark.parametrize(
    ("p", "shown"),
    [(-0.1, "-0.1"), (1.0, "1.0"), (1.5, "1.5"), (float("nan"), "nan"), (float("inf"), "inf"),
     (-1, "-1.0")],
)  # fmt: skip
def test_dropout_out_of_range_names_the_value_and_the_range(p: float, shown: str) -> None:
    with pytest.raises(InputError, match=rf"dropout_p must be a float in \[0, 1\); got {shown}"):
        options(dropout_p=p)


@pytest.mark.parametrize("p", [True, False, "0.1", None, torch.tensor(0.1), [0.1], 0.1j])
def test_dropout_of_another_type_names_the_type(p: object) -> None:
    with pytest.raises(
        InputError, match=rf"dropout_p must be a float in \[0, 1\).*got {type(p).__name__}"
    ):
        options(dropout_p=p)


def test_dropout_error_is_no_longer_not_implemented() -> None:
    with pytest.raises(InputError) as info:
        options(dropout_p=2.0)
    assert not isinstance(info.value, NotImplementedError)
    assert isinstance(info.value, ValueError)  # InputError is a ValueError too


# --- devices -----------------------------------------------------------------


def test_cpu_tensors_are_rejected() -> None:
    q, k, v = qkv(device="cpu")
    with pytest.raises(DeviceError, match="CUDA GPUs only; the inputs are on cpu"):
        flash_attn.flash_attn_func(q, k, v)


def test_meta_tensors_are_not_a_device_to_run_on() -> None:
    q, k, v = qkv(device="meta")
    with pytest.raises(DeviceError, match="on meta"):
        _checks.check_devices({"q": q, "k": k, "v": v})


def test_mixed_devices_are_rejected_naming_each() -> None:
    q, _, v = qkv(device="cpu")
    _, k, _ = qkv(device="meta")
    with pytest.raises(DeviceError, match="same CUDA device") as err:
        _checks.check_devices({"q": q, "k": k, "v": v, "alibi_slopes": None})
    assert "q on cpu, k on meta, v on cpu" in str(err.value)


def test_cu_seqlens_on_another_device_are_rejected() -> None:
    q = torch.empty(9, 4, 32, dtype=FP16)
    cu = torch.zeros(3, dtype=torch.int32, device="meta")
    with pytest.raises(DeviceError, match="cu_seqlens_q on meta"):
        _checks.check_devices({"q": q, "cu_seqlens_q": cu})


# --- the GPU ---------------------------------------------------------------


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A pretend GPU: set 'capability' and 'name'."""
    fake: dict[str, object] = {"capability": (8, 0), "name": "NVIDIA A100"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: fake["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: fake["name"])
    return fake


def test_pre_ampere_gpu_is_rejected(gpu: dict[str, object]) -> None:
    gpu.update(capability=(7, 5), name="Tesla T4")
    with pytest.raises(DeviceError) as err:
        _checks.check_capability(torch.device("cuda", 0))
    assert str(err.value) == (
        "flash_attn needs an Ampere (sm80) or newer GPU; found sm75 (Tesla T4) on cuda:0"
    )


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)])
def test_ampere_and_newer_pass(gpu: dict[str, object], capability: tuple[int, int]) -> None:
    gpu["capability"] = capability
    assert _checks.check_capability(torch.device("cuda", 0)) == capability


# --- the build -------------------------------------------------------------


def build(**overrides: object) -> BuildInfo:
    data: dict[str, object] = {
        "head_dims": [32, 64, 96, 128, 160, 192, 224, 256],
        "dtypes": ["fp16", "bf16"],
        "backward": True,
        "cuda_archs": ["80", "90"],
    }
    data.update(overrides)
    return BuildInfo.from_json(json.dumps(data))


def test_build_info_parses_the_extension_json() -> None:
    info = BuildInfo.from_json(
        '{"head_dims":[128,64], "dtypes":["bf16"], "backward":false, "cuda_archs":["90"]}'
    )
    assert info == BuildInfo((64, 128), ("bf16",), False, ("90",))


@pytest.mark.parametrize("text", ["not json", "{}", '{"head_dims": 3}', "[]"])
def test_malformed_build_info_is_a_build_error(text: str) -> None:
    with pytest.raises(BuildError, match="not the expected JSON"):
        BuildInfo.from_json(text)


def test_head_dim_dispatches_to_the_smallest_compiled_bucket() -> None:
    info = build(head_dims=[64, 128])
    assert info.bucket_for(8) == 64
    assert info.bucket_for(64) == 64
    assert info.bucket_for(72) == 128
    assert info.bucket_for(136) is None


def test_head_dim_between_compiled_buckets_is_served() -> None:
    _checks.check_build(build(head_dims=[64, 128]), head_dim=80, dtype=FP16, needs_backward=True)


def test_head_dim_above_the_largest_compiled_bucket() -> None:
    with pytest.raises(BuildError) as err:
        _checks.check_build(
            build(head_dims=[64, 128]), head_dim=190, dtype=FP16, needs_backward=False
        )
    msg = str(err.value)
    assert "no kernel for head_dim 190" in msg
    assert "FLASH_ATTN_HEAD_DIMS=64,128 (largest bucket 128)" in msg
    assert "Rebuild with FLASH_ATTN_HEAD_DIMS=64,128,192" in msg


def test_padded_head_dim_picks_the_bucket() -> None:
    # head_dim 250 is padded to 256, which only the 256 bucket serves
    with pytest.raises(BuildError, match="FLASH_ATTN_HEAD_DIMS=32,256"):
        _checks.check_build(build(head_dims=[32]), head_dim=250, dtype=FP16, needs_backward=False)


def test_dtype_dropped_by_the_build() -> None:
    with pytest.raises(BuildError) as err:
        _checks.check_build(build(dtypes=["bf16"]), head_dim=64, dtype=FP16, needs_backward=False)
    msg = str(err.value)
    assert "no fp16 kernels (torch.float16)" in msg
    assert "built with FLASH_ATTN_DTYPES=bf16" in msg
    assert "Rebuild with FLASH_ATTN_DTYPES=fp16,bf16" in msg
    assert "cast the inputs to torch.bfloat16" in msg


def test_backward_dropped_by_the_build() -> None:
    info = build(backward=False)
    _checks.check_build(info, head_dim=64, dtype=FP16, needs_backward=False)
    with pytest.raises(BuildError) as err:
        _checks.check_build(info, head_dim=64, dtype=FP16, needs_backward=True)
    msg = str(err.value)
    assert "FLASH_ATTN_BACKWARD=0" in msg
    assert "Rebuild with FLASH_ATTN_BACKWARD=1" in msg
    assert "torch.no_grad()" in msg


@pytest.mark.parametrize(
    ("archs", "capability", "ok"),
    [
        (["80"], (8, 0), True),
        (["80"], (8, 6), True),  # SASS runs on later minors of its major
        (["80"], (9, 0), True),  # the newest arch ships PTX too: JIT on newer GPUs
        (["80", "90"], (12, 0), True),
        (["86"], (8, 0), False),  # nothing runs on an older GPU
        (["90"], (8, 9), False),
        (["90a"], (9, 0), True),
        (["90a"], (10, 0), False),  # arch-specific code runs on its arch only
        (["80", "90a"], (10, 0), False),
        (["80", "sm_90a"], (8, 6), True),
        (["8.6", "9.0"], (8, 9), True),
        (["native"], (7, 0), True),  # a spelling we do not know: not checked
    ],
)
def test_build_archs(archs: list[str], capability: tuple[int, int], ok: bool) -> None:
    info = build(cuda_archs=archs)
    args = {"head_dim": 64, "dtype": FP16, "needs_backward": False}
    if ok:
        _checks.check_build(info, capability=capability, **args)  # type: ignore[arg-type]
        return
    major, minor = capability
    with pytest.raises(BuildError) as err:
        _checks.check_build(info, capability=capability, **args)  # type: ignore[arg-type]
    msg = str(err.value)
    assert f"no code for this GPU (sm{major}{minor})" in msg
    assert f"FLASH_ATTN_CUDA_ARCHS={';'.join(archs)}" in msg
    assert f"{';'.join(archs)};{major}{minor}" in msg


# --- the environment, in order ---------------------------------------------


def failing_import() -> object:
    raise ImportError("No module named 'flash_attn._C'")


def test_missing_extension_error_says_how_to_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_ops, "_EXTENSION", _ops.Extension(importer=failing_import))
    with pytest.raises(ExtensionNotBuiltError) as err:
        _ops.require()
    msg = str(err.value)
    assert "flash_attn._C" in msg
    assert "ImportError: No module named 'flash_attn._C'" in msg
    assert "pip install --no-build-isolation ." in msg
    assert torch.__version__ in msg


def test_missing_extension_is_reported_at_call_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_ops, "_EXTENSION", _ops.Extension(importer=failing_import))
    monkeypatch.setattr(_checks, "check_devices", lambda tensors: torch.device("cuda", 0))
    q, k, v = qkv(device="cpu")
    with pytest.raises(ImportError, match="could not be loaded"):
        flash_attn.flash_attn_func(q, k, v)


def test_extension_that_registers_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    ext = _ops.Extension(namespace="flash_attn_no_such_ops", importer=lambda: None)
    monkeypatch.setattr(_ops, "_EXTENSION", ext)
    with pytest.raises(ExtensionNotBuiltError, match="did not register"):
        _ops.require()


def test_import_is_attempted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = []

    def importer() -> object:
        attempts.append(1)
        raise ImportError("nope")

    monkeypatch.setattr(_ops, "_EXTENSION", _ops.Extension(importer=importer))
    for _ in range(3):
        assert _ops.load_error() == "ImportError: nope"
    assert attempts == [1]


def test_environment_checks_extension_then_gpu_then_build(
    monkeypatch: pytest.MonkeyPatch, gpu: dict[str, object]
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(_ops, "require", lambda: seen.append("extension"))
    monkeypatch.setattr(
        _checks,
        "check_capability",
        lambda device: seen.append("gpu") or (8, 0),
    )
    monkeypatch.setattr(_ops, "build_info", lambda: seen.append("build") or build(dtypes=["bf16"]))
    with pytest.raises(BuildError, match="no fp16 kernels"):
        _checks.check_environment(torch.device("cuda", 0), FP16, 64, False)
    assert seen == ["extension", "gpu", "build"]


def test_environment_ready_is_false_when_a_check_fails(
    monkeypatch: pytest.MonkeyPatch, gpu: dict[str, object]
) -> None:
    monkeypatch.setattr(_ops, "require", lambda: None)
    monkeypatch.setattr(_ops, "build_info", lambda: build())
    device = torch.device("cuda", 0)
    assert _checks.environment_ready(device, FP16, True)
    gpu["capability"] = (7, 0)
    assert not _checks.environment_ready(device, FP16, True)
    with pytest.raises(DeviceError, match="found sm70"):
        _checks.check_environment(device, FP16, 64, True)


def test_check_launch_checks_devices_before_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def must_not_run(*args: object) -> None:
        raise AssertionError("environment checked before devices")

    monkeypatch.setattr(_checks, "check_environment", must_not_run)
    q, k, v = qkv(device="cpu")
    shape = _checks.check_dense(q, k, v, None)
    with pytest.raises(DeviceError, match="on cpu"):
        _checks.check_launch({"q": q, "k": k, "v": v}, shape, needs_backward=False)


def test_check_launch_raises_the_environment_error(
    monkeypatch: pytest.MonkeyPatch, gpu: dict[str, object]
) -> None:
    monkeypatch.setattr(_checks, "check_devices", lambda tensors: torch.device("cuda", 0))
    monkeypatch.setattr(_ops, "require", lambda: None)
    monkeypatch.setattr(_ops, "build_info", lambda: build(backward=False))
    q, k, v = qkv()
    shape = _checks.check_dense(q, k, v, None)
    _checks.check_launch({"q": q}, shape, needs_backward=False)
    with pytest.raises(BuildError, match="FLASH_ATTN_BACKWARD=0"):
        _checks.check_launch({"q": q}, shape, needs_backward=True)


def test_check_launch_keeps_a_passing_environment_only(
    monkeypatch: pytest.MonkeyPatch, gpu: dict[str, object]
) -> None:
    """The GPU's capability is asked once per (extension, device, dtype, direction) once
    it passed; a failing environment is asked again on every call."""
    asked: list[object] = []
    monkeypatch.setattr(_checks, "check_devices", lambda tensors: torch.device("cuda", 0))
    monkeypatch.setattr(_ops, "require", lambda: None)
    monkeypatch.setattr(_ops, "build_info", lambda: build(head_dims=[64]))
    def capability(device: object = None) -> object:
        asked.append(device)
        return gpu["capability"]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    shape = _checks.check_dense(*qkv(head_dim=64), None)
    gpu["capability"] = (7, 5)
    for _ in range(2):
        with pytest.raises(DeviceError, match="found sm75"):
            _checks.check_launch({"q": None}, shape, needs_backward=False)
    failing = len(asked)
    assert failing >= 2  # not kept: asked on each call
    gpu["capability"] = (9, 0)
    for _ in range(3):
        _checks.check_launch({"q": None}, shape, needs_backward=False)
    assert len(asked) == failing + 1  # kept after the first pass
    # a head_dim past the build's buckets still raises, from the kept verdict
    with pytest.raises(KernelNotBuiltError, match="no kernel for head_dim 96"):
        _checks.check_launch({"q": None}, _checks.check_dense(*qkv(head_dim=96), None), False)
    before = len(asked)
    _checks.forget_environment()
    _checks.check_launch({"q": None}, shape, needs_backward=False)
    assert len(asked) == before + 1  # asked again after forget_environment


# --- the fast paths agree with the checks one by one --------------------------------


def _dense_variants() -> list[tuple[object, object, object]]:
    """Valid and invalid (q, k, v) of every kind the dense checks look at (meta tensors)."""
    m = "meta"

    def t(*shape: int, dtype: torch.dtype = FP16) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=m)

    return [
        (t(2, 5, 4, 32), t(2, 7, 2, 32), t(2, 7, 2, 32)),  # valid GQA
        (t(2, 1, 8, 128, dtype=BF16), t(2, 9, 8, 128, dtype=BF16), t(2, 9, 8, 128, dtype=BF16)),
        (t(1, 3, 3, 256), t(1, 3, 1, 256), t(1, 3, 1, 256)),  # MQA, largest head_dim
        (t(2, 5, 4, 32), t(2, 7, 2, 32), t(2, 7, 2, 32, dtype=BF16)),  # dtypes differ
        (t(2, 5, 4, 32, dtype=torch.float32),) * 3,  # fp32
        (t(2, 5, 4, 32), t(3, 7, 2, 32), t(3, 7, 2, 32)),  # batch differs
        (t(0, 5, 4, 32), t(0, 7, 2, 32), t(0, 7, 2, 32)),  # batch 0
        (t(2, 5, 4, 32), t(2, 7, 3, 32), t(2, 7, 3, 32)),  # heads not a multiple
        (t(2, 5, 4, 32), t(2, 7, 0, 32), t(2, 7, 0, 32)),  # no kv heads
        (t(2, 5, 0, 32), t(2, 7, 2, 32), t(2, 7, 2, 32)),  # no q heads
        (t(2, 5, 4, 32), t(2, 7, 2, 64), t(2, 7, 2, 64)),  # head_dim differs
        (t(2, 5, 4, 32), t(2, 7, 2, 32), t(2, 6, 2, 32)),  # k and v differ
        (t(2, 5, 4, 264), t(2, 7, 2, 264), t(2, 7, 2, 264)),  # head_dim too large
        (t(2, 5, 4, 0), t(2, 7, 2, 0), t(2, 7, 2, 0)),  # head_dim 0
        (t(5, 4, 32), t(7, 2, 32), t(7, 2, 32)),  # rank 3
        (t(2, 5, 4, 32), "k", t(2, 7, 2, 32)),  # not a tensor
    ]


@pytest.mark.parametrize("case", range(len(_dense_variants())))
def test_dense_fast_path_agrees_with_the_checks(
    case: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, k, v = _dense_variants()[case]
    fast = _checks._dense_fast(q, k, v)
    monkeypatch.setattr(_checks, "_dense_fast", lambda *args: None)  # the checks in turn
    try:
        slow = _checks.check_dense(q, k, v, None)  # type: ignore[arg-type]
    except InputError:
        assert fast is None  # never accepts what the checks refuse
        return
    assert fast == slow  # and takes every valid case here


def _varlen_variants() -> list[tuple[object, ...]]:
    m = "meta"

    def t(*shape: int, dtype: torch.dtype = FP16) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=m)

    def cu(n: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.empty((n,), dtype=dtype, device=m)

    q, kv = t(10, 4, 64), t(12, 2, 64)
    return [
        (q, kv, kv, cu(3), cu(3), 5, 6),  # valid
        (t(10, 6, 64, dtype=BF16), t(9, 3, 64, dtype=BF16), t(9, 3, 64, dtype=BF16), cu(2),
         cu(2), 10, 9),  # fmt: skip
        (q, kv, kv, cu(3), cu(4), 5, 6),  # lengths differ
        (q, kv, kv, cu(1), cu(1), 5, 6),  # no sequence
        (q, kv, kv, cu(3, torch.int64), cu(3), 5, 6),  # int64 cu_seqlens
        (q, kv, kv, torch.empty((3, 1), dtype=torch.int32, device=m), cu(3), 5, 6),  # 2-D
        (q, kv, kv, cu(3), cu(3), -1, 6),  # negative max_seqlen
        (q, kv, kv, cu(3), cu(3), 5.0, 6),  # float max_seqlen
        (q, kv, kv, cu(3), cu(3), True, 6),  # bool max_seqlen
        (q, t(12, 3, 64), t(12, 3, 64), cu(3), cu(3), 5, 6),  # heads not a multiple
        (q, kv, t(12, 2, 32), cu(3), cu(3), 5, 6),  # v's head_dim differs
        (t(10, 4, 64, dtype=torch.float32), kv, kv, cu(3), cu(3), 5, 6),  # dtypes
        (t(2, 10, 4, 64), kv, kv, cu(3), cu(3), 5, 6),  # rank 4
        (q, kv, kv, [0, 5, 10], cu(3), 5, 6),  # a list for cu_seqlens
    ]


@pytest.mark.parametrize("case", range(len(_varlen_variants())))
def test_varlen_fast_path_agrees_with_the_checks(
    case: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _varlen_variants()[case]
    fast = _checks._varlen_fast(*args)
    monkeypatch.setattr(_checks, "_varlen_fast", lambda *args: None)  # the checks in turn
    try:
        slow = _checks.check_varlen(*args, None)  # type: ignore[arg-type]
    except InputError:
        assert fast is None
        return
    assert fast == slow  # and takes every valid case here


class _Item:
    """A test item as tests/conftest.py's pytest_runtest_call reads it: its gpu marker."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu

    def get_closest_marker(self, name: str) -> object | None:
        return object() if self.gpu and name == "gpu" else None


def _raised_through_runtest_call(config: pytest.Config, item: _Item, error: Exception) -> None:
    # tests/conftest.py as pytest loaded it (other conftest.py files share its module name)
    path = Path(__file__).with_name("conftest.py").resolve()
    (conftest,) = [
        plugin
        for plugin in config.pluginmanager.get_plugins()
        if getattr(plugin, "__file__", None) and Path(plugin.__file__).resolve() == path
    ]
    wrapper = conftest.pytest_runtest_call(item)
    next(wrapper)  # up to the test's call
    wrapper.throw(error)  # the test raised this


def test_gpu_test_needing_a_kernel_the_build_left_out_is_skipped(pytestconfig: pytest.Config):
    """A GPU test whose call raises KernelNotBuiltError (a partial build, e.g.
    FLASH_ATTN_HEAD_DIMS=64,128) is skipped with its message; the same error from a test
    without the gpu marker, and any other BuildError, still fail it."""
    missing = KernelNotBuiltError("this flash_attn build has no kernel for head_dim 256")
    with pytest.raises(pytest.skip.Exception, match="not in this build: .*head_dim 256"):
        _raised_through_runtest_call(pytestconfig, _Item(gpu=True), missing)
    with pytest.raises(KernelNotBuiltError):
        _raised_through_runtest_call(pytestconfig, _Item(gpu=False), missing)
    with pytest.raises(BuildError, match="build record"):
        unreadable = BuildError("the build record is not JSON")
        _raised_through_runtest_call(pytestconfig, _Item(gpu=True), unreadable)
