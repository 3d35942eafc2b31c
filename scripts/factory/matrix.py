"""The build matrix: recipes/matrix.toml in, a list of validated cells out.

A selection is a preset name, an inline string of ``axis=value[,value...]``
tokens, or both (``"ci torch=2.13"``: the preset with one axis replaced). Every
value is checked against the axes and the torch compatibility table; a mistake
raises MatrixError naming the value and what is valid.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from build_tools.knobs import (
    VALID_ARCHS,
    BuildConfigError,
    knobs_from_env,
    load_catalog,
    parse_archs,
)
from build_tools.request import BuildRequest, StableAbi

from .errors import FactoryError, MatrixError
from .torch_metadata import (
    TORCH_CONFIG,
    cuda_from_requires,
    cxx_std_from_cmake,
    minor_of,
    public_version,
    python_lower_bound,
)
from .variant import Variant

REPO = Path(__file__).resolve().parents[2]
MATRIX_TOML = REPO / "recipes" / "matrix.toml"
KERNEL_CATALOG = REPO / "csrc" / "kernels" / "generate.py"

# axes that fan out into cells, and the settings that apply to every cell
FAN_OUT_AXES = ("cuda", "rocm", "torch", "python", "cxx11abi", "platform")
SETTINGS = ("kernels", "archs", "memory", "cpus", "binding")
# binding= of a selection: auto (stable cells from the floor on), or one for every torch
BINDING_CHOICES = ("auto", "stable", "classic")
ALL = "all"
LIMIT_KEYS = ("memory", "cpus")
_MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str, where: str) -> int:
    """'6g', '512m', '6GiB', '1073741824' -> bytes (the units docker and podman take)."""
    m = _MEMORY_RE.match(str(text).strip())
    if m is None or float(m.group(1)) <= 0:
        raise MatrixError(f"{where}: memory {text!r} is not a size; write e.g. 6g, 512m or 6GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_cpus(value: object, where: str) -> float:
    try:
        cpus = float(str(value))
    except ValueError:
        cpus = 0.0
    if not cpus > 0:
        raise MatrixError(f"{where}: cpus {value!r} is not a positive number, e.g. 2 or 1.5")
    return cpus


@dataclass(frozen=True)
class CellLimits:
    """What a cell's container may use (ENGINE=docker|podman); None: no limit."""

    memory_bytes: int | None = None
    cpus: float | None = None

    @property
    def memory_text(self) -> str:
        """The memory limit as docker/podman take it: 6g, 512m, or bytes."""
        n = self.memory_bytes
        if n is None:
            return ""
        for unit, size in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
            if n % size == 0:
                return f"{n // size}{unit}"
        return f"{n}b"

    @property
    def cpus_text(self) -> str:
        return "" if self.cpus is None else f"{self.cpus:g}"

    def describe(self) -> str:
        memory = self.memory_text or "no memory limit"
        cpus = f"{self.cpus_text} CPUs" if self.cpus is not None else "no CPU limit"
        return f"{memory}, {cpus}"

    def merged(self, table: dict[str, Any], where: str) -> CellLimits:
        """These limits with a TOML table's (or a selection's) entries over them."""
        unknown = sorted(set(table) - set(LIMIT_KEYS))
        if unknown:
            raise MatrixError(
                f"{where}: unknown limit {', '.join(unknown)}; valid: {', '.join(LIMIT_KEYS)}"
            )
        memory, cpus = self.memory_bytes, self.cpus
        if "memory" in table:
            memory = parse_memory(table["memory"], where)
        if "cpus" in table:
            cpus = parse_cpus(table["cpus"], where)
        return CellLimits(memory, cpus)


@dataclass(frozen=True)
class KernelSet:
    """The setup.py knobs one cell builds with.

    label: the set's segment of a wheel's version label and variant ("" for the release
    set); table_archs: the set's archs in matrix.toml (an `archs=` override differs)."""

    name: str
    archs: tuple[str, ...]
    head_dims: str = ""
    dtypes: str = ""
    backward: bool = True
    label: str = ""
    table_archs: tuple[str, ...] = ()

    @property
    def content_label(self) -> str:
        """What sets these wheel contents apart from the release set's: '' (the release
        set as the table has it), 'ci', 'sm90', 'ci.sm80sm90' (PEP 440 local segments)."""
        parts = [self.label] if self.label else []
        if self.table_archs and self.archs != self.table_archs:
            parts.append("".join(f"sm{a}" for a in self.archs))
        return ".".join(parts)

    def with_archs(self, archs: tuple[str, ...]) -> KernelSet:
        return replace(self, archs=archs, table_archs=self.table_archs or self.archs)

    def env(self) -> dict[str, str]:
        env = {"FLASH_ATTN_CUDA_ARCHS": ";".join(self.archs)}
        if self.head_dims:
            env["FLASH_ATTN_HEAD_DIMS"] = self.head_dims
        if self.dtypes:
            env["FLASH_ATTN_DTYPES"] = self.dtypes
        env["FLASH_ATTN_BACKWARD"] = "1" if self.backward else "0"
        return env


@dataclass(frozen=True)
class TorchRelease:
    """One row of the compatibility table: what a torch minor release is built for.

    From the generated block of matrix.toml (the index wheel's own metadata): version,
    python_min/max, index_cuda, cxx11abi[0], cxx_std; from [torch_builds] (by hand): the
    other CUDA builds and ABIs. `installed`: the row was made from the installed torch's
    metadata because the table does not know that torch (the `local` preset)."""

    minor: str
    python_min: str
    python_max: str
    cuda: tuple[str, ...]
    index_cuda: str
    cxx11abi: tuple[bool, ...]
    cxx_std: str
    version: str = ""
    installed: bool = False

    @property
    def requirement(self) -> str:
        """What pip installs for this minor (a hermetic toolchain, CI's torch-args)."""
        return f"torch=={self.minor}.*"

    def supports_python(self, python: str) -> bool:
        return _key(self.python_min) <= _key(python) <= _key(self.python_max)


