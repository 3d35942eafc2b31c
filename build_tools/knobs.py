"""Build knobs: environment variables turned into one validated BuildKnobs.

Every error names the variable, the value seen and what is valid.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ARCHS = "80;90"
DEFAULT_MEM_PER_THREAD_GIB = 2.5

# GPU architectures the kernels can target (they need sm_80 or newer) that
# nvcc 12/13 knows. "90a" enables Hopper-only instructions (wgmma, setmaxnreg).
VALID_ARCHS: tuple[str, ...] = (
    "80",
    "86",
    "87",
    "89",
    "90",
    "90a",
    "100",
    "100a",
    "103",
    "110",
    "120",
    "121",
)

_ARCH_RE = re.compile(r"^(?:(\d{2,3})|(\d{1,2})\.(\d))(a?)$")


class BuildConfigError(ValueError):
    """A build knob has a value that cannot be used."""


@dataclass(frozen=True)
class KernelCatalog:
    """What the kernel generator can instantiate."""

    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class BuildKnobs:
    archs: tuple[str, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    backward: bool
    max_jobs: int | None
    nvcc_threads: int | None
    mem_per_thread_gib: float
    extra_nvcc_flags: tuple[str, ...]
    # start a compile only when its expected peak fits the free memory (FLASH_ATTN_ADMISSION)
    admission: bool = True

    def describe(self) -> str:
        return (
            f"archs {';'.join(self.archs)}; head dims {','.join(map(str, self.head_dims))}; "
            f"dtypes {','.join(self.dtypes)}; backward {'on' if self.backward else 'off'}"
        )


def load_catalog(generate_py: Path) -> KernelCatalog:
    """Read HEAD_DIM_BUCKETS and DTYPES from the kernel generator's source (without
    running it), so that the generator stays the one place that lists them."""
    try:
        tree = ast.parse(generate_py.read_text(), filename=str(generate_py))
    except (OSError, SyntaxError) as e:
        raise BuildConfigError(f"cannot read the kernel generator {generate_py}: {e}") from e
    values: dict[str, object] = {}
    for node in tree.body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if (
            isinstance(target, ast.Name)
            and target.id in ("HEAD_DIM_BUCKETS", "DTYPES")
            and value is not None
        ):
            try:
                values[target.id] = ast.literal_eval(value)
            except ValueError:
                pass
    buckets, dtypes = values.get("HEAD_DIM_BUCKETS"), values.get("DTYPES")
    if not isinstance(buckets, (tuple, list)) or not isinstance(dtypes, dict):
        raise BuildConfigError(
            f"{generate_py} does not define HEAD_DIM_BUCKETS (a tuple of ints) and "
            "DTYPES (a dict keyed by dtype name) as literals"
        )
    return KernelCatalog(
        head_dims=tuple(int(h) for h in buckets),
        dtypes=tuple(str(d) for d in dtypes),
    )


def _split(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[;,\s]+", text) if t.strip()]


def parse_archs(text: str, knob: str = "FLASH_ATTN_CUDA_ARCHS") -> tuple[str, ...]:
    """'80;90', '8.0;9.0', '9.0a', '90,100' -> ('80', '90') sorted, deduplicated."""
    items = _split(text)
    if not items:
        raise BuildConfigError(
            f"{knob}={text!r} names no architecture; "
            f"valid: {', '.join(VALID_ARCHS)} (also written 8.0, 9.0a), separated by ';'"
        )
    archs: list[str] = []
    bad: list[str] = []
    for item in items:
        m = _ARCH_RE.match(item)
        arch = None
        if m:
            arch = (m.group(1) or f"{m.group(2)}{m.group(3)}") + m.group(4)
        if arch is None or arch not in VALID_ARCHS:
            bad.append(item)
        elif arch not in archs:
            archs.append(arch)
    if bad:
        raise BuildConfigError(
            f"{knob}={text!r}: {', '.join(repr(b) for b in bad)} is not a supported CUDA "
            f"architecture; valid: {', '.join(VALID_ARCHS)} (also written 8.0, 9.0a), "
            "separated by ';', e.g. FLASH_ATTN_CUDA_ARCHS='80;90'"
        )
    return tuple(sorted(archs, key=arch_number))


def arch_number(arch: str) -> int:
    """'90a' -> 90: the compute capability as a number, for ordering."""
    return int(arch.rstrip("a"))


def parse_head_dims(
    text: str, valid: Sequence[int], knob: str = "FLASH_ATTN_HEAD_DIMS"
) -> tuple[int, ...]:
    items = _split(text)
    bad = [t for t in items if not t.isdigit() or int(t) not in valid]
    if bad or not items:
        what = ", ".join(repr(b) for b in bad) if bad else "the empty list"
        raise BuildConfigError(
            f"{knob}={text!r}: {what} is not a head-dim bucket; "
            f"valid: {', '.join(map(str, valid))} (a comma-separated subset)"
        )
    return tuple(sorted({int(t) for t in items}))


def parse_dtypes(
    text: str, valid: Sequence[str], knob: str = "FLASH_ATTN_DTYPES"
) -> tuple[str, ...]:
    items = _split(text.lower())
    bad = [t for t in items if t not in valid]
    if bad or not items:
        what = ", ".join(repr(b) for b in bad) if bad else "the empty list"
        raise BuildConfigError(
            f"{knob}={text!r}: {what} is not a kernel dtype; "
            f"valid: {', '.join(valid)} (a comma-separated subset)"
        )
    return tuple(d for d in valid if d in items)


def parse_switch(text: str, knob: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise BuildConfigError(f"{knob}={text!r} is not a switch; valid: 1 or 0")


def parse_positive_int(text: str, knob: str) -> int:
    value = text.strip()
    if not value.isdigit() or int(value) < 1:
        raise BuildConfigError(f"{knob}={text!r} is not a whole number of at least 1")
    return int(value)


def parse_positive_float(text: str, knob: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BuildConfigError(f"{knob}={text!r} is not a positive number (GiB)")
    return value


def knobs_from_env(env: Mapping[str, str], catalog: KernelCatalog) -> BuildKnobs:
    """All knobs at once; unset or empty variables take their defaults."""

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    archs = parse_archs(get("FLASH_ATTN_CUDA_ARCHS") or DEFAULT_ARCHS)
    head_dims_text = get("FLASH_ATTN_HEAD_DIMS")
    head_dims = (
        parse_head_dims(head_dims_text, catalog.head_dims)
        if head_dims_text
        else tuple(catalog.head_dims)
    )
    dtypes_text = get("FLASH_ATTN_DTYPES")
    dtypes = parse_dtypes(dtypes_text, catalog.dtypes) if dtypes_text else tuple(catalog.dtypes)
    backward_text = get("FLASH_ATTN_BACKWARD")
    backward = parse_switch(backward_text, "FLASH_ATTN_BACKWARD") if backward_text else True
    jobs_text = get("MAX_JOBS")
    threads_text = get("NVCC_THREADS")
    mem_text = get("FLASH_ATTN_NVCC_MEM_GB")
    admission_text = get("FLASH_ATTN_ADMISSION")
    return BuildKnobs(
        archs=archs,
        head_dims=head_dims,
        dtypes=dtypes,
        backward=backward,
        max_jobs=parse_positive_int(jobs_text, "MAX_JOBS") if jobs_text else None,
        nvcc_threads=(parse_positive_int(threads_text, "NVCC_THREADS") if threads_text else None),
        mem_per_thread_gib=(
            parse_positive_float(mem_text, "FLASH_ATTN_NVCC_MEM_GB")
            if mem_text
            else DEFAULT_MEM_PER_THREAD_GIB
        ),
        extra_nvcc_flags=tuple((get("FLASH_ATTN_NVCC_FLAGS") or "").split()),
        admission=(
            parse_switch(admission_text, "FLASH_ATTN_ADMISSION") if admission_text else True
        ),
    )
