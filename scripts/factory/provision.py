"""Provision: the toolchain a cell builds with, checked against the cell and the table.

`system` uses what is installed (the interpreter of the cell's python, the torch in
it, the nvcc on this machine): how the factory runs on a GPU box without network.

`hermetic` makes a venv per (python, torch, CUDA) from the index recipes/toolchain.toml
names, with nothing of the machine's pip or uv configuration (installer.py), and stops
a cell whose torch there is not the cell's CUDA build. With uv the venvs are hard links
into uv's cache: a torch shared by several toolchains, or a toolchain made again, costs
its disk once and seconds to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from build_tools.request import minor_tuple
from build_tools.toolchain import cuda_tool, pip_cuda_home

from .errors import FactoryError
from .installer import Installer, PackageIndex, pip_download, select_installer
from .matrix import Cell, MatrixSpec
from .probe import PythonFacts, find_interpreter, nvcc_version, probe_python
from .toolchain_spec import INDEX_VARIABLE, load_toolchain_spec

TOOLCHAINS = ("system", "hermetic")
# a builder image names the wheelhouse its toolchains were made from: they are checked
# against it (and remade from it alone), not against the package index it cannot reach
WHEELHOUSE_VARIABLE = "FLASH_ATTN_WHEELHOUSE"
# a torch requirement that names its CUDA: cuda-toolkit==13.0.3, nvidia-cuda-runtime-cu12==12.8
_CUDA_REQ = re.compile(r"(cuda-toolkit|nvidia-cuda-runtime(?:-cu\d+)?)\b[^0-9;]*(\d+\.\d+)")


@dataclass(frozen=True)
class Toolchain:
    kind: str
    python: str  # the interpreter's path
    torch: str  # "2.13.0+cpu"
    torch_cuda: str | None
    cxx11abi: bool
    nvcc: str  # "13.0"
    notes: tuple[str, ...] = ()  # where the installed torch disagrees with the table
    cuda_home: str = ""  # set for hermetic: the CUDA compiler assembled from pip packages
    # hermetic: the smoke venv sees this toolchain's environment (its torch) and nothing
    # of the base interpreter's
    isolated: bool = False
    torch_dist: str = ""  # the torch distribution's version, what pip installs
    cuobjdump: str = ""  # the smoke stage's arch check; "" where none was found
    origin: str = ""  # hermetic: how this run got it ("made by uv in 9.1 s", "cached")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def env(self) -> dict[str, str]:
        """What the build's environment needs to use this toolchain."""
        if not self.cuda_home:
            return {}
        return {
            "CUDA_HOME": self.cuda_home,
            "PATH": f"{self.cuda_home}/bin{os.pathsep}{os.environ.get('PATH', '')}",
        }


def _abi(flag: bool) -> str:
    return "TRUE" if flag else "FALSE"


def table_disagreements(cell: Cell, spec: MatrixSpec, facts: PythonFacts) -> list[str]:
    """What the torch wheel's own metadata says that the table does not."""
    notes: list[str] = []
    release = spec.torch.get(cell.torch)
    if release is None or facts.torch is None:
        return notes
    if facts.cxx11abi is not None and facts.cxx11abi not in release.cxx11abi:
        notes.append(
            f"table says torch {cell.torch} pip wheels have cxx11abi "
            f"{'/'.join(_abi(a) for a in release.cxx11abi)}; installed {facts.torch} has "
            f"{_abi(facts.cxx11abi)}"
        )
    if facts.torch_cuda and facts.torch_cuda not in release.cuda:
        notes.append(
            f"table lists CUDA builds {', '.join(release.cuda)} for torch {cell.torch}; "
            f"installed {facts.torch} is built with CUDA {facts.torch_cuda}"
        )
    for req in facts.torch_requires:
        m = _CUDA_REQ.match(req)
        if m and m.group(2) not in release.cuda:
            notes.append(
                f"torch {facts.torch} requires {req.split(';')[0].strip()}, a CUDA "
                f"the table does not list for torch {cell.torch}"
            )
    if not release.supports_python(facts.python):
        notes.append(
            f"torch {facts.torch} is installed for python {facts.python}, outside the "
            f"table's {release.python_min}-{release.python_max}"
        )
    return notes