@dataclass(frozen=True)
class Cell:
    """One wheel to build: (cuda, torch, python, cxx11abi, platform) and a kernel set."""

    cuda: str
    torch: str
    python: str
    cxx11abi: bool
    platform: str
    kernels: KernelSet
    torch_requirement: str = ""
    cxx_std: str = ""
    limits: CellLimits = CellLimits()
    # "classic": one torch minor, ABI and CPython. "stable": the LibTorch stable ABI, one
    # abi3 wheel for every torch from torch_floor on; `torch` and `python` are then only
    # the toolchain it is built with, not what it serves.
    binding: str = "classic"
    torch_floor: str = ""  # stable: recipes/stable_abi.json's torch_floor
    abi3_tag: str = ""  # stable: the wheel's python tag (cp310), python_floor's

    @property
    def stable(self) -> bool:
        return self.binding == "stable"

    @property
    def cuda_tag(self) -> str:
        return "cu" + self.cuda.replace(".", "")

    @property
    def abi_text(self) -> str:
        return "TRUE" if self.cxx11abi else "FALSE"

    @property
    def python_tag(self) -> str:
        return "cp" + self.python.replace(".", "")

    @property
    def variant_key(self) -> Variant:
        """cuda + torch + ABI, plus the kernel contents of any set but the release set
        (README, "Wheels"): the package's Variant, the one home of the names below."""
        if self.stable:
            return Variant.stable_for(self.cuda, self.kernels.content_label)
        return Variant(self.cuda, self.torch, self.cxx11abi, self.kernels.content_label)

    @property
    def variant(self) -> str:
        """The index a wheel goes to: cu130-torch2.13-cxx11abiTRUE(-ci)."""
        return self.variant_key.name

    @property
    def id(self) -> str:
        """cu130-torch2.13-cxx11abiTRUE-cp311 (classic), cu13-torchstable-abi3 (stable:
        keyed by the CUDA major and platform alone)."""
        return f"{self.variant}-abi3" if self.stable else f"{self.variant}-{self.python_tag}"

    @property
    def wheel_tags(self) -> tuple[str, str]:
        """The (python, abi) tags its wheel must carry: (cp310, abi3), (cp311, cp311)."""
        if self.stable:
            return self.abi3_tag, "abi3"
        return self.python_tag, self.python_tag

    @property
    def local_label(self) -> str:
        """The PEP 440 local version label: 2.9.0+cu130torch2.13cxx11abiTRUE (release
        kernels), 2.9.0+cu130torch2.13cxx11abiTRUE.ci (the ci set)."""
        return self.variant_key.local_label

    @property
    def requires_torch(self) -> str:
        """The Requires-Dist line: the torch minor the wheel was built against (classic),
        every torch from the floor on (stable)."""
        if self.stable:
            return f"torch>={self.torch_floor}"
        return f"torch=={self.torch}.*"

    def request(self) -> BuildRequest:
        """What setup.py builds for this cell (the file FLASH_ATTN_BUILD_REQUEST names)."""
        k = self.kernels
        return BuildRequest(
            binding=self.binding,
            local_label=self.local_label,
            torch_requirement=self.requires_torch,
            cxx_std=self.cxx_std or "c++17",
            archs=";".join(k.archs),
            head_dims=k.head_dims,
            dtypes=k.dtypes,
            backward="1" if k.backward else "0",
        )

    def selection(self) -> str:
        """An inline MATRIX string that selects exactly this cell (its limits too)."""
        text = (
            f"cuda={self.cuda} torch={self.torch} python={self.python} "
            f"cxx11abi={self.abi_text} platform={self.platform} kernels={self.kernels.name} "
            f"archs={'+'.join(self.kernels.archs)} binding={self.binding}"
        )
        if self.limits.memory_bytes is not None:
            text += f" memory={self.limits.memory_text}"
        if self.limits.cpus is not None:
            text += f" cpus={self.limits.cpus_text}"
        return text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["id"] = self.id
        data["variant"] = self.variant
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        k = data["kernels"]
        kernels = KernelSet(
            k["name"],
            tuple(k["archs"]),
            k["head_dims"],
            k["dtypes"],
            bool(k["backward"]),
            k.get("label", ""),
            tuple(k.get("table_archs", ())),
        )
        lim = data.get("limits") or {}
        limits = CellLimits(lim.get("memory_bytes"), lim.get("cpus"))
        return cls(
            cuda=data["cuda"],
            torch=data["torch"],
            python=data["python"],
            cxx11abi=bool(data["cxx11abi"]),
            platform=data["platform"],
            kernels=kernels,
            torch_requirement=data.get("torch_requirement", ""),
            cxx_std=data.get("cxx_std", ""),
            limits=limits,
            binding=data.get("binding", "classic"),
            torch_floor=data.get("torch_floor", ""),
            abi3_tag=data.get("abi3_tag", ""),
        )


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    axes: dict[str, tuple[str, ...]]
    kernels: str
    local: bool = False
    skip_unsupported: bool = False


@dataclass(frozen=True)
class LocalFacts:
    """What this machine has, for the `local` preset and for axes a selection leaves out."""

    python: str  # "3.11"
    torch: str | None = None  # "2.13" when torch is installed
    torch_cuda: str | None = None  # "13.0" for a CUDA build of torch (torch.version.cuda)
    torch_cxx11abi: bool | None = None  # torch._C._GLIBCXX_USE_CXX11_ABI
    nvcc: str | None = None  # "13.0"
    # the installed torch's own metadata (importlib.metadata), for a torch the table lacks
    torch_version: str | None = None  # "2.15.0" (the distribution's version)
    torch_requires: tuple[str, ...] = ()  # its Requires-Dist
    torch_requires_python: str = ""  # its Requires-Python
    torch_dir: str | None = None  # where its package lies (share/cmake/Torch/...)


