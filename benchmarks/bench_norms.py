"""Fused dropout + residual add + LayerNorm (flash_attn.ops.triton.layer_norm.layer_norm_fn)
against the same computation in eager PyTorch and under torch.compile, in one run.

    python benchmarks/bench_norms.py [--hiddens 1024,4096,8192] [--tokens 16384]
        [--dtypes fp16,bf16] [--dropout 0.1] [--no-compile] [--json out.json]

Each case computes ``s = dropout(x) + residual; y = layer_norm(s) * w + b`` and returns
``(y, s)`` (prenorm), once with dropout 0 and once with ``--dropout``. GB/s counts the
bytes the computation must move at least, the same for every implementation: forward
reads x and residual and writes y and s (4 tensors of tokens x hidden); forward+backward
adds reading dy, ds and s and writing dx and dresidual (5 more). Times are medians of
CUDA-event timings after warm-up. GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from flash_attn.ops.triton.layer_norm import layer_norm_fn

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    impl: str
    hidden: int
    dtype: str
    dropout_p: float
    fwd_ms: float
    fwd_gbps: float
    fwd_bwd_ms: float
    fwd_bwd_gbps: float


def time_ms(fn: Callable[[], object], reps: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def eager(x, residual, weight, bias, p: float):
    s = F.dropout(x, p=p, training=True) + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, 1e-6), s


def fused(x, residual, weight, bias, p: float):
    return layer_norm_fn(x, weight, bias, residual=residual, eps=1e-6, dropout_p=p, prenorm=True)


def measure(impl: str, fn, tokens: int, hidden: int, dtype_name: str, p: float) -> Row:
    dt = DTYPES[dtype_name]
    x = torch.randn(tokens, hidden, device="cuda", dtype=dt, requires_grad=True)
    res = torch.randn(tokens, hidden, device="cuda", dtype=dt, requires_grad=True)
    w = torch.randn(hidden, device="cuda", dtype=dt, requires_grad=True)
    b = torch.randn(hidden, device="cuda", dtype=dt, requires_grad=True)
    dy, ds = torch.randn_like(x), torch.randn_like(x)

    def forward() -> object:
        with torch.no_grad():
            return fn(x, res, w, b, p)

    def forward_backward() -> None:
        y, s = fn(x, res, w, b, p)
        torch.autograd.backward((y, s), (dy, ds))

    fwd = time_ms(forward)
    fwd_bwd = time_ms(forward_backward)
    one = tokens * hidden * x.element_size()
    return Row(impl, hidden, dtype_name, p, fwd, 4 * one / fwd / 1e6, fwd_bwd,
               9 * one / fwd_bwd / 1e6)  # fmt: skip


def table(rows: list[Row]) -> str:
    head = ("| hidden | dtype | dropout | impl | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s "
            "| fwd vs eager | fwd+bwd vs eager |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    eager_rows = {(r.hidden, r.dtype, r.dropout_p): r for r in rows if r.impl == "eager"}
    for r in rows:
        base = eager_rows.get((r.hidden, r.dtype, r.dropout_p))
        f = f"{base.fwd_ms / r.fwd_ms:.2f}x" if base else "-"
        fb = f"{base.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x" if base else "-"
        lines.append(
            f"| {r.hidden} | {r.dtype} | {r.dropout_p:g} | {r.impl} | {r.fwd_ms:.3f} | "
            f"{r.fwd_gbps:.0f} | {r.fwd_bwd_ms:.3f} | {r.fwd_bwd_gbps:.0f} | {f} | {fb} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hiddens", default="1024,4096,8192")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--dropout", type=float, default=0.1, help="the p of the dropout cases")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA GPU")
    hiddens = [int(h) for h in args.hiddens.split(",")]
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    if not 0.0 < args.dropout < 1.0:
        ap.error(f"--dropout is {args.dropout}; valid: 0 < p < 1")

    impls: dict[str, Callable] = {"ours": fused, "eager": eager}
    if not args.no_compile:
        torch._dynamo.config.cache_size_limit = 64
        impls["torch.compile"] = torch.compile(eager, dynamic=False)
    rows = []
    for hidden in hiddens:
        for d in dtypes:
            for p in (0.0, args.dropout):
                for name, fn in impls.items():
                    rows.append(measure(name, fn, args.tokens, hidden, d, p))
                    print(f"# {rows[-1]}", flush=True)
    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}, torch {torch.__version__}, {args.tokens} tokens\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "tokens": args.tokens,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
