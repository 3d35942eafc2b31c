"""The factory's one CLI: `python3 -m scripts.factory <stage> ...`.

matrix   --matrix SEL [--json]     the cells of a selection (or the GitHub matrix)
provision --matrix SEL             the toolchain of each cell (interpreter, torch, nvcc)
plan     --matrix SEL              the build plan of each cell, with its reasons
build    --matrix SEL              provision, plan, build and tag; no smoke, no publish
wheels   --matrix SEL              provision, plan, build, tag, smoke, publish, report
         (build and wheels: --engine docker|podman runs each cell in a container with
         the matrix's limits; --fail-fast stops at the first failed cell)
smoke    --cell ID WHEEL           the smoke gate alone on one wheel
publish  --cell ID WHEEL...        add wheels (smoke-tested first) to the tree
report                             the last run's table
doctor   [--python EXE]            which variant an environment needs
kernel-env --kernels NAME          a kernel set's setup.py knobs (make ci-build)
refresh-matrix [--check]           the torch table of recipes/matrix.toml from the index
wheelhouse --matrix SEL --dest DIR the wheels the cells' toolchains need, for offline images
dev-image --engine E               the dev image (builder image + test and lint tools)
dev      --engine E [--cmd C]       a shell in the dev image, the checkout mounted (--cmd:
                                   one command, then exit)

CI and other front-ends (scripts/factory/ci_cli.py): kernel-groups, cache-key, objects,
torch-args, smoke-wheel, publish-smoked, cibw-cuda, cibw-plan-env, cibw-repair,
conda-variants.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from build_tools.resources import read_cgroup_usage

from . import ci_cli
from .build import source_date_epoch
from .containers import ContainerCells
from .devshell import build_dev_image, dev_shell_argv
from .doctor import doctor
from .engine import ENGINES, ContainerEngine
from .errors import FactoryError
from .images import DEV_REQUIREMENTS, ImageOptions, factory_requirements
from .limits import check_limits
from .matrix import (
    MATRIX_TOML,
    Cell,
    MatrixSpec,
    github_matrix,
    load_spec,
    parse_selection,
    select_cells,
    selection_of_id,
    with_installed_torch,
)
from .paths import FactoryPaths
from .pipeline import CellRunner, RunOptions, run_cells, smoke_cell_wheel
from .plan import plan_cell
from .probe import local_facts, probe_python
from .provision import (
    TOOLCHAINS,
    fill_wheelhouse,
    provision,
    toolchain_index,
    toolchain_requirements,
)
from .publish import Candidate, publish
from .report import CellReport, load, print_report, save
from .smoke import quarantine
from .stage import stage_sources
from .status import goal
from .torch_releases import index_source, refresh
from .variant import index_base


def _log(message: str) -> None:
    print(message, flush=True)


def _cells(args: argparse.Namespace, spec: MatrixSpec) -> list[Cell]:
    """The matrix stage: the selection's cells, every setting checked (exit 2)."""
    return checked_cells(args, spec, FactoryPaths.default(out=args.out, work=args.work))


