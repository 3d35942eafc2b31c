"""What a torch release is built for, read from the torch distribution's own files.

One set of rules serves a wheel on the package index (a few members of the zip, read
over HTTP by torch_releases.py) and the torch installed here (read from disk):

  version      METADATA `Version` (the local label, e.g. +cu132, dropped)
  python       the lowest CPython its `Requires-Python` admits among its cpXY wheels, and
               the highest cpXY wheel (free-threaded cpXYt wheels are not counted)
  index_cuda   `Requires-Dist` on the CUDA runtime: cuda-toolkit==13.2.2 (CUDA 13 era),
               nvidia-cuda-runtime-cu12==12.8.90 (CUDA 12); torch/version.py's `cuda`
               (what torch.version.cuda says) must agree
  cxx11abi     TorchConfig.cmake's -D_GLIBCXX_USE_CXX11_ABI=N (up to 2.7), else the
               constant torch/__init__.py's compiled_with_cxx11_abi() returns (2.8 on)
  cxx_std      TorchConfig.cmake's CXX_STANDARD NN / cxx_std_NN: what its headers need

Every fact keeps the words it came from (`evidence`), which the generated table prints
next to the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import FactoryError

# members of a torch wheel (and of an installed torch) the rules read
METADATA_SUFFIX = ".dist-info/METADATA"
VERSION_PY = "torch/version.py"
TORCH_CONFIG = "torch/share/cmake/Torch/TorchConfig.cmake"
TORCH_INIT = "torch/__init__.py"

# the distributions that pin torch's CUDA runtime, most telling first
_CUDA_PINS = (
    re.compile(r"^cuda-toolkit$"),
    re.compile(r"^nvidia-cuda-runtime(-cu\d+)?$"),
    re.compile(r"^nvidia-cuda-nvrtc(-cu\d+)?$"),
)
_REQ_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<extras>\[[^\]]*\])?\s*\(?\s*"
    r"==\s*(?P<version>\d+\.\d+(?:\.[0-9A-Za-z]+)*)"
)
_VERSION_CUDA_RE = re.compile(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([\d.]+)['\"]", re.MULTILINE)
_CMAKE_ABI_RE = re.compile(r"_GLIBCXX_USE_CXX11_ABI=([01])")
_INIT_ABI_RE = re.compile(
    r"def compiled_with_cxx11_abi\(\)[^:]*:\s*(?:[rR]?(?:\"\"\"|''')[\s\S]*?(?:\"\"\"|''')\s*)?"
    r"return (True|False)\b"
)
_CMAKE_STD_RE = re.compile(r"CXX_STANDARD\s+(\d+)|cxx_std_(\d+)")
_REQUIRES_PYTHON_RE = re.compile(r">=\s*(\d+)\.(\d+)")
_CP_TAG_RE = re.compile(r"^cp(\d)(\d+)$")

Reader = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Fact:
    """One value and the words it was read from."""

    value: str
    evidence: str


@dataclass(frozen=True)
class TorchFacts:
    """What one torch release (its newest patch) is built for, with where each fact is from."""

    minor: str  # "2.15"
    version: str  # "2.15.0"
    python: tuple[Fact, Fact]  # lowest and highest CPython
    index_cuda: Fact | None  # None: a CPU build (no CUDA runtime pinned)
    cxx11abi: Fact  # "TRUE" or "FALSE"
    cxx_std: Fact  # "c++20"
    source: str = ""  # the file the facts were read from

    @property
    def python_range(self) -> tuple[str, str]:
        return (self.python[0].value, self.python[1].value)


def minor_of(version: str) -> str:
    """'2.15.0+cu132' -> '2.15'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise FactoryError(f"torch version {version!r} is not like 2.15.0")
    return f"{m.group(1)}.{m.group(2)}"


def public_version(version: str) -> str:
    """'2.15.0+cu132' -> '2.15.0'."""
    return version.partition("+")[0]


def metadata_fields(text: str) -> dict[str, list[str]]:
    """The header fields of a METADATA file (each name may repeat: Requires-Dist)."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the body (the long description) starts here
        if line[0] in " \t":
            continue  # a continuation line of a folded header
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), []).append(value.strip())
    return fields


def cuda_from_requires(requires: Iterable[str]) -> Fact | None:
    """The CUDA (major.minor) torch pins its runtime to, from its Requires-Dist lines."""
    pins: list[tuple[int, str, str]] = []
    for req in requires:
        m = _REQ_RE.match(req)
        if m is None:
            continue
        name = m.group("name").lower().replace("_", "-")
        for rank, pattern in enumerate(_CUDA_PINS):
            if pattern.match(name):
                parts = m.group("version").split(".")
                spelled = f"{name}{m.group('extras') or ''}=={m.group('version')}"
                pins.append((rank, f"{parts[0]}.{parts[1]}", spelled))
    if not pins:
        return None
    rank, cuda, spelled = min(pins)
    return Fact(cuda, f"Requires-Dist {spelled}")


def cuda_from_version_py(text: str | None) -> str | None:
    """torch/version.py's `cuda` ('13.2'), or None for a CPU build or no file."""
    if not text:
        return None
    m = _VERSION_CUDA_RE.search(text)
    return m.group(1) if m else None


