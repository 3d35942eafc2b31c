"""The stable-ABI binding against the classic one, side by side in one run.

Both bindings register ``torch.ops.flash_attn``, so each is measured in its own process
(a package directory holding flash_attn with that binding's ``_C``), in alternating
rounds (A B A B ...) so that clocks and other load fall on both alike:

    python benchmarks/bench_binding.py --package stable=/tmp/stable --package classic=/tmp/classic
        [--rounds 3] [--json out.json]

Per process:
- call overhead: back-to-back ``flash_attn_func`` forward calls at a launch-bound shape
  (batch 1, seqlen 128, 8 heads, head dim 64, bf16) and the same through the op itself
  (``torch.ops.flash_attn.fwd``), wall time per call after a sync (us);
- training shapes: forward and forward+backward, medians of CUDA-event timings (ms),
  bf16, 16k tokens, head dim 128, causal and not;
- decode: one query token per sequence, K/V read at GB/s, the shapes of the decode
  baseline (benchmarks/RESULTS.md).
The table gives the median over rounds per binding and the ratio of the second to the
first; the spread across rounds says what is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, statistics
import torch
from flash_attn import flash_attn_func
import flash_attn._C as ext

def events(fn, reps=30, warmup=5):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)

def per_call_us(fn, n=3000):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6

dev = "cuda"
res = {"module": ext.__file__.rsplit("/", 1)[-1], "torch": torch.__version__}
q = torch.randn(1, 128, 8, 64, device=dev, dtype=torch.bfloat16)
res["overhead_api_us"] = per_call_us(lambda: flash_attn_func(q, q, q))
op = torch.ops.flash_attn.fwd
args = (q, q, q, None, None, 128, 128, 0.125, -1, -1, 0.0, None)
res["overhead_op_us"] = per_call_us(lambda: op(*args))
for seqlen in (512, 2048, 8192):
    for causal in (False, True):
        b = 16384 // seqlen
        shape = (b, seqlen, 16, 128)
        x = [torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
             for _ in range(3)]
        g = torch.randn_like(x[0])
        key = f"train s{seqlen} {'causal' if causal else 'full'}"
        res[key + " fwd_ms"] = events(lambda: flash_attn_func(*x, causal=causal))
        def fb():
            out = flash_attn_func(*x, causal=causal)
            out.backward(g)
        res[key + " fwdbwd_ms"] = events(fb)
DECODE = ((1, 32768, 32, 8), (16, 8192, 32, 8), (64, 4096, 32, 8), (8, 65536, 8, 1))
for batch, seqlen_k, hq, hk in DECODE:
    qd = torch.randn(batch, 1, hq, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(batch, seqlen_k, hk, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ms = events(lambda: flash_attn_func(qd, k, v, causal=True))
    res[f"decode {batch}x{seqlen_k} {hq}/{hk} GB/s"] = 2 * k.numel() * 2 / (ms * 1e-3) / 1e9
print(json.dumps(res))
"""


def run_child(package: Path) -> dict[str, float | str]:
    env = {**os.environ, "PYTHONPATH": str(package)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=package, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark of {package} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", action="append", required=True, help="NAME=DIR, twice")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    packages = [tuple(p.split("=", 1)) for p in args.package]
    if len(packages) != 2 or any(len(p) != 2 for p in packages):
        raise SystemExit(f"--package NAME=DIR twice, got {args.package}")
    runs: dict[str, list[dict[str, float | str]]] = {name: [] for name, _ in packages}
    for r in range(args.rounds):
        order = packages if r % 2 == 0 else packages[::-1]
        for name, directory in order:
            runs[name].append(run_child(Path(directory)))
            print(f"round {r + 1}: {name} done", file=sys.stderr)
    (a, _), (b, _) = packages
    keys = [k for k, v in runs[a][0].items() if isinstance(v, float)]
    print(f"| measure | {a} (median, range) | {b} (median, range) | {b}/{a} |")
    print("|---|---|---|---|")
    table = {}
    for k in keys:
        va = [float(x[k]) for x in runs[a]]
        vb = [float(x[k]) for x in runs[b]]
        ma, mb = statistics.median(va), statistics.median(vb)
        table[k] = {a: va, b: vb}
        print(
            f"| {k} | {ma:.3g} ({min(va):.3g}-{max(va):.3g}) | "
            f"{mb:.3g} ({min(vb):.3g}-{max(vb):.3g}) | {mb / ma:.3f} |"
        )
    modules = {name: runs[name][0]["module"] for name in runs}
    print(f"\nmodules: {modules}; torch {runs[a][0]['torch']}; {args.rounds} rounds")
    if args.json:
        Path(args.json).write_text(json.dumps({"modules": modules, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
