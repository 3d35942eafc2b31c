"""Where the factory reads and writes; one object passed to every stage (no globals)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FactoryPaths:
    repo: Path  # the source tree wheels are built from
    work: Path  # build/factory: staged sources, logs, raw wheels, venvs, quarantine
    out: Path  # the published tree is out/whl
    object_cache: Path  # the kernel object cache shared by every cell
    # where hermetic toolchains live; None: work/toolchains. FLASH_ATTN_TOOLCHAINS sets
    # it (a builder image points it at the venvs it provisioned when it was built)
    toolchain_root: Path | None = None

    @classmethod
    def default(
        cls, repo: Path = REPO, out: Path | None = None, work: Path | None = None
    ) -> FactoryPaths:
        cache = os.environ.get("FLASH_ATTN_OBJECT_CACHE", "").strip()
        toolchains = os.environ.get("FLASH_ATTN_TOOLCHAINS", "").strip()
        return cls(
            repo=repo,
            work=work or repo / "build" / "factory",
            out=out or repo / "dist",
            object_cache=Path(cache).resolve() if cache else repo / "build" / "kernels",
            toolchain_root=Path(toolchains).resolve() if toolchains else None,
        )

    def src(self, cell_id: str) -> Path:
        return self.work / "src" / cell_id

    def cell_dir(self, cell_id: str) -> Path:
        return self.work / "cells" / cell_id

    def log(self, cell_id: str, stage: str) -> Path:
        return self.cell_dir(cell_id) / f"{stage}.log"

    @property
    def quarantine(self) -> Path:
        return self.work / "quarantine"

    @property
    def toolchains(self) -> Path:
        """Cached hermetic toolchains, one venv per (python, torch, cuda)."""
        return self.toolchain_root or self.work / "toolchains"

    @property
    def venvs(self) -> Path:
        return self.work / "venvs"

    @property
    def report_json(self) -> Path:
        return self.work / "report.json"

    @property
    def tree(self) -> Path:
        return self.out / "whl"
