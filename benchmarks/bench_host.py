"""Host time per call on a GPU machine: what a host-bound caller (eager decode, small
batches) pays for each call before the GPU does anything.

    python benchmarks/bench_host.py [--calls 3000] [--json out.json]

Each row is the best of 3 rounds of --calls calls issued back to back (no sync inside a
round; the GPU keeps up at these sizes), in microseconds per call:

* attention at a decode shape (one query token, 8/2 heads, head_dim 64, 200 keys, q/k/v as
  transformers hands them: transposed views of (batch, heads, seq, dim)): our
  flash_attn_func and its compiled op alone, against torch's scaled_dot_product_attention;
* where transformers is installed, its two attention integrations, which a Llama layer
  calls: ``flash_attention_forward`` (the flash_attention_2 path, over our flash_attn) with
  and without ``position_ids``, and ``sdpa_attention_forward``;
* the fused RMSNorm with a residual (8 x 2048, prenorm): ours, Triton's launch of its kernel
  alone, and eager ``F.rms_norm(x + residual)``.

bench_overhead.py measures our Python layer alone on any machine (null ops).
"""

from __future__ import annotations

import argparse
import json
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from _timing import host_us_rounds

import flash_attn
from flash_attn import _ops

DT = torch.bfloat16
HEADS, KV_HEADS, HEAD_DIM, KEYS = 8, 2, 64, 200


@dataclass
class Row:
    group: str
    call: str
    batch: int
    us_per_call: float


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(50):  # warm-up
        fn()
    return min(host_us_rounds(fn, calls, rounds=3))


def attention_calls(batch: int) -> dict[str, Callable[[], object]]:
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=DT)
    k = torch.randn(batch, KV_HEADS, KEYS, HEAD_DIM, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = HEAD_DIM**-0.5
    ops = _ops.current().ops()
    window = (-1, 0)  # causal, bottom-right: the op's arguments for one query token
    calls: dict[str, Callable[[], object]] = {
        "flash_attn_func": lambda: flash_attn.flash_attn_func(
            qt, kt, vt, causal=True, softmax_scale=scale
        ),
        "its op alone (torch.ops.flash_attn.fwd)": lambda: ops.fwd(
            qt, kt, vt, None, None, 1, KEYS, scale, *window, 0.0, None, 0.0, None
        ),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(
            q, k, v, scale=scale, enable_gqa=True
        ),
    }
    try:
        from transformers.integrations.flash_attention import flash_attention_forward
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return calls
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = HEADS // KV_HEADS
    module.layer_idx = 0
    module.config = types.SimpleNamespace(_attn_implementation="flash_attention_2")
    pos = torch.full((batch, 1), KEYS - 1, device="cuda", dtype=torch.long)
    calls.update({
        "transformers flash_attention_forward": lambda: flash_attention_forward(
            module, q, k, v, None, scaling=scale, position_ids=pos
        ),
        "transformers flash_attention_forward, no position_ids": lambda: flash_attention_forward(
            module, q, k, v, None, scaling=scale
        ),
        "transformers sdpa_attention_forward": lambda: sdpa_attention_forward(
            module, q, k, v, None, scaling=scale, position_ids=pos
        ),
    })  # fmt: skip
    return calls


def norm_calls() -> dict[str, Callable[[], object]]:
    try:
        from flash_attn.ops.triton import _layer_norm_kernels as kernels
        from flash_attn.ops.triton.layer_norm import rms_norm_fn
    except ImportError:
        return {}
    rows, n = 8, 2048
    x = torch.randn(rows, n, device="cuda", dtype=DT)
    res, w = torch.randn_like(x), torch.randn(n, device="cuda", dtype=DT)
    y, s = torch.empty_like(x), torch.empty_like(x)
    stats = torch.empty(rows, device="cuda", dtype=torch.float32)
    cfg = kernels.forward_config(n, False)
    grid = (kernels._cdiv(rows, cfg.rows),)

    def launch_alone() -> None:
        kernels._norm_fwd_kernel[grid](
            x, None, res, None, w, None, None, None, None, y, None, s, None, None, stats,
            n, 0, n, rows, n, 1e-6, 0.0, BLOCK_N=cfg.block_n, ROWS=cfg.rows, IS_RMS=True,
            ZERO_CENTERED=False, num_warps=cfg.warps,
        )  # fmt: skip

    return {
        "rms_norm_fn (residual, prenorm)": lambda: rms_norm_fn(
            x, w, None, residual=res, prenorm=True
        ),
        "Triton's launch of its kernel alone": launch_alone,
        "eager F.rms_norm(x + residual)": lambda: F.rms_norm(x + res, (n,), w),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA GPU (bench_overhead.py runs anywhere)")
    rows: list[Row] = []
    with torch.no_grad():
        for batch in (1, 8):
            for name, fn in attention_calls(batch).items():
                rows.append(Row("attention", name, batch, per_call_us(fn, args.calls)))
        for name, fn in norm_calls().items():
            rows.append(Row("norm", name, 8, per_call_us(fn, args.calls)))
    print(f"host us per call ({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    print("| group | call | batch | us |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r.group} | {r.call} | {r.batch} | {r.us_per_call:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "rows": [asdict(r) for r in rows]}, f, indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    main()
