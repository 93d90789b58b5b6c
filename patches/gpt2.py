"""GPT-2 with "flashtri".

transformers' ``GPT2Attention`` already hands the attention function what the kernels need, so this patch only
declares the plan and checks the config:

* ``attn_pdrop``: the model passes ``dropout=attn_pdrop`` in training and 0 in eval; it runs inside the kernel
  (Philox mask regenerated in the backward, seeded from PyTorch's generator).
* ``scale_attn_weights`` and ``scale_attn_by_inverse_layer_idx``: folded by the model into ``scaling``
  (``1/sqrt(head_dim)`` and ``/(layer_idx + 1)``), passed as ``softmax_scale``.
* ``reorder_and_upcast_attn``: honoured. The option exists to compute ``QK^T`` and the softmax in float32 with
  the scale applied before the softmax (Megatron-style) so fp16 scores cannot overflow; the kernels always
  accumulate ``QK^T`` in float32, apply the scale in float32 and keep the softmax in float32.
* Self-attention layers decode with ``flash_attn_with_kvcache`` on the cache; cross-attention layers (GPT-2 as
  a decoder with ``add_cross_attention``) use the generic non-causal path.
"""

from __future__ import annotations

import torch

from hf_flash.patches._common import LayerPlan, apply, class_names

__all__ = ["patch_gpt2", "plan_for_module"]


def plan_for_module(module: torch.nn.Module) -> LayerPlan | None:
    if "GPT2Attention" not in class_names(module):
        return None
    self_attention = not getattr(module, "is_cross_attention", False)
    return LayerPlan(family="gpt2", decode_with_cache=self_attention)


def patch_gpt2(model: torch.nn.Module) -> torch.nn.Module:
    """Use "flashtri" for a GPT-2 model (switching its attention implementation if needed); returns the model.

    Applied automatically to models loaded with ``attn_implementation="flashtri"``.
    """
    return apply(model, plan_for_module, "gpt2")
