"""One forward and backward on a benchmark shape, for ncu:

    ncu --clock-control none --section WarpStateStats --section ComputeWorkloadAnalysis \
        -k regex:fwd_kernel -c 1 python tools/profile_case.py --hdim 128
"""

import argparse

import torch

from flash_attn import flash_attn_func


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--causal", action="store_true")
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
    out = flash_attn_func(q, k, v, causal=args.causal)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
