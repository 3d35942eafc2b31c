"""Naming one cell from what CI jobs and other front-ends hold: a selection (a CI matrix
entry's `matrix`, or a variant such as "torch=2.14 cuda=13.0") plus, for cibuildwheel,
the CPython of the wheel at hand; and the pip arguments that install that cell's torch."""

from __future__ import annotations

import os
from pathlib import Path

from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from packaging.version import InvalidVersion

from .errors import FactoryError
from .matrix import Cell, LocalFacts, MatrixSpec, expand, parse_selection
from .variant import TORCH_INDEX, Variant
from .wheelfile import read_wheel_info

# a selection names every axis it needs; these facts only fill what it leaves out
_NEUTRAL = LocalFacts(python="3.12")


def variant_cells(selection: str, spec: MatrixSpec) -> list[Cell]:
    """The cells of a selection, independent of this machine's python and torch."""
    return expand(parse_selection(selection, spec), spec, _NEUTRAL)


def one_cell(selection: str, spec: MatrixSpec, python: str | None = None) -> Cell:
    """The one cell of `selection`, its python replaced by `python` when given."""
    parsed = parse_selection(selection, spec)
    if python is not None:
        parsed.axes["python"] = (python,)
    cells = expand(parsed, spec, _NEUTRAL)
    if len(cells) != 1:
        raise FactoryError(
            f"MATRIX={selection!r} selects {len(cells)} cells ({', '.join(c.id for c in cells)}); "
            "name one cell (or one variant and let the wheel give the python)"
        )
    return cells[0]


def wheel_python(wheel: Path) -> str:
    """'3.12' from flash_attn-...-cp312-cp312-<platform>.whl ('3.10' from an abi3 wheel
    tagged cp310-abi3: its floor)."""
    try:
        tags = parse_wheel_filename(wheel.name)[3]
    except (InvalidWheelFilename, InvalidVersion) as e:
        raise FactoryError(f"{wheel.name} is not a wheel file name ({e})") from e
    pythons = {t.interpreter for t in tags if t.interpreter.startswith("cp")}
    if len(pythons) != 1:
        raise FactoryError(f"{wheel.name} is not a wheel of one CPython (tags: {sorted(pythons)})")
    digits = pythons.pop()[2:]
    return f"{digits[0]}.{digits[1:]}"


def cell_for_wheel(selection: str, wheel: Path, spec: MatrixSpec) -> Cell:
    """The cell a built wheel belongs to: the variant of `selection`, the wheel's CPython.
    A wheel whose version label is of another variant is an error (its label is set at
    build time from the build request; an unlabelled raw wheel is accepted)."""
    cell = one_cell(selection, spec, wheel_python(wheel))
    version = read_wheel_info(wheel).version
    label = version.partition("+")[2]
    if label and label.lower() != cell.local_label.lower():
        of = Variant.from_label(label)
        which = f" (variant {of.name})" if of is not None else ""
        raise FactoryError(
            f"{wheel.name} carries the label +{label}{which}; MATRIX={selection!r} is variant "
            f"{cell.variant} (+{cell.local_label}): build with that variant's build request "
            "(scripts.factory build-request), or name the wheel's own variant"
        )
    return cell


def torch_install_args(cell: Cell, spec: MatrixSpec) -> list[str]:
    """pip install arguments for the torch a cell builds and is tested against: the
    package index for the release's default CUDA, PyTorch's per-CUDA index otherwise. A
    stable wheel is tested under the [stable] smoke pair of its own CPython (e.g. torch 2.14
    for the cp311 build), in the pair's build of the cell's CUDA major: the floor torch the
    wheel is built with may be of another major (2.10's index build is CUDA 12), which a
    cu13 wheel rightly refuses."""
    release = spec.torch[cell.torch]
    major = cell.cuda.split(".")[0]
    if cell.stable and release.index_cuda.split(".")[0] != major:
        from .smoke_stable import pair_index

        for pair in (p for p in spec.stable.smoke if p.python == cell.python):
            try:
                _, index = pair_index(pair, cell, spec)
            except FactoryError:
                continue  # no build of this CUDA major
            extra = [a for url in index.extra_urls for a in ("--extra-index-url", url)]
            return [f"torch=={pair.torch}.*", *extra]
    args = [release.requirement]
    # a stable cell builds against any CUDA build of its torch: the index's own serves
    if not cell.stable and cell.cuda != release.index_cuda:
        base = os.environ.get("FLASH_ATTN_TORCH_INDEX", TORCH_INDEX).rstrip("/")
        args += ["--index-url", f"{base}/{cell.cuda_tag}"]
    return args
