"""Proof of `make wheels ENGINE=podman` on a machine without a container registry.

1. A base image from a Debian rootfs (tools/make_base_image.sh: debootstrap, podman
   import), unless it exists.
2. A wheelhouse on this machine (the factory's `wheelhouse` stage), so the builder image
   is built offline (--network none) from builder.Dockerfile FROM that base.
3. One cell in a container with --memory=6g --cpus=2: the wheel must come out, pass the
   smoke gate and be published, with no OOM kill in the container's cgroup.
4. The planner's worth: the `ci` kernel set with MAX_JOBS=8 under a tight memory limit,
   without admission control (FLASH_ATTN_ADMISSION=0) and with it, each from an empty
   object cache that keeps only the memory ledger of a reference build.

Prints a table (wall time, container peak memory, OOM kills, outcome) and writes
proof.json. Needs root, podman and runc, debootstrap (apt-get install podman runc
debootstrap). On hosts where the runtime may not raise ulimits, set
CONTAINER_ULIMITS (the default here fits this project's 2-core machines).

    python3 tools/container_proof.py [--out DIR] [--ab-memory 4g] [--tight-memory 1g]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "flash-attn-base:bookworm"
CELL = "torch=2.13 python=3.11 cuda=13.0"
LEDGER = "memory_ledger.json"
DEFAULT_ULIMITS = "nofile=20000:20000 nproc=32768:32768"


@dataclass
class RunFigures:
    name: str
    selection: str
    env: dict[str, str]
    rc: int
    status: str
    wall_s: float  # the factory run on the host, image build included
    container_s: float | None
    memory_peak_bytes: int | None
    oom_kills: int | None
    compiles_killed: int  # compiles the builder saw killed for memory (and retried)
    objects_compiled: int
    smoke: str
    wheel: str
    note: str


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 30):.2f} GiB"


def factory_run(
    name: str, selection: str, out: Path, env: dict[str, str], ledger_from: Path | None
) -> RunFigures:
    """One `wheels --engine podman` run in its own work, output and object cache."""
    root = out / name
    if root.exists():
        shutil.rmtree(root)
    cache = root / "cache"
    cache.mkdir(parents=True)
    if ledger_from is not None and (ledger_from / LEDGER).is_file():
        shutil.copy2(ledger_from / LEDGER, cache / LEDGER)
    argv = [
        sys.executable,
        "-m",
        "scripts.factory",
        "--work",
        str(root / "work"),
        "--out",
        str(root / "out"),
        "wheels",
        "--engine",
        "podman",
        "--base-image",
        BASE_IMAGE,
        "--wheelhouse",
        str(out / "wheelhouse"),
        "--offline",
        "--matrix",
        selection,
    ]
    full_env = {**os.environ, "FLASH_ATTN_OBJECT_CACHE": str(cache), **env}
    start = time.perf_counter()
    with (root / "factory.log").open("w") as log:
        done = subprocess.run(
            argv, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    wall = time.perf_counter() - start
    text = (root / "factory.log").read_text(errors="replace")
    cell_dirs = sorted((root / "work" / "engine" / "cells").glob("*"))
    stats: dict[str, object] = {}
    row: dict[str, object] = {}
    build_log = ""
    objects = 0
    if cell_dirs:
        cell = cell_dirs[0]
        try:
            stats = json.loads((cell / "cgroup.json").read_text())
        except (OSError, ValueError):
            stats = {}
        try:
            row = json.loads((cell / "report.json").read_text())[0]
        except (OSError, ValueError, IndexError):
            row = {}
        logs = list(cell.glob("cells/*/build.log"))
        build_log = logs[0].read_text(errors="replace") if logs else ""
        objects = build_log.count("] compiled ")
    container_s = None
    for line in text.splitlines():
        if "container: exit" in line and " after " in line:
            container_s = float(line.split(" after ")[1].split(" s")[0])
    try:
        final = json.loads((root / "work" / "report.json").read_text())[0]
    except (OSError, ValueError, IndexError):
        final = {}
    return RunFigures(
        name=name,
        selection=selection,
        env=env,
        rc=done.returncode,
        status=str(final.get("status", "no report")),
        wall_s=round(wall, 1),
        container_s=container_s,
        memory_peak_bytes=stats.get("memory_peak_bytes"),  # type: ignore[arg-type]
        oom_kills=stats.get("oom_kills"),  # type: ignore[arg-type]
        compiles_killed=_killed_count(build_log),
        objects_compiled=objects,
        smoke=str(row.get("smoke", "")),
        wheel=str(final.get("wheel", "")),
        note=str(final.get("note", ""))[:300],
    )


def _killed_count(build_log: str) -> int:
    """N from the builder's 'kernels: N compile(s) look killed for memory' line."""
    for line in build_log.splitlines():
        if "look killed for memory" in line:
            words = line.split("kernels:")[-1].split()
            if words and words[0].isdigit():
                return int(words[0])
    return 0


