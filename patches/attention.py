"""The attention function registered as ``attn_implementation="flashtri"``.

``flashtri_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
is_causal=None, **kwargs) -> (out, None)`` has the signature of transformers' attention functions: query, key
and value arrive as (batch, heads, seqlen, headdim) views (K/V with fewer heads under GQA, never repeated) and the
output is returned as (batch, seqlen, heads, headdim), as transformers expects. It picks one path per call:

* a 4-D mask (a custom mask, or one made by another mask function): ``flash_attn_func(..., attn_bias=mask)``;
  a bool mask means True = attend, a float mask is added to the scores (its large negative values mask);
* a decode step of a model family that allows it (see ``LayerPlan``): ``flash_attn_with_kvcache`` on the KV
  cache as it is, with the 2-D padding mask turned into ``cache_leftpad`` / ``cache_seqlens`` on the device;
* a 2-D padding mask (padded batch): the real tokens are gathered and ``flash_attn_varlen_func`` runs with
  causal alignment per sequence (the query of a step with a cache is assumed left-padded, as in transformers'
  FlashAttention path);
* packed sequences, from ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs (``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)``) or from ``position_ids`` that restart (batch 1): ``flash_attn_varlen_func``;
* otherwise ``flash_attn_func`` with ``causal=is_causal``.

Dtypes: float32 stays float32 (the kernels run it), except under autocast where float32 inputs run in the
autocast dtype as SDPA does; K/V are cast to the query's dtype only when they differ. Dropout (training only, as
the model passes it) runs inside the kernel. ``sliding_window`` (transformers' convention: a window of
``sliding_window`` keys including the current one), ``softcap`` and the module's ``is_causal`` are honoured;
``s_aux`` (attention sinks) is rejected. ``output_attentions=True`` logs a warning once and returns ``None``
weights, as transformers' FlashAttention does; use ``attn_implementation="eager"`` to get the weights.

Not supported: masks whose valid positions are not contiguous in a decode step (left padding, as ``generate()``
makes, is supported), transformers' paged/continuous-batching attention under the "flashtri" name.
"""

from __future__ import annotations

import dataclasses
import os
import weakref

import torch

from hf_flash import interface as _iface
from hf_flash import kvcache as _kvcache
from hf_flash import padding as _padding

__all__ = ["flashtri_attention_forward", "LayerPlan", "plan_for", "install_decode_path", "DECODE_MAX_QUERY",
           "make_flashtri_attention_mask"]

