"""Fill the free memory of PyTorch's CUDA caching allocator with NaN.

A kernel output comes from ``torch.empty`` (``at::empty`` in the binding), that is from
a block the caching allocator hands back as it is. In a fresh process that memory is
often zero, and after a passing test it holds finite values; either way an element
the kernel never writes (or writes late) can go unnoticed. After
:func:`poison_cuda_cache` every free byte in the cache of the current device and
stream is 0xFF, which reads as NaN in fp16, bf16, fp32 and fp64, so such an element
shows up as NaN.

How it covers both pools of the allocator (c10/cuda/CUDACachingAllocator.cpp, the
default configuration):

1. ``torch.cuda.empty_cache()`` returns every wholly free segment to the driver, which
   bounds the cache: it does not grow from one call to the next.
2. The free blocks that remain sit in segments that also hold live tensors (gaps).
   :func:`gap_requests` turns the allocator's snapshot into a list of request sizes
   that, served best-fit, hand back exactly those blocks; each is filled.
3. Fresh blocks are made for what the next test will allocate: ``2 * SMALL_SEGMENTS``
   requests of 1 MiB fill that many new 2 MiB segments of the small pool, and a
   geometric range of large requests (20, 20, 32 ... 256 MiB, within a quarter of the
   free device memory) makes large-pool segments; each is filled.
4. Everything is freed: the blocks go back to the cache holding 0xFF, and the next
   ``torch.empty`` of any size up to the largest block reuses one of them.

Cost per call (an estimate, not measured): one synchronize, the cudaFree of the
released segments, one snapshot, 22 fresh allocations (14 cudaMalloc) plus one per
gap, a fill kernel each (about 550 MiB written: under 0.2 ms of HBM time on an H200),
so a few milliseconds. ``python3 tests/gpu_poison.py`` (gpu_session.sh's `poison`
step) measures it on the machine at hand.

Set FLASH_ATTN_TEST_POISON=0 to switch the poisoning off (1, the default, is on).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

ENV_VAR = "FLASH_ATTN_TEST_POISON"
MIB = 1 << 20
# The allocator's constants (CUDACachingAllocator.cpp): requests are rounded up to
# 512 bytes; requests up to 1 MiB go to the small pool, whose segments are 2 MiB.
BLOCK_ROUND = 512
SMALL_REQUEST_MAX = 1 * MIB
SMALL_SEGMENT = 2 * MIB
# What the fresh part of the cache is made of: 8 small segments (16 MiB), and large
# blocks from 20 MiB (each serves the 1-10 MiB requests, which share 20 MiB segments)
# up to 256 MiB, the biggest a test's output here needs.
SMALL_SEGMENTS = 8
LARGE_SIZES = (20 * MIB, 20 * MIB, 32 * MIB, 64 * MIB, 128 * MIB, 256 * MIB)
FREE_MEMORY_SHARE = 0.25  # at most this share of the device's free memory
POISON_BYTE = 0xFF


def poison_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether FLASH_ATTN_TEST_POISON asks for poisoning (unset or 1: yes; 0: no)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "1").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise ValueError(f"{ENV_VAR}={value!r} is not valid: use 1 (poison, the default) or 0 (off)")


@dataclass(frozen=True)
class FreeBlock:
    """One free block of the cache: its size in bytes and its pool."""

    size: int
    pool: str  # "small" or "large"

    def __post_init__(self) -> None:
        if self.pool not in ("small", "large"):
            raise ValueError(f"pool must be 'small' or 'large'; got {self.pool!r}")
        if self.size <= 0 or self.size % BLOCK_ROUND:
            raise ValueError(f"a block size is a positive multiple of 512; got {self.size}")


def free_blocks(
    snapshot: Iterable[Mapping[str, object]], *, device: int, stream: int
) -> list[FreeBlock]:
    """The free blocks of ``torch.cuda.memory_snapshot()`` that a plain allocation on
    ``device`` and ``stream`` can be given (the default pool only; CUDA-graph pools and
    blocks of other streams are left alone)."""
    blocks = []
    for segment in snapshot:
        if segment.get("device", device) != device or segment.get("stream", 0) != stream:
            continue
        if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0):  # type: ignore[arg-type]
            continue
        pool = str(segment["segment_type"])
        for block in segment["blocks"]:  # type: ignore[attr-defined]
            if block["state"] == "inactive":
                blocks.append(FreeBlock(size=int(block["size"]), pool=pool))
    return blocks


def gap_requests(blocks: Sequence[FreeBlock]) -> list[int]:
    """Request sizes that, served in order by the allocator's best fit, are given
    exactly the bytes of ``blocks`` and create no new segment.

    Best fit takes the smallest free block of the request's pool that is large enough,
    and splits off the rest. A request of a free block's exact size therefore gets that
    block (or another of the same size): nothing smaller fits. But requests above 1 MiB
    go to the large pool, so a small-pool block above 1 MiB (a 2 MiB segment with a
    small live tensor) is asked for as 1 MiB and then its remainder, once the blocks of
    at most 1 MiB are taken and smallest such block first, so that the 1 MiB lands in it.
    """
    small = sorted((b.size for b in blocks if b.pool == "small"), reverse=True)
    exact_small = [s for s in small if s <= SMALL_REQUEST_MAX]
    split_small = sorted(s for s in small if s > SMALL_REQUEST_MAX)
    if any(s > SMALL_SEGMENT for s in split_small):
        raise ValueError(f"a small-pool block is at most {SMALL_SEGMENT} bytes; got {small[0]}")
    requests = list(exact_small)
    for size in split_small:
        requests += [SMALL_REQUEST_MAX, size - SMALL_REQUEST_MAX]
    large = sorted((b.size for b in blocks if b.pool == "large"), reverse=True)
    if large and large[-1] <= SMALL_REQUEST_MAX:
        raise ValueError(f"a large-pool block is above {SMALL_REQUEST_MAX} bytes; got {large[-1]}")
    return requests + large


def fresh_requests(
    free_bytes: int,
    *,
    small_segments: int = SMALL_SEGMENTS,
    large_sizes: Sequence[int] = LARGE_SIZES,
    share: float = FREE_MEMORY_SHARE,
) -> list[int]:
    """Request sizes that make new NaN segments: ``small_segments`` full 2 MiB segments
    of the small pool, then the large sizes, smallest first, as long as the whole stays
    within ``share`` of ``free_bytes`` (the small segments always)."""
    if free_bytes < 0:
        raise ValueError(f"free_bytes must be >= 0; got {free_bytes}")
    small = [SMALL_REQUEST_MAX] * (2 * small_segments)
    budget = int(free_bytes * share) - small_segments * SMALL_SEGMENT
    large = []
    for size in sorted(large_sizes):
        if size <= SMALL_REQUEST_MAX:
            raise ValueError(f"large sizes must be above {SMALL_REQUEST_MAX} bytes; got {size}")
        if size <= budget:
            large.append(size)
            budget -= size
    return small + large


@dataclass(frozen=True)
class PoisonReport:
    """What one :func:`poison_cuda_cache` call filled."""

    gap_bytes: int
    fresh_bytes: int
    requests: int
    out_of_memory: bool  # a large fresh block did not fit and was left out


def poison_cuda_cache(device: torch.device | int | None = None) -> PoisonReport:
    """Fill every free block of the CUDA caching allocator (current stream) with 0xFF,
    and make fresh small- and large-pool blocks holding 0xFF (module docstring)."""
    index = torch.cuda.current_device() if device is None else torch.device("cuda", device).index
    assert index is not None
    with torch.cuda.device(index):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        stream = torch.cuda.current_stream().cuda_stream
        gaps = gap_requests(free_blocks(torch.cuda.memory_snapshot(), device=index, stream=stream))
        held: list[torch.Tensor] = []
        for size in gaps:
            held.append(torch.empty(size, dtype=torch.uint8, device="cuda").fill_(POISON_BYTE))
        out_of_memory = False
        for size in fresh_requests(torch.cuda.mem_get_info()[0]):
            try:
                block = torch.empty(size, dtype=torch.uint8, device="cuda")
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
                break
            held.append(block.fill_(POISON_BYTE))
        report = PoisonReport(
            gap_bytes=sum(gaps),
            fresh_bytes=sum(t.numel() for t in held[len(gaps) :]),
            requests=len(held),
            out_of_memory=out_of_memory,
        )
        del held  # back to the cache, 0xFF; stream order keeps the fills ahead of reuse
    return report


def main() -> None:
    """Time the poisoning on this GPU and check that it works (small and large)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--calls", type=int, default=50, help="how many calls to time")
    args = ap.parse_args()
    if args.calls < 1:
        ap.error(f"--calls must be >= 1; got {args.calls}")
    times, report = [], None
    for _ in range(args.calls):
        # what a test leaves behind: stale small and large blocks (not timed)
        scratch = [torch.ones(n, device="cuda") for n in (1000, 300_000, 5_000_000, 20_000_000)]
        del scratch
        torch.cuda.synchronize()
        start = time.perf_counter()
        report = poison_cuda_cache()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    small = torch.empty(SMALL_REQUEST_MAX // 2, dtype=torch.float16, device="cuda")
    large = torch.empty(100 * MIB // 2, dtype=torch.bfloat16, device="cuda")
    works = bool(torch.isnan(small).all()) and bool(torch.isnan(large).all())
    print(
        f"poison: median {statistics.median(times):.2f} ms, max {max(times):.2f} ms over "
        f"{args.calls} calls; {report}; reserved "
        f"{torch.cuda.memory_reserved() / MIB:.0f} MiB; torch.empty small+large NaN: {works}"
    )
    if not works:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
