"""The one reference implementation of attention, in plain PyTorch, that every test and benchmark uses.

It materialises the full score matrix, so it is only for small shapes. It computes in float32 (or float64
with ``upcast_dtype=torch.float64``) whatever the input dtype, and follows flash-attn's conventions:

* layout (batch, seqlen, nheads, headdim); K/V may have fewer heads (GQA/MQA), query head ``h`` reads KV
  head ``h // (nheads // nheads_k)``;
* ``causal`` and ``window_size=(left, right)`` are aligned to the bottom-right corner of the score matrix
  when seqlen_q != seqlen_k (query row ``i`` sits at key position ``i + seqlen_k - seqlen_q``); with padding
  masks the alignment uses each sequence's own lengths;
* a query row that sees no key gets output 0 and log-sum-exp +inf (flash-attn's value);
* ``softcap`` applies ``softcap * tanh(s / softcap)`` to the scaled scores, then ALiBi and ``attn_bias`` are
  added, then masks;
* ``dropout_mask`` (True = keep) with ``dropout_p`` scales kept probabilities by ``1 / (1 - dropout_p)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_ref", "window_mask", "alibi_bias", "rotary_per_token_ref"]


def window_mask(seqlen_q, seqlen_k, window_size=(-1, -1), causal=False, query_lens=None, key_lens=None,
                device=None):
    """Boolean (…, seqlen_q, seqlen_k) mask, True where query ``i`` may attend key ``j``.

    ``query_lens``/``key_lens`` (batch,) give per-sequence lengths for the bottom-right alignment; the
    result then has shape (batch, 1, seqlen_q, seqlen_k).
    """
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device).view(-1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    if query_lens is not None or key_lens is not None:
        ql = (query_lens if query_lens is not None else torch.full_like(key_lens, seqlen_q)).to(device)
        kl = (key_lens if key_lens is not None else torch.full_like(query_lens, seqlen_q)).to(device)
        shift = (kl - ql).view(-1, 1, 1, 1)
        i = i.view(1, 1, seqlen_q, 1)
        j = j.view(1, 1, 1, seqlen_k)
    else:
        shift = seqlen_k - seqlen_q
    diag = i + shift  # key position aligned with query row i
    ok = torch.ones(torch.broadcast_shapes(diag.shape, j.shape), dtype=torch.bool, device=device)
    if right >= 0:
        ok = ok & (j <= diag + right)
    if left >= 0:
        ok = ok & (j >= diag - left)
    return ok


def alibi_bias(alibi_slopes, seqlen_q, seqlen_k, query_lens=None, key_lens=None, device=None):
    """ALiBi bias ``-slope * |i + seqlen_k - seqlen_q - j|`` of shape (batch or 1, nheads, seqlen_q, seqlen_k)."""
    slopes = alibi_slopes.float()
    if slopes.dim() == 1:
        slopes = slopes.view(1, -1, 1, 1)
    else:
        slopes = slopes.view(slopes.shape[0], slopes.shape[1], 1, 1)
    i = torch.arange(seqlen_q, device=device).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, 1, -1)
    if query_lens is not None or key_lens is not None:
        ql = (query_lens if query_lens is not None else torch.full_like(key_lens, seqlen_q)).to(device)
        kl = (key_lens if key_lens is not None else torch.full_like(query_lens, seqlen_q)).to(device)
        shift = (kl - ql).view(-1, 1, 1, 1)
    else:
        shift = seqlen_k - seqlen_q
    return -slopes * (i + shift - j).abs().float()


def attention_ref(q, k, v, query_padding_mask=None, key_padding_mask=None, attn_bias=None, dropout_p=0.0,
                  dropout_mask=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                  softmax_scale=None, upcast_dtype=torch.float32, return_lse=False):
    """Attention the slow, obvious way.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
        query_padding_mask: (batch, seqlen_q) bool, True for real tokens; padded query rows output 0.
        key_padding_mask: (batch, seqlen_k) bool, True for real tokens.
        attn_bias: float tensor broadcastable to (batch, nheads, seqlen_q, seqlen_k) added to the scores, or a
            bool tensor (True = attend).
        dropout_mask: bool (batch, nheads, seqlen_q, seqlen_k), True = keep.
        upcast_dtype: the compute dtype (float32 or float64); ``None`` computes in the input dtype, which is
            what the tolerance of a low-precision kernel is measured against.
    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype, the attention probabilities
        (batch, nheads, seqlen_q, seqlen_k) before dropout, and with ``return_lse`` the log-sum-exp
        (batch, nheads, seqlen_q) in float32 (+inf where a row sees no key).
    """
    dtype_og = q.dtype
    if upcast_dtype is not None:
        q, k, v = q.to(upcast_dtype), k.to(upcast_dtype), v.to(upcast_dtype)
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if nheads % nheads_k:
        raise ValueError(f"nheads ({nheads}) must be divisible by nheads_k ({nheads_k})")
    group = nheads // nheads_k
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    query_lens = query_padding_mask.sum(-1) if query_padding_mask is not None else None
    key_lens = key_padding_mask.sum(-1) if key_padding_mask is not None else None
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k, query_lens, key_lens,
                                     device=q.device).to(scores.dtype)
    keep = torch.ones(batch, 1, seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            keep = keep & attn_bias
        else:
            scores = scores + attn_bias.to(scores.dtype)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.view(batch, 1, 1, seqlen_k)
    if causal or window_size[0] >= 0 or window_size[1] >= 0:
        keep = keep & window_mask(seqlen_q, seqlen_k, window_size, causal, query_lens, key_lens, device=q.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
    expd = torch.exp(scores - row_max)
    denom = expd.sum(dim=-1, keepdim=True)
    attn = torch.where(empty, torch.zeros_like(expd), expd / torch.where(empty, torch.ones_like(denom), denom))
    lse = torch.where(empty, torch.full_like(row_max, float("inf")), row_max + torch.log(denom)).squeeze(-1)
    if query_padding_mask is not None:
        attn = attn.masked_fill(~query_padding_mask.view(batch, 1, seqlen_q, 1), 0.0)
    attn_drop = attn
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("attention_ref needs dropout_mask when dropout_p > 0")
        attn_drop = attn.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhts,bshd->bthd", attn_drop, v)
    if query_padding_mask is not None:
        out = out.masked_fill(~query_padding_mask.view(batch, seqlen_q, 1, 1), 0.0)
    out = out.to(dtype_og)
    if return_lse:
        return out, attn, lse.float()
    return out, attn


def rotary_per_token_ref(x, cos, sin):
    """transformers' ``apply_rotary_pos_emb`` (``x * cos + rotate_half(x) * sin``) on x (batch, seqlen, heads, dim)
    with its per-token (batch or 1, seqlen, dim) cos / sin tables, in the dtype of the arguments."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]

