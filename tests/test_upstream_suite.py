"""CPU tests of the upstream-suite tool (tools/upstream_suite.py and its modules).

Upstream's own test file is not needed (nor fetched): the plugin and the tool run
here on small synthetic test modules and configs written to tmp_path, in pytest
subprocesses, the way the tool runs upstream's file on the GPU machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tomllib", reason="the upstream-suite tool needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

import upstream_results  # noqa: E402
import upstream_rules as rules  # noqa: E402
import upstream_suite  # noqa: E402

# ------------------------------------------------------------------ helpers


def reference_in_sample(key: str, n: int) -> bool:
    """The documented rule, written out independently: sha256, first 8 bytes, big endian."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % n == 0


def write_config(path: Path, body: str) -> Path:
    header = textwrap.dedent(
        """\
        [suite]
        file = "tests/test_synth.py"
        sample = 3
        always = ["test_always"]

        [paths.a]
        env = { SYNTH_PATH = "a" }
        about = "path a"

        [paths.b]
        env = { SYNTH_PATH = "b" }
        about = "path b"
        """
    )
    path.write_text(header + textwrap.dedent(body), encoding="utf-8")
    return path


SYNTH_MODULE = """\
import os

import pytest
from synthpkg import present, flag, missing_fn
from synthpkg.sub.deeper import helper


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("x", list(range(40)))
def test_alpha(x, p):
    assert flag is False


@pytest.mark.parametrize("k", ["u", "v", "w", "y", "z"])
def test_always(k):
    pass


@pytest.mark.parametrize("b", [None, 4])
@pytest.mark.parametrize("a", [1, 2, 3])
def test_whole(a, b):
    missing_fn()


def test_calls_stand_in():
    helper()


def test_present():
    assert present == "ours"
"""

SYNTH_CONFIG = """\
[[exclude]]
feature = "feature-p"
why = "p > 0 is missing"
where = ["p > 0"]

[[exclude]]
feature = "feature-whole"
why = "all of test_whole"
tests = ["test_whole"]

[[exclude]]
feature = "feature-b"
why = "b given"
tests = ["test_wh*"]
where = ["b != None"]

[[exclude]]
feature = "never"
why = "matches nothing"
tests = ["test_nonexistent"]

[[stand_in]]
name = "synthpkg.missing_fn"
feature = "feature-whole"
why = "module-level import"

[[stand_in]]
name = "synthpkg.flag"
feature = "some switch"
why = "module-level import"
value = false

[[stand_in]]
name = "synthpkg.sub.deeper.helper"
feature = "a missing module"
why = "module-level import"

[[stand_in]]
name = "synthpkg.present"
feature = "none"
why = "present: must be left alone"
"""


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    """tmp_path with synthpkg (a package with `present` only), the synthetic test
    module and its config."""
    pkg = tmp_path / "synthpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('present = "ours"\n', encoding="utf-8")
    (tmp_path / "test_synth.py").write_text(SYNTH_MODULE, encoding="utf-8")
    write_config(tmp_path / "suite.toml", SYNTH_CONFIG)
    return tmp_path


def run_plugin(
    where: Path, *args: str, config: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None, list[dict[str, Any]]]:
    sel, res = where / "sel.json", where / "res.jsonl"
    for f in (sel, res):
        f.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS), str(where)]))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "test_synth.py",
        "-p",
        "upstream_select",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(where),
        "-c",
        os.devnull,
        "--upstream-config",
        str(config or where / "suite.toml"),
        "--upstream-selection",
        str(sel),
        "--upstream-results",
        str(res),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=300)
    selection = json.loads(sel.read_text()) if sel.is_file() else None
    results = [json.loads(line) for line in res.read_text().splitlines()] if res.is_file() else []
    return proc, selection, results


# ------------------------------------------------------------------ rules: sampling


def test_sample_follows_the_documented_hash() -> None:
    keys = [f"test_x[{i}-{j}]" for i in range(300) for j in ("a", "b")]
    for n in (1, 2, 7, 10):
        assert [rules.in_sample(k, n) for k in keys] == [reference_in_sample(k, n) for k in keys]


def test_sample_is_about_one_in_n() -> None:
    keys = [f"test_y[{i}]" for i in range(20000)]
    picked = sum(rules.in_sample(k, 10) for k in keys)
    assert 1700 <= picked <= 2300  # 2000 expected; binomial sd ~42


