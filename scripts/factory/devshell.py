"""The dev image (docker/dev.Dockerfile) and a shell in it: `make dev-image`, `make dev`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .engine import ContainerEngine, ContainerRun, Mount
from .images import (
    ImageOptions,
    build_image,
    builder_build,
    dev_build,
    dev_tag,
    stage_context,
)
from .matrix import Cell
from .paths import FactoryPaths

DEV_SRC = "/src"


def build_dev_image(
    engine: ContainerEngine,
    cell: Cell,
    paths: FactoryPaths,
    options: ImageOptions,
    log: Callable[[str], None],
) -> str:
    """The builder image of `cell`'s toolchain, then the dev image over it; its tag."""
    root = paths.work / "engine"
    context = stage_context(paths.repo, root / "context", options.wheelhouse)
    for build in (
        builder_build(cell, paths.repo, context, options),
        dev_build(cell, paths.repo, context, options.offline),
    ):
        image_log = root / f"image-{build.tag.replace(':', '-')}.log"
        log(f"image: building {build.tag} (log {image_log})")
        build_image(engine, build, image_log)
    return dev_tag(cell)


def dev_shell_argv(
    engine: ContainerEngine, cell: Cell, paths: FactoryPaths, command: str = "", tty: bool = True
) -> list[str]:
    """A shell in the dev image with the checkout read-write at /src: interactive (with a
    terminal when `tty`; without one it reads commands from stdin and ends at its end),
    or, given `command`, `bash -c command` alone, its exit status the run's."""
    run = ContainerRun(
        image=dev_tag(cell),
        command=("bash", "-c", command) if command else ("bash",),
        mounts=(Mount(Path(paths.repo), DEV_SRC, read_only=False),),
        env={"FLASH_ATTN_OBJECT_CACHE": f"{DEV_SRC}/build/kernels"},
        workdir=DEV_SRC,
        network="host",
        interactive=not command,
        tty=tty and not command,
    )
    return engine.run_argv(run)
