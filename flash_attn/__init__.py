"""flash_attn: FlashAttention kernels behind the flash_attn 2.x Python interface.

This is an independent implementation of that interface, with its own CUDA
kernels; it is not the Dao-AILab ``flash-attn`` package and shares no code with
it. Code written for flash_attn 2.x imports it unchanged::

    from flash_attn import flash_attn_func, flash_attn_varlen_func
    from flash_attn.bert_padding import pad_input, unpad_input

The functions keep the 2.x names, argument order and defaults, attention dropout
(``dropout_p`` in [0, 1)) included: each call with ``dropout_p > 0`` draws its
(seed, offset) from torch's generator for q's device, so ``torch.manual_seed``
reproduces it, and ``return_attn_probs=True`` then returns 2.x's ``S_dmask`` (a
testing aid computed in PyTorch). ``flash_attn_with_kvcache`` and the paged KV cache
(``block_table``) are inference only.

Importing this package does not load the compiled extension (``flash_attn._C``);
the first attention call does, and reports a missing or broken build then. Importing
it does check that the extension was built for the torch that is running, and raises
an ImportError naming the build to install where not (``python -m flash_attn``
diagnoses an installation).
"""

from pkgutil import extend_path

from flash_attn._torch_check import check_at_import
from flash_attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

# Other distributions may install modules under flash_attn too (flash-attn-4 ships
# flash_attn/cute/ with no flash_attn/__init__.py): add every flash_attn folder on sys.path.
__path__ = extend_path(__path__, __name__)

# Compatible with the 2.x interface; high enough for ">= 2.6.3"-style feature gates
# (softcap, deterministic backward) in libraries that check the version.
__version__ = "2.9.0"

# A build for another torch refuses to load here, before any caller can load flash_attn._C
# (FLASH_ATTN_SKIP_TORCH_CHECK=1 skips this; `python -m flash_attn` runs without it)
check_at_import(__version__)

__all__ = [
    "__version__",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
