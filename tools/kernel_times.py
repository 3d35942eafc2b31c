"""Per-kernel GPU time of one forward+backward, from torch.profiler.

    python tools/kernel_times.py --hdim 128 --seqlen 16384 [--causal]

With --once, a single forward+backward and nothing else, for ncu:

    ncu --clock-control none --section WarpStateStats --section ComputeWorkloadAnalysis \
        -k regex:fwd -c 1 python tools/kernel_times.py --once --hdim 128 --seqlen 4096

The shape is the benchmark's: 16k tokens per batch, hidden 2048, bf16.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from flash_attn import flash_attn_func


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--once", action="store_true", help="one step, no profiler (for ncu)")
    args = ap.parse_args()
    batch, nheads = 16384 // args.seqlen, 2048 // args.hdim
    q, k, v = (
        torch.randn(
            batch,
            args.seqlen,
            nheads,
            args.hdim,
            device="cuda",
            dtype=torch.bfloat16,
            requires_grad=True,
        )
        for _ in range(3)
    )
    dout = torch.randn_like(q)

    def step() -> None:
        out = flash_attn_func(q, k, v, causal=args.causal)
        out.backward(dout)

    if args.once:
        step()
        torch.cuda.synchronize()
        return
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] += e.device_time / args.reps
    print(f"hdim {args.hdim} seqlen {args.seqlen} causal {args.causal}: us per step")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {us:9.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