def checked_cells(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> list[Cell]:
    local = getattr(args, "local", None) or local_facts()
    cells = select_cells(args.matrix, spec, local)
    check_limits(cells, paths.repo, paths.object_cache)
    return cells


def _with_local_torch(args: argparse.Namespace, spec: MatrixSpec) -> MatrixSpec:
    """The `local` preset follows the installed torch: a torch the table does not know
    yet gets its row from its own metadata, with a note saying so."""
    selection = parse_selection(args.matrix, spec)  # a bad MATRIX stops before any probe
    args.local = local_facts()
    if selection.preset != "local":
        return spec
    spec, note = with_installed_torch(spec, args.local)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return spec


def cmd_matrix(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cells = _cells(args, spec)
    if args.json:
        print(json.dumps(github_matrix(cells)))
        return 0
    print(f"MATRIX={args.matrix!r}: {len(cells)} cell{'s' if len(cells) != 1 else ''}")
    for c in cells:
        print(
            f"  {c.id:40} kernels {c.kernels.name} (archs {';'.join(c.kernels.archs)}), "
            f"{c.platform}, requires {c.requires_torch}, {c.cxx_std}; "
            f"container limits {c.limits.describe()}"
        )
        if c.stable:
            pairs = ", ".join(f"torch {s.torch}/python {s.python}" for s in spec.stable.smoke)
            print(
                f"  {'':40} stable ({c.abi3_tag}-abi3, every torch from {c.torch_floor} on): "
                f"built with torch {c.torch}, python {c.python}, CUDA {c.cuda}; "
                f"smoke-tested under {pairs or 'the build torch only'}"
            )
    return 0


def _image_options(args: argparse.Namespace) -> ImageOptions:
    wheelhouse = Path(args.wheelhouse).resolve() if args.wheelhouse else None
    return ImageOptions(base=args.base_image or "", wheelhouse=wheelhouse, offline=args.offline)


def _engine(args: argparse.Namespace) -> ContainerEngine:
    engine = ContainerEngine.select(args.engine)
    engine.check()
    return engine


def _runner(
    args: argparse.Namespace, paths: FactoryPaths, options: RunOptions
) -> CellRunner | None:
    """None for ENGINE=none (cells run here); else the container step, its engine
    checked before any cell starts."""
    if args.engine == "none":
        return None
    engine = _engine(args)
    _log(f"engine: {' '.join(engine.base())} (cells run in containers, limits from the matrix)")
    cells = ContainerCells(
        engine, paths, options, _image_options(args), _log, source_date_epoch(paths.repo)
    )
    return cells.run_cell


def _run_cells(
    cells: list[Cell],
    spec: MatrixSpec,
    paths: FactoryPaths,
    options: RunOptions,
    runner: CellRunner | None,
) -> list[CellReport]:
    if runner is None:  # ENGINE=none: the cell loop on this machine, as it always was
        return run_cells(cells, spec, paths, options, _log)
    return run_cells(cells, spec, paths, options, _log, runner)


def cmd_provision(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    wheelhouse = Path(args.wheelhouse).resolve() if args.wheelhouse else None
    for cell in _cells(args, spec):
        tc = provision(cell, spec, args.toolchain, paths.toolchains, wheelhouse)
        where = f" ({tc.cuda_home})" if tc.cuda_home else ""
        print(f"{cell.id}: {tc.kind}: python {tc.python}, torch {tc.torch}, nvcc {tc.nvcc}{where}")
        if tc.origin:
            print(f"  {tc.origin}")
        for note in tc.notes:
            print(f"  note: {note}")
    return 0


def cmd_build(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cells = _cells(args, spec)
    options = RunOptions(
        toolchain=args.toolchain, smoke=False, publish=False, fail_fast=args.fail_fast
    )
    rows = _run_cells(cells, spec, paths, options, _runner(args, paths, options))
    save(rows, paths.report_json)
    print_report(rows)
    return 0 if all(r.status == goal(smoke=False, publish=False) for r in rows) else 1


def cmd_plan(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    for cell in _cells(args, spec):
        src = stage_sources(paths.repo, paths.src(cell.id))
        print(f"{cell.id}: {plan_cell(cell, src, paths.object_cache).describe()}")
    return 0


def cmd_wheels(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cells = _cells(args, spec)
    _log(
        f"wheels: MATRIX={args.matrix!r}: {len(cells)} cell(s); toolchain "
        f"{'hermetic, from the builder image' if args.engine != 'none' else args.toolchain}; "
        f"object cache {paths.object_cache}; tree {paths.tree}"
    )
    options = RunOptions(
        toolchain=args.toolchain, publish=not args.no_publish, fail_fast=args.fail_fast
    )
    rows = _run_cells(cells, spec, paths, options, _runner(args, paths, options))
    save(rows, paths.report_json)
    print_report(rows)
    done = goal(smoke=True, publish=options.publish)
    return 0 if all(r.status == done for r in rows) else 1


def _cell_by_id(cell_id: str, spec: MatrixSpec) -> Cell:
    return select_cells(selection_of_id(cell_id, spec), spec, local_facts())[0]


def cmd_smoke(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cell = _cell_by_id(args.cell, spec)
    toolchain = provision(cell, spec, args.toolchain, paths.toolchains)
    result = smoke_cell_wheel(cell, Path(args.wheel), toolchain, paths, spec.stable.smoke, spec)
    print(f"{cell.id}: {result.summary()} (log {result.log})")
    if not result.passed and args.quarantine:
        print(f"quarantined in {quarantine(result, paths.quarantine)}")
    return 0 if result.passed else 1


def cmd_publish(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cell = _cell_by_id(args.cell, spec)
    toolchain = provision(cell, spec, args.toolchain, paths.toolchains)
    candidates = []
    for wheel in args.wheels:
        result = smoke_cell_wheel(cell, Path(wheel), toolchain, paths, spec.stable.smoke, spec)
        if not result.passed:
            raise FactoryError(f"{wheel} did not pass the smoke gate: {result.summary()}")
        candidates.append(Candidate(cell.id, cell.variant, Path(wheel), "", result.summary()))
    entries = publish(paths.out, candidates)
    print(f"published {len(candidates)} wheel(s); {len(entries)} in {paths.tree}")
    return 0


def cmd_report(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    if not paths.report_json.is_file():
        raise FactoryError(f"no report yet ({paths.report_json}); run `make wheels` first")
    print_report(load(paths.report_json))
    return 0


def cmd_wheelhouse(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    from .probe import find_interpreter

    dest = Path(args.dest).resolve()
    for cell in _cells(args, spec):
        python = find_interpreter(cell.python)
        # the image's factory venv (tagging, stable checks) installs from it too
        wanted = [*toolchain_requirements(cell, spec), *factory_requirements()]
        if args.dev:
            wanted = [*wanted, *DEV_REQUIREMENTS]
        log = paths.work / "wheelhouse.log"
        # the index provision downloads from (PyTorch's per-CUDA one for a torch build
        # that is not the package index's), so that an offline provision finds its torch
        fill_wheelhouse(python, wanted, dest, log, toolchain_index(cell, spec))
        print(f"{cell.id}: {' '.join(wanted)} -> {dest} (log {log})")
    return 0


def cmd_dev_image(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cell = _cells(args, spec)[0]
    tag = build_dev_image(_engine(args), cell, paths, _image_options(args), _log)
    print(f"dev image {tag}: `make dev ENGINE={args.engine}` opens a shell in it")
    return 0


def cmd_dev(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cell = _cells(args, spec)[0]
    argv = dev_shell_argv(_engine(args), cell, paths, args.cmd, sys.stdin.isatty())
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 0  # not reached


def cmd_doctor(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    return doctor(probe_python(args.python or sys.executable), spec, args.base_url)


def cmd_kernel_env(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    """A kernel set's setup.py knobs, NAME=value a line (`make ci-build` builds with them)."""
    if args.kernels not in spec.kernels:
        raise FactoryError(f"unknown kernel set {args.kernels!r}; valid: {', '.join(spec.kernels)}")
    for name, value in spec.kernels[args.kernels].env().items():
        print(f"{name}={value}")
    return 0


def cmd_refresh_matrix(args: argparse.Namespace) -> int:
    """Rewrite (or --check) the generated torch table from the package index."""
    path = Path(args.file)
    source, since = index_source(path, args.index_url)
    start = time.perf_counter()
    result = refresh(path, source, since, args.check)
    first, last = result.releases[0].minor, result.releases[-1].minor
    print(
        f"{source.page}: torch {first} to {last} ({len(result.releases)} minors), read in "
        f"{time.perf_counter() - start:.1f} s"
    )
    for difference in result.comparison.differences:
        print(f"  {difference}")
    if args.check:
        if result.comparison.same:
            print(f"{path}: the torch table matches the index")
            return 0
        print(f"{path}: the torch table differs from the index; run `make refresh-matrix`")
        return 1
    if not result.written:
        print(f"{path}: already up to date")
        return 0
    load_spec(path)  # the rewritten file must load, [torch_builds] included
    print(
        f"wrote {path}; what derives from it: `python3 -m scripts.factory conda-variants` "
        "(make refresh-matrix runs both)"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m scripts.factory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, help="where the tree goes (<out>/whl); default dist/")
    p.add_argument("--work", type=Path, help="scratch: default build/factory")
    p.add_argument(
        "--cgroup-stats",
        type=Path,
        help="at the end, write this process's memory cgroup figures (peak, OOM kills) here",
    )
    sub = p.add_subparsers(dest="command", required=True)
    matrix_default = os.environ.get("MATRIX", "local") or "local"

    def with_matrix(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument(
            "--matrix",
            default=matrix_default,
            help='a preset (local, ci, release) or "torch=2.13 python=3.11 ..."',
        )
        return s

    def with_engine(s: argparse.ArgumentParser) -> None:
        s.add_argument(
            "--engine",
            default="none",
            choices=ENGINES,
            help="run each cell in a container (none: on this machine)",
        )
        s.add_argument(
            "--base-image",
            default=os.environ.get("BASE_IMAGE", ""),
            help="the builder image's BASE (default: manylinux_2_28)",
        )
        s.add_argument(
            "--wheelhouse",
            default=os.environ.get("WHEELHOUSE", ""),
            help="wheels to put in the builder image (python3 -m scripts.factory wheelhouse)",
        )
        s.add_argument(
            "--offline",
            action="store_true",
            help="build the image without network, from the wheelhouse alone",
        )

    m = with_matrix("matrix", "print the cells of a selection")
    m.add_argument("--json", action="store_true", help="the GitHub Actions matrix")
    pv = with_matrix("provision", "print each cell's toolchain")
    pv.add_argument("--toolchain", default="system", choices=TOOLCHAINS)
    pv.add_argument(
        "--wheelhouse",
        help="hermetic: download into this directory first, then install from it alone",
    )
    with_matrix("plan", "print each cell's build plan")
    b = with_matrix("build", "build and tag every cell (no smoke test, no publish)")
    b.add_argument("--toolchain", default="system", choices=TOOLCHAINS)
    b.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    with_engine(b)
    w = with_matrix("wheels", "build, tag, smoke-test and publish every cell")
    w.add_argument("--toolchain", default="system", choices=TOOLCHAINS)
    w.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    w.add_argument("--no-publish", action="store_true", help="build and smoke-test only")
    with_engine(w)
    wh = with_matrix("wheelhouse", "download the wheels the cells' toolchains need")
    wh.add_argument("--dest", required=True, help="the wheelhouse directory")
    wh.add_argument("--dev", action="store_true", help="also the dev image's test and lint tools")
    for name, help_ in (("dev-image", "build the dev image"), ("dev", "a shell in it")):
        dv = with_matrix(name, help_)
        with_engine(dv)
    dv.add_argument(
        "--cmd",
        default=os.environ.get("CMD", ""),
        help="run this one command (bash -c) in the dev image and exit with its status "
        "(default: $CMD; empty: an interactive shell)",
    )
    s = sub.add_parser("smoke", help="run the smoke gate on one wheel")
    s.add_argument("--cell", required=True)
    s.add_argument("--toolchain", default="system", choices=TOOLCHAINS)
    s.add_argument("--quarantine", action="store_true")
    s.add_argument("wheel")
    pb = sub.add_parser("publish", help="smoke-test and publish wheels of one cell")
    pb.add_argument("--cell", required=True)
    pb.add_argument("--toolchain", default="system", choices=TOOLCHAINS)
    pb.add_argument("wheels", nargs="+")
    sub.add_parser("report", help="print the last run's report")
    d = sub.add_parser("doctor", help="which variant an environment needs")
    d.add_argument("--python", help="the interpreter to inspect (default: this one)")
    d.add_argument(
        "--base-url",
        default=index_base(),
        help="where the variant indexes are published (default: $FLASH_ATTN_INDEX_URL "
        "or a placeholder)",
    )
    ke = sub.add_parser("kernel-env", help="a kernel set's setup.py knobs, NAME=value a line")
    ke.add_argument("--kernels", required=True, help="a kernel set of recipes/matrix.toml")
    r = sub.add_parser("refresh-matrix", help="the torch table from the package index")
    r.add_argument("--check", action="store_true", help="compare only; exit 1 if it differs")
    r.add_argument("--index-url", help="the simple index (default: [torch_index].url)")
    r.add_argument("--file", default=str(MATRIX_TOML), help="the matrix file")
    COMMANDS.update(ci_cli.add_parsers(sub, with_matrix))
    return p


COMMANDS = {
    "matrix": cmd_matrix,
    "provision": cmd_provision,
    "plan": cmd_plan,
    "build": cmd_build,
    "wheels": cmd_wheels,
    "smoke": cmd_smoke,
    "publish": cmd_publish,
    "report": cmd_report,
    "doctor": cmd_doctor,
    "kernel-env": cmd_kernel_env,
    "wheelhouse": cmd_wheelhouse,
    "dev-image": cmd_dev_image,
    "dev": cmd_dev,
}


# commands that need no (valid) matrix: they make it
STANDALONE: dict[str, Callable[[argparse.Namespace], int]] = {
    "refresh-matrix": cmd_refresh_matrix,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    paths = FactoryPaths.default(out=args.out, work=args.work)
    try:
        if args.command in STANDALONE:
            return STANDALONE[args.command](args)
        spec = load_spec()
        if hasattr(args, "matrix"):
            spec = _with_local_torch(args, spec)
        return COMMANDS[args.command](args, spec, paths)
    except FactoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was published from this run", file=sys.stderr)
        return 130
    finally:
        if args.cgroup_stats is not None:
            _write_cgroup_stats(args.cgroup_stats)


def _write_cgroup_stats(path: Path) -> None:
    from dataclasses import asdict

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(read_cgroup_usage()), indent=2) + "\n")
