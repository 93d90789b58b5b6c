"""The Llama family with "flashtri": Llama, Mistral, Qwen2 (and models whose attention subclasses theirs).

Training and prefill go through the generic attention function (GQA without repeating K/V heads; RoPE is
applied by the model before attention; sliding windows from ``sliding_window``). What this patch adds is the
decode path: a step with a KV cache (DynamicCache or StaticCache) calls ``flash_attn_with_kvcache`` on the cache
tensors as transformers hands them over (views, no ``repeat_kv``, no copy); for a left-padded batch the 2-D mask
becomes ``cache_leftpad`` / ``cache_seqlens`` on the device, so no step gathers or unpads the cache (transformers'
own FlashAttention path does, at every step).

With a DynamicCache, each layer's cache grows in place during decoding (:mod:`hf_flash.patches.cache`): no
``torch.cat`` of the whole cache per token.

Not done: fusing the new token's rotary embedding and cache append into the decode call (transformers' cache
``update`` appends first); sliding-window layers of a StaticCache (a rolling buffer) use the generic path.
"""

from __future__ import annotations

import torch

from hf_flash.patches._common import LayerPlan, apply, class_names

__all__ = ["patch_llama", "plan_for_module", "ATTENTION_CLASSES"]

ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention")


def plan_for_module(module: torch.nn.Module) -> LayerPlan | None:
    if class_names(module).isdisjoint(ATTENTION_CLASSES):
        return None
    return LayerPlan(family="llama", decode_with_cache=True)


def patch_llama(model: torch.nn.Module) -> torch.nn.Module:
    """Use "flashtri" for a Llama / Mistral / Qwen2 model (switching its attention implementation if needed);
    returns the model. Applied automatically to models loaded with ``attn_implementation="flashtri"``."""
    return apply(model, plan_for_module, "llama")
