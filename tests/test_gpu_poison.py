"""The plan of the cache poisoner (gpu_poison.py), on the CPU.

The requests are checked against a model of the caching allocator's best fit (the
rules of c10/cuda/CUDACachingAllocator.cpp in its default configuration): the gap
requests must be given exactly the free blocks, and the fresh requests must fill whole
new segments. The GPU side is tested in test_flash_attn_gpu.py (test_poison_*).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from gpu_poison import (
    BLOCK_ROUND,
    ENV_VAR,
    LARGE_SIZES,
    MIB,
    SMALL_REQUEST_MAX,
    SMALL_SEGMENT,
    SMALL_SEGMENTS,
    FreeBlock,
    free_blocks,
    fresh_requests,
    gap_requests,
    poison_enabled,
)


@dataclass
class ModelBlock:
    size: int
    pool: str
    origin: str  # "old" (a block that was free before) or "new" (a new segment)


@dataclass
class AllocatorModel:
    """Best fit, split and new-segment rules of PyTorch's CUDA caching allocator."""

    free: list[ModelBlock] = field(default_factory=list)
    new_segments: list[int] = field(default_factory=list)
    taken_old_bytes: int = 0

    @staticmethod
    def segment_size(size: int) -> int:
        if size <= SMALL_REQUEST_MAX:
            return SMALL_SEGMENT
        if size < 10 * MIB:
            return 20 * MIB
        return -(-size // (2 * MIB)) * (2 * MIB)

    def malloc(self, nbytes: int) -> None:
        size = max(BLOCK_ROUND, -(-nbytes // BLOCK_ROUND) * BLOCK_ROUND)
        pool = "small" if size <= SMALL_REQUEST_MAX else "large"
        fits = [b for b in self.free if b.pool == pool and b.size >= size]
        if fits:
            block = min(fits, key=lambda b: b.size)
            self.free.remove(block)
        else:
            block = ModelBlock(self.segment_size(size), pool, "new")
            self.new_segments.append(block.size)
        rest = block.size - size
        split = rest >= BLOCK_ROUND if pool == "small" else rest > SMALL_REQUEST_MAX
        if split:
            self.free.append(ModelBlock(rest, pool, block.origin))
        else:
            size = block.size  # the whole block
        if block.origin == "old":
            self.taken_old_bytes += size


def random_blocks(rng: random.Random) -> list[FreeBlock]:
    blocks = []
    for _ in range(rng.randrange(0, 40)):
        if rng.random() < 0.6:
            units = rng.randrange(1, SMALL_SEGMENT // BLOCK_ROUND)  # below a whole segment
            blocks.append(FreeBlock(units * BLOCK_ROUND, "small"))
        else:
            low, high = SMALL_REQUEST_MAX // BLOCK_ROUND + 1, 300 * MIB // BLOCK_ROUND
            blocks.append(FreeBlock(rng.randrange(low, high) * BLOCK_ROUND, "large"))
    for _ in range(rng.randrange(0, 4)):  # the border cases
        blocks.append(
            rng.choice(
                [
                    FreeBlock(SMALL_REQUEST_MAX, "small"),
                    FreeBlock(SMALL_REQUEST_MAX + BLOCK_ROUND, "small"),
                    FreeBlock(SMALL_SEGMENT - BLOCK_ROUND, "small"),
                    FreeBlock(BLOCK_ROUND, "small"),
                    FreeBlock(SMALL_REQUEST_MAX + BLOCK_ROUND, "large"),
                ]
            )
        )
    return blocks


def test_gap_requests_take_exactly_the_free_blocks():
    for seed in range(300):
        blocks = random_blocks(random.Random(seed))
        model = AllocatorModel(free=[ModelBlock(b.size, b.pool, "old") for b in blocks])
        for size in gap_requests(blocks):
            model.malloc(size)
        assert model.new_segments == [], f"seed {seed}: a gap request made a new segment"
        assert model.free == [], f"seed {seed}: a free block was left unfilled"
        assert model.taken_old_bytes == sum(b.size for b in blocks), f"seed {seed}"


def test_model_sees_why_big_small_blocks_are_split():
    """A 1.5 MiB small-pool block asked for at its own size goes to the large pool."""
    block = FreeBlock(SMALL_REQUEST_MAX + 256 * 1024, "small")
    naive = AllocatorModel(free=[ModelBlock(block.size, "small", "old")])
    naive.malloc(block.size)
    assert naive.new_segments == [20 * MIB] and naive.taken_old_bytes == 0
    planned = AllocatorModel(free=[ModelBlock(block.size, "small", "old")])
    for size in gap_requests([block]):
        planned.malloc(size)
    assert planned.new_segments == [] and planned.taken_old_bytes == block.size


def test_fresh_requests_fill_whole_new_segments():
    requests = fresh_requests(100 << 30)
    model = AllocatorModel()
    for size in requests:
        model.malloc(size)
    assert model.new_segments == [SMALL_SEGMENT] * SMALL_SEGMENTS + sorted(LARGE_SIZES)
    assert model.free == [], "a fresh segment was left partly unfilled"


def test_fresh_requests_stay_within_the_memory_share():
    small = SMALL_SEGMENTS * SMALL_SEGMENT
    assert fresh_requests(0) == [SMALL_REQUEST_MAX] * (2 * SMALL_SEGMENTS)
    # a quarter of 400 MiB leaves 84 MiB after the small segments: 20 + 20 + 32
    requests = fresh_requests(400 * MIB)
    assert requests[2 * SMALL_SEGMENTS :] == [20 * MIB, 20 * MIB, 32 * MIB]
    for free in (0, 64 * MIB, 1 << 30, 3 << 30, 100 << 30):
        total = sum(fresh_requests(free))
        assert total <= max(small, free // 4)
    with pytest.raises(ValueError, match="free_bytes must be >= 0; got -1"):
        fresh_requests(-1)
    with pytest.raises(ValueError, match="above 1048576 bytes; got 4096"):
        fresh_requests(1 << 30, large_sizes=[4096])


def test_free_blocks_reads_only_this_device_stream_and_pool():
    def segment(blocks, *, kind="small", device=0, stream=0, pool=(0, 0)):
        return {
            "device": device,
            "stream": stream,
            "segment_type": kind,
            "segment_pool_id": pool,
            "blocks": [{"size": s, "state": st} for s, st in blocks],
        }

    snapshot = [
        segment([(4096, "active_allocated"), (8192, "inactive"), (1024, "inactive")]),
        segment([(3 * MIB, "inactive"), (17 * MIB, "active_allocated")], kind="large"),
        segment([(2048, "active_awaiting_free"), (512, "inactive")]),
        segment([(4096, "inactive")], device=1),
        segment([(4096, "inactive")], stream=1234),
        segment([(4096, "inactive")], pool=(1, 0)),  # a CUDA-graph pool
    ]
    assert free_blocks(snapshot, device=0, stream=0) == [
        FreeBlock(8192, "small"),
        FreeBlock(1024, "small"),
        FreeBlock(3 * MIB, "large"),
        FreeBlock(512, "small"),
    ]
    assert free_blocks(snapshot, device=1, stream=0) == [FreeBlock(4096, "small")]
    with pytest.raises(ValueError, match="pool must be 'small' or 'large'; got 'medium'"):
        free_blocks([segment([(512, "inactive")], kind="medium")], device=0, stream=0)


def test_free_block_and_gap_sizes_are_checked():
    with pytest.raises(ValueError, match="positive multiple of 512; got 700"):
        FreeBlock(700, "small")
    with pytest.raises(ValueError, match="small-pool block is at most 2097152 bytes"):
        gap_requests([FreeBlock(4 * MIB, "small")])
    with pytest.raises(ValueError, match="large-pool block is above 1048576 bytes; got 4096"):
        gap_requests([FreeBlock(4096, "large")])


@pytest.mark.parametrize(
    "value, expected", [(None, True), ("1", True), ("", True), (" 0 ", False), ("0", False)]
)
def test_poison_switch(value, expected):
    env = {} if value is None else {ENV_VAR: value}
    assert poison_enabled(env) is expected


def test_poison_switch_rejects_other_values():
    with pytest.raises(ValueError, match=r"FLASH_ATTN_TEST_POISON='yes' is not valid: use 1"):
        poison_enabled({ENV_VAR: "yes"})
