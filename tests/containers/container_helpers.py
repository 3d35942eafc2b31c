"""Shared by the container tests (a module of its own: importing names from a
conftest is ambiguous when several test folders have one)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_exe(path: Path, body: str) -> Path:
    """A fake executable (a shell script) at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path
