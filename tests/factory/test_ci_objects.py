"""Kernel objects in CI: cache keys made of the factory's object keys, and a compile step
that stops at its time budget, keeps what it finished and resumes from it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from build_tools.kernels import cached_state
from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.objects import PARTIAL, kernel_groups, object_cache_key
from scripts.factory.probe import nvcc_version
from scripts.factory.stage import stage_sources

REPO = Path(__file__).resolve().parents[2]
SPEC = load_spec()
LOCAL = LocalFacts("3.11")

needs_nvcc = pytest.mark.skipif(nvcc_version() is None, reason="no nvcc: keys name the compiler")


def cell(selection: str):  # type: ignore[no-untyped-def]
    return select_cells(selection, SPEC, LOCAL)[0]


def test_kernel_groups_split_by_cuda_and_kernel_set() -> None:
    cells = select_cells("release", SPEC, LOCAL)
    groups = kernel_groups(cells)
    assert len(groups) == len({c.cuda for c in cells})  # release: one kernel set
    assert sorted(c.id for g in groups for c in g.cells) == sorted(c.id for c in cells)
    for g in groups:
        assert {c.cuda for c in g.cells} == {g.cuda}
        assert g.to_matrix_entry()["matrix"] == g.first.selection()


def test_a_kernel_job_provisions_the_groups_cheapest_toolchain() -> None:
    """Any cell of a group makes its objects; the kernel job builds with one whose torch
    is the package index's own build (not PyTorch's per-CUDA index) and whose CPython is
    the recipe's build CPython, where the group has one."""
    cells = select_cells("release", SPEC, LOCAL)
    plain = {g.name: g for g in kernel_groups(cells)}
    build_py = SPEC.stable.build_python

    def on_index(c) -> bool:  # type: ignore[no-untyped-def]
        return c.stable or c.cuda == SPEC.torch[c.torch].index_cuda

    chosen = kernel_groups(cells, SPEC)
    assert [g.name for g in chosen] == list(plain)
    for g in chosen:
        assert sorted(c.id for c in g.cells) == sorted(c.id for c in plain[g.name].cells)
        best = [c for c in g.cells if on_index(c) and c.python == build_py]
        if best:
            assert on_index(g.first) and g.first.python == build_py, (g.name, g.first.id)
        elif any(on_index(c) for c in g.cells):
            assert on_index(g.first), (g.name, g.first.id)
    # the release preset's first cells are CPython 3.9 builds, some of them off the index
    assert any(not on_index(g.first) or g.first.python != build_py for g in plain.values())
    assert any(on_index(g.first) and g.first.python == build_py for g in chosen)


@needs_nvcc
def test_cells_sharing_kernels_share_a_key_and_others_do_not(tmp_path: Path) -> None:
    def key(selection: str):  # type: ignore[no-untyped-def]
        c = cell(selection)
        return object_cache_key(c, stage_sources(REPO, tmp_path / c.id), tmp_path / "cache")

    a = key("ci torch=2.13 python=3.11")
    b = key("ci torch=2.14 python=3.12")
    other_archs = key("ci torch=2.13 python=3.11 archs=80+90")
    assert a == b  # torch and python do not touch kernel objects
    assert a.objects == 10 and other_archs.objects == 10
    assert other_archs.key != a.key
    assert not other_archs.key.startswith(a.restore_keys[-1])
    assert a.restore_keys == (a.key + PARTIAL, a.restore_keys[-1])
    assert a.key.startswith(a.restore_keys[-1])
    lines = a.github_output().splitlines()
    assert lines[0] == f"key={a.key}" and "restore-keys<<FLASH_ATTN_EOF" in lines
    assert lines[lines.index("restore-keys<<FLASH_ATTN_EOF") + 1] == a.key + PARTIAL


@needs_nvcc
def test_a_changed_kernel_header_changes_the_key_not_the_restore_prefix(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO / "csrc", src / "csrc")
    c = cell("ci torch=2.13 python=3.11")
    before = object_cache_key(c, src, tmp_path / "cache")
    header = sorted((src / "csrc" / "kernels").glob("*.h"))[0]
    header.write_text(header.read_text() + "\n// a change\n")
    after = object_cache_key(c, src, tmp_path / "cache")
    assert after.key != before.key
    assert after.restore_keys[-1] == before.restore_keys[-1]


def fake_docker(bin_dir: Path) -> None:
    """`docker run [flags] IMAGE CMD...` runs CMD here, with the -e K=V it was given."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "docker"
    script.write_text(
        "#!/usr/bin/env bash\n"
        '[ "$1" = run ] || exit 64\n'
        "shift\n"
        "while [ $# -gt 0 ]; do\n"
        '  case "$1" in\n'
        "    --rm|--init) shift ;;\n"
        "    -v|-w) shift 2 ;;\n"
        '    -e) case "$2" in *=*) export "${2?}" ;; esac; shift 2 ;;\n'
        "    *) break ;;\n"
        "  esac\n"
        "done\n"
        "shift\n"  # the image
        'exec "$@"\n'
    )
    script.chmod(0o755)


def compile_step(tmp_path: Path, budget_min: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
        + os.environ["PATH"],
        "BUILDER_IMAGE": "builder:test",
        "SELECTION": "ci torch=2.13 python=3.11 archs=80+90",
        "COMPILE_BUDGET_MIN": budget_min,
        "FLASH_ATTN_OBJECT_CACHE": str(tmp_path / "cache"),
    }
    return subprocess.run(
        ["bash", "ci/compile.sh", "objects"], cwd=REPO, env=env, capture_output=True, text=True
    )


def _objects(cache: Path) -> list[Path]:
    kept = sorted(cache.glob("*.o")) if cache.is_dir() else []
    return [p for p in kept if not p.name.startswith(".")]


@needs_nvcc
def test_compile_stops_at_its_budget_keeps_objects_and_a_rerun_resumes(tmp_path: Path) -> None:
    fake_docker(tmp_path / "bin")
    # A budget of about a second stops the step while compiles run (an object takes
    # several seconds): exit 124, the resume hint, and never half an object.
    first = compile_step(tmp_path, "0.02")
    assert first.returncode == 124, first.stdout + first.stderr
    assert "re-run this job to resume" in first.stdout
    cache = tmp_path / "cache"
    partial = [p for p in cache.glob("*.o") if p.name.endswith(".tmp.o")] if cache.is_dir() else []
    assert not partial
    kept = _objects(cache)
    assert all(cached_state(p) == "ok" for p in kept)

    second = compile_step(tmp_path, "10")
    assert second.returncode == 0, second.stdout + second.stderr
    m = re.search(r"kernels: 10 objects, (\d+) compiled, (\d+) reused", second.stdout)
    assert m, second.stdout
    assert (int(m.group(1)), int(m.group(2))) == (10 - len(kept), len(kept))
    assert len(_objects(cache)) == 10

    # An interrupted job's cache holds only some objects: the rerun compiles the rest.
    for obj in _objects(cache)[:3]:
        obj.unlink()
    third = compile_step(tmp_path, "10")
    assert third.returncode == 0, third.stdout + third.stderr
    m = re.search(r"kernels: 10 objects, (\d+) compiled, (\d+) reused", third.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (3, 7), third.stdout
    assert len(_objects(cache)) == 10


def test_compile_step_rejects_an_unknown_mode() -> None:
    done = subprocess.run(
        ["bash", "ci/compile.sh", "everything"],
        cwd=REPO,
        env={**os.environ, "SELECTION": "ci"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "valid: objects, cell" in done.stderr
