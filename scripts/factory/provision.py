"""Provision: the toolchain a cell builds with, checked against the cell and the table.

`system` uses what is installed (the interpreter of the cell's python, the torch in
it, the nvcc on this machine): how the factory runs on a GPU box without network.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import FactoryError
from .matrix import Cell, MatrixSpec
from .probe import PythonFacts, find_interpreter, nvcc_version, probe_python

TOOLCHAINS = ("system", "hermetic")
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
    isolated: bool = False  # hermetic: the smoke venv installs this exact torch itself
    torch_dist: str = ""  # the torch distribution's version, what pip installs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def env(self) -> dict[str, str]:
        """What the build's environment needs to use this toolchain."""
        if not self.cuda_home:
            return {}
        import os

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


def provision_system(cell: Cell, spec: MatrixSpec, cuda_home: Path | None = None) -> Toolchain:
    """The installed toolchain for a cell, or a FactoryError saying what does not match."""
    exe = find_interpreter(cell.python)
    facts = probe_python(exe)
    if facts.torch is None:
        raise FactoryError(
            f"cell {cell.id}: python {cell.python} ({exe}) cannot import torch"
            f"{' (' + facts.error + ')' if facts.error else ''}; the system toolchain builds "
            f"with what is installed: `{exe} -m pip install '{cell.requires_torch}'`, or select "
            "another python"
        )
    if facts.torch_minor != cell.torch:
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
    nvcc = nvcc_version(cuda_home)
    if nvcc is None:
        raise FactoryError(
            "no CUDA compiler: nvcc is not in CUDA_HOME, on PATH or in /usr/local/cuda; "
            "install a CUDA toolkit and set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda-13.0"
        )
    if nvcc != cell.cuda:
        raise FactoryError(
            f"cell {cell.id} needs CUDA {cell.cuda}; this machine's nvcc is {nvcc}. Select "
            f"cuda={nvcc} or point CUDA_HOME at a CUDA {cell.cuda} toolkit"
        )
    notes = table_disagreements(cell, spec, facts)
    if facts.torch_cuda and facts.torch_cuda.split(".")[0] != cell.cuda.split(".")[0]:
        raise FactoryError(
            f"cell {cell.id}: torch {facts.torch} is built with CUDA {facts.torch_cuda}, "
            f"another major than the cell's CUDA {cell.cuda}"
        )
    if not facts.torch_cuda:
        notes.append(
            f"torch {facts.torch} is a CPU build: the binding is device-generic, so the wheel "
            f"still serves torch {cell.torch} CUDA builds; GPU checks need a CUDA torch"
        )
    return Toolchain(
        kind="system",
        python=exe,
        torch=facts.torch,
        torch_cuda=facts.torch_cuda,
        cxx11abi=bool(facts.cxx11abi),
        nvcc=nvcc,
        notes=tuple(notes),
    )


# --- hermetic: a cached venv per (python, torch, cuda) from the package index -----------

BUILD_REQUIREMENTS = ("setuptools>=64", "wheel", "ninja")


def cuda_requirements(cuda: str) -> list[str]:
    """The CUDA compiler as pip packages, every component pinned to the same release
    (a newer nvidia-nvvm next to an older ptxas emits PTX that ptxas rejects)."""
    major = cuda.split(".")[0]
    if int(major) >= 13:
        return [f"cuda-toolkit[nvcc,cudart,cccl,crt]=={cuda}.*", f"nvidia-nvvm=={cuda}.*"]
    return [
        f"nvidia-cuda-nvcc-cu{major}=={cuda}.*",
        f"nvidia-cuda-runtime-cu{major}=={cuda}.*",
        f"nvidia-cuda-cccl-cu{major}=={cuda}.*",
    ]