def test_sample_key_ignores_where_the_file_lies() -> None:
    a = rules.case_key(".upstream/test_flash_attn.py::test_f[1-2]")
    b = rules.case_key("elsewhere/deeper/test_flash_attn.py::test_f[1-2]")
    assert a == b == "test_f[1-2]"


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_sample_is_rejected(bad: object) -> None:
    with pytest.raises(rules.ConfigError, match=re.escape(repr(bad))):
        rules.check_sample(bad)


# ------------------------------------------------------------------ rules: clauses


@pytest.mark.parametrize(
    ("text", "params", "holds"),
    [
        ("dropout_p > 0", {"dropout_p": 0.17}, True),
        ("dropout_p > 0", {"dropout_p": 0.0}, False),
        ("dropout_p > 0", {}, False),  # a case without the parameter
        ("block != None", {"block": 256}, True),
        ("block != None", {"block": None}, False),
        ("block > 0", {"block": None}, False),  # ordering only between numbers
        ("d >= 128", {"d": 128}, True),
        ("d < 128", {"d": 128}, False),
        ("mha in ['mqa', 'gqa']", {"mha": "gqa"}, True),
        ("mha not  in ['mqa', 'gqa']", {"mha": "gqa"}, False),
        ("causal == True", {"causal": True}, True),
    ],
)
def test_clause(text: str, params: dict[str, object], holds: bool) -> None:
    assert rules.parse_clause(text).holds(params) is holds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dropout_p", "is not '<param> <op> <literal>'"),
        ("dropout_p ~ 0", "is not '<param> <op> <literal>'"),
        ("d > foo", "is not a Python literal"),
        ("d > 'x'", "needs a number"),
        ("d in 3", "needs a list"),
    ],
)
def test_bad_clause_is_rejected_naming_it(text: str, message: str) -> None:
    with pytest.raises(rules.ConfigError, match=re.escape(message)) as e:
        rules.parse_clause(text)
    assert repr(text) in str(e.value)


# ------------------------------------------------------------------ rules: classify


def _config(body: str) -> rules.SuiteConfig:
    import tomllib

    header = '[suite]\nfile = "t.py"\nsample = 4\nalways = ["test_all*"]\n'
    header += '[paths.p]\nenv = {}\nabout = "p"\n'
    return rules.parse_config(tomllib.loads(header + textwrap.dedent(body)))


def test_classify_exclusion_wins_then_always_then_sample() -> None:
    config = _config(
        """
        [[exclude]]
        feature = "F1"
        why = "w"
        where = ["p > 0"]
        [[exclude]]
        feature = "F2"
        why = "w"
        tests = ["test_allx"]
        [[exclude]]
        feature = "F1"
        why = "again: listed once"
        tests = ["test_all*"]
        where = ["p > 0"]
        """
    )
    v = rules.classify(config, "test_allx", "f.py::test_allx[1]", {"p": 1})
    assert v.kind == "excluded" and v.features == ("F1", "F2")
    assert rules.classify(config, "test_ally", "f.py::test_ally[0]", {"p": 0}).kind == "always"
    for i in range(50):
        nodeid = f"f.py::test_z[{i}]"
        for n in (4, 7):
            v = rules.classify(config, "test_z", nodeid, {"p": 0}, sample=None if n == 4 else n)
            expected = "sample" if reference_in_sample(f"test_z[{i}]", n) else "sampled_out"
            assert v.kind == expected and v.selected == (expected == "sample")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[exclude]]\nfeature = "F"\nwhy = "w"\n', "names neither tests nor where"),
        ('[[exclude]]\nfeature = "F"\nwhy = "w"\ntest = ["x"]\n', "unknown key 'test'"),
        ('[[exclude]]\nwhy = "w"\ntests = ["x"]\n', "missing key 'feature'"),
        ('[[stand_in]]\nname = "toplevel"\nfeature = "F"\nwhy = "w"\n', "not a dotted"),
        ('[[stand_in]]\nname = "a.b"\nfeature = "F"\nwhy = "w"\nvalue = [1]\n', "value must"),
        ("[extra]\n", "unknown key 'extra'; valid: exclude, heavy, paths, stand_in, suite"),
        ('[[heavy]]\nwhy = "w"\nworkers = 2\n', "[[heavy]] #1 names neither tests nor where"),
        ('[[heavy]]\nwhy = "w"\nworkers = 0\ntests = ["x"]\n', "workers must be an integer >= 1"),
        ('[[heavy]]\nwhy = "w"\nworkers = true\ntests = ["x"]\n', ">= 1; got True"),
        ('[[heavy]]\nwhy = "w"\ntests = ["x"]\n', "missing key 'workers'"),
    ],
)
def test_bad_config_is_rejected_with_the_value_and_what_is_valid(body: str, message: str) -> None:
    with pytest.raises(rules.ConfigError, match=re.escape(message)):
        _config(body)


