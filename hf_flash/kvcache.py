"""Attention against a KV cache: ``flash_attn_with_kvcache`` (flash-attn 2.x semantics), the split-KV entry
that ``flash_attn_func`` dispatches decode-shaped calls to, and the paged varlen prefill behind
``flash_attn_varlen_func(..., block_table=...)``. All forward only; the kernels are in
``hf_flash.kernels.decode``.

Nothing here reads a device tensor on the host when the lengths are device tensors, so a decode step with
``cache_seqlens`` on the GPU can be captured in a CUDA graph. Checks that need the contents of a tensor (block
table entries inside the cache, lengths within the capacity) run on the host only when the lengths are host
ints; with device lengths the kernels guard instead: lengths are clamped to the capacity, page and cache-row
indices to the cache, and new tokens past the capacity are not written.

Under ``torch.compile`` the call goes through the ``hf_flash::with_kvcache`` custom op (it mutates the caches;
its fake gives the output shapes), so the compiled graph holds one opaque node.
"""

from __future__ import annotations

import collections

import torch

from hf_flash import _validate as V
from hf_flash.kernels import _launch
from hf_flash.kernels import decode as _dec

__all__ = [
    "flash_attn_with_kvcache",
    "decode_attention",
    "append_rotary_per_token",
    "split_kv_attention",
    "paged_varlen_prefill",
    "num_splits_heuristic",
    "UNIFIED_MAX_DEFAULT",
]

# FlashDecoding++'s unified maximum used by flash_attn_with_kvcache and split_kv_attention when the caller
# gives none: None = the exact online softmax. Set from the decode benchmark (it stays None unless the unified
# variant wins there).
UNIFIED_MAX_DEFAULT: float | None = None


def num_splits_heuristic(batch: int, nheads_k: int, seqlen_k_upper: int, num_sms: int, m_blocks: int = 1,
                         block_n: int = 64, **kwargs) -> int:
    """THE number of KV splits for ``num_splits=0`` (see ``hf_flash.kernels.decode.num_splits_heuristic``)."""
    return _dec.num_splits_heuristic(batch, nheads_k, seqlen_k_upper, num_sms, m_blocks, block_n, **kwargs)


# ------------------------------------------------------------------------------------------------ validation

