"""The Triton modules (fused norms, rotary) without Triton: they refuse to import, with
what to install, and nothing else in flash_attn needs Triton."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "flash_attn.ops.triton.layer_norm",
        "flash_attn.ops.layer_norm",
        "flash_attn.ops.rms_norm",
        "flash_attn.ops.triton.rotary",
        "flash_attn.layers.rotary",
    ],
)
def test_the_triton_modules_refuse_to_import_without_triton(module):
    """As flash_attn 2.x's do: model code imports them in a try block and falls back
    to plain PyTorch where they raise ImportError. The message says what to install."""
    import subprocess

    code = (
        "import sys; sys.modules['triton'] = None\n"
        f"try:\n    import {module}\nexcept ImportError as e:\n    print('ImportError:', e)\n"
        "else:\n    print('imported')\n"
        "import flash_attn; print('flash_attn', flash_attn.__version__)\n"
    )
    env = dict(os.environ, FLASH_ATTN_SKIP_TORCH_CHECK="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()[:2]
    assert first.startswith("ImportError:") and "pip install triton" in first, first
    assert second.startswith("flash_attn ")  # the package itself never needs Triton