def _at_least(minor: str | None, floor: str) -> bool:
    if not minor or not floor:
        return False
    return minor_tuple(minor, "torch") >= minor_tuple(floor, "stable floor")


def nvcc_serves_older(nvcc: str, cuda: str) -> bool:
    """Whether nvcc (13.0) may build a cell of a newer CUDA minor of its major (13.2):
    code built by an older toolkit runs under a newer runtime of the same major."""
    try:
        have = tuple(int(x) for x in nvcc.split(".")[:2])
        want = tuple(int(x) for x in cuda.split(".")[:2])
    except ValueError:
        return False
    return have[0] == want[0] and have[1] < want[1]


def provision_system(cell: Cell, spec: MatrixSpec, tools: Path | None = None) -> Toolchain:
    """The installed toolchain for a cell, or a FactoryError saying what does not match.
    tools: where a missing cuobjdump may be installed (else the arch check goes without)."""
    exe = find_interpreter(cell.python)
    facts = probe_python(exe)
    if facts.torch is None:
        raise FactoryError(
            f"cell {cell.id}: python {cell.python} ({exe}) cannot import torch"
            f"{' (' + facts.error + ')' if facts.error else ''}; the system toolchain builds "
            f"with what is installed: `{exe} -m pip install '{cell.requires_torch}'`, or select "
            "another python"
        )
    stable_note = ""
    if (
        cell.stable
        and facts.torch_minor != cell.torch
        and _at_least(facts.torch_minor, cell.torch_floor)
    ):
        # the stable binding compiles against any torch from the floor on: the headers are
        # pinned to the floor (TORCH_TARGET_VERSION), so the module is the same
        stable_note = (
            f"stable cell built against the installed torch {facts.torch} (headers pinned to "
            f"torch {cell.torch_floor} by TORCH_TARGET_VERSION), not the floor torch {cell.torch}"
        )
    elif facts.torch_minor != cell.torch:
        raise FactoryError(
            f"cell {cell.id} needs torch {cell.torch}; python {cell.python} ({exe}) has torch "
            f"{facts.torch}. Select torch={facts.torch_minor}, or install "
            f"'{cell.requires_torch}' there"
        )
    if facts.cxx11abi is not None and facts.cxx11abi != cell.cxx11abi:
        raise FactoryError(
            f"cell {cell.id} wants cxx11abi={cell.abi_text}, but torch {facts.torch} in {exe} "
            f"is built with cxx11abi={_abi(facts.cxx11abi)}; an extension must match its torch"
        )
    nvcc = nvcc_version()
    if nvcc is None:
        raise FactoryError(
            "no CUDA compiler: nvcc is not in CUDA_HOME, on PATH or in /usr/local/cuda; "
            "install a CUDA toolkit and set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda-13.0"
        )
    older_minor = nvcc_serves_older(nvcc, cell.cuda)
    if nvcc != cell.cuda and not older_minor:
        raise FactoryError(
            f"cell {cell.id} needs CUDA {cell.cuda}; this machine's nvcc is {nvcc} (an older "
            f"nvcc of the same CUDA major builds for a newer minor, never the other way). "
            f"Select cuda={nvcc} or point CUDA_HOME at a CUDA {cell.cuda} toolkit"
        )
    notes = table_disagreements(cell, spec, facts)
    if older_minor:
        notes.append(
            f"nvcc {nvcc} builds the kernels of this CUDA {cell.cuda} cell: CUDA's minor-version "
            f"compatibility runs them under any {cell.cuda.split('.')[0]}.x runtime at or above "
            f"{nvcc}; the wheel is labelled for torch's CUDA {cell.cuda} and its build record "
            f"says kernels CUDA {nvcc}"
        )
    if stable_note:
        notes.append(stable_note)
    if cell.stable:
        pass  # the stable module calls torch's C shims only: any CUDA build of torch serves
    elif facts.torch_cuda and facts.torch_cuda.split(".")[0] != cell.cuda.split(".")[0]:
        raise FactoryError(
            f"cell {cell.id}: torch {facts.torch} is built with CUDA {facts.torch_cuda}, "
            f"another major than the cell's CUDA {cell.cuda}"
        )
    if not facts.torch_cuda:
        notes.append(
            f"torch {facts.torch} is a CPU build: the binding is device-generic, so the wheel "
            f"still serves torch {cell.torch} CUDA builds; GPU checks need a CUDA torch"
        )
    cuobjdump, note = find_or_fetch_cuobjdump(cell, exe, tools)
    if note:
        notes.append(note)
    return Toolchain(
        kind="system",
        python=exe,
        torch=facts.torch,
        torch_cuda=facts.torch_cuda,
        cxx11abi=bool(facts.cxx11abi),
        nvcc=nvcc,
        notes=tuple(notes),
        cuobjdump=cuobjdump,
    )


