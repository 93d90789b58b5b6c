"""DynamicCache layers that grow in place during decoding, for the families with a split-KV decode path.

transformers' ``DynamicLayer.update`` appends a decode step's token with ``torch.cat``: every step copies the
whole cache of every layer. For Llama-3-8B shapes at 128k tokens that is 17 GB of copying per generated token
(about 11 ms on an H100, as long as the attention itself); at 32k, 3 ms. The split-KV kernel reads K/V through
strides, so the cache does not have to be one exact-size tensor: here a layer keeps a buffer with spare slots,
``keys``/``values`` are views of its first L slots, and a decode step writes its tokens into the next slots.
Growing (when the spare slots run out) copies once and adds max(256, L/16) slots, so the amortised cost per token
is O(1) and the memory overhead at most 1/16 (+256 slots).

How it is applied: each attention module of a decode family (``LayerPlan.decode_with_cache``) gets a forward
pre-hook that, when the call carries a cache and the model's attention implementation is "flashtri", switches
that module's layer (``cache.layers[layer_idx]``, exactly a ``DynamicLayer``) to ``GrowingLayer``
(:func:`growing_layer_class`), a subclass whose ``update`` does the above for decode-sized updates (at most 16
new tokens, no gradient, not while compiling) and calls ``DynamicLayer.update`` otherwise (prefill,
the first step). Anything that replaces ``keys``/``values`` (``crop`` keeps the view; beam reordering,
``batch_select_indices``, offloading make new tensors) is noticed at the next update, which then copies into a
fresh buffer: correct, only not in place. The layer stays a ``DynamicLayer`` (``isinstance``, ``copy.deepcopy``,
``get_seq_length`` unchanged). ``GrowingLayer.reserve`` makes room for a decode step's tokens and extends the
views without writing them, for the fused Llama decode step (:mod:`hf_flash.patches.llama`), whose kernel writes
them. StaticCache layers are preallocated already and are left alone.
``HF_FLASH_GROW_CACHE=0`` turns the switch off (layers not yet switched keep transformers' ``torch.cat``).

transformers internals used: ``Cache.layers``, ``DynamicLayer`` and its ``keys``/``values``/``update``/``reset``/
``offload`` and the attention module's ``layer_idx``; the cache reaches the module as the ``past_key_values`` (5.17)
or ``cache`` (5.24) keyword. :func:`supported` checks them; when they differ nothing is changed (the plain
``torch.cat`` path stays, which is correct, only slower).
"""

from __future__ import annotations

import functools
import os

import torch

from hf_flash.patches.registration import NAME

__all__ = ["growing_layer_class", "install", "supported", "DECODE_MAX_NEW", "GROW_MIN"]

# updates of at most this many tokens grow in place (flash_attn_with_kvcache's decode range)
DECODE_MAX_NEW = 16
GROW_MIN = 256

_growing: dict = {}


@functools.lru_cache(maxsize=1)
def _dynamic_layer_class():
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    return DynamicLayer


def supported() -> bool:
    base = _dynamic_layer_class()
    return base is not None and all(callable(getattr(base, n, None)) for n in ("update", "reset", "get_seq_length"))


