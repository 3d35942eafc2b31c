"""Input validation that runs before any kernel launch.

The checks come in the order a CPU-only machine can test them:

1. options (dropout_p in [0, 1), window, softcap): plain Python values;
2. shapes, ranks and dtypes (``check_dense`` / ``check_varlen``): tensor metadata
   only, so they accept meta tensors;
3. devices (``check_devices``): all inputs on one CUDA device;
4. the environment (``check_environment``): the extension loads, the GPU is sm80
   or newer, and the build holds a kernel for this head_dim, dtype and direction.

Each message names the value seen and what is valid.
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flash_attn import _ops
from flash_attn._build_info import (
    ARCHS_KNOB,
    BACKWARD_KNOB,
    DTYPE_NAMES,
    DTYPES_KNOB,
    HEAD_DIM_BUCKETS,
    HEAD_DIMS_KNOB,
    BuildInfo,
    needed_bucket,
)
from flash_attn._layout import padded_head_dim
from flash_attn.errors import DeviceError, InputError, KernelNotBuiltError

MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 0)
# Device types the kernels run on. (The CPU tests add "cpu" to run the whole
# Python path over a CPU stand-in for the extension.)
DEVICE_TYPES: tuple[str, ...] = ("cuda",)


# AttnOptions and AttnShape are built on every call, so they are plain dataclasses
# (positional construction: ~0.3 us each, where frozen ones take ~1.2-1.7 us).


@dataclass
class AttnOptions:
    """The score function, as the kernels take it."""

    softmax_scale: float | None  # None: 1/sqrt(head_dim), see scale_for
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float = 0.0  # in [0, 1); 0 applies no dropout

    def scale_for(self, head_dim: int) -> float:
        """softmax_scale, defaulting to 1/sqrt of the (unpadded) head_dim."""
        if self.softmax_scale is None:
            return head_dim**-0.5
        return self.softmax_scale

    def window_for(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
        """(left, right) with sides that reach past every key written as -1.

        Query i sees key j iff i + sk - sq - left <= j <= i + sk - sq + right, so
        left >= seqlen_k and right >= seqlen_q bound nothing; writing them -1 gives
        the same mask and keeps huge values out of the kernels' int32 arithmetic.
        (For varlen the seqlens are the maxima, so this holds for every sequence.)
        """
        left = -1 if self.window_left >= seqlen_k else self.window_left
        right = -1 if self.window_right >= seqlen_q else self.window_right
        return left, right


@dataclass
class AttnShape:
    """Sizes of one attention call (seqlens are the maxima for varlen)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: torch.dtype


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# --- 1. options -------------------------------------------------------------


def check_options(
    *,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: Sequence[int],
    softcap: float,
) -> AttnOptions:
    """Validate the scalar options; causal becomes window_right = 0."""
    dropout = check_dropout_p(dropout_p)
    left, right = _check_window(window_size)
    if causal:
        right = 0
    return AttnOptions(
        None if softmax_scale is None else float(softmax_scale),
        left,
        right,
        max(float(softcap), 0.0),  # <= 0 turns softcapping off, as upstream
        dropout,
    )


def check_dropout_p(dropout_p: object) -> float:
    """dropout_p as a float in [0, 1).

    A real number: a float, an int (0 is common), a numpy scalar; under
    torch.compile also a symbolic float. Not a bool, a string or a tensor (pass
    float(p)). NaN, negative values and values >= 1 are refused: 1 would drop
    everything and scale the rest by 1 / 0.
    """
    if type(dropout_p) is float and dropout_p == 0.0:
        return 0.0  # the default, on almost every call
    symbolic = isinstance(dropout_p, (torch.SymFloat, torch.SymInt))
    if isinstance(dropout_p, bool) or not (symbolic or isinstance(dropout_p, numbers.Real)):
        raise InputError(
            "dropout_p must be a float in [0, 1) (the probability of dropping an attention "
            f"probability); got {type(dropout_p).__name__} {dropout_p!r}"
        )
    if not symbolic:
        dropout_p = float(dropout_p)  # type: ignore[arg-type]
    if not 0.0 <= dropout_p < 1.0:  # type: ignore[operator]  # NaN too
        raise InputError(
            f"dropout_p must be a float in [0, 1); got {dropout_p}"
            + (" (1 would drop every probability)" if dropout_p == 1.0 else "")
        )
    return dropout_p  # type: ignore[return-value]


