"""Compile every kernel translation unit with nvcc into the object cache.

Sources: the hand-written csrc/kernels/*.cu plus the files that
csrc/kernels/generate.py writes for the chosen head dims, dtypes and
directions. Each becomes <cache>/<stem>-<key>.o; an object whose key exists is
reused, so re-running compiles nothing unchanged and an interrupted build
resumes where it stopped. Figures per object go to a JSON report.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cache import (
    atomic_write_text,
    cache_key,
    remove_stale_temps,
    temp_object_path,
)
from .knobs import BuildKnobs
from .memory import LEDGER_NAME, MemoryModel, admits
from .planner import BuildPlan, gib_to_bytes, plan_build
from .resources import Resources, probe_resources, size
from .toolchain import CudaToolchain, RunResult, nvcc_flags, run_measured

Log = Callable[[str], None]


class KernelBuildError(RuntimeError):
    """A kernel object failed to compile."""


@dataclass(frozen=True)
class KernelLayout:
    """Where things are: sources in, generated sources, objects and report out."""

    repo_root: Path
    kernels_dir: Path
    generated_dir: Path
    cache_dir: Path
    report_path: Path

    @classmethod
    def standard(cls, repo_root: Path, cache_dir: Path | None = None) -> KernelLayout:
        build = repo_root / "build"
        return cls(
            repo_root=repo_root,
            kernels_dir=repo_root / "csrc" / "kernels",
            generated_dir=build / "generated",
            cache_dir=cache_dir if cache_dir is not None else build / "kernels",
            report_path=build / "kernel_build_times.json",
        )

    @property
    def link_manifest(self) -> Path:
        """The object list the extension is linked from (setup.py), in this checkout's
        build directory next to the report, wherever the object cache is: a shared cache
        (FLASH_ATTN_OBJECT_CACHE) holds objects, never one checkout's files."""
        return self.report_path.parent / "kernel_objects.txt"

    def display(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.repo_root.resolve()).as_posix()
        except ValueError:
            return str(path)


@dataclass
class ObjectRecord:
    source: str
    object: str
    key: str
    status: str  # "compiled", "reused" or "failed"
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    nvcc_threads: int | None = None
    compiled_at: str | None = None


@dataclass
class KernelBuildReport:
    nvcc_version: str
    archs: list[str]
    knobs: str
    plan: str
    wall_s: float = 0.0
    objects: list[ObjectRecord] = field(default_factory=list)

    def summary(self) -> str:
        compiled = [o for o in self.objects if o.status == "compiled"]
        reused = [o for o in self.objects if o.status == "reused"]
        line = (
            f"kernels: {len(self.objects)} objects, {len(compiled)} compiled, "
            f"{len(reused)} reused; wall {self.wall_s:.1f} s"
        )
        if compiled:
            worst = max(compiled, key=lambda o: o.peak_rss_bytes or 0)
            cpu = sum(o.wall_s or 0.0 for o in compiled)
            line += (
                f" (sum over objects {cpu:.1f} s); max peak RSS "
                f"{size(worst.peak_rss_bytes or 0)} ({Path(worst.source).name})"
            )
        return line


