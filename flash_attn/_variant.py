"""Which build of flash_attn fits which torch.

A compiled flash_attn (its extension ``flash_attn._C``) fits one torch minor release,
one C++ ABI and one CUDA major; the wheels are published in one package index per
such *variant* (``cu130-torch2.13-cxx11abiTRUE``), and their version carries the
same facts as a local label (``2.9.0+cu130torch2.13cxx11abiTRUE``). This module owns
those names, the record a build leaves next to the extension saying what it was
compiled against (``_built_against.json``, written by setup.py), the comparison of
that record with the torch that is running, and the install commands that fix a
mismatch.

Standard library only, and no import of flash_attn or torch: setup.py and the wheel
factory (``scripts/factory``) load this file by its path, where importing the package
would import torch and run the check at import.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

PROJECT = "flash-attn"
# the file setup.py writes next to the extension (in-place, in the wheel, editable)
RECORD_NAME = "_built_against.json"
RECORD_FORMAT = 1
# set to 1 to import a build under a torch it was not built for (at your own risk)
SKIP_CHECK_ENV = "FLASH_ATTN_SKIP_TORCH_CHECK"
# README.md, "Wheels": one index per variant under <host>/whl/<variant>/simple; where
# your wheels are published, set FLASH_ATTN_INDEX_URL and messages name it
INDEX_PLACEHOLDER = "https://<host>"
INDEX_URL_ENV = "FLASH_ATTN_INDEX_URL"
# PyTorch's own per-CUDA indexes (".../whl/cu130"); the package index (PyPI) carries
# only the default CUDA build of each torch release
TORCH_INDEX = "https://download.pytorch.org/whl"

_MINOR_RE = re.compile(r"^\s*(\d+)\.(\d+)")
_LABEL_RE = re.compile(r"^cu(\d+)(\d)torch(\d+\.\d+)cxx11abi(true|false)$", re.IGNORECASE)


class VariantError(ValueError):
    """A version, label or build record that cannot be read."""


def minor_of(version: str) -> str:
    """'2.13' from '2.13.0+cu130' (also '2.13'); VariantError naming the value otherwise."""
    m = _MINOR_RE.match(version)
    if m is None:
        raise VariantError(f"version {version!r} does not start with major.minor (e.g. 2.13.0)")
    return f"{int(m.group(1))}.{int(m.group(2))}"


def major_of(version: str) -> int:
    """13 from '13.0' or '13.0.88'."""
    return int(minor_of(version).split(".")[0])


def public_version(version: str) -> str:
    """'2.13.0' from '2.13.0+cpu': what a requirement pins without a local label."""
    return version.partition("+")[0]


def index_base() -> str:
    """Where the variant indexes are published: $FLASH_ATTN_INDEX_URL, else a placeholder."""
    return os.environ.get(INDEX_URL_ENV, "").strip() or INDEX_PLACEHOLDER


def abi_text(cxx11abi: bool) -> str:
    return "TRUE" if cxx11abi else "FALSE"


@dataclass(frozen=True)
class TorchFacts:
    """One torch: the one running, or the one an extension was compiled against."""

    version: str  # torch.__version__: "2.13.0+cu130"
    cuda: str | None  # torch.version.cuda: "13.0"; None for a CPU build
    cxx11abi: bool  # torch._C._GLIBCXX_USE_CXX11_ABI
    # importlib.metadata.version("torch"), what pip compares a requirement with (PyPI's
    # wheels say "2.13.0" where torch.__version__ says "2.13.0+cu130"); None: unknown
    dist_version: str | None = None

    @property
    def minor(self) -> str:
        return minor_of(self.version)

    @property
    def cuda_major(self) -> int | None:
        return None if self.cuda is None else major_of(self.cuda)

    def describe(self) -> str:
        """'torch 2.13.0+cu130 (CUDA 13.0, C++11 ABI TRUE)'."""
        cuda = f"CUDA {self.cuda}" if self.cuda else "CPU build, no CUDA"
        return f"torch {self.version} ({cuda}, C++11 ABI {abi_text(self.cxx11abi)})"

    def requirement(self) -> str:
        """'torch==2.13.0': a requirement the installed torch satisfies, so that pip keeps
        it (public version: it matches any local label, +cpu or +cu130)."""
        return f"torch=={public_version(self.dist_version or self.version)}"


@dataclass(frozen=True)
class Variant:
    """The (CUDA, torch minor, C++ ABI) a wheel is built for; one package index each."""

    cuda: str  # "13.0"
    torch: str  # "2.13"
    cxx11abi: bool

    @property
    def cuda_tag(self) -> str:
        return "cu" + self.cuda.replace(".", "")

    @property
    def name(self) -> str:
        """'cu130-torch2.13-cxx11abiTRUE': the index a wheel is published in."""
        return f"{self.cuda_tag}-torch{self.torch}-cxx11abi{abi_text(self.cxx11abi)}"

    @property
    def local_label(self) -> str:
        """'cu130torch2.13cxx11abiTRUE': the PEP 440 local label of its wheels."""
        return f"{self.cuda_tag}torch{self.torch}cxx11abi{abi_text(self.cxx11abi)}"

    def index_url(self, base: str = INDEX_PLACEHOLDER) -> str:
        return f"{base.rstrip('/')}/whl/{self.name}/simple"

    def pip_install(
        self, base: str = INDEX_PLACEHOLDER, keep: TorchFacts | None = None, replace: bool = False
    ) -> str:
        """The pip command that installs this variant and leaves torch as it is.

        Only the variant's index is named (no PyPI), so pip cannot pick upstream's
        ``flash-attn`` of the same name, nor bring another torch. ``keep`` pins the
        installed torch (the resolver then fails instead of replacing it); ``replace``
        swaps an installed flash-attn, whose version pip would otherwise call
        "already satisfied", without touching its dependencies.
        """
        index = f"--index-url {self.index_url(base)}"
        if replace:
            return f"pip install --force-reinstall --no-deps {PROJECT} {index}"
        pin = f' "{keep.requirement()}"' if keep is not None else ""
        return f"pip install {PROJECT}{pin} {index}"

    @classmethod
    def from_label(cls, label: str) -> Variant | None:
        """The variant of a local label ('cu130torch2.13cxx11abiTRUE'), None if it is
        not one (a build without a label, or a label of another form)."""
        m = _LABEL_RE.match(label.strip())
        if m is None:
            return None
        cuda = f"{int(m.group(1))}.{m.group(2)}"
        return cls(cuda, m.group(3), m.group(4).upper() == "TRUE")

    @classmethod
    def for_torch(cls, torch: TorchFacts, cuda: str | None = None) -> Variant:
        """The variant that fits a torch: its CUDA (or ``cuda`` for a CPU build, which
        has none), its minor, its ABI."""
        chosen = torch.cuda or cuda
        if chosen is None:
            raise VariantError(
                f"{torch.describe()} is a CPU build and no CUDA version was given; "
                "the variant needs one (e.g. 13.0)"
            )
        return cls(minor_of(chosen), torch.minor, torch.cxx11abi)


def torch_install_command(torch_minor: str, cuda: str) -> str:
    """pip command for a CUDA build of torch (PyTorch's index for that CUDA)."""
    tag = "cu" + minor_of(cuda).replace(".", "")
    return f'pip install "torch=={torch_minor}.*" --index-url {TORCH_INDEX}/{tag}'


@dataclass(frozen=True)
class BuiltAgainst:
    """What setup.py compiled flash_attn._C against (the record next to it)."""

    torch: TorchFacts  # the torch whose headers and libraries it was built with
    cuda: str  # the CUDA toolkit (nvcc) that compiled the kernels: "13.0"

    @property
    def variant(self) -> Variant:
        return Variant(minor_of(self.cuda), self.torch.minor, self.torch.cxx11abi)

    def to_json(self) -> str:
        data = {
            "format": RECORD_FORMAT,
            "torch": self.torch.version,
            "torch_cuda": self.torch.cuda,
            "cxx11abi": self.torch.cxx11abi,
            "cuda": self.cuda,
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = RECORD_NAME) -> BuiltAgainst:
        try:
            data = json.loads(text)
            if data.get("format") != RECORD_FORMAT:
                raise VariantError(f"format {data.get('format')!r}, expected {RECORD_FORMAT}")
            torch = TorchFacts(
                version=str(data["torch"]),
                cuda=None if data["torch_cuda"] is None else str(data["torch_cuda"]),
                cxx11abi=bool(data["cxx11abi"]),
            )
            record = cls(torch, str(data["cuda"]))
            for version in (record.cuda, record.torch.version):
                minor_of(version)  # raises on a version without major.minor
            return record
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VariantError(
                f"{where} is not a build record of this flash_attn ({type(exc).__name__}: "
                f'{exc}); expected JSON {{"format": {RECORD_FORMAT}, "torch": "2.13.0", '
                '"torch_cuda": "13.0" or null, "cxx11abi": true, "cuda": "13.0"}. '
                "Rebuild or reinstall flash_attn."
            ) from exc


@dataclass(frozen=True)
class Mismatch:
    """One way a build does not fit the running torch."""

    what: str  # "torch", "C++11 ABI", "CUDA"
    built: str  # "torch 2.14"
    running: str  # "torch 2.13.0+cu130"

    def describe(self) -> str:
        return f"built for {self.built}, running {self.running}"


def mismatches(built: BuiltAgainst, running: TorchFacts) -> list[Mismatch]:
    """Where the running torch differs from the one the extension was built for.

    The torch minor must be equal (a build for 2.13.x runs on any 2.13.y: torch keeps
    its C++ API within a minor); so must the C++ ABI. The CUDA major of the kernels
    must be the running torch's (the driver that runs torch's CUDA runs ours then);
    a CPU build of torch is no mismatch here: it imports, and no kernel can run.
    """
    found = []
    if built.torch.minor != running.minor:
        found.append(
            Mismatch("torch", f"torch {built.torch.minor}", f"torch {running.version}")
        )
    if built.torch.cxx11abi != running.cxx11abi:
        found.append(
            Mismatch(
                "C++11 ABI",
                f"C++11 ABI {abi_text(built.torch.cxx11abi)}",
                f"C++11 ABI {abi_text(running.cxx11abi)}",
            )
        )
    if running.cuda is not None and major_of(built.cuda) != running.cuda_major:
        found.append(Mismatch("CUDA", f"CUDA {built.cuda}", f"CUDA {running.cuda}"))
    return found
