"""Compile a small program against csrc/kernels with nvcc, using the project's gencode
flags, and run it on the host: for tests of kernel-side code that needs no GPU. Skips the
calling test where no CUDA toolkit is found."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from build_tools import toolchain
from build_tools.knobs import BuildConfigError

ROOT = Path(__file__).resolve().parents[1]


def toolkit_bin() -> Path:
    """The CUDA toolkit's bin folder (nvcc, ptxas); skips the calling test without one."""
    try:
        return toolchain.find_cuda_home(os.environ) / "bin"
    except BuildConfigError as e:
        pytest.skip(f"no CUDA toolkit: {e}")


def run_host_probe(source: str, archs: tuple[str, ...], tmp_path: Path) -> str:
    """The program's standard output. A build failure fails the test with nvcc's error."""
    nvcc = toolkit_bin() / "nvcc"
    src = tmp_path / "probe.cu"
    src.write_text(source)
    exe = tmp_path / "probe"
    cmd = [str(nvcc), "-std=c++17", "-O2", f"-I{ROOT / 'csrc' / 'kernels'}"]
    cmd += toolchain.gencode_flags(archs) + [str(src), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
