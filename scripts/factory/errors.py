"""The one error type the factory shows to users: what was wrong, the value, what is valid."""

from __future__ import annotations


class FactoryError(Exception):
    """A problem the user can fix; the CLI prints the message and exits non-zero."""


class MatrixError(FactoryError):
    """A matrix selection (preset, axis, value, combination) that cannot be used."""
