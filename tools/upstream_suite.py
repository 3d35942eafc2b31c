"""Run upstream FlashAttention's tests/test_flash_attn.py against our flash_attn.

A standing compatibility check: upstream's own test file, unchanged, on each kernel
path (recipes/upstream_suite.toml [paths]: sm90 = the default wgmma kernels on
H100/H200, sm80 = FLASH_ATTN_DISABLE_SM90=1), minus the cases that need a feature our
package lacks (the [[exclude]] entries, each naming that feature), on a deterministic
1-in-N sample plus the "always" tests. Selection is done by a pytest plugin of ours
(tools/upstream_select.py); upstream's file is never edited, and never committed here.

    # once, from a snapshot of the public repository (a bare git dir):
    python3 tools/upstream_suite.py populate /path/to/flash-attention.git
    # on the GPU machine, from the repo root, flash_attn._C built in place:
    PYTHONPATH=$PWD python3 tools/upstream_suite.py --paths sm90,sm80 --sample 10 -n 8

A long run can be split in two (two machines, or two calls of a lent one): `--part
light` runs the selected cases no [[heavy]] entry names, `--part heavy` the others; each
counts as not run only the cases of its own part.

`populate` copies the file (and upstream's LICENSE) into the ignored .upstream/ and
records the commit in .upstream/source.json. The run writes, to --out ($OUT if set):
upstream-<path>.log (pytest's output), upstream-<path>-selection.json,
upstream-<path>-results.jsonl (each case's outcome as it comes) and
upstream-summary.json (counts per path, date, GPU, sample N, upstream commit). It
exits 1 when any selected case fails or errors, or did not run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from upstream_results import PathSummary, summarize  # noqa: E402
from upstream_rules import (  # noqa: E402
    PARTS,
    ConfigError,
    KernelPath,
    SuiteConfig,
    heavy_workers,
    load_config,
)

DEFAULT_CONFIG = ROOT / "recipes" / "upstream_suite.toml"
DEFAULT_UPSTREAM = ROOT / ".upstream"
SOURCE_RECORD = "source.json"
UPSTREAM_REPOSITORY = "Dao-AILab/flash-attention"
INTERRUPT_GRACE_S = 30
# a log larger than this is cut in the middle after the run (the device tool brings
# back files of at most 16 MiB): its first LOG_HEAD and last LOG_TAIL bytes are kept
LOG_LIMIT = 12 << 20
LOG_HEAD = 2 << 20
LOG_TAIL = 8 << 20


class SuiteError(RuntimeError):
    """A problem the tool reports in one line and exits 2 for."""


@dataclass(frozen=True)
class RunOptions:
    paths: tuple[KernelPath, ...]
    sample: int | None
    always: str | None  # comma list overriding [suite] always; "" = none
    workers: int
    out: Path
    config: Path
    upstream_dir: Path
    collect_only: bool
    part: str  # one of PARTS (upstream_rules): which selected cases run
    assume_capability: str
    budget_s: float
    timeout_s: float
    tb: str
    show_failing: int
    python: str
    pytest_args: tuple[str, ...]


# ------------------------------------------------------------------ populate


def populate(
    git_dir: Path, rev: str, dest: Path, upstream_file: str, repo: Path = ROOT
) -> dict[str, Any]:
    """Copy ``upstream_file`` at ``rev`` of the bare repository ``git_dir`` into ``dest``
    (which ``repo``'s git must ignore, where it lies inside ``repo``), with upstream's
    LICENSE, and record where it came from."""
    commit = _git(git_dir, "rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
    text = _git(git_dir, "show", f"{commit}:{upstream_file}")
    date = _git(git_dir, "log", "-1", "--format=%cI", commit).decode().strip()
    target = dest / Path(upstream_file).name
    _require_ignored(repo, target)
    dest.mkdir(parents=True, exist_ok=True)
    target.write_bytes(text)
    try:
        (dest / "LICENSE").write_bytes(_git(git_dir, "show", f"{commit}:LICENSE"))
    except SuiteError:
        pass  # a snapshot without LICENSE at its root: nothing to carry along
    record = {
        "repository": UPSTREAM_REPOSITORY,
        "commit": commit,
        "commit_date": date,
        "file": upstream_file,
        "sha256": hashlib.sha256(text).hexdigest(),
        "git_dir": str(git_dir),
        "populated": _now(),
    }
    (dest / SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _git(git_dir: Path, *args: str) -> bytes:
    cmd = ["git", "-c", f"safe.directory={git_dir}", f"--git-dir={git_dir}", *args]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        raise SuiteError(f"{' '.join(cmd)} failed: {message}")
    return proc.stdout


def _require_ignored(repo: Path, target: Path) -> None:
    """Refuse a target that ``repo`` would track (check-ignore: 0 ignored, 1 not
    ignored, 128 outside the repository or no repository)."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "check-ignore", "-q", str(target)], capture_output=True
    )
    if proc.returncode == 1:
        raise SuiteError(
            f"{target} is not ignored by git: upstream's code must never be committed "
            "here. Use the ignored .upstream/ (.gitignore has /.upstream/) or another "
            "ignored folder."
        )


