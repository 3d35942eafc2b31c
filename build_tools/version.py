"""The distribution's version: flash_attn.__version__ plus an optional local label."""

from __future__ import annotations

import re
from pathlib import Path

from .knobs import BuildConfigError

FALLBACK_VERSION = "2.9.0"

_VERSION_RE = re.compile(r"""^__version__\s*(?::\s*str\s*)?=\s*["']([^"']+)["']""", re.MULTILINE)
_LOCAL_RE = re.compile(r"^[A-Za-z0-9]+(?:[.][A-Za-z0-9]+)*$")


def read_version(init_py: Path) -> str:
    """__version__ from the package's __init__.py, read as text (no import)."""
    try:
        m = _VERSION_RE.search(init_py.read_text())
    except OSError:
        return FALLBACK_VERSION
    return m.group(1) if m else FALLBACK_VERSION


def with_local_label(version: str, label: str | None) -> str:
    """'2.9.0' + 'cu130torch2.13' -> '2.9.0+cu130torch2.13' (PEP 440 local version)."""
    label = (label or "").strip()
    if not label:
        return version
    normalized = label.replace("-", ".").replace("_", ".")
    if not _LOCAL_RE.match(normalized):
        raise BuildConfigError(
            f"FLASH_ATTN_LOCAL_VERSION={label!r} is not a PEP 440 local version label; "
            "valid: letters and digits in parts joined by '.', e.g. cu130torch2.13"
        )
    joiner = "." if "+" in version else "+"
    return f"{version}{joiner}{normalized}"
