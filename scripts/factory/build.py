"""Build: one cell's wheel with `pip wheel --no-build-isolation` in its staged sources.

What is built is the cell's BuildRequest (build_tools/request.py: binding, kernel set,
version label, torch requirement, C++ standard), written as JSON into the cell's build
directory and named by FLASH_ATTN_BUILD_REQUEST, the one variable of the contract:
setup.py alone turns it into a wheel. How fast it is built stays in the environment (the
planned MAX_JOBS/NVCC_THREADS, the shared object cache). Wall time, CPU time and peak
RSS of the whole build measured, the log kept."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from build_tools.request import BINDING_ENV, KERNEL_KNOBS, LABEL_ENV, REQUEST_ENV
from build_tools.toolchain import run_measured
from build_tools.version import read_version

from .errors import FactoryError
from .installer import hermetic_env
from .matrix import Cell
from .plan import CellPlan
from .provision import Toolchain


@dataclass(frozen=True)
class RawWheel:
    cell_id: str
    path: str
    base_version: str  # flash_attn.__version__ without the local label
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    objects: int
    cache_hits: int
    compiled: int
    log: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_date_epoch(repo: Path) -> int:
    """SOURCE_DATE_EPOCH if set, else the commit time of HEAD (a rebuild of the same
    commit stamps the same times), else 1980-01-01."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").strip().isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%ct"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0 and done.stdout.strip().isdigit():
            return int(done.stdout.strip())
    except OSError:
        pass
    return 315532800


REQUEST_FILE = "build_request.json"
# what a developer's build reads from the environment and a factory build must not: the
# request file alone says what is built (an exported FLASH_ATTN_HEAD_DIMS stays out)
REQUEST_OWNED = (*KERNEL_KNOBS.values(), LABEL_ENV, BINDING_ENV, REQUEST_ENV)


def write_request(cell: Cell, cell_dir: Path) -> Path:
    """The cell's BuildRequest as JSON in its build directory; its path."""
    path = cell_dir / REQUEST_FILE
    cell.request().write(path)
    return path


def build_env(
    request: Path,
    plan: CellPlan | None,
    object_cache: Path,
    epoch: int,
    extra: dict[str, str] | None = None,
    toolchain: Toolchain | None = None,
) -> dict[str, str]:
    """The build's environment: FLASH_ATTN_BUILD_REQUEST plus how to build (toolchain,
    parallelism, object cache, reproducibility stamps); nothing else says what."""
    # `pip wheel --no-deps --no-build-isolation` installs nothing, but the machine's pip
    # configuration and PYTHONPATH stay out of the build all the same
    env = hermetic_env()
    for owned in REQUEST_OWNED:
        env.pop(owned, None)
    if toolchain is not None:
        env.update(toolchain.env())
    if plan is not None:
        env.update(plan.env())
    env["FLASH_ATTN_OBJECT_CACHE"] = str(object_cache.resolve())
    env[REQUEST_ENV] = str(request.resolve())
    env["SOURCE_DATE_EPOCH"] = str(epoch)
    env["PYTHONHASHSEED"] = "0"
    env.update(extra or {})
    return env


def build_wheel(
    cell: Cell,
    toolchain: Toolchain,
    src: Path,
    out_dir: Path,
    log: Path,
    env: dict[str, str],
) -> RawWheel:
    """pip wheel in the staged sources; a failure raises FactoryError naming the log."""
    if out_dir.exists():
        for old in out_dir.glob("*.whl"):
            old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    if log.exists():
        log.unlink()
    cmd = [
        toolchain.python,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-build-isolation",
        "--no-deps",
        "--no-cache-dir",
        "-w",
        str(out_dir),
        str(src),
    ]
    # the whole build measured as one tree; its compiles keep their own, higher OOM score
    m = run_measured(cmd, env, log=log, cwd=src, oom_score_adj=None)
    wheels = sorted(out_dir.glob("*.whl"))
    if m.returncode != 0 or len(wheels) != 1:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise FactoryError(
            f"cell {cell.id}: the build failed (exit {m.returncode}); last lines of {log}:\n{tail}"
        )
    objects = cache_hits = compiled = 0
    report = src / "build" / "kernel_build_times.json"
    if report.is_file():
        records = json.loads(report.read_text()).get("objects", [])
        objects = len(records)
        cache_hits = sum(1 for r in records if r.get("status") == "reused")
        compiled = sum(1 for r in records if r.get("status") == "compiled")
    return RawWheel(
        cell_id=cell.id,
        path=str(wheels[0]),
        base_version=read_version(src / "flash_attn" / "__init__.py"),
        wall_s=m.wall_s,
        cpu_s=m.cpu_s,
        peak_rss_bytes=m.peak_rss_bytes,
        objects=objects,
        cache_hits=cache_hits,
        compiled=compiled,
        log=str(log),
    )
