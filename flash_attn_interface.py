"""The top-level import path that FlashAttention-3 code uses.

``import flash_attn_interface`` gives the same functions as
``flash_attn.flash_attn_interface`` (the flash_attn 2.x signatures). FlashAttention-3's
own module has different signatures for some of them (for example its
``flash_attn_func`` takes no ``dropout_p``), so FA3 callers that pass arguments by
position rather than by name may need adjusting.
"""

from flash_attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
