"""Kernel objects on their own: which cells share them, the key a CI cache stores them
under, and compiling them without torch.

Kernel objects depend on (sources, flags, nvcc, host compiler, archs) and not on torch or
Python, so the cells of one CUDA toolchain and kernel set share one set of objects: a
*kernel group*. CI compiles each group once (the `objects` stage) and every cell of the
group then compiles only its binding.

The CI cache key of a group is made of the factory's own object keys
(build_tools.cache.cache_key, through KernelBuilder.jobs_for), so it is the same on every
runner that has the same nvcc, and any change to any object changes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build_tools.kernels import (
    KernelBuildError,
    generate_sources,
    kernel_sources,
)

from .errors import FactoryError
from .matrix import Cell, MatrixSpec
from .plan import kernel_builder

KEY_SCHEMA = "flash-attn-objects-v1"
PARTIAL = "-partial-"


@dataclass(frozen=True)
class KernelGroup:
    """Cells whose kernel objects are the same: one CUDA and one kernel set."""

    cuda: str
    cells: tuple[Cell, ...]

    @property
    def first(self) -> Cell:
        return self.cells[0]

    @property
    def name(self) -> str:
        k = self.first.kernels
        return f"{self.first.cuda_tag}-{k.name}-sm{'+'.join(k.archs)}"

    def to_matrix_entry(self) -> dict[str, Any]:
        """One GitHub Actions matrix entry; `matrix` selects the group's first cell."""
        k = self.first.kernels
        return {
            "group": self.name,
            "cuda": self.cuda,
            "kernels": k.name,
            "archs": "+".join(k.archs),
            "python": self.first.python,
            "cells": len(self.cells),
            "matrix": self.first.selection(),
        }


def kernel_groups(cells: Sequence[Cell], spec: MatrixSpec | None = None) -> list[KernelGroup]:
    """The distinct (cuda, kernel set) of the cells, in the cells' order.

    With spec, each group's first cell (the one whose toolchain its kernel job builds
    with: any cell of the group makes the same objects) is the cheapest to provision:
    a torch build on the package index before one on PyTorch's per-CUDA indexes, then the
    recipe's build CPython ([stable] build_python, which every toolchain image already
    has) before the others; the cells' order otherwise."""
    grouped: dict[tuple[str, Any], list[Cell]] = {}
    for cell in cells:
        grouped.setdefault((cell.cuda, cell.kernels), []).append(cell)
    if spec is not None:
        for members in grouped.values():
            members.sort(key=lambda c: _toolchain_cost(c, spec))
    return [KernelGroup(cuda, tuple(members)) for (cuda, _), members in grouped.items()]


def _toolchain_cost(cell: Cell, spec: MatrixSpec) -> tuple[bool, bool]:
    release = spec.torch.get(cell.torch)
    # provision.toolchain_index's rule: a stable cell builds with the index's floor torch
    off_index = not (release is None or cell.stable or cell.cuda == release.index_cuda)
    return off_index, cell.python != spec.stable.build_python


def github_kernel_matrix(groups: Sequence[KernelGroup]) -> dict[str, Any]:
    return {"include": [g.to_matrix_entry() for g in groups]}


@dataclass(frozen=True)
class ObjectCacheKey:
    """Where a CI cache keeps one kernel group's objects.

    key: every object key of the group (exact: nothing to compile on a hit).
    restore_keys: the newest partial save of this key (a build that hit the time
    limit), then any save of the same toolchain and kernel set (most objects of an
    earlier commit are still valid; the object cache's own keys pick them)."""

    key: str
    restore_keys: tuple[str, ...]
    objects: int
    compiler_digest: str

    def partial(self, run_id: str) -> str:
        return f"{self.key}{PARTIAL}{run_id}"

    def github_output(self) -> str:
        """The lines a step appends to $GITHUB_OUTPUT (restore-keys is multi-line)."""
        delimiter = "FLASH_ATTN_EOF"
        return (
            f"key={self.key}\n"
            f"objects={self.objects}\n"
            f"restore-keys<<{delimiter}\n" + "\n".join(self.restore_keys) + f"\n{delimiter}\n"
        )


def _cell_env(cell: Cell, toolchain_env: dict[str, str] | None) -> dict[str, str]:
    """The environment the cell's build sees (build.build_env), as far as kernels care."""
    return {**os.environ, **(toolchain_env or {}), **cell.kernels.env()}


def object_cache_key(
    cell: Cell, src: Path, object_cache: Path, toolchain_env: dict[str, str] | None = None
) -> ObjectCacheKey:
    """The CI cache key of the kernel objects `cell` needs (sources staged at src)."""
    builder = kernel_builder(cell, src, object_cache, _cell_env(cell, toolchain_env))
    layout = builder.layout
    try:
        jobs = builder.jobs_for(kernel_sources(layout, generate_sources(layout, builder.knobs)))
    except KernelBuildError as e:
        raise FactoryError(f"cell {cell.id}: {e}") from e
    objects = hashlib.sha256(
        "\n".join(sorted(f"{j.source.name}={j.key}" for j in jobs)).encode()
    ).hexdigest()
    compiler = hashlib.sha256(builder.toolchain.compiler_id.encode()).hexdigest()[:12]
    k = cell.kernels
    prefix = f"{KEY_SCHEMA}-{cell.cuda_tag}-{k.name}-sm{'+'.join(k.archs)}-{compiler}-"
    key = prefix + objects[:24]
    return ObjectCacheKey(
        key=key,
        restore_keys=(key + PARTIAL, prefix),
        objects=len(jobs),
        compiler_digest=compiler,
    )


def compile_objects(
    cell: Cell,
    src: Path,
    object_cache: Path,
    toolchain_env: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Compile the kernel objects `cell` needs into the object cache (no torch needed).
    An interrupted run keeps every object it finished; the next run compiles the rest."""
    builder = kernel_builder(cell, src, object_cache, _cell_env(cell, toolchain_env))
    if log is not None:
        builder.log = log
    try:
        return builder.build()
    except KernelBuildError as e:
        raise FactoryError(f"kernel group of {cell.id}: {e}") from e