def find_or_fetch_cuobjdump(cell: Cell, python: str, tools: Path | None) -> tuple[str, str]:
    """(cuobjdump's path or "", a note): the smoke stage's arch check needs cuobjdump. The
    CUDA toolkit's (build_tools.toolchain.find_cuda_home), PATH's, or the pip package's in
    python's site-packages; else the recipe's pip package (nvidia-cuda-cuobjdump) is
    installed under tools/, once (a failure is remembered there: delete it to retry)."""
    found = cuda_tool("cuobjdump", os.environ, site_dirs(python))
    if found is not None:
        return str(found), ""
    requirement = load_toolchain_spec().cuobjdump_requirement(cell.cuda)
    skipped = "the smoke stage checks archs by build_info() alone"
    if not requirement:
        return "", f"no cuobjdump here, and no pip package of it for CUDA {cell.cuda}: {skipped}"
    if tools is None:
        return "", f"no cuobjdump here ({requirement} would provide it): {skipped}"
    target = tools / f"cuobjdump-{cell.cuda_tag}"
    failed = target / "factory-failed.txt"
    if not failed.is_file():
        hits = sorted(target.glob("nvidia/*/bin/cuobjdump"))
        if not hits:
            log = tools / f"cuobjdump-{cell.cuda_tag}.log"
            index = PackageIndex(load_toolchain_spec().index_url)
            try:
                select_installer().install_target(python, [requirement], target, index, log)
            except FactoryError as e:
                target.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{e}\n")
            hits = sorted(target.glob("nvidia/*/bin/cuobjdump"))
        if hits:
            return str(hits[-1]), f"cuobjdump from {requirement} ({hits[-1]})"
    why = failed.read_text().strip() if failed.is_file() else "no nvidia/*/bin/cuobjdump in it"
    return "", (
        f"no cuobjdump: installing {requirement} into {target} failed ({why}; delete "
        f"{target} to retry): {skipped}"
    )


# --- hermetic: a cached venv per (python, torch, cuda) from the package index -----------


def cuda_requirements(cuda: str) -> list[str]:
    """The CUDA compiler as pip packages, every component pinned to the same release
    (recipes/toolchain.toml: a newer nvidia-nvvm next to an older ptxas emits PTX that
    ptxas rejects)."""
    return load_toolchain_spec().cuda_requirements(cuda)


def find_pip_cuda_home(venv_python: str) -> Path | None:
    """site-packages/nvidia/<pkg> that holds bin/nvcc (cu13: nvidia/cu13)."""
    for site in site_dirs(venv_python):
        home = pip_cuda_home(site)
        if home is not None:
            return home
    return None


def site_dirs(python: str) -> list[Path]:
    """The purelib and platlib directories of an interpreter's environment."""
    done = subprocess.run(
        [python, "-I", "-c", _SITE_DIRS], capture_output=True, text=True, check=False, cwd="/"
    )
    if done.returncode != 0:
        raise FactoryError(f"cannot ask {python} for its site-packages: {done.stderr.strip()}")
    return [Path(d) for d in json.loads(done.stdout.strip().splitlines()[-1])]


_SITE_DIRS = (
    "import json, sysconfig; p = sysconfig.get_paths(); "
    "print(json.dumps(sorted({p['purelib'], p['platlib']})))"
)


def toolchain_requirements(cell: Cell, spec: MatrixSpec) -> list[str]:
    """What a cell's hermetic venv installs: build tools, its torch, its CUDA compiler and,
    where the index has it, the cuobjdump of the smoke stage's arch check."""
    tspec = load_toolchain_spec()
    release = spec.torch[cell.torch]
    cuobjdump = tspec.cuobjdump_requirement(cell.cuda)
    return [
        *tspec.build,
        release.requirement,
        *tspec.cuda_requirements(cell.cuda),
        *([cuobjdump] if cuobjdump else []),
    ]