def find_pip_cuda_home(venv_python: str) -> Path | None:
    """site-packages/nvidia/<pkg> that holds bin/nvcc (cu13: nvidia/cu13)."""
    done = subprocess.run(
        [venv_python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=False,
    )
    site = Path(done.stdout.strip())
    for nvcc in sorted(site.glob("nvidia/*/bin/nvcc")):
        return nvcc.parent.parent
    return None


def toolchain_requirements(cell: Cell, spec: MatrixSpec) -> list[str]:
    """What a cell's hermetic venv installs: build tools, its torch, its CUDA compiler."""
    release = spec.torch[cell.torch]
    return [*BUILD_REQUIREMENTS, release.requirement, *cuda_requirements(cell.cuda)]


def hermetic_venv_name(cell: Cell) -> str:
    return f"{cell.python_tag}-torch{cell.torch}-{cell.cuda_tag}"


def _pip(python: str, args: list[str], log: Path, verb: str = "install") -> None:
    cmd = [python, "-m", "pip", verb, "--disable-pip-version-check", *args]
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise FactoryError(
            f"hermetic toolchain: pip {verb} failed (exit {done.returncode}); see {log}"
        )


def fill_wheelhouse(python: str, requirements: list[str], wheelhouse: Path, log: Path) -> None:
    """Download requirements (and what they need) into wheelhouse, for python's platform;
    files already there are reused (find-links)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    args = ["--dest", str(wheelhouse), "--find-links", str(wheelhouse), *requirements]
    _pip(python, args, log, verb="download")


def provision_hermetic(
    cell: Cell, spec: MatrixSpec, root: Path, wheelhouse: Path | None = None
) -> Toolchain:
    """A venv of the cell's interpreter with its torch and a pinned CUDA compiler from the
    package index, cached under root/<python>-torch<minor>-cu<cuda> and reused.

    With a wheelhouse, everything is first downloaded into it (reusing what it holds)
    and installed from it alone: a builder image keeps it, so its smoke venvs install
    the cell's torch without a network."""
    base = find_interpreter(cell.python)
    venv = root / hermetic_venv_name(cell)
    marker = venv / "factory-toolchain.json"
    python = str(venv / "bin" / "python")
    wanted = toolchain_requirements(cell, spec)
    if not (marker.is_file() and json.loads(marker.read_text()).get("requirements") == wanted):
        if venv.exists():
            shutil.rmtree(venv)
        venv.mkdir(parents=True)
        log = venv / "provision.log"
        done = subprocess.run(
            [base, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise FactoryError(f"hermetic toolchain: {base} -m venv failed: {done.stderr}")
        if wheelhouse is not None:
            fill_wheelhouse(python, wanted, wheelhouse, log)
            _pip(python, ["--no-index", "--find-links", str(wheelhouse), *wanted], log)
        else:
            _pip(python, wanted, log)
        marker.write_text(json.dumps({"requirements": wanted}, indent=2) + "\n")
    facts = probe_python(python)
    if facts.torch is None or facts.torch_minor != cell.torch:
        raise FactoryError(f"hermetic toolchain {venv}: torch {facts.torch} is not {cell.torch}")
    if facts.cxx11abi is not None and facts.cxx11abi != cell.cxx11abi:
        raise FactoryError(
            f"cell {cell.id} wants cxx11abi={cell.abi_text}; torch {facts.torch} from the "
            f"package index has cxx11abi={_abi(facts.cxx11abi)}"
        )
    cuda_home = find_pip_cuda_home(python)
    nvcc = nvcc_version(cuda_home) if cuda_home else None
    if cuda_home is None or nvcc != cell.cuda:
        raise FactoryError(
            f"hermetic toolchain {venv}: no nvcc {cell.cuda} from {cuda_requirements(cell.cuda)} "
            f"(found {nvcc or 'none'})"
        )
    notes = table_disagreements(cell, spec, facts)
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
    )


def provision(
    cell: Cell,
    spec: MatrixSpec,
    kind: str = "system",
    root: Path | None = None,
    wheelhouse: Path | None = None,
) -> Toolchain:
    if kind == "system":
        return provision_system(cell, spec)
    if kind == "hermetic":
        if root is None:
            raise FactoryError("the hermetic toolchain needs a directory for its venvs")
        return provision_hermetic(cell, spec, root, wheelhouse)
    raise FactoryError(f"toolchain {kind!r} is not known; valid: {', '.join(TOOLCHAINS)}")