def test_heavy_entries_name_cases_and_the_fewest_workers() -> None:
    config = _config(
        """\
        [[heavy]]
        why = "long caches"
        workers = 3
        tests = ["test_kv*"]
        where = ["seqlen_k >= 1000"]

        [[heavy]]
        why = "wide heads"
        workers = 2
        where = ["d == 256"]
        """
    )
    assert rules.heavy_workers(config) == 2
    assert rules.heavy_workers(_config("")) is None
    assert rules.is_heavy(config, "test_kvcache", {"seqlen_k": 4096, "d": 64})
    assert not rules.is_heavy(config, "test_kvcache", {"seqlen_k": 512, "d": 64})
    assert not rules.is_heavy(config, "test_other", {"seqlen_k": 4096, "d": 64})
    assert rules.is_heavy(config, "test_other", {"d": 256})
    assert not rules.is_heavy(config, "test_other", {})  # no such parameter: no match


def test_unknown_path_names_the_valid_ones() -> None:
    with pytest.raises(rules.ConfigError, match="unknown kernel path 'sm70'; valid: p"):
        _config("").path("sm70")


def test_the_project_config_is_consistent() -> None:
    """recipes/upstream_suite.toml: every raising stand-in's feature has exclusions (so
    the cases that would call it do not run), and every kernel path sets an environment."""
    config = rules.load_config(ROOT / "recipes" / "upstream_suite.toml")
    features = {e.feature for e in config.exclusions}
    for s in config.stand_ins:
        if not s.has_value:
            assert s.feature in features, s.target
    assert config.paths and all(p.env for p in config.paths)
    assert len(set(config.always)) == len(config.always)
    assert all(h.tests for h in config.heavy)  # each names the tests it is about


# ------------------------------------------------------------------ the plugin


def test_plugin_selects_excludes_and_records(synth: Path) -> None:
    proc, sel, results = run_plugin(synth)
    assert sel is not None, proc.stdout + proc.stderr
    # the reference: every case of the synthetic module, classified by hand
    expected: dict[str, tuple[str, ...] | str] = {}
    for x in range(40):
        for p in (0.0, 0.5):
            key = f"test_alpha[{x}-{p}]"
            if p > 0:
                expected[key] = ("feature-p",)
            else:
                expected[key] = "sample" if reference_in_sample(key, 3) else "sampled_out"
    for k in "uvwyz":
        expected[f"test_always[{k}]"] = "always"
    for a in (1, 2, 3):
        for b in (None, 4):
            feats = ("feature-whole",) + (("feature-b",) if b is not None else ())
            expected[f"test_whole[{a}-{b}]"] = feats
    for name in ("test_calls_stand_in", "test_present"):
        expected[name] = "sample" if reference_in_sample(name, 3) else "sampled_out"

    selected = sorted(k for k, v in expected.items() if v in ("sample", "always"))
    assert sorted(rules.case_key(n) for n in sel["selected_ids"]) == selected
    assert sel["collected"] == len(expected)
    assert sel["excluded"] == sum(isinstance(v, tuple) for v in expected.values())
    assert sel["selected_always"] == 5
    assert sel["sampled_out"] == sum(v == "sampled_out" for v in expected.values())
    assert sel["excluded_by_feature"] == {"feature-b": 3, "feature-p": 40, "feature-whole": 6}
    assert sel["by_test"]["test_whole"]["not_generated"] is True
    assert sel["stale_exclusions"] == ["never: test_nonexistent"]
    assert {s["name"]: s["state"] for s in sel["stand_ins"]} == {
        "synthpkg.missing_fn": "installed",
        "synthpkg.flag": "installed",
        "synthpkg.sub.deeper.helper": "installed",
        "synthpkg.present": "present",
    }
    # only selected cases ran; each has its outcome recorded
    ran = {rules.case_key(r["nodeid"]): r for r in results}
    assert sorted(ran) == selected
    assert all(r["outcome"] == "passed" for k, r in ran.items() if k != "test_calls_stand_in")
    if "test_calls_stand_in" in ran:  # a stand-in that raises names what to do
        assert ran["test_calls_stand_in"]["outcome"] == "failed"
        assert (
            "synthpkg.sub.deeper.helper is not part of our flash_attn"
            in (ran["test_calls_stand_in"]["longrepr"])
        )
        assert "[[exclude]]" in ran["test_calls_stand_in"]["longrepr"]


