"""pytest plugin: run a deterministic part of upstream FlashAttention's test file.

Loaded by tools/upstream_suite.py as ``-p upstream_select`` (tools/ on PYTHONPATH);
inactive unless ``--upstream-config`` is given. It

* binds the [[stand_in]] names of the config that our flash_attn lacks, before
  collection, so that upstream's module imports (see recipes/upstream_suite.toml);
* keeps, of the collected cases that pytest's own -k / -m leave, those
  upstream_rules.classify selects (the always list and the 1-in-N sample, minus the
  exclusions) and deselects the rest; with
  ``--upstream-part light`` or ``heavy`` it keeps only the selected cases that no
  [[heavy]] entry names, or only those (the tool runs the two with different numbers
  of workers);
* writes the selection (counts, per feature, per test, the ids) as JSON
  (``--upstream-selection``) and each case's outcome, as it comes, as JSON lines
  (``--upstream-results``), so a run cut short still leaves what it did.

Under pytest-xdist every worker selects the same cases (the choice depends on the
node ids alone); worker gw0 writes the selection and the controller the outcomes.

``--upstream-assume-capability 9.0`` is for collecting where torch sees no GPU:
upstream's module reads the GPU's compute capability at import, and this answers
it instead. It does nothing where a GPU is present.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import sys
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_TOOLS = str(Path(__file__).resolve().parent)
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)
from upstream_rules import (  # noqa: E402
    PARTS,
    ConfigError,
    Exclusion,
    StandIn,
    SuiteConfig,
    Verdict,
    check_sample,
    classify,
    excludes_whole,
    is_heavy,
    load_config,
    relevant_exclusions,
)

CONFIG_KEY = pytest.StashKey[SuiteConfig]()
STATE_KEY = pytest.StashKey[dict[str, Any]]()
# What the results file keeps of a failure: the report's tail (pytest's --tb style) and
# of its captured stdout (upstream's tests print their max differences there), for the
# first DETAILED_FAILURES; after those only the one-line crash message, so that a run
# where thousands of cases fail still leaves a file of a few MB.
LONGREPR_LIMIT = 1500
STDOUT_LIMIT = 600
DETAILED_FAILURES = 300  # --upstream-detailed-failures
CRASH_LIMIT = 300

# the results file; set in the controller (or the only process) at session start
_results_path: Path | None = None
# this process's selection state (collection errors are reported without a config)
_active_state: dict[str, Any] | None = None
# failures recorded with their details so far, and how many may be
_detailed = 0
_detail_limit = DETAILED_FAILURES


class StandInCalled(RuntimeError):
    """A stand-in for an upstream internal was called: a case that needs it was not excluded."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("upstream", "upstream FlashAttention suite (tools/upstream_suite.py)")
    group.addoption("--upstream-config", help="recipes/upstream_suite.toml: turns the plugin on")
    group.addoption("--upstream-sample", type=int, help="N of the 1-in-N sample (config default)")
    group.addoption(
        "--upstream-always",
        help="comma-separated test names run in full, replacing [suite] always ('' = none)",
    )
    group.addoption("--upstream-selection", help="write the selection as JSON to this file")
    group.addoption("--upstream-results", help="append each case's outcome (JSON lines) here")
    group.addoption(
        "--upstream-results-append",
        action="store_true",
        help="keep what --upstream-results already holds (a second pass of the same run)",
    )
    group.addoption(
        "--upstream-part",
        choices=PARTS,
        default="all",
        help="of the selected cases, run all, only those no [[heavy]] entry names (light), "
        "or only those (heavy)",
    )
    group.addoption(
        "--upstream-detailed-failures",
        type=int,
        default=DETAILED_FAILURES,
        help="failures whose report and stdout the results keep (then the crash line only)",
    )
    group.addoption(
        "--upstream-assume-capability",
        help="MAJOR.MINOR that torch.cuda.get_device_capability answers where no GPU is seen",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("upstream_config")
    if not path:
        return
    try:
        suite = load_config(Path(path))
        sample = config.getoption("upstream_sample")
        check_sample(suite.sample if sample is None else sample)
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from None
    always = config.getoption("upstream_always")
    if always is not None:
        suite = dataclasses.replace(suite, always=tuple(a for a in always.split(",") if a))
    config.stash[CONFIG_KEY] = suite
    state: dict[str, Any] = {
        "capability": _assume_capability(config.getoption("upstream_assume_capability")),
        "stand_ins": [{**_describe(s), "state": install_stand_in(s)} for s in suite.stand_ins],
        "not_generated": {},
        "collection_errors": [],
        "functions": set(),  # every test function collected, before -k / -m
    }
    config.stash[STATE_KEY] = state
    global _active_state
    _active_state = state


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> list[pytest.Item] | None:
    """A test function that an entry without clauses excludes whole is not expanded
    into items at all (upstream's KV-cache test alone has 304128 cases; collecting the
    file took 92 s with them and 33 s without, on a 2-core machine). Its cases are
    counted from its parametrize marks instead, each classified like a collected one."""
    config = collector.config
    if CONFIG_KEY not in config.stash or not callable(obj) or not collector.funcnamefilter(name):
        return None
    config.stash[STATE_KEY]["functions"].add(name)
    suite = config.stash[CONFIG_KEY]
    if not excludes_whole(suite, name):
        return None
    relevant = relevant_exclusions(suite, name)
    features: Counter[str] = Counter()
    entries: Counter[Exclusion] = Counter()
    cases = 0
    for params in parameter_sets(obj):
        cases += 1
        matching = [e for e in relevant if e.matches_params(params)]
        features.update(tuple(dict.fromkeys(e.feature for e in matching)))
        entries.update(matching)
    config.stash[STATE_KEY]["not_generated"][name] = {
        "cases": cases,
        "features": features,
        "entries": entries,
    }
    return []


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed and _active_state is not None:
        _active_state["collection_errors"].append(report.nodeid or "(session)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    # trylast: after pytest's own -k / -m deselection, so that the selection (and the
    # runner's count of cases that did not run) covers only the cases those leave
    if CONFIG_KEY not in config.stash:
        return
    suite = config.stash[CONFIG_KEY]
    sample = config.getoption("upstream_sample")
    n = suite.sample if sample is None else sample
    verdicts = [
        (item, classify(suite, _test_name(item), item.nodeid, _params(item), n)) for item in items
    ]
    part = config.getoption("upstream_part")
    heavy = {item.nodeid for item, v in verdicts
             if v.selected and is_heavy(suite, _test_name(item), _params(item))}  # fmt: skip
    keep = [
        item
        for item, v in verdicts
        if v.selected and (part == "all" or (item.nodeid in heavy) == (part == "heavy"))
    ]
    kept = {item.nodeid for item in keep}
    deselected = [item for item in items if item.nodeid not in kept]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = keep
    target = config.getoption("upstream_selection")
    if target and _is_first_worker(config):
        # the whole selection, whichever part runs (each pass writes the same report)
        report = selection_report(suite, n, verdicts, config.stash[STATE_KEY])
        report["selected_heavy"] = len(heavy)
        report["heavy_ids"] = sorted(heavy)
        Path(target).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = _results_path
    if path is None:
        return
    if report.when != "call" and report.outcome == "passed":
        return  # setup and teardown are recorded only when they fail or skip
    record: dict[str, Any] = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": round(report.duration, 4),
    }
    if hasattr(report, "wasxfail"):
        record["xfail"] = True
    if report.outcome == "failed":
        global _detailed
        if _detailed < _detail_limit:
            _detailed += 1
            record["longrepr"] = str(report.longrepr)[-LONGREPR_LIMIT:]
            record["stdout"] = report.capstdout[-STDOUT_LIMIT:]
        else:
            crash = getattr(report.longrepr, "reprcrash", None)
            record["longrepr"] = str(crash.message if crash else report.longrepr)[:CRASH_LIMIT]
    elif report.outcome == "skipped":
        record["longrepr"] = str(report.longrepr)[-CRASH_LIMIT:]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """The controller (or the only process) owns the results file."""
    global _results_path, _detail_limit
    config = session.config
    target = config.getoption("upstream_results")
    if CONFIG_KEY in config.stash and target and not hasattr(config, "workerinput"):
        _detail_limit = config.getoption("upstream_detailed_failures")
        _results_path = Path(target)
        if not config.getoption("upstream_results_append"):
            _results_path.write_text("", encoding="utf-8")


def pytest_unconfigure(config: pytest.Config) -> None:
    global _results_path, _active_state, _detailed
    _results_path = None
    _active_state = None
    _detailed = 0


# ------------------------------------------------------------------ selection report


def selection_report(
    suite: SuiteConfig,
    n: int,
    verdicts: list[tuple[pytest.Item, Verdict]],
    state: dict[str, Any],
) -> dict[str, Any]:
    """Counts over every case: the collected items and the cases of the functions
    that were not generated (pytest_pycollect_makeitem)."""
    kinds: Counter[str] = Counter()
    by_feature: Counter[str] = Counter()
    by_test: dict[str, dict[str, Any]] = {}
    for item, v in verdicts:
        row = by_test.setdefault(_test_name(item), {"cases": 0, "features": Counter()})
        row["cases"] += 1
        row[v.kind] = row.get(v.kind, 0) + 1
        row["features"].update(v.features)
    for name, skipped in state["not_generated"].items():
        by_test[name] = {
            "cases": skipped["cases"],
            "excluded": skipped["cases"],
            "features": skipped["features"],
            "not_generated": True,
        }
    for row in by_test.values():
        kinds.update({k: row.get(k, 0) for k in ("always", "sample", "sampled_out", "excluded")})
        by_feature.update(row["features"])
        row["features"] = dict(sorted(row["features"].items()))
    matched: Counter[Exclusion] = Counter(
        e
        for item, _ in verdicts
        for e in relevant_exclusions(suite, _test_name(item))
        if e.matches_params(_params(item))
    )
    for skipped in state["not_generated"].values():
        matched.update(skipped["entries"])
    entries = [
        {
            "feature": e.feature,
            "why": e.why,
            "cases": e.describe(),
            "matched": matched[e],
        }
        for e in suite.exclusions
    ]
    return {
        "sample": n,
        "always": list(suite.always),
        "collected": sum(row["cases"] for row in by_test.values()),
        "selected": kinds["always"] + kinds["sample"],
        "selected_always": kinds["always"],
        "selected_sample": kinds["sample"],
        "sampled_out": kinds["sampled_out"],
        "excluded": kinds["excluded"],
        "excluded_by_feature": dict(sorted(by_feature.items())),
        "exclusions": entries,
        "stale_exclusions": [
            x["feature"] + ": " + x["cases"]
            for e, x in zip(suite.exclusions, entries, strict=True)
            if not x["matched"] and _stale(e, state["functions"], by_test)
        ],
        "by_test": by_test,
        "collection_errors": list(state["collection_errors"]),
        "capability": state["capability"],
        "stand_ins": state["stand_ins"],
        "selected_ids": [item.nodeid for item, v in verdicts if v.selected],
    }


def _stale(entry: Exclusion, functions: set[str], cases_of: dict[str, Any]) -> bool:
    """Whether an entry that matched no case is stale: the file has no test it names,
    or every test it names had cases to match (where -k / -m left out a test it names,
    the cases it would match may have been among those)."""
    named = [f for f in functions if entry.matches_name(f)]
    return not named or all(f in cases_of for f in named)


def parameter_sets(function: object) -> Iterator[dict[str, object]]:
    """The parameter dicts of a function's parametrize marks, as pytest would
    combine them (every mark an axis of the product)."""
    axes: list[list[dict[str, object]]] = []
    for mark in getattr(function, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames = mark.args[0] if mark.args else mark.kwargs["argnames"]
        argvalues = mark.args[1] if len(mark.args) > 1 else mark.kwargs["argvalues"]
        names = (
            [a.strip() for a in argnames.split(",") if a.strip()]
            if isinstance(argnames, str)
            else list(argnames)
        )
        rows = []
        for value in argvalues:
            is_param = hasattr(value, "values") and hasattr(value, "marks")  # pytest.param
            values = value.values if is_param else value
            if len(names) == 1 and not is_param:
                values = (values,)
            rows.append(dict(zip(names, values)))
        axes.append(rows)
    for combination in itertools.product(*axes):
        params: dict[str, object] = {}
        for row in combination:
            params.update(row)
        yield params


# ------------------------------------------------------------------ stand-ins


def install_stand_in(stand_in: StandIn) -> str:
    """Bind ``stand_in.target`` if it is missing; "installed" or "present" (left alone)."""
    module = _module_or_stand_in(stand_in.module)
    if hasattr(module, stand_in.name):
        return "present"
    value = stand_in.value if stand_in.has_value else _raiser(stand_in)
    setattr(module, stand_in.name, value)
    return "installed"


def _module_or_stand_in(dotted: str) -> types.ModuleType:
    """Import ``dotted``; where a submodule below an importable top-level package is
    missing, put an empty module there (marked ``__upstream_stand_in__``)."""
    parts = dotted.split(".")
    module = importlib.import_module(parts[0])  # our package itself must import
    for i in range(1, len(parts)):
        name = ".".join(parts[: i + 1])
        try:
            child = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            child = types.ModuleType(name, f"stand-in from {__name__}: {name} is missing")
            child.__path__ = []  # a package, so that a stand-in below it can be added
            child.__upstream_stand_in__ = True  # type: ignore[attr-defined]
            sys.modules[name] = child
            setattr(module, parts[i], child)
        module = child
    return module


def _raiser(stand_in: StandIn) -> Any:
    def stand_in_function(*args: object, **kwargs: object) -> None:
        raise StandInCalled(
            f"{stand_in.target} is not part of our flash_attn ({stand_in.feature}); this "
            f"stand-in from tools/upstream_select.py only lets upstream's test module "
            f"import. The case that called it needs an [[exclude]] entry for "
            f"{stand_in.feature!r} in recipes/upstream_suite.toml."
        )

    stand_in_function.__name__ = stand_in.name
    stand_in_function.__qualname__ = stand_in.name
    return stand_in_function


def _describe(stand_in: StandIn) -> dict[str, Any]:
    return {"name": stand_in.target, "feature": stand_in.feature, "why": stand_in.why}


# ------------------------------------------------------------------ helpers


def _assume_capability(text: str | None) -> str:
    if not text:
        return "read from the GPU"
    try:
        major, minor = (int(x) for x in text.split("."))
    except ValueError:
        raise pytest.UsageError(
            f"--upstream-assume-capability {text!r}: expected MAJOR.MINOR, e.g. 9.0"
        ) from None
    import torch

    if torch.cuda.is_available():
        return f"read from the GPU (--upstream-assume-capability {text} ignored: a GPU is seen)"

    def get_device_capability(device: object = None) -> tuple[int, int]:
        return (major, minor)

    torch.cuda.get_device_capability = get_device_capability
    return f"assumed {major}.{minor} (no GPU seen)"


def _test_name(item: pytest.Item) -> str:
    return str(getattr(item, "originalname", None) or item.name)


def _params(item: pytest.Item) -> dict[str, object]:
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec is not None else {}


def _is_first_worker(config: pytest.Config) -> bool:
    worker = getattr(config, "workerinput", None)
    return worker is None or worker.get("workerid") == "gw0"
