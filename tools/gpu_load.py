"""Keep a GPU busy with bf16 matrix products, beside a test run (a loaded GPU changes
the timings that an idle one hides races behind).

    python3 tools/gpu_load.py --seconds 600 [--size 8192] [--streams 2] &
    ... tests ...
    kill %1     # SIGTERM or SIGINT: it stops after the products in flight

It stops by itself after --seconds (at most 3600). It prints `gpu_load: running ...`
once the first products have finished, so that a script can wait for the load to be
real before it starts, and on the way out one line with how many products it ran.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_SECONDS = 3600.0
MAX_STREAMS = 16
SIZES = (256, 32768)  # the smallest and largest --size
PRODUCTS_PER_ROUND = 4  # per stream, between two synchronizations


@dataclass(frozen=True)
class LoadConfig:
    seconds: float
    size: int
    streams: int
    device: int


@dataclass(frozen=True)
class LoadResult:
    products: int
    seconds: float
    stopped_by: str  # "time" or the signal's name

    def summary(self, config: LoadConfig) -> str:
        flop = 2.0 * config.size**3 * self.products
        rate = flop / self.seconds / 1e12 if self.seconds > 0 else 0.0
        return (
            f"gpu_load: {self.products} bf16 matmuls of {config.size}^3 on {config.streams} "
            f"stream(s) in {self.seconds:.1f} s ({rate:.0f} TFLOP/s), stopped by {self.stopped_by}"
        )


def parse_args(argv: Sequence[str] | None = None) -> LoadConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help=f"stop after (<= {MAX_SECONDS:g})")
    ap.add_argument("--size", type=int, default=8192, help="n of the n x n x n products")
    ap.add_argument("--streams", type=int, default=1, help=f"CUDA streams (1-{MAX_STREAMS})")
    ap.add_argument("--device", type=int, default=0, help="CUDA device index")
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        ap.error(f"--seconds must be in (0, {MAX_SECONDS:g}]; got {args.seconds:g}")
    if not SIZES[0] <= args.size <= SIZES[1]:
        ap.error(f"--size must be in [{SIZES[0]}, {SIZES[1]}]; got {args.size}")
    if not 1 <= args.streams <= MAX_STREAMS:
        ap.error(f"--streams must be in [1, {MAX_STREAMS}]; got {args.streams}")
    if args.device < 0:
        ap.error(f"--device must be >= 0; got {args.device}")
    return LoadConfig(
        seconds=args.seconds, size=args.size, streams=args.streams, device=args.device
    )


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between rounds."""

    def __init__(self) -> None:
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name


def run(config: LoadConfig, stop: StopFlag) -> LoadResult:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_load: no CUDA GPU (torch.cuda.is_available() is False)")
    if config.device >= torch.cuda.device_count():
        raise SystemExit(
            f"gpu_load: --device {config.device} does not exist; "
            f"{torch.cuda.device_count()} CUDA device(s) are visible"
        )
    torch.cuda.set_device(config.device)
    streams = [torch.cuda.Stream() for _ in range(config.streams)]
    n = config.size
    operands = []
    for stream in streams:
        with torch.cuda.stream(stream):
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            operands.append((a, torch.randn_like(a), torch.empty_like(a)))
    torch.cuda.synchronize()
    start = time.monotonic()
    products, announced = 0, False
    while True:
        for stream, (a, b, c) in zip(streams, operands):
            with torch.cuda.stream(stream):
                for _ in range(PRODUCTS_PER_ROUND):
                    torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        products += PRODUCTS_PER_ROUND * len(streams)
        elapsed = time.monotonic() - start
        if not announced:
            print(f"gpu_load: running on {torch.cuda.get_device_name()}", flush=True)
            announced = True
        if stop.signal_name:
            return LoadResult(products, elapsed, stop.signal_name)
        if elapsed >= config.seconds:
            return LoadResult(products, elapsed, "time")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    stop = StopFlag()
    stop.install()
    result = run(config, stop)
    print(result.summary(config), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
