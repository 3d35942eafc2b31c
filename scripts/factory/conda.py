"""The conda variant file, generated from the matrix: recipes/conda/variants.yaml.

rattler-build multiplies independent variant keys; the torch table allows only some
(cuda, torch, python) combinations, so all keys are zipped and each position is one
cell of the selection (MATRIX=release): the variants are exactly the factory's cells.
conda's pytorch is built with the C++11 ABI, so cells with the old ABI are left out.
Never edit the file by hand: `python3 -m scripts.factory conda-variants` rewrites it and
the tests check that the committed file equals its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .matrix import Cell

VARIANTS_YAML = Path(__file__).resolve().parents[2] / "recipes" / "conda" / "variants.yaml"
RECIPE_YAML = VARIANTS_YAML.with_name("recipe.yaml")
ZIPPED = ("cuda_compiler", "cuda_compiler_version", "pytorch", "python")
# the C library the packages are built against: glibc 2.28, the floor of the factory's
# manylinux_2_28 wheels (conda-forge's sysroot package provides it)
FIXED = (("c_stdlib", "sysroot"), ("c_stdlib_version", "2.28"))


@dataclass(frozen=True)
class CondaVariant:
    cuda_compiler: str  # conda-forge's CUDA compiler package: nvcc (11.x), cuda-nvcc (12+)
    cuda_compiler_version: str
    pytorch: str
    python: str

    @classmethod
    def of(cls, cell: Cell) -> CondaVariant:
        compiler = "nvcc" if int(cell.cuda.split(".")[0]) < 12 else "cuda-nvcc"
        return cls(compiler, cell.cuda, cell.torch, cell.python)

    def values(self) -> tuple[str, str, str, str]:
        return (self.cuda_compiler, self.cuda_compiler_version, self.pytorch, self.python)


def conda_variants(cells: Sequence[Cell]) -> list[CondaVariant]:
    seen: dict[CondaVariant, None] = {}
    for cell in cells:
        if cell.cxx11abi:
            seen.setdefault(CondaVariant.of(cell))
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
