"""hf_flash: FlashAttention-2, FlashAttention-1 and Flash-Decoding in Triton, plugged into HuggingFace
Transformers as ``attn_implementation="flashtri"``.

``import hf_flash`` registers "flashtri" with transformers; the flash_attn-compatible functions are exported
here.
"""

import os as _os

# In a source checkout that was not installed (e.g. a copied tree on a GPU box), kernels/ and patches/ sit
# beside hf_flash/ rather than inside it: let the subpackages hf_flash.kernels and hf_flash.patches resolve there.
# Installed (wheel or editable), hf_flash/kernels exists or setuptools' finder maps it, and this does nothing.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "attention.py")):
    __path__.append(_root)  # noqa: F821 - the package's own __path__

from hf_flash.interface import (  # noqa: E402
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
