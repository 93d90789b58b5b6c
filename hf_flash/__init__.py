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
from hf_flash.fa1 import flash_attn_fa1_func
from hf_flash.patches import UnsupportedTransformersError, patch_gpt2, patch_llama, register

try:
    register()
except UnsupportedTransformersError as _e:  # the kernels stay usable; "flashtri" is not registered
    import warnings as _warnings

    _warnings.warn(str(_e), stacklevel=2)

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
    "flash_attn_fa1_func",
    "register",
    "patch_gpt2",
    "patch_llama",
]
