"""[tool.cibuildwheel] in pyproject.toml: the identifiers are the factory's cells of the
configured variant, the environment carries the planner's figures (evaluated by
cibuildwheel's own parser), and every hook is a factory stage."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
from factory_wheels import make_wheel

from build_tools.request import BuildRequest
from scripts.factory import cibw, cli
from scripts.factory.cellref import variant_cells
from scripts.factory.errors import FactoryError
from scripts.factory.matrix import load_spec
from scripts.factory.probe import nvcc_version
from scripts.factory.provision import cuda_requirements
from scripts.factory.tag import EXCLUDES
from scripts.factory.wheelfile import read_wheel_info

REPO = Path(__file__).resolve().parents[2]
SPEC = load_spec()
CONFIG: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"][
    "cibuildwheel"
]
VARIANT = CONFIG["environment"]["FLASH_ATTN_MATRIX"]
FACTORY_PYTHON = CONFIG["environment"]["FACTORY_PYTHON"]


def cells():  # type: ignore[no-untyped-def]
    return variant_cells(VARIANT, SPEC)


def test_identifiers_are_the_factory_cells_of_the_variant() -> None:
    exe = shutil.which("cibuildwheel")
    if exe is None:
        pytest.skip("cibuildwheel is not installed (pip install cibuildwheel; see .ci/run)")
    done = subprocess.run(
        [exe, "--print-build-identifiers", "--platform", "linux"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CIBW_")},
    )
    identifiers = done.stdout.split()
    assert identifiers == CONFIG["build"] == cibw.identifiers(VARIANT, SPEC)
    assert len({c.variant for c in cells()}) == 1  # one variant a run


def test_identifiers_of_a_stable_variant_are_one_abi3_build_and_its_tests() -> None:
    """cibuildwheel builds the abi3 wheel at the first identifier and only tests it
    under the rest; a classic variant has one identifier per cell (its CPython)."""
    (stable,) = cells()
    assert stable.stable and stable.wheel_tags == ("cp310", "abi3")
    found = cibw.identifiers(VARIANT, SPEC)
    assert found[0] == f"{stable.abi3_tag}-manylinux_x86_64"
    floor = SPEC.torch[SPEC.stable.abi.torch_floor]
    assert found[-1] == f"cp{floor.python_max.replace('.', '')}-manylinux_x86_64"
    classic = "release torch=2.9 cuda=12.8"
    assert cibw.identifiers(classic, SPEC) == [
        f"{c.python_tag}-manylinux_x86_64" for c in variant_cells(classic, SPEC)
    ]
    with pytest.raises(FactoryError, match="spans variants"):
        cibw.identifiers("release torch=2.9+ cuda=13.0", SPEC)


def test_static_environment_is_the_variant_as_the_factory_builds_it(tmp_path: Path) -> None:
    env = CONFIG["environment"]
    first = cells()[0]
    # what is built comes from the build request alone, which before-all writes
    for knob in (*first.kernels.env(), "FLASH_ATTN_LOCAL_VERSION", "FLASH_ATTN_BINDING"):
        assert knob not in env, knob
    before_all = (REPO / "ci" / "cibw" / "before-all.sh").read_text()
    assert "scripts.factory build-request" in before_all
    assert env["FLASH_ATTN_BUILD_REQUEST"] in before_all
    out = tmp_path / "request.json"
    assert cli.main(["build-request", "--matrix", VARIANT, "--out", str(out)]) == 0
    assert BuildRequest.read(out) == first.request()
    assert (first.request().binding, first.request().local_label) == ("stable", "cu13torchstable")
    assert CONFIG["build-frontend"] == {"name": "pip", "args": ["--no-build-isolation"]}
    m = re.fullmatch(r"/opt/python/cp3(\d+)-cp3\1/bin/python", FACTORY_PYTHON)
    assert m and int(m.group(1)) >= 11  # the factory reads TOML with tomllib


def test_every_hook_is_a_factory_stage() -> None:
    assert "scripts.factory cibw-repair" in CONFIG["repair-wheel-command"]
    assert "scripts.factory smoke-wheel --in-place" in CONFIG["test-command"]
    assert "{wheel}" in CONFIG["test-command"] and "{dest_dir}" in CONFIG["repair-wheel-command"]
    before_all = (REPO / "ci" / "cibw" / "before-all.sh").read_text()
    assert CONFIG["before-all"] == "bash {project}/ci/cibw/before-all.sh"
    assert "scripts.factory cibw-cuda" in before_all and "/opt/flash-attn-cuda" in before_all
    assert CONFIG["environment"]["CUDA_HOME"] == "/opt/flash-attn-cuda/home"
    install = (REPO / "ci" / "cibw" / "install-torch.sh").read_text()
    assert "scripts.factory torch-args" in install
    assert (
        CONFIG["before-build"] == CONFIG["before-test"] == "bash {project}/ci/cibw/install-torch.sh"
    )
    # the repair leaves out what torch brings: its own and CUDA's libraries
    for lib in ("libtorch*.so", "libc10*.so", "libcudart.so*"):
        assert lib in EXCLUDES


@pytest.mark.skipif(nvcc_version() is None, reason="no nvcc: the planner probes the compiler")
def test_environment_evaluates_to_the_planners_figures() -> None:
    options = pytest.importorskip("cibuildwheel.options")
    args = options.CommandLineArguments.defaults()
    args.platform = "linux"
    args.package_dir = REPO
    args.config_file = str(REPO / "pyproject.toml")
    build = options.compute_options("linux", args, env={}).build_options("cp312-manylinux_x86_64")
    ran: list[list[str]] = []

    def here(command: list[str], env: dict[str, str]) -> str:
        """cibuildwheel runs these in the container's /project; this runs them here."""
        command = [sys.executable if c == FACTORY_PYTHON else c for c in command]
        ran.append(command)
        env = {**env, "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    env = build.environment.as_dictionary({"PATH": os.environ["PATH"]}, executor=here)
    planned = cibw.planned_env(VARIANT, SPEC, REPO, REPO / "build" / "kernels")
    assert env["MAX_JOBS"] == planned["MAX_JOBS"] and int(env["MAX_JOBS"]) >= 1
    assert env["NVCC_THREADS"] == planned["NVCC_THREADS"]
    assert len(ran) == 2 and all("cibw-plan-env" in c for c in ran)
    assert env["PATH"].startswith(os.environ["PATH"])  # the build's python stays first


def test_repair_hook_gives_the_factory_wheel(tmp_path: Path) -> None:
    raw = make_wheel(
        tmp_path / "raw",
        version="2.9.0+cu13torchstable",
        tag="cp310-abi3-linux_x86_64",
        requires="torch>=2.10",
    )
    code = cli.main(["cibw-repair", "--matrix", VARIANT, str(raw), str(tmp_path / "out")])
    assert code == 0
    (final,) = (tmp_path / "out").glob("*.whl")
    info = read_wheel_info(final)
    assert info.version == "2.9.0+cu13torchstable"
    assert tuple(r for r in info.requires_dist if "extra ==" not in r) == ("torch>=2.10",)
    assert (info.tags.python, info.tags.abi) == ("cp310", "abi3")
    # a wheel of another variant (a classic label) is refused, nothing written
    other = make_wheel(tmp_path / "other", tag="cp312-cp312-linux_x86_64")
    assert cli.main(["cibw-repair", "--matrix", VARIANT, str(other), str(tmp_path / "no")]) == 2
    # the same bytes as a second repair: the factory's reproducible rewrite
    code = cli.main(["cibw-repair", "--matrix", VARIANT, str(raw), str(tmp_path / "again")])
    (again,) = (tmp_path / "again").glob("*.whl")
    assert again.read_bytes() == final.read_bytes()


def test_before_all_provisions_the_pinned_cuda_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    home = tmp_path / "venv" / "lib" / "site-packages" / "nvidia" / "cu13"

    def fake_run(cmd: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(cibw.subprocess, "run", fake_run)
    monkeypatch.setattr(cibw, "find_pip_cuda_home", lambda python: home)
    link = cibw.provision_pip_cuda("13.0", tmp_path, "/usr/bin/python3")
    assert link == tmp_path / "home" and link.resolve() == home.resolve()
    assert calls[0] == ["/usr/bin/python3", "-m", "venv", str(tmp_path / "venv")]
    assert calls[1][-len(cuda_requirements("13.0")) :] == cuda_requirements("13.0")