def test_plugin_runs_the_light_or_the_heavy_part(synth: Path) -> None:
    """--upstream-part: of the same selection, the cases no [[heavy]] entry names, or
    only those; the selection report is the whole selection either way."""
    config = synth / "heavy.toml"
    config.write_text(
        (synth / "suite.toml").read_text()
        + '\n[[heavy]]\nwhy = "big"\nworkers = 1\ntests = ["test_alpha"]\nwhere = ["x >= 20"]\n'
    )
    _, sel_all, res_all = run_plugin(synth, config=config)
    _, sel_light, res_light = run_plugin(synth, "--upstream-part", "light", config=config)
    _, sel_heavy, res_heavy = run_plugin(synth, "--upstream-part", "heavy", config=config)
    assert sel_all is not None and sel_light is not None and sel_heavy is not None
    ran = {
        part: {r["nodeid"].split("::")[1] for r in res if r["when"] == "call"}
        for part, res in (("all", res_all), ("light", res_light), ("heavy", res_heavy))
    }
    alpha = [k for k in ran["all"] if k.startswith("test_alpha[")]
    heavy = {k for k in alpha if int(k.removeprefix("test_alpha[").split("-")[0]) >= 20}
    assert heavy and ran["heavy"] == heavy
    assert ran["light"] == ran["all"] - heavy
    assert sel_all["selected_ids"] == sel_light["selected_ids"] == sel_heavy["selected_ids"]
    assert sel_all["selected_heavy"] == len(heavy)


def test_plugin_selects_among_the_cases_k_leaves(synth: Path) -> None:
    """-k / -m apply first: the selection (what the runner expects to run) holds only
    the cases they leave, and an entry whose tests they left out is not called stale."""
    proc, sel, results = run_plugin(synth, "-k", "test_alpha")
    assert sel is not None, proc.stdout + proc.stderr
    sampled = sorted(f"test_alpha[{x}-0.0]" for x in range(40)
                     if reference_in_sample(f"test_alpha[{x}-0.0]", 3))  # fmt: skip
    assert sorted(rules.case_key(n) for n in sel["selected_ids"]) == sampled
    assert sorted(rules.case_key(r["nodeid"]) for r in results) == sampled
    assert sel["by_test"]["test_alpha"]["cases"] == 80 and "test_always" not in sel["by_test"]
    assert sel["stale_exclusions"] == ["never: test_nonexistent"]
    _, sel_m, _ = run_plugin(synth, "-k", "test_always")
    assert sel_m is not None and sel_m["selected"] == sel_m["selected_always"] == 5
    assert sel_m["stale_exclusions"] == ["never: test_nonexistent"]  # not feature-p


def test_plugin_appends_to_the_results_of_a_pass_before(synth: Path) -> None:
    _, _, first = run_plugin(synth, "-k", "test_alpha")
    res = synth / "res.jsonl"
    kept = res.read_text()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS), str(synth)]))
    cmd = [sys.executable, "-m", "pytest", "test_synth.py", "-p", "upstream_select", "-p",
           "no:cacheprovider", "--rootdir", str(synth), "-c", os.devnull, "--upstream-config",
           str(synth / "suite.toml"), "--upstream-results", str(res),
           "--upstream-results-append", "-k", "test_always"]  # fmt: skip
    subprocess.run(cmd, cwd=synth, env=env, capture_output=True, text=True, timeout=300)
    text = res.read_text()
    assert first and text.startswith(kept)
    assert {json.loads(line)["nodeid"] for line in text.splitlines()} == {
        *(r["nodeid"] for r in first), *(f"test_synth.py::test_always[{k}]" for k in "uvwyz")
    }


def test_stand_in_that_raises_names_the_missing_exclusion(synth: Path) -> None:
    proc, sel, results = run_plugin(synth, "--upstream-sample", "1")
    outcome = {rules.case_key(r["nodeid"]): r for r in results}
    assert outcome["test_calls_stand_in"]["outcome"] == "failed", proc.stdout
    assert (
        "synthpkg.sub.deeper.helper is not part of our flash_attn (a missing module)"
        in (outcome["test_calls_stand_in"]["longrepr"])
    )
    assert outcome["test_present"]["outcome"] == "passed"
    assert sel is not None and sel["selected"] == sel["collected"] - sel["excluded"]


