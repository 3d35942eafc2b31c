"""The compiled extension: importing it on first use, calling its ops, and the fake
implementations that let torch.compile trace through them.

``flash_attn._C`` registers ``torch.ops.flash_attn.{fwd,fwd_kv,bwd,dropout_mask,build_info}``
from C++ (CUDA dispatch key). Importing ``flash_attn`` never imports it: the first attention
call does, and a failure is reported then, with what to do about it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flash_attn._build_info import BuildInfo
from flash_attn.errors import ExtensionNotBuiltError

EXTENSION_MODULE = "flash_attn._C"
NAMESPACE = "flash_attn"

# The op schemas the binding registers (without the namespace).
FWD_SCHEMA = (
    "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
    "int window_right, float softcap, Tensor? alibi_slopes, float dropout_p, "
    "Tensor? rng_state) -> (Tensor out, Tensor softmax_lse)"
)
BWD_SCHEMA = (
    "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
    "float softmax_scale, int window_left, int window_right, float softcap, "
    "Tensor? alibi_slopes, bool deterministic, float dropout_p, Tensor? rng_state) "
    "-> (Tensor dq, Tensor dk, Tensor dv)"
)
DROPOUT_MASK_SCHEMA = (
    "dropout_mask(Tensor rng_state, int batch, int nheads, int seqlen_q, int seqlen_k, "
    "float dropout_p) -> Tensor"
)
FWD_KV_SCHEMA = (
    "fwd_kv(Tensor q, Tensor(a!) k, Tensor(b!) v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
    "Tensor? seqused_k, Tensor? kv_batch_idx, Tensor? leftpad_k, Tensor? block_table, "
    "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
    "int window_right, float softcap, Tensor? alibi_slopes, int num_splits, "
    "Tensor? k_new=None, Tensor? v_new=None, Tensor(c!)? verdict=None, int max_keys=-1) "
    "-> (Tensor out, Tensor softmax_lse)"
)
BUILD_INFO_SCHEMA = "build_info() -> str"

# fwd_kv's verdict bits (flash_api.h, FLASH_KV_BAD_*): which index values failed.
KV_BAD_KEYS, KV_BAD_ROW, KV_BAD_LEFTPAD, KV_BAD_PAGE = 1, 2, 4, 8

# The ops the extension must register (an extension without one of them is refused).
REQUIRED_OPS = ("fwd", "fwd_kv", "bwd", "dropout_mask", "build_info")


def _import_compiled() -> object:
    return importlib.import_module(EXTENSION_MODULE)


@dataclass(eq=False)
class Extension:
    """Where the ops live and what importing them gave.

    ``importer`` imports the module that registers the ops in ``namespace``. Tests
    swap in a CPU stand-in by replacing the module-level instance. Compared and hashed
    by identity (each instance is one load of the ops; _checks keys verdicts by it).
    """

    namespace: str = NAMESPACE
    importer: Callable[[], object] = _import_compiled
    attempted: bool = False
    error: str = ""
    build_info: BuildInfo | None = field(default=None, repr=False)

    def load(self) -> str:
        """Import once; return "" when the ops are ready, else why they are not."""
        if not self.attempted:
            self.attempted = True
            self.error = self._import()
        return self.error

    def _import(self) -> str:
        try:
            self.importer()
        except Exception as exc:  # an ImportError, or an OSError from the loader
            return f"{type(exc).__name__}: {exc}"
        ops = getattr(torch.ops, self.namespace)
        missing = [n for n in REQUIRED_OPS if not hasattr(ops, n)]
        if missing:
            return (
                f"it imported but did not register torch.ops.{self.namespace}."
                f"{', '.join(missing)} (an extension built from older sources than this "
                "Python package: rebuild it)"
            )
        register_fakes(self.namespace)
        return ""

    def ops(self) -> torch._ops._OpNamespace:
        return getattr(torch.ops, self.namespace)


_EXTENSION = Extension()


def current() -> Extension:
    return _EXTENSION


@torch.compiler.assume_constant_result
def load_error() -> str:
    """ "" when the extension is loaded, else the reason it is not.

    Marked constant so torch.compile runs it once while tracing instead of
    tracing into the import machinery.
    """
    return _EXTENSION.load()


def not_built_message(reason: str) -> str:
    return (
        f"flash_attn's compiled extension ({EXTENSION_MODULE}) could not be loaded: "
        f"{reason}. Every attention call needs it. Build it from a source checkout "
        "with `pip install --no-build-isolation .` (needs nvcc and a CUDA build of "
        "torch), or install a flash_attn wheel built for your torch and CUDA "
        "versions. An 'undefined symbol' error means it was built against another "
        f"torch or C++ ABI: rebuild it against the torch installed now "
        f"({torch.__version__})."
    )


def require() -> None:
    """Raise ExtensionNotBuiltError unless the extension is loaded."""
    reason = load_error()
    if reason:
        raise ExtensionNotBuiltError(not_built_message(reason))


def build_info() -> BuildInfo:
    """What the loaded extension was built with (parsed once)."""
    require()
    ext = _EXTENSION
    if ext.build_info is None:
        ext.build_info = BuildInfo.from_json(str(ext.ops().build_info()))
    return ext.build_info


def fwd(
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
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (out, softmax_lse).

    dropout_p in [0, 1): the probability of dropping each attention probability
    (after the softmax; the kept ones are scaled by 1 / (1 - dropout_p)). With
    dropout_p > 0, rng_state is the int64 (2,) tensor (seed, offset) on q's device
    that fixes the mask (see dropout_mask); with 0 it is ignored (None).
    softmax_lse is that of the scores before dropout either way.
    """
    return getattr(torch.ops, _EXTENSION.namespace).fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        dropout_p,
        rng_state,
    )


