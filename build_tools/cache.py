"""Content-addressed kernel objects: the key and atomic writes.

The key of an object covers everything its bytes depend on: the source text,
every header it includes from our own include directories (transitively), the
compiler flags (include paths, the output name and --threads left out), the
compiler identity (nvcc and host compiler versions) and the arch list. Paths of
the checkout are not part of it, so the same key is valid in any clone.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

CACHE_SCHEMA = "flash-attn-kernel-object-v1"

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*([<"])([^>"\n]+)[>"]', re.MULTILINE)

# Flags that do not change an object's bytes, or name paths of this checkout.
_PATH_FLAGS_WITH_VALUE = ("-I", "-o", "--output-file", "--threads", "-t", "-MF")


def _resolve(
    name: str, quote: str, including_dir: Path, include_dirs: Sequence[Path]
) -> Path | None:
    search = ([including_dir] if quote == '"' else []) + list(include_dirs)
    for d in search:
        candidate = d / name
        if candidate.is_file():
            return candidate.resolve()
    return None  # a system or CUDA header: covered by the compiler identity


def scan_includes(source: Path, include_dirs: Sequence[Path]) -> list[Path]:
    """Every file `source` includes, directly or not, that is found next to the
    including file or in include_dirs. Over-approximates (ignores #if), which
    only ever makes the key more specific."""
    seen: set[Path] = set()
    stack = [source.resolve()]
    while stack:
        current = stack.pop()
        try:
            text = current.read_text(errors="replace")
        except OSError:
            continue
        for quote, name in _INCLUDE_RE.findall(text):
            found = _resolve(name.strip(), quote, current.parent, include_dirs)
            if found is not None and found not in seen and found != source.resolve():
                seen.add(found)
                stack.append(found)
    return sorted(seen)


def _display_name(path: Path, roots: Sequence[Path]) -> str:
    """A path relative to the first root that holds it: stable across checkouts."""
    for root in roots:
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return path.name


def key_flags(flags: Sequence[str]) -> list[str]:
    """The flags with include paths, the output path and --threads removed."""
    out: list[str] = []
    skip_next = False
    for flag in flags:
        if skip_next:
            skip_next = False
            continue
        if flag in _PATH_FLAGS_WITH_VALUE:
            skip_next = True
            continue
        if (flag.startswith("-I") and len(flag) > 2) or flag.startswith("--threads="):
            continue
        out.append(flag)
    return out


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_key(
    source: Path,
    include_dirs: Sequence[Path],
    flags: Sequence[str],
    compiler_id: str,
    archs: Iterable[str],
) -> str:
    """A hex digest that changes when anything the object depends on changes."""
    h = hashlib.sha256()

    def part(label: str, value: str) -> None:
        data = value.encode()
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    part("schema", CACHE_SCHEMA)
    part("source-name", source.name)
    part("source", _sha256_file(source))
    roots = [source.parent, *include_dirs]
    for dep in scan_includes(source, include_dirs):
        part("header", f"{_display_name(dep, roots)}={_sha256_file(dep)}")
    part("flags", "\0".join(key_flags(flags)))
    part("compiler", compiler_id)
    part("archs", ";".join(archs))
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename over `path`:
    readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_text_if_changed(path: Path, text: str) -> bool:
    """Keep the mtime (and so setuptools' up-to-date checks) when nothing changed."""
    if path.exists() and path.read_text() == text:
        return False
    atomic_write_text(path, text)
    return True


_TEMP_OBJECT_RE = re.compile(r"^\..+\.(\d+)\.tmp\.o$")


def temp_object_path(final: Path) -> Path:
    """Where nvcc writes before the rename; names the writer so leftovers can be
    recognised (see remove_stale_temps)."""
    return final.with_name(f".{final.stem}.{os.getpid()}.tmp.o")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(cache_dir: Path) -> int:
    """Delete temporary objects left by builds that were interrupted (their writer is gone)."""
    removed = 0
    if not cache_dir.is_dir():
        return 0
    for tmp in cache_dir.iterdir():
        m = _TEMP_OBJECT_RE.match(tmp.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
