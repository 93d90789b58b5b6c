"""The Llama family with "flashtri": Llama, Mistral, Qwen2 (and models whose attention subclasses theirs).

Training and prefill go through the generic attention function (GQA without repeating K/V heads; RoPE is
applied by the model before attention; sliding windows from ``sliding_window``). What this patch adds is the
decode path: a step with a KV cache (DynamicCache or StaticCache) calls ``flash_attn_with_kvcache`` on the cache
tensors as transformers hands them over (views, no ``repeat_kv``, no copy); for a left-padded batch the 2-D mask
becomes ``cache_leftpad`` / ``cache_seqlens`` on the device, so no step gathers or unpads the cache (transformers'
own FlashAttention path does, at every step).

With a DynamicCache, each layer's cache grows in place during decoding (:mod:`hf_flash.patches.cache`): no
``torch.cat`` of the whole cache per token.

Fused decode step (:func:`install_fused_decode`): an attention module of these classes (their own ``forward``, not
a subclass's) gets a ``forward`` that, in a decode step with a growing DynamicCache layer and no gradient,
rotates the query and the new key and writes the new K/V into the cache in one kernel (the rotary from the
``position_embeddings`` the model computed, exactly ``x * cos + rotate_half(x) * sin``), then runs the split-KV
kernels: 3 launches where transformers' path makes ~10 for the rotary, 2 for the cache append and 2 for the
attention, a decode step's host time being what bounds ``generate()``. Everything else (prefill, training, other
caches or cache dtypes, sliding windows, ``output_attentions``, attention dropout in train mode, torch.compile,
``HF_FLASH_FUSED_DECODE=0``) runs the class's ``forward`` unchanged. A module whose ``forward`` someone else
already replaced (accelerate's hooks) is left alone. The rotary + append launch replays a recorded
:class:`~hf_flash.kernels.decode.AppendPlan` (one direct launch) once its layout was seen.

Decode graphs (:mod:`hf_flash.patches.graphs`): the decoder layer around such a module replays the rest of its
decode step (norms, projections, MLP, residuals) as two CUDA graphs, with this fused attention between them.

``copy.deepcopy`` of a model keeps the fused ``forward`` (bound to the copy); a model pickled whole
(``torch.save``) loads with the class's ``forward`` (not fused, still correct). transformers internals used
(read in 5.17 and 5.24): the module's ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``head_dim``, ``scaling``,
``layer_idx`` (checked at install), the decoder layer passing ``hidden_states``, ``position_embeddings``,
``attention_mask`` and the cache (``past_key_values`` or ``cache``) as keywords, and ``Cache.layers`` /
``offloading``; a call that does not look like that runs the class's forward.

Calls without a cache (training steps) rotate q and k with one kernel each (kernels/rotary.py, with its inverse in
the backward) instead of transformers' five tensor operations (:func:`_rotary_forward`; ``HF_FLASH_FUSED_ROTARY=0``
turns it off). Measured on an H100, Llama-3-8B shapes, 32 layers, bf16: a training step at 4k 1.04x faster than
with transformers' rotary (1.06x with gradient checkpointing, 1.04x at 16k with it; benchmarks/NOTES.md). The
forward during which a module is set up lazily runs the class path, and so does any gradient-checkpointing
recomputation of it (recognised by its cos table), so a forward and its recomputation always take the same path.

Not done: sliding-window layers of a StaticCache (a rolling buffer) use the generic path.
"""

from __future__ import annotations

import sys
import types

import torch

from hf_flash import kvcache
from hf_flash.kernels import _launch
from hf_flash.kernels.rotary import apply_rotary
from hf_flash.patches import graphs
from hf_flash.patches._common import LayerPlan, apply, class_names, stock_class
from hf_flash.patches.attention import DECODE_MAX_QUERY, _decode_lengths
from hf_flash.patches.registration import NAME

__all__ = ["patch_llama", "plan_for_module", "install_fused_decode", "ATTENTION_CLASSES"]

ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention")


def plan_for_module(module: torch.nn.Module) -> LayerPlan | None:
    if class_names(module).isdisjoint(ATTENTION_CLASSES):
        return None
    return LayerPlan(family="llama", decode_with_cache=True)


def patch_llama(model: torch.nn.Module) -> torch.nn.Module:
    """Use "flashtri" for a Llama / Mistral / Qwen2 model (switching its attention implementation if needed);
    returns the model. Applied automatically to models loaded with ``attn_implementation="flashtri"``."""
    return apply(model, plan_for_module, "llama")


_USED = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx", "config")


