"""Progress while a long stage runs: a rich spinner with the elapsed time on a terminal,
nothing otherwise (logs and CI output stay plain lines)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def working(label: str) -> Iterator[None]:
    if not sys.stdout.isatty():
        yield
        return
    try:
        from rich.console import Console
    except ImportError:
        yield
        return
    with Console().status(f"[bold]{label}[/bold]", spinner="dots"):
        yield
