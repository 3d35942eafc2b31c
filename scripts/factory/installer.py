"""Installing a hermetic toolchain's packages: with uv or pip, from the index the factory
names and from nothing else.

The machine's package configuration is not the factory's. pip reads PIP_* variables and
pip.conf files (global, user, site), uv reads UV_* variables and uv.toml files; any of
them can add an index or a find-links directory (a CPU torch in a CUDA cell), cap a
version with a constraint, or switch the index off. Every command here runs with them
dropped (hermetic_env; PIP_CONFIG_FILE=/dev/null makes pip read no file, `--no-config`
does it for uv) and the index on its command line. What is kept only moves bytes and
never chooses them: certificates, proxies, timeouts, the download caches.

uv installs from its cache by hard links, so a torch that several toolchains (or a
rebuilt one) share takes its disk space once and installs in seconds; pip unpacks every
file again. FLASH_ATTN_INSTALLER=uv|pip chooses; unset: uv where it is found, else pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import FactoryError

INSTALLERS = ("uv", "pip")
TOOL_TIMEOUT_S = 20
INSTALLER_VARIABLE = "FLASH_ATTN_INSTALLER"

# transport and cache settings: kept, as they cannot change what gets installed
KEPT_VARIABLES = frozenset(
    {
        "PIP_CERT",
        "PIP_CLIENT_CERT",
        "PIP_PROXY",
        "PIP_DEFAULT_TIMEOUT",
        "PIP_TIMEOUT",
        "PIP_RETRIES",
        "PIP_CACHE_DIR",
        "UV_CACHE_DIR",
        "UV_NATIVE_TLS",
        "UV_HTTP_TIMEOUT",
        "UV_HTTP_RETRIES",
        "UV_CONCURRENT_DOWNLOADS",
        "UV_CONCURRENT_INSTALLS",
    }
)
# what makes an interpreter see packages outside the environment being installed
DROPPED_VARIABLES = frozenset(
    {"PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONSTARTUP", "VIRTUAL_ENV", "CONDA_PREFIX"}
)


def hermetic_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """environ without the machine's package configuration: every PIP_* and UV_* variable
    but KEPT_VARIABLES, and DROPPED_VARIABLES; pip and uv then read no config file."""
    source = os.environ if environ is None else environ
    env = {
        k: v
        for k, v in source.items()
        if k not in DROPPED_VARIABLES
        and (not k.startswith(("PIP_", "UV_")) or k in KEPT_VARIABLES)
    }
    env["PIP_CONFIG_FILE"] = os.devnull  # pip: no global, user or site pip.conf
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["UV_NO_CONFIG"] = "1"  # uv: no uv.toml (the commands say --no-config, too)
    env["UV_PYTHON_DOWNLOADS"] = "never"  # the cell's interpreter, never a downloaded one
    env["PYTHONNOUSERSITE"] = "1"
    return env


@dataclass(frozen=True)
class PackageIndex:
    """Where packages come from: one index (plus PyPI-style extra indexes the factory
    names, e.g. PyTorch's per-CUDA one), or a wheelhouse alone."""

    url: str = ""
    extra_urls: tuple[str, ...] = ()
    wheelhouse: Path | None = None  # set: install from this directory and nothing else

    def args(self) -> list[str]:
        if self.wheelhouse is not None:
            return ["--no-index", "--find-links", str(self.wheelhouse)]
        if not self.url:
            raise FactoryError("a hermetic install needs an index url or a wheelhouse")
        args = ["--index-url", self.url]
        for url in self.extra_urls:
            args += ["--extra-index-url", url]
        return args

    def describe(self) -> str:
        if self.wheelhouse is not None:
            return f"wheelhouse {self.wheelhouse} only"
        return " + ".join((self.url, *self.extra_urls))


def find_uv() -> str | None:
    """uv on PATH, next to this interpreter (a venv that is not activated), or the one
    the `uv` Python package carries."""
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return str(find_uv_bin())
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Installer:
    kind: str  # "uv" or "pip"
    uv: str = ""  # uv's path, for kind "uv"
    reason: str = ""  # why this installer

    def _run(
        self, cmd: list[str], log: Path, what: str, extra_env: Mapping[str, str] | None = None
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            env = {**hermetic_env(), **(extra_env or {})}
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0:
            raise FactoryError(f"{what} failed ({self.kind}, exit {done.returncode}); see {log}")

    def make_venv(self, base_python: str, venv: Path, log: Path) -> None:
        """A fresh venv of base_python at venv (uv's has no pip; pip's has)."""
        if self.kind == "uv":
            cmd = [self.uv, "venv", "--no-config", "--python", base_python, str(venv)]
        else:
            cmd = [base_python, "-m", "venv", str(venv)]
        self._run(cmd, log, f"making the venv {venv}")

    def install(
        self, python: str, requirements: Sequence[str], index: PackageIndex, log: Path
    ) -> None:
        """Install requirements (and what they need) into python's environment."""
        if self.kind == "uv":
            cmd = [self.uv, "pip", "install", "--no-config", "--python", python]
            cmd += ["--link-mode", "hardlink"]
        else:
            cmd = [python, "-m", "pip", "install", "--disable-pip-version-check"]
        self._run([*cmd, *index.args(), *requirements], log, f"installing {' '.join(requirements)}")

    def install_target(
        self, python: str, requirements: Sequence[str], target: Path, index: PackageIndex,
        log: Path,
    ) -> None:
        """Install requirements into a plain directory: an optional tool, so a machine
        without network gives up after TOOL_TIMEOUT_S (and one retry), not minutes."""
        if self.kind == "uv":
            cmd = [self.uv, "pip", "install", "--no-config", "--python", python]
        else:
            cmd = [python, "-m", "pip", "install", "--disable-pip-version-check"]
            cmd += ["--timeout", str(TOOL_TIMEOUT_S), "--retries", "1"]
        cmd += ["--target", str(target), *index.args(), *requirements]
        quick = {"UV_HTTP_TIMEOUT": str(TOOL_TIMEOUT_S), "UV_HTTP_RETRIES": "1"}
        self._run(cmd, log, f"installing {' '.join(requirements)}", quick)


def pip_download(
    python: str, requirements: Sequence[str], dest: Path, index: PackageIndex, log: Path
) -> None:
    """Download requirements and what they need into dest, for python's platform (uv has
    no download command); files already there are reused."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "download", "--disable-pip-version-check"]
    cmd += ["--dest", str(dest), "--find-links", str(dest), *index.args(), *requirements]
    Installer("pip")._run(cmd, log, f"downloading {' '.join(requirements)}")


def select_installer(environ: Mapping[str, str] | None = None) -> Installer:
    """FLASH_ATTN_INSTALLER (uv or pip); unset: uv where it is found, else pip."""
    env = os.environ if environ is None else environ
    wanted = env.get(INSTALLER_VARIABLE, "").strip()
    if wanted and wanted not in INSTALLERS:
        raise FactoryError(
            f"{INSTALLER_VARIABLE}={wanted!r} is not an installer; valid: {', '.join(INSTALLERS)}"
        )
    if wanted == "pip":
        return Installer("pip", reason=f"{INSTALLER_VARIABLE}=pip")
    uv = find_uv()
    if uv is not None:
        why = f"{INSTALLER_VARIABLE}=uv" if wanted else "uv found"
        return Installer("uv", uv, reason=f"{why}: {uv}")
    if wanted == "uv":
        raise FactoryError(
            f"{INSTALLER_VARIABLE}=uv, but uv is not on PATH, next to {sys.executable}, or "
            "importable; `python3 -m pip install uv`, or FLASH_ATTN_INSTALLER=pip"
        )
    return Installer("pip", reason="uv not found (python3 -m pip install uv: faster, less disk)")
