"""Which of upstream FlashAttention's test cases we run, and why the others not.

The data lives in recipes/upstream_suite.toml; this module reads it and answers,
for one collected case (its test function's name, its node id and its parameters),
whether it is excluded (and by which missing features), always run, in the 1-in-N
sample, or sampled out. No pytest and no torch here: the pytest plugin
(upstream_select.py) and the tests use it alike.

Sampling: a case is in the sample when sha256 of its node id, less the file path
(``test_name[params]``), read as a big-endian integer from its first 8 bytes, is a
multiple of N. The same cases are picked on every machine and every run, wherever
the upstream file lies.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tomllib

__all__ = [
    "PARTS",
    "Clause",
    "ConfigError",
    "CaseMatch",
    "Exclusion",
    "Heavy",
    "KernelPath",
    "StandIn",
    "SuiteConfig",
    "Verdict",
    "case_key",
    "classify",
    "excluded_by",
    "excludes_whole",
    "heavy_workers",
    "in_sample",
    "is_always",
    "is_heavy",
    "load_config",
    "parse_clause",
    "parse_config",
    "relevant_exclusions",
]

OPERATORS = ("==", "!=", ">=", "<=", ">", "<", "not in", "in")
_ORDERING = {">", ">=", "<", "<="}
_CLAUSE = re.compile(r"^\s*([A-Za-z_]\w*)\s+(==|!=|>=|<=|>|<|not\s+in|in)\s+(.+?)\s*$")


class ConfigError(ValueError):
    """recipes/upstream_suite.toml (or a value given for it) is malformed."""


@dataclass(frozen=True)
class Clause:
    """``<param> <op> <literal>``, e.g. ``dropout_p > 0`` or ``paged_kv_block_size != None``.

    A case without that parameter does not satisfy the clause; an ordering (<, >, ...)
    holds only between numbers.
    """

    param: str
    op: str
    value: object
    text: str

    def holds(self, params: Mapping[str, object]) -> bool:
        if self.param not in params:
            return False
        actual = params[self.param]
        if self.op == "==":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        if self.op in ("in", "not in"):
            assert isinstance(self.value, tuple)
            return (actual in self.value) == (self.op == "in")
        if not _is_number(actual):
            return False
        a, b = float(actual), float(self.value)  # type: ignore[arg-type]
        return {">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[self.op]


@dataclass(frozen=True, kw_only=True)
class CaseMatch:
    """The cases an entry of the config names: those whose test function's name matches
    one of ``tests`` (fnmatch patterns; none given: every test) and for which every
    clause of ``where`` holds."""

    tests: tuple[str, ...]
    where: tuple[Clause, ...]

    def matches(self, test_name: str, params: Mapping[str, object]) -> bool:
        return self.matches_name(test_name) and self.matches_params(params)

    def matches_name(self, test_name: str) -> bool:
        return not self.tests or any(fnmatch.fnmatchcase(test_name, p) for p in self.tests)

    def matches_params(self, params: Mapping[str, object]) -> bool:
        return all(clause.holds(params) for clause in self.where)

    def describe(self) -> str:
        tests = ", ".join(self.tests) if self.tests else "every test"
        where = " and ".join(c.text for c in self.where)
        return f"{tests}" + (f" where {where}" if where else "")


@dataclass(frozen=True, kw_only=True)
class Exclusion(CaseMatch):
    """Cases removed because our flash_attn lacks ``feature``."""

    feature: str
    why: str


@dataclass(frozen=True, kw_only=True)
class Heavy(CaseMatch):
    """Cases that each hold much GPU memory (upstream's reference over a long cache):
    the tool runs them in a pass of their own with at most ``workers`` pytest-xdist
    workers, so that a wide run's workers do not run out of GPU memory together."""

    why: str
    workers: int


@dataclass(frozen=True)
class StandIn:
    """A name upstream's test module imports at module level that our flash_attn
    lacks. The plugin binds it, for the test session only and only while it is
    missing, so that the module imports: to ``value`` when one is given, else to a
    function that raises when called (the cases that would call it are excluded).
    """

    target: str  # "package.module.name"
    feature: str
    why: str
    has_value: bool
    value: object = None

    @property
    def module(self) -> str:
        return self.target.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.target.rpartition(".")[2]


@dataclass(frozen=True)
class KernelPath:
    """One way of running the suite: the environment that selects a kernel path."""

    name: str
    env: tuple[tuple[str, str], ...]
    about: str


@dataclass(frozen=True)
class SuiteConfig:
    upstream_file: str  # the file's path inside the upstream repository
    sample: int
    always: tuple[str, ...]  # fnmatch patterns on test function names
    paths: tuple[KernelPath, ...]
    exclusions: tuple[Exclusion, ...]
    stand_ins: tuple[StandIn, ...]
    heavy: tuple[Heavy, ...] = ()

    def path(self, name: str) -> KernelPath:
        for p in self.paths:
            if p.name == name:
                return p
        valid = ", ".join(p.name for p in self.paths)
        raise ConfigError(f"unknown kernel path {name!r}; valid: {valid}")


Kind = Literal["excluded", "always", "sample", "sampled_out"]


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    features: tuple[str, ...] = ()  # for "excluded": every matching entry's feature

    @property
    def selected(self) -> bool:
        return self.kind in ("always", "sample")


# ------------------------------------------------------------------ decisions


def case_key(nodeid: str) -> str:
    """The node id without its file path: ``test_name[params]``."""
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid


def in_sample(key: str, n: int) -> bool:
    """Whether the case ``key`` is in the deterministic 1-in-``n`` sample."""
    check_sample(n)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n == 0


def classify(
    config: SuiteConfig,
    test_name: str,
    nodeid: str,
    params: Mapping[str, object],
    sample: int | None = None,
) -> Verdict:
    """Exclusions first (they win over the always list), then the always list,
    then the sample (``sample`` overrides the configured N)."""
    features = excluded_by(relevant_exclusions(config, test_name), params)
    if features:
        return Verdict("excluded", features)
    if is_always(config, test_name):
        return Verdict("always")
    n = config.sample if sample is None else sample
    return Verdict("sample" if in_sample(case_key(nodeid), n) else "sampled_out")


def excluded_by(exclusions: Sequence[Exclusion], params: Mapping[str, object]) -> tuple[str, ...]:
    """The features of the entries (already matched by test name) whose clauses hold."""
    return tuple(dict.fromkeys(e.feature for e in exclusions if e.matches_params(params)))


@functools.lru_cache(maxsize=256)
def relevant_exclusions(config: SuiteConfig, test_name: str) -> tuple[Exclusion, ...]:
    """The entries whose ``tests`` patterns admit ``test_name``."""
    return tuple(e for e in config.exclusions if e.matches_name(test_name))


def excludes_whole(config: SuiteConfig, test_name: str) -> bool:
    """Whether an entry without clauses takes every case of ``test_name``."""
    return any(not e.where for e in relevant_exclusions(config, test_name))


# The parts of a run's selection (upstream_select.py's --upstream-part, the runner's
# --part): every selected case, those no [[heavy]] entry names, or those.
PARTS = ("all", "light", "heavy")


def is_heavy(config: SuiteConfig, test_name: str, params: Mapping[str, object]) -> bool:
    """Whether a [[heavy]] entry names the case."""
    return any(h.matches(test_name, params) for h in config.heavy)


def heavy_workers(config: SuiteConfig) -> int | None:
    """The workers a pass of the heavy cases may have: the fewest any entry allows
    (None: no entry)."""
    return min((h.workers for h in config.heavy), default=None)


def is_always(config: SuiteConfig, test_name: str) -> bool:
    return any(fnmatch.fnmatchcase(test_name, p) for p in config.always)


def check_sample(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"sample must be an integer >= 1 (1 runs every case); got {n!r}")
    return n


# ------------------------------------------------------------------- parsing


def parse_clause(text: str) -> Clause:
    m = _CLAUSE.match(text)
    if m is None:
        raise ConfigError(
            f"where clause {text!r} is not '<param> <op> <literal>'; "
            f"operators: {', '.join(OPERATORS)}; e.g. 'dropout_p > 0'"
        )
    param, op, literal = m.group(1), " ".join(m.group(2).split()), m.group(3)
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"where clause {text!r}: {literal!r} is not a Python literal "
            "(a number, a quoted string, True, False, None, or a list of those)"
        ) from None
    if op in ("in", "not in"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"where clause {text!r}: '{op}' needs a list, got {literal!r}")
        value = tuple(value)
    elif op in _ORDERING and not _is_number(value):
        raise ConfigError(f"where clause {text!r}: '{op}' needs a number, got {literal!r}")
    return Clause(param=param, op=op, value=value, text=" ".join(text.split()))