def _check_window(window_size: Sequence[int]) -> tuple[int, int]:
    """(left, right) as ints; any negative value means unbounded (-1), as upstream.

    Like upstream, any pair of int-convertible values is accepted: a tuple or list,
    a 1-D tensor or array of two integers (upstream's tests pass
    ``torch.randint(0, seqlen_k, (2,))``), numpy integers. Floats and bools are not.
    """
    if type(window_size) is tuple and window_size == (-1, -1):
        return -1, -1  # the default, on every call: no need to look closer
    try:
        if getattr(window_size, "ndim", 1) != 1 or isinstance(window_size, (str, bytes)):
            raise TypeError
        items = list(window_size)  # a tuple, list, 1-D tensor or array
        if len(items) != 2 or not all(_is_integer(w) for w in items):
            raise TypeError
        left, right = (operator.index(w) for w in items)
    except TypeError:
        raise InputError(
            "window_size must be a pair (left, right) of ints, -1 meaning unbounded; "
            f"got {window_size!r}"
        ) from None
    return max(left, -1), max(right, -1)


def _is_integer(value: object) -> bool:
    """An int, or an integer scalar of torch or numpy; not a bool or a float."""
    if isinstance(value, (bool, float)):
        return False
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return isinstance(value, int) or hasattr(value, "__index__")
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return getattr(dtype, "kind", "") in ("i", "u")  # numpy: signed or unsigned integer


# --- 2. shapes, ranks, dtypes -----------------------------------------------


def _check_rank(name: str, t: object, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor {layout}; got {type(t).__name__}")
    if t.dim() != ndim:
        raise InputError(
            f"{name} must have {ndim} dimensions {layout}; got {t.dim()} with shape {_shape(t)}"
        )


def _check_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(
            f"q, k and v must have the same dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if q.dtype not in DTYPE_NAMES:
        raise InputError(
            "flash_attn supports torch.float16 and torch.bfloat16 inputs only; "
            f"q, k and v have dtype {q.dtype}. Cast them, e.g. q.to(torch.bfloat16)."
        )


def _check_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layout: str
) -> tuple[int, int, int]:
    """Check head dims and head counts; return (nheads, nheads_k, head_dim)."""
    nheads, head_dim = q.shape[-2], q.shape[-1]
    if not (head_dim == k.shape[-1] == v.shape[-1]):
        raise InputError(
            "q, k and v must have the same head_dim (last dim); got "
            f"q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]}"
        )
    if head_dim <= 0 or head_dim > MAX_HEAD_DIM:
        raise InputError(f"head_dim {head_dim} is not supported: it must be in 1..{MAX_HEAD_DIM}")
    if _shape(k) != _shape(v):
        raise InputError(
            f"k and v must have the same shape {kv_layout}; got k {_shape(k)} and v {_shape(v)}"
        )
    nheads_k = k.shape[-2]
    if nheads <= 0 or nheads_k <= 0 or nheads % nheads_k != 0:
        raise InputError(
            f"the number of heads of q ({nheads}) must be a positive multiple of "
            f"that of k and v ({nheads_k}) (MQA/GQA)"
        )
    return nheads, nheads_k, head_dim


def _check_alibi(alibi_slopes: torch.Tensor | None, batch: int, nheads: int) -> None:
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor):
        raise InputError(
            f"alibi_slopes must be a tensor or None; got {type(alibi_slopes).__name__}"
        )
    if alibi_slopes.dtype != torch.float32:
        raise InputError(f"alibi_slopes must be float32; got {alibi_slopes.dtype}")
    if _shape(alibi_slopes) not in ((nheads,), (batch, nheads)):
        raise InputError(
            f"alibi_slopes must have shape (nheads,) = ({nheads},) or "
            f"(batch, nheads) = ({batch}, {nheads}); got {_shape(alibi_slopes)}"
        )


def _heads_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    nheads: int,
    nheads_k: int,
    head_dim: int,
    kv_head_dim: int,
) -> bool:
    """What _check_dtypes and _check_heads accept, given the sizes (k and v of one
    shape): the fast paths' common test."""
    dtype = q.dtype
    return (
        dtype is k.dtype
        and dtype is v.dtype
        and dtype in DTYPE_NAMES
        and kv_head_dim == head_dim
        and 0 < head_dim <= MAX_HEAD_DIM
        and nheads > 0
        and nheads_k > 0
        and nheads % nheads_k == 0
    )


