"""The CUDA toolchain: where it is, who it is, and one measured compile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .knobs import BuildConfigError, arch_number


@dataclass(frozen=True)
class CudaToolchain:
    cuda_home: Path
    nvcc: Path
    nvcc_version: str  # "13.0.88"
    compiler_id: str  # nvcc's and the host compiler's full version text, for cache keys
    cudart_static_dir: Path  # the directory that holds libcudart_static.a


@dataclass(frozen=True)
class RunResult:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    output: str


def _looks_like_cuda_home(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_home(env: Mapping[str, str]) -> Path:
    """CUDA_HOME or CUDA_PATH, else the toolkit around the `nvcc` on PATH (through
    wrapper scripts and symlinks), else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = env.get(var, "").strip()
        if value:
            path = Path(value)
            if not _looks_like_cuda_home(path):
                raise BuildConfigError(
                    f"{var}={value!r} holds no CUDA toolkit (no bin/nvcc and "
                    "include/cuda_runtime.h there); point it at e.g. /usr/local/cuda-13.0"
                )
            return path
    candidates: list[Path] = []
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for candidate in candidates:
        if _looks_like_cuda_home(candidate):
            return candidate
    raise BuildConfigError(
        "no CUDA toolkit found: set CUDA_HOME to the toolkit's directory "
        "(the one with bin/nvcc), e.g. CUDA_HOME=/usr/local/cuda-13.0"
    )


def _version_text(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except OSError as e:
        return f"unavailable ({e})"
    return (done.stdout or done.stderr).strip()


def probe_toolchain(env: Mapping[str, str]) -> CudaToolchain:
    cuda_home = find_cuda_home(env)
    nvcc = cuda_home / "bin" / "nvcc"
    nvcc_text = _version_text([str(nvcc), "--version"])
    m = re.search(r"V(\d+\.\d+\.\d+)", nvcc_text)
    if m is None:
        raise BuildConfigError(f"{nvcc} --version printed no version:\n{nvcc_text}")
    host = env.get("NVCC_CCBIN", "").strip() or "g++"
    host_text = _version_text([host, "--version"]).splitlines()
    lib_dir = next(
        (
            d
            for d in (cuda_home / "lib64", cuda_home / "lib")
            if (d / "libcudart_static.a").is_file()
        ),
        None,
    )
    if lib_dir is None:
        raise BuildConfigError(
            f"{cuda_home} has no lib64/libcudart_static.a, which the extension links; "
            "install the CUDA runtime (cudart) of this toolkit"
        )
    return CudaToolchain(
        cuda_home=cuda_home,
        nvcc=nvcc,
        nvcc_version=m.group(1),
        compiler_id=f"{nvcc_text}\nhost: {host_text[0] if host_text else host}",
        cudart_static_dir=lib_dir,
    )


def sass_arch(arch: str) -> str:
    """The SASS target of a knob value: 90 is built as 90a, whose wgmma kernels
    the sm_90 GPUs (H100, H200) run; sm_90a code runs on nothing else, and there
    is no compute capability 9.x but 9.0."""
    return "90a" if arch == "90" else arch


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """SASS for every arch, plus PTX of the newest (without the arch-specific
    features, which newer GPUs lack) so newer GPUs can JIT it."""
    flags: list[str] = []
    for arch in archs:
        sass = sass_arch(arch)
        flags += ["-gencode", f"arch=compute_{sass},code=sm_{sass}"]
    newest = str(arch_number(max(archs, key=arch_number)))
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


BASE_NVCC_FLAGS: tuple[str, ...] = (
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "-Xcompiler",
    "-fPIC",
)


def nvcc_flags(
    archs: Sequence[str], include_dirs: Sequence[Path], extra: Sequence[str]
) -> list[str]:
    """Everything but the source, the output and --threads."""
    flags = list(BASE_NVCC_FLAGS)
    for d in include_dirs:
        flags += ["-I", str(d)]
    return flags + gencode_flags(archs) + list(extra)


# Runs the command as its child and reports RUSAGE_CHILDREN's maxrss: the peak
# RSS of the largest process among all its waited-for descendants. The wrapper
# exists because a process forked from this (large, torch-importing) Python
# starts with our RSS as its high-water mark, which wait4() would then report.
_MARKER = "__flash_attn_peak_rss_kib"
# compiles (and their children) are the OOM killer's first choice, not the python process
# driving the build (it holds torch, so it is larger, and its death fails the whole build)
COMPILE_OOM_SCORE_ADJ = 500
_MARKER_RE = re.compile(r"\n?" + _MARKER + r"=(\d+)\n?$")
_MEASURE = (
    "import os, resource, subprocess, sys\n"
    "try:\n"  # under a memory limit, the kernel kills a compile (retried) before the build
    "    open('/proc/self/oom_score_adj', 'w').write('" + str(COMPILE_OOM_SCORE_ADJ) + "')\n"
    "except OSError:\n"
    "    pass\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "sys.stdout.flush()\n"
    "sys.stderr.write('\\n" + _MARKER + "=%d\\n' % peak)\n"
    "sys.stderr.flush()\n"
    "if rc < 0:\n"
    "    os.kill(os.getpid(), -rc)\n"
    "sys.exit(rc)\n"
)


def run_measured(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> RunResult:
    """Run a command to the end; its wall time and the peak RSS of its process tree.

    The figure is the largest peak of any single process in the tree (nvcc,
    cicc, ptxas, the host compiler). With NVCC_THREADS > 1 nvcc runs several
    such children at once, so the momentary total can reach about threads x it.
    """
    start = time.perf_counter()
    wrapper = [sys.executable, "-S", "-E", "-c", _MEASURE, *cmd]
    proc = subprocess.Popen(
        wrapper,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
    )
    try:
        out, _ = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    output = out.decode(errors="replace")
    peak = 0
    m = _MARKER_RE.search(output)
    if m is not None:
        peak = int(m.group(1)) * 1024  # kibibytes on Linux
        output = output[: m.start()]
    return RunResult(proc.returncode, time.perf_counter() - start, peak, output)