def upstream_source(upstream_dir: Path, upstream_file: Path) -> dict[str, Any]:
    """The populate record, checked against the file that is there now."""
    record_path = upstream_dir / SOURCE_RECORD
    record: dict[str, Any] = {"repository": UPSTREAM_REPOSITORY, "commit": "unknown"}
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
    sha = hashlib.sha256(upstream_file.read_bytes()).hexdigest()
    if record.get("sha256") not in (None, sha):
        record["warning"] = "the file differs from the one populate copied"
    elif "sha256" not in record:
        record["warning"] = f"no {SOURCE_RECORD}: the file was not placed by populate"
    record["sha256_now"] = sha
    return record


# ------------------------------------------------------------------ one kernel path


def passes(options: RunOptions, suite: SuiteConfig) -> list[tuple[str, int]]:
    """(part, workers) of each pytest run of a path: every selected case at once, or,
    where [[heavy]] entries allow fewer workers than -n, the other cases first and then
    the heavy ones with those workers (upstream_select.py's --upstream-part). With
    --part light or heavy, only that pass (a long run split over two machines or calls)."""
    few = heavy_workers(suite)
    if options.collect_only:
        return [("all", options.workers)]
    if options.part == "light":
        return [("light", options.workers)]
    if options.part == "heavy":
        return [("heavy", options.workers if few is None else min(few, options.workers))]
    if few is None or options.workers <= few:
        return [("all", options.workers)]
    return [("light", options.workers), ("heavy", few)]


def combine_exits(first: int | None, second: int) -> int:
    """pytest's exit status over two passes: the worse of the two, where "no tests
    collected" (5) of one pass gives way to the other's."""
    if first is None or first == 5:
        return second
    return first if second == 5 else max(first, second)


def pytest_command(
    options: RunOptions,
    upstream_file: Path,
    files: dict[str, Path],
    part: str = "all",
    workers: int | None = None,
    append: bool = False,
) -> list[str]:
    """The pytest command of one pass: ``part`` of the selected cases (all, light,
    heavy) on ``workers`` workers (None: -n), appending to the results file if asked."""
    workers = options.workers if workers is None else workers
    cmd = [
        options.python,
        "-m",
        "pytest",
        str(
            upstream_file.relative_to(ROOT) if upstream_file.is_relative_to(ROOT) else upstream_file
        ),
        "-p",
        "upstream_select",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(ROOT),
        "--upstream-config",
        str(options.config),
        "--upstream-selection",
        str(files["selection"]),
        "-q",
        f"--tb={options.tb}",
    ]
    if options.assume_capability:
        cmd += ["--upstream-assume-capability", options.assume_capability]
    if options.sample is not None:
        cmd += ["--upstream-sample", str(options.sample)]
    if options.always is not None:
        cmd += [f"--upstream-always={options.always}"]
    if options.collect_only:
        cmd.append("--collect-only")
    else:
        cmd += ["--upstream-results", str(files["results"])]
        if append:
            cmd.append("--upstream-results-append")
        if part != "all":
            cmd += ["--upstream-part", part]
        if workers > 0:
            cmd += ["-n", str(workers)]
        if options.timeout_s > 0:
            cmd += [f"--timeout={options.timeout_s:g}"]
    return cmd + list(options.pytest_args)