# Longest query (new tokens per sequence) sent to the split-KV decode kernel; flash_attn_with_kvcache supports
# up to 16 (speculative decoding, chunked steps). Longer queries are prefill work for the FA2 kernel.
DECODE_MAX_QUERY = 16


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What the attention function may do for one attention module.

    family: "gpt2", "llama" (Llama, Mistral, Qwen2) or "generic".
    decode_with_cache: decode steps call ``flash_attn_with_kvcache`` on the cache as it is. Only for families
        whose K/V, as handed to the attention function, are the cache in token order (self-attention with
        DynamicCache or StaticCache); others use the generic paths.
    """

    family: str = "generic"
    decode_with_cache: bool = False


GENERIC = LayerPlan()

# Model types whose attention modules get a plan with ``decode_with_cache`` (patches/gpt2.py, patches/llama.py).
DECODE_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2"})


def make_flashtri_attention_mask(flash_attention_mask):
    """The mask function for "flashtri": transformers' ``flash_attention_mask`` (None when nothing is padded, else
    the 2-D mask), except in decode steps of ``DECODE_MODEL_TYPES``.

    ``flash_attention_mask`` decides "nothing is padded" with ``attention_mask.all()`` on the host: a
    synchronisation at every generated token that stops the CPU from queueing the next step while the GPU runs
    this one. In a decode step of these families the 2-D mask goes to the split-KV path unchecked instead; it
    becomes ``cache_seqlens`` / ``cache_leftpad`` on the device (``_decode_lengths``), so a mask with no padding
    costs a few tiny kernels once per step and no synchronisation.
    """

    def flashtri_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                                attention_mask=None, config=None, **kwargs):
        if (attention_mask is not None and attention_mask.dim() == 2 and q_length <= DECODE_MAX_QUERY
                and kv_length > q_length and getattr(config, "model_type", None) in DECODE_MODEL_TYPES):
            return attention_mask[:, -kv_length:]
        extra = {} if mask_function is None else {"mask_function": mask_function}
        return flash_attention_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                    q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                                    config=config, **extra, **kwargs)

    return flashtri_attention_mask

_logged: set[str] = set()


def _warn_no_weights() -> None:
    _warn_once('attn_implementation="flashtri" does not return attention weights (output_attentions=True): '
               'they are returned as None. Load the model with attn_implementation="eager" to get them.')


def _warn_once(msg: str) -> None:
    if msg in _logged:
        return
    _logged.add(msg)
    from transformers.utils import logging

    logging.get_logger("hf_flash").warning(msg)


def plan_for(module: torch.nn.Module) -> LayerPlan:
    """The plan of ``module``: set by a model patch, or resolved from its class on first use and cached."""
    plan = getattr(module, "_hf_flash_plan", None)
    if plan is not None:
        return plan
    from hf_flash.patches import gpt2, llama

    plan = gpt2.plan_for_module(module) or llama.plan_for_module(module) or GENERIC
    try:
        module._hf_flash_plan = plan
    except Exception:  # noqa: BLE001 - a module that refuses attributes just resolves again next call
        return plan
    install_decode_path(module, plan)
    return plan


def install_decode_path(module: torch.nn.Module, plan: LayerPlan, parent: torch.nn.Module | None = None) -> None:
    """What a plan with ``decode_with_cache`` adds to its module: DynamicCache layers that grow in place from the
    next forward on (patches/cache.py) and, for the Llama family, the fused decode step (patches/llama.py), the
    decode graphs of its decoder layer (patches/graphs.py) and the flat GEMM of the layer's projections
    (patches/flat.py). ``parent``: that decoder layer; None when the module is being set up at its first call,
    whose caller is the decoder layer."""
    if not plan.decode_with_cache:
        return
    from hf_flash.patches import cache, flat, graphs, llama

    cache.install(module)
    if plan.family == "llama" and llama.install_fused_decode(module):
        layer = parent if parent is not None else graphs.caller_layer(module)
        if layer is not None:
            graphs.install(layer)
            flat.install(layer)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    dev = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return q.dtype


def _window(sliding_window) -> tuple[int, int]:
    if sliding_window is None or sliding_window <= 0:
        return (-1, -1)
    # transformers counts the current token in the window; flash-attn's bounds are inclusive
    return (int(sliding_window) - 1, int(sliding_window) - 1)


_packed_cache: list = [None, None]  # [weakref to position_ids, result]; the same tensor reaches every layer


def _packed_from_position_ids(position_ids, batch: int, seqlen: int):
    """(cu_seqlens int32, max_seqlen int) when ``position_ids`` of a batch-1 input restart, else None.

    Reads the boundaries on the host once per forward (cached on the tensor), not once per layer.
    """
    if position_ids is None or batch != 1 or seqlen == 1 or position_ids.shape[-1] != seqlen:
        return None
    ref, result = _packed_cache
    if ref is not None and ref() is position_ids and result[0] == position_ids._version:
        return result[1]
    pos = position_ids.reshape(-1)
    starts = (pos[1:] <= pos[:-1]).nonzero().view(-1) + 1  # a sequence starts where the position does not grow
    if starts.numel() == 0:
        packed = None
    else:
        cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), seqlen)]).to(torch.int32)
        packed = (cu, int((cu[1:] - cu[:-1]).max()))
    if not torch.compiler.is_compiling():
        _packed_cache[0], _packed_cache[1] = weakref.ref(position_ids), (position_ids._version, packed)
    return packed


# The lengths derived from the last decode step's mask: every layer of a step gets the same mask tensor, so the
# few small device ops are done once per step, not once per layer.
_last_lengths: list = [None, None, None]


def _decode_lengths(mask: torch.Tensor | None):
    """(cache_seqlens, cache_leftpad) for a cache whose valid tokens are [leftpad, seqlen) per sequence.

    ``mask`` (batch, L) marks the valid positions of the first L cache slots; computed on the device, no sync.
    """
    if mask is None:
        return None, None
    ref, version, lengths = _last_lengths
    if ref is not None and ref() is mask and version == mask._version and not torch.compiler.is_compiling():
        return lengths
    m = mask.to(torch.bool)
    count = m.sum(-1, dtype=torch.int32)
    first = m.to(torch.int8).argmax(-1).to(torch.int32)  # index of the first valid slot (0 for an empty row)
    lengths = (first + count, first)
    if not torch.compiler.is_compiling():
        _last_lengths[:] = [weakref.ref(mask), mask._version, lengths]
    return lengths


def _use_decode(plan, q, k, mask, dropout, sliding_window) -> bool:
    """A decode step for the split-KV path; q and k in transformers' (batch, heads, seqlen, headdim) layout."""
    if not plan.decode_with_cache or dropout > 0.0:
        return False
    q_len, k_len = q.shape[2], k.shape[2]
    if q_len > DECODE_MAX_QUERY or k_len <= q_len:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    if mask is not None:
        if mask.dim() != 2 or mask.shape[-1] > k_len:
            return False
        # a sliding-window cache hands over its own window: the mask must line up with it slot for slot
        if sliding_window is not None and mask.shape[-1] != k_len:
            return False
    return True