def load_config(path: Path) -> SuiteConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_config(data: Mapping[str, object]) -> SuiteConfig:
    _check_keys(
        "the file", data, required={"suite", "paths"}, optional={"exclude", "stand_in", "heavy"}
    )
    suite = _table(data["suite"], "[suite]")
    _check_keys("[suite]", suite, required={"file", "sample", "always"}, optional=set())
    paths = _table(data["paths"], "[paths]")
    if not paths:
        raise ConfigError("[paths] names no kernel path")
    return SuiteConfig(
        upstream_file=_string(suite["file"], "[suite] file"),
        sample=check_sample(suite["sample"]),
        always=_strings(suite["always"], "[suite] always"),
        paths=tuple(_kernel_path(name, _table(p, f"[paths.{name}]")) for name, p in paths.items()),
        exclusions=tuple(
            _exclusion(_table(e, "[[exclude]]"), i)
            for i, e in enumerate(_array(data.get("exclude", []), "[[exclude]]"))
        ),
        stand_ins=tuple(
            _stand_in(_table(s, "[[stand_in]]"), i)
            for i, s in enumerate(_array(data.get("stand_in", []), "[[stand_in]]"))
        ),
        heavy=tuple(
            _heavy(_table(h, "[[heavy]]"), i)
            for i, h in enumerate(_array(data.get("heavy", []), "[[heavy]]"))
        ),
    )


