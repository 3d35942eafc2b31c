"""What one kernel path's run of the upstream suite did, from the plugin's files.

upstream_select.py writes a selection JSON (what was collected, excluded, selected)
and a results file of JSON lines (one per reported phase worth keeping). This module
reads them back into a PathSummary; no pytest, no torch.

A case's outcome follows pytest's own counting: a failed setup or teardown is an
error, a skipped setup a skip, otherwise the call phase decides; a report of another
phase that failed (pytest-xdist's "worker crashed" report) is a failure. Selected
cases with no record did not run (the run was cut short or crashed).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upstream_rules import PARTS

__all__ = [
    "Outcomes",
    "PathSummary",
    "part_ids",
    "read_outcomes",
    "read_selection",
    "summarize",
]

OUTCOMES = ("passed", "failed", "skipped", "errors", "xfailed", "xpassed")


@dataclass
class Outcomes:
    counts: dict[str, int]
    failing: list[str]  # failed or errored node ids, sorted
    not_run: list[str]  # selected, never reported
    longrepr: dict[str, str] = field(default_factory=dict)  # failing id -> report tail


@dataclass
class PathSummary:
    path: str
    env: dict[str, str]
    selection: dict[str, Any] | None  # None: collection never got to the selection
    outcomes: Outcomes | None  # None: a collect-only run
    pytest_exit: int | None
    seconds: float
    cut_short: str = ""  # why the run was stopped before its end, if it was
    part: str = "all"  # all, light or heavy: the part of the selection this run was to run

    @property
    def ok(self) -> bool:
        if self.selection is None or self.selection["collection_errors"] or self.cut_short:
            return False
        if self.outcomes is None:  # collect-only
            return self.pytest_exit == 0
        bad = self.outcomes.counts["failed"] + self.outcomes.counts["errors"]
        return bad == 0 and not self.outcomes.not_run and self.pytest_exit in (0, 5)

    def to_json(self) -> dict[str, Any]:
        sel = self.selection or {}
        data: dict[str, Any] = {
            "env": self.env,
            "ok": self.ok,
            "pytest_exit": self.pytest_exit,
            "seconds": round(self.seconds, 1),
            "cut_short": self.cut_short,
            "part": self.part,
        }
        for key in (
            "collected",
            "selected",
            "selected_always",
            "selected_sample",
            "sampled_out",
            "excluded",
            "excluded_by_feature",
            "stale_exclusions",
            "collection_errors",
            "by_test",
            "stand_ins",
            "capability",
        ):
            data[key] = sel.get(key)
        if self.outcomes is not None:
            data.update(self.outcomes.counts)
            data["not_run"] = len(self.outcomes.not_run)
            data["failing"] = self.outcomes.failing
            data["not_run_ids"] = self.outcomes.not_run
        return data


def read_selection(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_outcomes(results: Path, selected_ids: list[str]) -> Outcomes:
    records: dict[str, list[dict[str, Any]]] = {}
    if results.is_file():
        for line in results.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                records.setdefault(record["nodeid"], []).append(record)
    counts: Counter[str] = Counter({k: 0 for k in OUTCOMES})
    failing: list[str] = []
    longrepr: dict[str, str] = {}
    for nodeid, recs in records.items():
        outcome = _outcome(recs)
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            failing.append(nodeid)
            longrepr[nodeid] = next((r["longrepr"] for r in recs if "longrepr" in r), "")
    not_run = [n for n in selected_ids if n not in records]
    return Outcomes(dict(counts), sorted(failing), not_run, longrepr)


def _outcome(records: list[dict[str, Any]]) -> str:
    if any(r["when"] in ("setup", "teardown") and r["outcome"] == "failed" for r in records):
        return "errors"
    if any(
        r["when"] not in ("setup", "call", "teardown") and r["outcome"] == "failed" for r in records
    ):
        return "failed"
    for r in records:
        if r["when"] == "setup" and r["outcome"] == "skipped":
            return "skipped"
    call = next((r for r in records if r["when"] == "call"), None)
    if call is None:
        return "errors"
    if call.get("xfail"):
        return "xfailed" if call["outcome"] == "skipped" else "xpassed"
    return str(call["outcome"])


def summarize(
    path: str,
    env: dict[str, str],
    selection_file: Path,
    results_file: Path | None,
    pytest_exit: int | None,
    seconds: float,
    cut_short: str = "",
    part: str = "all",
) -> PathSummary:
    """``part`` (all, light, heavy): which of the selected cases the run was to run;
    only those count as not run when they have no record."""
    selection = read_selection(selection_file)
    outcomes = None
    if results_file is not None:
        outcomes = read_outcomes(results_file, part_ids(selection, part))
    return PathSummary(path, env, selection, outcomes, pytest_exit, seconds, cut_short, part)


def part_ids(selection: dict[str, Any] | None, part: str) -> list[str]:
    """The selected ids of one part: all of them, those no [[heavy]] entry names
    (light), or those (heavy; the selection's ``heavy_ids``)."""
    if selection is None:
        return []
    ids: list[str] = selection["selected_ids"]
    if part not in PARTS:
        raise ValueError(f"part must be {', '.join(PARTS[:-1])} or {PARTS[-1]}; got {part!r}")
    if part == "all":
        return ids
    heavy = set(selection.get("heavy_ids", ()))
    return [n for n in ids if (n in heavy) == (part == "heavy")]
