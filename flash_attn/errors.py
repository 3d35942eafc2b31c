"""The exceptions flash_attn raises before it launches a kernel.

Every class derives from RuntimeError, which is what the upstream package raises
from its C++ checks, so ``except RuntimeError`` keeps working in code written for
it. The subclasses let callers tell a bad argument from a missing GPU or a build
that lacks a kernel.
"""

from __future__ import annotations


class FlashAttnError(RuntimeError):
    """Base class of every error flash_attn raises on purpose."""


class InputError(FlashAttnError, ValueError):
    """An argument has a shape, dtype, rank or value the kernels do not accept."""


class DeviceError(FlashAttnError):
    """The tensors are not on one CUDA device, or the GPU is too old."""


class BuildError(FlashAttnError):
    """The compiled extension lacks the kernel this call needs, or its build record
    cannot be read."""


class KernelNotBuiltError(BuildError):
    """The build left out the kernels of this call (its head_dim, dtype, backward or GPU
    arch): the build knobs chose so; a rebuild with the knob the message names adds them."""


class ExtensionNotBuiltError(FlashAttnError, ImportError):
    """The compiled extension ``flash_attn._C`` cannot be imported."""
