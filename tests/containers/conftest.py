"""Container engine tests: fast ones (command lines, errors through fake engines) always
run; the end-to-end proof with podman is marked `containers` and `slow`, and runs only
with FLASH_ATTN_CONTAINER_TESTS=1 (it needs root, podman, runc and debootstrap)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONTAINER_TESTS_ENV = "FLASH_ATTN_CONTAINER_TESTS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"containers: runs a real container engine (podman); skipped unless "
        f"{CONTAINER_TESTS_ENV}=1",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(CONTAINER_TESTS_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"container test: set {CONTAINER_TESTS_ENV}=1 to run it")
    for item in items:
        if item.get_closest_marker("containers"):
            item.add_marker(skip)


def write_exe(path: Path, body: str) -> Path:
    """A fake executable (a shell script) at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path
