"""Which build of flash_attn fits which torch.

A compiled flash_attn (its extension ``flash_attn._C``) has one of two bindings. The
stable one (LibTorch stable ABI, limited Python API) fits every torch from a floor
release on (recipes/stable_abi.json: 2.10) and one CUDA major: variant ``cu13-torchstable``,
label ``2.9.0+cu13torchstable``. The classic one, for torch below the floor, fits one
torch minor release, one C++ ABI and one CUDA major: variant
``cu130-torch2.9-cxx11abiTRUE``, label ``2.9.0+cu130torch2.9cxx11abiTRUE``. Wheels are
published in one package index per variant. This module owns
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
# cu<CUDA>torch<minor>cxx11abi<TRUE|FALSE>, then the kernel-content segments of a wheel
# built with a reduced kernel set (".ci", ".sm80sm90"; README.md, "Wheels").
_LABEL_RE = re.compile(
    r"^cu(\d+)(\d)torch(\d+\.\d+)cxx11abi(true|false)((?:\.[a-z0-9]+)*)$", re.IGNORECASE
)
# cu<CUDA major>torchstable, then the same kernel-content segments
_STABLE_LABEL_RE = re.compile(r"^cu(\d+)torchstable((?:\.[a-z0-9]+)*)$", re.IGNORECASE)
STABLE = "stable"  # Variant.torch of a stable-ABI build


class VariantError(ValueError):
    """A version, label or build record that cannot be read."""


def minor_of(version: str) -> str:
    """'2.13' from '2.13.0+cu130' (also '2.13'); VariantError naming the value otherwise."""
    m = _MINOR_RE.match(version)
    if m is None:
        raise VariantError(f"version {version!r} does not start with major.minor (e.g. 2.13.0)")
    return f"{int(m.group(1))}.{int(m.group(2))}"


def major_of(version: str) -> int:
    """13 from '13.0' or '13.0.88' (also '13')."""
    head = version.strip().split(".")[0]
    if head.isdigit() and "." not in version.strip():
        return int(head)
    return int(minor_of(version).split(".")[0])


def minor_key(version: str) -> tuple[int, int]:
    """(2, 13) from '2.13.0+cu130', for comparing minors."""
    major, minor = minor_of(version).split(".")
    return int(major), int(minor)


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
    """What a wheel is built for; one package index each. Classic: (CUDA, torch minor,
    C++ ABI). Stable (``torch == "stable"``): (CUDA major), any torch from the floor on.

    ``content`` is the kernel-content label of a wheel built with anything but the
    release kernel set ("ci", "ci.sm80sm90"): it keeps such wheels out of the release
    index and apart in their version label. Empty for release wheels.
    """

    cuda: str  # "13.0" (classic), "13" (stable: the CUDA major)
    torch: str  # "2.13", or "stable"
    cxx11abi: bool  # stable: True (every torch from the floor on is a C++11-ABI build)
    content: str = ""

    @classmethod
    def stable_for(cls, cuda: str, content: str = "") -> Variant:
        """The stable variant of a CUDA version's major ('13.0' -> cu13-torchstable)."""
        return cls(str(major_of(cuda)), STABLE, True, content)

    @property
    def stable(self) -> bool:
        return self.torch == STABLE

    @property
    def cuda_tag(self) -> str:
        return "cu" + self.cuda.replace(".", "")

    @property
    def _base_name(self) -> tuple[str, ...]:
        if self.stable:
            return (self.cuda_tag, "torchstable")
        return (self.cuda_tag, f"torch{self.torch}", f"cxx11abi{abi_text(self.cxx11abi)}")

    @property
    def name(self) -> str:
        """'cu130-torch2.13-cxx11abiTRUE', 'cu13-torchstable' (or '...-ci'): the index a
        wheel is published in."""
        base = "-".join(self._base_name)
        return "-".join([base, *self.content.split(".")]) if self.content else base

    @property
    def local_label(self) -> str:
        """'cu130torch2.13cxx11abiTRUE', 'cu13torchstable' (or '...TRUE.ci'): the PEP 440
        local label of its wheels."""
        base = "".join(self._base_name)
        return f"{base}.{self.content}" if self.content else base

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
        stable = _STABLE_LABEL_RE.match(label.strip())
        if stable is not None:
            return cls(str(int(stable.group(1))), STABLE, True, stable.group(2).lower().lstrip("."))
        m = _LABEL_RE.match(label.strip())
        if m is None:
            return None
        cuda = f"{int(m.group(1))}.{m.group(2)}"
        content = m.group(5).lower().lstrip(".")
        return cls(cuda, m.group(3), m.group(4).upper() == "TRUE", content)

    @classmethod
    def for_torch(
        cls, torch: TorchFacts, cuda: str | None = None, stable_floor: str | None = None
    ) -> Variant:
        """The variant that fits a torch: the stable one of its CUDA major where the
        torch is at or past ``stable_floor``, else the classic one of its CUDA, minor and
        ABI (``cuda`` stands in for a CPU build's, which has none)."""
        chosen = torch.cuda or cuda
        if chosen is None:
            raise VariantError(
                f"{torch.describe()} is a CPU build and no CUDA version was given; "
                "the variant needs one (e.g. 13.0)"
            )
        if stable_floor is not None and minor_key(torch.version) >= minor_key(stable_floor):
            return cls.stable_for(chosen)
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
    # "stable" (LibTorch stable ABI: every torch from stable_floor on) or "classic"
    binding: str = "classic"
    # the oldest torch the stable builds of this distribution serve (recipes/stable_abi.json),
    # in every record: a classic build under a newer torch names the stable variant
    stable_floor: str | None = None

    @property
    def stable(self) -> bool:
        return self.binding == "stable"

    @property
    def variant(self) -> Variant:
        if self.stable:
            return Variant.stable_for(self.cuda)
        return Variant(minor_of(self.cuda), self.torch.minor, self.torch.cxx11abi)

    def to_json(self) -> str:
        data: dict[str, object] = {
            "format": RECORD_FORMAT,
            "torch": self.torch.version,
            "torch_cuda": self.torch.cuda,
            "cxx11abi": self.torch.cxx11abi,
            "cuda": self.cuda,
        }
        data["binding"] = self.binding
        if self.stable_floor is not None:
            data["stable_floor"] = self.stable_floor
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
            floor = data.get("stable_floor")
            binding = str(data.get("binding", "classic"))
            if binding not in ("classic", "stable") or (binding == "stable" and floor is None):
                raise ValueError(f"binding {binding!r} (stable_floor {floor!r})")
            record = cls(torch, str(data["cuda"]), binding, None if floor is None else str(floor))
            for version in (record.cuda, record.torch.version, floor or "0.0"):
                minor_of(version)  # raises on a version without major.minor
            return record
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VariantError(
                f"{where} is not a build record of this flash_attn ({type(exc).__name__}: "
                f'{exc}); expected JSON {{"format": {RECORD_FORMAT}, "torch": "2.13.0", '
                '"torch_cuda": "13.0" or null, "cxx11abi": true, "cuda": "13.0", and '
                '"binding": "stable" or "classic", "stable_floor": "2.10"}. '
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

    A stable-ABI build needs a torch at or past its floor (any C++ ABI: it passes no
    C++ type across). A classic build needs the torch minor it was built for (a build for
    2.13.x runs on any 2.13.y: torch keeps its C++ API within a minor) and its C++ ABI.
    Either way the CUDA major of the kernels must be the running torch's (the driver
    that runs torch's CUDA runs ours then); a CPU build of torch is no mismatch here: it
    imports, and no kernel can run.
    """
    found = []
    if built.stable and built.stable_floor is not None:
        if minor_key(running.version) < minor_key(built.stable_floor):
            found.append(
                Mismatch("torch", f"torch >= {built.stable_floor}", f"torch {running.version}")
            )
    elif built.torch.minor != running.minor:
        found.append(Mismatch("torch", f"torch {built.torch.minor}", f"torch {running.version}"))
    if not built.stable and built.torch.cxx11abi != running.cxx11abi:
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
