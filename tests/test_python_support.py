"""The installed package's Python code runs on the oldest CPython that pyproject.toml's
requires-python admits (the factory builds cp39 wheels for torch 2.5-2.8).

ruff's target-version catches syntax; vermin (a static checker of the Python versions
each construct needs) also catches library calls that are newer than that, such as
``dataclass(slots=True)`` (3.10), which made ``import flash_attn`` fail on Python 3.9.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
pytest.importorskip("vermin", reason="the test extras install vermin (pip install -e '.[test]')")

import tomllib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def oldest_python() -> str:
    """The lowest 3.x that requires-python admits."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = SpecifierSet(project["requires-python"])
    for minor in range(0, 40):
        if f"3.{minor}" in spec:
            return f"3.{minor}"
    raise AssertionError(f"requires-python {spec} admits no 3.x")


def vermin(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from vermin import main; sys.argv[0] = 'vermin'; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


# 'long': vermin reads Tensor.long() as Python 2's long type (a false positive)
OPTIONS = ("--no-tips", "--violations", "--no-parse-comments", "--exclude", "long")


def test_requires_python_is_read() -> None:
    assert oldest_python() == "3.9"


def test_the_package_runs_on_the_oldest_python() -> None:
    target = oldest_python()
    # what the wheel ships (setup.py: the flash_attn package and the flash_attn_interface module)
    result = vermin(f"--target={target}-", *OPTIONS, "flash_attn", "flash_attn_interface.py")
    assert result.returncode == 0, (
        f"flash_attn uses something newer than Python {target} (requires-python):\n"
        + result.stdout
        + result.stderr
    )


def test_the_check_fails_on_newer_code(tmp_path: Path) -> None:
    """The check can fail: the construct that broke Python 3.9 is reported."""
    (tmp_path / "mod.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass(slots=True)\nclass A:\n    x: int\n"
    )
    result = vermin(f"--target={oldest_python()}-", *OPTIONS, str(tmp_path))
    assert result.returncode != 0
    assert "dataclass(slots)" in result.stdout
