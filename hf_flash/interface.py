"""flash_attn-compatible public functions.

Same names, arguments, shapes and return values as flash-attn 2.x, plus a keyword ``attn_bias`` that
flash-attn does not have. Every function is a thin layer: validate once in Python, then call the
``torch.library`` custom op (``hf_flash.ops``) whose autograd recomputes attention from q, k, v, out and the
log-sum-exp.

Heads: q has ``nheads`` heads, k/v have ``nheads_k`` that divide it; query head ``h`` uses KV head
``h // (nheads // nheads_k)`` (GQA/MQA), with no copy of K/V.

Causal alignment when seqlen_q != seqlen_k is to the bottom-right corner of the score matrix, as in
flash-attn >= 2.1. For seqlen_q = 2, seqlen_k = 5 the mask is::

    1 1 1 1 0
    1 1 1 1 1

and for seqlen_q = 5, seqlen_k = 2::

    0 0
    0 0
    0 0
    1 0
    1 1

A row with no 1 (it sees no key) outputs zeros, has log-sum-exp +inf and receives zero gradients.

``window_size=(left, right)``: query ``i`` attends keys ``j`` with
``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``; -1 means unbounded on that side;
``causal=True`` sets ``right = 0``.

``softcap > 0`` maps scaled scores ``s`` to ``softcap * tanh(s / softcap)``; ``alibi_slopes`` (nheads,) or
(batch, nheads) float32 adds ``-slope * |i + seqlen_k - seqlen_q - j|``; ``attn_bias`` (float, added after
softcap, -inf masks; or bool, True = attend) broadcastable to (batch, nheads, seqlen_q, seqlen_k).

Precision: float16 / bfloat16 inputs multiply on the tensor cores with float32 accumulation; the softmax
statistics, the log-sum-exp and all accumulators are float32. float32 inputs follow
``torch.get_float32_matmul_precision()``: "highest" (PyTorch's default) multiplies in full float32,
"high"/"medium" use TF32 tensor cores (about 1e-3 relative error, much faster).
"""

from __future__ import annotations

import torch

from hf_flash import _validate as V
from hf_flash import ops

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]


def _window(causal: bool, window_size) -> tuple[int, int]:
    left, right = V.check_window(window_size)
    if causal:
        right = 0
    return left, right


# Longest query that the split-KV (Flash-Decoding) kernel takes, and the shortest key length worth splitting.
SPLIT_KV_MAX_SEQLEN_Q = 16
SPLIT_KV_MIN_SEQLEN_K = 256


def use_split_kv(q, k, v, dropout_p, attn_bias, return_attn_probs) -> bool:
    """The prefill-vs-decode rule, in one place: a few query tokens against a long K/V, with no gradient to
    record, no dropout and no bias, go to the split-KV kernel; everything else to the FA2 kernel."""
    if q.shape[1] > SPLIT_KV_MAX_SEQLEN_Q or k.shape[1] < SPLIT_KV_MIN_SEQLEN_K:
        return False
    if dropout_p > 0.0 or attn_bias is not None or return_attn_probs:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return not torch.compiler.is_compiling()


def _dropout_rng(dropout_p: float, device: torch.device):
    """Seed and offset for the in-kernel Philox RNG, drawn from PyTorch's generator on the device.

    Drawn as a device tensor: no host-device synchronisation, capturable in a CUDA graph, repeatable under
    ``torch.manual_seed`` and replayed by ``torch.utils.checkpoint`` (which restores the RNG state).
    """
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64)