def abi_from_files(cmake: str | None, init: str | None) -> Fact:
    """The C++11 ABI torch is built with, from TorchConfig.cmake or torch/__init__.py."""
    if cmake:
        m = _CMAKE_ABI_RE.search(cmake)
        if m:
            return Fact(
                "TRUE" if m.group(1) == "1" else "FALSE",
                f"TorchConfig.cmake: -D_GLIBCXX_USE_CXX11_ABI={m.group(1)}",
            )
    if init:
        m = _INIT_ABI_RE.search(init)
        if m:
            return Fact(
                "TRUE" if m.group(1) == "True" else "FALSE",
                f"torch/__init__.py: compiled_with_cxx11_abi() returns {m.group(1)}",
            )
    raise FactoryError(
        "cannot tell torch's C++11 ABI: TorchConfig.cmake sets no -D_GLIBCXX_USE_CXX11_ABI "
        "and torch/__init__.py's compiled_with_cxx11_abi() returns no constant"
    )


def cxx_std_from_cmake(cmake: str | None) -> Fact:
    """The C++ standard torch's headers need, from TorchConfig.cmake."""
    found = [
        (int(a), f"CXX_STANDARD {a}") if a else (int(b), f"cxx_std_{b}")
        for a, b in _CMAKE_STD_RE.findall(cmake or "")
    ]
    if not found:
        raise FactoryError("cannot tell the C++ standard: TorchConfig.cmake names none")
    std, spelled = max(found)
    return Fact(f"c++{std}", f"TorchConfig.cmake: {spelled}")


def python_lower_bound(requires_python: str) -> tuple[int, int] | None:
    m = _REQUIRES_PYTHON_RE.search(requires_python or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def python_range(requires_python: str, python_tags: Iterable[str]) -> tuple[Fact, Fact]:
    """(lowest, highest) CPython: the cpXY wheels that Requires-Python admits."""
    tags = sorted(
        {(int(m.group(1)), int(m.group(2))) for t in python_tags if (m := _CP_TAG_RE.match(t))}
    )
    floor = python_lower_bound(requires_python)
    usable = [t for t in tags if floor is None or t >= floor]
    if not usable:
        raise FactoryError(
            f"no CPython wheel admitted by Requires-Python {requires_python!r} "
            f"among the tags {', '.join(sorted(python_tags)) or 'none'}"
        )
    low, high = usable[0], usable[-1]
    low_fact = Fact(
        f"{low[0]}.{low[1]}",
        f"Requires-Python {requires_python}" if floor == low else f"cp{low[0]}{low[1]} wheel",
    )
    return low_fact, Fact(f"{high[0]}.{high[1]}", f"cp{high[0]}{high[1]} wheel")


def facts_from_files(
    read: Reader, python_tags: Iterable[str], source: str, metadata: str | None = None
) -> TorchFacts:
    """TorchFacts from a torch distribution whose members `read` returns (None: absent).

    `metadata` is METADATA's text when it came another way (PEP 658)."""
    meta_text = metadata if metadata is not None else read(METADATA_SUFFIX)
    if not meta_text:
        raise FactoryError(f"{source}: no METADATA")
    fields = metadata_fields(meta_text)
    version = public_version(fields.get("Version", [""])[0])
    if not version:
        raise FactoryError(f"{source}: METADATA has no Version")
    cuda = cuda_from_requires(fields.get("Requires-Dist", []))
    said = cuda_from_version_py(read(VERSION_PY))
    if cuda is not None and said is not None and said != cuda.value:
        raise FactoryError(
            f"{source}: {cuda.evidence} means CUDA {cuda.value}, but torch/version.py says "
            f"cuda = {said!r}"
        )
    if cuda is None and said is not None:
        cuda = Fact(said, f"torch/version.py: cuda = '{said}'")
    cmake = read(TORCH_CONFIG)
    abi_init = None if cmake and _CMAKE_ABI_RE.search(cmake) else read(TORCH_INIT)
    return TorchFacts(
        minor=minor_of(version),
        version=version,
        python=python_range(fields.get("Requires-Python", [""])[0], python_tags),
        index_cuda=cuda,
        cxx11abi=abi_from_files(cmake, abi_init),
        cxx_std=cxx_std_from_cmake(cmake),
        source=source,
    )