def test_not_generated_counts_match_generated_ones(synth: Path) -> None:
    """A function excluded whole is counted from its parametrize marks without
    generating items; the counts must equal those pytest's own generation gives."""
    body = SYNTH_CONFIG.replace(
        'tests = ["test_whole"]', 'tests = ["test_whole"]\nwhere = ["a > 0"]'
    )
    generated = write_config(synth / "generated.toml", body)
    _, fast, _ = run_plugin(synth)
    _, slow, _ = run_plugin(synth, config=generated)
    assert fast is not None and slow is not None
    assert "not_generated" not in slow["by_test"]["test_whole"]
    for key in ("collected", "excluded", "excluded_by_feature", "selected_ids"):
        assert fast[key] == slow[key], key
    assert fast["by_test"]["test_whole"]["features"] == slow["by_test"]["test_whole"]["features"]
    assert [e["matched"] for e in fast["exclusions"]] == [e["matched"] for e in slow["exclusions"]]


def test_selection_is_the_same_in_every_run_and_under_xdist(synth: Path) -> None:
    pytest.importorskip("xdist")
    _, first, _ = run_plugin(synth, "--upstream-sample", "2")
    _, again, _ = run_plugin(synth, "--upstream-sample", "2")
    proc, workers, results = run_plugin(synth, "--upstream-sample", "2", "-n", "2")
    assert first is not None and again is not None and workers is not None, proc.stdout
    assert first["selected_ids"] == again["selected_ids"]
    assert sorted(first["selected_ids"]) == sorted(workers["selected_ids"])
    # the controller recorded every selected case once
    assert sorted(r["nodeid"] for r in results) == sorted(first["selected_ids"])


def test_always_override_and_bad_config(synth: Path) -> None:
    _, sel, _ = run_plugin(synth, "--upstream-always=")
    assert sel is not None and sel["selected_always"] == 0 and sel["always"] == []
    bad = write_config(synth / "bad.toml", '[[exclude]]\nfeature = "F"\nwhy = "w"\n')
    proc, sel, _ = run_plugin(synth, config=bad)
    assert proc.returncode == 4 and sel is None  # pytest's usage error
    assert "names neither tests nor where" in proc.stderr


def test_assumed_capability_only_where_no_gpu(synth: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the stand-in capability is for machines without a GPU")
    (synth / "test_synth.py").write_text(
        textwrap.dedent(
            """\
            import pytest
            import torch

            MAJOR = torch.cuda.get_device_capability("cuda")[0]


            @pytest.mark.parametrize("d", [1, 2] if MAJOR == 7 else [1])
            def test_always(d):
                assert torch.cuda.get_device_capability() == (7, 5)
            """
        ),
        encoding="utf-8",
    )
    proc, sel, results = run_plugin(synth, "--upstream-assume-capability", "7.5")
    assert sel is not None, proc.stdout + proc.stderr
    assert sel["collected"] == 2 and sel["capability"] == "assumed 7.5 (no GPU seen)"
    assert [r["outcome"] for r in results] == ["passed", "passed"]


# ------------------------------------------------------------------ outcomes


def test_outcomes_follow_pytests_counting(tmp_path: Path) -> None:
    (tmp_path / "test_synth.py").write_text(
        textwrap.dedent(
            """\
            import pytest

            @pytest.fixture
            def broken():
                raise RuntimeError("setup")

            def test_pass(): pass
            def test_fail(): assert False
            def test_skip(): pytest.skip("why")
            @pytest.mark.skipif(True, reason="marked")
            def test_skip_marked(): pass
            def test_error(broken): pass
            @pytest.mark.xfail(reason="known")
            def test_xfail(): assert False
            @pytest.mark.xfail(reason="known")
            def test_xpass(): pass
            """
        ),
        encoding="utf-8",
    )
    config = write_config(tmp_path / "suite.toml", "")
    proc, sel, _ = run_plugin(tmp_path, "--upstream-sample", "1", config=config)
    assert sel is not None
    # pytest's own summary line is the reference
    words = {"error": "errors", "errors": "errors"}
    expected = {
        words.get(word, word): int(n)
        for n, word in re.findall(r"(\d+) (\w+)", proc.stdout.splitlines()[-1])
        if word != "in"
    }
    outcomes = upstream_results.read_outcomes(tmp_path / "res.jsonl", sel["selected_ids"])
    assert {k: v for k, v in outcomes.counts.items() if v} == expected
    assert [rules.case_key(n) for n in outcomes.failing] == ["test_error", "test_fail"]
    assert "setup" in outcomes.longrepr[outcomes.failing[0]]
    assert outcomes.not_run == []


def test_only_the_first_failures_keep_their_details(tmp_path: Path) -> None:
    (tmp_path / "test_synth.py").write_text(
        textwrap.dedent(
            """\
            import pytest

            @pytest.mark.parametrize("i", range(5))
            def test_always(i):
                print("Output max diff:", i)
                assert i < 0, f"case {i}"
            """
        ),
        encoding="utf-8",
    )
    config = write_config(tmp_path / "suite.toml", "")
    _, _, results = run_plugin(tmp_path, "--upstream-detailed-failures", "2", config=config)
    assert [r["outcome"] for r in results] == ["failed"] * 5
    detailed = [r for r in results if "stdout" in r]
    assert [r["stdout"] for r in detailed] == ["Output max diff: 0\n", "Output max diff: 1\n"]
    assert all("test_synth.py" in r["longrepr"] for r in detailed)  # the traceback
    brief = [r["longrepr"] for r in results if "stdout" not in r]
    assert [b.splitlines()[0] for b in brief] == [f"AssertionError: case {i}" for i in (2, 3, 4)]


def test_a_long_log_is_cut_in_the_middle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_suite, "LOG_LIMIT", 100)
    monkeypatch.setattr(upstream_suite, "LOG_HEAD", 10)
    monkeypatch.setattr(upstream_suite, "LOG_TAIL", 20)
    log = tmp_path / "log"
    text = "".join(f"{i:04d}\n" for i in range(40))  # 200 bytes
    log.write_text(text)
    upstream_suite._shorten_log(log)
    cut = log.read_text()
    assert cut.startswith(text[:10]) and cut.endswith(text[-20:])
    assert "[... 170 bytes cut by upstream_suite.py ...]" in cut
    log.write_text(text[:100])
    upstream_suite._shorten_log(log)
    assert log.read_text() == text[:100]


