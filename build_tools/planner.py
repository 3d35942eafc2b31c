"""How many nvcc processes (jobs) and nvcc threads per process to run at once.

The memory model: one nvcc thread (one arch of one object being compiled by
cicc/ptxas) peaks at about `mem_per_thread` bytes. A slot is one CPU and one
such share of memory; jobs x threads never exceeds the slots unless the user
asked for more with MAX_JOBS / NVCC_THREADS.
"""

from __future__ import annotations

from dataclasses import dataclass

from .resources import GIB, Resources, gib


@dataclass(frozen=True)
class BuildPlan:
    jobs: int
    nvcc_threads: int
    reason: str
    warning: str = ""

    def describe(self) -> str:
        threads = "thread" if self.nvcc_threads == 1 else "threads"
        jobs = "job" if self.jobs == 1 else "jobs"
        return f"{self.jobs} {jobs} x {self.nvcc_threads} nvcc {threads}: {self.reason}"


def plan_build(
    n_objects: int,
    n_archs: int,
    resources: Resources,
    mem_per_thread_bytes: int,
    max_jobs: int | None = None,
    nvcc_threads: int | None = None,
) -> BuildPlan:
    """Fill the slots with whole objects first (jobs), then with archs (threads)."""
    n_objects = max(1, n_objects)
    n_archs = max(1, n_archs)
    mem_slots = max(1, resources.mem_available_bytes // max(1, mem_per_thread_bytes))
    slots = max(1, min(resources.cpus, mem_slots))
    basis = (
        f"{gib(resources.mem_available_bytes)} available ({resources.mem_reason}) / "
        f"{gib(mem_per_thread_bytes)} per nvcc thread = {mem_slots} slots; "
        f"{resources.cpu_reason}; {n_objects} object{'s' if n_objects != 1 else ''} to compile"
    )
    if max_jobs is not None and nvcc_threads is not None:
        jobs, threads = max_jobs, nvcc_threads
        reason = "MAX_JOBS and NVCC_THREADS given"
    elif max_jobs is not None:
        jobs = max_jobs
        threads = max(1, min(n_archs, slots // jobs))
        reason = f"MAX_JOBS given; threads from {basis}"
    elif nvcc_threads is not None:
        threads = nvcc_threads
        jobs = max(1, min(n_objects, slots // threads))
        reason = f"NVCC_THREADS given; jobs from {basis}"
    else:
        jobs = min(slots, n_objects)
        threads = max(1, min(n_archs, slots // jobs))
        reason = basis
    warning = ""
    need = jobs * threads * mem_per_thread_bytes
    if need > resources.mem_available_bytes:
        warning = (
            f"{jobs} jobs x {threads} threads may need {gib(need)}, more than the "
            f"{gib(resources.mem_available_bytes)} available: compiles may be killed for memory"
        )
    return BuildPlan(jobs, threads, reason, warning)


def gib_to_bytes(value: float) -> int:
    return int(value * GIB)
