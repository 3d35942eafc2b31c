"""The package's own variant module (flash_attn/_variant.py) for the factory.

The variant names, the wheels' version labels, the build record and the install
commands have one home, in the package, because an installed wheel (and its doctor,
``python -m flash_attn``) has no scripts/ to import. The factory loads that file by its
path: importing ``flash_attn`` would import torch into the factory's process and run
the package's check at import.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from .paths import REPO

VARIANT_PY = REPO / "flash_attn" / "_variant.py"
_MODULE_NAME = "_flash_attn_variant"


def _load() -> ModuleType:
    if _MODULE_NAME in sys.modules:  # setup.py, in the same process, loads it the same way
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, VARIANT_PY)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {VARIANT_PY}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from flash_attn._variant import (
        INDEX_PLACEHOLDER,
        TORCH_INDEX,
        TorchFacts,
        Variant,
        VariantError,
        index_base,
        minor_of,
    )
else:
    _variant = _load()
    INDEX_PLACEHOLDER = _variant.INDEX_PLACEHOLDER
    TORCH_INDEX = _variant.TORCH_INDEX
    TorchFacts = _variant.TorchFacts
    Variant = _variant.Variant
    VariantError = _variant.VariantError
    index_base = _variant.index_base
    minor_of = _variant.minor_of

__all__ = [
    "INDEX_PLACEHOLDER",
    "TORCH_INDEX",
    "TorchFacts",
    "Variant",
    "VariantError",
    "index_base",
    "minor_of",
]
