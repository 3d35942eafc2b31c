"""A cell's status: one typed value, written and compared only through this module.

    pending -> tagged (the `build` stage stops here) -> built (passed the smoke gate)
            -> published
    or quarantined (failed the smoke gate), failed (with the stage it failed in),
    skipped (not run: --fail-fast after an earlier failure)
"""

from __future__ import annotations

from enum import StrEnum


class CellStatus(StrEnum):
    PENDING = "pending"
    TAGGED = "tagged"
    BUILT = "built"
    PUBLISHED = "published"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def ok(self) -> bool:
        """The cell got as far as it was asked to go, so far."""
        return self in (CellStatus.TAGGED, CellStatus.BUILT, CellStatus.PUBLISHED)

    @classmethod
    def parse(cls, text: str) -> tuple[CellStatus, str]:
        """(status, failed stage) from a report file: 'published', 'failed (build)' (the
        form report.json files written before the stage had its own field)."""
        name, _, rest = text.partition(" (")
        try:
            return cls(name), rest.rstrip(")") if rest else ""
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(f"cell status {text!r} is not one of {valid}") from None


def goal(smoke: bool, publish: bool) -> CellStatus:
    """The status every cell of a run must reach for the run to succeed."""
    if not smoke:
        return CellStatus.TAGGED
    return CellStatus.PUBLISHED if publish else CellStatus.BUILT
