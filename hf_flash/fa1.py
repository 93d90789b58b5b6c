"""FlashAttention-1-form attention: the baseline that benchmarks and tests set beside the FA2 kernels.

``flash_attn_fa1_func`` computes what ``flash_attn_func`` computes (dense layout, causal or not, GQA/MQA,
``softmax_scale``) with FlashAttention-1's loop order (see ``hf_flash.kernels.fa1``): parallel over
batch x heads only, outer loop over K/V blocks, running statistics and output kept in HBM. It is slower than
the FA2 form by design; use it to measure what FA2's changes buy, not to train.

Layers, as in ``hf_flash.ops``: a ``torch.library`` custom op pair (``hf_flash::fa1_fwd`` / ``fa1_bwd``) with
fake implementations so torch.compile traces it, a registered autograd that saves q, k, v, out and the
log-sum-exp, and the public function that validates once in Python.
"""

from __future__ import annotations

import torch

from hf_flash import _validate as V
from hf_flash.kernels import fa1 as _kern

__all__ = ["flash_attn_fa1_func"]


@torch.library.custom_op("hf_flash::fa1_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def fa1_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return _kern.fa1_forward(q, k, v, softmax_scale, causal)


@fa1_fwd.register_fake
def _(q, k, v, softmax_scale, causal):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("hf_flash::fa1_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def fa1_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, softmax_scale: float, causal: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kern.fa1_backward(dout, q, k, v, out, lse, softmax_scale, causal)


@fa1_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fa1_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None


torch.library.register_autograd("hf_flash::fa1_fwd", _backward, setup_context=_setup_context)


def flash_attn_fa1_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
    """Attention over (batch, seqlen, nheads, headdim) tensors in FlashAttention-1's loop order.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with nheads_k
            dividing nheads (query head ``h`` uses kv head ``h // (nheads // nheads_k)``, no copy of K/V).
            float16, bfloat16 or float32, any strides with the last dimension contiguous; headdim 1..256.
        softmax_scale: scaling of QK^T before the softmax, default 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner when seqlen_q != seqlen_k (flash-attn >= 2.1):
            query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q``; a row that sees no key outputs zeros,
            has log-sum-exp +inf and gets zero gradients.
        return_lse: also return the float32 log-sum-exp (batch, nheads, seqlen_q) (not differentiable).
    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype, or (out, lse) with ``return_lse``.
    """
    d = V.check_qkv(q, k, v)[3]
    scale = V.check_scale(softmax_scale, d)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    out, lse = fa1_fwd(q, k, v, scale, causal)
    return (out, lse) if return_lse else out
