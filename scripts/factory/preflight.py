"""Checks before any cell starts: disk space where the factory writes."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import FactoryError

GIB = 1 << 30
# staged sources, kernel objects, raw and tagged wheels, a smoke venv: about 1 GiB a
# cell with the full kernel set; twice that leaves room for a hermetic toolchain's torch
MIN_FREE_BYTES = 2 * GIB


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(paths: list[Path], need: int = MIN_FREE_BYTES) -> None:
    for path in paths:
        free = shutil.disk_usage(_existing(path)).free
        if free < need:
            raise FactoryError(
                f"no disk space: {free / GIB:.1f} GiB free at {path}, a cell needs about "
                f"{need / GIB:.0f} GiB; free some space or point --work/--out elsewhere"
            )