def fwd_kv(
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
    """The forward over a KV cache (inference only, no backward): (out, softmax_lse).

    q is dense (batch, seqlen_q, nheads, d) or varlen (total_q, nheads, d) with
    cu_seqlens_q. k and v are one of
    - dense (batch_cache, seqlen_cache, nheads_k, d); batch_cache >= batch when
      kv_batch_idx maps each batch entry to its cache row;
    - varlen (total_k, nheads_k, d) with cu_seqlens_k;
    - paged (num_pages, page_size, nheads_k, d) with block_table (batch,
      pages_per_seq) int32: key j of entry b is row j % page_size of page
      block_table[b, j // page_size]; page_size a multiple of 16. The lengths
      come from seqused_k, else cu_seqlens_k, else max_seqlen_k.
    seqused_k (batch,) int32: entry b has keys [0, seqused_k[b]) of its cache row,
    or with k_new [0, seqused_k[b] + seqlen_new): seqused_k then counts the keys
    before the append, as cache_seqlens does (it overrides cu_seqlens_k's lengths and
    seqlen_cache). leftpad_k (batch,) int32, dense only: entry b's keys start at
    leftpad_k[b]; the masks and ALiBi then see its keys less leftpad_k[b].
    max_seqlen_k bounds every entry's key count (dense: seqlen_cache; paged:
    pages_per_seq * page_size).
    num_splits: 0 lets the kernels choose, 1 never splits the keys, n > 1 splits
    them n ways (at most 128). The index tensors are int32 on q's device.

    k_new, v_new (batch, seqlen_new, nheads_k, d), both or neither, dense q, the caches'
    dtype: written into k and v in place (one kernel before the attention, or, where the
    sm_90 kernel reads the new rows from k_new / v_new itself, that kernel) as the last
    seqlen_new keys of each entry: row i of entry b at key seqused_k[b] + i (seqused_k
    absent: the row's capacity - seqlen_new + i) of its cache row or, paged,
    through block_table. A row whose key, cache row or page is out of range is skipped,
    whatever the values: nothing outside the caches is written.

    verdict (one int32 element in page-locked CPU memory): the index values are checked
    on the device before anything is written, and the call returns once that check is
    done (not the attention). Valid: every entry's keys (seqused_k, plus seqlen_new with
    k_new, else the lengths of cu_seqlens_k, else the capacity) in [seqlen_new if
    seqused_k is given else 0, max_keys] (max_keys < 0 or above the capacity: the
    capacity); kv_batch_idx in [0, dim 0 of k); leftpad_k in [0, keys]; the block_table
    entries of the pages the keys use in [0, num_pages). verdict[0] is then 0, or else
    nonzero (KV_BAD_* bits) and nothing was written: not the caches, not out or
    softmax_lse (undefined).
    """
    return getattr(torch.ops, _EXTENSION.namespace).fwd_kv(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_k,
        kv_batch_idx,
        leftpad_k,
        block_table,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        num_splits,
        k_new,
        v_new,
        verdict,
        max_keys,
    )


def bwd(
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
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (dq, dk, dv). dropout_p and rng_state must be
    those the forward got (the same rng_state tensor regenerates the same mask)."""
    return getattr(torch.ops, _EXTENSION.namespace).bwd(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        deterministic,
        dropout_p,
        rng_state,
    )


def dropout_mask(
    rng_state: torch.Tensor,
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
) -> torch.Tensor:
    """The keep mask that fwd and bwd apply for rng_state and dropout_p: uint8
    (batch, nheads, seqlen_q, seqlen_k) on rng_state's device, 1 = kept.

    Element (b, h, i, j) belongs to batch entry b, query head h, query i and key j
    counted within the sequence (for varlen: from cu_seqlens_q[b] / cu_seqlens_k[b];
    pass max_seqlen_q / max_seqlen_k, entries past a sequence are meaningless). It
    is the same whatever the layout, head dim or kernel path. P(drop) is
    min(round(dropout_p * 256), 255) / 256, as flash_attn 2.x's 8-bit threshold.
    """
    return getattr(torch.ops, _EXTENSION.namespace).dropout_mask(
        rng_state, batch, nheads, seqlen_q, seqlen_k, dropout_p
    )


# --- fake implementations: output metadata only -----------------------------


def fwd_fake(
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
    """out: q's shape and dtype; softmax_lse: float32, (batch, nheads, seqlen_q) or
    (nheads, total_q). Both contiguous, as the binding allocates them."""
    out = q.new_empty(q.shape)
    if cu_seqlens_q is None:
        batch, seqlen_q, nheads, _ = q.shape
        lse_shape = (batch, nheads, seqlen_q)
    else:
        total_q, nheads, _ = q.shape
        lse_shape = (nheads, total_q)
    return out, q.new_empty(lse_shape, dtype=torch.float32)


def fwd_kv_fake(
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
    """The same outputs as fwd's (the append writes into k and v, the check into
    verdict: no new tensor), after the binding's checks of k_new and v_new (a traced call
    fails as a real one)."""
    check_new_rows(q, k, v, cu_seqlens_q, k_new, v_new)
    return fwd_fake(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        0.0,
        None,
    )


def check_new_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
) -> None:
    """fwd_kv's checks of k_new and v_new as the binding makes them (csrc/binding/
    flash_ops.cpp, append_new_rows), with its messages: RuntimeError."""
    if k_new is None and v_new is None:
        return
    if k_new is None or v_new is None:
        raise RuntimeError("flash_attn: k_new and v_new go together: give both or neither")
    if cu_seqlens_q is not None:
        raise RuntimeError(
            "flash_attn: k_new and v_new need a dense q and a dense or paged cache (no "
            "cu_seqlens_q / cu_seqlens_k)"
        )
    if k_new.dim() != 4:
        raise RuntimeError(
            "flash_attn: k_new must have shape (batch, seqlen_new, nheads_k, head_dim), got "
            f"{list(k_new.shape)}"
        )
    batch, seqlen_new, nheads_k, head_dim = q.shape[0], k_new.shape[1], k.shape[-2], q.shape[-1]
    for name, t, cache, cache_name in (("k_new", k_new, k, "k"), ("v_new", v_new, v, "v")):
        if t.device != cache.device:
            raise RuntimeError(
                f"flash_attn: {name} is on {t.device} but the cache {cache_name} is on "
                f"{cache.device}"
            )
        if t.dtype != cache.dtype:
            raise RuntimeError(
                f"flash_attn: {name} has dtype {str(t.dtype).removeprefix('torch.')} but the "
                f"cache {cache_name} has {str(cache.dtype).removeprefix('torch.')}"
            )
        if tuple(t.shape) != (batch, seqlen_new, nheads_k, head_dim):
            raise RuntimeError(
                f"flash_attn: {name} must have shape (batch, seqlen_new, nheads_k, head_dim) = "
                f"({batch}, {seqlen_new}, {nheads_k}, {head_dim}) (seqlen_new: dim 1 of k_new), "
                f"got {list(t.shape)}"
            )


def bwd_fake(
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
    """dq, dk, dv: the shapes and dtypes of q, k, v, contiguous (as the binding)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def dropout_mask_fake(
    rng_state: torch.Tensor,
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
) -> torch.Tensor:
    """uint8 (batch, nheads, seqlen_q, seqlen_k) on rng_state's device, contiguous."""
    return rng_state.new_empty((batch, nheads, seqlen_q, seqlen_k), dtype=torch.uint8)


FAKES: dict[str, Callable[..., object]] = {
    "fwd": fwd_fake,
    "fwd_kv": fwd_kv_fake,
    "bwd": bwd_fake,
    "dropout_mask": dropout_mask_fake,
}


def register_fakes(namespace: str) -> list[str]:
    """Register the fakes for the ops of namespace that exist and lack one.

    Idempotent: an op that already has a Meta kernel (ours from an earlier call,
    or one registered in C++) is left alone. Returns the ops registered now.
    """
    registered = []
    ops = getattr(torch.ops, namespace)
    for name, fake in FAKES.items():
        qualname = f"{namespace}::{name}"
        if not hasattr(ops, name):
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
            continue
        torch.library.register_fake(qualname, fake)
        registered.append(qualname)
    return registered
