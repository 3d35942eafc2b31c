"""Run each cell in a container (make wheels ENGINE=docker|podman).

A cell's container gets the cell's limits from the matrix (--memory, --memory-swap,
--cpus), the checkout read-only, the object cache and the cell's own work directory
read-write, each mounted at its path on this machine (so logs, reports and kernel
objects read the same inside and out), and no network: its toolchain and the wheels
its smoke venv installs are in the builder image. Inside, the factory itself builds,
tags and smoke-tests the cell (`wheels --no-publish`, hermetic toolchain from the
image); the planner there reads the container's limits from its cgroup. Publishing
stays outside, once, for every cell that passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from build_tools.resources import size

from .engine import ContainerEngine, ContainerRun, EngineError, Mount
from .errors import FactoryError
from .images import ImageOptions, build_image, builder_build, stage_context
from .limits import compile_need, limit_problem
from .matrix import Cell
from .paths import FactoryPaths
from .pipeline import CellOutcome, RunOptions
from .publish import Candidate
from .report import CellReport
from .status import CellStatus

Log = Callable[[str], None]
# the build knobs that reach the container from this environment
PASSED_ENV = (
    "MAX_JOBS",
    "NVCC_THREADS",
    "FLASH_ATTN_NVCC_MEM_GB",
    "FLASH_ATTN_NVCC_FLAGS",
    "FLASH_ATTN_ADMISSION",
    "SOURCE_DATE_EPOCH",
)
STATS_NAME = "cgroup.json"


@dataclass(frozen=True)
class ContainerStats:
    """The container's memory cgroup at the end of its run."""

    memory_peak_bytes: int | None
    oom_kills: int | None
    memory_limit_bytes: int | None
    source: str

    @classmethod
    def load(cls, path: Path) -> ContainerStats | None:
        try:
            data = json.loads(path.read_text())
            return cls(
                data.get("memory_peak_bytes"),
                data.get("oom_kills"),
                data.get("memory_limit_bytes"),
                str(data.get("source", "")),
            )
        except (OSError, ValueError, AttributeError):
            return None

    def describe(self) -> str:
        peak = size(self.memory_peak_bytes) if self.memory_peak_bytes is not None else "?"
        kills = "?" if self.oom_kills is None else str(self.oom_kills)
        return f"container peak {peak}, {kills} OOM kill(s) ({self.source or 'no cgroup'})"


def cell_work(paths: FactoryPaths, cell: Cell) -> Path:
    """The cell's read-write directory: the factory's --work inside its container."""
    return paths.work / "engine" / "cells" / cell.id


def container_command(cell: Cell, work: Path, stage: str) -> tuple[str, ...]:
    """The factory inside, on exactly this cell, with the image's toolchain."""
    args = [
        "--work",
        str(work),
        "--out",
        str(work / "out"),
        "--cgroup-stats",
        str(work / STATS_NAME),
        stage,
        "--matrix",
        cell.selection(),
        "--toolchain",
        "hermetic",
    ]
    if stage == "wheels":
        args.append("--no-publish")
    script = 'exec "${FLASH_ATTN_FACTORY_PYTHON:-python3}" -m scripts.factory "$@"'
    return ("sh", "-c", script, "factory", *args)


