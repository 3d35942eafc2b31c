"""The conda variant file, generated from the matrix: recipes/conda/variants.yaml.

rattler-build multiplies independent variant keys; the torch table allows only some
(cuda, torch, python) combinations, so all keys are zipped and each position is one
cell of the selection (MATRIX=release): the variants are exactly the factory's cells.
conda's pytorch is built with the C++11 ABI, so cells with the old ABI are left out.
A stable cell is one variant too (flash_attn_binding "stable", pytorch its build torch,
the floor): the recipe then requires pytorch >= that torch at run time. conda pins the
package to the CPython it was built with (python's run-export), so the abi3 property
buys nothing there: one package per (CUDA, CPython) serves every torch from the floor on,
so a stable cell gives one variant per CPython it serves (matrix.stable_pythons).
Never edit the file by hand: `python3 -m scripts.factory conda-variants` rewrites it and
the tests check that the committed file equals its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .matrix import Cell

VARIANTS_YAML = Path(__file__).resolve().parents[2] / "recipes" / "conda" / "variants.yaml"
RECIPE_YAML = VARIANTS_YAML.with_name("recipe.yaml")
ZIPPED = ("cuda_compiler", "cuda_compiler_version", "pytorch", "python", "flash_attn_binding")
# the C library the packages are built against: glibc 2.28, the floor of the factory's
# manylinux_2_28 wheels (conda-forge's sysroot package provides it)
FIXED = (("c_stdlib", "sysroot"), ("c_stdlib_version", "2.28"))


@dataclass(frozen=True)
class CondaVariant:
    cuda_compiler: str  # conda-forge's CUDA compiler package: nvcc (11.x), cuda-nvcc (12+)
    cuda_compiler_version: str
    pytorch: str
    python: str
    binding: str = "classic"  # "stable": run requirement pytorch >= this pytorch

    @classmethod
    def of(cls, cell: Cell) -> CondaVariant:
        compiler = "nvcc" if int(cell.cuda.split(".")[0]) < 12 else "cuda-nvcc"
        torch = cell.torch_floor if cell.stable else cell.torch
        return cls(compiler, cell.cuda, torch, cell.python, cell.binding)

    def values(self) -> tuple[str, str, str, str, str]:
        return (
            self.cuda_compiler,
            self.cuda_compiler_version,
            self.pytorch,
            self.python,
            self.binding,
        )


def conda_variants(cells: Sequence[Cell], stable_pythons: Sequence[str] = ()) -> list[CondaVariant]:
    """One variant per C++11-ABI cell; a stable cell's fans out over stable_pythons
    (matrix.stable_pythons: conda builds one package per CPython)."""
    seen: dict[CondaVariant, None] = {}
    for cell in cells:
        if not cell.cxx11abi:
            continue
        variant = CondaVariant.of(cell)
        pythons = stable_pythons if cell.stable and stable_pythons else (variant.python,)
        for python in pythons:
            seen.setdefault(replace(variant, python=python))
    return list(seen)


def render_variants(variants: Sequence[CondaVariant], selection: str) -> str:
    lines = [
        f"# Generated from recipes/matrix.toml (MATRIX={selection}) by",
        "#   python3 -m scripts.factory conda-variants",
        "# Do not edit: the tests compare this file with the generator's output.",
        f"# {len(variants)} variants, one per cell; zipped so that only the combinations the",
        "# torch table allows exist (rattler-build would otherwise multiply the keys).",
        "zip_keys:",
        "  - [" + ", ".join(ZIPPED) + "]",
    ]
    for key, value in FIXED:
        lines += [f"{key}:", f'  - "{value}"']
    for i, key in enumerate(ZIPPED):
        lines.append(f"{key}:")
        lines += [f'  - "{v.values()[i]}"' for v in variants]
    return "\n".join(lines) + "\n"