def generate_sources(
    layout: KernelLayout, knobs: BuildKnobs, python: str = sys.executable
) -> list[Path]:
    """Run the generator; it rewrites only what changed and removes stale files."""
    generator = layout.kernels_dir / "generate.py"
    cmd = [
        python,
        str(generator),
        "--out",
        str(layout.generated_dir),
        "--head-dims",
        ",".join(map(str, knobs.head_dims)),
        "--dtypes",
        ",".join(knobs.dtypes),
        "--backward",
        "1" if knobs.backward else "0",
        "--archs",
        ";".join(knobs.archs),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KernelBuildError(
            f"the kernel generator failed (exit {done.returncode}): {' '.join(cmd)}\n"
            f"{done.stdout}{done.stderr}"
        )
    return sorted(layout.generated_dir.glob("*.cu"))


def kernel_sources(layout: KernelLayout, generated: Sequence[Path]) -> list[Path]:
    handwritten = sorted(layout.kernels_dir.glob("*.cu"))
    if not handwritten and not generated:
        raise KernelBuildError(f"no kernel sources: {layout.kernels_dir}/*.cu is empty")
    return handwritten + sorted(generated)


_COST_RE = re.compile(r"(fwd|bwd)_hdim(\d+)")


def _expected_cost(source: Path) -> tuple[int, int]:
    """Start the costly objects first so the last ones do not run alone."""
    m = _COST_RE.search(source.stem)
    if m is None:
        return (0, 0)
    return (2 if m.group(1) == "bwd" else 1, int(m.group(2)))


def _looks_interrupted(result: RunResult) -> bool:
    """Ctrl-C reaches nvcc's children too; nvcc then reports the signal."""
    return result.returncode in (-2, 130) or "died due to signal 2" in result.output


def _looks_killed_for_memory(result: RunResult) -> bool:
    if result.returncode in (-9, 137):
        return True
    text = result.output.lower()
    return "killed" in text or "out of memory" in text or "cannot allocate memory" in text


@dataclass(frozen=True)
class _Job:
    source: Path
    obj: Path
    key: str


def _sidecar(obj: Path) -> Path:
    return obj.with_suffix(".json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_state(obj: Path) -> str:
    """'ok', 'missing', or 'corrupt' (an object whose bytes differ from its sidecar's sum).

    Entries written before sums were recorded (no "sha256") are trusted as before."""
    if not obj.is_file() or obj.stat().st_size == 0:
        return "missing"
    try:
        expected = json.loads(_sidecar(obj).read_text()).get("sha256", "")
    except (OSError, ValueError, AttributeError):
        return "corrupt"  # the sidecar is written before the object appears
    return "ok" if expected in ("", _sha256(obj)) else "corrupt"


class KernelBuilder:
    """One build of the kernel objects: plan, compile what is missing, report."""

    def __init__(
        self,
        layout: KernelLayout,
        knobs: BuildKnobs,
        toolchain: CudaToolchain,
        log: Log | None = None,
        probe: Callable[[], Resources] = probe_resources,
    ) -> None:
        self.layout = layout
        self.knobs = knobs
        self.toolchain = toolchain
        self.log: Log = log or (lambda s: print(s, flush=True))
        self.probe = probe
        self.free_memory: Callable[[], int] = lambda: self.probe().mem_available_bytes
        self.memory = MemoryModel.load(
            layout.cache_dir / LEDGER_NAME, gib_to_bytes(knobs.mem_per_thread_gib)
        )
        self.include_dirs = [layout.kernels_dir.resolve(), layout.generated_dir.resolve()]
        self.flags = nvcc_flags(knobs.archs, self.include_dirs, knobs.extra_nvcc_flags)

    def command(self, job: _Job, out: Path, threads: int) -> list[str]:
        return [
            str(self.toolchain.nvcc),
            "-c",
            str(job.source.resolve()),
            "-o",
            str(out),
            *self.flags,
            "--threads",
            str(threads),
        ]

    def jobs_for(self, sources: Sequence[Path]) -> list[_Job]:
        jobs = []
        for source in sources:
            key = cache_key(
                source, self.include_dirs, self.flags, self.toolchain.compiler_id, self.knobs.archs
            )
            jobs.append(_Job(source, self.layout.cache_dir / f"{source.stem}-{key[:24]}.o", key))
        return jobs

    def build(self) -> list[Path]:
        start = time.perf_counter()
        generated = generate_sources(self.layout, self.knobs)
        jobs = self.jobs_for(kernel_sources(self.layout, generated))
        self.layout.cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.layout.cache_dir)
        missing = []
        for job in jobs:
            state = cached_state(job.obj)
            if state == "corrupt":
                self.log(
                    f"kernels: cached {self.layout.display(job.obj)} does not match its "
                    "checksum; compiling it again"
                )
            if state != "ok":
                missing.append(job)
        missing.sort(key=lambda j: _expected_cost(j.source), reverse=True)

        self.log(
            f"kernels: nvcc {self.toolchain.nvcc_version} ({self.toolchain.cuda_home}); "
            f"{self.knobs.describe()}"
        )
        plan: BuildPlan | None = None
        if missing:
            plan = plan_build(
                n_objects=len(missing),
                n_archs=len(self.knobs.archs),
                resources=self.probe(),
                # the model admission control uses: learned peaks, the default for the rest
                mem_per_thread_bytes=max(
                    self.memory.expected_bytes(j.source.stem, 1) for j in missing
                ),
                max_jobs=self.knobs.max_jobs,
                nvcc_threads=self.knobs.nvcc_threads,
            )
            self.log(f"kernels: {plan.describe()}")
            if not self.knobs.admission:
                self.log("kernels: admission control off (FLASH_ATTN_ADMISSION=0)")
            if plan.warning:
                self.log(f"kernels: warning: {plan.warning}")
        report = KernelBuildReport(
            nvcc_version=self.toolchain.nvcc_version,
            archs=list(self.knobs.archs),
            knobs=self.knobs.describe(),
            plan=plan.describe() if plan else "nothing to compile",
        )
        records: dict[Path, ObjectRecord] = {}
        for job in jobs:
            if job not in missing:
                records[job.obj] = self._reused(job)
        failures: list[tuple[_Job, RunResult]] = []
        if plan is not None:
            failures, killed = self._compile_all(missing, plan, records)
            if killed:
                self.log(
                    f"kernels: {len(killed)} compile(s) look killed for memory; "
                    "retrying them one at a time with 1 nvcc thread"
                )
                alone = BuildPlan(1, 1, "retry after out-of-memory")
                still_failed, still_killed = self._compile_all(killed, alone, records)
                failures += still_failed + [
                    (j, RunResult(-9, 0.0, 0, "killed for memory")) for j in still_killed
                ]

        report.objects = [records[j.obj] for j in jobs if j.obj in records]
        report.wall_s = time.perf_counter() - start
        atomic_write_text(
            self.layout.report_path,
            json.dumps({**asdict(report), "summary": report.summary()}, indent=2, sort_keys=False)
            + "\n",
        )
        if failures:
            names = ", ".join(self.layout.display(j.source) for j, _ in failures)
            first_job, _ = failures[0]
            raise KernelBuildError(
                f"{len(failures)} kernel object(s) failed to compile: {names}. "
                f"The compiler output is above; to rerun one by hand:\n  "
                + " ".join(self.command(first_job, first_job.obj, 1))
            )
        self.log(report.summary())
        self.log(f"kernels: figures per object in {self.layout.display(self.layout.report_path)}")
        return [j.obj for j in jobs]

    def _reused(self, job: _Job) -> ObjectRecord:
        record = ObjectRecord(
            source=self.layout.display(job.source),
            object=self.layout.display(job.obj),
            key=job.key,
            status="reused",
        )
        try:
            earlier = json.loads(_sidecar(job.obj).read_text())
            record.wall_s = earlier.get("wall_s")
            record.peak_rss_bytes = earlier.get("peak_rss_bytes")
            record.nvcc_threads = earlier.get("nvcc_threads")
            record.compiled_at = earlier.get("compiled_at")
        except (OSError, ValueError):
            pass
        return record

    def _compile_one(self, job: _Job, threads: int) -> RunResult:
        tmp = temp_object_path(job.obj)
        result = run_measured(self.command(job, tmp, threads))
        if result.returncode == 0 and tmp.is_file():
            figures = {
                "source": self.layout.display(job.source),
                "key": job.key,
                "wall_s": round(result.wall_s, 3),
                "peak_rss_bytes": result.peak_rss_bytes,
                "nvcc_threads": threads,
                "nvcc_version": self.toolchain.nvcc_version,
                "compiled_at": _now(),
                "sha256": _sha256(tmp),
            }
            atomic_write_text(_sidecar(job.obj), json.dumps(figures, indent=2) + "\n")
            tmp.replace(job.obj)  # the object appears whole or not at all
        else:
            tmp.unlink(missing_ok=True)
        return result

    def _compile_all(
        self, todo: list[_Job], plan: BuildPlan, records: dict[Path, ObjectRecord]
    ) -> tuple[list[tuple[_Job, RunResult]], list[_Job]]:
        """Compile `todo`; returns (failures, jobs that look killed for memory).

        A compile error stops new compiles (those running finish and are cached).
        A kill for memory drops the rest of this run to one compile at a time
        with one nvcc thread; the killed job is returned for a retry alone.
        """
        failures: list[tuple[_Job, RunResult]] = []
        killed: list[_Job] = []
        total = len(todo)
        done = 0
        queue = list(todo)
        limit, threads = plan.jobs, plan.nvcc_threads
        with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
            running: dict[Future[RunResult], tuple[_Job, int]] = {}
            try:
                while queue or running:
                    while queue and len(running) < limit and not failures:
                        job = queue[0]
                        need = self.memory.expected_bytes(job.source.stem, threads)
                        expect = self.memory.expected_bytes
                        reserved = sum(expect(j.source.stem, t) for j, t in running.values())
                        free = self.free_memory() if running else 0
                        if self.knobs.admission and not admits(need, free, reserved, len(running)):
                            self.log(
                                f"kernels: holding {self.layout.display(job.source)} (expects "
                                f"{size(need)}): {size(free)} free, {len(running)} running "
                                f"may reach {size(reserved)}"
                            )
                            break
                        queue.pop(0)
                        future = pool.submit(self._compile_one, job, threads)
                        running[future] = (job, threads)
                    if not running:
                        break
                    finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in finished:
                        job, job_threads = running.pop(future)
                        result = future.result()
                        done += 1
                        self._record(job, result, job_threads, records)
                        if result.returncode == 0:
                            self.memory.record(job.source.stem, result.peak_rss_bytes, job_threads)
                            self.memory.save(self.layout.cache_dir / LEDGER_NAME)
                        name = self.layout.display(job.source)
                        figures = f"{result.wall_s:.1f} s, peak RSS {size(result.peak_rss_bytes)}"
                        if result.returncode == 0:
                            self.log(f"[{done}/{total}] compiled {name}: {figures}")
                            if result.output.strip():
                                self.log(_indent(result.output))
                            continue
                        if _looks_interrupted(result):
                            raise KeyboardInterrupt
                        self.log(
                            f"[{done}/{total}] FAILED {name} (exit {result.returncode}, "
                            f"{figures}):\n{_indent(result.output)}"
                        )
                        if _looks_killed_for_memory(result) and (job_threads > 1 or plan.jobs > 1):
                            killed.append(job)
                            limit, threads = 1, 1
                        else:
                            failures.append((job, result))
            except KeyboardInterrupt:
                for future in running:
                    future.cancel()
                raise KernelBuildError(
                    "interrupted; the objects finished so far are cached in "
                    f"{self.layout.display(self.layout.cache_dir)}: run the build again to resume"
                ) from None
        if failures and queue:
            self.log(f"kernels: stopped after a failure; {len(queue)} object(s) not attempted")
        return failures, killed

    def _record(
        self, job: _Job, result: RunResult, threads: int, records: dict[Path, ObjectRecord]
    ) -> None:
        records[job.obj] = ObjectRecord(
            source=self.layout.display(job.source),
            object=self.layout.display(job.obj),
            key=job.key,
            status="compiled" if result.returncode == 0 else "failed",
            wall_s=round(result.wall_s, 3),
            peak_rss_bytes=result.peak_rss_bytes,
            nvcc_threads=threads,
            compiled_at=_now() if result.returncode == 0 else None,
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def build_kernel_objects(
    layout: KernelLayout,
    knobs: BuildKnobs,
    toolchain: CudaToolchain,
    log: Log | None = None,
) -> list[Path]:
    return KernelBuilder(layout, knobs, toolchain, log=log).build()
