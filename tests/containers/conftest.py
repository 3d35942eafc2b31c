"""Container engine tests: fast ones (command lines, errors through fake engines) always
run; the end-to-end proof with podman is marked `containers` and `slow`, and runs only
with FLASH_ATTN_CONTAINER_TESTS=1 (it needs root, podman, runc and debootstrap)."""

from __future__ import annotations

import os

import pytest

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
