"""What one build makes: the contract between whoever asks for a build (the wheel
factory, a developer's `make build`) and setup.py, which alone decides what that means.

The factory writes a BuildRequest as JSON and points FLASH_ATTN_BUILD_REQUEST at it;
without that variable setup.py makes the developer's request from the environment (the
build knobs of README.md) and the torch it builds against. The request says what goes
into the wheel (binding, kernel set, version label, torch requirement, C++ standard);
how fast it is built (MAX_JOBS, NVCC_THREADS, memory) stays in the environment.

Standard library only: setup.py loads this before torch, on every CPython a cell uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .knobs import BuildConfigError

REQUEST_ENV = "FLASH_ATTN_BUILD_REQUEST"
BINDING_ENV = "FLASH_ATTN_BINDING"
LABEL_ENV = "FLASH_ATTN_LOCAL_VERSION"
BINDINGS = ("classic", "stable")
CXX_STANDARDS = ("c++17", "c++20")
STABLE_ABI_JSON = Path(__file__).resolve().parent.parent / "recipes" / "stable_abi.json"
# the kernel-content knobs a request carries (README.md, "Build knobs"); "" = default
KERNEL_KNOBS = {
    "archs": "FLASH_ATTN_CUDA_ARCHS",
    "head_dims": "FLASH_ATTN_HEAD_DIMS",
    "dtypes": "FLASH_ATTN_DTYPES",
    "backward": "FLASH_ATTN_BACKWARD",
}
_MINOR_RE = re.compile(r"^\s*(\d+)\.(\d+)")


def minor_tuple(version: str, what: str) -> tuple[int, int]:
    """(2, 13) from '2.13.0+cu130'; BuildConfigError naming the value otherwise."""
    m = _MINOR_RE.match(version)
    if m is None:
        raise BuildConfigError(f"{what} {version!r} does not start with major.minor (e.g. 2.13)")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class StableAbi:
    """recipes/stable_abi.json: the oldest torch and CPython the stable binding serves."""

    torch_floor: str  # "2.10"
    python_floor: str  # "3.10"

    @classmethod
    def load(cls, path: Path = STABLE_ABI_JSON) -> StableAbi:
        try:
            data = json.loads(path.read_text())
            abi = cls(str(data["torch_floor"]), str(data["python_floor"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BuildConfigError(
                f"cannot read {path}: {e}; expected JSON with torch_floor and python_floor"
            ) from e
        minor_tuple(abi.torch_floor, f"{path}: torch_floor")
        minor_tuple(abi.python_floor, f"{path}: python_floor")
        return abi

    def serves(self, torch_version: str) -> bool:
        return minor_tuple(torch_version, "torch version") >= minor_tuple(
            self.torch_floor, "torch_floor"
        )

    @property
    def target_version(self) -> str:
        """TORCH_TARGET_VERSION for the floor: 0x020a000000000000 for 2.10
        (torch/csrc/stable/version.h: major << 56 | minor << 48)."""
        major, minor = minor_tuple(self.torch_floor, "torch_floor")
        return f"0x{(major << 56) | (minor << 48):016x}"

    @property
    def limited_api(self) -> str:
        """Py_LIMITED_API for the floor: 0x030a0000 for 3.10."""
        major, minor = minor_tuple(self.python_floor, "python_floor")
        return f"0x{major:02x}{minor:02x}0000"

    @property
    def abi3_tag(self) -> str:
        """'cp310': bdist_wheel's py_limited_api, the wheel's 'cp310-abi3'."""
        major, minor = minor_tuple(self.python_floor, "python_floor")
        return f"cp{major}{minor}"

    @property
    def requirement(self) -> str:
        return f"torch>={self.torch_floor}"


def cxx_std_for(torch_version: str) -> str:
    """torch >= 2.13 headers need C++20; older ones build with C++17."""
    return "c++20" if minor_tuple(torch_version, "torch version") >= (2, 13) else "c++17"


@dataclass(frozen=True)
class BuildRequest:
    """One build: what its wheel contains and what it requires."""

    binding: str  # "classic": one torch minor; "stable": torch >= the floor, abi3
    local_label: str  # PEP 440 local label ("cu130torch2.14cxx11abiTRUE"); "" = none
    torch_requirement: str  # the wheel's Requires-Dist on torch: "torch==2.14.*"
    cxx_std: str  # the binding's C++ standard, from the torch it compiles against
    # kernel content, in the build knobs' own syntax; "" = setup.py's default
    archs: str = ""
    head_dims: str = ""
    dtypes: str = ""
    backward: str = ""

    def __post_init__(self) -> None:
        if self.binding not in BINDINGS:
            raise BuildConfigError(f"binding {self.binding!r} is not one of {', '.join(BINDINGS)}")
        if self.cxx_std not in CXX_STANDARDS:
            raise BuildConfigError(
                f"cxx_std {self.cxx_std!r} is not one of {', '.join(CXX_STANDARDS)}"
            )
        if not self.torch_requirement.startswith("torch"):
            raise BuildConfigError(
                f"torch_requirement {self.torch_requirement!r} is not a requirement on torch "
                "(e.g. torch==2.14.* or torch>=2.10)"
            )

    @property
    def stable(self) -> bool:
        return self.binding == "stable"

    def kernel_env(self) -> dict[str, str]:
        """The kernel-content knobs as setup.py reads them (unset ones left out)."""
        return {
            env: getattr(self, name) for name, env in KERNEL_KNOBS.items() if getattr(self, name)
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def from_json(cls, text: str, where: str) -> BuildRequest:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise BuildConfigError(f"{where} is not JSON: {e}") from e
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else data
            raise BuildConfigError(
                f"{where}: unknown fields {extra}; a build request has {', '.join(sorted(known))}"
            )
        try:
            return cls(**{k: str(v) for k, v in data.items()})
        except TypeError as e:
            raise BuildConfigError(f"{where}: {e}") from e

    @classmethod
    def read(cls, path: Path) -> BuildRequest:
        try:
            text = path.read_text()
        except OSError as e:
            raise BuildConfigError(f"{REQUEST_ENV}={path}: cannot read it ({e})") from e
        return cls.from_json(text, f"{REQUEST_ENV}={path}")


def classic_requirement(torch_version: str) -> str:
    major, minor = minor_tuple(torch_version, "torch version")
    return f"torch=={major}.{minor}.*"


def developer_request(env: Mapping[str, str], torch_version: str, abi: StableAbi) -> BuildRequest:
    """A request from the environment, for `make build` / `pip install -e .`:
    FLASH_ATTN_BINDING (auto: stable where the torch is at or past the floor),
    FLASH_ATTN_LOCAL_VERSION and the kernel knobs."""
    choice = env.get(BINDING_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", *BINDINGS):
        raise BuildConfigError(
            f"{BINDING_ENV}={choice!r}; valid: auto (stable for torch >= {abi.torch_floor}), "
            + ", ".join(BINDINGS)
        )
    if choice == "stable" and not abi.serves(torch_version):
        raise BuildConfigError(
            f"{BINDING_ENV}=stable needs torch >= {abi.torch_floor} (the stable ABI floor, "
            f"recipes/stable_abi.json); this torch is {torch_version}. Use classic or auto."
        )
    binding = choice if choice != "auto" else ("stable" if abi.serves(torch_version) else "classic")
    kernel = {name: env.get(var, "").strip() for name, var in KERNEL_KNOBS.items()}
    return BuildRequest(
        binding=binding,
        local_label=env.get(LABEL_ENV, "").strip(),
        torch_requirement=abi.requirement
        if binding == "stable"
        else classic_requirement(torch_version),
        cxx_std=cxx_std_for(torch_version),
        **kernel,
    )
