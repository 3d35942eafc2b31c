"""docker and podman command lines, engine selection, and an engine that is absent or broken."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from container_helpers import REPO, write_exe

from scripts.factory import cli
from scripts.factory.containers import container_run
from scripts.factory.engine import ContainerEngine, ContainerRun, EngineError, ImageBuild, Mount
from scripts.factory.matrix import CellLimits, LocalFacts, load_spec, select_cells
from scripts.factory.paths import FactoryPaths

SPEC = load_spec()
HERE = LocalFacts(python="3.11", torch="2.13", torch_cuda=None, torch_cxx11abi=True, nvcc="13.0")


def _flag(argv: list[str], name: str) -> list[str]:
    """Every value that follows `name` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_docker_run_carries_limits_mounts_env_and_no_network() -> None:
    engine = ContainerEngine("docker")
    run = ContainerRun(
        image="img:tag",
        command=("python3", "-V"),
        mounts=(Mount(Path("/repo"), "/repo", True), Mount(Path("/cache"), "/c", False)),
        env={"MAX_JOBS": "8"},
        limits=CellLimits(6 << 30, 2.0),
        workdir="/repo",
    )
    argv = engine.run_argv(run)
    assert argv[:3] == ["docker", "run", "--rm"]
    assert _flag(argv, "--memory") == ["6g"] and _flag(argv, "--memory-swap") == ["6g"]
    assert _flag(argv, "--cpus") == ["2"]
    assert _flag(argv, "--network") == ["none"]
    assert _flag(argv, "-v") == ["/repo:/repo:ro", "/cache:/c:rw"]
    assert _flag(argv, "-e") == ["MAX_JOBS=8"]
    assert argv[-3:] == ["img:tag", "python3", "-V"]  # image, then the command, last
    assert "--runtime" not in argv and "-it" not in argv


def test_podman_run_names_its_runtime_and_ulimits_and_omits_absent_limits() -> None:
    engine = ContainerEngine("podman", runtime="runc", ulimits=("nofile=1024:1024",))
    argv = engine.run_argv(ContainerRun(image="i", command=("true",), limits=CellLimits()))
    assert argv[:4] == ["podman", "--runtime", "runc", "run"]
    assert _flag(argv, "--ulimit") == ["nofile=1024:1024"]
    assert "--memory" not in argv and "--cpus" not in argv
    half = engine.run_argv(ContainerRun(image="i", command=(), limits=CellLimits(1536 << 20, 1.5)))
    assert _flag(half, "--memory") == ["1536m"] and _flag(half, "--cpus") == ["1.5"]


def test_build_command_has_dockerfile_tag_args_network_and_context_last() -> None:
    engine = ContainerEngine("podman", runtime="runc", ulimits=("nproc=4096:4096",))
    build = ImageBuild(
        tag="flash-attn-builder:cp311-torch2.13-cu130",
        dockerfile=Path("/repo/docker/builder.Dockerfile"),
        context=Path("/ctx"),
        build_args={"PYTHONS": "3.11", "CUDA": "13.0"},
        network="none",
    )
    argv = engine.build_argv(build)
    assert argv[:4] == ["podman", "--runtime", "runc", "build"]
    assert _flag(argv, "-f") == ["/repo/docker/builder.Dockerfile"]
    assert _flag(argv, "-t") == ["flash-attn-builder:cp311-torch2.13-cu130"]
    assert _flag(argv, "--build-arg") == ["CUDA=13.0", "PYTHONS=3.11"]
    assert _flag(argv, "--network") == ["none"] and _flag(argv, "--ulimit") == ["nproc=4096:4096"]
    assert argv[-1] == "/ctx"
    assert "--force-rm" in argv  # a failed step leaves no working container behind


def test_cell_container_mounts_source_read_only_cache_and_work_read_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_JOBS", "8")
    monkeypatch.setenv("FLASH_ATTN_ADMISSION", "0")
    monkeypatch.setenv("UNRELATED", "x")
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    cell = select_cells("torch=2.13 kernels=tiny memory=4g cpus=2 binding=classic", SPEC, HERE)[0]
    paths = FactoryPaths(tmp_path / "repo", tmp_path / "work", tmp_path / "out", tmp_path / "c")
    run = container_run(cell, "img", paths, "wheels", epoch=1234)
    modes = {m.container: m.read_only for m in run.mounts}
    work = str(tmp_path / "work" / "engine" / "cells" / cell.id)
    assert modes == {str(paths.repo): True, str(paths.object_cache): False, work: False}
    assert all(str(m.host) == m.container for m in run.mounts)  # same paths inside and out
    assert run.limits == CellLimits(4 << 30, 2.0) and run.network == "none"
    assert run.env["MAX_JOBS"] == "8" and run.env["FLASH_ATTN_ADMISSION"] == "0"
    assert run.env["SOURCE_DATE_EPOCH"] == "1234" and "UNRELATED" not in run.env
    assert run.env["FLASH_ATTN_OBJECT_CACHE"] == str(paths.object_cache)
    command = " ".join(run.command)
    assert "wheels" in command and "--no-publish" in command and "--toolchain hermetic" in command
    assert cell.selection() in run.command  # the factory inside builds exactly this cell