def ensure_base_image(rebuild: bool) -> float:
    exists = subprocess.run(["podman", "image", "exists", BASE_IMAGE], check=False).returncode == 0
    if exists and not rebuild:
        return 0.0
    start = time.perf_counter()
    subprocess.run([str(REPO / "tools" / "make_base_image.sh"), BASE_IMAGE], check=True)
    return time.perf_counter() - start


def fill_wheelhouse(out: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.factory",
            "--work",
            str(out / "wheelhouse-work"),
            "wheelhouse",
            "--matrix",
            CELL,
            "--dest",
            str(out / "wheelhouse"),
        ],
        cwd=REPO,
        check=True,
    )


def table(runs: list[RunFigures]) -> str:
    lines = [
        "| run | limits, knobs | outcome | wall (container) | container peak | OOM kills "
        "(cgroup) | compiles retried after a kill |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        knobs = " ".join(f"{k}={v}" for k, v in r.env.items())
        limits = " ".join(t for t in r.selection.split() if t.startswith(("memory", "cpus")))
        container = f"{r.container_s:.1f} s" if r.container_s is not None else "-"
        lines.append(
            f"| {r.name} | {limits} {knobs} | {r.status} | {r.wall_s:.1f} s ({container}) | "
            f"{_gib(r.memory_peak_bytes)} | {r.oom_kills} | {r.compiles_killed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/var/tmp/flash-attn-proof"))
    p.add_argument("--rebuild-base", action="store_true")
    p.add_argument("--ab-memory", default="4g", help="the A/B runs' memory limit")
    p.add_argument(
        "--tight-memory",
        default="",
        help="also run the A/B at this limit (e.g. 1g) if --ab-memory saw no OOM kill",
    )
    p.add_argument("--skip-ab", action="store_true", help="only the one-cell proof")
    args = p.parse_args(argv)
    os.environ.setdefault("CONTAINER_ULIMITS", DEFAULT_ULIMITS)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed: apt-get install podman runc debootstrap")
            return 2

    base_s = ensure_base_image(args.rebuild_base)
    fill_wheelhouse(out)
    runs = [factory_run("proof", f"{CELL} kernels=tiny memory=6g cpus=2", out, {}, None)]
    proof = runs[0]
    ok = proof.status == "published" and proof.smoke.startswith("passed") and proof.oom_kills == 0
    if not args.skip_ab:
        ref = factory_run("reference", f"{CELL} kernels=ci memory=6g cpus=2", out, {}, None)
        runs.append(ref)
        ledger = out / "reference" / "cache"
        limits = [args.ab_memory] + ([args.tight_memory] if args.tight_memory else [])
        for memory in limits:
            selection = f"{CELL} kernels=ci memory={memory} cpus=2"
            for admission in ("0", "1"):
                env = {"MAX_JOBS": "8", "FLASH_ATTN_ADMISSION": admission}
                name = f"jobs8-{memory}-admission{'on' if admission == '1' else 'off'}"
                runs.append(factory_run(name, selection, out, env, ledger))
            if memory == args.ab_memory and runs[-2].oom_kills and not args.tight_memory:
                break
    report = {
        "base_image_s": round(base_s, 1),
        "host": os.uname().nodename,
        "nproc": os.cpu_count(),
        "runs": [asdict(r) for r in runs],
        "proof_ok": ok,
    }
    (out / "proof.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(runs))
    for r in runs:
        print(f"{r.name}: {r.status}; smoke {r.smoke or '-'}; {r.note}")
    print(f"proof: {'PASSED' if ok else 'FAILED'}; figures in {out / 'proof.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
