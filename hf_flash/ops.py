"""The attention kernels as ``torch.library`` custom ops, with fake (meta) implementations for torch.compile and
a registered autograd that saves q, k, v, out, lse (and the dropout seed) and recomputes in the backward.

One op pair serves dense and varlen layouts: dense tensors are (batch, seqlen, heads, dim) and varlen ones
(total, heads, dim) with ``cu_seqlens``; the log-sum-exp is (batch, heads, seqlen_q) or (heads, total_q).

:func:`attention` uses the ops only under ``torch.compile``; eager calls take an ``autograd.Function`` over the same
kernels, which costs less host time per call.
"""

from __future__ import annotations

import torch

from hf_flash.kernels import attention as _kern

def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is None:
        return (q.shape[0], q.shape[2], q.shape[1])
    return (q.shape[1], q.shape[0])


@torch.library.custom_op("hf_flash::attn_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
             cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, bias: torch.Tensor | None,
             alibi_slopes: torch.Tensor | None, rng: torch.Tensor | None, dropout_p: float, softmax_scale: float,
             window_left: int, window_right: int, softcap: float, deterministic: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic only shapes the backward; it is an input so that autograd can save it
    return _kern.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, rng,
                         dropout_p, softmax_scale, window_left, window_right, softcap)


@attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, rng, dropout_p,
      softmax_scale, window_left, window_right, softcap, deterministic):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(_lse_shape(q, cu_seqlens_q),
                                                                                    dtype=torch.float32)


@torch.library.custom_op("hf_flash::attn_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
             max_seqlen_q: int, max_seqlen_k: int, bias: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
             rng: torch.Tensor | None, dropout_p: float, softmax_scale: float, window_left: int, window_right: int,
             softcap: float, deterministic: bool, bias_needs_grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kern.backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias,
                          alibi_slopes, rng, dropout_p, softmax_scale, window_left, window_right, softcap,
                          deterministic, bias_needs_grad)


@attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, rng,
      dropout_p, softmax_scale, window_left, window_right, softcap, deterministic, bias_needs_grad):
    dbias = (torch.empty(_kern.dbias_shape(bias), dtype=bias.dtype, device=q.device) if bias_needs_grad
             else q.new_empty((0,)))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, bias, alibi, rng, dropout_p, scale, left, right, softcap,
     deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, bias, alibi, rng)
    ctx.args = (max_q, max_k, dropout_p, scale, left, right, softcap)
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.deterministic = deterministic


def _grads(ctx, dout, bwd):
    """Input gradients from ``bwd`` (the custom op ``attn_bwd`` or the kernels' backward) on what
    :func:`_setup_context` saved: dq, dk, dv, and dbias where the bias needs it."""
    q, k, v, out, lse, cu_q, cu_k, bias, alibi, rng = ctx.saved_tensors
    max_q, max_k, dropout_p, scale, left, right, softcap = ctx.args
    dq, dk, dv, dbias = bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, bias, alibi, rng, dropout_p, scale,
                            left, right, softcap, ctx.deterministic, ctx.bias_needs_grad)
    return (dq, dk, dv, None, None, None, None, dbias if ctx.bias_needs_grad else None, None, None, None, None,
            None, None, None, None)


def _backward(ctx, dout, dlse):
    return _grads(ctx, dout, attn_bwd)


torch.library.register_autograd("hf_flash::attn_fwd", _backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """The eager path: the same kernels and the same saved state as the custom op's autograd, without the
    custom op's per-call dispatch (schema defaults, redispatch through the autograd key): host time per forward +
    backward about 240 us against 600 us through the op on the CI CPU (benchmarks/probe_host_train.py), which a
    small training step (GPT-2's 1k-token layers) pays per layer."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _kern.forward(*inputs[:-1])  # the last input, deterministic, only shapes the backward
        _setup_context(ctx, inputs, (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, _kern.backward)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, rng, dropout_p,
              softmax_scale, window_left, window_right, softcap, deterministic):
    """(out, lse) with autograd. Eager calls go through :class:`_Attention`; ``torch.compile`` traces the custom
    op (``hf_flash::attn_fwd`` with its registered backward), which it can put in a graph without looking inside.
    ``deterministic`` selects the backward without atomics (see ``kernels.attention.backward``)."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, rng, dropout_p,
            softmax_scale, window_left, window_right, softcap, bool(deterministic))
    if torch.compiler.is_compiling():
        return attn_fwd(*args)
    return _Attention.apply(*args)


def dropout_keep_mask(rng, dropout_p, batch, nheads, seqlen_q, seqlen_k):
    """The (batch, nheads, seqlen_q, seqlen_k) boolean keep-mask the kernels draw for ``rng`` (debug/tests)."""
    return _kern.dropout_keep_mask(rng, dropout_p, batch, nheads, seqlen_q, seqlen_k)
