"""The factory's stages for CI and other front-ends (registered into cli.py's parser).

kernel-groups --matrix SEL          the distinct (CUDA, kernel set) of a selection (--json:
                                    the GitHub Actions matrix of the `kernels` job)
builder-context --matrix SEL        stage the builder image's context (never the checkout,
                                    which has no wheelhouse/) and print its build args
cache-key     --matrix SEL          the CI cache key of a selection's kernel objects
objects       --matrix SEL          compile the kernel objects alone (no torch needed)
torch-args    --matrix SEL          pip arguments installing a cell's torch, one a line
smoke-wheel   --matrix SEL WHEEL    the smoke gate with a given interpreter; --record
                                    writes the record the publish job reads
publish-smoked DIR...               publish the wheels whose smoke records say passed
cibw-cuda / cibw-plan-env / cibw-repair   cibuildwheel's hooks (scripts/factory/cibw.py)
build-request --matrix SEL --out F  a variant's BuildRequest JSON (FLASH_ATTN_BUILD_REQUEST)
conda-variants                      write (or --check) recipes/conda/variants.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .cellref import cell_for_wheel, torch_install_args
from .cibw import build_request, planned_env, provision_pip_cuda, repair_wheel
from .conda import VARIANTS_YAML, conda_variants, render_variants
from .errors import FactoryError
from .images import ImageOptions, builder_build, github_outputs, stage_context
from .limits import check_limits
from .matrix import Cell, MatrixSpec, select_cells, stable_pythons
from .objects import compile_objects, github_kernel_matrix, kernel_groups, object_cache_key
from .paths import FactoryPaths
from .probe import find_interpreter, local_facts, probe_python
from .provision import hermetic_venv_name
from .publish import publish
from .smoke import (
    Check,
    SmokeResult,
    build_torch_of_another_major,
    check_environment,
    smoke_wheel,
)
from .smoke_record import assemble, gpu_verdict, make_record, write_record
from .smoke_stable import stable_checks
from .stage import stage_sources

Command = Callable[[argparse.Namespace, MatrixSpec, FactoryPaths], int]
WithMatrix = Callable[[str, str], argparse.ArgumentParser]


def _cells(args: argparse.Namespace, spec: MatrixSpec) -> list[Cell]:
    """The matrix stage (cli.checked_cells): the selection's cells, every setting checked."""
    local = getattr(args, "local", None) or local_facts()
    cells = select_cells(args.matrix, spec, local)
    paths = FactoryPaths.default(out=args.out, work=args.work)
    check_limits(cells, paths.repo, paths.object_cache)
    return cells


def _one_group_cell(args: argparse.Namespace, spec: MatrixSpec) -> Cell:
    groups = kernel_groups(_cells(args, spec), spec)
    if len(groups) != 1:
        raise FactoryError(
            f"MATRIX={args.matrix!r} spans {len(groups)} kernel groups "
            f"({', '.join(g.name for g in groups)}); a cache key is for one: select one "
            "CUDA and one kernel set"
        )
    return groups[0].first


