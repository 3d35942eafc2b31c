"""The CLI runs each stage alone: provision and build stop where they say."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.factory import cli
from scripts.factory.pipeline import RunOptions
from scripts.factory.report import CellReport


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