def run_path(
    options: RunOptions,
    suite: SuiteConfig,
    kpath: KernelPath,
    upstream_file: Path,
    deadline: float | None,
) -> PathSummary:
    prefix = options.out / f"upstream-{kpath.name}"
    files = {
        "selection": Path(f"{prefix}-selection.json"),
        "results": Path(f"{prefix}-results.jsonl"),
        "log": Path(f"{prefix}.log"),
    }
    for f in files.values():
        f.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(dict(kpath.env))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TOOLS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    start = time.monotonic()
    cut_short = ""
    exit_status: int | None = None
    for index, (part, workers) in enumerate(passes(options, suite)):
        cmd = pytest_command(options, upstream_file, files, part, workers, append=index > 0)
        with open(files["log"], "a", encoding="utf-8") as log:
            env_text = " ".join(f"{k}={v}" for k, v in kpath.env)
            log.write(f"$ {env_text} {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                proc.wait(timeout=None if deadline is None else max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                cut_short = (
                    f"stopped after {time.monotonic() - start:.0f} s, its share of "
                    f"--budget-s {options.budget_s:g}"
                )
                _stop(proc)
            except KeyboardInterrupt:
                _stop(proc)
                raise
        exit_status = combine_exits(exit_status, proc.returncode)
        if cut_short:
            break  # the heavy pass, if any, is not started
    _shorten_log(files["log"])
    return summarize(
        kpath.name,
        dict(kpath.env),
        files["selection"],
        None if options.collect_only else files["results"],
        exit_status,
        time.monotonic() - start,
        cut_short,
        part="all" if options.collect_only else options.part,
    )


def _shorten_log(log: Path) -> None:
    size = log.stat().st_size
    if size <= LOG_LIMIT:
        return
    with open(log, "rb") as f:
        head = f.read(LOG_HEAD)
        f.seek(size - LOG_TAIL)
        tail = f.read()
    note = f"\n[... {size - LOG_HEAD - LOG_TAIL} bytes cut by upstream_suite.py ...]\n"
    log.write_bytes(head + note.encode() + tail)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to pytest's process group (it then reports what ran), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGINT, INTERRUPT_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------ report


def describe_path(summary: PathSummary, kpath: KernelPath, options: RunOptions) -> list[str]:
    env = " ".join(f"{k}={v}" for k, v in kpath.env)
    lines = [f"== {kpath.name}: {kpath.about} ({env})"]
    sel = summary.selection
    log = options.out / f"upstream-{kpath.name}.log"
    if sel is None:
        why = summary.cut_short or f"collection failed (pytest exit {summary.pytest_exit})"
        lines.append(f"   no selection: {why}; {log}:")
        lines += ["   | " + line for line in _tail(log, 30)]
        return lines
    if sel["collection_errors"]:
        lines.append(f"   COLLECTION ERRORS in {', '.join(sel['collection_errors'])}; {log}:")
        lines += ["   | " + line for line in _tail(log, 30)]
        return lines
    lines.append(
        f"   collected {sel['collected']} | excluded {sel['excluded']} | sampled out "
        f"{sel['sampled_out']} | selected {sel['selected']} (always {sel['selected_always']}, "
        f"1 in {sel['sample']}: {sel['selected_sample']})"
        + (f", heavy {sel['selected_heavy']}" if sel.get("selected_heavy") else "")
    )
    if summary.part != "all":
        lines.append(f"   this run: the {summary.part} part only (--part {summary.part})")
    features = "; ".join(f"{k} {v}" for k, v in sel["excluded_by_feature"].items())
    lines.append(f"   excluded by feature: {features or 'none'}")
    for stale in sel["stale_exclusions"]:
        lines.append(f"   stale exclusion (matches no case): {stale}")
    for s in sel["stand_ins"]:
        lines.append(f"   stand-in {s['name']}: {s['state']} ({s['feature']})")
    if sel["capability"] != "read from the GPU":
        lines.append(f"   capability: {sel['capability']}")
    o = summary.outcomes
    if o is not None:
        c = o.counts
        extra = "".join(f" | {k} {c[k]}" for k in ("xfailed", "xpassed") if c[k])
        lines.append(
            f"   passed {c['passed']} | failed {c['failed']} | skipped {c['skipped']} | "
            f"errors {c['errors']}{extra} | not run {len(o.not_run)}"
            f"   (pytest exit {summary.pytest_exit}, {summary.seconds:.0f} s)"
        )
        if o.failing:
            lines.append(f"   failing ({len(o.failing)}):")
            lines += [f"     {n}" for n in o.failing[: options.show_failing]]
            if len(o.failing) > options.show_failing:
                rest = len(o.failing) - options.show_failing
                lines.append(f"     ... {rest} more in upstream-summary.json")
    else:
        lines.append(f"   collect-only: pytest exit {summary.pytest_exit}, {summary.seconds:.0f} s")
    if summary.cut_short:
        lines.append(f"   CUT SHORT: {summary.cut_short}")
    if summary.pytest_exit not in (0, 1, 5) and not summary.cut_short:
        lines.append(f"   pytest exited {summary.pytest_exit}; the end of {log}:")
        lines += ["   | " + line for line in _tail(log, 15)]
    return lines


