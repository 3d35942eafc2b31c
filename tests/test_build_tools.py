"""CPU tests of the build helpers in build_tools/ (no GPU, no torch, no nvcc needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from build_tools import cache, knobs, planner, resources, toolchain, version  # noqa: E402
from build_tools.kernels import KernelBuilder, KernelBuildError, KernelLayout  # noqa: E402

GIB = 1 << 30
CATALOG = knobs.KernelCatalog(
    head_dims=(32, 64, 96, 128, 160, 192, 224, 256), dtypes=("fp16", "bf16")
)


# ---------------------------------------------------------------- knobs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80;90", ("80", "90")),
        ("8.0;9.0", ("80", "90")),
        ("9.0", ("90",)),
        ("90,80", ("80", "90")),
        ("90a", ("90a",)),
        ("9.0a; 100", ("90a", "100")),
        ("90;90", ("90",)),
    ],
)
def test_archs_accepted_spellings(text: str, expected: tuple[str, ...]) -> None:
    assert knobs.parse_archs(text) == expected


@pytest.mark.parametrize("bad", ["sm_90", "75", "9", "compute_90", "90+PTX", "nine"])
def test_bad_arch_is_rejected_with_the_value_and_the_valid_ones(bad: str) -> None:
    with pytest.raises(knobs.BuildConfigError) as e:
        knobs.parse_archs(f"80;{bad}")
    message = str(e.value)
    assert "FLASH_ATTN_CUDA_ARCHS" in message
    assert repr(bad) in message
    assert "80, 86" in message and "90a" in message


def test_empty_arch_list_is_rejected() -> None:
    with pytest.raises(knobs.BuildConfigError, match="names no architecture"):
        knobs.parse_archs(" ; ")


def test_head_dims_subset_and_rejects() -> None:
    assert knobs.parse_head_dims("128,64,64", CATALOG.head_dims) == (64, 128)
    for bad in ("48", "abc", "-64"):
        with pytest.raises(knobs.BuildConfigError) as e:
            knobs.parse_head_dims(f"64,{bad}", CATALOG.head_dims)
        assert "FLASH_ATTN_HEAD_DIMS" in str(e.value)
        assert repr(bad) in str(e.value)
        assert "32, 64, 96, 128, 160, 192, 224, 256" in str(e.value)


def test_dtypes_subset_in_catalog_order_and_rejects() -> None:
    assert knobs.parse_dtypes("BF16,fp16", CATALOG.dtypes) == ("fp16", "bf16")
    with pytest.raises(knobs.BuildConfigError) as e:
        knobs.parse_dtypes("fp16,fp32", CATALOG.dtypes)
    assert "'fp32'" in str(e.value) and "fp16, bf16" in str(e.value)
    with pytest.raises(knobs.BuildConfigError, match="empty"):
        knobs.parse_dtypes(",", CATALOG.dtypes)


def test_knobs_defaults() -> None:
    k = knobs.knobs_from_env({}, CATALOG)
    assert k.archs == ("80", "90")
    assert k.head_dims == CATALOG.head_dims
    assert k.dtypes == ("fp16", "bf16")
    assert k.backward is True
    assert k.max_jobs is None and k.nvcc_threads is None
    assert k.mem_per_thread_gib == knobs.DEFAULT_MEM_PER_THREAD_GIB


def test_knobs_from_env_values() -> None:
    env = {
        "FLASH_ATTN_CUDA_ARCHS": "90",
        "FLASH_ATTN_HEAD_DIMS": "64,128",
        "FLASH_ATTN_DTYPES": "bf16",
        "FLASH_ATTN_BACKWARD": "0",
        "MAX_JOBS": "3",
        "NVCC_THREADS": "2",
        "FLASH_ATTN_NVCC_MEM_GB": "4.5",
        "FLASH_ATTN_NVCC_FLAGS": "-lineinfo -Xptxas=-v",
    }
    k = knobs.knobs_from_env(env, CATALOG)
    assert (k.archs, k.head_dims, k.dtypes, k.backward) == (("90",), (64, 128), ("bf16",), False)
    assert (k.max_jobs, k.nvcc_threads, k.mem_per_thread_gib) == (3, 2, 4.5)
    assert k.extra_nvcc_flags == ("-lineinfo", "-Xptxas=-v")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FLASH_ATTN_BACKWARD", "maybe"),
        ("MAX_JOBS", "0"),
        ("MAX_JOBS", "two"),
        ("NVCC_THREADS", "-1"),
        ("FLASH_ATTN_NVCC_MEM_GB", "0"),
        ("FLASH_ATTN_NVCC_MEM_GB", "lots"),
    ],
)
def test_bad_scalar_knobs_name_variable_and_value(name: str, value: str) -> None:
    with pytest.raises(knobs.BuildConfigError) as e:
        knobs.knobs_from_env({name: value}, CATALOG)
    assert name in str(e.value) and repr(value) in str(e.value)


def test_catalog_is_read_from_the_generator(tmp_path: Path) -> None:
    real = ROOT / "csrc" / "kernels" / "generate.py"
    if real.exists():
        catalog = knobs.load_catalog(real)
        assert 64 in catalog.head_dims and "bf16" in catalog.dtypes
    fake = tmp_path / "generate.py"
    fake.write_text(
        "HEAD_DIM_BUCKETS: tuple[int, ...] = (64, 512)\n"
        "DTYPES = {'fp16': ('__half', 'X'), 'fp8': ('x', 'Y')}\n"
        "raise SystemExit('the generator is parsed, never run')\n"
    )
    assert knobs.load_catalog(fake) == knobs.KernelCatalog((64, 512), ("fp16", "fp8"))
    fake.write_text("HEAD_DIM_BUCKETS = compute()\n")
    with pytest.raises(knobs.BuildConfigError, match="HEAD_DIM_BUCKETS"):
        knobs.load_catalog(fake)


# ---------------------------------------------------------------- resources


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _meminfo(root: Path, available_kib: int | None, free_kib: int = 1000) -> None:
    lines = ["MemTotal:       99999999 kB", f"MemFree:        {free_kib} kB"]
    if available_kib is not None:
        lines.append(f"MemAvailable:   {available_kib} kB")
    _write(root / "proc/meminfo", "\n".join(lines) + "\n")


def _v2_tree(root: Path, own: str = "/build.slice/job") -> Path:
    _write(
        root / "proc/self/mountinfo",
        "22 1 0:20 / /proc rw - proc proc rw\n"
        "30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
    )
    _write(root / "proc/self/cgroup", f"0::{own}\n")
    base = root / "sys/fs/cgroup"
    _write(base / "cgroup.controllers", "cpu memory\n")
    return base


def test_cgroup_v2_limits_walk_up_to_the_tightest(tmp_path: Path) -> None:
    base = _v2_tree(tmp_path)
    leaf = base / "build.slice/job"
    _write(leaf / "memory.max", "max\n")
    _write(leaf / "cpu.max", "max 100000\n")
    _write(base / "build.slice/memory.max", f"{8 * GIB}\n")
    _write(base / "build.slice/memory.current", f"{3 * GIB}\n")
    _write(base / "build.slice/memory.stat", f"anon 1\ninactive_file {1 * GIB}\n")
    _write(base / "build.slice/cpu.max", "150000 100000\n")
    limits = resources.read_cgroup_limits(tmp_path)
    assert limits.memory_limit_bytes == 8 * GIB
    assert limits.memory_free_bytes == 6 * GIB  # 8 - (3 - 1 reclaimable)
    assert limits.cpu_quota == pytest.approx(1.5)
    assert limits.memory_source == limits.cpu_source == "cgroup v2"

    _meminfo(tmp_path, available_kib=20 * (1 << 20))
    res = resources.probe_resources(tmp_path, cpus=16)
    assert res.cpus == 1
    assert "cpu quota 1.5" in res.cpu_reason and "cgroup v2" in res.cpu_reason
    assert res.mem_available_bytes == 6 * GIB
    assert "cgroup v2 limit 8.0 GiB" in res.mem_reason


def test_cgroup_v2_unlimited_uses_meminfo(tmp_path: Path) -> None:
    base = _v2_tree(tmp_path, own="/")
    _write(base / "memory.max", "max\n")
    _write(base / "cpu.max", "max 100000\n")
    _meminfo(tmp_path, available_kib=21 * (1 << 20))
    res = resources.probe_resources(tmp_path, cpus=2)
    assert res.cpus == 2
    assert res.mem_available_bytes == 21 * GIB
    assert res.mem_reason == "MemAvailable"


def test_cgroup_v2_namespaced_container_reads_the_mount_top(tmp_path: Path) -> None:
    # /proc/self/cgroup names a path the container cannot see: use the mount's top.
    base = _v2_tree(tmp_path, own="/system.slice/docker-abc.scope")
    _write(base / "memory.max", f"{4 * GIB}\n")
    _write(base / "memory.current", f"{1 * GIB}\n")
    _write(base / "cpu.max", "200000 100000\n")
    limits = resources.read_cgroup_limits(tmp_path)
    assert (limits.memory_free_bytes, limits.cpu_quota) == (3 * GIB, 2.0)


def test_cgroup_v1_limits_without_mountinfo(tmp_path: Path) -> None:
    # No mountinfo: the usual v1 places, including the joined cpu,cpuacct hierarchy.
    mem = tmp_path / "sys/fs/cgroup/memory"
    cpu = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    _write(mem / "memory.limit_in_bytes", f"{6 * GIB}\n")
    _write(mem / "memory.usage_in_bytes", f"{2 * GIB}\n")
    _write(mem / "memory.stat", f"cache 5\ntotal_inactive_file {GIB // 2}\n")
    _write(cpu / "cpu.cfs_quota_us", "250000\n")
    _write(cpu / "cpu.cfs_period_us", "100000\n")
    limits = resources.read_cgroup_limits(tmp_path)
    assert limits.memory_limit_bytes == 6 * GIB
    assert limits.memory_free_bytes == 6 * GIB - (2 * GIB - GIB // 2)
    assert limits.cpu_quota == pytest.approx(2.5)
    assert limits.memory_source == limits.cpu_source == "cgroup v1"
    _meminfo(tmp_path, available_kib=20 * (1 << 20))
    res = resources.probe_resources(tmp_path, cpus=8)
    assert res.cpus == 2  # floor of the 2.5 CPU quota
    assert res.mem_available_bytes == limits.memory_free_bytes


def test_cgroup_v1_hybrid_host_with_own_path(tmp_path: Path) -> None:
    # Like a podman --memory container: v1 memory controller, this process in a
    # child cgroup, an empty cgroup2 hierarchy mounted beside (hybrid mode).
    _write(
        tmp_path / "proc/self/mountinfo",
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
    )
    _write(tmp_path / "proc/self/cgroup", "4:memory:/jobs/a\n1:cpu:/\n0::/\n")
    (tmp_path / "sys/fs/cgroup/unified").mkdir(parents=True)
    mem = tmp_path / "sys/fs/cgroup/memory"
    _write(mem / "memory.limit_in_bytes", "9223372036854771712\n")  # unlimited
    _write(mem / "jobs/a/memory.limit_in_bytes", f"{3 * GIB}\n")
    _write(mem / "jobs/a/memory.usage_in_bytes", f"{GIB}\n")
    _write(tmp_path / "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    limits = resources.read_cgroup_limits(tmp_path)
    assert limits.memory_free_bytes == 2 * GIB and limits.memory_source == "cgroup v1"
    assert limits.cpu_quota is None and limits.cpu_source == ""


def test_no_cgroups_and_old_meminfo(tmp_path: Path) -> None:
    _meminfo(tmp_path, available_kib=None, free_kib=3 * (1 << 20))
    assert resources.read_cgroup_limits(tmp_path).memory_limit_bytes is None
    assert resources.read_meminfo_available(tmp_path) == 3 * GIB  # MemFree fallback
    res = resources.probe_resources(tmp_path / "nothing-here", cpus=4)
    assert res.mem_available_bytes == 4 * GIB and "assumed" in res.mem_reason


# ---------------------------------------------------------------- planner


def _res(cpus: int, avail_gib: float) -> resources.Resources:
    return resources.Resources(cpus, f"{cpus} CPUs usable", int(avail_gib * GIB), "MemAvailable")


def test_plan_cpu_bound() -> None:
    plan = planner.plan_build(10, 2, _res(2, 21.3), int(2.5 * GIB))
    assert (plan.jobs, plan.nvcc_threads) == (2, 1)
    assert "21.3 GiB available" in plan.describe() and "2.5 GiB per nvcc thread" in plan.reason
    assert "2 CPUs usable" in plan.reason and not plan.warning


def test_plan_memory_bound() -> None:
    plan = planner.plan_build(40, 2, _res(64, 12), int(2.5 * GIB))
    assert (plan.jobs, plan.nvcc_threads) == (4, 1)
    plan = planner.plan_build(40, 2, _res(64, 1), int(2.5 * GIB))
    assert (plan.jobs, plan.nvcc_threads) == (1, 1)  # never below one job


def test_plan_spare_slots_go_to_nvcc_threads() -> None:
    plan = planner.plan_build(1, 2, _res(16, 64), int(2.5 * GIB))
    assert (plan.jobs, plan.nvcc_threads) == (1, 2)
    plan = planner.plan_build(3, 2, _res(16, 64), int(2.5 * GIB))
    assert (plan.jobs, plan.nvcc_threads) == (3, 2)


def test_plan_honours_max_jobs_and_nvcc_threads() -> None:
    plan = planner.plan_build(10, 2, _res(2, 21), int(2.5 * GIB), max_jobs=1)
    assert (plan.jobs, plan.nvcc_threads) == (1, 2)
    plan = planner.plan_build(10, 2, _res(8, 64), int(2.5 * GIB), nvcc_threads=2)
    assert (plan.jobs, plan.nvcc_threads) == (4, 2)
    plan = planner.plan_build(10, 2, _res(2, 4), int(2.5 * GIB), max_jobs=4, nvcc_threads=2)
    assert (plan.jobs, plan.nvcc_threads) == (4, 2)
    assert "may need 20.0 GiB" in plan.warning


# ---------------------------------------------------------------- cache keys


def _kernel_tree(root: Path) -> tuple[Path, Path, Path]:
    kernels = root / "csrc/kernels"
    gen = root / "build/generated"
    _write(kernels / "api.h", "int f();\n")
    _write(kernels / "tile.cuh", '#pragma once\n#include "api.h"\n#include <cuda_runtime.h>\n')
    _write(kernels / "fwd_launch.cuh", '#pragma once\n  #  include "tile.cuh"\n')
    src = _write(gen / "flash_fwd_hdim64_fp16.cu", '#include "fwd_launch.cuh"\nint x;\n')
    return kernels, gen, src


def _key(
    root: Path,
    flags: list[str] | None = None,
    compiler: str = "nvcc 13.0",
    archs: tuple[str, ...] = ("90",),
) -> str:
    kernels, gen = root / "csrc/kernels", root / "build/generated"
    src = gen / "flash_fwd_hdim64_fp16.cu"
    base = ["-O3", "-I", str(kernels), "-I", str(gen), "--threads", "1"]
    return cache.cache_key(src, [kernels, gen], base + (flags or []), compiler, archs)


def test_scan_includes_is_transitive_and_skips_system_headers(tmp_path: Path) -> None:
    kernels, gen, src = _kernel_tree(tmp_path)
    found = cache.scan_includes(src, [kernels, gen])
    assert [p.name for p in found] == ["api.h", "fwd_launch.cuh", "tile.cuh"]


def test_cache_key_is_stable_when_nothing_changed(tmp_path: Path) -> None:
    _kernel_tree(tmp_path)
    assert _key(tmp_path) == _key(tmp_path)


def test_cache_key_changes_with_a_nested_header(tmp_path: Path) -> None:
    kernels, _, _ = _kernel_tree(tmp_path)
    before = _key(tmp_path)
    (kernels / "api.h").write_text("int f(int);\n")
    assert _key(tmp_path) != before


def test_cache_key_changes_with_source_flags_compiler_and_archs(tmp_path: Path) -> None:
    _, _, src = _kernel_tree(tmp_path)
    before = _key(tmp_path)
    assert _key(tmp_path, flags=["-lineinfo"]) != before
    assert _key(tmp_path, compiler="nvcc 13.1") != before
    assert _key(tmp_path, archs=("80", "90")) != before
    src.write_text(src.read_text() + "int y;\n")
    assert _key(tmp_path) != before


def test_cache_key_ignores_checkout_paths_and_threads(tmp_path: Path) -> None:
    _kernel_tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere")
    assert _key(tmp_path / "a") == _key(tmp_path / "elsewhere")
    assert cache.key_flags(
        ["-O3", "-I", "/x", "-I/y", "--threads", "4", "--threads=2", "-o", "o"]
    ) == ["-O3"]


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    cache.atomic_write_text(target, "one")
    cache.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_atomic_write_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.json"
    cache.atomic_write_text(target, "old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_text_if_changed_keeps_mtime(tmp_path: Path) -> None:
    target = tmp_path / "list.txt"
    assert cache.write_text_if_changed(target, "a\n")
    os.utime(target, (1, 1))
    assert not cache.write_text_if_changed(target, "a\n")
    assert target.stat().st_mtime == 1
    assert cache.write_text_if_changed(target, "b\n")


def test_stale_temp_objects_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    live_pid = os.getppid()
    stale = _write(tmp_path / f".x-abc.{dead_pid}.tmp.o", "partial")
    live = _write(tmp_path / f".y-abc.{live_pid}.tmp.o", "being written")
    done = _write(tmp_path / "x-abc.o", "object")
    assert cache.remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and live.exists() and done.exists()


# ---------------------------------------------------------------- version, toolchain


def test_version_from_init_and_local_label(tmp_path: Path) -> None:
    init = _write(tmp_path / "__init__.py", '"""doc"""\n__version__ = "2.9.1"\n')
    assert version.read_version(init) == "2.9.1"
    assert version.read_version(tmp_path / "missing.py") == version.FALLBACK_VERSION
    assert version.with_local_label("2.9.1", "") == "2.9.1"
    assert version.with_local_label("2.9.1", "cu130torch2.13") == "2.9.1+cu130torch2.13"
    assert version.with_local_label("2.9.1+a", "b") == "2.9.1+a.b"
    with pytest.raises(knobs.BuildConfigError, match="FLASH_ATTN_LOCAL_VERSION"):
        version.with_local_label("2.9.1", "cu130 torch/2.13")


def test_gencode_adds_ptx_for_the_newest_arch_only() -> None:
    assert toolchain.gencode_flags(("80", "90")) == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90a,code=sm_90a",
        "-gencode", "arch=compute_90,code=compute_90",
    ]  # fmt: skip


def test_cuda_home_must_hold_a_toolkit(tmp_path: Path) -> None:
    with pytest.raises(knobs.BuildConfigError, match="CUDA_HOME='/no/such/cuda'"):
        toolchain.find_cuda_home({"CUDA_HOME": "/no/such/cuda"})
    _write(tmp_path / "bin/nvcc", "")
    _write(tmp_path / "include/cuda_runtime.h", "")
    assert toolchain.find_cuda_home({"CUDA_HOME": str(tmp_path)}) == tmp_path


def _fake_toolkit(root: Path, release: str = "13.0", tools: tuple[str, ...] = ()) -> Path:
    say = f"Cuda compilation tools, release {release}, V{release}.88"
    _write(root / "bin/nvcc", f"#!/bin/sh\necho '{say}'\n")
    (root / "bin/nvcc").chmod(0o755)
    _write(root / "include/cuda_runtime.h", "")
    for tool in tools:
        _write(root / "bin" / tool, "")
    return root


def test_cuda_is_found_in_one_place_in_its_order(tmp_path: Path) -> None:
    home = _fake_toolkit(tmp_path / "cuda", "12.8")
    on_path = _fake_toolkit(tmp_path / "other", "13.0")
    env = {"CUDA_PATH": str(home), "PATH": str(on_path / "bin")}
    assert toolchain.find_cuda_home(env) == home  # CUDA_PATH before PATH
    assert toolchain.find_cuda_home({"PATH": str(on_path / "bin")}) == on_path.resolve()
    assert toolchain.nvcc_release(home / "bin" / "nvcc") == "12.8"
    assert toolchain.nvcc_release(tmp_path / "none" / "nvcc") is None


def test_cuda_tools_come_from_the_toolkit_then_path_then_pip(tmp_path: Path) -> None:
    home = _fake_toolkit(tmp_path / "cuda", tools=("cuobjdump",))
    bare = _fake_toolkit(tmp_path / "bare")
    site = tmp_path / "site-packages"
    _write(site / "nvidia/cu13/bin/cuobjdump", "")
    _write(site / "nvidia/cu13/bin/nvcc", "")
    empty = str(tmp_path / "empty")
    assert toolchain.cuda_tool("cuobjdump", {"CUDA_HOME": str(home), "PATH": empty}, [site]) == (
        home / "bin" / "cuobjdump"
    )
    found = toolchain.cuda_tool("cuobjdump", {"CUDA_HOME": str(bare), "PATH": empty}, [site])
    assert found == site / "nvidia/cu13/bin/cuobjdump"
    assert toolchain.cuda_tool("cuobjdump", {"CUDA_HOME": str(bare), "PATH": empty}) is None
    assert toolchain.pip_cuda_home(site) == site / "nvidia/cu13"
    assert toolchain.pip_cuda_home(tmp_path) is None


def test_link_manifest_stays_in_the_checkout_with_a_shared_cache(tmp_path: Path) -> None:
    layout = KernelLayout.standard(tmp_path / "checkout", tmp_path / "shared" / "objects")
    assert layout.link_manifest == tmp_path / "checkout" / "build" / "kernel_objects.txt"


def test_run_measured_appends_to_a_log_with_cpu_time(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "build.log"
    log.parent.mkdir()
    log.write_text("earlier\n")
    burn = f"{sys.executable} -c 'sum(range(3 * 10 ** 7))'"
    result = toolchain.run_measured(
        ["sh", "-c", f"echo out; echo err >&2; {burn}"], log=log, cwd=tmp_path,
        oom_score_adj=None,
    )
    assert result.returncode == 0 and result.output == ""
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier" and lines[1].startswith("$ sh -c echo out")
    assert set(lines[2:]) == {"out", "err"}
    assert 0.1 < result.cpu_s <= result.wall_s * 2 + 0.5


def test_run_measured_reports_the_peak_of_a_grandchild() -> None:
    # The shell is the child; the 200 MiB allocation happens in its own child.
    script = f"{sys.executable} -c 'b = bytearray(200 << 20); b[::4096] = b\"x\" * len(b[::4096])'"
    result = toolchain.run_measured(["sh", "-c", "echo hello; " + script + "; exit 3"])
    assert result.returncode == 3
    assert result.peak_rss_bytes >= 200 << 20
    assert result.output == "hello\n"  # the measurement's own line is taken out
    assert result.wall_s > 0


def test_run_measured_does_not_inherit_the_callers_peak() -> None:
    # A child forked from a large process starts with that process's high-water
    # mark; the figure must still be the child's own.
    ballast = bytearray(400 << 20)
    ballast[:: 1 << 12] = b"x" * len(ballast[:: 1 << 12])
    result = toolchain.run_measured(["true"])
    assert result.returncode == 0
    assert 0 < result.peak_rss_bytes < 100 << 20
    del ballast


def test_run_measured_passes_a_kill_through() -> None:
    result = toolchain.run_measured(["sh", "-c", "kill -9 $$"])
    assert result.returncode == -9


# ------------------------------------------------ the kernel build, with a fake nvcc

FAKE_NVCC = textwrap.dedent(
    """\
    #!{python}
    # Writes the object named by -o; fails on FAIL_ME; dies like an OOM kill on
    # BIG_ME when run with more than one nvcc thread. Logs every call.
    import os, signal, sys
    args = sys.argv[1:]
    src, out = args[args.index("-c") + 1], args[args.index("-o") + 1]
    threads = int(args[args.index("--threads") + 1])
    with open(os.environ["FAKE_NVCC_LOG"], "a") as log:
        log.write(f"{{os.path.basename(src)}} {{threads}}\\n")
    text = open(src).read()
    if "FAIL_ME" in text:
        print(f"{{src}}(1): error: this is a test failure")
        sys.exit(2)
    if "INTERRUPT_ME" in text:
        print("nvcc error   : cicc died due to signal 2")
        sys.exit(2)
    if "BIG_ME" in text and threads > 1:
        os.kill(os.getpid(), signal.SIGKILL)
    with open(out, "w") as f:
        f.write("object of " + os.path.basename(src))
    """
)


@pytest.fixture
def kernel_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KernelLayout:
    kernels = tmp_path / "csrc/kernels"
    shutil.copy(ROOT / "csrc/kernels/generate.py", _write(kernels / "generate.py", ""))
    _write(kernels / "flash_api.h", "/* api */\n")
    _write(kernels / "registry.cuh", '#include "flash_api.h"\n')
    _write(kernels / "fwd_launch.cuh", '#include "registry.cuh"\n')
    _write(kernels / "bwd_launch.cuh", '#include "registry.cuh"\n')
    _write(kernels / "dispatch.cu", '#include "registry.cuh"\n')
    nvcc = _write(tmp_path / "cuda/bin/nvcc", FAKE_NVCC.format(python=sys.executable))
    nvcc.chmod(0o755)
    monkeypatch.setenv("FAKE_NVCC_LOG", str(tmp_path / "nvcc.log"))
    return KernelLayout.standard(tmp_path)


def _builder(layout: KernelLayout, **env: str) -> KernelBuilder:
    k = knobs.knobs_from_env(
        {"FLASH_ATTN_CUDA_ARCHS": "90", "FLASH_ATTN_HEAD_DIMS": "64,128", **env},
        knobs.load_catalog(layout.kernels_dir / "generate.py"),
    )
    nvcc = layout.repo_root / "cuda/bin/nvcc"
    tc = toolchain.CudaToolchain(nvcc.parent.parent, nvcc, "13.0.0", "fake nvcc 13.0", nvcc.parent)
    lines: list[str] = []
    builder = KernelBuilder(layout, k, tc, log=lines.append, probe=lambda: _res(2, 20))
    builder.lines = lines  # type: ignore[attr-defined]
    return builder


def _calls(layout: KernelLayout) -> list[str]:
    log = layout.repo_root / "nvcc.log"
    return log.read_text().splitlines() if log.exists() else []


def test_kernel_build_compiles_once_then_reuses(kernel_project: KernelLayout) -> None:
    layout = kernel_project
    builder = _builder(layout)
    objects = builder.build()
    # dispatch.cu + registry.cu + 2 head dims x 2 dtypes x fwd/bwd
    assert len(objects) == 10 and all(o.is_file() for o in objects)
    assert len(_calls(layout)) == 10
    assert any("2 jobs x 1 nvcc thread" in line for line in builder.lines)  # type: ignore[attr-defined]
    report = json.loads(layout.report_path.read_text())
    assert [o["status"] for o in report["objects"]] == ["compiled"] * 10
    assert all(o["peak_rss_bytes"] > 0 and o["wall_s"] > 0 for o in report["objects"])
    assert "10 compiled, 0 reused" in report["summary"]

    again = _builder(layout)
    assert again.build() == objects
    assert len(_calls(layout)) == 10  # nothing recompiled
    report = json.loads(layout.report_path.read_text())
    assert [o["status"] for o in report["objects"]] == ["reused"] * 10
    assert all(o["wall_s"] is not None for o in report["objects"])  # figures kept from then
    assert not [p for p in layout.cache_dir.iterdir() if ".tmp" in p.name]


def test_kernel_build_recompiles_only_what_a_header_change_touches(
    kernel_project: KernelLayout,
) -> None:
    layout = kernel_project
    _builder(layout).build()
    (layout.kernels_dir / "bwd_launch.cuh").write_text('#include "registry.cuh"\n// v2\n')
    _builder(layout).build()
    recompiled = _calls(layout)[10:]
    assert sorted(c.split()[0] for c in recompiled) == [
        "flash_bwd_hdim128_bf16.cu", "flash_bwd_hdim128_fp16.cu",
        "flash_bwd_hdim64_bf16.cu", "flash_bwd_hdim64_fp16.cu",
    ]  # fmt: skip


def test_kernel_build_failure_names_the_file_and_resumes(kernel_project: KernelLayout) -> None:
    layout = kernel_project
    dispatch = layout.kernels_dir / "dispatch.cu"
    dispatch.write_text('#include "registry.cuh"\nFAIL_ME\n')
    with pytest.raises(KernelBuildError, match=r"csrc/kernels/dispatch\.cu"):
        _builder(layout, MAX_JOBS="1").build()
    done_before = len(_calls(layout)) - 1  # every call but the failed one made an object
    assert done_before < 10
    dispatch.write_text('#include "registry.cuh"\n')
    _builder(layout).build()
    names = [c.split()[0] for c in _calls(layout)]
    # the objects done before the failure are not compiled again; dispatch.cu ran twice
    assert len(names) == 11
    assert [n for n in set(names) if names.count(n) > 1] == ["dispatch.cu"]


def test_kernel_build_retries_an_oom_killed_compile_alone(kernel_project: KernelLayout) -> None:
    layout = kernel_project
    (layout.kernels_dir / "dispatch.cu").write_text('#include "registry.cuh"\n// BIG_ME\n')
    builder = _builder(layout, MAX_JOBS="1", NVCC_THREADS="2")
    builder.build()
    dispatch_calls = [c for c in _calls(layout) if c.startswith("dispatch.cu")]
    assert dispatch_calls == ["dispatch.cu 2", "dispatch.cu 1"]
    assert any("killed for memory" in line for line in builder.lines)  # type: ignore[attr-defined]


def test_kernel_build_interrupted_says_how_to_resume(kernel_project: KernelLayout) -> None:
    layout = kernel_project
    (layout.kernels_dir / "dispatch.cu").write_text('#include "registry.cuh"\n// INTERRUPT_ME\n')
    with pytest.raises(KernelBuildError, match="interrupted.*run the build again to resume"):
        _builder(layout).build()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_real_nvcc_version_is_read() -> None:
    tc = toolchain.probe_toolchain(dict(os.environ))
    assert tc.nvcc.is_file() and tc.nvcc_version.count(".") == 2
    assert (tc.cudart_static_dir / "libcudart_static.a").is_file()


# ------------------------------------------------ memory model, admission, checksums


def test_memory_model_default_then_learned(tmp_path: Path) -> None:
    from build_tools.memory import MARGIN, MemoryModel

    ledger = tmp_path / "memory_ledger.json"
    model = MemoryModel.load(ledger, int(2 * GIB))
    assert model.expected_bytes("flash_fwd_hdim64_bf16", 2) == 4 * GIB  # default x threads
    model.record("flash_fwd_hdim64_bf16", 600 * 2**20, threads=2)
    model.record("flash_fwd_hdim64_bf16", 100 * 2**20, threads=1)  # keeps the larger per thread
    model.save(ledger)
    again = MemoryModel.load(ledger, int(2 * GIB))
    assert again.expected_bytes("flash_fwd_hdim64_bf16", 1) == int(300 * 2**20 * MARGIN)
    assert again.expected_bytes("other", 1) == 2 * GIB
    ledger.write_text("{not json")
    assert MemoryModel.load(ledger, 7).per_thread_peaks == {}


def test_admission_rule() -> None:
    from build_tools.memory import admits

    assert admits(need=10 * GIB, free=0, reserved=0, running=0)  # one always runs
    assert not admits(need=2 * GIB, free=3 * GIB, reserved=2 * GIB, running=1)
    assert admits(need=2 * GIB, free=5 * GIB, reserved=2 * GIB, running=1)


def test_kernel_build_holds_compiles_that_do_not_fit_then_learns(
    kernel_project: KernelLayout,
) -> None:
    layout = kernel_project
    tight = _builder(layout, MAX_JOBS="2", FLASH_ATTN_NVCC_MEM_GB="2")
    tight.free_memory = lambda: 3 * GIB  # 2 GiB expected each: only one fits at a time
    tight.build()
    held = [line for line in tight.lines if "holding" in line]  # type: ignore[attr-defined]
    assert held and "3.00 GiB free" in held[0]
    ledger = json.loads((layout.cache_dir / "memory_ledger.json").read_text())
    assert len(ledger["per_thread_peak_bytes"]) == 10
    assert all(0 < v < 2 * GIB for v in ledger["per_thread_peak_bytes"].values())

    # With what the first build measured, the same memory admits two at once.
    (layout.kernels_dir / "bwd_launch.cuh").write_text('#include "registry.cuh"\n// v2\n')
    learned = _builder(layout, MAX_JOBS="2", FLASH_ATTN_NVCC_MEM_GB="2")
    learned.free_memory = lambda: 3 * GIB
    learned.build()
    assert not [line for line in learned.lines if "holding" in line]  # type: ignore[attr-defined]


def test_kernel_build_detects_a_corrupt_cache_entry(kernel_project: KernelLayout) -> None:
    layout = kernel_project
    objects = _builder(layout).build()
    victim = objects[3]
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size, other bytes
    rebuilt = _builder(layout)
    assert rebuilt.build() == objects
    assert len(_calls(layout)) == 11  # just the corrupt one again
    assert any("does not match its checksum" in line for line in rebuilt.lines)  # type: ignore[attr-defined]
    assert victim.read_bytes() != b"\0" * victim.stat().st_size