def _debug_probs(q, k, v, out_args, rng, dropout_p, query_padding_mask=None, key_padding_mask=None):
    """The probabilities flash-attn returns with ``return_attn_probs``: dropped entries negated (debug only)."""
    from hf_flash.reference import attention_ref

    scale, causal, window, softcap, alibi, bias = out_args
    _, attn = attention_ref(q, k, v, query_padding_mask, key_padding_mask, attn_bias=bias, causal=causal,
                            window_size=window, softcap=softcap, alibi_slopes=alibi, softmax_scale=scale)
    if dropout_p > 0.0:
        keep = ops.dropout_keep_mask(rng, dropout_p, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        attn = torch.where(keep, attn, -attn)
    return attn.to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, attn_bias=None):
    """Attention over (batch, seqlen, nheads, headdim) tensors.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim). float16, bfloat16
            or float32, any strides with the last dimension contiguous (slices of a fused QKV are not copied).
        dropout_p: dropout probability on the attention weights, in [0, 1); pass 0.0 in evaluation.
        softmax_scale: scaling of QK^T before the softmax, default 1 / sqrt(headdim).
        causal: bottom-right aligned causal mask.
        window_size: (left, right) sliding window, -1 = unbounded.
        softcap: 0.0 disables; > 0 applies softcap * tanh(scores / softcap).
        alibi_slopes: (nheads,) or (batch, nheads) float32.
        deterministic: a bitwise-repeatable backward (dQ from its own kernel, no atomics; also taken under
            ``torch.use_deterministic_algorithms(True)``). By default dQ is added with atomics from the dK/dV
            kernel, as in flash-attn: faster, with float32 rounding that can differ between runs on a GPU.
        return_attn_probs: also return the log-sum-exp and the attention probabilities (debug path).
        attn_bias: (hf_flash only) float or bool tensor broadcastable to (batch, nheads, seqlen_q, seqlen_k);
            dimensions of size 1 are read with stride 0. A float bias that requires grad gets a gradient.
    Returns:
        out (batch, seqlen_q, nheads, headdim); with ``return_attn_probs``: (out, softmax_lse of shape
        (batch, nheads, seqlen_q) float32, S_dmask (batch, nheads, seqlen_q, seqlen_k)).
    """
    batch, seqlen_q, nheads, d, seqlen_k, nheads_k = V.check_qkv(q, k, v)
    dropout_p = V.check_dropout(dropout_p)
    softcap = V.check_softcap(softcap)
    scale = V.check_scale(softmax_scale, d)
    left, right = _window(causal, window_size)
    alibi_slopes = V.check_alibi(alibi_slopes, batch, nheads, q)
    bias = V.check_attn_bias(attn_bias, batch, nheads, seqlen_q, seqlen_k, q)
    if use_split_kv(q, k, v, dropout_p, bias, return_attn_probs):
        from hf_flash import kvcache

        return kvcache.split_kv_attention(q, k, v, scale, False, left, right, softcap, alibi_slopes)[0]
    rng = _dropout_rng(dropout_p, q.device)
    out, lse = ops.attention(q, k, v, None, None, seqlen_q, seqlen_k, bias, alibi_slopes, rng, dropout_p, scale,
                             left, right, softcap, bool(deterministic))
    if not return_attn_probs:
        return out
    probs = _debug_probs(q, k, v, (scale, causal, (left, right), softcap, alibi_slopes, attn_bias), rng,
                         dropout_p)
    return out, lse, probs


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              attn_bias=None):
    """``qkv``: (batch, seqlen, 3, nheads, headdim). Unpacked as views, no copy."""
    V.check_tensor(qkv, "qkv", 5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, attn_bias=attn_bias)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             attn_bias=None):
    """``kv``: (batch, seqlen_k, 2, nheads_k, headdim). Unpacked as views, no copy."""
    V.check_tensor(kv, "kv", 5)
    if kv.shape[2] != 2:
        raise ValueError(f"kv must have shape (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, attn_bias=attn_bias)


def _check_cu_seqlens(cu, name, q):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 cumulative lengths")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.device != q.device:
        raise RuntimeError(f"{name} is on {cu.device} but q is on {q.device}")
    if not cu.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, attn_bias=None):
    """Attention over a batch of sequences of different lengths packed along the first axis.

    Arguments:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), or with ``block_table`` the paged
            caches (num_blocks, page_block_size, nheads_k, headdim).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 cumulative sequence lengths, starting at 0.
        max_seqlen_q, max_seqlen_k: the largest lengths, host ints (they size the grid).
        block_table: (batch, max_blocks_per_seq) int32, a paged KV cache (forward only).
        attn_bias: (batch or 1, nheads or 1, max_seqlen_q, max_seqlen_k); sequence b uses
            ``[:seqlen_q_b, :seqlen_k_b]``.
        The other arguments are as in :func:`flash_attn_func`; causal alignment is per sequence.
    Returns:
        out (total_q, nheads, headdim); with ``return_attn_probs`` (out, softmax_lse (nheads, total_q), None).
    """
    V.check_tensor(q, "q", 3)
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q)
    batch = cu_seqlens_q.numel() - 1
    if cu_seqlens_k.numel() != batch + 1:
        raise ValueError(f"cu_seqlens_q has {batch + 1} entries but cu_seqlens_k has {cu_seqlens_k.numel()}")
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    total_q, nheads, d = q.shape
    V.check_headdim(d)
    dropout_p = V.check_dropout(dropout_p)
    softcap = V.check_softcap(softcap)
    scale = V.check_scale(softmax_scale, d)
    left, right = _window(causal, window_size)
    alibi_slopes = V.check_alibi(alibi_slopes, batch, nheads, q)
    if block_table is not None:
        from hf_flash import kvcache

        if dropout_p > 0.0 or attn_bias is not None:
            raise ValueError("flash_attn_varlen_func with block_table is a forward-only prefill path: dropout_p "
                             "must be 0 and attn_bias None")
        return kvcache.paged_varlen_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            block_table, scale, left, right, softcap, alibi_slopes,
                                            return_attn_probs)
    V.check_tensor(k, "k", 3, like=q)
    V.check_tensor(v, "v", 3, like=q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != d:
        raise ValueError(f"k's head dim ({k.shape[2]}) must equal q's ({d})")
    V.check_heads(nheads, k.shape[1])
    bias = V.check_attn_bias(attn_bias, batch, nheads, max_seqlen_q, max_seqlen_k, q)
    rng = _dropout_rng(dropout_p, q.device)
    out, lse = ops.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes,
                             rng, dropout_p, scale, left, right, softcap, bool(deterministic))
    if not return_attn_probs:
        return out
    return out, lse, None


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, attn_bias=None):
    """``qkv``: (total, 3, nheads, headdim)."""
    V.check_tensor(qkv, "qkv", 4)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, attn_bias=attn_bias)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    attn_bias=None):
    """``kv``: (total_k, 2, nheads_k, headdim)."""
    V.check_tensor(kv, "kv", 4)
    if kv.shape[1] != 2:
        raise ValueError(f"kv must have shape (total_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, attn_bias=attn_bias)
