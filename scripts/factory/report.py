"""Report: one row per cell at the end of every run (and `report` prints the last one)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from build_tools.cache import atomic_write_text

from .status import CellStatus


@dataclass
class CellReport:
    cell: str
    status: CellStatus = CellStatus.PENDING
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0
    objects: int = 0
    cache_hits: int = 0
    wheel: str = ""
    wheel_size: int = 0
    platform: str = ""
    smoke: str = ""
    note: str = ""
    failed_stage: str = ""  # the stage a FAILED cell failed in

    def __post_init__(self) -> None:
        if not isinstance(self.status, CellStatus):  # 'tagged', 'failed (build)'
            self.status, stage = CellStatus.parse(str(self.status))
            self.failed_stage = self.failed_stage or stage

    def fail(self, stage: str, note: str) -> None:
        self.status, self.failed_stage, self.note = CellStatus.FAILED, stage, note

    @property
    def status_text(self) -> str:
        """'published', or 'failed (build)' for a failed cell."""
        if self.status is CellStatus.FAILED and self.failed_stage:
            return f"{self.status.value} ({self.failed_stage})"
        return self.status.value

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status_text
        del data["failed_stage"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellReport:
        return cls(**data)  # __post_init__ reads 'failed (build)' back


COLUMNS = ("cell", "status", "wall", "CPU", "peak mem", "cache hits", "wheel size", "smoke")


def _row(r: CellReport) -> tuple[str, ...]:
    mib = r.peak_rss_bytes / 2**20
    return (
        r.cell,
        r.status_text,
        f"{r.wall_s:.1f} s",
        f"{r.cpu_s:.1f} s",
        f"{mib:.0f} MiB" if mib < 1024 else f"{mib / 1024:.2f} GiB",
        f"{r.cache_hits}/{r.objects}" if r.objects else "-",
        f"{r.wheel_size / 2**20:.2f} MiB" if r.wheel_size else "-",
        r.smoke or "-",
    )


def render_text(rows: list[CellReport]) -> str:
    table = [COLUMNS, *(_row(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.cell}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["notes:", *notes] if notes else []))


def print_report(rows: list[CellReport]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render_text(rows), flush=True)
        return
    table = Table(title="wheel factory report")
    for name in COLUMNS:
        table.add_column(name, no_wrap=name != "smoke")
    for r in rows:
        style = "green" if r.status == CellStatus.PUBLISHED else "red"
        values = _row(r)
        table.add_row(values[0], f"[{style}]{values[1]}[/{style}]", *values[2:])
    console = Console(width=160)
    console.print(table)
    for r in rows:
        if r.note:
            console.print(f"  {r.cell}: {r.note}", markup=False, highlight=False)


def save(rows: list[CellReport], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps([r.to_dict() for r in rows], indent=2) + "\n")


def load(path: Path) -> list[CellReport]:
    return [CellReport.from_dict(d) for d in json.loads(path.read_text())]