def _dense_fast(q: object, k: object, v: object) -> AttnShape | None:
    """The shape of a dense call that passes every check of check_dense (without
    alibi_slopes), in a few attribute reads; None where any check might fail, and
    check_dense then runs them one by one for the message. (A decode step calls this
    once a layer: the full checks cost several microseconds of host time.)"""
    if not (
        isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    ):
        return None
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4 or ks != v.shape:
        return None
    batch, seqlen_q, nheads, head_dim = qs
    if not (
        ks[0] == batch and batch > 0 and _heads_fast(q, k, v, nheads, ks[2], head_dim, ks[3])
    ):
        return None
    return AttnShape(batch, seqlen_q, ks[1], nheads, ks[2], head_dim, q.dtype)


def check_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
) -> AttnShape:
    """Validate q (batch, seqlen_q, nheads, d) and k, v (batch, seqlen_k, nheads_k, d)."""
    if alibi_slopes is None:
        shape = _dense_fast(q, k, v)
        if shape is not None:
            return shape
    # the checks in turn, raising at the first that fails
    _check_rank("q", q, 4, "(batch, seqlen_q, nheads, head_dim)")
    _check_rank("k", k, 4, "(batch, seqlen_k, nheads_k, head_dim)")
    _check_rank("v", v, 4, "(batch, seqlen_k, nheads_k, head_dim)")
    _check_dtypes(q, k, v)
    nheads, nheads_k, head_dim = _check_heads(q, k, v, "(batch, seqlen_k, nheads_k, head_dim)")
    batch = q.shape[0]
    if k.shape[0] != batch:
        raise InputError(f"q and k must have the same batch size; got q {batch}, k {k.shape[0]}")
    if batch <= 0:
        raise InputError(f"batch size must be positive; got {batch}")
    _check_alibi(alibi_slopes, batch, nheads)
    return AttnShape(batch, q.shape[1], k.shape[1], nheads, nheads_k, head_dim, q.dtype)


def _check_cu_seqlens(name: str, cu: object) -> int:
    """Validate one cu_seqlens tensor; return the batch size it describes."""
    if not isinstance(cu, torch.Tensor):
        raise InputError(
            f"{name} must be a 1-D int32 tensor of length batch + 1; got {type(cu).__name__}"
        )
    if cu.dtype != torch.int32:
        raise InputError(
            f"{name} must be a 1-D int32 tensor of length batch + 1; got dtype "
            f"{cu.dtype} (convert with .to(torch.int32))"
        )
    if cu.dim() != 1:
        raise InputError(
            f"{name} must be a 1-D int32 tensor of length batch + 1; got shape {_shape(cu)}"
        )
    if cu.shape[0] < 2:
        raise InputError(
            f"{name} must have length batch + 1 >= 2 (a leading 0, then the "
            f"cumulative lengths); got length {cu.shape[0]}"
        )
    return cu.shape[0] - 1


def _check_max_seqlen(name: str, value: object) -> int:
    try:
        if isinstance(value, (bool, float)):
            raise TypeError
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{name} must be an int; got {type(value).__name__} {value!r}") from None
    if n < 0:
        raise InputError(f"{name} must be >= 0; got {n}")
    return n


def _varlen_fast(
    q: object, k: object, v: object, cu_q: object, cu_k: object, max_q: object, max_k: object
) -> AttnShape | None:
    """check_varlen's verdict in a few attribute reads where every check passes (no
    alibi_slopes); None where any might fail (check_varlen then runs them one by one)."""
    if not (
        isinstance(q, torch.Tensor)
        and isinstance(k, torch.Tensor)
        and isinstance(v, torch.Tensor)
        and isinstance(cu_q, torch.Tensor)
        and isinstance(cu_k, torch.Tensor)
        and type(max_q) is int
        and type(max_k) is int
    ):
        return None
    qs, ks, cqs = q.shape, k.shape, cu_q.shape
    if len(qs) != 3 or len(ks) != 3 or ks != v.shape or len(cqs) != 1 or cu_k.shape != cqs:
        return None
    nheads, head_dim = qs[1], qs[2]
    if not (
        cu_q.dtype is torch.int32
        and cu_k.dtype is torch.int32
        and cqs[0] >= 2
        and max_q >= 0
        and max_k >= 0
        and _heads_fast(q, k, v, nheads, ks[1], head_dim, ks[2])
    ):
        return None
    return AttnShape(cqs[0] - 1, max_q, max_k, nheads, ks[1], head_dim, q.dtype)


