"""A small forward and backward for compute-sanitizer (memcheck):
odd lengths, causal + window, GQA, varlen with an empty sequence, padded head dim.

    compute-sanitizer --tool memcheck python tools/sanitizer_case.py
"""

import torch

from flash_attn import flash_attn_func, flash_attn_varlen_func


def main() -> None:
    torch.manual_seed(0)
    dt = torch.bfloat16
    for hdim in (59, 128, 256):
        q = torch.randn(2, 77, 4, hdim, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(2, 131, 2, hdim, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(2, 131, 2, hdim, device="cuda", dtype=dt, requires_grad=True)
        out = flash_attn_func(q, k, v, causal=True, window_size=(40, 0), softcap=10.0)
        out.sum().backward()
    lens = [3, 0, 70, 1]
    cu = torch.tensor([0, 3, 3, 73, 74], device="cuda", dtype=torch.int32)
    q = torch.randn(sum(lens), 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(sum(lens), 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn(sum(lens), 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    out.sum().backward()
    torch.cuda.synchronize()
    print("sanitizer case ran")


if __name__ == "__main__":
    main()
