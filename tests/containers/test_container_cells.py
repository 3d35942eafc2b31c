"""The container cell loop with fake engines: limits below one compile, a failed image
build, a container that cannot start, what a finished container reports, fail-fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from container_helpers import REPO, write_exe

from scripts.factory import cli
from scripts.factory import pipeline as pipeline_mod
from scripts.factory.limits import compile_need, limit_problem
from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.paths import FactoryPaths
from scripts.factory.pipeline import CellOutcome, RunOptions, run_cells
from scripts.factory.report import CellReport

SPEC = load_spec()
HERE = LocalFacts(python="3.11", torch="2.13", torch_cuda=None, torch_cxx11abi=True, nvcc="13.0")
GIB = 1 << 30

# A podman that answers `info`, fails to build images whose tag names torch2.13 (as a
# host without a registry does), and whose `run` behaves as FAKE_RUN says.
FAKE_PODMAN = r"""
echo "$@" >> "$FAKE_LOG"
for a in "$@"; do
  case "$a" in
    info) exit 0 ;;
    build)
      case "$*" in
        *torch2.13*) echo 'Error: pinging container registry quay.io: no such host' >&2; exit 125 ;;
      esac
      exit 0 ;;
    run) break ;;
  esac
done
if [ "$FAKE_RUN" = "rlimit" ]; then
  echo 'Error: runc create failed: error setting rlimit type 6: operation not permitted' >&2
  exit 126
fi
work=""; prev=""
for a in "$@"; do
  if [ "$prev" = "--work" ]; then work="$a"; fi
  prev="$a"
done
printf '[{"cell": "%s", "status": "quarantined", "note": "smoke failed"}]' "$FAKE_CELL" \
  > "$work/report.json"
