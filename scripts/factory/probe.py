"""What an environment has: interpreters, the torch in one of them, the CUDA compiler.

Torch is probed in a subprocess of the interpreter in question (never imported
into the factory's own process), so one factory run can look at several pythons.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from build_tools.knobs import BuildConfigError
from build_tools.toolchain import find_cuda_home, nvcc_release

from .errors import FactoryError
from .matrix import LocalFacts

_PROBE = r"""
import json, sys
out = {"python": "%d.%d" % sys.version_info[:2], "executable": sys.executable,
       "torch": None, "torch_dist": None, "torch_cuda": None, "cxx11abi": None,
       "torch_requires": [], "flash_attn": None, "gpu_arch": None,
       "torch_requires_python": "", "torch_dir": None}
try:
    import importlib.metadata as md
    try:
        out["torch_requires"] = list(md.requires("torch") or [])
        out["torch_dist"] = md.version("torch")
        out["torch_requires_python"] = md.metadata("torch").get("Requires-Python") or ""
    except md.PackageNotFoundError:
        pass
    try:
        out["flash_attn"] = md.version("flash-attn")
    except md.PackageNotFoundError:
        pass
    import torch
    out["torch"] = torch.__version__
    out["torch_dir"] = torch.__path__[0]
    out["torch_cuda"] = torch.version.cuda
    out["cxx11abi"] = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        out["gpu_arch"] = "%d%d" % (major, minor)
except Exception as e:  # noqa: BLE001 - reported, not raised
    out["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class PythonFacts:
    """One interpreter and the torch it imports."""

    python: str  # "3.11"
    executable: str
    torch: str | None  # "2.13.0+cpu"
    torch_cuda: str | None  # "13.0"; None for a CPU build
    cxx11abi: bool | None
    torch_requires: tuple[str, ...] = ()
    flash_attn: str | None = None
    gpu_arch: str | None = None
    error: str = ""
    # the distribution's version (what pip installs): 2.13.0 where torch says 2.13.0+cu130
    torch_dist: str | None = None
    torch_requires_python: str = ""  # the torch distribution's Requires-Python
    torch_dir: str | None = None  # the torch package's directory

    @property
    def torch_minor(self) -> str | None:
        if not self.torch:
            return None
        m = re.match(r"(\d+\.\d+)", self.torch)
        return m.group(1) if m else None


def probe_python(executable: str, env: dict[str, str] | None = None) -> PythonFacts:
    if os.sep in executable:  # a relative path; not resolved: a venv's python is a symlink
        executable = os.path.abspath(executable)
    try:
        done = subprocess.run(
            [executable, "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            env=env,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FactoryError(f"cannot run the interpreter {executable}: {e}") from e
    if done.returncode != 0:
        raise FactoryError(f"probing {executable} failed (exit {done.returncode}):\n{done.stderr}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return PythonFacts(
        python=data["python"],
        executable=data["executable"],
        torch=data["torch"],
        torch_cuda=data["torch_cuda"],
        cxx11abi=data["cxx11abi"],
        torch_requires=tuple(data["torch_requires"]),
        flash_attn=data["flash_attn"],
        gpu_arch=data["gpu_arch"],
        error=data.get("error", ""),
        torch_dist=data.get("torch_dist"),
        torch_requires_python=data.get("torch_requires_python", ""),
        torch_dir=data.get("torch_dir"),
    )


def _pyenv_root() -> Path:
    return Path(os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv")))


def list_interpreters() -> dict[str, str]:
    """{'3.11': '/path/to/python3.11', ...}: this one, pyenv's builds, PATH's pythonX.Y."""
    found: dict[str, str] = {f"{sys.version_info[0]}.{sys.version_info[1]}": sys.executable}
    for exe in sorted(glob.glob(str(_pyenv_root() / "versions" / "*" / "bin" / "python3.*"))):
        m = re.search(r"python(3\.\d+)$", exe)
        if m and m.group(1) not in found and os.access(exe, os.X_OK):
            found[m.group(1)] = exe
    for minor in range(8, 16):
        name = f"python3.{minor}"
        if f"3.{minor}" not in found:
            exe = shutil.which(name)
            if exe:
                found[f"3.{minor}"] = exe
    return found


def find_interpreter(python: str) -> str:
    found = list_interpreters()
    if python in found:
        return found[python]
    have = ", ".join(f"{v} ({p})" for v, p in sorted(found.items())) or "none"
    raise FactoryError(
        f"no python {python} interpreter on this machine (looked at this python, pyenv "
        f"under {_pyenv_root()}, and python{python} on PATH); found: {have}. Interpreters "
        "cannot be downloaded here: install one, or select python values from that list."
    )


def nvcc_version(cuda_home: Path | None = None) -> str | None:
    """'13.0' for the nvcc of cuda_home, or of the toolkit build_tools finds (CUDA_HOME,
    CUDA_PATH, PATH, /usr/local/cuda: find_cuda_home, the one place that looks); None
    without one."""
    if cuda_home is None:
        try:
            cuda_home = find_cuda_home(os.environ)
        except BuildConfigError:
            return None
    return nvcc_release(cuda_home / "bin" / "nvcc")


def local_facts(python_exe: str | None = None) -> LocalFacts:
    facts = probe_python(python_exe or sys.executable)
    return LocalFacts(
        python=facts.python,
        torch=facts.torch_minor,
        torch_cuda=facts.torch_cuda,
        torch_cxx11abi=facts.cxx11abi,
        nvcc=nvcc_version(),
        torch_version=facts.torch_dist or facts.torch,
        torch_requires=facts.torch_requires,
        torch_requires_python=facts.torch_requires_python,
        torch_dir=facts.torch_dir,
    )
