"""flash_attn beside a separately installed flash-attn-4 (``flash_attn.cute``).

flash-attn-4's wheel (4.0.0b36, read from its RECORD) holds ``flash_attn/cute/...`` and no
``flash_attn/__init__.py``: when it is installed into another site directory than ours
(a second venv layer, ``pip install --target``, a PYTHONPATH entry), its ``flash_attn``
folder is only a namespace portion, and Python picks our regular package ``flash_attn``
whatever the order on sys.path. ``flash_attn.cute`` is then found only because our
``flash_attn/__init__.py`` extends ``__path__`` with every ``flash_attn`` folder on
sys.path (``pkgutil.extend_path``), as upstream's does. Each case runs in a fresh,
isolated interpreter (``python -I``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FA4_STANDIN = '''"""Stand-in for flash-attn-4's flash_attn.cute (same layout, no kernels)."""
MARK = "flash-attn-4 stand-in"


def flash_attn_func(*args, **kwargs):
    return MARK
'''

PROBE = """
import sys
sys.path[:0] = {paths!r}
import flash_attn
import flash_attn.cute as cute
from flash_attn import flash_attn_func
from flash_attn.cute import flash_attn_func as cute_func
assert cute.MARK == "flash-attn-4 stand-in", cute.MARK
assert cute_func() == cute.MARK
assert flash_attn_func.__module__ == "flash_attn.flash_attn_interface", flash_attn_func.__module__
print(flash_attn.__file__)
print(cute.__file__)
"""


def make_fa4_site(root: Path) -> Path:
    site = root / "fa4-site"
    pkg = site / "flash_attn" / "cute"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FA4_STANDIN)
    return site


def probe(paths: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLASH_ATTN_SKIP_TORCH_CHECK="1")
    return subprocess.run(
        [sys.executable, "-I", "-c", PROBE.format(paths=paths)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("ours_first", [True, False], ids=["ours-first", "fa4-first"])
def test_flash_attn_cute_imports_beside_us(tmp_path, ours_first):
    fa4 = str(make_fa4_site(tmp_path))
    paths = [str(REPO), fa4] if ours_first else [fa4, str(REPO)]
    done = probe(paths)
    assert done.returncode == 0, done.stderr
    ours_file, cute_file = done.stdout.split()
    assert Path(ours_file) == REPO / "flash_attn" / "__init__.py"
    assert Path(cute_file) == Path(fa4) / "flash_attn" / "cute" / "__init__.py"


def test_flash_attn_cute_is_missing_without_it(tmp_path):
    """The probe can fail: with no flash-attn-4 on the path, flash_attn.cute is not found."""
    done = probe([str(REPO)])
    assert done.returncode != 0
    assert "No module named 'flash_attn.cute'" in done.stderr