def _check_int_vector(t, name: str, batch: int, q: torch.Tensor, allow_int64: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a (batch,) int32 tensor, got {type(t).__name__}")
    ok = (torch.int32, torch.int64) if allow_int64 else (torch.int32,)
    if t.dtype not in ok:
        raise TypeError(f"{name} must be int32{' or int64' if allow_int64 else ''}, got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one entry per sequence), got {tuple(t.shape)}")
    if t.device != q.device:
        raise RuntimeError(f"{name} is on {t.device} but q is on {q.device}")
    return t.to(torch.int32).contiguous()


def _check_block_table(block_table, batch: int, q: torch.Tensor) -> torch.Tensor:
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a (batch, max_blocks) int32 tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape ({batch}, max_blocks >= 1), got {tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise RuntimeError(f"block_table is on {block_table.device} but q is on {q.device}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table must be contiguous in its last dimension")
    return block_table


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_pages_used(block_table: torch.Tensor, num_pages: int, page_size: int, ends) -> None:
    """Host check that the pages covering slots [0, ends[b]) of each sequence lie in the cache (one sync; only
    called where the lengths are host ints anyway)."""
    if _capturing(block_table) or torch.compiler.is_compiling():
        return
    used = max(ends) if isinstance(ends, (list, tuple)) else int(ends)
    n = min(block_table.shape[1], -(-used // page_size)) if used > 0 else 0
    if n == 0:
        return
    pages = block_table[:, :n]
    lo, hi = int(pages.min()), int(pages.max())
    if lo < 0 or hi >= num_pages:
        raise ValueError(f"block_table points outside the cache: its entries for the used slots range over "
                         f"[{lo}, {hi}] but k_cache has {num_pages} blocks (accepted 0 to {num_pages - 1})")


def _check_cache(k_cache, v_cache, q, nheads, d, paged: bool):
    V.check_tensor(k_cache, "k_cache", 4, like=q)
    V.check_tensor(v_cache, "v_cache", 4, like=q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache's head dim ({k_cache.shape[3]}) must equal q's ({d})")
    V.check_heads(nheads, k_cache.shape[2], "k_cache")
    if paged and k_cache.shape[1] < 1:
        raise ValueError("k_cache (paged, with block_table) must have page_block_size >= 1")


def _check_rotary(rotary_cos, rotary_sin, q, d, capacity, k):
    if rotary_cos is None and rotary_sin is None:
        return None, None
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k is None:
        raise ValueError("rotary_cos/rotary_sin need the new tokens k and v (rotary is applied to q and the new "
                         "k as they are appended)")
    for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a (seqlen_ro, rotary_dim / 2) tensor")
        if t.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"{name} has dtype {t.dtype}; accepted: float32 or q's dtype ({q.dtype})")
        if t.device != q.device:
            raise RuntimeError(f"{name} is on {t.device} but q is on {q.device}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if rotary_cos.shape != rotary_sin.shape or rotary_cos.stride() != rotary_sin.stride():
        raise ValueError(f"rotary_cos and rotary_sin must have the same shape and strides, got "
                         f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
    rotary_dim = 2 * rotary_cos.shape[1]
    if rotary_dim < 2 or rotary_dim > d:
        raise ValueError(f"rotary_cos has {rotary_cos.shape[1]} columns: rotary_dim = {rotary_dim} must be in "
                         f"[2, headdim = {d}]")
    if rotary_cos.shape[0] < capacity:
        raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions; they must cover the "
                         f"cache's {capacity} slots")
    return rotary_cos, rotary_sin


# -------------------------------------------------------------------------------------------- implementation

def _kvcache_impl(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                  cache_leftpad, block_table, alibi_slopes, softmax_scale, window_left, window_right, softcap,
                  rotary_interleaved, num_splits, unified_max):
    if k is not None or rotary_cos is not None:
        q = _dec.append_kv(q, k, v, k_cache, v_cache, cache_seqlens, rotary_cos=rotary_cos,
                           rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                           q_pos_per_token=window_left >= 0 or window_right >= 0, batch_idx=cache_batch_idx,
                           block_table=block_table)
    seqlens_k = cache_seqlens
    if seqlens_k is not None and k is not None:
        seqlens_k = seqlens_k + k.shape[1]
    return _dec.split_kv_forward(q, k_cache, v_cache, softmax_scale=softmax_scale, window_left=window_left,
                                 window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
                                 seqlens_k=seqlens_k, leftpad=cache_leftpad, batch_idx=cache_batch_idx,
                                 block_table=block_table, num_splits=num_splits, unified_max=unified_max)


@torch.library.custom_op("hf_flash::with_kvcache", mutates_args=("k_cache", "v_cache"),
                         device_types=("cuda", "cpu"))
def _with_kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                     v: torch.Tensor | None, rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
                     cache_seqlens: torch.Tensor | None, cache_batch_idx: torch.Tensor | None,
                     cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None,
                     alibi_slopes: torch.Tensor | None, softmax_scale: float, window_left: int, window_right: int,
                     softcap: float, rotary_interleaved: bool, num_splits: int, unified_max: float | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kvcache_impl(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                             cache_leftpad, block_table, alibi_slopes, softmax_scale, window_left, window_right,
                             softcap, rotary_interleaved, num_splits, unified_max)
    return out, lse


@_with_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
      block_table, alibi_slopes, softmax_scale, window_left, window_right, softcap, rotary_interleaved, num_splits,
      unified_max):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32))


# ------------------------------------------------------------------------------------------------ public API

def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of a few query tokens against a KV cache, appending new tokens to the cache in place first.

    If ``k`` and ``v`` are given, they are written into ``k_cache``/``v_cache`` at slots
    ``cache_seqlens[b], cache_seqlens[b] + 1, ...`` (in place), rotated first when ``rotary_cos``/``rotary_sin``
    are given; then q (rotated too) attends to slots ``[cache_leftpad[b], cache_seqlens[b] + seqlen_new)``.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), seqlen_q small (decode, speculative tokens, chunked prefill).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with ``block_table`` a paged cache
            (num_blocks, page_block_size, nheads_k, headdim), any page size.
        k, v: (batch, seqlen_new, nheads_k, headdim) new tokens, or None.
        rotary_cos, rotary_sin: (seqlen_ro >= cache capacity, rotary_dim / 2), float32 or q's dtype. The new k is
            rotated at its slot's position; q at ``cache_seqlens + i`` when causal or windowed, else every
            query token at ``cache_seqlens`` (flash-attn's rule). Positions are cache slots, also with
            ``cache_leftpad``. Needs k and v.
        cache_seqlens: int or (batch,) int32 tensor: the cache's length before the new tokens (slot index, so
            it includes the left padding). None: the whole cache is valid (no new tokens allowed).
        cache_batch_idx: (batch,) int32: the cache rows to use (not with block_table).
        cache_leftpad: (batch,) int32: the first valid slot of each sequence (left-padded batches).
        block_table: (batch, max_blocks) int32 page indices into the paged cache.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as in flash_attn_func; causal and windows
            are aligned to the end of each sequence's keys: query i sits at key position
            ``L - seqlen_q + i`` with L = cache_seqlens + seqlen_new - cache_leftpad.
        rotary_interleaved: True rotates pairs (0, 1), (2, 3) ... (GPT-J); False the two halves (GPT-NeoX).
        num_splits: how many chunks the keys are cut into; 0 = ``num_splits_heuristic`` (no host sync).
        return_softmax_lse: also return the log-sum-exp (batch, nheads, seqlen_q), float32 (+inf for a row that
            sees no key).
    Returns:
        out (batch, seqlen_q, nheads, headdim), and softmax_lse if ``return_softmax_lse``.
    """
    V.check_tensor(q, "q", 4)
    batch, seqlen_q, nheads, d = q.shape
    V.check_headdim(d)
    paged = block_table is not None
    _check_cache(k_cache, v_cache, q, nheads, d, paged)
    nheads_k = k_cache.shape[2]
    if paged:
        block_table = _check_block_table(block_table, batch, q)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (a paged cache has no rows)")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            cache_batch_idx = _check_int_vector(cache_batch_idx, "cache_batch_idx", batch, q)
        elif k_cache.shape[0] != batch:
            raise ValueError(f"k_cache has {k_cache.shape[0]} rows but q has batch {batch}; pass cache_batch_idx "
                             "to pick rows of a larger cache")
    if (k is None) != (v is None):
        raise ValueError("k and v (new tokens) must be given together")
    seqlen_new = 0
    if k is not None:
        V.check_tensor(k, "k", 4, like=q)
        V.check_tensor(v, "v", 4, like=q)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != batch or k.shape[2] != nheads_k or k.shape[3] != d:
            raise ValueError(f"k must have shape (batch={batch}, seqlen_new, nheads_k={nheads_k}, headdim={d}), "
                             f"got {tuple(k.shape)}")
        seqlen_new = k.shape[1]
    scale = V.check_scale(softmax_scale, d)
    left, right = V.check_window(window_size)
    if causal:
        right = 0
    softcap = V.check_softcap(softcap)
    alibi_slopes = V.check_alibi(alibi_slopes, batch, nheads, q)
    rotary_cos, rotary_sin = _check_rotary(rotary_cos, rotary_sin, q, d, capacity, k)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    if cache_leftpad is not None:
        cache_leftpad = _check_int_vector(cache_leftpad, "cache_leftpad", batch, q)

    host_end = None
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending new tokens k, v (where to write them)")
        host_end = capacity
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        host_end = cache_seqlens + seqlen_new
        if cache_seqlens < 0 or host_end > capacity:
            where = "block_table's capacity" if paged else "the cache's seqlen"
            raise ValueError(f"cache_seqlens ({cache_seqlens}) + seqlen_new ({seqlen_new}) = {host_end} must be in "
                             f"[0, {capacity}] ({where}); accepted cache_seqlens 0 to {capacity - seqlen_new}"
                             + ("; the block_table is too short for these lengths" if paged else ""))
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        cache_seqlens = _check_int_vector(cache_seqlens, "cache_seqlens", batch, q, allow_int64=True)
    if paged and host_end is not None:
        _check_pages_used(block_table, k_cache.shape[0], k_cache.shape[1], host_end)

    args = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, alibi_slopes, scale, left, right, softcap, bool(rotary_interleaved), num_splits,
            UNIFIED_MAX_DEFAULT)
    if torch.compiler.is_compiling():
        out, lse = _with_kvcache_op(*args)
    else:
        out, lse = _kvcache_impl(*args)
    return (out, lse) if return_softmax_lse else out


# Decode plans (kernels.decode.DecodePlan) by call signature; a decode step uses one or two (layer types).
_PLANS: collections.OrderedDict = collections.OrderedDict()
_PLAN_SLOTS = 4


def _env_key() -> tuple:
    get = _launch.env_get
    return (get("HF_FLASH_DECODE_PLAN"), get("HF_FLASH_DECODE_CONFIG"), get("HF_FLASH_DECODE_FUSED"),
            get("HF_FLASH_DIRECT_LAUNCH"), get("HF_FLASH_DECODE_PDL"))


def _opt_key(t):
    return None if t is None else (t.dtype, t.data_ptr() % 16, t.device)


def decode_attention(q, k_cache, v_cache, cache_seqlens, cache_leftpad, softmax_scale, causal: bool,
                     window_size: tuple[int, int], softcap: float, heads_first: bool = False, out=None):
    """``flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=..., cache_leftpad=..., ...)`` without the
    public API's argument checks, for callers whose tensors are consistent by construction (the "flashtri"
    attention function in a decode step: q, k, v of one dtype and device from the model, ``cache_seqlens`` /
    ``cache_leftpad`` int32 made on the device from the mask). The checks cost as much host time as the launch
    (measured ~40 us of a ~85 us call on the CPU); a 32-layer model pays them at every token.

    The first call of a signature (shapes, strides, dtypes, 16-byte alignment, options, stream) records a
    :class:`~hf_flash.kernels.decode.DecodePlan`; the other layers of the step replay it (one output allocation
    and two direct launches). ``HF_FLASH_DECODE_PLAN=0`` turns plans off. While a CUDA graph is captured the
    general launcher runs (a plan's buffers must not be baked into a graph that may outlive it); under
    ``torch.compile`` this goes through the checked custom-op path.

    ``heads_first``: q, k_cache and v_cache come as (batch, heads, seqlen, headdim), as transformers' attention
    functions get them; the output is (batch, seqlen, heads, headdim) all the same. A plan replays them as they
    are (the kernels take strides), so only a call that records one makes the flash-layout views.

    ``out``: a contiguous (batch, seqlen, heads, headdim) tensor the result is written into (and returned); a
    replayed plan writes it directly, the other paths copy."""
    compiling = torch.compiler.is_compiling()
    env = None if compiling else _env_key()
    general = compiling or env[0] == "0" or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    if heads_first and general:
        q, k_cache, v_cache = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        heads_first = False
    if compiling:
        return _into(out, flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                  cache_leftpad=cache_leftpad, softmax_scale=softmax_scale,
                                                  causal=causal, window_size=window_size, softcap=softcap))
    left, right = window_size
    if causal:
        right = 0
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if general:
        return _into(out, _dec.split_kv_forward(q, k_cache, v_cache, softmax_scale=scale, window_left=left,
                                                window_right=right, softcap=softcap, seqlens_k=cache_seqlens,
                                                leftpad=cache_leftpad, unified_max=UNIFIED_MAX_DEFAULT)[0])
    stream = torch._C._cuda_getCurrentRawStream(q.device.index) if q.is_cuda else 0
    key = (q.shape, q.stride(), k_cache.shape, k_cache.stride(), v_cache.shape, v_cache.stride(), q.dtype,
           k_cache.dtype, q.device, stream, q.data_ptr() % 16, k_cache.data_ptr() % 16, v_cache.data_ptr() % 16,
           _opt_key(cache_seqlens), _opt_key(cache_leftpad), scale, left, right, softcap, UNIFIED_MAX_DEFAULT, env,
           torch.get_float32_matmul_precision() if q.dtype == torch.float32 else None, heads_first)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan(q, k_cache, v_cache, cache_seqlens, cache_leftpad, out=out)
    if heads_first:
        q, k_cache, v_cache = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    result, plan = _dec.plan_decode(q, k_cache, v_cache, softmax_scale=scale, window_left=left,
                                    window_right=right, softcap=softcap, seqlens_k=cache_seqlens,
                                    leftpad=cache_leftpad, unified_max=UNIFIED_MAX_DEFAULT)
    if plan is not None:
        _PLANS[key] = plan
        if len(_PLANS) > _PLAN_SLOTS:
            _PLANS.popitem(last=False)
    return _into(out, result)


def _into(out, result):
    if out is None:
        return result
    out.copy_(result)
    return out


# Append plans (kernels.decode.AppendPlan) by call layout: a model's fused decode step makes one or two.
_APPEND_PLANS: dict = {}
_APPEND_PLAN_SLOTS = 8


def append_rotary_per_token(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin) -> None:
    """``append_kv(q, k_new, v_new, k_cache, v_cache, cache_seqlens, rotary_cos=cos, rotary_sin=sin,
    rotary_interleaved=False, rope_per_token=True, q_out=q)``: q rotated in place, the new k rotated and k / v
    written at ``cache_seqlens``, with transformers' per-token (batch, seqlen, headdim) cos / sin. For callers whose
    tensors are consistent by construction (the Llama-family fused decode step, patches/llama.py), as
    :func:`decode_attention`: the first call of a layout records a :class:`~hf_flash.kernels.decode.AppendPlan`,
    the others replay it (one direct launch). ``HF_FLASH_DECODE_PLAN=0``, or a CUDA graph being captured: the
    general launcher."""
    env = _env_key()
    if env[0] == "0" or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        _dec.append_kv(q, k_new, v_new, k_cache, v_cache, cache_seqlens, rotary_cos=cos, rotary_sin=sin,
                       rotary_interleaved=False, rope_per_token=True, q_out=q)
        return
    stream = torch._C._cuda_getCurrentRawStream(q.device.index) if q.is_cuda else 0
    key = (q.shape, q.stride(), k_new.shape, k_new.stride(), v_new.stride(), k_cache.shape, k_cache.stride(),
           v_cache.shape, v_cache.stride(), cos.shape, cos.stride(), sin.stride(), q.dtype, cos.dtype, q.device,
           stream, q.data_ptr() % 16, k_new.data_ptr() % 16, v_new.data_ptr() % 16, k_cache.data_ptr() % 16,
           v_cache.data_ptr() % 16, cos.data_ptr() % 16, sin.data_ptr() % 16, _opt_key(cache_seqlens), env)
    plan = _APPEND_PLANS.get(key)
    if plan is not None:
        plan(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin)
        return
    plan = _dec.plan_append(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin)
    if plan is not None:
        if len(_APPEND_PLANS) >= _APPEND_PLAN_SLOTS:
            _APPEND_PLANS.clear()
        _APPEND_PLANS[key] = plan


def split_kv_attention(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                       cache_seqlens=None, num_splits=0, unified_max="default"):
    """Split-KV (Flash-Decoding) attention of dense q (batch, seqlen_q <= 16, nheads, d) against k/v
    (batch, seqlen_k, nheads_k, d); forward only, no grad. ``window_left/right`` -1 = unbounded; ``causal``
    sets window_right = 0; both aligned to the bottom-right. ``cache_seqlens`` (batch,) int32 on the device:
    the valid key length of each sequence (None: seqlen_k), never read on the host. ``unified_max``: phi for
    FlashDecoding++'s unified-max softmax, None for the exact one, "default" for ``UNIFIED_MAX_DEFAULT``
    (float16 inputs always take the exact path). Returns (out, lse (batch,
    nheads, seqlen_q) float32)."""
    V.check_tensor(q, "q", 4)
    V.check_tensor(k, "k", 4, like=q)
    V.check_tensor(v, "v", 4, like=q)
    batch, seqlen_q, nheads, d = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != d:
        raise ValueError(f"k and v must both have shape (batch={batch}, seqlen_k, nheads_k, headdim={d}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    V.check_heads(nheads, k.shape[2])
    V.check_headdim(d)
    if seqlen_q > 16:
        raise ValueError(f"split_kv_attention takes seqlen_q <= 16 (decode-shaped calls), got {seqlen_q}")
    right = 0 if causal else int(window_right)
    if cache_seqlens is not None:
        cache_seqlens = _check_int_vector(cache_seqlens, "cache_seqlens", batch, q, allow_int64=True)
    if isinstance(unified_max, str):
        unified_max = UNIFIED_MAX_DEFAULT
    with torch.no_grad():
        return _dec.split_kv_forward(q, k, v, softmax_scale=float(softmax_scale), window_left=int(window_left),
                                     window_right=right, softcap=float(softcap), alibi_slopes=alibi_slopes,
                                     seqlens_k=cache_seqlens, num_splits=int(num_splits), unified_max=unified_max)


def paged_varlen_prefill(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                         softmax_scale, window_left, window_right, softcap, alibi_slopes, return_attn_probs):
    """``flash_attn_varlen_func(..., block_table=...)``: packed queries (total_q, nheads, d) of each sequence
    attend to the first ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` slots of its pages in the paged cache
    (num_blocks, page_block_size, nheads_k, d); forward only. The other arguments arrive validated by
    flash_attn_varlen_func. Returns out, or (out, lse (nheads, total_q), None)."""
    total_q, nheads, d = q.shape
    batch = cu_seqlens_q.numel() - 1
    _check_cache(k_cache, v_cache, q, nheads, d, paged=True)
    block_table = _check_block_table(block_table, batch, q)
    capacity = block_table.shape[1] * k_cache.shape[1]
    if max_seqlen_k > capacity:
        raise ValueError(f"max_seqlen_k ({max_seqlen_k}) exceeds block_table's capacity ({block_table.shape[1]} "
                         f"blocks x {k_cache.shape[1]} slots = {capacity})")
    seqlens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    with torch.no_grad():
        out, lse = _dec.split_kv_forward(q, k_cache, v_cache, softmax_scale=float(softmax_scale),
                                         window_left=int(window_left), window_right=int(window_right),
                                         softcap=float(softcap), alibi_slopes=alibi_slopes, seqlens_k=seqlens_k,
                                         block_table=block_table, cu_seqlens_q=cu_seqlens_q,
                                         max_seqlen_q=max_seqlen_q, seqlen_k_upper=max(max_seqlen_k, 1))
    return (out, lse, None) if return_attn_probs else out
