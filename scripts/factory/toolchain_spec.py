"""recipes/toolchain.toml, typed: the index a hermetic toolchain installs from, and the
packages it is made of besides torch (build tools, the CUDA compiler, cuobjdump)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from .errors import FactoryError

TOOLCHAIN_TOML = Path(__file__).resolve().parents[2] / "recipes" / "toolchain.toml"
INDEX_VARIABLE = "FLASH_ATTN_PACKAGE_INDEX"


@dataclass(frozen=True)
class CudaPackages:
    compiler: tuple[str, ...]  # templates with {cuda} and {major}
    cuobjdump: str  # "" where the index has no cuobjdump package for this major


@dataclass(frozen=True)
class ToolchainSpec:
    index_url: str
    torch_cuda_url: str  # template with {cuda_tag}
    build: tuple[str, ...]
    cuda: dict[str, CudaPackages]  # by CUDA major

    def packages(self, cuda: str) -> CudaPackages:
        major = cuda.split(".")[0]
        if major not in self.cuda:
            known = ", ".join(sorted(self.cuda, key=int))
            raise FactoryError(
                f"CUDA {cuda}: {TOOLCHAIN_TOML.name} has no [cuda.\"{major}\"] packages "
                f"(CUDA majors it knows: {known})"
            )
        return self.cuda[major]

    def cuda_requirements(self, cuda: str) -> list[str]:
        major = cuda.split(".")[0]
        return [t.format(cuda=cuda, major=major) for t in self.packages(cuda).compiler]

    def cuobjdump_requirement(self, cuda: str) -> str:
        return self.packages(cuda).cuobjdump

    def torch_index(self, cuda_tag: str) -> str:
        return self.torch_cuda_url.format(cuda_tag=cuda_tag)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FactoryError(f"{TOOLCHAIN_TOML.name}: {where} must be a list of strings")
    return tuple(value)


def load_toolchain_spec(
    path: Path = TOOLCHAIN_TOML, environ: dict[str, str] | None = None
) -> ToolchainSpec:
    """The recipe; FLASH_ATTN_PACKAGE_INDEX (a mirror) replaces its index url."""
    env = os.environ if environ is None else environ
    try:
        data = tomllib.loads(path.read_text())
        index = data["index"]
        cuda = {
            major: CudaPackages(
                _strings(entry["compiler"], f'[cuda."{major}"] compiler'),
                str(entry.get("cuobjdump", "")),
            )
            for major, entry in data["cuda"].items()
        }
        url = env.get(INDEX_VARIABLE, "").strip() or str(index["url"])
        return ToolchainSpec(
            index_url=url,
            torch_cuda_url=str(index["torch_cuda_url"]),
            build=_strings(data["build"]["requirements"], "[build] requirements"),
            cuda=cuda,
        )
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise FactoryError(f"{path}: cannot read the toolchain recipe ({e!r})") from e