_unpad_cache: list = [None, None, None]  # [weakref to mask, mask version, (indices, cu_seqlens, max_seqlen)]


def _unpad_plan(mask: torch.Tensor):
    """(indices, cu_seqlens, max_seqlen) of a 2-D padding mask. Finding max_seqlen reads the device once; every
    layer of a forward gets the same mask tensor, so that happens once per forward, not once per layer."""
    ref, version, plan = _unpad_cache
    if ref is not None and ref() is mask and version == mask._version and not torch.compiler.is_compiling():
        return plan
    plan = _padding.unpad_indices(mask.to(torch.bool))[:3]
    if not torch.compiler.is_compiling():
        _unpad_cache[:] = [weakref.ref(mask), mask._version, plan]
    return plan


def _padded_varlen(q, k, v, mask, causal, **kw):
    """Padded batch (2-D mask): gather the real tokens, run varlen, scatter back (transformers' convention)."""
    batch, q_len = q.shape[0], q.shape[1]
    length = mask.shape[-1]
    if k.shape[1] > length:  # a static cache longer than the tokens seen so far
        k, v = k[:, :length], v[:, :length]
    indices_k, cu_k, max_k = _unpad_plan(mask)
    k_unpad = _padding.index_first_axis(k, indices_k)
    v_unpad = _padding.index_first_axis(v, indices_k)
    if q_len == length:
        q_unpad, indices_q, cu_q, max_q = _padding.index_first_axis(q, indices_k), indices_k, cu_k, max_k
    elif q_len == 1:
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
        indices_q, max_q, q_unpad = cu_q[:-1], 1, q.reshape(batch, *q.shape[2:])
    else:  # the new tokens are the last q_len positions of the mask (left padding)
        q_unpad, indices_q, cu_q, max_q, _ = _padding.unpad_input(q, mask[:, -q_len:].to(torch.bool))
    out = _iface.flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, causal=causal, **kw)
    return _padding.pad_input(out, indices_q, batch, q_len)


def _varlen_flat(q, k, v, cu_q, cu_k, max_q, max_k, causal, **kw):
    batch = q.shape[0]
    out = _iface.flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                        v.reshape(-1, *v.shape[2:]), cu_q, cu_k, int(max_q), int(max_k),
                                        causal=causal, **kw)
    return out.view(batch, -1, *out.shape[1:])


