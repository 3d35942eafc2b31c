"""Which builds may launch the attention kernels as programmatic dependent launches.

A dependent launch is safe only where the code the GPU runs has the wait of
`call_aborted` (csrc/kernels/tile.cuh), which exists in code built for sm_90 and later.
`launch()` asks `newest_built_arch()` (nvcc's __CUDA_ARCH_LIST__): a build whose archs
are all older ships their PTX alone, which an sm_90+ GPU would JIT without the wait, so
such a build must launch plainly. Compiled here with the project's own gencode flags
and run on the host (no GPU needed; skipped without a CUDA toolkit).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from build_tools import toolchain
from build_tools.knobs import BuildConfigError

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
#include <cstdio>
#include "tile.cuh"
int main() { std::printf("%d\\n", flash::newest_built_arch()); }
"""


def newest_arch_of_build(archs: tuple[str, ...], tmp_path: Path) -> int:
    try:
        nvcc = toolchain.find_cuda_home(os.environ) / "bin" / "nvcc"
    except BuildConfigError as e:
        pytest.skip(f"no CUDA toolkit: {e}")
    src = tmp_path / "probe.cu"
    src.write_text(PROBE)
    exe = tmp_path / "probe"
    cmd = [str(nvcc), "-std=c++17", f"-I{ROOT / 'csrc' / 'kernels'}"]
    cmd += toolchain.gencode_flags(archs) + [str(src), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    return int(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)


BUILDS = [(("80",), 800), (("80", "90"), 900), (("90",), 900), (("80", "100"), 1000)]


@pytest.mark.parametrize(("archs", "newest"), BUILDS)
def test_newest_built_arch_is_the_newest_of_the_build(archs, newest, tmp_path):
    """launch() goes dependent only where this is 900 or more: not for archs 80 alone."""
    assert newest_arch_of_build(archs, tmp_path) == newest