def install_fused_decode(module: torch.nn.Module) -> bool:
    """Give a Llama-family attention module the fused decode ``forward`` (see the module docstring); idempotent.
    False where it does not apply (another class's forward, or one already replaced on the instance)."""
    current = module.__dict__.get("forward")
    if current is not None:
        return getattr(current, "__func__", None) is _fused_forward
    # what the fused step uses of the module (transformers 5.17-5.24); a version that changed it keeps its forward
    if stock_class(module, ATTENTION_CLASSES) is None or not all(hasattr(module, a) for a in _USED):
        return False
    module.forward = types.MethodType(_fused_forward, module)
    module._hf_flash_install_pe = _calling_pe(module)
    return True


def _calling_pe(module: torch.nn.Module) -> int | None:
    """id() of the cos table of the class ``forward`` of ``module`` running now, when the module is being set up
    lazily inside it (its first call), else None. That forward took the class path; a gradient-checkpointing
    recomputation of it passes the same tables again, and must take the class path too (:func:`_rotary_inputs`)."""
    frame = sys._getframe(1)
    for _ in range(24):
        if frame is None:
            return None
        loc = frame.f_locals
        if loc.get("self") is module and isinstance(loc.get("position_embeddings"), (tuple, list)):
            return id(loc["position_embeddings"][0])
        frame = frame.f_back
    return None


# (batch, value, device) -> int32 tensor of that value: every layer of a decode step appends at the same slot and
# (without a mask) attends to the same length, so a step makes each once
_ints_cache: dict = {}


def _device_ints(batch: int, value: int, device) -> torch.Tensor:
    key = (batch, value, device)
    t = _ints_cache.get(key)
    if t is None:
        if len(_ints_cache) >= 8:
            _ints_cache.clear()
        t = _ints_cache[key] = torch.full((batch,), value, dtype=torch.int32, device=device)
    return t


def _fused_inputs(self, hidden: torch.Tensor, kwargs: dict):
    """(cache layer, cos, sin, mask) when a call of this module with ``hidden`` and ``kwargs`` qualifies for the
    fused decode step, else None (the class's forward runs). Also used by :mod:`hf_flash.patches.graphs` with the
    decoder layer's keywords, which are the ones its attention module gets."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or hidden.dim() != 3
            or hidden.shape[1] > DECODE_MAX_QUERY or kwargs.get("output_attentions")):
        return None
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    pe = kwargs.get("position_embeddings")
    layers = getattr(cache, "layers", None)
    idx = self.__dict__.get("layer_idx")
    # an offloading cache moves layers between devices inside Cache.update, which the fused step does not call
    if pe is None or layers is None or idx is None or not 0 <= idx < len(layers) or getattr(cache, "offloading",
                                                                                              False):
        return None
    layer = layers[idx]
    cos, sin = pe
    batch, n = hidden.shape[0], hidden.shape[1]
    mask = kwargs.get("attention_mask")
    length = layer.hf_flash_length() if getattr(layer, "reserve", None) is not None else 0  # a GrowingLayer
    if (length == 0 or cos.dim() != 3 or cos.shape[-1] != self.head_dim or cos.shape[0] != batch
            or cos.shape[1] != n or sin.shape != cos.shape
            or (mask is not None and (mask.dim() != 2 or mask.shape[-1] != length + n))
            or self.__dict__.get("sliding_window") is not None or _launch.env_get("HF_FLASH_FUSED_DECODE") == "0"
            or (self.training and getattr(self, "attention_dropout", 0.0))
            or getattr(self.config, "_attn_implementation", None) != NAME):
        return None
    return layer, cos, sin, mask


def _fused_attention(self, q, k, v, layer, cos, sin, mask, out=None):
    """The fused step's attention for the projections q, k, v (batch, n, heads, dim): rotary + append in one
    kernel, then split-KV over the layer's whole buffer. Returns the attention output (batch, n, heads, dim),
    written into ``out`` when given, or None where the cache cannot take the tokens in place (then nothing was
    written and the caller takes the ordinary path)."""
    if k.dtype != layer.keys.dtype or q.dtype != k.dtype or v.dtype != k.dtype:  # a cache of another dtype
        return None
    room = layer.reserve(k.transpose(1, 2), v.transpose(1, 2))
    if room is None:
        return None
    kb, vb, start = room
    batch, n = q.shape[0], q.shape[1]
    # (batch, capacity, kv heads, dim) views of the layer's buffers: the new tokens land at [start, start + n)
    k_buf, v_buf = kb.transpose(1, 2), vb.transpose(1, 2)
    kvcache.append_rotary_per_token(q, k, v, k_buf, v_buf, _device_ints(batch, start, q.device), cos, sin)
    # the attention reads the whole buffer with the lengths on the device: its shape changes only when the buffer
    # grows, so every layer of every step replays one decode plan (a cache sliced to the current length is a new
    # signature at each step, whose first layer records a plan: ~0.6 ms of host time per step)
    seqlens, leftpad = _decode_lengths(mask)
    if seqlens is None:
        seqlens = _device_ints(batch, start + n, q.device)
    return kvcache.decode_attention(q, k_buf, v_buf, seqlens, leftpad, self.scaling, True, (-1, -1), 0.0, out=out)


def _fused_forward(self, *args, **kwargs):
    """The module's forward; a decode step that qualifies runs fused (rotary + append in one kernel, then the
    split-KV kernels), everything else runs the class's forward."""
    hidden = kwargs.get("hidden_states") if not args else args[0]
    cap = graphs.active()
    if cap is not None and cap.attn is self:  # a decode graph being captured (patches/graphs.py)
        return cap.at_attention(self, hidden)
    cls_forward = type(self).forward
    ready = None if len(args) > 1 or hidden is None else _fused_inputs(self, hidden, kwargs)
    if ready is None:
        if len(args) <= 1 and hidden is not None and _rotary_inputs(self, hidden, kwargs):
            return _rotary_forward(self, hidden, kwargs)
        return cls_forward(self, *args, **kwargs)
    batch, n, d = hidden.shape[0], hidden.shape[1], self.head_dim
    q = self.q_proj(hidden).view(batch, n, -1, d)
    k = self.k_proj(hidden).view(batch, n, -1, d)
    v = self.v_proj(hidden).view(batch, n, -1, d)
    out = _fused_attention(self, q, k, v, *ready)
    if out is None:  # not expected after the checks above; the ordinary path, from the projections on
        return cls_forward(self, *args, **kwargs)
    return self.o_proj(out.reshape(batch, n, -1)), None


