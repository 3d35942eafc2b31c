"""The smoke gate's part for a stable (abi3) wheel: the proof that one wheel serves every
torch from the floor on and every CPython from the abi3 floor on.

Besides the checks every wheel gets in its build toolchain's environment (smoke.py):
- symbols: `nm -D --undefined-only` of the extension names nothing from torch but its
  stable C shims (aoti_torch_*, torch_*) and nothing from Python but the limited API
  (abi3audit checks which); a classic module (c10::, at::) fails here.
- abi3audit: the wheel's extension uses the limited API of its abi3 tag only.
- every (torch, CPython) pair of matrix.toml's [stable] smoke: the wheel installed into a
  fresh venv that sees a cached environment of exactly that torch from the package index
  (recipes/toolchain.toml; the machine's pip and uv configuration ignored; with uv the
  torch is hard-linked from its cache), then the same checks as in the build toolchain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import FactoryError
from .installer import Installer, PackageIndex, select_installer
from .matrix import Cell, MatrixSpec, SmokePair
from .paths import FactoryPaths
from .probe import find_interpreter, probe_python
from .smoke import Check, smoke_wheel
from .toolchain_spec import load_toolchain_spec

# what a stable module may import without a symbol version: torch's C shims, the limited
# Python API (abi3audit checks which names), and the weak hooks every shared object has
SHIM_PREFIXES = ("aoti_torch_", "torch_")
PYTHON_PREFIX = "Py"
WEAK_HOOKS = ("_ITM_deregisterTMCloneTable", "_ITM_registerTMCloneTable", "__gmon_start__")


def undefined_symbols(so: Path) -> list[str]:
    """The dynamic symbols an ELF file imports (`nm -D --undefined-only`)."""
    nm = shutil.which("nm")
    if nm is None:
        raise FactoryError("nm (binutils) is not installed: the stable symbol check needs it")
    done = subprocess.run(
        [nm, "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise FactoryError(f"nm -D {so} failed: {done.stderr.strip()[:200]}")
    return [line.split()[-1] for line in done.stdout.splitlines() if line.strip()]


def foreign_symbols(symbols: list[str]) -> list[str]:
    """The imports that break the stable claim: any unversioned symbol that is neither a
    stable shim, nor Python's, nor a weak hook (versioned ones come from glibc, libstdc++
    and CUDA's runtime, which have their own compatibility rules)."""
    return sorted(
        s
        for s in set(symbols)
        if "@" not in s
        and s not in WEAK_HOOKS
        and not s.startswith((*SHIM_PREFIXES, PYTHON_PREFIX))
    )


def symbols_check(so: Path) -> Check:
    try:
        symbols = undefined_symbols(so)
    except FactoryError as e:
        return Check("symbols", False, str(e))
    foreign = foreign_symbols(symbols)
    shims = sum(1 for s in symbols if s.startswith(SHIM_PREFIXES))
    python = sorted(s for s in set(symbols) if s.startswith(PYTHON_PREFIX))
    if foreign:
        shown = ", ".join(foreign[:8]) + (
            f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        )
        return Check(
            "symbols", False, f"{so.name} imports {len(foreign)} non-shim symbols: {shown}"
        )
    return Check(
        "symbols",
        True,
        f"{so.name}: {shims} torch stable shims, Python {', '.join(python) or 'none'}, "
        "nothing else unversioned",
    )


def _abi3audit() -> list[str] | None:
    exe = shutil.which("abi3audit") or shutil.which(
        "abi3audit", path=str(Path(sys.executable).parent)
    )
    return [exe] if exe else None


def abi3audit_check(wheel: Path, log: Path) -> Check:
    cmd = _abi3audit()
    if cmd is None:
        return Check(
            "abi3audit",
            False,
            "abi3audit is not installed (pip install -r recipes/factory-requirements.txt)",
        )
    done = subprocess.run(
        [*cmd, "--strict", "--summary", str(wheel)], capture_output=True, text=True, check=False
    )
    text = " ".join((done.stdout + done.stderr).split())
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)} --strict --summary {wheel}\n{done.stdout}{done.stderr}\n")
    return Check("abi3audit", done.returncode == 0, text[-300:] or f"exit {done.returncode}")


