"""Smoke records: what a smoke job hands to the publish job, which runs elsewhere.

A record (`<wheel>.smoke.json`, next to the wheel) names the cell, the wheel's sha256
and every check with its verdict. The publish job trusts nothing else: it takes a wheel
only when its record says it passed (with the GPU check run and passed, unless told that
a CPU-only gate is enough) and the wheel's bytes still match the record's sha256.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import FactoryError
from .matrix import Cell
from .publish import Candidate, sha256_file
from .smoke import SmokeResult
from .wheelfile import read_wheel_info

SUFFIX = ".smoke.json"


@dataclass(frozen=True)
class SmokeRecord:
    cell: str
    variant: str
    wheel: str  # the file name; the wheel lies next to the record
    sha256: str
    passed: bool
    gpu: str  # "passed", "failed" or "skipped": the numeric check on a GPU
    summary: str
    checks: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checks"] = list(self.checks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SmokeRecord:
        fields = {k: data[k] for k in cls.__dataclass_fields__}
        fields["checks"] = tuple(fields["checks"])
        return cls(**fields)


def gpu_verdict(result: SmokeResult) -> str:
    for check in result.checks:
        if check.name == "gpu":
            return "skipped" if check.ok is None else ("passed" if check.ok else "failed")
    return "skipped"


def make_record(cell: Cell, wheel: Path, result: SmokeResult) -> SmokeRecord:
    return SmokeRecord(
        cell=cell.id,
        variant=cell.variant,
        wheel=wheel.name,
        sha256=sha256_file(wheel),
        passed=result.passed,
        gpu=gpu_verdict(result),
        summary=result.summary(),
        checks=tuple(asdict(c) for c in result.checks),
    )


def write_record(record: SmokeRecord, wheel: Path) -> Path:
    path = wheel.with_name(wheel.name + SUFFIX)
    path.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Assembly:
    """What publish-smoked found: the wheels to publish and the ones it left out, why."""

    candidates: tuple[Candidate, ...]
    left_out: tuple[str, ...]


def assemble(roots: Iterable[Path], require_gpu: bool = True) -> Assembly:
    """Every record under roots -> candidates for publish.publish (smoke-passed only).

    A wheel missing next to its record, or whose bytes differ from the record's sha256,
    is an error: that is a mix-up between jobs, never a reason to publish less quietly."""
    candidates: list[Candidate] = []
    left_out: list[str] = []
    seen: dict[str, str] = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*" + SUFFIX)):
            record = SmokeRecord.from_dict(json.loads(path.read_text()))
            wheel = path.with_name(record.wheel)
            if not wheel.is_file():
                raise FactoryError(f"{path}: its wheel {record.wheel} is not next to it")
            if sha256_file(wheel) != record.sha256:
                raise FactoryError(
                    f"{wheel} does not match the sha256 its smoke record holds ({path}): "
                    "the wheel was not the one smoke-tested"
                )
            if record.cell in seen:
                raise FactoryError(
                    f"cell {record.cell} has two smoke records ({seen[record.cell]}, {path})"
                )
            seen[record.cell] = str(path)
            if not record.passed:
                left_out.append(f"{record.wheel}: smoke {record.summary}")
                continue
            if require_gpu and record.gpu != "passed":
                left_out.append(f"{record.wheel}: the GPU check was {record.gpu}")
                continue
            tags = read_wheel_info(wheel).tags
            candidates.append(
                Candidate(
                    record.cell,
                    record.variant,
                    wheel,
                    f"{tags.platform}: tagged by the factory in CI",
                    record.summary,
                )
            )
    return Assembly(tuple(candidates), tuple(left_out))
