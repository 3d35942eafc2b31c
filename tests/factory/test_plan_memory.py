"""The plan speaks of one memory model (issue 15, item 7): the figure its jobs x threads
warning multiplies is the one the container limit check prints (the learned peak plus
margin from the ledger; FLASH_ATTN_NVCC_MEM_GB for a source never compiled)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from build_tools.kernels import generate_sources, kernel_sources
from build_tools.memory import LEDGER_NAME, MARGIN
from build_tools.planner import gib_to_bytes
from scripts.factory.limits import compile_need
from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.plan import kernel_builder, per_thread_need
from scripts.factory.probe import nvcc_version
from scripts.factory.stage import stage_sources

REPO = Path(__file__).resolve().parents[2]
SPEC = load_spec()


@pytest.mark.skipif(nvcc_version() is None, reason="no nvcc: the planner probes the compiler")
def test_plan_and_limit_check_use_the_learned_peak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLASH_ATTN_NVCC_MEM_GB", raising=False)
    cell = select_cells("ci torch=2.13 python=3.11", SPEC, LocalFacts("3.11"))[0]
    src = stage_sources(REPO, tmp_path / "src")
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, **cell.kernels.env()}
    builder = kernel_builder(cell, src, cache, env)
    layout = builder.layout
    jobs = builder.jobs_for(kernel_sources(layout, generate_sources(layout, builder.knobs)))
    assert len(jobs) == 10  # the ci kernel set
    default = gib_to_bytes(builder.knobs.mem_per_thread_gib)
    assert per_thread_need(builder, jobs) == default  # nothing learned: the default
    peaks = {j.source.stem: (100 + i) << 20 for i, j in enumerate(jobs)}
    (cache / LEDGER_NAME).write_text(json.dumps({"per_thread_peak_bytes": peaks}))
    builder = kernel_builder(cell, src, cache, env)
    learned = per_thread_need(builder, jobs)
    assert learned == int(max(peaks.values()) * MARGIN) < default
    # the container limit check's figure is the same model's, over the cell's sources
    need = compile_need(cell, REPO, cache)
    assert need.bytes == learned and "measured" in need.basis