def _tail(path: Path, n: int) -> list[str]:
    if not path.is_file():
        return ["(no log)"]
    return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "gpu": None}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as e:  # the summary is still written without it
        info["torch"] = f"not importable: {e}"
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=40"],
        capture_output=True,
        text=True,
    )
    info["our_commit"] = proc.stdout.strip() if proc.returncode == 0 else None
    return info


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ main


def run(options: RunOptions, suite: SuiteConfig) -> int:
    upstream_file = options.upstream_dir / Path(suite.upstream_file).name
    if not upstream_file.is_file():
        raise SuiteError(
            f"{upstream_file} is missing: populate it first, from a snapshot of "
            f"{UPSTREAM_REPOSITORY}: python3 tools/upstream_suite.py populate <its git dir>"
        )
    if options.workers > 0 and not options.collect_only and not _has_module("xdist"):
        raise SuiteError(f"-n {options.workers} needs pytest-xdist, which is not installed")
    if options.timeout_s > 0 and not options.collect_only and not _has_module("pytest_timeout"):
        raise SuiteError("--timeout needs pytest-timeout, which is not installed")
    options.out.mkdir(parents=True, exist_ok=True)
    source = upstream_source(options.upstream_dir, upstream_file)
    print(
        f"upstream {source['repository']} {source['commit']} "
        f"({source.get('commit_date', 'date unknown')}), {suite.upstream_file}"
        + (f"; WARNING: {source['warning']}" if "warning" in source else ""),
        flush=True,
    )
    start = time.monotonic()
    deadline = start + options.budget_s if options.budget_s > 0 else None
    summaries: list[PathSummary] = []
    for i, kpath in enumerate(options.paths):
        share = None
        if deadline is not None:
            share = time.monotonic() + (deadline - time.monotonic()) / (len(options.paths) - i)
        summary = run_path(options, suite, kpath, upstream_file, share)
        summaries.append(summary)
        print("\n".join(describe_path(summary, kpath, options)), flush=True)
    ok = all(s.ok for s in summaries)
    report = {
        "date": _now(),
        **environment(),
        "sample": options.sample if options.sample is not None else suite.sample,
        "always": (
            list(suite.always)
            if options.always is None
            else [a for a in options.always.split(",") if a]
        ),
        "workers": options.workers,
        "collect_only": options.collect_only,
        "part": options.part,
        "upstream": source,
        "config": str(options.config),
        "seconds": round(time.monotonic() - start, 1),
        "ok": ok,
        "paths": {s.path: s.to_json() for s in summaries},
    }
    summary_file = options.out / "upstream-summary.json"
    summary_file.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    verdict = "all selected cases passed" if ok else "FAILED"
    if options.collect_only:
        verdict = "collected" if ok else "collection FAILED"
    print(f"upstream suite: {verdict}; {summary_file}", flush=True)
    return 0 if ok else 1


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) if out else ROOT / "build" / "upstream-suite"


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="upstream_suite.py",
        description="Run upstream FlashAttention's test file against our flash_attn "
        "(populate .upstream/ first: `upstream_suite.py populate GIT_DIR`).",
        epilog="Arguments after `--` go to pytest as they are.",
    )
    ap.add_argument("--paths", default="sm90,sm80", help="kernel paths, comma-separated")
    ap.add_argument("--sample", type=int, help="run 1 case in N (default: the config's)")
    ap.add_argument(
        "--always",
        help="comma-separated test names run in full, replacing the config's list ('' = none)",
    )
    ap.add_argument("-n", "--workers", type=int, default=0, help="pytest-xdist workers (0: none)")
    ap.add_argument("--out", type=Path, default=None, help="logs and JSON ($OUT if set)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--upstream", type=Path, default=DEFAULT_UPSTREAM, help="populated folder")
    ap.add_argument("--collect-only", action="store_true", help="select, do not run")
    ap.add_argument(
        "--part",
        choices=PARTS,
        default="all",
        help="run every selected case (all), or only those no [[heavy]] entry names "
        "(light), or only those (heavy): a long run split in two; each counts what it ran "
        "against its own part of the selection",
    )
    ap.add_argument(
        "--assume-capability",
        default="9.0",
        help="the compute capability upstream's module is told where torch sees no GPU "
        "('' = none: collection then needs a GPU)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="wall-clock seconds for all paths, shared evenly; a path past its share is "
        "stopped and reported as cut short (0: no limit)",
    )
    ap.add_argument("--timeout", type=float, default=0, help="per-case limit (pytest-timeout)")
    ap.add_argument("--tb", default="short", help="pytest --tb style for the logs")
    ap.add_argument("--show-failing", type=int, default=100, help="failing ids printed per path")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    ap.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def parse_populate_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="upstream_suite.py populate",
        description=f"Copy upstream's test file from a {UPSTREAM_REPOSITORY} snapshot (a bare "
        "git dir, e.g. the one the fetch tool gives) into the ignored .upstream/.",
    )
    ap.add_argument("git_dir", type=Path)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--upstream", type=Path, default=DEFAULT_UPSTREAM)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["populate"]:
            args = parse_populate_args(argv[1:])
            suite = load_config(args.config)
            record = populate(args.git_dir, args.rev, args.upstream, suite.upstream_file)
            print(
                f"populated {args.upstream / Path(suite.upstream_file).name} from "
                f"{record['repository']} {record['commit']} ({record['commit_date']})"
            )
            return 0
        args = parse_run_args(argv)
        suite = load_config(args.config)
        names = [p.strip() for p in args.paths.split(",") if p.strip()]
        if not names:
            raise SuiteError(f"--paths {args.paths!r} names no path")
        if args.sample is not None and args.sample < 1:
            raise SuiteError(f"--sample must be >= 1 (1 runs every case); got {args.sample}")
        if args.workers < 0:
            raise SuiteError(f"--workers must be >= 0; got {args.workers}")
        options = RunOptions(
            paths=tuple(suite.path(n) for n in names),
            sample=args.sample,
            always=args.always,
            workers=args.workers,
            out=(args.out or _default_out()).resolve(),
            config=args.config.resolve(),
            upstream_dir=args.upstream.resolve(),
            collect_only=args.collect_only,
            part=args.part,
            assume_capability=args.assume_capability,
            budget_s=args.budget_s,
            timeout_s=args.timeout,
            tb=args.tb,
            show_failing=args.show_failing,
            python=args.python,
            pytest_args=tuple(args.pytest_args),
        )
        return run(options, suite)
    except (SuiteError, ConfigError) as e:
        print(f"upstream_suite.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
