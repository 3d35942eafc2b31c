"""The CUDA toolchain: where it is (the one place that finds it), who it is, and the
measured run every compile and every factory build goes through."""

from __future__ import annotations

import os
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
    cpu_s: float = 0.0  # user + system time of the whole process tree


def _looks_like_cuda_home(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_home(env: Mapping[str, str]) -> Path:
    """The one place a CUDA toolkit is found (setup.py, the factory's probe, provision
    and smoke stages all ask here): CUDA_HOME or CUDA_PATH, else the toolkit around the
    `nvcc` on PATH (through wrapper scripts and symlinks), else /usr/local/cuda."""
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


def pip_cuda_home(site_packages: Path) -> Path | None:
    """The CUDA toolkit that pip packages assemble in a site-packages directory:
    nvidia/<name>/ holding bin/nvcc (cuda-toolkit 13: nvidia/cu13; 12: nvidia/cuda_nvcc)."""
    for nvcc in sorted(site_packages.glob("nvidia/*/bin/nvcc")):
        return nvcc.parent.parent
    return None


def cuda_tool(name: str, env: Mapping[str, str], search: Sequence[Path] = ()) -> Path | None:
    """A CUDA binary utility (cuobjdump, nvdisasm): in the toolkit find_cuda_home gives,
    else on PATH, else in the pip packages under the site-packages directories `search`
    (nvidia-cuda-cuobjdump puts it in nvidia/cu13/bin)."""
    try:
        exe = find_cuda_home(env) / "bin" / name
        if exe.is_file():
            return exe
    except BuildConfigError:
        pass
    found = shutil.which(name, path=env.get("PATH"))
    if found:
        return Path(found)
    for site in search:
        hits = sorted(site.glob(f"nvidia/*/bin/{name}"))
        if hits:
            return hits[-1]
    return None


_RELEASE_RE = re.compile(r"release (\d+\.\d+)")


def nvcc_release(nvcc: Path) -> str | None:
    """'13.0' for an nvcc, from `nvcc --version`; None where it does not run or say."""
    if not nvcc.is_file():
        return None
    m = _RELEASE_RE.search(_version_text([str(nvcc), "--version"]))
    return m.group(1) if m else None


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


# Runs argv[3:] as its child and writes "returncode cpu_seconds peak_kib" to the file
# descriptor argv[1]: RUSAGE_CHILDREN's CPU time (user + system of every waited-for
# descendant) and maxrss, the peak RSS of the largest process among them. The wrapper
# exists because a process forked from this (large, torch-importing) Python starts with
# our RSS as its high-water mark, which wait4() would then report. argv[2] is the
# oom_score_adj to take first ("" for none).
# compiles (and their children) are the OOM killer's first choice, not the python process
# driving the build (it holds torch, so it is larger, and its death fails the whole build)
COMPILE_OOM_SCORE_ADJ = 500
_MEASURE = (
    "import os, resource, subprocess, sys\n"
    "if sys.argv[2]:\n"
    "    try:\n"
    "        open('/proc/self/oom_score_adj', 'w').write(sys.argv[2])\n"
    "    except OSError:\n"
    "        pass\n"
    "rc = subprocess.call(sys.argv[3:])\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "os.write(int(sys.argv[1]), b'%d %.3f %d' % (rc, r.ru_utime + r.ru_stime, r.ru_maxrss))\n"
    "if rc < 0:\n"
    "    os.kill(os.getpid(), -rc)\n"
    "sys.exit(rc)\n"
)


def run_measured(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    log: Path | None = None,
    cwd: Path | None = None,
    oom_score_adj: int | None = COMPILE_OOM_SCORE_ADJ,
) -> RunResult:
    """Run a command to the end; its wall time, CPU time and the peak RSS of its tree.

    The one measured run of the project: each kernel compile (setup.py) and each cell's
    whole build (the wheel factory). The peak is the largest peak of any single process
    in the tree (nvcc, cicc, ptxas, the host compiler); with NVCC_THREADS > 1 nvcc runs
    several such children at once, so the momentary total can reach about threads x it.
    Output is captured into RunResult.output, or with `log` appended to that file (after
    the command line) and output is "". Ctrl-C stops the command, then re-raises.
    """
    start = time.perf_counter()
    read_end, write_end = os.pipe()
    adj = "" if oom_score_adj is None else str(oom_score_adj)
    wrapper = [sys.executable, "-S", "-E", "-c", _MEASURE, str(write_end), adj, *cmd]
    sink = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        sink = log.open("ab")
        sink.write(("$ " + " ".join(cmd) + "\n").encode())
        sink.flush()
    try:
        proc = subprocess.Popen(
            wrapper,
            stdout=sink if sink is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            pass_fds=(write_end,),
        )
        os.close(write_end)
        write_end = -1
        try:
            out, _ = proc.communicate()
        except BaseException:  # Ctrl-C: stop the command, leave nothing running
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        with os.fdopen(read_end, "rb") as f:
            read_end = -1
            stats = f.read().split()
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        if sink is not None:
            sink.close()
    cpu_s, peak = (float(stats[1]), int(stats[2]) * 1024) if len(stats) == 3 else (0.0, 0)
    output = out.decode(errors="replace") if out is not None else ""
    return RunResult(proc.returncode, time.perf_counter() - start, peak, output, cpu_s)
