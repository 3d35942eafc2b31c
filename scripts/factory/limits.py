"""Does a cell's container memory limit hold one compile? Asked before the container
starts, with build_tools' own memory model: the largest peak learned per source
(memory_ledger.json next to the object cache, plus its margin), or the planner's
default per nvcc thread for a source never compiled."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from build_tools.kernels import KernelLayout, generate_sources, kernel_sources
from build_tools.knobs import BuildConfigError, knobs_from_env, load_catalog
from build_tools.memory import LEDGER_NAME, MemoryModel
from build_tools.planner import gib_to_bytes
from build_tools.resources import GIB, size

from .errors import FactoryError, MatrixError
from .matrix import Cell


@dataclass(frozen=True)
class CompileNeed:
    """What the costliest single compile of a cell is expected to peak at."""

    bytes: int
    source: str  # its source stem
    basis: str  # where the figure comes from, in words


def compile_need(cell: Cell, repo: Path, object_cache: Path) -> CompileNeed:
    """The largest expected peak of one compile (one job, one nvcc thread) in `cell`."""
    env = {**os.environ, **cell.kernels.env()}
    try:
        knobs = knobs_from_env(env, load_catalog(repo / "csrc" / "kernels" / "generate.py"))
    except BuildConfigError as e:
        raise FactoryError(f"cell {cell.id}: {e}") from e
    ledger = object_cache / LEDGER_NAME
    model = MemoryModel.load(ledger, gib_to_bytes(knobs.mem_per_thread_gib))
    with tempfile.TemporaryDirectory(prefix="factory-need-") as tmp:
        layout = KernelLayout(
            repo_root=repo,
            kernels_dir=repo / "csrc" / "kernels",
            generated_dir=Path(tmp) / "generated",
            cache_dir=object_cache,
            report_path=Path(tmp) / "report.json",
        )
        stems = [s.stem for s in kernel_sources(layout, generate_sources(layout, knobs))]
    stem = max(stems, key=lambda s: model.expected_bytes(s, 1))
    need = model.expected_bytes(stem, 1)
    if stem in model.per_thread_peaks:
        basis = f"its largest measured peak, plus margin, from {ledger}"
    else:
        basis = (
            f"never compiled here, so the planner's default FLASH_ATTN_NVCC_MEM_GB="
            f"{knobs.mem_per_thread_gib:g} per nvcc thread"
        )
    return CompileNeed(need, stem, basis)


def limit_problem(cell: Cell, need: CompileNeed) -> str:
    """Why the cell's memory limit cannot hold one compile ("" when it can)."""
    limit = cell.limits.memory_bytes
    if limit is None or limit >= need.bytes:
        return ""
    at_least = math.ceil(need.bytes / GIB)
    return (
        f"cell {cell.id}: container memory limit {cell.limits.memory_text} is below what one "
        f"compile needs: {size(need.bytes)} for {need.source} ({need.basis}). Fix: raise the "
        f'limit to at least {at_least}g ([limits] in recipes/matrix.toml, or MATRIX="... '
        f'memory={at_least}g"); or, if compiles need less on this machine, lower '
        "FLASH_ATTN_NVCC_MEM_GB (a build outside a container records the real peaks)"
    )


def check_limits(cells: list[Cell], repo: Path, object_cache: Path) -> None:
    """The matrix stage's check of every cell's memory limit against one compile (a
    MatrixError, exit 2, before anything runs); one estimate per kernel set."""
    needs: dict[tuple[str, tuple[str, ...]], CompileNeed] = {}
    problems: list[str] = []
    for cell in cells:
        if cell.limits.memory_bytes is None:
            continue
        key = (cell.kernels.name, cell.kernels.archs)
        if key not in needs:
            needs[key] = compile_need(cell, repo, object_cache)
        problem = limit_problem(cell, needs[key])
        if problem:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 1} more cells)" if len(problems) > 1 else ""
        raise MatrixError(problems[0] + more)
