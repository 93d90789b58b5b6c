"""Rotary position embedding of (batch, seqlen, heads, dim) tensors in one pass, and its inverse for the backward.

transformers' Llama family computes ``x * cos + rotate_half(x) * sin`` with five tensor operations (a product, a
negation, a concatenation, a product, a sum: about ten reads and writes of q's size), and autograd records as many
for the backward. This kernel reads x once and writes the result once, in float32 arithmetic:

    y[..., :h] = x[..., :h] * cos[..., :h] - x[..., h:] * sin[..., :h]
    y[..., h:] = x[..., h:] * cos[..., h:] + x[..., :h] * sin[..., h:]        (h = dim / 2)

``INVERSE`` applies the transpose of that map (the gradient with respect to x of ``<dy, y>``):

    dx[..., :h] = dy[..., :h] * cos[..., :h] + dy[..., h:] * sin[..., h:]
    dx[..., h:] = dy[..., h:] * cos[..., h:] - dy[..., :h] * sin[..., :h]

cos / sin are transformers' per-token (batch or 1, seqlen, dim) tables; nothing assumes their two halves equal.
Grid: one program per (batch, position) and block of heads; the arithmetic is the decode kernels' rotation
(``_common.rotate_row``), also used to rotate q and the new k in a decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_flash.kernels._common import rotate_row
from hf_flash.kernels.configs import cdiv, next_pow2

launches = {"rotary": 0, "rotary_inverse": 0}


@triton.jit
def _rotary_kernel(X, COS, SIN, Y, seqlen, nheads, stride_xb, stride_xs, stride_xh, stride_cb, stride_cs,
                   stride_yb, stride_ys, stride_yh, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_H: tl.constexpr, INVERSE: tl.constexpr):
    row = tl.program_id(0)
    b = row // seqlen
    s = row % seqlen
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < nheads)[:, None] & (offs_d < DIM)
    cs_row = b.to(tl.int64) * stride_cb + s.to(tl.int64) * stride_cs
    x_ptr = X + b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs + offs_h[:, None] * stride_xh
    # the decode kernels' rotation (transformers' full-width tables, halves not interleaved), on a heads x dims tile
    y = rotate_row(x_ptr, offs_d, mask, COS, SIN, cs_row, DIM, False, True, INVERSE)
    y_ptr = Y + b.to(tl.int64) * stride_yb + s.to(tl.int64) * stride_ys + offs_h[:, None] * stride_yh
    tl.store(y_ptr + offs_d, y.to(Y.dtype.element_ty), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The rotation of x (batch, seqlen, heads, dim) by cos / sin (batch or 1, seqlen, dim), into a new tensor of
    x's shape and dtype, (batch, seqlen, heads, dim)-contiguous. ``inverse``: the transposed map (see above)."""
    batch, seqlen, nheads, dim = x.shape
    if (dim % 2 or cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (seqlen, dim)
            or cos.shape[0] not in (1, batch) or x.stride(-1) != 1 or cos.stride(-1) != 1
            or sin.stride() != cos.stride()):
        raise ValueError(f"rotate: x {tuple(x.shape)} (even head dim, unit last stride) and cos / sin of shape "
                         f"(batch or 1, seqlen, dim) with equal strides are accepted; got cos {tuple(cos.shape)} "
                         f"{cos.stride()}, sin {tuple(sin.shape)} {sin.stride()}")
    y = torch.empty((batch, seqlen, nheads, dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_h = min(next_pow2(nheads), 16)
    grid = (batch * seqlen, cdiv(nheads, block_h))
    _rotary_kernel[grid](x, cos, sin, y, seqlen, nheads, *x.stride()[:3],
                         cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), *y.stride()[:3],
                         DIM=dim, BLOCK_D=next_pow2(dim), BLOCK_H=block_h, INVERSE=inverse,
                         num_warps=4 if nheads * dim >= 2048 else 2)
    launches["rotary_inverse" if inverse else "rotary"] += 1
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotate(dy if dy.stride(-1) == 1 else dy.contiguous(), cos, sin, inverse=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` with autograd (the gradient flows to x; cos / sin are tables, not learned)."""
    return _Rotary.apply(x, cos, sin)
