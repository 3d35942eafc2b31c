"""Timing helpers the benchmark scripts share (run as ``python benchmarks/NAME.py``, so
this directory is on sys.path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def graph_ms(fn: Callable[[], object], calls: int, replays: int) -> float:
    """Per-call time of ``calls`` calls captured in a CUDA graph, median over replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture wants a warm-up on a side stream first
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def host_us_rounds(fn: Callable[[], object], calls: int, rounds: int) -> list[float]:
    """Host microseconds per call to issue ``calls`` calls back to back (no sync inside a
    round, the GPU drained between rounds), one figure a round."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return times
