"""Microseconds per call spent in flash_attn's Python layer, on any machine.

The ops are replaced by null CPU ops (they allocate the outputs and return), so
what is timed is the Python layer alone: validation, layout, autograd, dispatch.
The inputs are decode-shaped CPU tensors (batch 8, one query token, 32/8 heads,
head_dim 128, 1024 keys).

    python benchmarks/bench_overhead.py [--number 2000] [--repeat 7] [--json out.json]

Reports the best of --repeat rounds of --number calls (timeit's convention), per
entry point; the null op's own cost is reported as "op only".
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import flash_attn
from flash_attn import _checks, _ops

NAMESPACE = "flash_attn_null_ops"
BUILD = {
    "head_dims": [32, 64, 96, 128, 160, 192, 224, 256],
    "dtypes": ["fp16", "bf16"],
    "backward": True,
    "cuda_archs": ["80", "90a", "100"],
}
_LIBRARY: list[torch.library.Library] = []


def _null_fwd(q: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dim() == 4:
        batch, seqlen_q, nheads, _ = q.shape
        return torch.empty_like(q), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _null_fwd_kv(q: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    verdict = args[18]  # the device check's verdict buffer (None: checked on the host)
    if isinstance(verdict, torch.Tensor):
        verdict.zero_()  # "all values in range", as the device check says of good ones
    return _null_fwd(q)


def _null_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _null_dropout_mask(
    rng_state: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, p: float
) -> torch.Tensor:
    return rng_state.new_ones((batch, nheads, seqlen_q, seqlen_k), dtype=torch.uint8)


def _define() -> object:
    if not _LIBRARY:
        lib = torch.library.Library(NAMESPACE, "DEF")
        lib.define(_ops.FWD_SCHEMA)
        lib.define(_ops.FWD_KV_SCHEMA)
        lib.define(_ops.BWD_SCHEMA)
        lib.define(_ops.DROPOUT_MASK_SCHEMA)
        lib.define(_ops.BUILD_INFO_SCHEMA)
        lib.impl("fwd", _null_fwd, "CPU")
        lib.impl("fwd_kv", _null_fwd_kv, "CPU")
        lib.impl("bwd", _null_bwd, "CPU")
        lib.impl("dropout_mask", _null_dropout_mask, "CPU")
        lib.impl("build_info", lambda: json.dumps(BUILD), "CompositeExplicitAutograd")
        _LIBRARY.append(lib)
    return _LIBRARY[0]


def install_null_ops() -> None:
    """Route flash_attn to the null ops and let CPU tensors through its checks."""
    _ops._EXTENSION = _ops.Extension(namespace=NAMESPACE, importer=_define)
    _checks.DEVICE_TYPES = ("cuda", "cpu")
    _checks.check_capability = lambda device: (9, 0)  # type: ignore[assignment]
    _ops.require()


@dataclass
class Row:
    name: str
    us_per_call: float


def per_call_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def cases() -> dict[str, Callable[[], object]]:
    dt = torch.bfloat16
    batch, seqlen_k, nheads, nheads_k, d = 8, 1024, 32, 8, 128
    q = torch.randn(batch, 1, nheads, d, dtype=dt)
    k = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dt)
    v = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dt)
    cu_q = torch.arange(batch + 1, dtype=torch.int32)
    cu_k = torch.arange(batch + 1, dtype=torch.int32) * seqlen_k
    qv, kv_, vv = q.view(batch, nheads, d), k.view(-1, nheads_k, d), v.view(-1, nheads_k, d)
    k_new = torch.randn(batch, 1, nheads_k, d, dtype=dt)
    seqlens = torch.full((batch,), seqlen_k // 2, dtype=torch.int32)
    ops = _ops.current().ops()
    found: dict[str, Callable[[], object]] = {
        "op only (null fwd)": lambda: ops.fwd(
            q, k, v, None, None, 1, seqlen_k, 0.1, -1, 0, 0.0, None, 0.0, None
        ),
        "flash_attn_func causal": lambda: flash_attn.flash_attn_func(q, k, v, causal=True),
        "flash_attn_varlen_func causal": lambda: flash_attn.flash_attn_varlen_func(
            qv, kv_, vv, cu_q, cu_k, 1, seqlen_k, causal=True
        ),
    }
    try:
        flash_attn.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    except NotImplementedError:
        return found
    found["flash_attn_with_kvcache (no append)"] = lambda: flash_attn.flash_attn_with_kvcache(
        q, k, v, cache_seqlens=seqlens, causal=True
    )
    found["flash_attn_with_kvcache (append k, v)"] = lambda: flash_attn.flash_attn_with_kvcache(
        q, k, v, k_new, k_new, cache_seqlens=seqlens, causal=True
    )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    install_null_ops()
    rows = []
    with torch.no_grad():
        for name, fn in cases().items():
            rows.append(Row(name, per_call_us(fn, args.number, args.repeat)))
    print("| call (no grad, null op) | us per call |\n|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.us_per_call:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