def toolchain_index(cell: Cell, spec: MatrixSpec, wheelhouse: Path | None = None) -> PackageIndex:
    """The index the cell's toolchain comes from: the recipe's (torch's index_cuda build),
    plus PyTorch's per-CUDA index for another CUDA build; a wheelhouse alone if given."""
    if wheelhouse is not None:
        return PackageIndex(wheelhouse=wheelhouse)
    tspec = load_toolchain_spec()
    release = spec.torch.get(cell.torch)
    # a stable cell builds against the index's own build of the floor torch: the module
    # calls torch's C shims only, so torch's CUDA build does not matter to it
    same = release is None or cell.stable or cell.cuda == release.index_cuda
    extra = () if same else (tspec.torch_index(cell.cuda_tag),)
    return PackageIndex(tspec.index_url, extra)


def hermetic_venv_name(cell: Cell) -> str:
    return f"{cell.python_tag}-torch{cell.torch}-{cell.cuda_tag}"


def fill_wheelhouse(
    python: str,
    requirements: list[str],
    wheelhouse: Path,
    log: Path,
    index: PackageIndex | None = None,
) -> None:
    """Download requirements (and what they need) from index (default: the recipe's) into
    wheelhouse, for python's platform; files already there are reused."""
    log.parent.mkdir(parents=True, exist_ok=True)
    index = index or PackageIndex(load_toolchain_spec().index_url)
    pip_download(python, requirements, wheelhouse, index, log)


_CUDA_LABEL = re.compile(r"\+(cu\d+|cpu|rocm[\d.]+|xpu)\b")


def cuda_build_mismatch(cell: Cell, facts: PythonFacts) -> list[str]:
    """Why the torch in facts is not the cell's CUDA build ([] when it is): its
    torch.version.cuda, its local version label (+cu130, +cpu), and the CUDA release
    its metadata requires (Requires-Dist: cuda-toolkit==13.0.3 or nvidia-*-cuXY)."""
    why: list[str] = []
    if not facts.torch_cuda:
        why.append("torch.version.cuda is None (a CPU build)")
    elif facts.torch_cuda != cell.cuda:
        why.append(f"torch.version.cuda is {facts.torch_cuda}")
    label = _CUDA_LABEL.search(facts.torch or "")
    if label and label.group(1) != cell.cuda_tag:
        why.append(f"its version label is +{label.group(1)}")
    for req in facts.torch_requires:
        m = _CUDA_REQ.match(req)
        if m and m.group(2) != cell.cuda:
            why.append(f"it requires {req.split(';')[0].strip()}")
    return why


