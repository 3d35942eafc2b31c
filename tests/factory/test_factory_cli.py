"""The CLI runs each stage alone: provision and build stop where they say."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.factory import cli
from scripts.factory.pipeline import RunOptions
from scripts.factory.report import CellReport
from scripts.factory.status import CellStatus, goal


def test_every_stage_has_a_command() -> None:
    stages = {"matrix", "provision", "plan", "build", "smoke", "publish", "report", "doctor"}
    assert stages <= set(cli.COMMANDS)
    for stage in ("provision", "build"):
        args = cli.parser().parse_args([stage, "--matrix", "local", "--toolchain", "system"])
        assert args.command == stage


def test_build_stage_neither_smoke_tests_nor_publishes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[RunOptions] = []

    def fake_run_cells(cells, spec, paths, options, log):  # type: ignore[no-untyped-def]
        seen.append(options)
        return [CellReport(cell=c.id, status="tagged") for c in cells]

    monkeypatch.setattr(cli, "run_cells", fake_run_cells)
    code = cli.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "build"])
    assert code == 0
    assert len(seen) == 1 and not seen[0].smoke and not seen[0].publish
    assert not (tmp_path / "out" / "whl").exists()


def test_unknown_toolchain_is_rejected_by_the_provision_stage() -> None:
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["provision", "--toolchain", "docker"])


def test_a_cells_status_is_one_typed_value() -> None:
    row = CellReport(cell="c")
    assert row.status is CellStatus.PENDING and not row.status.ok
    row.fail("build", "nvcc died")
    assert row.status is CellStatus.FAILED and row.status_text == "failed (build)"
    again = CellReport.from_dict(row.to_dict())  # report.json keeps 'failed (build)'
    assert (again.status, again.failed_stage) == (CellStatus.FAILED, "build")
    old_row = CellReport(cell="c", status="tagged")  # type: ignore[arg-type]
    assert old_row.status is CellStatus.TAGGED
    with pytest.raises(ValueError, match="'done' is not one of pending, tagged"):
        CellReport(cell="c", status="done")  # type: ignore[arg-type]
    assert [goal(smoke=False, publish=False), goal(True, False), goal(True, True)] == [
        CellStatus.TAGGED, CellStatus.BUILT, CellStatus.PUBLISHED
    ]
    goals = {goal(False, False), goal(True, False), goal(True, True)}
    assert {s for s in CellStatus if s.ok} == goals
