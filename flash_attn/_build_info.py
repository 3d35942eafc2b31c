"""What a build of the compiled extension contains, read from its build_info() JSON.

The build knobs of setup.py decide which kernels exist; this module names them so
that an error can say which knob dropped a kernel and what to rebuild with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from flash_attn.errors import BuildError

# Every head-dim bucket the kernels know (csrc/kernels/generate.py); a build
# compiles a subset of them (FLASH_ATTN_HEAD_DIMS).
HEAD_DIM_BUCKETS: tuple[int, ...] = (32, 64, 96, 128, 160, 192, 224, 256)

# Build names of the dtypes (FLASH_ATTN_DTYPES), in their canonical order.
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16"}

HEAD_DIMS_KNOB = "FLASH_ATTN_HEAD_DIMS"
DTYPES_KNOB = "FLASH_ATTN_DTYPES"
BACKWARD_KNOB = "FLASH_ATTN_BACKWARD"
ARCHS_KNOB = "FLASH_ATTN_CUDA_ARCHS"


@dataclass(frozen=True)
class BuildInfo:
    """The kernels one build of flash_attn._C holds."""

    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    backward: bool
    cuda_archs: tuple[str, ...]

    @classmethod
    def from_json(cls, text: str) -> BuildInfo:
        try:
            data = json.loads(text)
            return cls(
                head_dims=tuple(sorted(int(h) for h in data["head_dims"])),
                dtypes=tuple(str(d) for d in data["dtypes"]),
                backward=bool(data["backward"]),
                cuda_archs=tuple(str(a) for a in data.get("cuda_archs", ())),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BuildError(
                f"flash_attn._C.build_info() returned {text!r}, which is not the "
                'expected JSON {"head_dims": [...], "dtypes": [...], "backward": '
                'true|false, "cuda_archs": [...]} '
                f"({type(exc).__name__}: {exc}). The extension and the Python "
                "package come from different versions: reinstall flash_attn."
            ) from exc

    def bucket_for(self, head_dim: int) -> int | None:
        """The compiled bucket a head_dim dispatches to: the smallest one >= it."""
        return min((h for h in self.head_dims if h >= head_dim), default=None)

    def runs_on(self, capability: tuple[int, int]) -> bool | None:
        """Whether a GPU of this compute capability can run the build's code;
        None when an arch is spelled in a way this does not know.

        setup.py compiles SASS for every arch and PTX for the newest one. SASS
        runs on the same major at an equal or later minor; PTX is compiled by the
        driver for any equal or newer GPU. An 'a' arch (90a) runs on itself only.
        """
        archs = [CudaArch.parse(a) for a in self.cuda_archs]
        if not archs or any(a is None for a in archs):
            return None
        known = [a for a in archs if a is not None]
        newest = max(known, key=lambda a: (a.major, a.minor))
        return any(a.sass_runs_on(capability) for a in known) or newest.ptx_runs_on(capability)


@dataclass(frozen=True)
class CudaArch:
    """One entry of the build's arch list: '80', '90a', '8.6', 'sm_90'."""

    major: int
    minor: int
    specific: bool  # the 'a' suffix: arch-specific features, this GPU only

    @classmethod
    def parse(cls, text: str) -> CudaArch | None:
        t = text.strip().lower().removeprefix("sm_").removeprefix("compute_")
        specific = t.endswith("a")
        digits = t.removesuffix("a").replace(".", "")
        if not digits.isdigit() or not 2 <= len(digits) <= 3:
            return None
        return cls(int(digits[:-1]), int(digits[-1]), specific)

    def sass_runs_on(self, capability: tuple[int, int]) -> bool:
        if self.specific:
            return (self.major, self.minor) == capability
        return self.major == capability[0] and self.minor <= capability[1]

    def ptx_runs_on(self, capability: tuple[int, int]) -> bool:
        if self.specific:
            return (self.major, self.minor) == capability
        return (self.major, self.minor) <= capability


def needed_bucket(head_dim: int) -> int | None:
    """The smallest bucket of any build that can serve head_dim."""
    return min((h for h in HEAD_DIM_BUCKETS if h >= head_dim), default=None)
