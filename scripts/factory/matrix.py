"""The build matrix: recipes/matrix.toml in, a list of validated cells out.

A selection is a preset name, an inline string of ``axis=value[,value...]``
tokens, or both (``"ci torch=2.13"``: the preset with one axis replaced). Every
value is checked against the axes and the torch compatibility table; a mistake
raises MatrixError naming the value and what is valid.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .errors import MatrixError

MATRIX_TOML = Path(__file__).resolve().parents[2] / "recipes" / "matrix.toml"

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
    """The setup.py knobs one cell builds with."""

    name: str
    archs: tuple[str, ...]
    head_dims: str = ""
    dtypes: str = ""
    backward: bool = True

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
    """One row of the compatibility table: what a torch minor release is built for."""

    minor: str
    python_min: str
    python_max: str
    cuda: tuple[str, ...]
    index_cuda: str
    cxx11abi: tuple[bool, ...]
    cxx_std: str
    requirement: str

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
        """The index a wheel goes to: cuda + torch + ABI (one pip index each)."""
        return f"{self.cuda_tag}-torch{self.torch}-cxx11abi{self.abi_text}"

    @property
    def id(self) -> str:
        return f"{self.variant}-{self.python_tag}"

    @property
    def local_label(self) -> str:
        """The PEP 440 local version label: 2.9.0+cu130torch2.13cxx11abiTRUE."""
        return f"{self.cuda_tag}torch{self.torch}cxx11abi{self.abi_text}"

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
            k["name"], tuple(k["archs"]), k["head_dims"], k["dtypes"], bool(k["backward"])
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
    torch_cuda: str | None = None  # "13.0" for a CUDA build of torch
    torch_cxx11abi: bool | None = None
    nvcc: str | None = None  # "13.0"


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
class MatrixSpec:
    """recipes/matrix.toml, typed."""

    axes: dict[str, tuple[str, ...]]
    kernels: dict[str, KernelSet]
    torch: dict[str, TorchRelease]
    presets: dict[str, Preset]
    source: str = str(MATRIX_TOML)
    limits: LimitsTable = field(default_factory=lambda: LimitsTable())

    @property
    def newest_torch(self) -> str:
        return max(self.torch, key=_key)


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


def load_spec(path: Path = MATRIX_TOML) -> MatrixSpec:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise MatrixError(f"cannot read the matrix file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise MatrixError(f"{path} is not valid TOML: {e}") from e
    try:
        axes = {name: _as_tuple(v, f"{path} [axes].{name}") for name, v in data["axes"].items()}
        kernels = {
            name: KernelSet(
                name=name,
                archs=tuple(a for a in str(k["archs"]).replace(",", ";").split(";") if a),
                head_dims=str(k.get("head_dims", "")),
                dtypes=str(k.get("dtypes", "")),
                backward=bool(k.get("backward", True)),
            )
            for name, k in data["kernels"].items()
        }
        torch = {
            minor: TorchRelease(
                minor=minor,
                python_min=t["python"][0],
                python_max=t["python"][1],
                cuda=tuple(t["cuda"]),
                index_cuda=t["index_cuda"],
                cxx11abi=tuple(_parse_abi(a, f"[torch.{minor!r}].cxx11abi") for a in t["cxx11abi"]),
                cxx_std=t["cxx_std"],
                requirement=t["requirement"],
            )
            for minor, t in data["torch"].items()
        }
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
    except (KeyError, IndexError, TypeError) as e:
        raise MatrixError(f"{path} lacks or misshapes an entry: {e!r}") from e
    spec = MatrixSpec(axes, kernels, torch, presets, str(path), _load_limits(data, path))
    _check_spec(spec)
    return spec


def _check_spec(spec: MatrixSpec) -> None:
    """The table must only name values its axes list (a typo in data is an error too)."""
    for minor, t in spec.torch.items():
        if minor not in spec.axes["torch"]:
            raise MatrixError(f"{spec.source}: [torch.{minor!r}] is not in [axes].torch")
        for cuda in (*t.cuda, t.index_cuda):
            if cuda not in spec.axes["cuda"]:
                raise MatrixError(f"{spec.source}: torch {minor} names cuda {cuda}, not in axes")
    for p in spec.presets.values():
        if p.kernels not in spec.kernels:
            raise MatrixError(f"{spec.source}: preset {p.name} names unknown kernels {p.kernels}")
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
        axes[key] = tuple(_normalize(key, v, spec, text) for v in values)
    return Selection(preset, axes, text)


def _parse_abi(value: str, where: str) -> bool:
    v = value.strip().upper()
    if v in ("TRUE", "1", "ON", "YES"):
        return True
    if v in ("FALSE", "0", "OFF", "NO"):
        return False
    raise MatrixError(f"{where}: cxx11abi {value!r} is not TRUE or FALSE")


def _normalize(axis: str, value: str, spec: MatrixSpec, text: str) -> str:
    """Accept the usual spellings (cu130, cp311, 2.13.0, true) and check the value exists."""
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
        m = re.fullmatch(r"(\d+\.\d+)\.\d+", v)
        if m:
            v = m.group(1)
    elif axis == "cxx11abi":
        try:
            v = "TRUE" if _parse_abi(v, f"MATRIX={text!r}") else "FALSE"
        except MatrixError:
            raise MatrixError(
                f"MATRIX={text!r}: cxx11abi value {value!r} is not valid; valid: TRUE, FALSE"
            ) from None
    if axis == "kernels":
        if v not in spec.kernels:
            raise MatrixError(
                f"MATRIX={text!r}: unknown kernels {value!r}; valid: {', '.join(spec.kernels)}"
            )
        return v
    if axis in LIMIT_KEYS:
        CellLimits().merged({axis: v}, f"MATRIX={text!r}")  # raises with what is valid
        return v
    if axis == "archs":
        if not re.fullmatch(r"\d+a?(?:[;+]\d+a?)*", v):
            raise MatrixError(
                f"MATRIX={text!r}: archs value {value!r} is not an arch list like 90 or 80+90"
            )
        return v
    valid = spec.axes.get(axis, ())
    if v not in valid:
        shown = ", ".join(valid) if valid else "none yet (a later issue builds this axis)"
        raise MatrixError(f"MATRIX={text!r}: {axis} {value!r} does not exist; valid: {shown}")
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


def expand(selection: Selection, spec: MatrixSpec, local: LocalFacts) -> list[Cell]:
    """The cells of a selection, in a stable order; ruled-out combinations are errors
    (or dropped, for presets with skip_unsupported)."""
    preset = spec.presets[selection.preset] if selection.preset else None
    axes: dict[str, tuple[str, ...]] = dict(preset.axes) if preset else {}
    axes.update({k: v for k, v in selection.axes.items() if k in FAN_OUT_AXES})
    kernels_name = selection.axes.get("kernels", (preset.kernels if preset else "full",))[0]
    kernels = spec.kernels[kernels_name]
    if "archs" in selection.axes:
        archs = tuple(re.split(r"[;+]", selection.axes["archs"][0]))
        kernels = KernelSet(
            kernels.name, archs, kernels.head_dims, kernels.dtypes, kernels.backward
        )
    limits = spec.limits.for_cell(kernels_name, selection.preset).merged(
        {k: v[0] for k, v in selection.axes.items() if k in LIMIT_KEYS},
        f"MATRIX={selection.text!r}",
    )
    if axes.get("rocm"):
        raise MatrixError(f"MATRIX={selection.text!r}: rocm cells are built in a later issue")
    skip = bool(preset and preset.skip_unsupported)
    is_local = bool(preset and preset.local)

    torches = axes.get("torch") or (_local_torch(spec, local),)
    if ALL in torches:
        torches = tuple(spec.torch)
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