def provision_hermetic(
    cell: Cell,
    spec: MatrixSpec,
    root: Path,
    wheelhouse: Path | None = None,
    installer: Installer | None = None,
) -> Toolchain:
    """A venv of the cell's interpreter with its torch and a pinned CUDA compiler from the
    index the recipe names (the machine's pip and uv configuration ignored), cached under
    root/<python>-torch<minor>-cu<cuda> and reused.

    With a wheelhouse, everything is first downloaded into it (reusing what it holds)
    and installed from it alone: a builder image keeps it, and builds offline."""
    base = find_interpreter(cell.python)
    venv = root / hermetic_venv_name(cell)
    marker = venv / "factory-toolchain.json"
    python = str(venv / "bin" / "python")
    wanted = toolchain_requirements(cell, spec)
    index = toolchain_index(cell, spec, wheelhouse)
    recipe = {"requirements": wanted, "index": index.describe()}
    origin = f"cached in {venv}"
    if not (marker.is_file() and json.loads(marker.read_text()) == recipe):
        start = time.perf_counter()
        installer = installer or select_installer()
        if venv.exists():
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        log = venv.parent / f"{venv.name}.provision.log"
        log.write_text(f"{venv.name}: {installer.kind} ({installer.reason}), {index.describe()}\n")
        # offline (an image built with --network none sets PIP_NO_INDEX=1): the wheelhouse
        # is all there is; asking the index first only retries until pip gives up
        offline = os.environ.get("PIP_NO_INDEX", "").strip().lower() in ("1", "true", "yes")
        if wheelhouse is not None and not offline:
            fill_wheelhouse(base, wanted, wheelhouse, log, toolchain_index(cell, spec))
        installer.make_venv(base, venv, log)
        installer.install(python, wanted, index, log)
        marker.write_text(json.dumps(recipe, indent=2) + "\n")
        origin = f"made by {installer.kind} in {time.perf_counter() - start:.1f} s ({log})"
    facts = probe_python(python)
    if facts.torch is None or facts.torch_minor != cell.torch:
        raise FactoryError(f"hermetic toolchain {venv}: torch {facts.torch} is not {cell.torch}")
    wrong_build = cuda_build_mismatch(cell, facts)
    stable_notes: list[str] = []
    if cell.stable and wrong_build and facts.torch_cuda:
        stable_notes.append(
            f"stable cell: torch {facts.torch} ({'; '.join(wrong_build)}) builds it: the module "
            f"calls torch's C shims only; its kernels are CUDA {cell.cuda} (nvcc below)"
        )
        wrong_build = []
    if wrong_build:
        raise FactoryError(
            f"cell {cell.id}: torch {facts.torch} from {index.describe()} is not a CUDA "
            f"{cell.cuda} build: {'; '.join(wrong_build)}. The hermetic toolchain builds "
            f"and smoke-tests with the cell's own torch; select the cuda that torch "
            f"{cell.torch} has on that index, or name an index with its CUDA {cell.cuda} "
            f"build ({INDEX_VARIABLE}; recipes/toolchain.toml). Toolchain: {venv}"
        )
    if facts.cxx11abi is not None and facts.cxx11abi != cell.cxx11abi:
        raise FactoryError(
            f"cell {cell.id} wants cxx11abi={cell.abi_text}; torch {facts.torch} from the "
            f"package index has cxx11abi={_abi(facts.cxx11abi)}"
        )
    cuda_home = find_pip_cuda_home(python)
    nvcc = nvcc_version(cuda_home) if cuda_home else None
    if cuda_home is None or nvcc != cell.cuda:
        tools = sorted(
            p.name for site in site_dirs(python) for p in site.glob("nvidia/*/bin/*") if p.is_file()
        )
        hint = (
            f"; the packages put {', '.join(tools) or 'nothing'} in nvidia/*/bin and no nvcc "
            f"(nvidia-cuda-nvcc-cu12 carries ptxas alone): build CUDA {cell.cuda} cells with "
            "--toolchain system (TOOLCHAIN=system) and a CUDA toolkit of that release"
            if cuda_home is None
            else ""
        )
        raise FactoryError(
            f"hermetic toolchain {venv}: no nvcc {cell.cuda} from {cuda_requirements(cell.cuda)} "
            f"(found {nvcc or 'none'}){hint}"
        )
    notes = stable_notes + table_disagreements(cell, spec, facts)
    cuobjdump = cuda_home / "bin" / "cuobjdump"
    return Toolchain(
        kind="hermetic",
        python=python,
        torch=facts.torch,
        torch_cuda=facts.torch_cuda,
        cxx11abi=bool(facts.cxx11abi),
        nvcc=nvcc,
        notes=tuple(notes),
        cuda_home=str(cuda_home),
        isolated=True,
        torch_dist=facts.torch_dist or facts.torch,
        cuobjdump=str(cuobjdump) if cuobjdump.is_file() else "",
        origin=origin,
    )


def provision(
    cell: Cell,
    spec: MatrixSpec,
    kind: str = "system",
    root: Path | None = None,
    wheelhouse: Path | None = None,
) -> Toolchain:
    if kind == "system":
        return provision_system(cell, spec, root)
    if kind == "hermetic":
        if root is None:
            raise FactoryError("the hermetic toolchain needs a directory for its venvs")
        if wheelhouse is None and os.environ.get(WHEELHOUSE_VARIABLE, "").strip():
            wheelhouse = Path(os.environ[WHEELHOUSE_VARIABLE].strip())
        return provision_hermetic(cell, spec, root, wheelhouse)
    raise FactoryError(f"toolchain {kind!r} is not known; valid: {', '.join(TOOLCHAINS)}")
