"""Plan: which kernel objects a cell needs, which the object cache already holds, and
how many compiles to run at once (build_tools' planner: CPU quota and free memory,
cgroup v1 and v2 aware). Printed with its reasons before the build starts."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from build_tools.kernels import (
    KernelBuilder,
    KernelLayout,
    cached_state,
    generate_sources,
    kernel_sources,
)
from build_tools.knobs import BuildConfigError, knobs_from_env, load_catalog
from build_tools.planner import plan_build
from build_tools.resources import probe_resources
from build_tools.toolchain import probe_toolchain

from .errors import FactoryError
from .matrix import Cell


@dataclass(frozen=True)
class CellPlan:
    cell_id: str
    objects: int
    cached: int
    jobs: int
    nvcc_threads: int
    reason: str
    warning: str = ""

    @property
    def to_compile(self) -> int:
        return self.objects - self.cached

    def describe(self) -> str:
        head = f"{self.objects} kernel objects: {self.cached} cached, {self.to_compile} to compile"
        if self.to_compile == 0:
            return f"{head}; only the binding compiles"
        threads = "thread" if self.nvcc_threads == 1 else "threads"
        return f"{head}; {self.jobs} jobs x {self.nvcc_threads} nvcc {threads}: {self.reason}"

    def env(self) -> dict[str, str]:
        return {"MAX_JOBS": str(self.jobs), "NVCC_THREADS": str(self.nvcc_threads)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kernel_builder(cell: Cell, src: Path, object_cache: Path, env: dict[str, str]) -> KernelBuilder:
    """The cell's kernel builder (knobs and nvcc from env, sources staged at src), as the
    build stage makes it; a bad knob or toolchain is the cell's FactoryError."""
    try:
        knobs = knobs_from_env(env, load_catalog(src / "csrc" / "kernels" / "generate.py"))
        toolchain = probe_toolchain(env)
    except BuildConfigError as e:
        raise FactoryError(f"cell {cell.id}: {e}") from e
    layout = KernelLayout.standard(src, object_cache)
    return KernelBuilder(layout, knobs, toolchain, log=lambda _: None)


def per_thread_need(builder: KernelBuilder, jobs: list[Any]) -> int:
    """What one nvcc thread of the costliest of `jobs` is expected to peak at: the memory
    model the build's admission control and the container limit check use (the learned
    peak plus margin from the ledger, FLASH_ATTN_NVCC_MEM_GB for a source never compiled),
    so the plan, its warning and the limit check speak of one figure."""
    return max((builder.memory.expected_bytes(j.source.stem, 1) for j in jobs), default=1)


def plan_cell(
    cell: Cell, src: Path, object_cache: Path, toolchain_env: dict[str, str] | None = None
) -> CellPlan:
    """Plan the build of a cell whose sources are staged at src."""
    env = {**os.environ, **(toolchain_env or {}), **cell.kernels.env()}
    builder = kernel_builder(cell, src, object_cache, env)
    layout, knobs = builder.layout, builder.knobs
    jobs = builder.jobs_for(kernel_sources(layout, generate_sources(layout, knobs)))
    todo = [j for j in jobs if cached_state(j.obj) != "ok"]  # as the build will judge
    cached = len(jobs) - len(todo)
    missing = len(todo)
    plan = plan_build(
        n_objects=max(1, missing),
        n_archs=len(knobs.archs),
        resources=probe_resources(),
        mem_per_thread_bytes=per_thread_need(builder, todo or jobs),
        max_jobs=knobs.max_jobs,
        nvcc_threads=knobs.nvcc_threads,
    )
    return CellPlan(
        cell_id=cell.id,
        objects=len(jobs),
        cached=cached,
        jobs=plan.jobs,
        nvcc_threads=plan.nvcc_threads,
        reason=plan.reason,
        warning=plan.warning,
    )