def flashtri_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               sliding_window: int | None = None, softcap: float | None = None,
                               s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function for "flashtri"; see the module docstring."""
    if kwargs.get("output_attentions", False):
        _warn_no_weights()
    if s_aux is not None:
        raise ValueError('attn_implementation="flashtri" does not support attention sinks (s_aux); use '
                         'attn_implementation="eager" or "sdpa" for this model.')
    plan = plan_for(module)
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    if sliding_window is None:
        # the instance's own attribute (nn.Module.__getattr__ would raise and catch for modules without one)
        sliding_window = module.__dict__.get("sliding_window", getattr(type(module), "sliding_window", None))
    dtype = _compute_dtype(query)
    mask = attention_mask
    if (query.dtype == dtype and key.dtype == dtype and value.dtype == dtype and value.shape[-1] == query.shape[-1]
            and _use_decode(plan, query, key, mask, float(dropout or 0.0), sliding_window)):
        # a decode step: the lean path, which runs once per layer per generated token. The tensors go as they
        # are; a recorded plan reads them through their strides (kvcache.decode_attention(heads_first=True)).
        # The config's output_attentions is checked on the other paths only (its __getattribute__ is slow):
        # transformers 5.24 refuses it for any implementation but "eager", and where it is set, the prefill before
        # any decode step has warned already.
        cache_seqlens, cache_leftpad = _decode_lengths(mask)
        out = _kvcache.decode_attention(query, key, value, cache_seqlens, cache_leftpad, scaling, bool(is_causal),
                                        _window(sliding_window), float(softcap) if softcap else 0.0,
                                        heads_first=True)
        return out, None
    if getattr(getattr(module, "config", None), "output_attentions", False):
        _warn_no_weights()
    # flash layout (batch, seqlen, heads, headdim): views, no copies
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if q.dtype != dtype or k.dtype != dtype or v.dtype != dtype:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    v_dim = v.shape[-1]
    if v_dim != q.shape[-1]:  # e.g. MLA: pad V up to the query head dim, crop the output
        v = torch.nn.functional.pad(v, [0, q.shape[-1] - v_dim])
    window = _window(sliding_window)
    softcap = float(softcap) if softcap else 0.0
    dropout = float(dropout or 0.0)
    if _use_decode(plan, query, key, mask, dropout, sliding_window):
        # a decode step whose inputs need a cast or a padded V first
        cache_seqlens, cache_leftpad = _decode_lengths(mask)
        out = _kvcache.decode_attention(q, k, v, cache_seqlens, cache_leftpad, scaling, bool(is_causal), window,
                                        softcap)
        return (out if v_dim == out.shape[-1] else out[..., :v_dim]), None

    deterministic = kwargs.get("deterministic")
    if deterministic is None:  # transformers' switch for its flash-attention paths
        deterministic = os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
    kw = dict(softmax_scale=scaling, window_size=window, softcap=softcap, deterministic=bool(deterministic))
    if mask is not None and mask.dim() == 4:
        if mask.shape[-1] != k.shape[1]:
            mask = mask[..., : k.shape[1]]
        out = _iface.flash_attn_func(q, k, v, dropout, causal=False, attn_bias=mask, **kw)
    elif mask is not None:
        if mask.dim() != 2:
            raise ValueError(f'attn_implementation="flashtri" takes a 2-D padding mask or a 4-D mask, got '
                             f"attention_mask of shape {tuple(mask.shape)}")
        out = _padded_varlen(q, k, v, mask, is_causal, dropout_p=dropout, **kw)
    elif all(kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")):
        cu_q, cu_k = (kwargs[n].to(torch.int32) for n in ("cu_seq_lens_q", "cu_seq_lens_k"))
        out = _varlen_flat(q, k, v, cu_q, cu_k, kwargs["max_length_q"], kwargs["max_length_k"], is_causal,
                           dropout_p=dropout, **kw)
    else:
        packed = _packed_from_position_ids(kwargs.get("position_ids"), q.shape[0], q.shape[1])
        if packed is not None and k.shape[1] == q.shape[1]:
            cu, max_len = packed
            out = _varlen_flat(q, k, v, cu, cu, max_len, max_len, is_causal, dropout_p=dropout, **kw)
        else:
            out = _iface.flash_attn_func(q, k, v, dropout, causal=is_causal, **kw)
    if v_dim != out.shape[-1]:
        out = out[..., :v_dim]
    return out, None