def test_outcomes_of_teardown_errors_crashes_and_missing_cases(tmp_path: Path) -> None:
    lines = [
        {"nodeid": "f::a", "when": "call", "outcome": "passed"},
        {"nodeid": "f::a", "when": "teardown", "outcome": "failed", "longrepr": "td"},
        {"nodeid": "f::b", "when": "???", "outcome": "failed", "longrepr": "worker crashed"},
        {"nodeid": "f::c", "when": "setup", "outcome": "skipped", "longrepr": "s"},
    ]
    res = tmp_path / "r.jsonl"
    res.write_text("".join(json.dumps(x) + "\n" for x in lines))
    o = upstream_results.read_outcomes(res, ["f::a", "f::b", "f::c", "f::d"])
    assert (o.counts["errors"], o.counts["failed"], o.counts["skipped"]) == (1, 1, 1)
    assert o.failing == ["f::a", "f::b"] and o.not_run == ["f::d"]
    assert o.longrepr["f::b"] == "worker crashed"


# ------------------------------------------------------------------ the tool


def _git(*args: str, cwd: Path) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t")
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def upstream_git(tmp_path: Path) -> tuple[Path, str]:
    """A bare clone of a small repository laid out like upstream's."""
    work = tmp_path / "work"
    (work / "tests").mkdir(parents=True)
    (work / "tests" / "test_synth.py").write_text("def test_x():\n    pass\n")
    (work / "LICENSE").write_text("license text\n")
    _git("init", "-q", cwd=work)
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "one", cwd=work)
    commit = _git("rev-parse", "HEAD", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(tmp_path / "bare.git"), cwd=tmp_path)
    return tmp_path / "bare.git", commit


def test_populate_copies_the_file_and_records_the_commit(
    tmp_path: Path, upstream_git: tuple[Path, str]
) -> None:
    git_dir, commit = upstream_git
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    (repo / ".gitignore").write_text("/.upstream/\n")
    record = upstream_suite.populate(
        git_dir, "HEAD", repo / ".upstream", "tests/test_synth.py", repo=repo
    )
    assert record["commit"] == commit
    copied = repo / ".upstream" / "test_synth.py"
    assert copied.read_text() == "def test_x():\n    pass\n"
    assert (repo / ".upstream" / "LICENSE").read_text() == "license text\n"
    assert json.loads((repo / ".upstream" / "source.json").read_text())["commit"] == commit
    source = upstream_suite.upstream_source(repo / ".upstream", copied)
    assert source["sha256"] == source["sha256_now"] and "warning" not in source
    copied.write_text("edited\n")
    source = upstream_suite.upstream_source(repo / ".upstream", copied)
    assert "differs" in source["warning"]
    # a folder git would track is refused, and nothing is written there
    with pytest.raises(upstream_suite.SuiteError, match="not ignored by git"):
        upstream_suite.populate(git_dir, "HEAD", repo / "tracked", "tests/test_synth.py", repo=repo)
    assert not (repo / "tracked").exists()
    with pytest.raises(upstream_suite.SuiteError, match="no-such-rev"):
        upstream_suite.populate(git_dir, "no-such-rev", repo / ".upstream", "t.py", repo=repo)