def _kernel_path(name: str, entry: Mapping[str, object]) -> KernelPath:
    where = f"[paths.{name}]"
    _check_keys(where, entry, required={"env", "about"}, optional=set())
    env = _table(entry["env"], f"{where} env")
    return KernelPath(
        name=name,
        env=tuple((k, _string(v, f"{where} env.{k}")) for k, v in env.items()),
        about=_string(entry["about"], f"{where} about"),
    )


def _exclusion(entry: Mapping[str, object], index: int) -> Exclusion:
    where = f"[[exclude]] #{index + 1}"
    _check_keys(where, entry, required={"feature", "why"}, optional={"tests", "where"})
    exclusion = Exclusion(
        feature=_string(entry["feature"], f"{where} feature"),
        why=_string(entry["why"], f"{where} why"),
        tests=_strings(entry.get("tests", []), f"{where} tests"),
        where=tuple(parse_clause(c) for c in _strings(entry.get("where", []), f"{where} where")),
    )
    if not exclusion.tests and not exclusion.where:
        raise ConfigError(
            f"{where} ({exclusion.feature!r}) names neither tests nor where: "
            "it would exclude every case"
        )
    return exclusion


def _heavy(entry: Mapping[str, object], index: int) -> Heavy:
    where = f"[[heavy]] #{index + 1}"
    _check_keys(where, entry, required={"why", "workers"}, optional={"tests", "where"})
    workers = entry["workers"]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{where} workers must be an integer >= 1; got {workers!r}")
    heavy = Heavy(
        why=_string(entry["why"], f"{where} why"),
        workers=workers,
        tests=_strings(entry.get("tests", []), f"{where} tests"),
        where=tuple(parse_clause(c) for c in _strings(entry.get("where", []), f"{where} where")),
    )
    if not heavy.tests and not heavy.where:
        raise ConfigError(f"{where} names neither tests nor where: it would make every case heavy")
    return heavy


def _stand_in(entry: Mapping[str, object], index: int) -> StandIn:
    where = f"[[stand_in]] #{index + 1}"
    _check_keys(where, entry, required={"name", "feature", "why"}, optional={"value"})
    target = _string(entry["name"], f"{where} name")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", target):
        raise ConfigError(
            f"{where} name {target!r} is not a dotted 'package.module.name' "
            "(a top-level name cannot be stood in for)"
        )
    value = entry.get("value")
    if "value" in entry and not isinstance(value, (bool, int, float, str)):
        raise ConfigError(f"{where} value must be a boolean, number or string, got {value!r}")
    return StandIn(
        target=target,
        feature=_string(entry["feature"], f"{where} feature"),
        why=_string(entry["why"], f"{where} why"),
        has_value="value" in entry,
        value=value,
    )


def _check_keys(
    where: str, table: Mapping[str, object], required: set[str], optional: set[str]
) -> None:
    valid = required | optional
    unknown = sorted(set(table) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(valid))}")
    missing = sorted(required - set(table))
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")


def _table(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {value!r}")
    return value


def _array(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be an array of tables, got {value!r}")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _strings(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    return tuple(_string(v, where) for v in value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
