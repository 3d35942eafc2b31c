"""What this process may use: CPUs and memory, container limits included.

Reads cgroup v2 (memory.max, memory.current, cpu.max) and cgroup v1
(memory.limit_in_bytes, memory.usage_in_bytes, cpu.cfs_quota_us) along the
process's own cgroup path up to the mount root, plus the host's MemAvailable.
Every reader takes a filesystem root so that tests can hand it a fake tree.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
# cgroup v1 writes "no limit" as a huge number (page-rounded LONG_MAX).
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupLimits:
    """Limits found in cgroups; None where there is none."""

    memory_free_bytes: int | None  # limit minus usage (reclaimable page cache excluded)
    memory_limit_bytes: int | None
    cpu_quota: float | None  # CPUs' worth of time per period
    memory_source: str  # "cgroup v2", "cgroup v1", or "" when no limit was found
    cpu_source: str


@dataclass(frozen=True)
class Resources:
    cpus: int
    cpu_reason: str
    mem_available_bytes: int
    mem_reason: str


def gib(n: float) -> str:
    """Bytes in GiB with one decimal: for memory budgets."""
    return f"{n / GIB:.1f} GiB"


def size(n: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB with two decimals: for measured peaks."""
    return f"{n / (1 << 20):.0f} MiB" if n < GIB else f"{n / GIB:.2f} GiB"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _stat_in(text: str, key: str) -> int:
    """The value of `key N` lines (memory.stat, memory.events); 0 when absent."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


def _stat_value(path: Path, key: str) -> int:
    return _stat_in(_read(path) or "", key)


@dataclass(frozen=True)
class _Mount:
    point: Path  # where the hierarchy is mounted, under root
    root: str  # which cgroup the mount shows at its top ("/" unless bind-mounted)


def _mounts(root: Path) -> tuple[_Mount | None, dict[str, _Mount]]:
    """(the cgroup2 mount, {v1 controller: mount}) from mountinfo, or the usual places."""
    v2: _Mount | None = None
    v1: dict[str, _Mount] = {}
    text = _read(root / "proc/self/mountinfo")
    if text is not None:
        for line in text.splitlines():
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            mount = _Mount(root / fields[4].lstrip("/"), fields[3])
            if tail[0] == "cgroup2":
                v2 = mount
            elif tail[0] == "cgroup":
                for option in tail[2].split(","):
                    if option in ("memory", "cpu"):
                        v1[option] = mount
        return v2, v1
    base = root / "sys/fs/cgroup"
    if (base / "cgroup.controllers").exists():
        v2 = _Mount(base, "/")
    for controller, names in (("memory", ["memory"]), ("cpu", ["cpu", "cpu,cpuacct"])):
        for name in names:
            if (base / name).is_dir():
                v1[controller] = _Mount(base / name, "/")
                break
    return v2, v1


def _own_paths(root: Path) -> tuple[str, dict[str, str]]:
    """This process's cgroup: (v2 path, {v1 controller: path}) from /proc/self/cgroup."""
    v2 = "/"
    v1: dict[str, str] = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        for controller in controllers.split(","):
            if controller in ("memory", "cpu"):
                v1[controller] = path
    return v2, v1


def _levels(mount: _Mount, path: str) -> list[Path]:
    """The cgroup directories from this process's own up to the mount's top."""
    rel = path
    if mount.root != "/" and (rel == mount.root or rel.startswith(mount.root + "/")):
        rel = rel[len(mount.root) :]
    leaf = mount.point / rel.strip("/")
    if not leaf.is_dir():
        # A namespaced container shows its own cgroup as the mount's top.
        return [mount.point]
    levels = [leaf]
    while levels[-1] != mount.point and mount.point in levels[-1].parents:
        levels.append(levels[-1].parent)
    return levels


def _v2_limits(levels: list[Path]) -> tuple[int | None, int | None, float | None]:
    free: int | None = None
    limit: int | None = None
    quota: float | None = None
    for d in levels:
        mem_max = (_read(d / "memory.max") or "").strip()
        if mem_max.isdigit():
            lim = int(mem_max)
            usage = _read_int(d / "memory.current") or 0
            usage -= _stat_value(d / "memory.stat", "inactive_file")
            f = max(0, lim - max(0, usage))
            free = f if free is None else min(free, f)
            limit = lim if limit is None else min(limit, lim)
        cpu_max = (_read(d / "cpu.max") or "").split()
        if len(cpu_max) == 2 and cpu_max[0].isdigit() and cpu_max[1].isdigit():
            q = int(cpu_max[0]) / max(1, int(cpu_max[1]))
            quota = q if quota is None else min(quota, q)
    return free, limit, quota


def _v1_memory(levels: list[Path]) -> tuple[int | None, int | None]:
    free: int | None = None
    limit: int | None = None
    for d in levels:
        lim = _read_int(d / "memory.limit_in_bytes")
        if lim is None or lim >= _V1_UNLIMITED:
            continue
        usage = _read_int(d / "memory.usage_in_bytes") or 0
        usage -= _stat_value(d / "memory.stat", "total_inactive_file")
        f = max(0, lim - max(0, usage))
        free = f if free is None else min(free, f)
        limit = lim if limit is None else min(limit, lim)
    return free, limit


