"""Read a wheel, and rewrite it into its final, reproducible form.

The rewrite keeps what the build made (name, version, METADATA: setup.py alone sets the
version label and Requires-Dist from the cell's BuildRequest); entries are sorted,
stamped with SOURCE_DATE_EPOCH and given fixed permissions, and RECORD is recomputed.
The same input gives the same bytes. File names and versions are read with `packaging`.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.utils import parse_wheel_filename

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


def normalize_wheel(
    src: Path,
    out_dir: Path,
    epoch: int,
    transform: Callable[[str, bytes], bytes] | None = None,
) -> Path:
    """Write the final wheel, of the same name, into out_dir and return its path.
    transform(path, data), if given, rewrites each file's content first (tag.py strips
    shared objects with it); METADATA and the version are kept as they are."""
    parse_wheel_filename(src.name)  # a name pip would refuse stops here
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        files = {i.filename: zf.read(i) for i in infos if not i.is_dir()}
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in infos}
    if transform is not None:
        files = {p: transform(p, d) for p, d in files.items()}
    info_dir = _dist_info(list(files))
    record_path = f"{info_dir}/RECORD"
    files.pop(record_path, None)

    # dist-info last (RECORD at the very end), everything else sorted
    order = sorted(p for p in files if not p.startswith(info_dir + "/"))
    order += sorted(p for p in files if p.startswith(info_dir + "/"))
    record_lines = [f"{p},{record_hash(files[p])},{len(files[p])}" for p in order]
    record_lines.append(f"{record_path},,")
    files[record_path] = ("\n".join(record_lines) + "\n").encode()
    order.append(record_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / src.name
    tmp = dest.with_name(f".{dest.name}.tmp")
    stamp = _zip_time(epoch)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in order:
            info = zipfile.ZipInfo(path, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            executable = bool(modes.get(path, 0) & 0o111)
            info.external_attr = ((0o755 if executable else 0o644) | 0o100000) << 16
            zf.writestr(info, files[path], compresslevel=9)
    tmp.replace(dest)
    return dest


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
