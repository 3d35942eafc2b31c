"""The cell loop: provision, plan, build, tag, smoke each cell; publish the ones that pass.

Cells run one after another (each build already uses every CPU it may); a failure
in one cell is recorded and the next goes on (unless fail_fast: the rest are then
skipped). Publishing happens once, at the end, and atomically, so Ctrl-C or a failure
leaves the published tree as it was. A cell runs here, or in a container through
the runner that containers.py gives (ENGINE=docker|podman).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .build import build_env, build_wheel, source_date_epoch, write_request
from .errors import FactoryError
from .matrix import Cell, MatrixSpec, SmokePair
from .paths import FactoryPaths
from .plan import plan_cell
from .preflight import check_disk
from .progress import working
from .provision import Toolchain, provision
from .publish import Candidate, publish
from .report import CellReport
from .smoke import SmokeResult, build_torch_of_another_major, quarantine, smoke_wheel
from .smoke_stable import stable_checks
from .stage import stage_sources
from .status import CellStatus
from .tag import tag_wheel

Log = Callable[[str], None]


@dataclass
class RunOptions:
    toolchain: str = "system"
    smoke: bool = True  # False: stop after tagging (the `build` stage alone)
    publish: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. a planted fault's CFLAGS
    fail_fast: bool = False  # stop at the first failed cell; the rest are skipped


@dataclass
class CellOutcome:
    report: CellReport
    candidate: Candidate | None = None

    @property
    def failed(self) -> bool:
        return not self.report.status.ok


CellRunner = Callable[[Cell], CellOutcome]


def smoke_cell_wheel(
    cell: Cell,
    wheel: Path,
    toolchain: Toolchain,
    paths: FactoryPaths,
    pairs: tuple[SmokePair, ...] = (),
    spec: MatrixSpec | None = None,
) -> SmokeResult:
    """The smoke gate for one wheel of `cell`, in the cell's fresh venv, logged per cell;
    a stable wheel also under every (torch, CPython) of `pairs` (smoke_stable.py)."""
    log = paths.log(cell.id, "smoke")
    skipped = build_torch_of_another_major(
        cell, toolchain.torch, toolchain.torch_cuda, "tested under the [stable] smoke pairs"
    )
    if skipped is not None and pairs:
        # the pairs' torches (of the cell's CUDA major) test the wheel instead
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"smoke {cell.id}: {wheel.name}\n")
        result = SmokeResult(cell.id, str(wheel), log=str(log))
        result.checks.append(skipped)
    else:
        result = smoke_wheel(
            cell,
            wheel,
            toolchain.python,
            toolchain.torch,
            paths.venvs / f"smoke-{cell.id}",
            log,
            isolated=toolchain.isolated,
            cuobjdump=toolchain.cuobjdump,
        )
    if cell.stable and result.checks:
        result.checks += stable_checks(cell, wheel, pairs, paths, Path(result.log), spec)
    return result


def run_cell(
    cell: Cell, spec: MatrixSpec, paths: FactoryPaths, options: RunOptions, log: Log
) -> CellOutcome:
    report = CellReport(cell=cell.id)
    stage = "provision"
    start = time.perf_counter()
    try:
        with working(f"{cell.id}: provisioning the {options.toolchain} toolchain"):
            toolchain = provision(cell, spec, options.toolchain, paths.toolchains)
        where = f" ({toolchain.cuda_home})" if toolchain.cuda_home else ""
        log(
            f"  toolchain: {toolchain.kind}: python {toolchain.python}, torch {toolchain.torch}, "
            f"nvcc {toolchain.nvcc}{where}"
        )
        if toolchain.origin:
            log(f"  toolchain: {toolchain.origin}")
        for note in toolchain.notes:
            log(f"  note: {note}")
        stage = "plan"
        src = stage_sources(paths.repo, paths.src(cell.id))
        plan = plan_cell(cell, src, paths.object_cache, toolchain.env())
        log(f"  plan: {plan.describe()}")
        if plan.warning:
            log(f"  plan: warning: {plan.warning}")
        stage = "build"
        epoch = source_date_epoch(paths.repo)
        cell_dir = paths.cell_dir(cell.id)
        request = write_request(cell, cell_dir)
        log(f"  request: {request} ({cell.binding}, +{cell.local_label}, {cell.requires_torch})")
        env = build_env(request, plan, paths.object_cache, epoch, options.extra_env, toolchain)
        with working(f"{cell.id}: building (log {paths.log(cell.id, 'build')})"):
            raw = build_wheel(
                cell, toolchain, src, cell_dir / "raw", paths.log(cell.id, "build"), env
            )
        report.cpu_s, report.peak_rss_bytes = raw.cpu_s, raw.peak_rss_bytes
        report.objects, report.cache_hits = raw.objects, raw.cache_hits
        log(
            f"  build: {Path(raw.path).name} in {raw.wall_s:.1f} s; kernel objects "
            f"{raw.cache_hits} reused, {raw.compiled} compiled; log {raw.log}"
        )
        stage = "tag"
        tagged = tag_wheel(cell, Path(raw.path), raw.base_version, cell_dir / "wheel", epoch)
        report.wheel, report.wheel_size, report.platform = (
            Path(tagged.path).name,
            tagged.size,
            tagged.platform,
        )
        log(f"  tag: {report.wheel} ({tagged.platform_reason})")
        (cell_dir / "cell.json").write_text(
            json.dumps(
                {
                    "cell": cell.to_dict(),
                    "toolchain": toolchain.to_dict(),
                    "plan": plan.to_dict(),
                    "build": raw.to_dict(),
                    "tag": tagged.to_dict(),
                },
                indent=2,
            )
            + "\n"
        )
        if not options.smoke:
            report.status = CellStatus.TAGGED
            report.note = f"not smoke-tested; wheel: {tagged.path}"
            return CellOutcome(report)
        stage = "smoke"
        with working(f"{cell.id}: smoke test in fresh venvs"):
            smoke = smoke_cell_wheel(
                cell, Path(tagged.path), toolchain, paths, spec.stable.smoke, spec
            )
        report.smoke = smoke.summary()
        log(f"  smoke: {report.smoke}")
        if not smoke.passed:
            where = quarantine(smoke, paths.quarantine)
            report.status = CellStatus.QUARANTINED
            report.note = f"smoke failed; wheel and log in {where}"
            return CellOutcome(report)
        report.status = CellStatus.BUILT
        notes = [tagged.platform_reason] if not tagged.platform.startswith("manylinux") else []
        report.note = "; ".join(notes + list(toolchain.notes))
        return CellOutcome(
            report,
            Candidate(
                cell.id, cell.variant, Path(tagged.path), tagged.platform_reason, report.smoke
            ),
        )
    except FactoryError as e:
        report.fail(stage, str(e).splitlines()[0])
        log(f"  {stage} failed: {e}")
        return CellOutcome(report)
    finally:
        report.wall_s = time.perf_counter() - start


def run_cells(
    cells: list[Cell],
    spec: MatrixSpec,
    paths: FactoryPaths,
    options: RunOptions,
    log: Log,
    runner: CellRunner | None = None,
) -> list[CellReport]:
    """Every cell through `runner` (default: run_cell on this machine), then publish."""
    check_disk([paths.work, paths.out])
    run_one = runner or (lambda cell: run_cell(cell, spec, paths, options, log))
    outcomes: list[CellOutcome] = []
    stopped_by = ""
    for i, cell in enumerate(cells, 1):
        if stopped_by:
            note = f"not run: {stopped_by} failed and --fail-fast stops at the first failure"
            skipped = CellReport(cell=cell.id, status=CellStatus.SKIPPED, note=note)
            outcomes.append(CellOutcome(skipped))
            continue
        log(
            f"[{i}/{len(cells)}] {cell.id} (kernels {cell.kernels.name}: "
            f"archs {';'.join(cell.kernels.archs)})"
        )
        outcome = run_one(cell)
        outcomes.append(outcome)
        if options.fail_fast and outcome.failed:
            stopped_by = cell.id
            rest = len(cells) - i
            if rest:
                log(f"fail-fast: {cell.id} failed; skipping the {rest} cell(s) after it")
    candidates = [o.candidate for o in outcomes if o.candidate is not None]
    if candidates and options.publish:
        try:
            entries = publish(paths.out, candidates)
        except FactoryError as e:  # nothing was published (publish is all or nothing)
            log(f"publish failed: {e}")
            for o in outcomes:
                if o.candidate is not None:
                    o.report.fail("publish", str(e).splitlines()[0])
            return [o.report for o in outcomes]
        log(
            f"publish: {len(candidates)} wheel(s) into {paths.tree} "
            f"({len(entries)} in the tree); pages: {paths.tree / 'index.html'}"
        )
        for o in outcomes:
            if o.candidate is not None:
                o.report.status = CellStatus.PUBLISHED
    return [o.report for o in outcomes]
