"""Container engines: docker and podman behind one class, and the commands they run.

`ContainerEngine` only builds command lines (pure, unit-tested) and runs them; what a
cell's container holds and mounts is decided by `containers.py`. `check()` turns the
two ways an engine fails before any cell starts (not installed, installed but not
working) into a FactoryError that says what to do.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FactoryError
from .matrix import CellLimits

ENGINES = ("none", "docker", "podman")
_ULIMIT_RE = re.compile(r"^[a-z]+=-?\d+(?::-?\d+)?$")
# podman 4.3 from Debian runs containers as root only with runc (crun fails on setrlimit)
PODMAN_PREFERRED_RUNTIME = "runc"
# podman's own defaults (nofile 1048576, nproc 4194304) are above what a caller without
# CAP_SYS_RESOURCE may grant ("error setting rlimit type 7"): without CONTAINER_ULIMITS,
# podman gets these limits at this process's own hard limits, which it may always grant
INHERITED_ULIMITS = (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC))

_INSTALL_HINT = {
    "docker": "install Docker Engine (docs.docker.com/engine/install), or use ENGINE=podman "
    "(apt-get install podman runc)",
    "podman": "install podman and runc (Debian/Ubuntu: apt-get install podman runc), or use "
    "ENGINE=docker",
}


class EngineError(FactoryError):
    """A container engine that cannot be used: absent, not working, or a failed build."""


PID_MAX = Path("/proc/sys/kernel/pid_max")


def inherited_ulimits(pid_max: Path = PID_MAX) -> str:
    """'nofile=H:H nproc=H:H' at this process's hard limits (an unlimited one is left
    to the engine): what podman may set without CAP_SYS_RESOURCE. nproc is capped at the
    kernel's pid_max, which some hosts also enforce on it (seen: 32768 set, 32769 refused
    with a hard limit of 96365)."""
    try:
        cap: int | None = int(pid_max.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        cap = None
    items = []
    for name, which in INHERITED_ULIMITS:
        hard = resource.getrlimit(which)[1]
        if hard == resource.RLIM_INFINITY:
            continue
        if name == "nproc" and cap is not None:
            hard = min(hard, cap)
        items.append(f"{name}={hard}:{hard}")
    return " ".join(items)


@dataclass(frozen=True)
class Mount:
    host: Path
    container: str
    read_only: bool

    def arg(self) -> str:
        return f"{self.host}:{self.container}:{'ro' if self.read_only else 'rw'}"


@dataclass(frozen=True)
class ImageBuild:
    tag: str
    dockerfile: Path
    context: Path
    build_args: dict[str, str] = field(default_factory=dict)
    network: str = "host"  # "none" for an offline build from a prefilled wheelhouse


@dataclass(frozen=True)
class ContainerRun:
    image: str
    command: tuple[str, ...]
    mounts: tuple[Mount, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    limits: CellLimits = CellLimits()
    workdir: str = "/"
    network: str = "none"
    user: str = ""  # "uid:gid"; empty: the image's user
    interactive: bool = False  # stdin attached (-i)
    tty: bool = False  # with a terminal (-t): only when this process's stdin is one


@dataclass(frozen=True)
class ContainerEngine:
    name: str  # "docker" or "podman"
    executable: str = ""  # default: the name, looked up on PATH
    runtime: str = ""  # podman --runtime (e.g. runc); empty: the engine's default
    # --ulimit values for builds and runs, e.g. ("nofile=20000:20000", "nproc=32768:32768"):
    # a runtime without CAP_SYS_RESOURCE cannot raise a limit above the caller's
    ulimits: tuple[str, ...] = ()

    @classmethod
    def select(
        cls, name: str, runtime: str | None = None, ulimits: str | None = None
    ) -> ContainerEngine:
        """The engine for ENGINE=name; podman gets runc when it is installed (see
        PODMAN_PREFERRED_RUNTIME) unless a runtime is named (CONTAINER_RUNTIME);
        CONTAINER_ULIMITS="nofile=S:H nproc=S:H" sets --ulimit on builds and runs; unset,
        podman gets this process's hard limits (inherited_ulimits), docker its daemon's."""
        if name == "none":
            raise EngineError(
                "ENGINE=none runs no container; this needs ENGINE=docker or ENGINE=podman, "
                "e.g. make dev-image ENGINE=podman"
            )
        if name not in ENGINES:
            raise EngineError(
                f"ENGINE={name!r} is not a container engine; valid: docker, podman "
                "(or none: build on this machine)"
            )
        if runtime is None:
            runtime = os.environ.get("CONTAINER_RUNTIME", "").strip()
            if not runtime and name == "podman" and shutil.which(PODMAN_PREFERRED_RUNTIME):
                runtime = PODMAN_PREFERRED_RUNTIME
        if runtime and name != "podman":
            raise EngineError(
                f"CONTAINER_RUNTIME={runtime!r} is for podman; docker sets its runtime "
                "in its daemon's configuration"
            )
        if ulimits is None:
            ulimits = os.environ.get("CONTAINER_ULIMITS", "").strip()
            if not ulimits and name == "podman":
                ulimits = inherited_ulimits()
        items = tuple(ulimits.split())
        bad = [u for u in items if not _ULIMIT_RE.match(u)]
        if bad:
            raise EngineError(
                f"CONTAINER_ULIMITS={ulimits!r}: {', '.join(bad)} is not NAME=SOFT[:HARD], "
                "e.g. CONTAINER_ULIMITS='nofile=20000:20000 nproc=32768:32768'"
            )
        return cls(name=name, executable=name, runtime=runtime, ulimits=items)

    @property
    def exe(self) -> str:
        return self.executable or self.name

    def base(self) -> list[str]:
        return [self.exe, *(["--runtime", self.runtime] if self.runtime else [])]

    def ulimit_args(self) -> list[str]:
        return [arg for u in self.ulimits for arg in ("--ulimit", u)]

    # --- command lines -------------------------------------------------------------

    def build_argv(self, build: ImageBuild) -> list[str]:
        argv = [*self.base(), "build", "-f", str(build.dockerfile), "-t", build.tag]
        # a failed step's working container goes too: podman keeps it by default, and
        # one of a toolchain step holds gigabytes (the next build then ran out of disk)
        argv += ["--force-rm", *self.ulimit_args()]
        for key, value in sorted(build.build_args.items()):
            argv += ["--build-arg", f"{key}={value}"]
        if build.network:
            argv += ["--network", build.network]
        return [*argv, str(build.context)]

    def run_argv(self, run: ContainerRun) -> list[str]:
        argv = [*self.base(), "run", "--rm"]
        if run.interactive:
            argv += ["-it"] if run.tty else ["-i"]
        memory = run.limits.memory_text
        if memory:
            # swap as large as memory: no swap on top, so the limit is the limit
            argv += ["--memory", memory, "--memory-swap", memory]
        if run.limits.cpus is not None:
            argv += ["--cpus", run.limits.cpus_text]
        argv += ["--network", run.network, *self.ulimit_args()]
        for mount in run.mounts:
            argv += ["-v", mount.arg()]
        for key, value in sorted(run.env.items()):
            argv += ["-e", f"{key}={value}"]
        if run.user:
            argv += ["--user", run.user]
        return [*argv, "-w", run.workdir, run.image, *run.command]

    def info_argv(self) -> list[str]:
        return [*self.base(), "info"]

    def inspect_argv(self, tag: str) -> list[str]:
        return [*self.base(), "image", "inspect", tag]

    # --- running them --------------------------------------------------------------

    def check(self, timeout: float = 60.0) -> None:
        """Raise EngineError unless the engine is installed and answers `info`."""
        if shutil.which(self.exe) is None:
            raise EngineError(
                f"ENGINE={self.name}: `{self.exe}` is not on PATH. Fix: "
                f"{_INSTALL_HINT[self.name]}; or ENGINE=none to build on this machine"
            )
        try:
            done = subprocess.run(
                self.info_argv(), capture_output=True, text=True, check=False, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise EngineError(
                f"ENGINE={self.name}: `{' '.join(self.info_argv())}` did not answer in "
                f"{timeout:.0f} s; {self._fix(None)}"
            ) from None
        except OSError as e:
            raise EngineError(f"ENGINE={self.name}: cannot run {self.exe}: {e}") from e
        if done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            raise EngineError(
                f"ENGINE={self.name} is installed but does not work: "
                f"`{' '.join(self.info_argv())}` exited {done.returncode}:\n  "
                + "\n  ".join(text.splitlines()[-5:])
                + f"\nFix: {self._fix(text)}"
            )

    def _fix(self, error: str | None) -> str:
        text = (error or "").lower()
        if "rlimit" in text:
            return (
                "the runtime may not raise a ulimit above this shell's (no CAP_SYS_RESOURCE): "
                "set CONTAINER_ULIMITS to values at or below `ulimit -Hn` and `ulimit -Hu`, e.g. "
                "CONTAINER_ULIMITS='nofile=20000:20000 nproc=32768:32768'"
                + (
                    "; podman 4.3 also needs runc (CONTAINER_RUNTIME=runc)"
                    if self.name == "podman"
                    else ""
                )
            )
        if self.name == "docker":
            if "daemon" in text or "docker.sock" in text or not text:
                return (
                    "start the Docker daemon (systemctl start docker) and make sure this user "
                    "may use it (the docker group); or ENGINE=podman, which needs no daemon; "
                    "or ENGINE=none"
                )
            if "permission denied" in text:
                return "add this user to the docker group (then log in again); or ENGINE=podman"
            return "see the error above; or ENGINE=podman / ENGINE=none"
        if "crun" in text or "runtime" in text:
            return (
                "run podman with runc: apt-get install runc, then CONTAINER_RUNTIME=runc "
                "(crun of podman 4.3 fails on setrlimit on such hosts)"
            )
        if "permission" in text or "newuidmap" in text or "subuid" in text:
            return (
                "rootless podman needs subordinate ids (/etc/subuid, /etc/subgid; "
                "apt-get install uidmap), or run as root"
            )
        return "see the error above; `podman info` must work; or ENGINE=docker / ENGINE=none"

    def run_fix(self, output: str) -> str:
        """A hint for a `run` that failed before the container's command started."""
        return self._fix(output)

    def image_exists(self, tag: str) -> bool:
        done = subprocess.run(self.inspect_argv(tag), capture_output=True, check=False)
        return done.returncode == 0
