"""Which builds may launch the attention kernels as programmatic dependent launches.

A dependent launch is safe only where the code the GPU runs has the wait of
`call_aborted` (csrc/kernels/tile.cuh), which exists in code built for sm_90 and later.
`launch()` asks `newest_built_arch()` (nvcc's __CUDA_ARCH_LIST__): a build whose archs
are all older ships their PTX alone, which an sm_90+ GPU would JIT without the wait, so
such a build must launch plainly. Compiled here with the project's own gencode flags
and run on the host (no GPU needed; skipped without a CUDA toolkit).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from host_probe import run_host_probe

PROBE = """
#include <cstdio>
#include "tile.cuh"
int main() { std::printf("%d\\n", flash::newest_built_arch()); }
"""


def newest_arch_of_build(archs: tuple[str, ...], tmp_path: Path) -> int:
    return int(run_host_probe(PROBE, archs, tmp_path))


BUILDS = [(("80",), 800), (("80", "90"), 900), (("90",), 900), (("80", "100"), 1000)]


@pytest.mark.parametrize(("archs", "newest"), BUILDS)
def test_newest_built_arch_is_the_newest_of_the_build(archs, newest, tmp_path):
    """launch() goes dependent only where this is 900 or more: not for archs 80 alone."""
    assert newest_arch_of_build(archs, tmp_path) == newest
