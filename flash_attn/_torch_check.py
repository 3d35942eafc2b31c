"""The check at ``import flash_attn``: a build of flash_attn._C made for another torch
refuses to be imported, with what to install instead.

The extension links against one torch's C++ library; under another torch minor (or
C++ ABI) it fails with an undefined symbol at best, and at worst loads and misbehaves.
setup.py records what it compiled against next to the extension (flash_attn/_variant.py,
``BuiltAgainst``); importing the package compares that record with the running torch
before anything loads the extension. Nothing is checked where there is no extension
(a checkout that is not built: the first attention call says so) or no record (a
build from before records were written).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flash_attn._variant import (
    INDEX_PLACEHOLDER,
    INDEX_URL_ENV,
    PROJECT,
    RECORD_NAME,
    SKIP_CHECK_ENV,
    BuiltAgainst,
    Mismatch,
    TorchFacts,
    Variant,
    VariantError,
    index_base,
    mismatches,
)
from flash_attn.errors import FlashAttnError

PACKAGE_DIR = Path(__file__).resolve().parent
EXTENSION_STEM = "_C"
DOCTOR_MODULES = ("flash_attn", "flash_attn.__main__")
# python options that take a value (`-W error`, `-Werror`); `-c` ends the options
_OPTIONS_WITH_VALUE = "WX"


class TorchMismatchError(FlashAttnError, ImportError):
    """flash_attn._C was built for another torch minor, C++ ABI or CUDA major.

    An ImportError, as the failed load of a mismatched extension would be: code that
    treats ``import flash_attn`` failing as "flash_attn is not usable" keeps working.
    """


def running_torch(distribution: bool = True) -> TorchFacts:
    """The torch this Python imports (with its distribution's version where asked:
    a look through the installed packages' metadata)."""
    import torch

    dist: str | None = None
    if distribution:
        try:
            dist = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            pass
    return TorchFacts(
        version=str(torch.__version__),
        cuda=torch.version.cuda,
        cxx11abi=bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        dist_version=dist,
    )


@dataclass(frozen=True)
class Installed:
    """This flash_attn: where it is, its compiled extension and that build's record."""

    package_dir: Path
    version: str  # the distribution's version with its label where installed, else __version__
    distribution: bool  # an installed flash-attn distribution is this package (pip sees it)
    extension: Path | None  # flash_attn/_C.<suffix>; None: not built
    record: BuiltAgainst | None
    # why the record next to the extension cannot be read; "" also where there is none
    # (a build from before records were written: record None, nothing checked)
    record_error: str

    @property
    def source_checkout(self) -> bool:
        root = self.package_dir.parent
        return (root / "setup.py").is_file() and (root / "csrc").is_dir()


def _distribution_version(package_dir: Path) -> str | None:
    """The flash-attn distribution's version when it is the package at package_dir."""
    try:
        dist = importlib.metadata.distribution(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        return None
    init = Path(str(dist.locate_file("flash_attn/__init__.py")))
    editable = not any(str(f).startswith("flash_attn/") for f in dist.files or ())
    if editable or (init.exists() and init.resolve() == package_dir / "__init__.py"):
        return dist.version
    return None


def find_extension(package_dir: Path) -> Path | None:
    """flash_attn/_C with one of this interpreter's extension suffixes, as import finds it."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = package_dir / f"{EXTENSION_STEM}{suffix}"
        if path.is_file():
            return path
    return None


def read_build(package_dir: Path) -> tuple[Path | None, BuiltAgainst | None, str]:
    """The extension, its build record (None where there is none) and why the record
    cannot be read ("" where it can or there is none)."""
    extension = find_extension(package_dir)
    if extension is None:
        return None, None, ""
    path = extension.parent / RECORD_NAME
    try:
        return extension, BuiltAgainst.from_json(path.read_text(), str(path)), ""
    except FileNotFoundError:
        return extension, None, ""
    except (OSError, VariantError) as exc:
        return extension, None, str(exc)


def locate(package_dir: Path = PACKAGE_DIR, version: str = "") -> Installed:
    """This flash_attn; `version` is flash_attn.__version__ (the fallback)."""
    package_dir = package_dir.resolve()
    dist_version = _distribution_version(package_dir)
    extension, record, error = read_build(package_dir)
    return Installed(
        package_dir=package_dir,
        version=dist_version or version or "?",
        distribution=dist_version is not None,
        extension=extension,
        record=record,
        record_error=error,
    )


def needed_variant(running: TorchFacts, record: BuiltAgainst | None) -> Variant | None:
    """The variant that fits the running torch (the stable one from the floor the build
    records on); a CPU torch takes the build's CUDA."""
    cuda = running.cuda or (record.cuda if record is not None else None)
    floor = record.stable_floor if record is not None else None
    return None if cuda is None else Variant.for_torch(running, cuda, floor)


def fix_lines(
    installed: Installed, running: TorchFacts, base_url: str, variant: Variant | None
) -> list[str]:
    """What to run: rebuild a source checkout, else install the variant of this torch."""
    if installed.source_checkout:
        return [
            f"This is a source checkout ({installed.package_dir.parent}): rebuild it against "
            "the torch installed now:",
            "",
            "    make build        # or: pip install --no-build-isolation -e .",
        ]
    if variant is None:
        return ["Install a CUDA build of torch first; `python -m flash_attn` names the variant."]
    command = variant.pip_install(base_url, keep=running, replace=installed.distribution)
    lines = [
        f"Install the flash-attn built for your torch, variant {variant.name} "
        f"(this keeps your torch {running.version}):",
        "",
        f"    {command}",
    ]
    if INDEX_PLACEHOLDER in base_url:
        lines += [
            "",
            f"(<host>: where your flash-attn wheels are published; set {INDEX_URL_ENV} and "
            'this message names it. README.md, "Install".)',
        ]
    return lines


def describe_build(built: BuiltAgainst) -> str:
    """'torch 2.14.0+cu130 (CUDA 13.0, C++11 ABI TRUE), kernels CUDA 13.0 (variant ...)';
    a stable-ABI build says so and from which torch on it loads."""
    kernels = f"kernels CUDA {built.cuda} (variant {built.variant.name})"
    if built.stable:
        floor = f"any torch >= {built.stable_floor}"
        return f"the stable ABI, {floor} (compiled with {built.torch.describe()}), {kernels}"
    return f"{built.torch.describe()}, {kernels}"


def mismatch_message(
    installed: Installed,
    built: BuiltAgainst,
    running: TorchFacts,
    found: Sequence[Mismatch],
    base_url: str,
) -> str:
    if built.stable and any(m.what != "CUDA" for m in found):
        why = (
            f"its compiled extension (flash_attn._C) uses torch's stable ABI as of torch "
            f"{built.stable_floor}, which an older torch does not have"
        )
    elif any(m.what != "CUDA" for m in found):
        why = (
            "its compiled extension (flash_attn._C) links against another torch's C++ "
            "library and would fail with an undefined symbol or, worse, load and misbehave"
        )
    else:
        why = (
            f"its kernels are CUDA {built.cuda} code, and a CUDA {running.cuda} torch does "
            "not say that the driver runs them"
        )
    lines = [
        f"flash_attn {installed.version} ({installed.package_dir}) was "
        f"{'; '.join(m.describe() for m in found)}. It is not imported: {why}.",
        f"  built against: {describe_build(built)}",
        f"  running:       {running.describe()}",
        "",
        *fix_lines(installed, running, base_url, needed_variant(running, built)),
        "",
        f"`python -m flash_attn` checks the whole installation; {SKIP_CHECK_ENV}=1 imports "
        "it anyway, at your own risk.",
    ]
    return "\n".join(lines)


def import_error(installed: Installed, running: TorchFacts, base_url: str) -> str:
    """Why this build must not be imported under `running` ("" when it may)."""
    if installed.extension is None:
        return ""
    if installed.record is None:
        if not installed.record_error:  # built before records were written
            return ""
        return (
            f"cannot tell which torch flash_attn._C ({installed.extension}) was built for: "
            f"{installed.record_error}. {SKIP_CHECK_ENV}=1 imports it anyway."
        )
    found = mismatches(installed.record, running)
    if not found:
        return ""
    return mismatch_message(installed, installed.record, running, found, base_url)


def _module_run(argv: Sequence[str]) -> str | None:
    """The module of `python [options] -m MODULE ...` (sys.orig_argv), else None."""
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        if arg == "--" or not arg.startswith("-") or arg.startswith("--"):
            return None
        flags = arg[1:]
        for i, flag in enumerate(flags):
            rest = flags[i + 1 :]
            if flag == "m":
                return rest or (args[0] if args else None)
            if flag == "c":
                return None
            if flag in _OPTIONS_WITH_VALUE:
                if not rest and args:
                    args.pop(0)
                break
    return None


def invoked_as_doctor() -> bool:
    """Whether this import is `python -m flash_attn` locating its __main__: the doctor
    must run exactly where the check would refuse the import."""
    if sys.argv[:1] != ["-m"]:  # Python sets argv[0] to "-m" while it locates the module
        return False
    return _module_run(getattr(sys, "orig_argv", ())) in DOCTOR_MODULES


def skip_requested() -> bool:
    return os.environ.get(SKIP_CHECK_ENV, "").strip() not in ("", "0")


def check_at_import(version: str) -> None:
    """Raise TorchMismatchError when flash_attn._C was built for another torch
    (`version`: flash_attn.__version__, named in the message where no distribution is)."""
    if skip_requested() or invoked_as_doctor():
        return
    # the common case costs a stat or two and a small read; the metadata that the
    # message names (the distribution's versions) is looked up only for a message
    extension, record, record_error = read_build(PACKAGE_DIR)
    if extension is None or (record is None and not record_error):
        return
    if record is not None and not mismatches(record, running_torch(distribution=False)):
        return
    error = import_error(locate(PACKAGE_DIR, version), running_torch(), index_base())
    if error:
        raise TorchMismatchError(error)