def cmd_kernel_groups(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    groups = kernel_groups(_cells(args, spec), spec)
    if args.json:
        print(json.dumps(github_kernel_matrix(groups)))
        return 0
    for g in groups:
        print(f"{g.name}: {len(g.cells)} cell(s), e.g. {g.first.id}")
    return 0


def cmd_builder_context(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    """The image of the selection's first cell (a kernel group's or a build job's cell):
    its context staged as `make wheels ENGINE=...` stages it, its build args printed."""
    cell = _cells(args, spec)[0]
    wheelhouse = Path(args.wheelhouse).resolve() if args.wheelhouse else None
    dest = Path(args.dest).resolve() if args.dest else paths.work / "engine" / "context"
    context = stage_context(paths.repo, dest, wheelhouse)
    build = builder_build(cell, paths.repo, context, ImageOptions(base=args.base_image))
    if args.format == "github":
        sys.stdout.write(github_outputs(build, hermetic_venv_name(cell)))
        return 0
    args_text = " ".join(f"--build-arg {k}={v}" for k, v in sorted(build.build_args.items()))
    print(f"docker build -f {build.dockerfile} {args_text} -t {build.tag} {build.context}")
    return 0


def cmd_cache_key(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cell = _one_group_cell(args, spec)
    src = stage_sources(paths.repo, paths.src(cell.id))
    key = object_cache_key(cell, src, paths.object_cache)
    if args.format == "github":
        sys.stdout.write(key.github_output())
    else:
        print(f"key: {key.key}\nrestore-keys: {', '.join(key.restore_keys)}")
        print(f"objects: {key.objects}; compiler {key.compiler_digest}")
    return 0


def cmd_objects(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    for group in kernel_groups(_cells(args, spec), spec):
        print(f"{group.name}: kernel objects for {len(group.cells)} cell(s)", flush=True)
        src = stage_sources(paths.repo, paths.src(group.first.id))
        objects = compile_objects(
            group.first, src, paths.object_cache, log=lambda s: print(s, flush=True)
        )
        print(f"{group.name}: {len(objects)} objects in {paths.object_cache}", flush=True)
    return 0


def cmd_torch_args(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cells = _cells(args, spec)
    variants = {(c.torch, c.cuda) for c in cells}
    if len(variants) != 1:
        raise FactoryError(
            f"MATRIX={args.matrix!r} names {len(variants)} torch/CUDA pairs; name one"
        )
    print("\n".join(torch_install_args(cells[0], spec)))
    return 0


def cmd_smoke_wheel(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    wheel = Path(args.wheel).resolve()
    cell = cell_for_wheel(args.matrix, wheel, spec)
    python = args.python or find_interpreter(cell.python)
    facts = probe_python(python)
    # the torch check compares exact versions; a wrong minor must fail it, and say so
    # (a stable wheel: any torch from the floor on is the cell's, e.g. the GPU runner's 2.11)
    serves = facts.torch_minor == cell.torch or (
        cell.stable and bool(facts.torch_minor) and spec.stable.serves(str(facts.torch_minor))
    )
    expected = facts.torch if serves else f"{cell.torch}.* (the cell's)"
    log = paths.log(cell.id, "smoke")
    if args.in_place:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"smoke {cell.id} in place ({python}): {wheel.name}\n")
        result = SmokeResult(cell.id, str(wheel), log=str(log))
        result.checks.extend(check_environment(cell, python, str(expected), log))
    elif skipped := build_torch_of_another_major(
        cell, facts.torch, facts.torch_cuda, "the smoke-gpu job imports it under torch-args' torch"
    ):
        # the build job's CPU smoke with the image's toolchain (its one torch): the wheel
        # would refuse that torch by design; the module's own proofs still run below
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"smoke {cell.id} ({python}): {wheel.name}\n")
        result = SmokeResult(cell.id, str(wheel), log=str(log))
        result.checks.append(skipped)
    else:
        venv = paths.venvs / f"smoke-{cell.id}"
        result = smoke_wheel(cell, wheel, python, str(expected), venv, log)
    if cell.stable and result.checks:
        # the one module's own proofs (the [stable] smoke pairs run in `make wheels`)
        result.checks += stable_checks(cell, wheel, (), paths, log)
    if args.require_gpu and gpu_verdict(result) == "skipped":
        result.checks.append(
            Check("gpu-required", False, f"no GPU visible to {python}: the GPU gate did not run")
        )
    if args.record:
        print(f"record: {write_record(make_record(cell, wheel, result), wheel)}")
    print(f"{cell.id}: {result.summary()} (log {log})")
    return 0 if result.passed else 1


def cmd_publish_smoked(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    found = assemble([Path(d) for d in args.dirs], require_gpu=not args.allow_no_gpu)
    for line in found.left_out:
        print(f"left out: {line}")
    if not found.candidates:
        raise FactoryError(f"no smoke-passed wheel under {', '.join(args.dirs)}: nothing published")
    entries = publish(paths.out, list(found.candidates))
    print(f"published {len(found.candidates)} wheel(s); {len(entries)} in {paths.tree}")
    return 0


def cmd_cibw_cuda(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    cuda = {c.cuda for c in _cells(args, spec)}
    if len(cuda) != 1:
        raise FactoryError(f"MATRIX={args.matrix!r} names CUDA {sorted(cuda)}; name one")
    home = provision_pip_cuda(cuda.pop(), Path(args.prefix), args.python or sys.executable)
    print(f"CUDA_HOME={home}")
    return 0


def cmd_cibw_plan_env(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    try:
        env = planned_env(args.matrix, spec, paths.repo, paths.object_cache)
    except FactoryError as e:  # before-all runs before the CUDA compiler exists
        print(f"plan-env: no plan yet ({e}); setup.py plans at build time", file=sys.stderr)
        env = {}
    print(env.get(args.var, ""))
    return 0


def cmd_build_request(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    request = build_request(args.matrix, spec)
    request.write(Path(args.out))
    print(f"{args.out}: {request.binding}, +{request.local_label}, {request.torch_requirement}")
    return 0


def cmd_cibw_repair(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    tagged = repair_wheel(args.matrix, Path(args.wheel), Path(args.dest), spec, paths.repo)
    print(f"{Path(tagged.path).name} ({tagged.platform_reason})")
    return 0


def cmd_conda_variants(args: argparse.Namespace, spec: MatrixSpec, paths: FactoryPaths) -> int:
    text = render_variants(conda_variants(_cells(args, spec), stable_pythons(spec)), args.matrix)
    target = Path(args.output)
    if args.check:
        if not target.is_file() or target.read_text() != text:
            print(f"{target} is stale: run python3 -m scripts.factory conda-variants")
            return 1
        print(f"{target} is up to date")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target}")
    return 0


def add_parsers(sub: argparse._SubParsersAction, with_matrix: WithMatrix) -> dict[str, Command]:
    g = with_matrix("kernel-groups", "the distinct CUDA and kernel sets of a selection")
    g.add_argument("--json", action="store_true", help="the matrix of CI's kernels job")
    bc = with_matrix("builder-context", "stage the builder image's context, print its args")
    bc.add_argument("--dest", help="the context directory (default: build/factory/engine/context)")
    bc.add_argument("--wheelhouse", help="wheels to put in the image (default: none)")
    bc.add_argument("--base-image", default="", help="the Dockerfile's BASE (default: its own)")
    bc.add_argument("--format", choices=("text", "github"), default="text")
    k = with_matrix("cache-key", "the CI cache key of a selection's kernel objects")
    k.add_argument("--format", choices=("text", "github"), default="text")
    with_matrix("objects", "compile the kernel objects of a selection (no torch needed)")
    with_matrix("torch-args", "pip arguments that install a cell's torch")
    s = with_matrix("smoke-wheel", "the smoke gate for one wheel with a given interpreter")
    s.add_argument("--python", help="the interpreter with the cell's torch (default: found)")
    s.add_argument("--in-place", action="store_true", help="check --python's own environment")
    s.add_argument("--require-gpu", action="store_true", help="fail when the GPU check is skipped")
    s.add_argument("--record", action="store_true", help="write <wheel>.smoke.json")
    s.add_argument("wheel")
    p = sub.add_parser("publish-smoked", help="publish the wheels whose smoke records passed")
    p.add_argument(
        "--allow-no-gpu",
        action="store_true",
        default=os.environ.get("FLASH_ATTN_ALLOW_NO_GPU", "") == "1",
        help="accept CPU-only smoke records (default: $FLASH_ATTN_ALLOW_NO_GPU=1; a local "
        "replay of the workflow without GPU runners)",
    )
    p.add_argument("dirs", nargs="+")
    c = with_matrix("cibw-cuda", "cibuildwheel before-all: the CUDA compiler from pip")
    c.add_argument("--prefix", required=True)
    c.add_argument("--python", help="the interpreter for the venv (default: this one)")
    e = with_matrix("cibw-plan-env", "cibuildwheel environment: one planned knob")
    e.add_argument("--var", choices=("MAX_JOBS", "NVCC_THREADS"), required=True)
    b = with_matrix("build-request", "write a variant's BuildRequest (FLASH_ATTN_BUILD_REQUEST)")
    b.add_argument("--out", required=True)
    r = with_matrix("cibw-repair", "cibuildwheel repair: the factory's tag stage")
    r.add_argument("wheel")
    r.add_argument("dest")
    v = with_matrix("conda-variants", "write recipes/conda/variants.yaml from the matrix")
    v.add_argument("--check", action="store_true", help="only compare with the file")
    v.add_argument("--output", default=str(VARIANTS_YAML))
    v.set_defaults(matrix="release")
    return {
        "kernel-groups": cmd_kernel_groups,
        "builder-context": cmd_builder_context,
        "cache-key": cmd_cache_key,
        "objects": cmd_objects,
        "torch-args": cmd_torch_args,
        "smoke-wheel": cmd_smoke_wheel,
        "publish-smoked": cmd_publish_smoked,
        "cibw-cuda": cmd_cibw_cuda,
        "cibw-plan-env": cmd_cibw_plan_env,
        "cibw-repair": cmd_cibw_repair,
        "build-request": cmd_build_request,
        "conda-variants": cmd_conda_variants,
    }
