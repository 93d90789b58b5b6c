"""hf_flash: FlashAttention-2, FlashAttention-1 and Flash-Decoding in Triton, plugged into HuggingFace
Transformers as ``attn_implementation="flashtri"``.

``import hf_flash`` registers "flashtri" with transformers; the flash_attn-compatible functions are exported
here.
"""

from hf_flash.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from hf_flash.kvcache import flash_attn_with_kvcache
from hf_flash.padding import pad_input, unpad_input
from hf_flash.reference import attention_ref

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "pad_input",
    "unpad_input",
    "attention_ref",
]