def test_tool_runs_each_path_with_its_environment(tmp_path: Path) -> None:
    updir = tmp_path / "up"
    updir.mkdir()
    (updir / "test_synth.py").write_text(
        textwrap.dedent(
            """\
            import os
            import pytest

            @pytest.mark.parametrize("i", range(4))
            def test_always(i):
                assert os.environ["SYNTH_PATH"] == "a"
            """
        )
    )
    config = write_config(tmp_path / "suite.toml", "")
    out = tmp_path / "out"
    argv = ["--paths", "a,b", "--config", str(config), "--upstream", str(updir)]
    argv += ["--assume-capability", ""]  # no torch import in the synthetic runs
    rc = upstream_suite.main([*argv, "--out", str(out), "--sample", "1"])
    summary = json.loads((out / "upstream-summary.json").read_text())
    assert rc == 1 and summary["ok"] is False
    a, b = summary["paths"]["a"], summary["paths"]["b"]
    assert (a["passed"], a["failed"], a["ok"]) == (4, 0, True)
    assert (b["passed"], b["failed"], b["ok"]) == (0, 4, False)
    assert a["env"] == {"SYNTH_PATH": "a"} and len(b["failing"]) == 4
    assert summary["sample"] == 1 and summary["upstream"]["commit"] == "unknown"
    assert "warning" in summary["upstream"]
    for name in ("upstream-a.log", "upstream-b-selection.json", "upstream-b-results.jsonl"):
        assert (out / name).is_file()
    assert upstream_suite.main([*argv, "--out", str(out), "--paths", "a"]) == 0


def test_tool_stops_a_path_past_its_budget(tmp_path: Path) -> None:
    updir = tmp_path / "up"
    updir.mkdir()
    (updir / "test_synth.py").write_text(
        "import time\n\ndef test_always():\n    time.sleep(120)\n\ndef test_always2():\n    pass\n"
    )
    config = write_config(tmp_path / "suite.toml", "").read_text()
    config = config.replace('always = ["test_always"]', 'always = ["test_always*"]')
    (tmp_path / "suite.toml").write_text(config)
    out = tmp_path / "out"
    argv = ["--paths", "a", "--config", str(tmp_path / "suite.toml"), "--upstream", str(updir)]
    argv += ["--assume-capability", ""]
    rc = upstream_suite.main([*argv, "--out", str(out), "--budget-s", "12"])
    path = json.loads((out / "upstream-summary.json").read_text())["paths"]["a"]
    assert rc == 1 and path["cut_short"].startswith("stopped after")
    assert path["seconds"] < 90
    assert path["passed"] + path["not_run"] + path["failed"] == 2


def _options(**changes: Any) -> upstream_suite.RunOptions:
    options = upstream_suite.RunOptions(
        paths=(), sample=None, always=None, workers=8, out=Path("out"), config=Path("c.toml"),
        upstream_dir=Path("up"), collect_only=False, part="all", assume_capability="", budget_s=0.0,
        timeout_s=0.0, tb="short", show_failing=5, python=sys.executable, pytest_args=(),
    )  # fmt: skip
    return dataclasses.replace(options, **changes)


def test_heavy_cases_get_a_pass_of_their_own_with_fewer_workers() -> None:
    heavy = _config('[[heavy]]\nwhy = "w"\nworkers = 2\ntests = ["test_kv*"]\n')
    assert upstream_suite.passes(_options(), heavy) == [("light", 8), ("heavy", 2)]
    assert upstream_suite.passes(_options(workers=2), heavy) == [("all", 2)]
    assert upstream_suite.passes(_options(workers=0), heavy) == [("all", 0)]
    assert upstream_suite.passes(_options(collect_only=True), heavy) == [("all", 8)]
    assert upstream_suite.passes(_options(), _config("")) == [("all", 8)]
    # --part: one pass only; the heavy one with at most the entries' workers
    assert upstream_suite.passes(_options(part="light"), heavy) == [("light", 8)]
    assert upstream_suite.passes(_options(part="heavy"), heavy) == [("heavy", 2)]
    assert upstream_suite.passes(_options(part="heavy", workers=1), heavy) == [("heavy", 1)]
    assert upstream_suite.passes(_options(part="heavy"), _config("")) == [("heavy", 8)]
    assert upstream_suite.passes(_options(part="light", collect_only=True), heavy) == [("all", 8)]
    files = {"selection": Path("s.json"), "results": Path("r.jsonl")}
    light = upstream_suite.pytest_command(_options(), Path("t.py"), files, "light", 8)
    second = upstream_suite.pytest_command(_options(), Path("t.py"), files, "heavy", 2, append=True)
    assert light[light.index("--upstream-part") + 1] == "light" and "-n" in light
    assert "--upstream-results-append" not in light
    assert second[second.index("-n") + 1] == "2" and "--upstream-results-append" in second
    plain = upstream_suite.pytest_command(_options(workers=0), Path("t.py"), files)
    assert "--upstream-part" not in plain and "-n" not in plain


