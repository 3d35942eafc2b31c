"""Rewrite a wheel into its final, reproducible form.

The version (with the cell's local label, spelled as the cell spells it) goes into
the file name, the .dist-info directory and METADATA alike; Requires-Dist pins the
torch minor; entries are sorted, stamped with SOURCE_DATE_EPOCH and given fixed
permissions, and RECORD is recomputed. The same input gives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from .errors import FactoryError

# zip cannot store times before 1980
ZIP_EPOCH_MIN = 315532800


@dataclass(frozen=True)
class WheelTags:
    python: str  # cp311
    abi: str  # cp311
    platform: str  # manylinux_2_34_x86_64 (several joined by '.')

    def __str__(self) -> str:
        return f"{self.python}-{self.abi}-{self.platform}"


@dataclass(frozen=True)
class WheelInfo:
    """What a finished wheel says about itself."""

    name: str
    version: str
    tags: WheelTags
    requires_python: str
    requires_dist: tuple[str, ...]
    metadata: bytes  # the METADATA file (served as the PEP 658 .metadata file)


def record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _dist_info(names: list[str]) -> str:
    dirs = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
    if len(dirs) != 1:
        raise FactoryError(f"a wheel must hold one .dist-info directory; found {sorted(dirs)}")
    return dirs.pop()


def _tags_from_wheel_file(text: str) -> WheelTags:
    tags = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise FactoryError("the wheel's WHEEL file has no Tag line")
    parts = [t.split("-") for t in tags]
    pythons = sorted({p[0] for p in parts})
    abis = sorted({p[1] for p in parts})
    platforms = sorted({p[2] for p in parts})
    return WheelTags(".".join(pythons), ".".join(abis), ".".join(platforms))


def _rewrite_metadata(text: str, version: str, requires_torch: str | None) -> str:
    lines = text.split("\n")
    out: list[str] = []
    in_headers = True
    torch_done = False
    for line in lines:
        if in_headers and line == "":
            if requires_torch and not torch_done:
                out.append(f"Requires-Dist: {requires_torch}")
                torch_done = True
            in_headers = False
        if in_headers and line.startswith("Version:"):
            line = f"Version: {version}"
        elif in_headers and requires_torch and re.match(r"Requires-Dist:\s*torch\b", line):
            if torch_done:
                continue
            marker = line.split(";", 1)[1].strip() if ";" in line else ""
            line = f"Requires-Dist: {requires_torch}" + (f"; {marker}" if marker else "")
            torch_done = True
        out.append(line)
    return "\n".join(out)


def wheel_name(name: str, version: str, tags: WheelTags) -> str:
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}-{tags}.whl"


def normalize_wheel(
    src: Path,
    out_dir: Path,
    version: str,
    requires_torch: str | None,
    epoch: int,
    transform: Callable[[str, bytes], bytes] | None = None,
) -> Path:
    """Write the final wheel into out_dir and return its path. transform(path, data), if
    given, rewrites each file's content first (tag.py strips shared objects with it)."""
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        files = {i.filename: zf.read(i) for i in infos if not i.is_dir()}
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in infos}
    if transform is not None:
        files = {p: transform(p, d) for p, d in files.items()}
    old_info = _dist_info(list(files))
    name = old_info[: -len(".dist-info")].rsplit("-", 1)[0]
    new_info = f"{name}-{version}.dist-info"
    metadata_text = files[f"{old_info}/METADATA"].decode()
    tags = _tags_from_wheel_file(files[f"{old_info}/WHEEL"].decode())

    renamed: dict[str, bytes] = {}
    for path, data in files.items():
        top, _, rest = path.partition("/")
        if top == old_info:
            path = f"{new_info}/{rest}"
        elif top.endswith(".data") and top.startswith(f"{name}-"):
            path = f"{name}-{version}.data/{rest}"
        renamed[path] = data
    renamed[f"{new_info}/METADATA"] = _rewrite_metadata(
        metadata_text, version, requires_torch
    ).encode()
    record_path = f"{new_info}/RECORD"
    renamed.pop(record_path, None)
    renamed.pop(f"{old_info}/RECORD", None)

    # dist-info last (RECORD at the very end), everything else sorted
    order = sorted(p for p in renamed if not p.startswith(new_info + "/"))
    order += sorted(p for p in renamed if p.startswith(new_info + "/"))
    record_lines = [f"{p},{record_hash(renamed[p])},{len(renamed[p])}" for p in order]
    record_lines.append(f"{record_path},,")
    renamed[record_path] = ("\n".join(record_lines) + "\n").encode()
    order.append(record_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / wheel_name(name, version, tags)
    tmp = dest.with_name(f".{dest.name}.tmp")
    stamp = _zip_time(epoch)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in order:
            info = zipfile.ZipInfo(path, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            executable = bool(modes.get(_original(path, new_info, old_info), 0) & 0o111)
            info.external_attr = ((0o755 if executable else 0o644) | 0o100000) << 16
            zf.writestr(info, renamed[path], compresslevel=9)
    tmp.replace(dest)
    return dest


def _original(path: str, new_info: str, old_info: str) -> str:
    return old_info + path[len(new_info) :] if path.startswith(new_info + "/") else path


def _zip_time(epoch: int) -> tuple[int, int, int, int, int, int]:
    import time

    t = time.gmtime(max(epoch, ZIP_EPOCH_MIN))
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def read_wheel_info(path: Path) -> WheelInfo:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        info_dir = _dist_info(names)
        metadata = zf.read(f"{info_dir}/METADATA")
        wheel_text = zf.read(f"{info_dir}/WHEEL").decode()
    headers = HeaderParser().parsestr(metadata.decode())
    return WheelInfo(
        name=str(headers["Name"]),
        version=str(headers["Version"]),
        tags=_tags_from_wheel_file(wheel_text),
        requires_python=str(headers.get("Requires-Python", "") or ""),
        requires_dist=tuple(str(v) for v in (headers.get_all("Requires-Dist") or [])),
        metadata=metadata,
    )
