"""Small forwards and backwards for compute-sanitizer: odd lengths, causal + window,
softcap, GQA, padded head dims, varlen with an empty sequence, and issue 10's shapes
(key blocks that no query sees, query blocks that see no key, one query per sequence
against ~147 keys). Batch and heads stay tiny: racecheck is slow.

Each case also checks what the kernels must write (tests/masked_parts.py: exact zeros
and +inf where a mask leaves nothing to compute, everything else finite), which reads
every output element (so initcheck sees unwritten ones). The last line is
`sanitizer_case: N cases, M problems`; the exit status is 1 when M > 0.

    compute-sanitizer --tool memcheck python3 tools/sanitizer_case.py
    compute-sanitizer --tool racecheck --kernel-name kns=_ZN5flash python3 tools/sanitizer_case.py
    python3 tools/sanitizer_case.py --list            # the cases
    python3 tools/sanitizer_case.py --only window0_0  # those whose name contains it
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from masked_parts import (  # noqa: E402  (tests/ on the path above)
    Outputs,
    dense_parts,
    masked_part_problems,
    varlen_parts,
)

BF16, FP16 = torch.bfloat16, torch.float16


@dataclass(frozen=True)
class Case:
    """One forward + backward: dense (batch, seqlens) or varlen (lens_q, lens_k)."""

    name: str
    hdim: int
    dtype: torch.dtype
    heads: tuple[int, int]  # nheads, nheads_k
    seqlens: tuple[int, int] = (0, 0)
    batch: int = 1
    lens_q: tuple[int, ...] = ()
    lens_k: tuple[int, ...] = ()
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0

    @property
    def varlen(self) -> bool:
        return bool(self.lens_q)


WINDOWS = [(0, 0), (16, 0), (100, 7)]
DECODE_Q, DECODE_K = (1, 1, 1, 1), (147, 146, 0, 1)
CASES = [
    *(
        Case(
            f"odd-hdim{d}",
            d,
            BF16,
            (4, 2),
            (77, 131),
            batch=2,
            causal=True,
            window=(40, 0),
            softcap=10.0,
        )
        for d in (59, 128, 256)
    ),
    # issue 10: key blocks that no query sees (dK/dV 0) ...
    *(
        Case(
            f"window{left}_{right}-113x400-hdim{d}",
            d,
            BF16,
            (2, 1),
            (113, 400),
            window=(left, right),
        )
        for d in (64, 128, 256)
        for left, right in WINDOWS
    ),
    # ... and query blocks that see no key (out 0, lse +inf, dQ 0)
    *(
        Case(f"window16_0-400x113-hdim{d}", d, FP16, (2, 1), (400, 113), window=(16, 0))
        for d in (64, 128, 256)
    ),
    Case(
        "varlen-causal-hdim64",
        64,
        FP16,
        (4, 4),
        lens_q=(3, 0, 70, 1),
        lens_k=(3, 0, 70, 1),
        causal=True,
    ),
    # one query per sequence against ~147 keys, causal and local (upstream's failing case)
    *(
        Case(
            f"decode-{'causal' if w == (-1, -1) else f'window{w[0]}_{w[1]}'}-hdim{d}",
            d,
            FP16,
            (4, 2),
            lens_q=DECODE_Q,
            lens_k=DECODE_K,
            causal=True,
            window=w,
        )
        for d in (59, 128)
        for w in ((-1, -1), (59, 0))
    ),
]


def cu_seqlens(lens: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], device="cuda", dtype=torch.int32)


def run_case(case: Case) -> list[str]:
    """Forward and backward of ``case``; what breaks the masked-part semantics."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    (h, hk), d = case.heads, case.hdim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=case.dtype, requires_grad=True)

    kw = dict(causal=case.causal, window_size=case.window, softcap=case.softcap)
    if case.varlen:
        q, k, v = (
            rand(sum(case.lens_q), h, d),
            rand(sum(case.lens_k), hk, d),
            rand(sum(case.lens_k), hk, d),
        )
        cu_q, cu_k = cu_seqlens(case.lens_q), cu_seqlens(case.lens_k)
        out, lse, _ = flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max(case.lens_q), max(case.lens_k), return_attn_probs=True, **kw
        )
        parts = varlen_parts(
            case.lens_q, case.lens_k, causal=case.causal, window_size=case.window, device="cuda"
        )
    else:
        (sq, sk), b = case.seqlens, case.batch
        q, k, v = rand(b, sq, h, d), rand(b, sk, hk, d), rand(b, sk, hk, d)
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        parts = dense_parts(sq, sk, causal=case.causal, window_size=case.window, device="cuda")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    return masked_part_problems(Outputs(out, lse, dq, dk, dv), parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--list", action="store_true", help="print the case names and stop")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if args.only in c.name]
    if not cases:
        ap.error(f"--only {args.only!r} matches no case; cases: {', '.join(c.name for c in CASES)}")
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    torch.manual_seed(0)
    problems = 0
    for case in cases:
        found = run_case(case)
        problems += len(found)
        print(f"{'ok' if not found else 'PROBLEMS'} {case.name}", flush=True)
        for line in found:
            print(f"  {line}", flush=True)
    print(f"sanitizer_case: {len(cases)} cases, {problems} problems", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