def check_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
) -> AttnShape:
    """Validate q (total_q, nheads, d), k, v (total_k, nheads_k, d) and cu_seqlens."""
    if alibi_slopes is None:
        shape = _varlen_fast(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        if shape is not None:
            return shape
    # the checks in turn, raising at the first that fails
    _check_rank("q", q, 3, "(total_q, nheads, head_dim)")
    _check_rank("k", k, 3, "(total_k, nheads_k, head_dim)")
    _check_rank("v", v, 3, "(total_k, nheads_k, head_dim)")
    _check_dtypes(q, k, v)
    nheads, nheads_k, head_dim = _check_heads(q, k, v, "(total_k, nheads_k, head_dim)")
    batch = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    batch_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if batch != batch_k:
        raise InputError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1); "
            f"got {batch + 1} and {batch_k + 1}"
        )
    seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    _check_alibi(alibi_slopes, batch, nheads)
    return AttnShape(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, q.dtype)


def check_packed(name: str, packed: object, count: int, layout: str) -> None:
    """Validate a packed qkv (count 3) or kv (count 2) tensor before unbinding it."""
    ndim = layout.count(",") + 1
    _check_rank(name, packed, ndim, layout)
    assert isinstance(packed, torch.Tensor)
    if packed.shape[-3] != count:
        raise InputError(
            f"{name} must have shape {layout}; got {_shape(packed)} "
            f"(dim {packed.dim() - 3} is {packed.shape[-3]}, not {count})"
        )


# --- 3. devices -------------------------------------------------------------


def _one_device(tensors: Mapping[str, torch.Tensor | None]) -> torch.device | None:
    """The device of the given tensors where they share one of DEVICE_TYPES; None
    otherwise (check_devices then says what is wrong)."""
    device = None
    for t in tensors.values():
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            return None
    return device if device is not None and device.type in DEVICE_TYPES else None