def container_run(
    cell: Cell,
    image: str,
    paths: FactoryPaths,
    stage: str,
    epoch: int,
    extra_env: dict[str, str] | None = None,
) -> ContainerRun:
    work = cell_work(paths, cell)
    env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k, "").strip()}
    env.update(
        {
            "SOURCE_DATE_EPOCH": env.get("SOURCE_DATE_EPOCH", str(epoch)),
            "FLASH_ATTN_OBJECT_CACHE": str(paths.object_cache),
            "HOME": str(work / "home"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.update(extra_env or {})
    uid, gid = os.getuid(), os.getgid()
    return ContainerRun(
        image=image,
        command=container_command(cell, work, stage),
        mounts=(
            Mount(paths.repo, str(paths.repo), read_only=True),
            Mount(paths.object_cache, str(paths.object_cache), read_only=False),
            Mount(work, str(work), read_only=False),
        ),
        env=env,
        limits=cell.limits,
        workdir=str(paths.repo),
        network="none",
        user="" if uid == 0 else f"{uid}:{gid}",
    )


@dataclass
class ContainerCells:
    """The per-cell step of run_cells for ENGINE=docker|podman."""

    engine: ContainerEngine
    paths: FactoryPaths
    options: RunOptions
    images: ImageOptions
    log: Log
    epoch: int = 315532800
    _image_errors: dict[str, str] = field(default_factory=dict)
    _image_ok: set[str] = field(default_factory=set)
    _context: Path | None = None

    def image_for(self, cell: Cell) -> str:
        if self._context is None:
            self._context = stage_context(
                self.paths.repo, self.paths.work / "engine" / "context", self.images.wheelhouse
            )
        build = builder_build(cell, self.paths.repo, self._context, self.images)
        if build.tag in self._image_errors:
            raise EngineError(self._image_errors[build.tag])
        if build.tag not in self._image_ok:
            log = self.paths.work / "engine" / f"image-{build.tag.split(':')[-1]}.log"
            self.log(f"  image: building {build.tag} (log {log})")
            start = time.perf_counter()
            try:
                build_image(self.engine, build, log)
            except EngineError as e:
                self._image_errors[build.tag] = str(e)
                raise
            self._image_ok.add(build.tag)
            self.log(f"  image: {build.tag} ready in {time.perf_counter() - start:.1f} s")
        return build.tag

    def run_cell(self, cell: Cell) -> CellOutcome:
        report = CellReport(cell=cell.id)
        stage = "limits"
        start = time.perf_counter()
        try:
            need = compile_need(cell, self.paths.repo, self.paths.object_cache)
            problem = limit_problem(cell, need)
            if problem:
                raise FactoryError(problem)
            self.log(
                f"  limits: {cell.limits.describe()}; one compile needs up to "
                f"{size(need.bytes)} ({need.source})"
            )
            stage = "image"
            image = self.image_for(cell)
            stage = "container"
            outcome = self._run(cell, image)
            outcome.report.wall_s = time.perf_counter() - start
            return outcome
        except FactoryError as e:
            report.fail(stage, str(e).splitlines()[0])
            self.log(f"  {stage} failed: {e}")
            return CellOutcome(report)
        finally:
            report.wall_s = time.perf_counter() - start

    def _run(self, cell: Cell, image: str) -> CellOutcome:
        work = cell_work(self.paths, cell)
        for old in (work / "report.json", work / STATS_NAME):
            old.unlink(missing_ok=True)
        (work / "home").mkdir(parents=True, exist_ok=True)
        self.paths.object_cache.mkdir(parents=True, exist_ok=True)
        stage = "wheels" if self.options.smoke else "build"
        run = container_run(cell, image, self.paths, stage, self.epoch, self.options.extra_env)
        argv = self.engine.run_argv(run)
        log = work / "container.log"
        self.log(f"  container: {image}, {cell.limits.describe()}; log {log}")
        start = time.perf_counter()
        with log.open("w") as out:
            out.write("$ " + " ".join(argv) + "\n")
            out.flush()
            done = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
            )
        seconds = time.perf_counter() - start
        stats = ContainerStats.load(work / STATS_NAME)
        inner = _load_report(work / "report.json", cell.id)
        if inner is None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise EngineError(
                f"cell {cell.id}: the container ended (exit {done.returncode}) without a "
                f"report; last lines of {log}:\n  "
                + "\n  ".join(tail)
                + f"\nFix: {self.engine.run_fix(chr(10).join(tail))}"
                + (f"\n{stats.describe()}" if stats else "")
            )
        extra = stats.describe() if stats else "no cgroup figures from the container"
        inner.note = "; ".join(n for n in (inner.note, extra) if n)
        self.log(f"  container: exit {done.returncode} after {seconds:.1f} s; {extra}")
        if inner.status != CellStatus.BUILT:
            return CellOutcome(inner)
        tag = json.loads((work / "cells" / cell.id / "cell.json").read_text())["tag"]
        return CellOutcome(
            inner,
            Candidate(
                cell.id, cell.variant, Path(tag["path"]), tag["platform_reason"], inner.smoke
            ),
        )


def _load_report(path: Path, cell_id: str) -> CellReport | None:
    try:
        rows = [CellReport.from_dict(d) for d in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return None
    return next((r for r in rows if r.cell == cell_id), None)
