"""Test setup: the ``gpu`` marker, NaN-poisoned GPU memory, and ``import reference``
from any test module.

Tests marked ``@pytest.mark.gpu`` need a CUDA GPU and a built ``flash_attn._C``;
they are skipped, with the reason, where either is missing. ``gpu(extension=False)``
marks a test that needs the GPU but not the extension (the Triton ops). Everything
else must run on a CPU-only machine.

A GPU test whose call needs a kernel the build left out (KernelNotBuiltError: a head_dim,
dtype or direction the build knobs did not choose, e.g. ``make build
FLASH_ATTN_HEAD_DIMS=64,128``) is skipped with that error's message, not failed.

Before every GPU test the free memory of PyTorch's CUDA caching allocator is filled
with NaN (gpu_poison.py), so that an output element a kernel fails to write reads as
NaN instead of a stale value or a fresh zero. FLASH_ATTN_TEST_POISON=0 turns it off.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `from reference import attention_ref`
    sys.path.insert(0, str(TESTS_DIR))

import gpu_poison  # noqa: E402  (from TESTS_DIR)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gpu(extension=True): needs a CUDA GPU and (unless extension=False) the compiled "
        "extension flash_attn._C",
    )
    try:
        gpu_poison.poison_enabled()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


@pytest.fixture(autouse=True)
def _nan_poisoned_cuda_cache(request: pytest.FixtureRequest) -> None:
    """GPU tests start with every free block of the CUDA cache holding NaN."""
    if request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        return
    if gpu_poison.poison_enabled():
        gpu_poison.poison_cuda_cache()


@pytest.fixture(autouse=True)
def _fresh_environment_verdicts() -> None:
    """Every test sees the environment checked anew: flash_attn._checks keeps the
    positive verdicts of a process (its GPU and build do not change), and tests pretend
    other GPUs, builds and extensions."""
    checks = sys.modules.get("flash_attn._checks")
    if checks is not None:
        checks.forget_environment()


@cache
def gpu_skip_reason() -> str:
    """Why GPU tests cannot run here ("" when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    from flash_attn import _ops

    error = _ops.load_error()
    if error:
        return f"flash_attn._C is not built or does not load ({error})"
    return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        if marker.kwargs.get("extension", True):
            reason = gpu_skip_reason()
        elif not torch.cuda.is_available():
            reason = "no CUDA GPU (torch.cuda.is_available() is False)"
        else:
            reason = ""
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):  # noqa: ANN201 (a hook wrapper's generator)
    """A GPU test that needs a kernel this build left out is skipped, with the reason."""
    from flash_attn.errors import KernelNotBuiltError

    try:
        return (yield)
    except KernelNotBuiltError as e:
        if item.get_closest_marker("gpu") is None:
            raise
        pytest.skip(f"not in this build: {e}")