def test_podman_gets_runc_when_installed_and_runtime_is_podman_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONTAINER_RUNTIME", raising=False)
    monkeypatch.delenv("CONTAINER_ULIMITS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ContainerEngine.select("podman").runtime == ""
    write_exe(tmp_path / "runc", "exit 0\n")
    assert ContainerEngine.select("podman").runtime == "runc"
    monkeypatch.setenv("CONTAINER_RUNTIME", "crun")
    assert ContainerEngine.select("podman").runtime == "crun"
    with pytest.raises(EngineError, match="for podman"):
        ContainerEngine.select("docker")
    with pytest.raises(EngineError, match="needs ENGINE=docker or ENGINE=podman"):
        ContainerEngine.select("none")
    with pytest.raises(EngineError, match="not a container engine"):
        ContainerEngine.select("lxc")


def test_bad_ulimits_are_refused_with_an_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTAINER_ULIMITS", "nofile=lots")
    with pytest.raises(EngineError, match="CONTAINER_ULIMITS='nofile=20000:20000"):
        ContainerEngine.select("docker")


def test_no_engine_on_path_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineError) as e:
        ContainerEngine("podman").check()
    assert "`podman` is not on PATH" in str(e.value)
    assert "apt-get install podman runc" in str(e.value) and "ENGINE=none" in str(e.value)


def test_docker_without_daemon_says_so_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_exe(
        tmp_path / "docker",
        'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2\nexit 1\n',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(EngineError) as e:
        ContainerEngine("docker").check()
    text = str(e.value)
    assert "installed but does not work" in text and "exited 1" in text
    assert "Cannot connect to the Docker daemon" in text  # the engine's own words
    assert "start the Docker daemon" in text and "ENGINE=podman" in text


def test_podman_rlimit_failure_points_at_ulimits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_exe(
        tmp_path / "podman",
        'echo "error setting rlimit type 7: operation not permitted" >&2\nexit 125\n',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(EngineError, match="CONTAINER_ULIMITS"):
        ContainerEngine("podman").check()


def test_cli_stops_before_any_cell_when_the_engine_is_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_exe(tmp_path / "docker", "echo 'daemon not running' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    ran: list[str] = []
    monkeypatch.setattr(cli, "run_cells", lambda *a, **k: ran.append("cells") or [])
    code = cli.main(
        [
            "--work",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "o"),
            "wheels",
            "--engine",
            "docker",
            "--matrix",
            "torch=2.13 kernels=tiny binding=classic",
        ]
    )
    assert code == 2 and not ran
    err = capsys.readouterr().err
    assert err.startswith("error: ENGINE=docker is installed but does not work")
    assert "Fix:" in err


def test_makefile_passes_engine_and_fail_fast_through() -> None:
    import subprocess

    def dry(*args: str) -> str:
        done = subprocess.run(
            ["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        )
        return done.stdout

    # the settings travel in the environment (tests/factory/test_make_settings.py runs them)
    assert '--engine "$ENGINE"' in dry("wheels") and "--fail-fast" not in dry("wheels")
    line = dry("wheels", "ENGINE=podman", "FAIL_FAST=1", "MATRIX=ci")
    assert '--engine "$ENGINE" --fail-fast' in line and "ci" not in line.split()
    assert '--engine "$ENGINE"' in dry("build-wheels", "ENGINE=docker")
    assert "dev-image" in dry("dev-image", "ENGINE=podman")


def test_podman_without_container_ulimits_gets_this_process_hard_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import resource

    monkeypatch.delenv("CONTAINER_ULIMITS", raising=False)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    expected = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            hard = min(hard, pid_max) if name == "nproc" else hard
            expected.append(f"{name}={hard}:{hard}")
    assert ContainerEngine.select("podman", runtime="").ulimits == tuple(expected)
    # docker's limits are its daemon's; an explicit CONTAINER_ULIMITS wins for podman
    assert ContainerEngine.select("docker", runtime="").ulimits == ()
    monkeypatch.setenv("CONTAINER_ULIMITS", "nofile=1024:1024")
    assert ContainerEngine.select("podman", runtime="").ulimits == ("nofile=1024:1024",)


def test_dev_runs_one_command_without_a_terminal_or_a_shell_that_reads_stdin(
    tmp_path: Path,
) -> None:
    from scripts.factory.devshell import dev_shell_argv

    cell = select_cells("torch=2.14 python=3.11 cuda=13.0", SPEC, HERE)[0]
    paths = FactoryPaths.default(repo=tmp_path, work=tmp_path / "w")
    engine = ContainerEngine("podman", runtime="runc")
    one = dev_shell_argv(engine, cell, paths, "make test; echo $?", tty=True)
    assert one[-3:] == ["bash", "-c", "make test; echo $?"]  # one argument, as given
    assert "-it" not in one and "-i" not in one and "-t" not in one
    assert dev_shell_argv(engine, cell, paths, "", tty=True)[-1] == "bash"
    assert "-it" in dev_shell_argv(engine, cell, paths, "", tty=True)
    piped = dev_shell_argv(engine, cell, paths, "", tty=False)
    assert "-i" in piped and "-it" not in piped  # reads stdin, ends at its end


def test_make_passes_offline_and_cmd_verbatim(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    log = tmp_path / "calls.jsonl"
    exe = tmp_path / "python"
    exe.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'CMD': os.environ.get('CMD')}) + '\\n')\n"
    )
    exe.chmod(0o755)
    marker = tmp_path / "x"
    cmd = f"echo $(touch {marker}) `touch {marker}`; exit 3"

    def make(*args: str) -> None:
        subprocess.run(
            ["make", "--no-print-directory", "-C", str(REPO), f"PYTHON={exe}", *args],
            capture_output=True,
            check=False,
        )

    make("wheels", "ENGINE=podman", "OFFLINE=1")
    make("dev-image", "ENGINE=podman", "OFFLINE=yes")
    make("build-wheels", "ENGINE=podman")
    make("dev", "ENGINE=podman", f"CMD={cmd}")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [("--offline" in c["argv"]) for c in calls] == [True, True, False, False]
    assert calls[3]["argv"][-3:] == ["dev", "--engine", "podman"]
    assert calls[3]["CMD"] == cmd and not marker.exists()  # data, not code
