"""Registration of ``attn_implementation="flashtri"`` with transformers: with :mod:`hf_flash.patches.cache` (the
DynamicCache layers that grow in place), the fused decode step of :mod:`hf_flash.patches.llama` and the decode
graphs of :mod:`hf_flash.patches.graphs`, three optimisations that leave transformers' behaviour as it is when its
internals differ, the only module of hf_flash that touches transformers' internals.

What it does, each step idempotent:

1. ``AttentionInterface.register("flashtri", flashtri_attention_forward)``: models built on the attention
   interface call hf_flash's attention function (:mod:`hf_flash.patches.attention`).
2. ``AttentionMaskInterface.register("flashtri", ...)``: the mask machinery hands "flashtri" the 2-D padding mask
   (or ``None``) as it does for FlashAttention (transformers' ``flash_attention_mask``), except in decode steps of
   the families whose decode path reads the mask on the device, where the mask is handed over unchecked (see
   ``make_flashtri_attention_mask``). Without this entry ``create_causal_mask`` returns
   ``None`` for an unknown name and padding is silently lost.
3. transformers treats every implementation whose name contains "flash" as a FlashAttention flavour
   (``is_flash_attention_requested`` tests the substring); ``from_pretrained`` then preloads it through
   ``modeling_flash_attention_utils.lazy_import_flash_attention`` -> ``_lazy_imports``, which, for a name it does
   not know, looks for a hub kernel called "flashtri" and fails. We wrap ``_lazy_imports`` (a module global that
   ``lazy_import_flash_attention`` looks up at call time) so that "flashtri" resolves to hf_flash's
   ``flash_attn_func``, ``flash_attn_varlen_func``, ``flash_attn_with_kvcache``, ``pad_input`` and
   ``unpad_input``. Every other name goes to the original function unchanged. Code that calls transformers'
   ``_flash_attention_forward`` with "flashtri" therefore runs hf_flash's kernels too.

Step 3 depends on private names. They are checked (presence and signature) before anything is changed; when
they differ, :func:`register` raises :class:`UnsupportedTransformersError` naming the installed version and the
tested range. A version outside the tested range whose internals still match is accepted with a warning.
"""

from __future__ import annotations

import inspect
import warnings

NAME = "flashtri"
# Versions whose internals were read and tested (5.17: the GPU image; 5.24: CI).
TESTED_MIN = (5, 17)
TESTED_MAX = (5, 24)
SUPPORTED_RANGE = "transformers >= 5.17, <= 5.24 (tested: 5.17.0 and 5.24.0)"

_registered = False


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers does not have the internals hf_flash's registration needs."""


def _version_tuple(v: str) -> tuple[int, int]:
    parts = []
    for p in v.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def _unsupported(installed: str, what: str) -> UnsupportedTransformersError:
    return UnsupportedTransformersError(
        f'hf_flash cannot register attn_implementation="{NAME}" with transformers {installed}: {what}. '
        f"Supported: {SUPPORTED_RANGE}. Install one of those (pip install 'transformers>=5.17,<=5.24') or use "
        'attn_implementation="sdpa"; hf_flash.flash_attn_func and the other kernels work without the registration.')


def _internals():
    """The transformers objects registration needs, after checking that they look as expected."""
    import transformers

    installed = transformers.__version__
    try:
        from transformers import modeling_flash_attention_utils as mfau
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        raise _unsupported(installed, f"an import failed ({e})") from None
    lazy = getattr(mfau, "_lazy_imports", None)
    if lazy is None or not callable(lazy) or not callable(getattr(mfau, "lazy_import_flash_attention", None)):
        raise _unsupported(installed, "transformers.modeling_flash_attention_utils has no _lazy_imports / "
                                      "lazy_import_flash_attention")
    original = getattr(lazy, "_hf_flash_original", lazy)
    params = list(inspect.signature(original).parameters)
    if params[:1] != ["implementation"]:
        raise _unsupported(installed, f"_lazy_imports has parameters {params}, expected (implementation, ...)")
    for interface in (AttentionInterface, AttentionMaskInterface):
        if not isinstance(getattr(interface, "_global_mapping", None), dict) or not hasattr(interface, "register"):
            raise _unsupported(installed, f"{interface.__name__} has no register()/_global_mapping")
    ver = _version_tuple(installed)
    if not TESTED_MIN <= ver <= TESTED_MAX:
        warnings.warn(f'hf_flash: transformers {installed} is outside the tested range ({SUPPORTED_RANGE}); its '
                      f'internals look compatible, so "{NAME}" is registered, but it is untested there.',
                      stacklevel=3)
    return mfau, AttentionInterface, AttentionMaskInterface, flash_attention_mask


def flash_functions():
    """hf_flash's five functions, in the order transformers' ``_lazy_imports`` returns them."""
    from hf_flash.interface import flash_attn_func, flash_attn_varlen_func
    from hf_flash.kvcache import flash_attn_with_kvcache
    from hf_flash.padding import pad_input, unpad_input

    return flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad_input, unpad_input


def _wrap_lazy_imports(original):
    def _lazy_imports(implementation, *args, **kwargs):
        if implementation == NAME:
            return flash_functions()
        return original(implementation, *args, **kwargs)

    _lazy_imports._hf_flash_original = original
    _lazy_imports.__doc__ = original.__doc__
    return _lazy_imports


def register() -> None:
    """Register ``attn_implementation="flashtri"`` with transformers (idempotent).

    Raises :class:`UnsupportedTransformersError` when the installed transformers lacks the internals this needs.
    """
    global _registered
    if _registered:
        return
    mfau, AttentionInterface, AttentionMaskInterface, flash_attention_mask = _internals()
    from hf_flash.patches.attention import flashtri_attention_forward

    AttentionInterface.register(NAME, flashtri_attention_forward)
    from hf_flash.patches.attention import make_flashtri_attention_mask

    AttentionMaskInterface.register(NAME, make_flashtri_attention_mask(flash_attention_mask))
    if not hasattr(mfau._lazy_imports, "_hf_flash_original"):
        mfau._lazy_imports = _wrap_lazy_imports(mfau._lazy_imports)
    _registered = True


def is_registered() -> bool:
    return _registered
