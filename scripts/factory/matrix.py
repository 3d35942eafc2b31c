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

from .errors import FactoryError, MatrixError
from .torch_metadata import (
    TORCH_CONFIG,
    cuda_from_requires,
    cxx_std_from_cmake,
    minor_of,
    public_version,
    python_lower_bound,
)

REPO = Path(__file__).resolve().parents[2]
MATRIX_TOML = REPO / "recipes" / "matrix.toml"
KERNEL_CATALOG = REPO / "csrc" / "kernels" / "generate.py"

# axes that fan out into cells, and the settings that apply to every cell
FAN_OUT_AXES = ("cuda", "rocm", "torch", "python", "cxx11abi", "platform")
SETTINGS = ("kernels", "archs", "memory", "cpus")
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
    def variant(self) -> str:
        """The index a wheel goes to: cuda + torch + ABI (one pip index each), plus the
        kernel contents' segment for any set but the release set (README, "Wheels")."""
        base = f"{self.cuda_tag}-torch{self.torch}-cxx11abi{self.abi_text}"
        content = self.kernels.content_label
        return f"{base}-{content.replace('.', '-')}" if content else base

    @property
    def id(self) -> str:
        return f"{self.variant}-{self.python_tag}"

    @property
    def local_label(self) -> str:
        """The PEP 440 local version label: 2.9.0+cu130torch2.13cxx11abiTRUE (release
        kernels), 2.9.0+cu130torch2.13cxx11abiTRUE.ci (the ci set)."""
        base = f"{self.cuda_tag}torch{self.torch}cxx11abi{self.abi_text}"
        content = self.kernels.content_label
        return f"{base}.{content}" if content else base

    @property
    def requires_torch(self) -> str:
        """The Requires-Dist line: the torch minor the wheel was built against."""
        return f"torch=={self.torch}.*"

    def selection(self) -> str:
        """An inline MATRIX string that selects exactly this cell (its limits too)."""
        text = (
            f"cuda={self.cuda} torch={self.torch} python={self.python} "
            f"cxx11abi={self.abi_text} platform={self.platform} kernels={self.kernels.name} "
            f"archs={'+'.join(self.kernels.archs)}"
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
    except (KeyError, IndexError, TypeError) as e:
        raise MatrixError(f"{path} lacks or misshapes an entry: {e!r}") from e
    spec = MatrixSpec(
        axes, kernels, torch, presets, str(path), _load_limits(data, path), torch_index
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

    cells: list[Cell] = []
    ruled_out: list[str] = []
    for minor in sorted(dict.fromkeys(torches), key=_key):
        release = spec.torch[minor]
        cudas = axes.get("cuda")
        if not cudas:
            cudas = (_local_cuda(release, local) if is_local else release.index_cuda,)
        elif ALL in cudas:
            cudas = release.cuda
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


def selection_of_id(cell_id: str, spec: MatrixSpec) -> str:
    """The inline selection of the cell whose id (Cell.id) this is: the kernel set from
    its label segment, archs from an sm... segment."""
    m = _ID_RE.fullmatch(cell_id)
    if m is None:
        raise MatrixError(
            f"cell id {cell_id!r} is not like cu130-torch2.13-cxx11abiTRUE-cp311 "
            "(or with a kernel segment: cu130-torch2.13-cxx11abiTRUE-ci-cp311)"
        )
    segments = [s for s in m.group(5).split("-") if s]
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
    text = (
        f"cuda={m.group(1)}.{m.group(2)} torch={m.group(3)} cxx11abi={m.group(4)} "
        f"python={m.group(6)}.{m.group(7)} kernels={labels[label]}"
    )
    return text + (f" archs={archs}" if archs else "")


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
                "matrix": c.selection(),
            }
            for c in cells
        ]
    }