printf '{"memory_peak_bytes": 1073741824, "oom_kills": 0, ' > "$work/cgroup.json"
printf '"memory_limit_bytes": 6442450944, "source": "cgroup v1"}' >> "$work/cgroup.json"
exit 1
"""


@pytest.fixture
def fake_podman(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    write_exe(bin_dir / "podman", FAKE_PODMAN)
    log = tmp_path / "podman.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FLASH_ATTN_OBJECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CONTAINER_ULIMITS", raising=False)
    monkeypatch.delenv("FLASH_ATTN_NVCC_MEM_GB", raising=False)
    return log


def _wheels(tmp_path: Path, matrix: str, *extra: str) -> tuple[int, list[dict[str, str]]]:
    work = tmp_path / "work"
    argv = ["--work", str(work), "--out", str(tmp_path / "out"), "wheels", "--engine"]
    code = cli.main([*argv, "podman", "--matrix", matrix, *extra])
    return code, json.loads((work / "report.json").read_text())


def _calls(log: Path, verb: str) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if f" {verb} " in f" {line} "]


def test_limit_below_one_compile_stops_at_the_matrix_stage(
    tmp_path: Path, fake_podman: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    argv = ["--work", str(work), "--out", str(tmp_path / "out"), "wheels", "--engine"]
    code = cli.main(
        [
            *argv,
            "podman",
            "--matrix",
            "torch=2.13 python=3.11 kernels=tiny memory=1g binding=classic",
        ]
    )
    assert code == 2  # a setting that cannot work: before any cell, like a bad value
    note = capsys.readouterr().err
    assert "container memory limit 1g is below what one compile needs: 2.50 GiB" in note
    assert "memory=3g" in note and "FLASH_ATTN_NVCC_MEM_GB" in note
    assert not _calls(fake_podman, "build") and not _calls(fake_podman, "run")
    assert not (work / "report.json").exists()


def test_compile_need_follows_the_memory_ledger(tmp_path: Path) -> None:
    cell = select_cells(
        "torch=2.13 python=3.11 kernels=tiny memory=1g binding=classic", SPEC, HERE
    )[0]
    cache = tmp_path / "cache"
    cache.mkdir()
    unknown = compile_need(cell, REPO, cache)
    assert unknown.bytes == int(2.5 * GIB) and "never compiled" in unknown.basis
    assert limit_problem(cell, unknown)
    stems = ["dispatch", "registry", "flash_fwd_hdim64_bf16", "flash_bwd_hdim64_bf16"]
    peaks = {s: 200 << 20 for s in stems} | {"flash_bwd_hdim64_bf16": 300 << 20}
    (cache / "memory_ledger.json").write_text(json.dumps({"per_thread_peak_bytes": peaks}))
    learned = compile_need(cell, REPO, cache)
    assert learned.source == "flash_bwd_hdim64_bf16"
    assert learned.bytes == int((300 << 20) * 1.25) and "memory_ledger.json" in learned.basis
    assert limit_problem(cell, learned) == ""


def test_failed_image_fails_its_cells_and_the_matrix_goes_on(
    tmp_path: Path, fake_podman: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_RUN", "rlimit")
    code, rows = _wheels(tmp_path, "torch=2.13,2.14 python=3.11 kernels=tiny binding=classic")
    assert code == 1
    by_cell = {r["cell"]: r for r in rows}
    first = by_cell["cu130-torch2.13-cxx11abiTRUE-tiny-cp311"]
    assert first["status"] == "failed (image)"
    assert "flash-attn-builder:cp311-torch2.13-cu130" in first["note"]
    log = tmp_path / "work" / "engine" / "image-cp311-torch2.13-cu130.log"
    assert "pinging container registry" in log.read_text()
    second = by_cell["cu130-torch2.14-cxx11abiTRUE-tiny-cp311"]
    assert second["status"] == "failed (container)"  # it was tried: its image built
    assert len(_calls(fake_podman, "build")) == 2 and len(_calls(fake_podman, "run")) == 1


def test_image_failure_message_names_the_fix(
    tmp_path: Path, fake_podman: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _wheels(tmp_path, "torch=2.13 python=3.11 kernels=tiny binding=classic")
    out = capsys.readouterr().out
    assert "`podman build` failed (exit 125)" in out
    assert "tools/make_base_image.sh" in out and "BASE_IMAGE=" in out


def test_container_that_cannot_start_says_why(
    tmp_path: Path,
    fake_podman: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FAKE_RUN", "rlimit")
    code, rows = _wheels(tmp_path, "torch=2.14 python=3.11 kernels=tiny binding=classic")
    assert code == 1 and rows[0]["status"] == "failed (container)"
    out = capsys.readouterr().out
    assert "ended (exit 126) without a report" in out
    assert "error setting rlimit" in out and "CONTAINER_ULIMITS" in out


def test_fail_fast_skips_the_cells_after_the_first_failure(
    tmp_path: Path, fake_podman: Path
) -> None:
    code, rows = _wheels(
        tmp_path, "torch=2.13,2.14 python=3.11 kernels=tiny binding=classic", "--fail-fast"
    )
    assert code == 1
    assert [r["status"] for r in rows] == ["failed (image)", "skipped"]
    assert "--fail-fast" in rows[1]["note"]
    assert len(_calls(fake_podman, "build")) == 1  # the second cell's image was never built


def test_what_the_container_reports_becomes_the_cells_row(
    tmp_path: Path, fake_podman: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_RUN", "report")
    monkeypatch.setenv("FAKE_CELL", "cu130-torch2.14-cxx11abiTRUE-tiny-cp311")
    code, rows = _wheels(
        tmp_path, "torch=2.14 python=3.11 kernels=tiny memory=6g cpus=2 binding=classic"
    )
    assert code == 1
    assert rows[0]["status"] == "quarantined"
    assert "smoke failed" in rows[0]["note"]
    assert "container peak 1.00 GiB, 0 OOM kill(s) (cgroup v1)" in rows[0]["note"]
    run = _calls(fake_podman, "run")[0].split()
    assert run[run.index("--memory") + 1] == "6g" and run[run.index("--cpus") + 1] == "2"
    assert not (tmp_path / "out" / "whl").exists()  # nothing published


def _paths(tmp_path: Path) -> FactoryPaths:
    return FactoryPaths(REPO, tmp_path / "work", tmp_path / "out", tmp_path / "cache")


def test_run_cells_continues_after_a_failure_unless_fail_fast(tmp_path: Path) -> None:
    cells = select_cells(
        "torch=2.13,2.14 python=3.11,3.12 kernels=tiny binding=classic", SPEC, HERE
    )
    seen: list[str] = []

    def runner(cell):  # type: ignore[no-untyped-def]
        seen.append(cell.id)
        failed = cell.torch == "2.13" and cell.python == "3.11"
        return CellOutcome(CellReport(cell.id, status="failed (build)" if failed else "tagged"))

    options = RunOptions(smoke=False, publish=False)
    rows = run_cells(cells, SPEC, _paths(tmp_path), options, lambda _: None, runner)
    assert len(seen) == 4 and [r.status for r in rows].count("tagged") == 3

    seen.clear()
    options = RunOptions(smoke=False, publish=False, fail_fast=True)
    rows = run_cells(cells, SPEC, _paths(tmp_path), options, lambda _: None, runner)
    assert seen == [cells[0].id]
    assert [r.status_text for r in rows] == ["failed (build)", "skipped", "skipped", "skipped"]


def test_engine_none_runs_cells_here_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here: list[str] = []

    def fake_run_cell(cell, spec, paths, options, log):  # type: ignore[no-untyped-def]
        here.append(cell.id)
        return CellOutcome(CellReport(cell.id, status="tagged"))

    monkeypatch.setattr(pipeline_mod, "run_cell", fake_run_cell)
    cells = select_cells("torch=2.13 python=3.11 kernels=tiny binding=classic", SPEC, HERE)
    rows = run_cells(cells, SPEC, _paths(tmp_path), RunOptions(smoke=False), lambda _: None)
    assert here == [cells[0].id] and rows[0].status == "tagged"
    args = cli.parser().parse_args(["wheels"])
    assert args.engine == "none" and not args.fail_fast and not args.no_publish