def _growing_class(base):
    cls = _growing.get(base)
    if cls is not None:
        return cls

    class GrowingLayer(base):  # noqa: D401 - see the module docstring
        """A ``DynamicLayer`` whose decode steps write into spare slots of a buffer instead of ``torch.cat``."""

        def hf_flash_length(self) -> int:
            """Tokens the layer holds (0 before its first update)."""
            keys = self.keys if getattr(self, "is_initialized", True) else None
            return keys.shape[-2] if keys is not None and keys.dim() == 4 else 0

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            length = self.hf_flash_length()
            if (length == 0 or n > DECODE_MAX_NEW or torch.compiler.is_compiling() or torch.is_grad_enabled()
                    and (key_states.requires_grad or value_states.requires_grad)):
                return base.update(self, key_states, value_states, *args, **kwargs)
            kb, vb = self._hf_flash_room(length, n, key_states, value_states)
            kb.narrow(2, length, n).copy_(key_states)
            vb.narrow(2, length, n).copy_(value_states)
            return self._hf_flash_extend(kb, vb, length + n)

        def reserve(self, key_states, value_states):
            """For a decode call that writes the new tokens itself (hf_flash.patches.llama's fused decode):
            make room for them and extend ``keys``/``values`` over their slots without writing them. Returns
            (key buffer, value buffer, first new slot), or None where ``update`` would not grow in place (then
            the caller takes the ordinary path). The caller must fill the slots before anything reads them."""
            n = key_states.shape[-2]
            length = self.hf_flash_length()
            if length == 0 or n > DECODE_MAX_NEW or torch.compiler.is_compiling() or torch.is_grad_enabled():
                return None
            kb, vb = self._hf_flash_room(length, n, key_states, value_states)
            self._hf_flash_extend(kb, vb, length + n)
            return kb, vb, length

        def _hf_flash_extend(self, kb, vb, length):
            """``keys``/``values`` become views of the buffers' first ``length`` slots (remembered, so the next
            update knows nothing replaced them)."""
            self.keys = kb.narrow(2, 0, length)
            self.values = vb.narrow(2, 0, length)
            self._hf_flash_views = (self.keys, self.values)
            return self.keys, self.values

        def _hf_flash_room(self, length, n, key_states, value_states):
            """The layer's buffers, holding its ``length`` tokens with room for ``n`` more (grown or made anew
            when needed)."""
            keys, values = self.keys, self.values
            kb, vb = getattr(self, "_hf_flash_buf", (None, None))
            views = getattr(self, "_hf_flash_views", (None, None))
            fits = (kb is not None and key_states.dtype == kb.dtype and value_states.dtype == vb.dtype
                    and key_states.shape[:2] == kb.shape[:2] and value_states.shape[:2] == vb.shape[:2])
            # keys / values still the views the last update made (a decode step's common case: nothing replaced
            # them) need only room for n more slots; anything else is checked against the buffer
            if fits and (length + n <= kb.shape[2] if keys is views[0] and values is views[1] else
                         _is_prefix(keys, kb, length + n) and _is_prefix(values, vb, length + n)):
                return kb, vb
            # the old buffer goes before the new one is allocated (unless keys / values still view it)
            self._hf_flash_buf, self._hf_flash_views = None, (None, None)
            kb = vb = views = None
            cap = length + n + max(GROW_MIN, (length + n) // 16)
            kb = keys.new_empty((keys.shape[0], keys.shape[1], cap, keys.shape[3]))
            vb = values.new_empty((values.shape[0], values.shape[1], cap, values.shape[3]))
            kb[:, :, :length].copy_(keys)
            vb[:, :, :length].copy_(values)
            self._hf_flash_buf = (kb, vb)
            return kb, vb

        def reset(self):
            self._hf_flash_buf = None
            self._hf_flash_views = (None, None)
            return base.reset(self)

        def offload(self):
            self._hf_flash_buf = None
            self._hf_flash_views = (None, None)
            return base.offload(self)

    GrowingLayer.__name__ = GrowingLayer.__qualname__ = f"Growing{base.__name__}"
    _growing[base] = GrowingLayer
    return GrowingLayer


def _is_prefix(t: torch.Tensor, buf: torch.Tensor, needed: int) -> bool:
    """``t`` is ``buf[:, :, :L]`` (same storage start and strides) and the buffer has ``needed`` slots."""
    return (t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride() and t.shape[:2] == buf.shape[:2]
            and t.shape[3] == buf.shape[3] and needed <= buf.shape[2] and t.device == buf.device)


def growing_layer_class():
    """``GrowingLayer``: the growing subclass of the installed transformers' ``DynamicLayer``."""
    return _growing_class(_dynamic_layer_class())


def _pre_hook(module, args, kwargs):
    # runs before every forward of the module: the cheap tests first (a layer already switched, or no cache)
    if torch.compiler.is_compiling():
        return None
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = kwargs.get("cache")
    layers = getattr(cache, "layers", None)
    idx = module.__dict__.get("layer_idx")
    if idx is None:
        idx = getattr(module, "layer_idx", None)
    if layers is None or idx is None or not 0 <= idx < len(layers):
        return None
    layer = layers[idx]
    base = _dynamic_layer_class()
    if type(layer) is not base or os.environ.get("HF_FLASH_GROW_CACHE", "1") == "0":
        return None
    if getattr(getattr(module, "config", None), "_attn_implementation", None) != NAME:
        return None  # the model was switched to another implementation: transformers' own cache behaviour
    layer.__class__ = _growing_class(base)
    return None


def install(module: torch.nn.Module) -> bool:
    """Give ``module`` (an attention module with ``layer_idx``) the pre-hook; idempotent. False when the
    installed transformers lacks what it needs (then nothing changes)."""
    if getattr(module, "_hf_flash_cache_hook", False):
        return True
    if not supported() or getattr(module, "layer_idx", None) is None:
        return False
    module.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    module._hf_flash_cache_hook = True
    return True
