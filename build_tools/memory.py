"""What one kernel compile is expected to need in memory, learned from earlier builds.

The ledger (``memory_ledger.json`` next to the object cache) keeps, per source,
the largest peak RSS seen for one nvcc thread. Before a source has been compiled
the model assumes the conservative default (FLASH_ATTN_NVCC_MEM_GB per thread).
The builder asks it before starting each compile (admission control).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .cache import atomic_write_text

LEDGER_NAME = "memory_ledger.json"
MARGIN = 1.25  # a compile may peak somewhat above what it did last time


@dataclass
class MemoryModel:
    default_per_thread_bytes: int
    per_thread_peaks: dict[str, int] = field(default_factory=dict)  # source stem -> bytes

    @classmethod
    def load(cls, path: Path, default_per_thread_bytes: int) -> MemoryModel:
        try:
            data = json.loads(path.read_text())
            peaks = {str(k): int(v) for k, v in data.get("per_thread_peak_bytes", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError):
            peaks = {}
        return cls(default_per_thread_bytes, peaks)

    def save(self, path: Path) -> None:
        body = {"per_thread_peak_bytes": dict(sorted(self.per_thread_peaks.items()))}
        atomic_write_text(path, json.dumps(body, indent=2) + "\n")

    def expected_bytes(self, stem: str, threads: int) -> int:
        """Peak RSS to plan for when compiling `stem` with `threads` nvcc threads."""
        learned = self.per_thread_peaks.get(stem)
        if learned is None:
            return self.default_per_thread_bytes * threads
        return int(learned * threads * MARGIN)

    def record(self, stem: str, peak_rss_bytes: int, threads: int) -> None:
        if peak_rss_bytes <= 0:
            return
        per_thread = -(-peak_rss_bytes // max(1, threads))
        self.per_thread_peaks[stem] = max(per_thread, self.per_thread_peaks.get(stem, 0))


def admits(need: int, free: int, reserved: int, running: int) -> bool:
    """Start a compile needing `need` bytes now? One always runs (a kill is retried
    alone); beyond that, what is free must cover it plus what the running ones may
    still reach (counted whole: conservative, as their current use is in `free` too)."""
    return running == 0 or free >= need + reserved