@dataclass(frozen=True)
class LimitsTable:
    """[limits] of matrix.toml: defaults, then per kernel set, then per preset."""

    default: CellLimits = CellLimits()
    kernels: dict[str, CellLimits] = field(default_factory=dict)
    presets: dict[str, CellLimits] = field(default_factory=dict)

    def for_cell(self, kernels: str, preset: str | None) -> CellLimits:
        if preset is not None and preset in self.presets:
            return self.presets[preset]
        return self.kernels.get(kernels, self.default)


def _load_limits(data: dict[str, Any], path: Path) -> LimitsTable:
    table = dict(data.get("limits", {}))
    per_kernels = table.pop("kernels", {})
    per_preset = table.pop("presets", {})
    default = CellLimits().merged(table, f"{path} [limits]")
    kernels = {
        name: default.merged(t, f"{path} [limits.kernels.{name}]")
        for name, t in per_kernels.items()
    }
    presets = {}
    for name, t in per_preset.items():
        kernels_name = str(data.get("presets", {}).get(name, {}).get("kernels", "full"))
        base = kernels.get(kernels_name, default)
        presets[name] = base.merged(t, f"{path} [limits.presets.{name}]")
    return LimitsTable(default, kernels, presets)


@dataclass(frozen=True)
class TorchIndex:
    """[torch_index]: where `make refresh-matrix` reads torch's releases."""

    url: str = "https://pypi.org/simple"
    project: str = "torch"
    since: str = "2.3"


@dataclass(frozen=True)
class SmokePair:
    """A (torch minor, CPython) a stable wheel is smoke-tested under."""

    torch: str
    python: str

    @property
    def name(self) -> str:
        return f"torch{self.torch}-cp{self.python.replace('.', '')}"


@dataclass(frozen=True)
class StableSpec:
    """[stable] of matrix.toml, with recipes/stable_abi.json's floors."""

    abi: StableAbi
    build_python: str
    smoke: tuple[SmokePair, ...]

    def serves(self, torch_minor: str) -> bool:
        return self.abi.serves(torch_minor)


def _stable_spec(data: dict[str, Any], path: Path) -> StableSpec:
    table = data.get("stable", {})
    unknown = sorted(set(table) - {"build_python", "smoke"})
    if unknown:
        raise MatrixError(
            f"{path} [stable]: unknown key {', '.join(unknown)}; valid: build_python, smoke"
        )
    try:
        abi = StableAbi.load()
    except BuildConfigError as e:
        raise MatrixError(str(e)) from e
    pairs = []
    for i, entry in enumerate(table.get("smoke", [])):
        if not isinstance(entry, dict) or set(entry) != {"torch", "python"}:
            raise MatrixError(
                f"{path} [stable].smoke[{i}] = {entry!r}: write "
                '{ torch = "2.13", python = "3.12" }'
            )
        pairs.append(SmokePair(str(entry["torch"]), str(entry["python"])))
    return StableSpec(abi, str(table.get("build_python", abi.python_floor)), tuple(pairs))


@dataclass(frozen=True)
class MatrixSpec:
    """recipes/matrix.toml, typed. The torch, cuda and python axes are derived from the
    torch table (every minor, every CUDA build, every CPython between the lowest and
    the highest any release has)."""

    axes: dict[str, tuple[str, ...]]
    kernels: dict[str, KernelSet]
    torch: dict[str, TorchRelease]
    presets: dict[str, Preset]
    source: str = str(MATRIX_TOML)
    limits: LimitsTable = field(default_factory=lambda: LimitsTable())
    torch_index: TorchIndex = TorchIndex()
    # without a [stable] table: the recipe's floors, built with the floor CPython
    stable: StableSpec = field(default_factory=lambda: _stable_spec({}, MATRIX_TOML))

    @property
    def newest_torch(self) -> str:
        return max(self.table_torch, key=_key)

    @property
    def table_torch(self) -> tuple[str, ...]:
        """The minors of the table itself (not one adopted from the installed torch)."""
        return tuple(m for m, r in self.torch.items() if not r.installed)

    @property
    def release_kernels(self) -> str:
        """The kernel set whose wheels carry the plain label (its label is empty)."""
        return next(k.name for k in self.kernels.values() if not k.label)