def extract_extension(wheel: Path, dest: Path) -> Path:
    """The wheel's flash_attn/_C*.so, extracted into dest."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith("flash_attn/_C") and n.endswith(".so")]
        if len(names) != 1:
            raise FactoryError(f"{wheel.name} holds {len(names)} flash_attn/_C*.so, not one")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / Path(names[0]).name
        out.write_bytes(zf.read(names[0]))
    return out


@dataclass(frozen=True)
class SmokeEnv:
    """A cached environment with one torch, that smoke venvs see through a .pth file."""

    pair: SmokePair
    python: str
    torch: str  # torch.__version__ there


def pair_index(pair: SmokePair, cell: Cell, spec: MatrixSpec) -> tuple[str, PackageIndex]:
    """(the CUDA build, the index) of the pair's torch that fits the cell's CUDA major: the
    package index's own build where it is of that major, else PyTorch's index of the
    newest build of that major (flash_attn refuses a torch of another CUDA major)."""
    tspec = load_toolchain_spec()
    release = spec.torch[pair.torch]
    major = cell.cuda.split(".")[0]
    if release.index_cuda.split(".")[0] == major:
        return release.index_cuda, PackageIndex(tspec.index_url)
    builds = [c for c in release.cuda if c.split(".")[0] == major]
    if not builds:
        raise FactoryError(
            f"torch {pair.torch} has no CUDA {major} build (table: {', '.join(release.cuda)}): "
            f"it cannot smoke-test {cell.id}; change [stable] smoke in recipes/matrix.toml"
        )
    cuda = builds[-1]
    tag = "cu" + cuda.replace(".", "")
    return cuda, PackageIndex(tspec.index_url, (tspec.torch_index(tag),))


def smoke_env(
    pair: SmokePair,
    root: Path,
    index: PackageIndex | None = None,
    installer: Installer | None = None,
    cuda: str = "",
) -> SmokeEnv:
    """root/smoke-torch2.11-cp310-cu130: a venv of the pair's CPython with torch==2.11.*
    from `index` (default: the package index), made once and reused (its recipe in
    factory-toolchain.json)."""
    suffix = f"-cu{cuda.replace('.', '')}" if cuda else ""
    venv = root / f"smoke-{pair.name}{suffix}"
    python = str(venv / "bin" / "python")
    index = index or PackageIndex(load_toolchain_spec().index_url)
    # pip: the smoke venv, which sees this one through a .pth file, installs the wheel with it
    recipe = {"requirements": ["pip", f"torch=={pair.torch}.*"], "index": index.describe()}
    marker = venv / "factory-toolchain.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == recipe):
        installer = installer or select_installer()
        if venv.exists():
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        log = venv.parent / f"{venv.name}.provision.log"
        log.write_text(f"{venv.name}: {installer.kind}, {index.describe()}\n")
        installer.make_venv(find_interpreter(pair.python), venv, log)
        installer.install(python, recipe["requirements"], index, log)
        marker.write_text(json.dumps(recipe, indent=2) + "\n")
    facts = probe_python(python)
    if facts.torch is None or facts.torch_minor != pair.torch:
        raise FactoryError(f"smoke environment {venv}: torch {facts.torch} is not {pair.torch}")
    return SmokeEnv(pair, python, facts.torch)


def stable_checks(
    cell: Cell,
    wheel: Path,
    pairs: tuple[SmokePair, ...],
    paths: FactoryPaths,
    log: Path,
    spec: MatrixSpec | None = None,
) -> list[Check]:
    """The stable wheel's own checks, then the smoke checks under every pair (each check
    named after its pair: 'torch2.11-cp310 import')."""
    with log.open("a") as f:
        f.write(f"stable checks of {wheel.name}\n")
    checks = [abi3audit_check(wheel, log)]
    try:
        so = extract_extension(wheel, paths.cell_dir(cell.id) / "extension")
        checks.append(symbols_check(so))
    except FactoryError as e:
        checks.append(Check("symbols", False, str(e)))

    def pair_checks(pair: SmokePair) -> list[Check]:
        try:
            cuda, index = pair_index(pair, cell, spec) if spec is not None else ("", None)
            env = smoke_env(pair, paths.toolchains, index, cuda=cuda)
        except FactoryError as e:
            return [Check(f"{pair.name} env", False, str(e).splitlines()[0])]
        result = smoke_wheel(
            cell,
            wheel,
            env.python,
            env.torch,
            paths.venvs / f"smoke-{cell.id}-{pair.name}",
            paths.log(cell.id, f"smoke-{pair.name}"),
            isolated=True,
        )
        return [Check(f"{pair.name} {c.name}", c.ok, c.detail) for c in result.checks]

    # the pairs side by side (each its own venv and logs; the work is subprocesses that
    # mostly wait on first imports and the disk), reported in the recipe's order
    workers = max(1, min(len(pairs), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for found in pool.map(pair_checks, pairs):
            checks += found
    with log.open("a") as f:
        for c in checks:
            f.write(f"check {c.name}: {'skip' if c.ok is None else c.ok}: {c.detail}\n")
    return checks
