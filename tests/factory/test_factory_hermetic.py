"""The hermetic toolchain installs from the index the factory names and from nothing else:
the machine's pip and uv configuration (PIP_*/UV_* variables, a pip.conf, a constraints
file, find-links, PYTHONPATH) is set up to lie here, and must change nothing. A torch
that is not the cell's CUDA build stops the cell."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from scripts.factory import provision as provision_mod
from scripts.factory.errors import FactoryError
from scripts.factory.installer import (
    INSTALLER_VARIABLE,
    Installer,
    PackageIndex,
    find_uv,
    hermetic_env,
    select_installer,
)
from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.probe import PythonFacts
from scripts.factory.provision import (
    cuda_build_mismatch,
    find_or_fetch_cuobjdump,
    hermetic_venv_name,
    provision_hermetic,
    toolchain_index,
    toolchain_requirements,
)
from scripts.factory.wheelfile import record_hash

SPEC = load_spec()
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
CELL = select_cells(
    f"torch=2.14 cuda=13.0 python={PY} binding=classic",
    SPEC,
    LocalFacts(PY, "2.14", None, True, "13.0"),
)[0]
STABLE = select_cells(f"torch=2.14 cuda=13.0 python={PY}", SPEC, LocalFacts(PY))[0]
TOY = "factorytoy"


def toy_wheel(out: Path, version: str) -> Path:
    """A pure-Python wheel of `factorytoy` that says which copy it is."""
    info = f"{TOY}-{version}.dist-info"
    files = {
        f"{TOY}.py": f"VERSION = {version!r}\n".encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {TOY}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{p},{record_hash(d)},{len(d)}\n" for p, d in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{TOY}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def simple_index(root: Path, version: str) -> str:
    """A PEP 503 index on disk holding one version of factorytoy; its file:// url."""
    wheel = toy_wheel(root / "files", version)
    page = root / "simple" / TOY / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<a href="../../files/{wheel.name}">{wheel.name}</a>\n')
    return (root / "simple").as_uri()


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The machine's configuration, all of it pointing at factorytoy 6.6.6; returns the
    url of the index the factory names (which has 1.0 only)."""
    bad = tmp_path / "bad"
    bad_url = simple_index(bad / "index", "6.6.6")
    links = bad / "links"
    toy_wheel(links, "6.6.6")
    constraints = bad / "constraints.txt"
    constraints.write_text(f"{TOY}==6.6.6\n")
    conf = bad / "pip.conf"
    conf.write_text(
        f"[global]\nfind-links = {links}\nextra-index-url = {bad_url}\nconstraint = {constraints}\n"
    )
    shadow = bad / "pythonpath"  # pip would call factorytoy installed and install nothing
    (shadow / f"{TOY}-6.6.6.dist-info").mkdir(parents=True)
    (shadow / f"{TOY}-6.6.6.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {TOY}\nVersion: 6.6.6\n"
    )
    (shadow / f"{TOY}.py").write_text("VERSION = 'PYTHONPATH'\n")
    uv_conf = bad / "uv.toml"
    uv_conf.write_text(f'find-links = ["{links}"]\nconstraint-dependencies = ["{TOY}==6.6.6"]\n')
    for name, value in {
        "PIP_CONFIG_FILE": str(conf),
        "PIP_FIND_LINKS": str(links),
        "PIP_EXTRA_INDEX_URL": bad_url,
        "PIP_INDEX_URL": bad_url,
        "PIP_CONSTRAINT": str(constraints),
        "PIP_PRE": "1",
        "UV_CONFIG_FILE": str(uv_conf),
        "UV_FIND_LINKS": str(links),
        "UV_INDEX_URL": bad_url,
        "UV_DEFAULT_INDEX": bad_url,
        "UV_EXTRA_INDEX_URL": bad_url,
        "UV_CONSTRAINT": str(constraints),
        "PYTHONPATH": str(shadow),
    }.items():
        monkeypatch.setenv(name, value)
    return simple_index(tmp_path / "good", "1.0")


def test_hermetic_env_keeps_transport_and_drops_what_chooses_packages() -> None:
    env = hermetic_env(
        {
            "PIP_FIND_LINKS": "/opt/wheels",
            "PIP_EXTRA_INDEX_URL": "file:///opt/pypi/simple",
            "PIP_CONSTRAINT": "/etc/xdg/pip/constraints.txt",
            "PIP_NO_INDEX": "1",
            "UV_INDEX_URL": "x",
            "UV_FIND_LINKS": "x",
            "PYTHONPATH": "/x",
            "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
            "UV_CACHE_DIR": "/cache/uv",
            "PATH": "/usr/bin",
        }
    )
    assert env["PIP_CONFIG_FILE"] == "/dev/null"  # pip reads no pip.conf at all
    assert env["PIP_CERT"] == "/etc/ssl/certs/ca-certificates.crt"
    assert env["UV_CACHE_DIR"] == "/cache/uv" and env["PATH"] == "/usr/bin"
    for gone in (
        "PIP_FIND_LINKS",
        "PIP_EXTRA_INDEX_URL",
        "PIP_CONSTRAINT",
        "PIP_NO_INDEX",
        "UV_INDEX_URL",
        "UV_FIND_LINKS",
        "PYTHONPATH",
    ):
        assert gone not in env


INSTALLERS = [
    "pip",
    pytest.param(
        "uv",
        marks=pytest.mark.skipif(
            find_uv() is None, reason="uv is not installed (python3 -m pip install uv)"
        ),
    ),
]


@pytest.mark.parametrize("kind", INSTALLERS)
def test_hostile_pip_and_uv_configuration_is_ignored(
    kind: str, hostile: str, tmp_path: Path
) -> None:
    installer = Installer(kind, find_uv() or "")
    venv = tmp_path / "venv"
    log = tmp_path / "install.log"
    base = getattr(sys, "_base_executable", sys.executable)
    installer.make_venv(base, venv, log)
    py = str(venv / "bin" / "python")
    installer.install(py, [TOY], PackageIndex(hostile), log)
    done = subprocess.run(  # -I: what the venv holds, whatever PYTHONPATH says
        [
            py,
            "-I",
            "-c",
            f"import {TOY}, importlib.metadata as m; print({TOY}.VERSION, "
            f"m.version({TOY!r}), {TOY}.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    module_version, dist_version, where = done.stdout.split()
    assert (module_version, dist_version) == ("1.0", "1.0"), log.read_text()
    assert where.startswith(str(venv))


def test_installer_choice_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FactoryError, match="'conda' is not an installer; valid: uv, pip"):
        select_installer({INSTALLER_VARIABLE: "conda"})
    assert select_installer({INSTALLER_VARIABLE: "pip"}).kind == "pip"
    if find_uv() is not None:
        assert select_installer({}).kind == "uv"


def facts(torch: str, cuda: str | None, requires: tuple[str, ...] = ()) -> PythonFacts:
    return PythonFacts(PY, "/venv/bin/python", torch, cuda, True, requires, torch_dist=torch)


def test_a_torch_of_another_cuda_build_is_named_for_what_it_is() -> None:
    good = facts("2.14.1+cu130", "13.0", ("cuda-toolkit[cudart]==13.0.3; sys_platform == 'linux'",))
    assert cuda_build_mismatch(CELL, good) == []
    assert cuda_build_mismatch(CELL, facts("2.14.1", "13.0")) == []  # PyPI's: no label
    cpu = cuda_build_mismatch(CELL, facts("2.14.1+cpu", None))
    assert cpu == ["torch.version.cuda is None (a CPU build)", "its version label is +cpu"]
    other = cuda_build_mismatch(
        CELL, facts("2.14.1+cu132", "13.2", ("cuda-toolkit[cudart]==13.2.2; extra == 'x'",))
    )
    assert other == [
        "torch.version.cuda is 13.2",
        "its version label is +cu132",
        "it requires cuda-toolkit[cudart]==13.2.2",
    ]


def _cached_toolchain(root: Path) -> Path:
    """A toolchain venv the factory made earlier (its marker matches), so provisioning
    goes straight to checking what is in it."""
    venv = root / hermetic_venv_name(CELL)
    venv.mkdir(parents=True)
    recipe = {
        "requirements": toolchain_requirements(CELL, SPEC),
        "index": toolchain_index(CELL, SPEC).describe(),
    }
    (venv / "factory-toolchain.json").write_text(json.dumps(recipe))
    return venv


def test_a_cpu_torch_in_a_cuda_cell_stops_the_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cached_toolchain(tmp_path)
    monkeypatch.setattr(
        provision_mod, "probe_python", lambda exe, env=None: facts("2.14.1+cpu", None)
    )
    with pytest.raises(FactoryError) as e:
        provision_hermetic(CELL, SPEC, tmp_path)
    text = str(e.value)
    assert f"torch 2.14.1+cpu from {toolchain_index(CELL, SPEC).describe()}" in text
    assert "is not a CUDA 13.0 build: torch.version.cuda is None (a CPU build)" in text
    assert "FLASH_ATTN_PACKAGE_INDEX" in text


def test_a_stable_cell_takes_any_cuda_build_of_its_torch_but_not_a_cpu_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stable module calls torch's C shims only: the index's CUDA 12.8 build of the
    floor torch builds the cu13 wheel (with a note); a CPU torch still stops the cell."""
    venv = tmp_path / hermetic_venv_name(STABLE)
    venv.mkdir(parents=True)
    recipe = {
        "requirements": toolchain_requirements(STABLE, SPEC),
        "index": toolchain_index(STABLE, SPEC).describe(),
    }
    (venv / "factory-toolchain.json").write_text(json.dumps(recipe))
    assert toolchain_index(STABLE, SPEC).describe() == toolchain_index(CELL, SPEC).describe()
    monkeypatch.setattr(
        provision_mod, "probe_python", lambda exe, env=None: facts("2.10.0", "12.8")
    )
    monkeypatch.setattr(provision_mod, "find_pip_cuda_home", lambda python: tmp_path / "cuda")
    monkeypatch.setattr(provision_mod, "nvcc_version", lambda home=None: "13.0")
    toolchain = provision_hermetic(STABLE, SPEC, tmp_path)
    assert any("stable cell" in n and "12.8" in n for n in toolchain.notes), toolchain.notes
    monkeypatch.setattr(
        provision_mod, "probe_python", lambda exe, env=None: facts("2.10.0+cpu", None)
    )
    with pytest.raises(FactoryError, match="a CPU build"):
        provision_hermetic(STABLE, SPEC, tmp_path)