def _v1_cpu(levels: list[Path]) -> float | None:
    quota: float | None = None
    for d in levels:
        q = _read_int(d / "cpu.cfs_quota_us")
        period = _read_int(d / "cpu.cfs_period_us")
        if q is None or q <= 0 or not period:
            continue
        value = q / period
        quota = value if quota is None else min(quota, value)
    return quota


def _min(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def read_cgroup_limits(root: Path = Path("/")) -> CgroupLimits:
    """The tightest memory and CPU limits over cgroup v2 and v1 (hybrid hosts have both)."""
    v2_mount, v1_mounts = _mounts(root)
    v2_path, v1_paths = _own_paths(root)
    free: int | None = None
    limit: int | None = None
    quota: float | None = None
    memory_source = cpu_source = ""
    if v2_mount is not None:
        free, limit, quota = _v2_limits(_levels(v2_mount, v2_path))
        memory_source = "cgroup v2" if limit is not None else ""
        cpu_source = "cgroup v2" if quota is not None else ""
    if "memory" in v1_mounts:
        f, lim = _v1_memory(_levels(v1_mounts["memory"], v1_paths.get("memory", "/")))
        if lim is not None and (limit is None or lim < limit):
            memory_source = "cgroup v1"
        free, limit = _min(free, f), _min(limit, lim)
    if "cpu" in v1_mounts:
        q = _v1_cpu(_levels(v1_mounts["cpu"], v1_paths.get("cpu", "/")))
        if q is not None and (quota is None or q < quota):
            quota, cpu_source = q, "cgroup v1"
    return CgroupLimits(free, limit, quota, memory_source, cpu_source)


def read_meminfo_available(root: Path = Path("/")) -> int | None:
    """MemAvailable (or, on old kernels, MemFree) from /proc/meminfo, in bytes."""
    text = _read(root / "proc/meminfo")
    if text is None:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * 1024
    return values.get("MemAvailable", values.get("MemFree"))


def _host_available(root: Path) -> tuple[int | None, str]:
    if root == Path("/"):
        try:
            import psutil  # optional
        except ImportError:
            pass
        else:
            return int(psutil.virtual_memory().available), "psutil"
    return read_meminfo_available(root), "MemAvailable"


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe_resources(root: Path = Path("/"), cpus: int | None = None) -> Resources:
    """CPUs and memory this process may use, each with the reason in words."""
    affinity = cpus if cpus is not None else _affinity_cpus()
    limits = read_cgroup_limits(root)
    cpu_count = affinity
    cpu_reason = f"{affinity} CPUs usable"
    if limits.cpu_quota is not None and limits.cpu_quota < affinity:
        cpu_count = max(1, math.floor(limits.cpu_quota))
        cpu_reason = f"cpu quota {limits.cpu_quota:g} ({limits.cpu_source})"
    host, host_source = _host_available(root)
    mem_reason = f"{host_source}"
    available = host
    if limits.memory_free_bytes is not None and (
        available is None or limits.memory_free_bytes < available
    ):
        available = limits.memory_free_bytes
        mem_reason = (
            f"{limits.memory_source} limit {gib(limits.memory_limit_bytes or 0)}, "
            f"{gib(limits.memory_free_bytes)} of it free"
        )
    if available is None:
        available = 4 * GIB
        mem_reason = "unknown, assumed 4.0 GiB"
    return Resources(cpu_count, cpu_reason, available, mem_reason)


@dataclass(frozen=True)
class CgroupUsage:
    """What this process's memory cgroup has seen (a container's: since it started)."""

    memory_peak_bytes: int | None  # v2 memory.peak, v1 memory.max_usage_in_bytes
    oom_kills: int | None  # processes the kernel killed for this cgroup's limit
    memory_limit_bytes: int | None
    source: str  # "cgroup v2", "cgroup v1", or "" when there is no memory cgroup


def _keyed(path: Path, key: str) -> int | None:
    """Like _stat_value, but None when the file is missing."""
    text = _read(path)
    return None if text is None else _stat_in(text, key)


def read_cgroup_usage(root: Path = Path("/")) -> CgroupUsage:
    """Peak memory and OOM kills of this process's own memory cgroup."""
    v2_mount, v1_mounts = _mounts(root)
    v2_path, v1_paths = _own_paths(root)
    if "memory" in v1_mounts:
        leaf = _levels(v1_mounts["memory"], v1_paths.get("memory", "/"))[0]
        limit = _read_int(leaf / "memory.limit_in_bytes")
        return CgroupUsage(
            memory_peak_bytes=_read_int(leaf / "memory.max_usage_in_bytes"),
            oom_kills=_keyed(leaf / "memory.oom_control", "oom_kill"),
            memory_limit_bytes=limit if limit is not None and limit < _V1_UNLIMITED else None,
            source="cgroup v1",
        )
    if v2_mount is not None:
        leaf = _levels(v2_mount, v2_path)[0]
        limit_text = (_read(leaf / "memory.max") or "").strip()
        return CgroupUsage(
            memory_peak_bytes=_read_int(leaf / "memory.peak"),
            oom_kills=_keyed(leaf / "memory.events", "oom_kill"),
            memory_limit_bytes=int(limit_text) if limit_text.isdigit() else None,
            source="cgroup v2",
        )
    return CgroupUsage(None, None, None, "")
