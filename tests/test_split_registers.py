"""The register counts the split planner counts on (csrc/kernels/split_plan.h, min_ctas).

At head dims 33-64 the 64-key four-warp split kernel runs four CTAs an SM where a call has
2-3 tiles an SM, and the planner's slots (split::ctas_per_sm) assume all four fit: 4 x 128
threads share an SM's 65,536 registers only at 128 registers a lane or fewer. Nothing in
the kernel forces that: ptxas picks 128 on its own, and a launch bound asking for four
CTAs an SM gave the same 128 registers but slower code (H200, benchmarks/RESULTS.md,
twenty-fifth session); nvcc 13.0 had also silently dropped such a bound where its
expression held a braced list. So this test holds the kernel to it: a change that takes
the kernel past 128 registers (a scratch variant with more code in the kernel took 164,
three CTAs an SM) fails here, not as a quiet slowdown on the GPU.

The head-dim-64 split forward is compiled the way the build compiles it (the project's
nvcc flags, sm_90a, instantiated through run_fwd_split) to PTX, and ptxas reports each
split kernel's registers; the CTAs an SM the planner counts for each shape come from
split_plan.h itself (ctas_per_sm, in a host probe). Every shape must fit that many CTAs'
registers on an SM. No GPU needed; skipped without a CUDA toolkit.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from host_probe import ROOT, run_host_probe, toolkit_bin

from build_tools import toolchain

SOURCE = r"""
#define FLASH_HAS_SM90A 1
#include "fwd_split.cuh"
template int flash::run_fwd_split<64, __nv_bfloat16>(const FlashAttnParams &, cudaStream_t);
"""
# The planner's shapes at head dim 64 and the CTAs an SM it counts for each.
PLAN_PROBE = r"""
#include <cstdio>
#include "split_plan.h"
int main() {
  using namespace flash::split;
  for (Shape s : {one_warp(64), wide(64), wide_pair(64)})
    std::printf("%d %d %d\n", s.w, s.bnw, ctas_per_sm(64, s));
}
"""
REGISTERS_AN_SM = 65536
REGISTER_UNIT = 8  # registers a lane are allocated in multiples of 8 (256 a warp)
KERNEL = re.compile(r"fwd_split_kernelILi64ELi(\d+)ELi(\d+)E")


def cuda_bin() -> Path:
    """The toolkit's bin folder, with nvcc and ptxas (else the test skips)."""
    bin_dir = toolkit_bin()
    if not (bin_dir / "ptxas").is_file():
        pytest.skip(f"no ptxas in {bin_dir}")
    return bin_dir


def registers(ptxas_log: str) -> dict[tuple[int, int], int]:
    """(warps, keys a warp) -> registers a lane, from ptxas -v's report."""
    regs: dict[tuple[int, int], int] = {}
    current: tuple[int, int] | None = None
    for line in ptxas_log.splitlines():
        if "Compiling entry function" in line:
            m = KERNEL.search(line)
            current = (int(m.group(1)), int(m.group(2))) if m else None
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            regs[current] = int(m.group(1))
            current = None
    return regs


@pytest.fixture(scope="module")
def planned_ctas(tmp_path_factory) -> dict[tuple[int, int], int]:
    """(warps, keys a warp) -> the CTAs an SM split_plan.h counts, at head dim 64."""
    cuda_bin()
    out = run_host_probe(PLAN_PROBE, ("90",), tmp_path_factory.mktemp("plan"))
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines()]
    return {(w, bnw): ctas for w, bnw, ctas in rows}


@pytest.fixture(scope="module")
def split_registers(tmp_path_factory) -> dict[tuple[int, int], int]:
    bin_dir = cuda_bin()
    tmp = tmp_path_factory.mktemp("split_registers")
    src, ptx, cubin = tmp / "split64.cu", tmp / "split64.ptx", tmp / "split64.cubin"
    src.write_text(SOURCE)
    flags = toolchain.BASE_NVCC_FLAGS
    nvcc = [str(bin_dir / "nvcc"), *flags, f"-I{ROOT / 'csrc' / 'kernels'}", "-arch=compute_90a"]
    to_ptx = [*nvcc, "-ptx", str(src), "-o", str(ptx)]
    built = subprocess.run(to_ptx, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    ptxas = [str(bin_dir / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)]
    assembled = subprocess.run(ptxas, capture_output=True, text=True)
    assert assembled.returncode == 0, assembled.stderr[-2000:]
    return registers(assembled.stdout + assembled.stderr)


def test_every_planned_shape_is_compiled(split_registers, planned_ctas):
    assert set(split_registers) == set(planned_ctas)
    assert planned_ctas[(4, 16)] == 4  # the four-CTA shape this test is for


def test_every_shape_fits_its_planned_ctas(split_registers, planned_ctas):
    for (warps, bnw), ctas in planned_ctas.items():
        regs = -(-split_registers[(warps, bnw)] // REGISTER_UNIT) * REGISTER_UNIT
        assert regs * 32 * warps * ctas <= REGISTERS_AN_SM, (warps, bnw, ctas, split_registers)


def test_registers_parsed_from_ptxas_report():
    """The parser reads ptxas -v's lines as ptxas 13.0 writes them."""
    split = "_ZN5flash16fwd_split_kernelILi64ELi4ELi16E13__nv_bfloat16EEv15FlashAttnParams"
    combine = "_ZN5flash14combine_kernelI13__nv_bfloat16EEv15FlashAttnParams"
    log = (
        f"ptxas info    : Compiling entry function '{split}' for 'sm_90a'\n"
        f"ptxas info    : Function properties for {split}\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 164 registers, used 1 barriers\n"
        f"ptxas info    : Compiling entry function '{combine}' for 'sm_90a'\n"
        "ptxas info    : Used 40 registers, used 0 barriers\n"
    )
    assert registers(log) == {(4, 16): 164}