@pytest.mark.parametrize(
    ("first", "second", "combined"),
    [(None, 0, 0), (0, 5, 0), (5, 1, 1), (1, 5, 1), (0, 1, 1), (1, 0, 1), (2, 1, 2), (5, 5, 5)],
)
def test_the_exit_status_of_two_passes_is_the_worse(first, second, combined) -> None:
    assert upstream_suite.combine_exits(first, second) == combined


def test_tool_runs_the_heavy_cases_apart(tmp_path: Path) -> None:
    """Two passes into one results file and one summary (needs pytest-xdist: the light
    pass runs on more workers than the heavy one)."""
    pytest.importorskip("xdist")
    updir = tmp_path / "up"
    updir.mkdir()
    (updir / "test_synth.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('n', range(6))\n"
        "def test_always(n):\n    assert n != 4\n"
    )
    write_config(tmp_path / "suite.toml", '[[heavy]]\nwhy = "w"\nworkers = 1\n'
                 'tests = ["test_always"]\nwhere = ["n >= 3"]\n')  # fmt: skip
    out = tmp_path / "out"
    argv = ["--paths", "a", "--config", str(tmp_path / "suite.toml"), "--upstream", str(updir)]
    rc = upstream_suite.main([*argv, "--assume-capability", "", "--out", str(out), "-n", "2"])
    path = json.loads((out / "upstream-summary.json").read_text())["paths"]["a"]
    assert rc == 1 and (path["passed"], path["failed"], path["not_run"]) == (5, 1, 0)
    log = (out / "upstream-a.log").read_text()
    assert "--upstream-part light" in log and "--upstream-part heavy" in log
    # the same run split in two (--part): each counts only its own part's cases
    parts = {}
    for part in ("light", "heavy"):
        rc = upstream_suite.main([*argv, "--assume-capability", "", "--out", str(out / part),
                                  "-n", "2", "--part", part])  # fmt: skip
        summary = json.loads((out / part / "upstream-summary.json").read_text())
        parts[part] = (rc, summary["part"], summary["paths"]["a"])
    rc, part, light = parts["light"]
    assert (rc, part, light["part"]) == (0, "light", "light")
    assert (light["passed"], light["failed"], light["not_run"]) == (3, 0, 0)
    rc, part, heavy = parts["heavy"]
    assert (rc, part, heavy["part"]) == (1, "heavy", "heavy")
    assert (heavy["passed"], heavy["failed"], heavy["not_run"]) == (2, 1, 0)
    assert len(heavy["failing"]) == 1 and heavy["failing"][0].endswith("test_always[4]")


def test_part_ids_split_the_selection() -> None:
    selection = {"selected_ids": ["a", "b", "c", "d"], "heavy_ids": ["b", "d"]}
    assert upstream_results.part_ids(selection, "all") == ["a", "b", "c", "d"]
    assert upstream_results.part_ids(selection, "light") == ["a", "c"]
    assert upstream_results.part_ids(selection, "heavy") == ["b", "d"]
    assert upstream_results.part_ids(None, "heavy") == []
    with pytest.raises(ValueError, match="part must be all, light or heavy; got 'half'"):
        upstream_results.part_ids(selection, "half")


def test_tool_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert upstream_suite.main(["--paths", "sm70"]) == 2
    assert "unknown kernel path 'sm70'; valid: sm90, sm80" in capsys.readouterr().err
    assert upstream_suite.main(["--sample", "0"]) == 2
    assert "--sample must be >= 1" in capsys.readouterr().err
    assert upstream_suite.main(["--upstream", str(tmp_path / "none")]) == 2
    assert "populate it first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        upstream_suite.main(["--part", "half"])
    assert e.value.code == 2
    assert "invalid choice: 'half' (choose from" in capsys.readouterr().err
