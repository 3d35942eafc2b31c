"""End to end, for real: build one cell (the tiny kernel set, objects from the shared cache),
tag, smoke, publish; rebuild bit-identically; serve the tree over HTTP and pip-install from
it into a fresh venv; plant a wrong-ABI build and watch the smoke gate stop it.

Needs nvcc and an installed torch (CI has both; a torch the matrix table does not know yet
gets its row from its own metadata, as `make wheels` does); about two minutes on a 2-core
machine once the kernel objects are cached. With a torch at or past the stable floor the
cell is a stable one: its smoke gate runs nm and abi3audit on the module here; the
(torch, CPython) pairs of [stable] smoke (a torch download each, minutes) only with
FLASH_ATTN_TEST_STABLE_SMOKE=1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from scripts.factory.build import build_env, source_date_epoch, write_request
from scripts.factory.installer import hermetic_env
from scripts.factory.matrix import Cell, MatrixSpec, load_spec, select_cells, with_installed_torch
from scripts.factory.paths import REPO, FactoryPaths
from scripts.factory.pipeline import RunOptions, run_cell, run_cells
from scripts.factory.probe import local_facts, nvcc_version
from scripts.factory.report import CellReport
from scripts.factory.smoke import inherit_parent_env
from scripts.factory.smoke_stable import extract_extension, symbols_check
from scripts.factory.wheelfile import read_wheel_info


@dataclass
class Built:
    spec: MatrixSpec
    cell: Cell
    paths: FactoryPaths
    report: CellReport
    started: float  # time.time() before the build


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if nvcc_version() is None:
        pytest.skip("no nvcc: the factory's end-to-end test builds a wheel")
    local = local_facts()
    if local.torch is None:
        pytest.skip("no torch installed: the factory's end-to-end test builds against it")
    spec, _ = with_installed_torch(load_spec(), local)
    if os.environ.get("FLASH_ATTN_TEST_STABLE_SMOKE") != "1":
        spec = replace(spec, stable=replace(spec.stable, smoke=()))
    cell = select_cells("local kernels=tiny", spec, local)[0]
    tmp = tmp_path_factory.mktemp("factory")
    paths = replace(FactoryPaths.default(), work=tmp / "work", out=tmp / "dist")
    started = time.time()
    rows = run_cells([cell], spec, paths, RunOptions(), print)
    return Built(spec, cell, paths, rows[0], started)


def _published_wheel(b: Built) -> Path:
    pages = b.paths.tree / b.cell.variant / "simple" / "flash-attn"
    wheels = sorted(pages.glob("*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_one_cell_end_to_end(built: Built) -> None:
    r = built.report
    assert r.status == "published", r.note
    wheel = _published_wheel(built)
    label = built.cell.local_label
    python, abi = built.cell.wheel_tags
    assert wheel.name.startswith(f"flash_attn-2.9.0+{label}-{python}-{abi}-")
    info = read_wheel_info(wheel)
    assert info.version.endswith(f"+{label}")
    # torch is the one requirement without a marker; the rest are pyproject's extras
    plain = tuple(r for r in info.requires_dist if "extra ==" not in r)
    assert plain == (built.cell.requires_torch,), info.requires_dist
    assert r.objects > 0 and r.smoke.startswith("passed")
    smoke_log = (built.paths.cell_dir(built.cell.id) / "smoke.log").read_text()
    for check in ("ops", "input_check", "launch"):
        assert f"check {check}: True" in smoke_log, check
    if built.cell.stable:  # the one module's own proofs ran (the pairs only on request)
        assert "check symbols: True" in smoke_log and "check abi3audit: True" in smoke_log
    manifest = json.loads((built.paths.tree / "manifest.json").read_text())
    assert [w["file"] for w in manifest["wheels"]] == [wheel.name]


def test_a_noop_build_does_not_relink(built: Built) -> None:
    """setup.py build_ext again in the cell's staged sources: nothing compiles and _C.so is
    not linked again; the link manifest is in the checkout, not next to the object cache."""
    src = built.paths.src(built.cell.id)
    request = write_request(built.cell, built.paths.cell_dir(built.cell.id))
    env = build_env(request, None, built.paths.object_cache, source_date_epoch(REPO))
    cmd = [sys.executable, "setup.py", "build_ext"]
    subprocess.run(cmd, cwd=src, env=env, capture_output=True, check=True)  # settle
    modules = sorted(src.glob("build/lib*/flash_attn/_C*.so"))
    assert len(modules) == 1
    before = modules[0].stat().st_mtime_ns
    done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, check=True)
    assert "ninja: no work to do" in done.stdout
    assert " -shared " not in done.stdout, done.stdout
    assert modules[0].stat().st_mtime_ns == before
    assert (src / "build" / "kernel_objects.txt").is_file()
    beside_cache = built.paths.object_cache.parent / "kernel_objects.txt"
    if beside_cache.parent != src / "build" and beside_cache.exists():  # an old build's
        assert beside_cache.stat().st_mtime < built.started


def test_smoke_checks_archs_with_cuobjdump_where_one_was_found(built: Built) -> None:
    record = json.loads((built.paths.cell_dir(built.cell.id) / "cell.json").read_text())
    if not record["toolchain"]["cuobjdump"]:
        pytest.skip(f"no cuobjdump here: {record['toolchain']['notes']}")
    assert "archs" not in built.report.smoke, built.report.smoke  # checked, not skipped


def test_rebuild_is_bit_identical(built: Built, tmp_path: Path) -> None:
    """Even with every kernel object compiled anew (nvcc names its temporary files
    after its pid inside each object; the tag stage strips those names)."""
    first = _published_wheel(built).read_bytes()
    paths = replace(built.paths, object_cache=tmp_path / "cold-cache")
    outcome = run_cell(built.cell, built.spec, paths, RunOptions(publish=False), _quiet)
    assert outcome.report.cache_hits == 0 < outcome.report.objects
    assert outcome.candidate is not None, outcome.report.note
    assert hashlib.sha256(outcome.candidate.wheel.read_bytes()).hexdigest() == hashlib.sha256(
        first
    ).hexdigest()


@pytest.fixture
def server(built: Built) -> Iterator[str]:
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(built.paths.out)
    )
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_pip_installs_from_the_served_index(built: Built, server: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # the interpreter's torch (the cell's) without a download: --system-site-packages,
    # and where pytest runs in a venv, that venv's site-packages (as the smoke stage does).
    # No pip of its own: ensurepip's setuptools would shadow the newer one torch requires.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    py = str(venv / "bin" / "python")
    inherit_parent_env(sys.executable, py, tmp_path / "venv.log")
    url = f"{server}/whl/{built.cell.variant}/simple"
    done = subprocess.run(  # the served index alone: no find-links or constraint of the machine
        [py, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
         "flash-attn", "--index-url", url],
        capture_output=True, text=True, check=False, env=hermetic_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    check = (
        "import importlib.metadata as m, flash_attn, flash_attn._C, torch;"
        "print(m.version('flash-attn'));print(flash_attn._C.__file__);"
        "print(torch.ops.flash_attn.build_info())"
    )
    out = subprocess.run([py, "-I", "-c", check], capture_output=True, text=True,
                         check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    version, ext, info = out.stdout.strip().splitlines()[-3:]
    assert version == f"2.9.0+{built.cell.local_label}"
    assert ext.startswith(str(venv))
    assert json.loads(info)["cuda_archs"] == list(built.cell.kernels.archs)


def test_planted_abi_fault_is_stopped_by_the_smoke_gate(built: Built, tmp_path: Path) -> None:
    """Compile the classic binding with the other C++ ABI than torch's: the gate must
    quarantine it. (The stable binding passes no C++ object across to torch: a C++ ABI
    mismatch cannot show there.) Its module is then the negative of the stable symbol
    check: the classic binding imports torch's C++ API."""
    local = local_facts()
    cell = select_cells("local kernels=tiny binding=classic", built.spec, local)[0]
    header = tmp_path / "wrong_abi.h"
    other = 0 if cell.cxx11abi else 1
    header.write_text(f"#undef _GLIBCXX_USE_CXX11_ABI\n#define _GLIBCXX_USE_CXX11_ABI {other}\n")
    before = (built.paths.tree / "manifest.json").read_bytes()
    paths = replace(built.paths, work=tmp_path / "work")
    options = RunOptions(extra_env={"CFLAGS": f"-include {header}"})
    report = run_cells([cell], built.spec, paths, options, print)[0]
    assert report.status == "quarantined", report
    assert "import" in report.smoke or "cxx11abi" in report.smoke
    held = paths.quarantine / cell.id
    (wheel,) = held.glob("*.whl")
    assert (held / "smoke.log").is_file()
    nm = symbols_check(extract_extension(wheel, tmp_path / "ext"))
    assert nm.ok is False and "non-shim symbols" in nm.detail and "_ZN" in nm.detail, nm
    assert (built.paths.tree / "manifest.json").read_bytes() == before
    shutil.rmtree(paths.work, ignore_errors=True)