@dataclass(frozen=True)
class Selection:
    """A parsed MATRIX string."""

    preset: str | None
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    text: str = ""


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def _as_tuple(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise MatrixError(f"{where}: expected a string or a list of strings, got {value!r}")


def torch_index_of(data: dict[str, Any]) -> TorchIndex:
    """[torch_index] of a parsed matrix file (defaults where it says nothing)."""
    index = data.get("torch_index", {})
    return TorchIndex(
        url=str(index.get("url", TorchIndex.url)),
        project=str(index.get("project", TorchIndex.project)),
        since=str(index.get("since", TorchIndex.since)),
    )


def _kernel_set(name: str, k: dict[str, Any], where: str) -> KernelSet:
    try:
        archs = parse_archs(str(k["archs"]), f"{where}.archs")
        kernels = KernelSet(
            name=name,
            archs=archs,
            head_dims=str(k.get("head_dims", "")),
            dtypes=str(k.get("dtypes", "")),
            backward=bool(k.get("backward", True)),
            label=str(k.get("label", name)),
            table_archs=archs,
        )
        # every knob as setup.py will read it: a bad head dim or dtype stops here
        knobs_from_env(kernels.env(), load_catalog(KERNEL_CATALOG))
    except BuildConfigError as e:
        raise MatrixError(f"{where}: {e}") from e
    if kernels.label and not re.fullmatch(r"[a-z][a-z0-9]*", kernels.label):
        raise MatrixError(
            f"{where}.label {kernels.label!r} is not a version-label segment: lowercase "
            "letters and digits, starting with a letter"
        )
    return kernels


def _torch_table(data: dict[str, Any], path: Path) -> dict[str, TorchRelease]:
    """The generated rows, each with its hand-kept [torch_builds] entry merged in."""
    builds = data.get("torch_builds", {})
    unknown = sorted(set(builds) - set(data["torch"]), key=_key)
    if unknown:
        raise MatrixError(
            f"{path}: [torch_builds] names torch {', '.join(unknown)}, which the generated "
            f"table lacks (it has {', '.join(sorted(data['torch'], key=_key))}); run "
            "`make refresh-matrix`, or fix the entry"
        )
    table = {}
    for minor, t in data["torch"].items():
        where = f"{path} [torch.{minor!r}]"
        hand = builds.get(minor, {})
        index_abi = _parse_abi(str(t["cxx11abi"]), f"{where}.cxx11abi")
        hand_where = f"{path} [torch_builds.{minor!r}].cxx11abi"
        extra = [_parse_abi(x, hand_where) for x in hand.get("cxx11abi", [])]
        abis = [index_abi, *(a for a in extra if a != index_abi)]
        cuda = sorted({str(t["index_cuda"]), *map(str, hand.get("cuda", []))}, key=_key)
        for c in cuda:
            if not re.fullmatch(r"\d+\.\d+", c):
                raise MatrixError(f"{where}: cuda {c!r} is not a CUDA version like 13.0")
        python = _as_tuple(t["python"], f"{where}.python")
        if len(python) != 2:
            raise MatrixError(f"{where}.python: give [lowest, highest], got {list(python)}")
        table[minor] = TorchRelease(
            minor=minor,
            python_min=python[0],
            python_max=python[1],
            cuda=tuple(cuda),
            index_cuda=str(t["index_cuda"]),
            cxx11abi=tuple(abis),
            cxx_std=str(t["cxx_std"]),
            version=str(t.get("version", "")),
        )
    return table


def derived_axes(
    axes: dict[str, tuple[str, ...]], torch: dict[str, TorchRelease]
) -> dict[str, tuple[str, ...]]:
    """[axes] plus the axes the torch table owns: torch, cuda, python."""
    rows = list(torch.values())
    low = min((_key(r.python_min) for r in rows), default=(3, 9))
    high = max((_key(r.python_max) for r in rows), default=(3, 9))
    return {
        **axes,
        "torch": tuple(sorted(torch, key=_key)),
        "cuda": tuple(sorted({c for r in rows for c in r.cuda}, key=_key)),
        "python": tuple(f"{low[0]}.{m}" for m in range(low[1], high[1] + 1)),
    }


def load_spec(path: Path = MATRIX_TOML) -> MatrixSpec:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise MatrixError(f"cannot read the matrix file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise MatrixError(f"{path} is not valid TOML: {e}") from e
    try:
        owned = sorted(set(data["axes"]) & {"torch", "cuda", "python"})
        if owned:
            raise MatrixError(
                f"{path} [axes] lists {', '.join(owned)}: those axes come from the torch table "
                "now; remove them"
            )
        kernels = {
            name: _kernel_set(name, k, f"{path} [kernels.{name}]")
            for name, k in data["kernels"].items()
        }
        torch = _torch_table(data, path)
        axes = derived_axes(
            {name: _as_tuple(v, f"{path} [axes].{name}") for name, v in data["axes"].items()},
            torch,
        )
        presets = {}
        for name, p in data["presets"].items():
            presets[name] = Preset(
                name=name,
                description=str(p.get("description", "")),
                axes={a: _as_tuple(p[a], f"[presets.{name}].{a}") for a in FAN_OUT_AXES if a in p},
                kernels=str(p.get("kernels", "full")),
                local=bool(p.get("local", False)),
                skip_unsupported=bool(p.get("skip_unsupported", False)),
            )
        torch_index = torch_index_of(data)
        stable = _stable_spec(data, path)
    except (KeyError, IndexError, TypeError) as e:
        raise MatrixError(f"{path} lacks or misshapes an entry: {e!r}") from e
    spec = MatrixSpec(
        axes, kernels, torch, presets, str(path), _load_limits(data, path), torch_index, stable
    )
    _check_spec(spec)
    return spec


def _check_spec(spec: MatrixSpec) -> None:
    """Names in the data must exist (a typo in data is an error too)."""
    plain = [k.name for k in spec.kernels.values() if not k.label]
    if len(plain) != 1:
        raise MatrixError(
            f"{spec.source}: exactly one kernel set must have an empty label (the release "
            f"set, whose wheels carry the plain version label); found {plain or 'none'}"
        )
    labels = [k.label for k in spec.kernels.values()]
    if len(set(labels)) != len(labels):
        raise MatrixError(f"{spec.source}: two kernel sets share a label: {labels}")
    for p in spec.presets.values():
        if p.kernels not in spec.kernels:
            raise MatrixError(f"{spec.source}: preset {p.name} names unknown kernels {p.kernels}")
        for axis, values in p.axes.items():
            for v in values:
                _normalize(axis, v, spec, f"{spec.source} [presets.{p.name}]")
    for name in spec.limits.kernels:
        if name not in spec.kernels:
            raise MatrixError(f"{spec.source}: [limits.kernels.{name}] names no kernel set")
    for name in spec.limits.presets:
        if name not in spec.presets:
            raise MatrixError(f"{spec.source}: [limits.presets.{name}] names no preset")
    _check_stable(spec)


def _check_stable(spec: MatrixSpec) -> None:
    """[stable]: the floor torch is in the table; the build CPython and every smoke pair
    exist, are at or past the floors, and the pair's torch has wheels for its CPython."""
    st, where = spec.stable, f"{spec.source} [stable]"
    floor, py_floor = st.abi.torch_floor, st.abi.python_floor
    if floor not in spec.torch:
        raise MatrixError(
            f"{where}: the stable floor torch {floor} (recipes/stable_abi.json) is not in the "
            f"torch table ({', '.join(spec.table_torch)})"
        )
    if _key(st.build_python) < _key(py_floor) or not spec.torch[floor].supports_python(
        st.build_python
    ):
        raise MatrixError(
            f"{where}.build_python {st.build_python!r}: torch {floor} wheels exist for python "
            f"{spec.torch[floor].python_min} to {spec.torch[floor].python_max}, and the "
            f"stable floor is {py_floor}"
        )
    for pair in st.smoke:
        release = spec.torch.get(pair.torch)
        if release is None or not st.serves(pair.torch):
            served = [m for m in spec.table_torch if st.serves(m)]
            raise MatrixError(
                f"{where}.smoke: torch {pair.torch!r} is not a torch the stable wheel serves; "
                f"valid: {', '.join(served)}"
            )
        if _key(pair.python) < _key(py_floor) or not release.supports_python(pair.python):
            raise MatrixError(
                f"{where}.smoke: torch {pair.torch} has no wheels for python {pair.python!r} "
                f"(valid: {release.python_min} to {release.python_max}, at least {py_floor})"
            )


# --- parsing a MATRIX string -------------------------------------------------------------

_TOKEN_RE = re.compile(r"^([a-z0-9_]+)=([^=]+)$")


def _valid_keys() -> str:
    return ", ".join((*FAN_OUT_AXES, *SETTINGS))


def parse_selection(text: str, spec: MatrixSpec) -> Selection:
    """'ci', 'torch=2.13 python=3.11,3.12' or 'ci torch=2.13' -> Selection."""
    tokens = text.split()
    if not tokens:
        raise MatrixError(
            f"MATRIX is empty; give a preset ({', '.join(spec.presets)}) or axis=value tokens, "
            'e.g. MATRIX="torch=2.13 python=3.11 cuda=13.0"'
        )
    preset: str | None = None
    axes: dict[str, tuple[str, ...]] = {}
    for i, token in enumerate(tokens):
        if "=" not in token:
            if i == 0 and token in spec.presets:
                preset = token
                continue
            if i == 0:
                raise MatrixError(
                    f"MATRIX={text!r}: unknown preset {token!r}; valid presets: "
                    f"{', '.join(spec.presets)} (or axis=value tokens such as torch=2.13)"
                )
            raise MatrixError(
                f"MATRIX={text!r}: {token!r} is not axis=value; a preset name may only come "
                f"first; valid axes: {_valid_keys()}"
            )
        m = _TOKEN_RE.match(token)
        if m is None:
            raise MatrixError(
                f"MATRIX={text!r}: malformed token {token!r}; write axis=value[,value...], "
                "e.g. torch=2.13,2.14 (no spaces around '=' or ',')"
            )
        key, raw = m.group(1), m.group(2)
        if key not in FAN_OUT_AXES and key not in SETTINGS:
            raise MatrixError(f"MATRIX={text!r}: unknown axis {key!r}; valid axes: {_valid_keys()}")
        if key in axes:
            raise MatrixError(f"MATRIX={text!r}: axis {key!r} is given twice")
        values = tuple(v for v in raw.split(","))
        if any(not v for v in values):
            raise MatrixError(f"MATRIX={text!r}: empty value in {token!r}")
        axes[key] = tuple(_normalize(key, v, spec, f"MATRIX={text!r}") for v in values)
    return Selection(preset, axes, text)


def _parse_abi(value: str, where: str) -> bool:
    v = value.strip().upper()
    if v in ("TRUE", "1", "ON", "YES"):
        return True
    if v in ("FALSE", "0", "OFF", "NO"):
        return False
    raise MatrixError(f"{where}: cxx11abi {value!r} is not TRUE or FALSE")


def _normalize(axis: str, value: str, spec: MatrixSpec, where: str) -> str:
    """Accept the usual spellings (cu130, cp311, 2.13.0, true, 9.0) and check the value
    exists; `where` starts the message (MATRIX='...', or the preset's table)."""
    if value == ALL and axis in FAN_OUT_AXES:
        return ALL
    v = value
    if axis == "cuda":
        m = re.fullmatch(r"(?:cu)?(\d{2})(\d)", v)
        if m:
            v = f"{int(m.group(1))}.{m.group(2)}"
    elif axis == "python":
        m = re.fullmatch(r"(?:cp|py)(\d)(\d+)", v)
        if m:
            v = f"{m.group(1)}.{m.group(2)}"
    elif axis == "torch":
        m = re.fullmatch(r"(\d+\.\d+)(?:\.\d+)?(\+?)", v)
        if m:
            v = m.group(1) + m.group(2)
            if m.group(2) and m.group(1) in spec.table_torch:
                return v  # "2.7+": 2.7 and every newer minor of the table
    elif axis == "cxx11abi":
        try:
            v = "TRUE" if _parse_abi(v, where) else "FALSE"
        except MatrixError:
            raise MatrixError(
                f"{where}: cxx11abi value {value!r} is not valid; valid: TRUE, FALSE"
            ) from None
    if axis == "kernels":
        if v not in spec.kernels:
            valid = ", ".join(spec.kernels)
            raise MatrixError(f"{where}: unknown kernels {value!r}; valid: {valid}")
        return v
    if axis in LIMIT_KEYS:
        CellLimits().merged({axis: v}, where)  # raises with what is valid
        return v
    if axis == "binding":
        if v.lower() not in BINDING_CHOICES:
            raise MatrixError(
                f"{where}: binding {value!r} is not valid; valid: {', '.join(BINDING_CHOICES)} "
                "(auto: stable cells for torch at or past the stable floor)"
            )
        return v.lower()
    if axis == "archs":
        items = [a for a in re.split(r"[+;]", v) if a]
        bad = []
        for item in items:
            try:
                parse_archs(item, "archs")
            except BuildConfigError:
                bad.append(repr(item))
        if bad or not items:
            raise MatrixError(
                f"{where}: archs {value!r}: {', '.join(bad) or 'no architecture'} is not a "
                f"supported CUDA architecture; valid: {', '.join(VALID_ARCHS)}, joined with "
                "'+', e.g. archs=80+90"
            )
        return "+".join(parse_archs(";".join(items), "archs"))
    valid = spec.axes.get(axis, ())
    if v not in valid:
        shown = ", ".join(valid) if valid else "none yet (a later issue builds this axis)"
        extra = " (or X.Y+ for that minor and every newer one)" if axis == "torch" else ""
        raise MatrixError(f"{where}: {axis} {value!r} does not exist; valid: {shown}{extra}")
    return v


# --- expanding into cells ----------------------------------------------------------------


def _local_torch(spec: MatrixSpec, local: LocalFacts) -> str:
    if local.torch and local.torch in spec.torch:
        return local.torch
    return spec.newest_torch


def _local_cuda(release: TorchRelease, local: LocalFacts) -> str:
    if local.torch == release.minor and local.torch_cuda in release.cuda:
        return str(local.torch_cuda)
    if local.nvcc in release.cuda:
        return str(local.nvcc)
    return release.index_cuda


def _torch_values(values: tuple[str, ...], spec: MatrixSpec) -> tuple[str, ...]:
    """'all' and 'X.Y+' spelled out as the table's minors."""
    out: list[str] = []
    for v in values:
        if v == ALL:
            out += spec.table_torch
        elif v.endswith("+"):
            out += [m for m in spec.table_torch if _key(m) >= _key(v[:-1])]
        else:
            out.append(v)
    return tuple(out)


def expand(selection: Selection, spec: MatrixSpec, local: LocalFacts) -> list[Cell]:
    """The cells of a selection, in a stable order; ruled-out combinations are errors
    (or dropped, for presets with skip_unsupported)."""
    preset = spec.presets[selection.preset] if selection.preset else None
    axes: dict[str, tuple[str, ...]] = dict(preset.axes) if preset else {}
    axes.update({k: v for k, v in selection.axes.items() if k in FAN_OUT_AXES})
    default_kernels = preset.kernels if preset else spec.release_kernels
    kernels_name = selection.axes.get("kernels", (default_kernels,))[0]
    kernels = spec.kernels[kernels_name]
    if "archs" in selection.axes:
        kernels = kernels.with_archs(tuple(selection.axes["archs"][0].split("+")))
    limits = spec.limits.for_cell(kernels_name, selection.preset).merged(
        {k: v[0] for k, v in selection.axes.items() if k in LIMIT_KEYS},
        f"MATRIX={selection.text!r}",
    )
    if axes.get("rocm"):
        raise MatrixError(f"MATRIX={selection.text!r}: rocm cells are built in a later issue")
    skip = bool(preset and preset.skip_unsupported)
    is_local = bool(preset and preset.local)

    torches = _torch_values(axes.get("torch") or (_local_torch(spec, local),), spec)
    pythons = axes.get("python") or (local.python,)
    if ALL in pythons:
        pythons = spec.axes["python"]
    platforms = axes.get("platform") or (spec.axes["platform"][0],)
    if ALL in platforms:
        platforms = spec.axes["platform"]

    binding = selection.axes.get("binding", ("auto",))[0]
    minors = sorted(dict.fromkeys(torches), key=_key)
    stable_minors = [m for m in minors if binding != "classic" and spec.stable.serves(m)]
    if binding == "stable" and len(stable_minors) < len(minors):
        below = [m for m in minors if m not in stable_minors]
        raise MatrixError(
            f"MATRIX={selection.text!r}: binding=stable serves torch {spec.stable.abi.torch_floor} "
            f"and newer (recipes/stable_abi.json); torch {', '.join(below)} needs "
            "binding=classic (or auto)"
        )

    def cudas_of(release: TorchRelease) -> tuple[str, ...]:
        cudas = axes.get("cuda")
        if not cudas:
            return (_local_cuda(release, local) if is_local else release.index_cuda,)
        if ALL in cudas:
            return release.cuda
        return cudas

    cells: list[Cell] = []
    ruled_out: list[str] = []
    for minor in minors:
        if minor in stable_minors:
            continue
        release = spec.torch[minor]
        cudas = cudas_of(release)
        abis_text = axes.get("cxx11abi")
        if not abis_text:
            if is_local and local.torch == minor and local.torch_cxx11abi is not None:
                abis: tuple[bool, ...] = (local.torch_cxx11abi,)
            else:
                abis = release.cxx11abi[:1]
        elif ALL in abis_text:
            abis = release.cxx11abi
        else:
            abis = tuple(a == "TRUE" for a in abis_text)
        for cuda in sorted(dict.fromkeys(cudas), key=_key):
            for abi in abis:
                for python in sorted(dict.fromkeys(pythons), key=_key):
                    for platform in platforms:
                        why = _ruled_out(release, cuda, python, abi)
                        if why:
                            ruled_out.append(why)
                            continue
                        cells.append(
                            Cell(
                                cuda,
                                minor,
                                python,
                                abi,
                                platform,
                                kernels,
                                release.requirement,
                                release.cxx_std,
                                limits,
                            )
                        )
    if stable_minors and "FALSE" in (axes.get("cxx11abi") or ()):
        ruled_out.append(
            f"torch {', '.join(stable_minors)}: stable cells are C++11-ABI builds (every torch "
            "from the stable floor on is one); cxx11abi=FALSE needs binding=classic"
        )
    if stable_minors:
        python_axis = selection.axes.get("python")
        python_given = python_axis and ALL not in python_axis
        python = (
            local.python
            if is_local
            else _stable_python(python_axis, spec, selection.text)
            if python_given
            else spec.stable.build_python
        )
        stable = _stable_cells(
            stable_minors, cudas_of, python, platforms, kernels, limits, spec, local, is_local
        )
        ruled_out += stable[1]
        cells += stable[0]
    if ruled_out and not skip:
        raise MatrixError(
            f"MATRIX={selection.text!r}: the torch table ({spec.source}) rules out "
            + ("this combination" if len(ruled_out) == 1 else f"{len(ruled_out)} combinations")
            + ":\n  "
            + "\n  ".join(ruled_out)
            + "\nchoose values the table allows (make matrix MATRIX=release lists every cell)"
        )
    if not cells:
        raise MatrixError(f"MATRIX={selection.text!r} selects no cell")
    return cells


def stable_pythons(spec: MatrixSpec) -> tuple[str, ...]:
    """The CPythons front-ends that build and test with one interpreter and the floor
    torch at a time (cibuildwheel, conda) cover for a stable cell: from python_floor to
    the newest CPython the floor torch has wheels for."""
    st = spec.stable
    floor = spec.torch[st.abi.torch_floor]
    return tuple(
        p
        for p in spec.axes["python"]
        if _key(p) >= _key(st.abi.python_floor) and floor.supports_python(p)
    )


def _stable_python(values: tuple[str, ...] | None, spec: MatrixSpec, text: str) -> str:
    """The lowest CPython of an inline python= at or past the stable floor."""
    floor = spec.stable.abi.python_floor
    fit = sorted((v for v in values or () if _key(v) >= _key(floor)), key=_key)
    if not fit:
        raise MatrixError(
            f"MATRIX={text!r}: a stable cell builds with a CPython at or past {floor} "
            f"(recipes/stable_abi.json python_floor); python={','.join(values or ())} has none"
        )
    return fit[0]


def _stable_cells(
    minors: list[str],
    cudas_of: Any,
    python: str,
    platforms: tuple[str, ...],
    kernels: KernelSet,
    limits: CellLimits,
    spec: MatrixSpec,
    local: LocalFacts,
    is_local: bool,
) -> tuple[list[Cell], list[str]]:
    """One cell per (CUDA major, platform) for the torch minors at or past the floor: built
    with the oldest selected CUDA minor of that major, against the floor torch (the local
    preset: the installed torch), with `python`."""
    st = spec.stable
    by_major: dict[int, str] = {}
    ruled_out: list[str] = []
    for minor in minors:
        release = spec.torch[minor]
        for cuda in cudas_of(release):
            if cuda not in release.cuda:
                ruled_out.append(
                    f"torch {minor} has no CUDA {cuda} build (valid: {', '.join(release.cuda)})"
                )
                continue
            major = _key(cuda)[0]
            if major not in by_major or _key(cuda) < _key(by_major[major]):
                by_major[major] = cuda
    build_torch = local.torch if is_local and local.torch in minors else st.abi.torch_floor
    release = spec.torch[build_torch]
    if not release.supports_python(python):
        ruled_out.append(
            f"the stable cell builds against torch {build_torch}, which has no wheels for "
            f"python {python} (valid: {release.python_min} to {release.python_max})"
        )
        return [], ruled_out
    cells = [
        Cell(
            cuda,
            build_torch,
            python,
            True,
            platform,
            kernels,
            release.requirement,
            release.cxx_std,
            limits,
            binding="stable",
            torch_floor=st.abi.torch_floor,
            abi3_tag=st.abi.abi3_tag,
        )
        for _, cuda in sorted(by_major.items())
        for platform in platforms
    ]
    return cells, ruled_out


def _ruled_out(release: TorchRelease, cuda: str, python: str, abi: bool) -> str:
    t = release.minor
    if not release.supports_python(python):
        return (
            f"torch {t} has no wheels for python {python} "
            f"(valid: {release.python_min} to {release.python_max})"
        )
    if cuda not in release.cuda:
        return f"torch {t} has no CUDA {cuda} build (valid: {', '.join(release.cuda)})"
    if abi not in release.cxx11abi:
        valid = ", ".join("TRUE" if a else "FALSE" for a in release.cxx11abi)
        return (
            f"torch {t} pip wheels have no cxx11abi={'TRUE' if abi else 'FALSE'} build "
            f"(valid: {valid})"
        )
    return ""


def installed_release(spec: MatrixSpec, local: LocalFacts) -> tuple[TorchRelease, str]:
    """A table row for the installed torch, from its own metadata, and a note that says
    where each fact came from. For a torch the table does not know yet (the `local`
    preset follows the torch that is installed)."""
    if not local.torch or not local.torch_version:
        raise MatrixError("no installed torch to derive a table row from")
    version = public_version(local.torch_version)
    minor = minor_of(version)
    said: list[str] = []
    pinned = cuda_from_requires(local.torch_requires)
    cuda = local.torch_cuda or (pinned.value if pinned else None) or local.nvcc
    if cuda is None:
        raise MatrixError(
            f"torch {local.torch_version} is a CPU build, pins no CUDA runtime, and there is no "
            "nvcc here: no CUDA to build for; install a CUDA toolkit or select cuda=X.Y"
        )
    if local.torch_cuda:
        also = f"; {pinned.evidence}" if pinned else ""
        said.append(f"CUDA {cuda} (torch.version.cuda{also})")
    elif pinned:
        said.append(f"CUDA {cuda} ({pinned.evidence})")
    else:
        said.append(f"CUDA {cuda} (a CPU build: this machine's nvcc)")
    index_cuda = pinned.value if pinned else cuda
    if pinned and pinned.value != cuda:
        said.append(f"index CUDA {index_cuda} ({pinned.evidence})")
    floor = python_lower_bound(local.torch_requires_python)
    python_min = f"{floor[0]}.{floor[1]}" if floor else local.python
    python_max = max(spec.axes["python"][-1], local.python, key=_key)
    said.append(
        f"python {python_min} to {python_max} (Requires-Python "
        f"{local.torch_requires_python or 'not given'}; the upper end is not in the metadata)"
    )
    abi = True if local.torch_cxx11abi is None else local.torch_cxx11abi
    said.append(f"cxx11abi {'TRUE' if abi else 'FALSE'} (torch._C._GLIBCXX_USE_CXX11_ABI)")
    cmake = Path(local.torch_dir or "") / TORCH_CONFIG.removeprefix("torch/")
    try:
        std = cxx_std_from_cmake(cmake.read_text() if local.torch_dir else None)
        cxx_std, where = std.value, std.evidence
    except (OSError, FactoryError):
        newest = spec.torch[spec.newest_torch]
        cxx_std, where = newest.cxx_std, f"not found; torch {newest.minor}'s"
    said.append(f"{cxx_std} ({where})")
    release = TorchRelease(
        minor=minor,
        python_min=python_min,
        python_max=python_max,
        cuda=tuple(sorted({cuda, index_cuda}, key=_key)),
        index_cuda=index_cuda,
        cxx11abi=(abi,),
        cxx_std=cxx_std,
        version=version,
        installed=True,
    )
    known = spec.table_torch
    note = (
        f"torch {local.torch_version} is installed, and {spec.source} knows torch "
        f"{known[0]} to {known[-1]} only: its row comes from the installed torch's own "
        f"metadata: {'; '.join(said)}. `make refresh-matrix` adds it to the table."
    )
    return release, note


def with_installed_torch(spec: MatrixSpec, local: LocalFacts) -> tuple[MatrixSpec, str]:
    """spec with a row for the installed torch when the table lacks it (and the note that
    says so); spec itself, and no note, when the table knows it or none is installed."""
    if not local.torch or local.torch in spec.torch or not local.torch_version:
        return spec, ""
    release, note = installed_release(spec, local)
    torch = {**spec.torch, release.minor: release}
    axes = {
        **spec.axes,
        "torch": (*spec.axes["torch"], release.minor),
        "cuda": tuple(sorted({*spec.axes["cuda"], *release.cuda}, key=_key)),
    }
    return replace(spec, torch=torch, axes=axes), note


_ID_RE = re.compile(
    r"cu(\d+)(\d)-torch(\d+\.\d+)-cxx11abi(TRUE|FALSE)((?:-[a-z][a-z0-9]*)*)-cp(\d)(\d+)"
)


_STABLE_ID_RE = re.compile(r"cu(\d+)-torchstable((?:-[a-z][a-z0-9]*)*)-abi3")


def stable_build_cuda(spec: MatrixSpec, major: int) -> str:
    """The CUDA a stable cell of a CUDA major builds with when every torch from the floor
    on is selected with cuda=all: the oldest minor of that major any of them has."""
    cudas = [
        c
        for m in spec.table_torch
        if spec.stable.serves(m)
        for c in spec.torch[m].cuda
        if _key(c)[0] == major
    ]
    if not cudas:
        raise MatrixError(f"no torch from the stable floor on has a CUDA {major} build")
    return min(cudas, key=_key)


def _kernel_selection(segments: list[str], cell_id: str, spec: MatrixSpec) -> str:
    """' kernels=ci archs=80+90' from the kernel segments of an id (['ci', 'sm80sm90'])."""
    archs = ""
    if segments and re.fullmatch(r"(sm\d+a?)+", segments[-1]):
        archs = "+".join(re.findall(r"sm(\d+a?)", segments.pop()))
    labels = {k.label: k.name for k in spec.kernels.values()}
    label = segments.pop(0) if segments else ""
    if segments or label not in labels:
        valid = ", ".join(repr(k) for k in labels if k)
        raise MatrixError(
            f"cell id {cell_id!r}: {'-'.join([label, *segments])!r} names no kernel set; "
            f"kernel segments: {valid} (none for the release set), then sm<arch>..."
        )
    return f" kernels={labels[label]}" + (f" archs={archs}" if archs else "")


def selection_of_id(cell_id: str, spec: MatrixSpec) -> str:
    """The inline selection of the cell whose id (Cell.id) this is: the kernel set from
    its label segment, archs from an sm... segment. A stable id (cu13-torchstable-abi3)
    selects the floor torch, [stable] build_python and the CUDA stable_build_cuda gives."""
    stable = _STABLE_ID_RE.fullmatch(cell_id)
    if stable is not None:
        segments = [s for s in stable.group(2).split("-") if s]
        cuda = stable_build_cuda(spec, int(stable.group(1)))
        return (
            f"cuda={cuda} torch={spec.stable.abi.torch_floor} "
            f"python={spec.stable.build_python} binding=stable"
            + _kernel_selection(segments, cell_id, spec)
        )
    m = _ID_RE.fullmatch(cell_id)
    if m is None:
        raise MatrixError(
            f"cell id {cell_id!r} is not like cu130-torch2.13-cxx11abiTRUE-cp311 "
            "(or with a kernel segment: cu130-torch2.13-cxx11abiTRUE-ci-cp311), nor "
            "cu13-torchstable-abi3 (cu13-torchstable-ci-abi3)"
        )
    segments = [s for s in m.group(5).split("-") if s]
    return (
        f"cuda={m.group(1)}.{m.group(2)} torch={m.group(3)} cxx11abi={m.group(4)} "
        f"python={m.group(6)}.{m.group(7)} binding=classic"
        + _kernel_selection(segments, cell_id, spec)
    )


def select_cells(text: str, spec: MatrixSpec, local: LocalFacts) -> list[Cell]:
    return expand(parse_selection(text, spec), spec, local)


def github_matrix(cells: list[Cell]) -> dict[str, Any]:
    """The GitHub Actions `strategy.matrix` object: one include entry per cell."""
    return {
        "include": [
            {
                "id": c.id,
                "variant": c.variant,
                "cuda": c.cuda,
                "torch": c.torch,
                "python": c.python,
                "cxx11abi": c.abi_text,
                "platform": c.platform,
                "kernels": c.kernels.name,
                "binding": c.binding,
                "matrix": c.selection(),
            }
            for c in cells
        ]
    }