def test_a_changed_recipe_or_index_remakes_the_toolchain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = _cached_toolchain(tmp_path)
    made: list[str] = []

    class Recorder(Installer):
        def make_venv(self, base_python: str, venv: Path, log: Path) -> None:
            made.append(str(venv))
            raise FactoryError("stop here")

    monkeypatch.setenv("FLASH_ATTN_PACKAGE_INDEX", "https://mirror.example/simple")
    with pytest.raises(FactoryError, match="stop here"):
        provision_hermetic(CELL, SPEC, tmp_path, installer=Recorder("pip"))
    assert made == [str(venv)]
    log = tmp_path / f"{venv.name}.provision.log"
    assert "https://mirror.example/simple" in log.read_text()


def test_cuobjdump_is_found_or_installed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provision_mod, "cuda_tool", lambda name, env, search=(): None)
    calls: list[list[str]] = []

    class Fake(Installer):
        def install_target(
            self,
            python: str,
            requirements: Sequence[str],
            target: Path,
            index: PackageIndex,
            log: Path,
        ) -> None:
            calls.append(list(requirements))
            if self.kind == "pip":
                raise FactoryError("no network")
            exe = target / "nvidia" / "cu13" / "bin" / "cuobjdump"
            exe.parent.mkdir(parents=True)
            exe.write_text("")

    monkeypatch.setattr(provision_mod, "select_installer", lambda: Fake("pip"))
    path, note = find_or_fetch_cuobjdump(CELL, sys.executable, tmp_path / "a")
    assert path == "" and "no network" in note and "delete" in note
    assert find_or_fetch_cuobjdump(CELL, sys.executable, tmp_path / "a")[0] == ""
    assert len(calls) == 1  # a failure is remembered: no second attempt per cell
    assert calls[0] == ["nvidia-cuda-cuobjdump>=13.2,<14"]
    monkeypatch.setattr(provision_mod, "select_installer", lambda: Fake("uv"))
    path, note = find_or_fetch_cuobjdump(CELL, sys.executable, tmp_path / "b")
    assert path.endswith("nvidia/cu13/bin/cuobjdump") and "nvidia-cuda-cuobjdump" in note
    cu12 = select_cells(
        "torch=2.8 cuda=12.8 python=3.11", SPEC, LocalFacts(PY, None, None, True, None)
    )[0]
    path, note = find_or_fetch_cuobjdump(cu12, sys.executable, tmp_path / "c")
    assert path == "" and "no pip package of it for CUDA 12.8" in note
