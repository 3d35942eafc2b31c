"""The factory's steps as cibuildwheel hooks ([tool.cibuildwheel] in pyproject.toml).

cibuildwheel drives its own loop (one container, one build per CPython) and calls these
at its hook points, so its wheels go through the same steps as the factory's own:

before-all   provision_pip_cuda: the CUDA compiler from the package index, every
             component pinned to the cell's release (provision.cuda_requirements)
before-all   build-request (cli): the variant's BuildRequest, which FLASH_ATTN_BUILD_REQUEST
             names for every build (setup.py alone decides what that means)
environment  planned_env: MAX_JOBS and NVCC_THREADS from the build planner
repair       repair_wheel: the factory's tag stage (auditwheel with torch's and CUDA's
             libraries excluded, then the reproducible rewrite with the version label)
test         cli `smoke-wheel --in-place`: the smoke gate in cibuildwheel's test venv

The variant (CUDA, torch, ABI, kernel set) is one selection, FLASH_ATTN_MATRIX; the
CPython of each build comes from cibuildwheel's identifier (the wheel's tag). A stable
variant is one abi3 wheel: cibuildwheel (>= 2.5) builds it at the first identifier
(cp310), sees that it is abi3 and only tests it under the later ones (identifiers).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from build_tools.request import BuildRequest

from .build import source_date_epoch
from .cellref import cell_for_wheel, variant_cells
from .errors import FactoryError
from .matrix import MatrixSpec, stable_pythons
from .objects import kernel_groups
from .plan import plan_cell
from .provision import cuda_requirements, find_pip_cuda_home
from .tag import TaggedWheel, tag_wheel
from .wheelfile import read_wheel_info


def provision_pip_cuda(cuda: str, prefix: Path, python: str) -> Path:
    """A venv at prefix/venv with the CUDA compiler of release `cuda` from the package
    index; prefix/home links to its CUDA_HOME. Returns the link."""
    venv = prefix / "venv"
    reqs = cuda_requirements(cuda)
    for cmd in (
        [python, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            *reqs,
        ],
    ):
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            raise FactoryError(f"CUDA {cuda} from the package index: {' '.join(cmd)} failed")
    home = find_pip_cuda_home(str(venv / "bin" / "python"))
    if home is None:
        raise FactoryError(f"CUDA {cuda}: no nvidia/*/bin/nvcc in {venv} after installing {reqs}")
    link = prefix / "home"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(home, target_is_directory=True)
    return link


def identifiers(selection: str, spec: MatrixSpec, platform: str = "manylinux_x86_64") -> list[str]:
    """cibuildwheel's build identifiers of a variant: one per cell (classic), or the
    CPythons the one abi3 wheel is built at (the first) and tested under (stable)."""
    cells = variant_cells(selection, spec)
    if len({c.variant for c in cells}) != 1:
        names = ", ".join(sorted({c.variant for c in cells}))
        raise FactoryError(f"MATRIX={selection!r} spans variants {names}; cibuildwheel runs one")
    if cells[0].stable:
        return [f"cp{p.replace('.', '')}-{platform}" for p in stable_pythons(spec)]
    return [f"{c.python_tag}-{platform}" for c in cells]


def build_request(selection: str, spec: MatrixSpec) -> BuildRequest:
    """The one BuildRequest of a variant (its cells differ in CPython only)."""
    requests = {c.request() for c in variant_cells(selection, spec)}
    if len(requests) != 1:
        raise FactoryError(
            f"MATRIX={selection!r} spans {len(requests)} build requests; name one variant"
        )
    return requests.pop()


def planned_env(selection: str, spec: MatrixSpec, repo: Path, object_cache: Path) -> dict[str, str]:
    """MAX_JOBS and NVCC_THREADS the planner gives the variant's build here and now (its
    cells share one set of kernel objects, so any of them plans the same)."""
    groups = kernel_groups(variant_cells(selection, spec), spec)
    if len(groups) != 1:
        names = ", ".join(g.name for g in groups)
        raise FactoryError(f"MATRIX={selection!r} spans kernel groups {names}; name one variant")
    return plan_cell(groups[0].first, repo, object_cache).env()


def repair_wheel(
    selection: str, wheel: Path, dest: Path, spec: MatrixSpec, repo: Path
) -> TaggedWheel:
    cell = cell_for_wheel(selection, wheel, spec)
    base_version = read_wheel_info(wheel).version.partition("+")[0]
    dest.mkdir(parents=True, exist_ok=True)
    return tag_wheel(cell, wheel, base_version, dest, source_date_epoch(repo))