def check_devices(tensors: Mapping[str, torch.Tensor | None]) -> torch.device:
    """All given tensors on one CUDA device; return it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise DeviceError(f"all inputs must be on the same CUDA device; got {where}")
    (device,) = devices
    if device.type not in DEVICE_TYPES:
        raise DeviceError(
            f"flash_attn runs on CUDA GPUs only; the inputs are on {device}. "
            "Move them to a GPU, e.g. q.to('cuda')."
        )
    return device


# --- 4. the environment -----------------------------------------------------


def check_capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability; raise if older than sm80."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise DeviceError(
            "flash_attn needs an Ampere (sm80) or newer GPU; "
            f"found sm{major}{minor} ({name}) on {device}"
        )
    return major, minor


def check_build(
    info: BuildInfo,
    *,
    head_dim: int,
    dtype: torch.dtype,
    needs_backward: bool,
    capability: tuple[int, int] | None = None,
) -> None:
    """Raise KernelNotBuiltError (a BuildError) unless the build holds the kernels this
    call needs."""
    dtype_name = DTYPE_NAMES[dtype]
    if dtype_name not in info.dtypes:
        wanted = [n for n in DTYPE_NAMES.values() if n in info.dtypes or n == dtype_name]
        others = [str(d) for d, n in DTYPE_NAMES.items() if n in info.dtypes]
        raise KernelNotBuiltError(
            f"this flash_attn build has no {dtype_name} kernels ({dtype}): it was "
            f"built with {DTYPES_KNOB}={','.join(info.dtypes)}. Rebuild with "
            f"{DTYPES_KNOB}={','.join(wanted)}"
            + (f", or cast the inputs to {' or '.join(others)}." if others else ".")
        )
    padded = padded_head_dim(head_dim)
    if info.bucket_for(padded) is None:
        bucket = needed_bucket(padded)
        wanted_dims = sorted({*info.head_dims, *([bucket] if bucket else [])})
        largest = max(info.head_dims, default=None)
        raise KernelNotBuiltError(
            f"this flash_attn build has no kernel for head_dim {head_dim}: it was "
            f"built with {HEAD_DIMS_KNOB}={','.join(map(str, info.head_dims))}"
            + (f" (largest bucket {largest})" if largest is not None else "")
            + f". Rebuild with {HEAD_DIMS_KNOB}={','.join(map(str, wanted_dims))} "
            f"(buckets: {', '.join(map(str, HEAD_DIM_BUCKETS))})."
        )
    if needs_backward and not info.backward:
        raise KernelNotBuiltError(
            f"this flash_attn build has no backward kernels (built with "
            f"{BACKWARD_KNOB}=0), and q, k or v requires grad. Rebuild with "
            f"{BACKWARD_KNOB}=1, or run the forward under torch.no_grad() or on "
            "tensors that do not require grad."
        )
    if capability is not None:
        _check_arch(info, capability)


@functools.lru_cache(maxsize=64)
def _runs_on(info: BuildInfo, capability: tuple[int, int]) -> bool | None:
    """info.runs_on, parsed once per (build, GPU) instead of on every call."""
    return info.runs_on(capability)


def _check_arch(info: BuildInfo, capability: tuple[int, int]) -> None:
    if _runs_on(info, tuple(capability)) is not False:  # type: ignore[arg-type]
        return  # it does, or the arch list is spelled in a way we do not know
    major, minor = capability
    raise KernelNotBuiltError(
        f"this flash_attn build has no code for this GPU (sm{major}{minor}): it was "
        f"built with {ARCHS_KNOB}={';'.join(info.cuda_archs)}. Rebuild with "
        f"{ARCHS_KNOB}={';'.join([*info.cuda_archs, f'{major}{minor}'])}."
    )


def check_environment(
    device: torch.device, dtype: torch.dtype, head_dim: int, needs_backward: bool
) -> None:
    """The extension loads, the GPU is new enough, the build has the kernels."""
    _ops.require()
    capability = check_capability(device)
    check_build(
        _ops.build_info(),
        head_dim=head_dim,
        dtype=dtype,
        needs_backward=needs_backward,
        capability=capability,
    )


@torch.compiler.assume_constant_result
def environment_ready(device: torch.device, dtype: torch.dtype, needs_backward: bool) -> bool:
    """Whether check_environment passes for any head_dim up to the largest
    compiled bucket. Constant to torch.compile, so it takes no (symbolic) sizes."""
    try:
        _ops.require()
        capability = check_capability(device)
        return _build_ready(_ops.build_info(), dtype, needs_backward, tuple(capability))
    except Exception:  # check_launch calls check_environment again to raise
        return False


@functools.lru_cache(maxsize=256)
def _build_ready(
    info: BuildInfo, dtype: torch.dtype, needs_backward: bool, capability: tuple[int, ...]
) -> bool:
    """check_build for the smallest head_dim, answered once per (build, dtype,
    direction, GPU): environment_ready runs on every call."""
    try:
        check_build(
            info,
            head_dim=1,
            dtype=dtype,
            needs_backward=needs_backward,
            capability=capability,  # type: ignore[arg-type]
        )
    except Exception:
        return False
    return True


@torch.compiler.assume_constant_result
def largest_compiled_head_dim() -> int:
    """The largest head-dim bucket the loaded build has (0 if it does not load)."""
    try:
        return max(_ops.build_info().head_dims, default=0)
    except Exception:
        return 0


# The environments that passed: (extension, device, dtype, needs_backward) -> the
# largest head_dim bucket of the build. A process's GPUs, extension and build do not
# change, so a positive verdict is kept (the capability query alone costs ~2.5 us a
# call); a negative one is not. Tests that pretend the environment changed call
# forget_environment().
_READY: dict[tuple[object, torch.device, torch.dtype, bool], int] = {}


def forget_environment() -> None:
    """Drop the kept verdicts of ready_head_dim."""
    _READY.clear()


@torch.compiler.assume_constant_result
def ready_head_dim(device: torch.device, dtype: torch.dtype, needs_backward: bool) -> int:
    """The largest head_dim bucket this environment runs for device, dtype and
    direction; 0 where environment_ready says it does not."""
    key = (_ops.current(), device, dtype, needs_backward)
    largest = _READY.get(key)
    if largest is None:
        largest = largest_compiled_head_dim() if environment_ready(*key[1:]) else 0
        if largest > 0:
            _READY[key] = largest
    return largest


def check_launch(
    tensors: Mapping[str, torch.Tensor | None], shape: AttnShape, needs_backward: bool
) -> None:
    """Devices, then the environment; raise the first problem found.

    Written for torch.compile: the environment is checked through constant
    functions, so tracing adds no graph break.
    """
    device = _one_device(tensors) or check_devices(tensors)
    if padded_head_dim(shape.head_dim) > ready_head_dim(device, shape.dtype, needs_backward):
        check_environment(device, shape.dtype, shape.head_dim, needs_backward)