def _rotary_inputs(self, hidden: torch.Tensor, kwargs: dict) -> bool:
    """Whether a call without a cache (a training step, a forward with ``use_cache=False``) takes
    :func:`_rotary_forward`: not turned off with ``HF_FLASH_FUSED_ROTARY=0``, the model's own cos / sin tables in
    transformers' shape, no sliding window, no ``output_attentions``, not under torch.compile, on CUDA or the CPU
    interpreter.
    """
    if _launch.env_get("HF_FLASH_FUSED_ROTARY") == "0" or torch.compiler.is_compiling() or hidden.dim() != 3:
        return False
    if (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or kwargs.get("output_attentions")
            or getattr(self.config, "_attn_implementation", None) != NAME):
        return False
    if self.__dict__.get("sliding_window") is not None or getattr(self.config, "sliding_window", None) is not None:
        return False  # Mistral / Qwen2 windows: their class forward passes them on; left to it
    if not (hidden.is_cuda or _launch.env_get("TRITON_INTERPRET") == "1"):
        return False
    pe = kwargs.get("position_embeddings")
    if not isinstance(pe, (tuple, list)) or len(pe) != 2:
        return False
    cos, sin = pe
    if id(cos) == self.__dict__.get("_hf_flash_install_pe"):
        return False  # the forward during which this module was set up, or a recomputation of it
    return (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dim() == 3
            and cos.shape[1:] == (hidden.shape[1], self.head_dim) and cos.shape[0] in (1, hidden.shape[0])
            and sin.shape == cos.shape and sin.stride() == cos.stride() and cos.stride(-1) == 1
            and self.head_dim % 2 == 0 and not cos.requires_grad and not sin.requires_grad)


def _rotary_forward(self, hidden: torch.Tensor, kwargs: dict):
    """The class forward (transformers 5.17-5.24: projections, rotary, attention interface, o_proj) for a call
    without a cache, with q and k rotated by one kernel each (kernels/rotary.py; its inverse in the backward)
    instead of transformers' five tensor operations and their autograd records."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cos, sin = kwargs["position_embeddings"]
    input_shape = hidden.shape[:-1]
    shape = (*input_shape, -1, self.head_dim)
    q = apply_rotary(self.q_proj(hidden).view(shape), cos, sin).transpose(1, 2)
    k = apply_rotary(self.k_proj(hidden).view(shape), cos, sin).transpose(1, 2)
    v = self.v_proj(hidden).view(shape).transpose(1, 2)
    rest = {n: a for n, a in kwargs.items()
            if n not in ("hidden_states", "position_embeddings", "attention_mask", "cache", "past_key_values")}
    attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attention(self, q, k, v, kwargs.get("attention_mask"),
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             **rest)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


# A bound method pickles as getattr(module, its function's name): under the name "forward", a model saved whole
# (torch.save) loads with the class's forward bound in its place (not fused, still correct). copy.deepcopy
# rebinds the fused forward to the copy.
_fused_forward.__name__ = "forward"
