"""Flash-Decoding: split-KV attention for a few query tokens against a long KV cache, in Triton.

What it supports
  * dense caches (batch_cache, capacity, nheads_k, headdim) with optional ``batch_idx`` (rows of the cache)
    and ``leftpad`` (first valid cache slot per sequence), and paged caches (num_blocks, page_size, nheads_k,
    headdim) read through a ``block_table`` (batch, max_blocks) of int32 page indices, any page size;
  * per-sequence key lengths on the device (``seqlens_k`` = one past the last valid cache slot), never read on
    the host: the grid is sized from the cache's capacity and programs whose chunk lies past the real length
    exit after writing an empty partial (log-sum-exp -inf);
  * dense queries (batch, seqlen_q, nheads, headdim) or packed varlen queries (total_q, nheads, headdim) with
    ``cu_seqlens_q`` (the chunked prefill of ``flash_attn_varlen_func(..., block_table=...)``);
  * causal / sliding window aligned to the bottom-right corner (query row i sits at key position
    i + L - seqlen_q, L the sequence's key length after left padding), softcap, ALiBi, GQA/MQA;
  * FlashDecoding++'s unified maximum (``unified_max=phi``): partial softmaxes use the fixed maximum phi and
    keep no running max; a row whose partial sum leaves [2^-64, 2^64] (a score far above phi, or every score far
    below it) is recomputed by the same program with the exact online softmax, so results stay exact;
  * an append kernel that writes new K/V tokens into the cache in place, with optional rotary embedding
    (interleaved GPT-J pairs or GPT-NeoX halves) applied to them and to the query.

What it does not: gradients (forward only), attention bias tensors, dropout.

Layout of the work: grid (batch * nheads_k, num_splits, m_blocks). Each program owns one KV head of one
sequence, one chunk of its keys, and a tile of BLOCK_M query rows. The rows are the GQA group's query heads
times the query tokens (row r = token r // group, head r % group), so each K/V byte is read once per group and
a decode step's tile is padded only to 16 rows, the tensor-core minimum (FlashDecoding++'s flat GEMM), not to
the 64/128 of a prefill tile. Softmax in the exp2 domain with float32 partial outputs and log-sum-exps; a second
kernel combines the partials with log-sum-exp weights. One split writes the final output directly.
``fused_combine=True`` (or ``HF_FLASH_DECODE_FUSED=1``) instead lets the last program of each tile to finish (an
atomic ticket per tile) combine the partials inside the split kernel, one launch per step; measured on the H100
it was slower (4k tokens, 32/8 heads: 0.79 vs 0.86 TB/s; the winner's serial tail outweighs the saved launch),
so it is not the default.

On Hopper (capability 9.0) the split kernel of the calls kernels/gluon_decode.py supports (float16 / bfloat16, head
dim 128, dense caches, at most 64 query rows per KV head, causal or no window) is that module's TMA kernel in Gluon,
with the same partials and combine, except for decode plans (below), which keep the Triton kernels for their cheaper
host launches. ``HF_FLASH_GLUON_DECODE=0`` turns it off; where it does not compile it warns once and this module's
kernel runs.

Host time: a model calls this once per layer per generated token. ``plan_decode`` records a call's launches as a
``DecodePlan`` that later calls of the same signature replay (the compiled kernels launched directly with the new
tensors swapped in, the partials' buffers kept in the plan); ``hf_flash.kvcache.decode_attention`` keeps them.
``HF_FLASH_DECODE_PDL=1`` launches the combine kernel as a programmatic dependent launch on Hopper.

Tested: Triton interpreter on CPU (tests/test_decode.py); on CUDA the same tests run bigger (cache 128k,
CUDA-graph replay). Configs (``decode_config``) are fixed, not autotuned, so a decode step can be captured
in a CUDA graph and nothing retunes as the cache grows.
"""

from __future__ import annotations

import collections
import functools
import math
import os

import torch
import triton
import triton.language as tl

from hf_flash.kernels.configs import cdiv, dot_precision, next_pow2, num_sms

from hf_flash.kernels import _launch
from hf_flash.kernels import attention as _attention  # the Gluon version gate and compile-error types
from hf_flash.kernels._common import mma, rotate_row, tanh_f32

try:  # grid dependency control for programmatic dependent launch (triton >= 3.3; Hopper and later)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - older triton: the PDL path is never enabled
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

__all__ = [
    "LAUNCHES",
    "DecodePlan",
    "plan_decode",
    "split_kv_forward",
    "append_kv",
    "num_splits_heuristic",
    "decode_config",
    "num_sms",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The unified-max partial sum of a row must stay in [2^-UNIFIED_RANGE, 2^UNIFIED_RANGE]; outside, the row is
# recomputed exactly. 2^64 keeps acc = sum p * v far from float32 overflow for any |v| < 2^60 and, with at most
# 2^20 keys per chunk, keeps the largest p >= 2^-84, where bfloat16/float32 still hold every term that matters.
UNIFIED_RANGE = 64.0

# Kernel launches by name, for tests that must show a kernel ran (and which one).
LAUNCHES: collections.Counter = collections.Counter()
# The fallback flags of the last unified-max launch (num_splits, batch * nheads_k, m_blocks) int32, 1 where a
# program redid its chunk exactly. Tests read it; nothing on the decode path does.
last_fallback_flags: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------- jit helpers

@triton.jit
def _online_softmax_step(acc, l_i, m_i, s2, v, DOT_PRECISION: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    # a row with no key so far keeps m = -inf; subtract 0 instead so that exp2 gives 0, not NaN
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s2 - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_range(acc, l_i, m_i, q, K, V, k_head, v_head, bt_row, leftpad, stride_kb, stride_ks, stride_vb,
                  stride_vs, num_pages, start, end, diag, slope2, offs_d, qk_scale2, softcap, softcap2, phi2,
                  window_left, window_right, exact,
                  PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr,
                  WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  UNIFIED: tl.constexpr, EVEN_D: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Attend the query tile to keys [start, end) (relative to the sequence's first valid slot).

    Carries the running state (acc, l_i, m_i). ``MASKED`` blocks check the key bound and the window; the
    others are full blocks inside every row's window and load without masks. ``UNIFIED`` keeps m_i at phi2
    unless ``exact`` (a runtime flag: the unified kernel's fallback pass) is set.
    """
    dmask = offs_d < HEADDIM
    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slot = leftpad + offs_n
        if PAGED:
            if MASKED:
                page = tl.load(bt_row + slot // PAGE_SIZE, mask=offs_n < end, other=0)
            else:
                page = tl.load(bt_row + slot // PAGE_SIZE)
            # a page index outside the cache is clamped: never an out-of-bounds read
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
            within = (slot % PAGE_SIZE).to(tl.int64)
            k_rows = page * stride_kb + within * stride_ks
            v_rows = page * stride_vb + within * stride_vs
        else:
            k_rows = slot.to(tl.int64) * stride_ks
            v_rows = slot.to(tl.int64) * stride_vs
        k_ptrs = k_head + k_rows[:, None] + offs_d[None, :]
        v_ptrs = v_head + v_rows[:, None] + offs_d[None, :]
        if MASKED:
            kv_mask = (offs_n < end)[:, None] & dmask[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=dmask[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=dmask[None, :], other=0.0)
        qk = mma(q, tl.trans(k), None, DOT_PRECISION)
        if HAS_SOFTCAP:
            s2 = tanh_f32(qk * (qk_scale2 / softcap)) * softcap2  # qk_scale2 holds the plain scale here
        else:
            s2 = qk * qk_scale2
        if HAS_ALIBI:
            dist = offs_n[None, :] - diag[:, None]
            dist = tl.where(dist < 0, -dist, dist)
            s2 = s2 - slope2[:, None] * dist.to(tl.float32)
        if MASKED:
            ok = (offs_n < end)[None, :]
            if WIN_RIGHT:
                ok = ok & (offs_n[None, :] <= diag[:, None] + window_right)
            if WIN_LEFT:
                ok = ok & (offs_n[None, :] >= diag[:, None] - window_left)
            s2 = tl.where(ok, s2, float("-inf"))
        if UNIFIED:
            if exact:
                acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s2, v, DOT_PRECISION)
            else:
                # capped at 2^100 so that a score far above phi gives a large finite sum (flagged), never inf
                p = tl.exp2(tl.minimum(s2 - phi2, 100.0))
                l_i = l_i + tl.sum(p, 1)
                acc = mma(p.to(v.dtype), v, acc, DOT_PRECISION)
        else:
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s2, v, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attend_chunk(q, K, V, k_head, v_head, bt_row, leftpad, stride_kb, stride_ks, stride_vb, stride_vs, num_pages,
                  lo, mid_lo, mid_hi, hi, diag, slope2, offs_d, qk_scale2, softcap, softcap2, phi2, window_left,
                  window_right, exact,
                  PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, WIN_LEFT: tl.constexpr,
                  WIN_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  UNIFIED: tl.constexpr, EVEN_D: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  NUM_STAGES: tl.constexpr):
    """The three segments of a chunk: masked head (left window), unmasked body, masked tail."""
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + float("-inf")
    if UNIFIED:
        if exact == 0:
            m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + phi2
    if WIN_LEFT:
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, K, V, k_head, v_head, bt_row, leftpad, stride_kb, stride_ks,
                                      stride_vb, stride_vs, num_pages, lo, mid_lo, diag, slope2, offs_d, qk_scale2,
                                      softcap, softcap2, phi2, window_left, window_right, exact, PAGED, PAGE_SIZE,
                                      True, WIN_LEFT, WIN_RIGHT, HAS_ALIBI, HAS_SOFTCAP, UNIFIED,
                                      EVEN_D, HEADDIM, BLOCK_N, DOT_PRECISION, NUM_STAGES)
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, K, V, k_head, v_head, bt_row, leftpad, stride_kb, stride_ks,
                                  stride_vb, stride_vs, num_pages, mid_lo, mid_hi, diag, slope2, offs_d, qk_scale2,
                                  softcap, softcap2, phi2, window_left, window_right, exact, PAGED, PAGE_SIZE,
                                  False, WIN_LEFT, WIN_RIGHT, HAS_ALIBI, HAS_SOFTCAP, UNIFIED, EVEN_D,
                                  HEADDIM, BLOCK_N, DOT_PRECISION, NUM_STAGES)
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, K, V, k_head, v_head, bt_row, leftpad, stride_kb, stride_ks,
                                  stride_vb, stride_vs, num_pages, mid_hi, hi, diag, slope2, offs_d, qk_scale2,
                                  softcap, softcap2, phi2, window_left, window_right, exact, PAGED, PAGE_SIZE,
                                  True, WIN_LEFT, WIN_RIGHT, HAS_ALIBI, HAS_SOFTCAP, UNIFIED, EVEN_D,
                                  HEADDIM, BLOCK_N, DOT_PRECISION, NUM_STAGES)
    return acc, l_i, m_i


# ---------------------------------------------------------------------------------------------------- kernels

@triton.jit
def _split_kv_kernel(
    Q, K, V, OUT, LSE, O_PART, LSE_PART, FALLBACK, COUNTER,
    SEQLENS_K, CU_Q, LEFTPAD, BATCH_IDX, BLOCK_TABLE, ALIBI,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_lt,
    stride_btb, stride_alb,
    nheads_k, group, seqlen_q, capacity, chunk, rows_pad, num_pages,
    qk_scale2, softcap, softcap2, phi2, window_left, window_right,
    HAS_SEQLENS: tl.constexpr, VARLEN_Q: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, UNIFIED: tl.constexpr, SPLIT: tl.constexpr,
    FUSED: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, COMB_M: tl.constexpr,
    COMB_S: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        # the combine kernel may be launched once every program of this grid has started; it waits (gdc_wait)
        # for this grid to finish before it reads the partials
        gdc_launch_dependents()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    mb = tl.program_id(2)
    num_splits = tl.num_programs(1)
    num_m_blocks = tl.num_programs(2)
    b = bh // nheads_k
    kvh = bh % nheads_k

    if VARLEN_Q:
        q_start = tl.load(CU_Q + b)
        sq = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = 0
        sq = seqlen_q
    rows = group * sq
    if mb * BLOCK_M < rows:
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < rows
        t = offs_m // group
        head = kvh * group + offs_m % group
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEADDIM

        # this sequence's keys: cache slots [leftpad, end), clamped to the capacity (a device-side length past
        # the capacity never makes the kernel read out of bounds)
        if HAS_SEQLENS:
            end_slot = tl.minimum(tl.load(SEQLENS_K + b), capacity)
        else:
            end_slot = capacity
        if HAS_LEFTPAD:
            leftpad = tl.minimum(tl.maximum(tl.load(LEFTPAD + b), 0), capacity)
        else:
            leftpad = 0
        L = tl.maximum(end_slot - leftpad, 0)
        shift = L - sq
        diag = t + shift

        # the chunk of this split, narrowed to what the tile's rows can see
        t_lo = (mb * BLOCK_M) // group
        t_hi = tl.minimum((mb * BLOCK_M + BLOCK_M - 1) // group, sq - 1)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, L)
        if WIN_RIGHT:
            hi = tl.minimum(hi, t_hi + shift + window_right + 1)
        if WIN_LEFT:
            lo = tl.maximum(lo, (tl.maximum(t_lo + shift - window_left, 0) // BLOCK_N) * BLOCK_N)
        # [mid_lo, mid_hi) are whole blocks every row of the tile sees entirely
        mid_lo = lo
        if WIN_LEFT:
            mid_lo = tl.minimum(tl.maximum(lo, ((t_hi + shift - window_left + BLOCK_N - 1) // BLOCK_N) * BLOCK_N),
                                hi)
        safe_hi = hi
        if WIN_RIGHT:
            safe_hi = tl.minimum(hi, t_lo + shift + window_right + 1)
        mid_hi = tl.maximum(mid_lo, (safe_hi // BLOCK_N) * BLOCK_N)  # within [mid_lo, hi] when hi > lo

        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + b * stride_alb + head, mask=row_ok, other=0.0) * 1.4426950408889634
        else:
            slope2 = tl.zeros((BLOCK_M,), dtype=tl.float32)

        q_ptrs = (Q + b.to(tl.int64) * stride_qb + (q_start + t).to(tl.int64)[:, None] * stride_qt
                  + head.to(tl.int64)[:, None] * stride_qh + offs_d[None, :])
        q = tl.load(q_ptrs, mask=row_ok[:, None] & dmask[None, :], other=0.0)

        if HAS_BATCH_IDX:
            # clamped like page indices: a bad row index never reads outside the cache
            cache_b = tl.minimum(tl.maximum(tl.load(BATCH_IDX + b), 0), num_pages - 1).to(tl.int64)
        else:
            cache_b = b.to(tl.int64)
        if PAGED:
            k_head = K + kvh.to(tl.int64) * stride_kh
            v_head = V + kvh.to(tl.int64) * stride_vh
            bt_row = BLOCK_TABLE + b.to(tl.int64) * stride_btb
        else:
            k_head = K + cache_b * stride_kb + kvh.to(tl.int64) * stride_kh
            v_head = V + cache_b * stride_vb + kvh.to(tl.int64) * stride_vh
            bt_row = BLOCK_TABLE

        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + float("-inf")
        if hi > lo:
            if UNIFIED:
                # pass 0 uses the unified maximum; rows that see a key in this chunk must end with a partial sum
                # inside the safe range. If one does not (a score far above phi, or all far below), pass 1 redoes
                # the chunk with the exact online softmax. One loop body, so the fallback costs no registers.
                row_lo = tl.zeros((BLOCK_M,), dtype=tl.int32) + lo
                row_hi = tl.zeros((BLOCK_M,), dtype=tl.int32) + hi
                if WIN_LEFT:
                    row_lo = tl.maximum(row_lo, diag - window_left)
                if WIN_RIGHT:
                    row_hi = tl.minimum(row_hi, diag + window_right + 1)
                sees_key = row_ok & (row_lo < row_hi)
                acc, l_i, m_i = _attend_chunk(q, K, V, k_head, v_head, bt_row, leftpad, stride_kb, stride_ks,
                                              stride_vb, stride_vs, num_pages, lo, mid_lo, mid_hi, hi, diag,
                                              slope2, offs_d, qk_scale2, softcap, softcap2, phi2, window_left,
                                              window_right, 0, PAGED, PAGE_SIZE, WIN_LEFT,
                                              WIN_RIGHT, HAS_ALIBI, HAS_SOFTCAP, True, HEADDIM == BLOCK_D, HEADDIM,
                                              BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, NUM_STAGES)
                in_range = (l_i >= 5.421010862427522e-20) & (l_i <= 1.8446744073709552e19)  # 2^-64, 2^64
                bad = sees_key & (in_range == 0)
                if tl.sum(bad.to(tl.int32), 0) > 0:
                    acc, l_i, m_i = _attend_chunk(q, K, V, k_head, v_head, bt_row, leftpad, stride_kb, stride_ks,
                                                  stride_vb, stride_vs, num_pages, lo, mid_lo, mid_hi, hi, diag,
                                                  slope2, offs_d, qk_scale2, softcap, softcap2, phi2, window_left,
                                                  window_right, 1, PAGED, PAGE_SIZE, WIN_LEFT,
                                                  WIN_RIGHT, HAS_ALIBI, HAS_SOFTCAP, False, HEADDIM == BLOCK_D,
                                                  HEADDIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, 1)
                    tl.store(FALLBACK + (split * tl.num_programs(0) + bh) * num_m_blocks + mb, 1)
            else:
                acc, l_i, m_i = _attend_chunk(q, K, V, k_head, v_head, bt_row, leftpad, stride_kb, stride_ks,
                                              stride_vb, stride_vs, num_pages, lo, mid_lo, mid_hi, hi, diag, slope2,
                                              offs_d, qk_scale2, softcap, softcap2, phi2, window_left, window_right,
                                              1, PAGED, PAGE_SIZE, WIN_LEFT, WIN_RIGHT, HAS_ALIBI,
                                              HAS_SOFTCAP, False, HEADDIM == BLOCK_D, HEADDIM, BLOCK_M, BLOCK_N,
                                              BLOCK_D, DOT_PRECISION, NUM_STAGES)

        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        if SPLIT:
            prow = (split * tl.num_programs(0) + bh).to(tl.int64) * rows_pad + offs_m
            tl.store(LSE_PART + prow, lse2, mask=row_ok)
            # every row's partial is written (zeros for a row without keys), so the combine loads the partials
            # without waiting for the log-sum-exps
            tl.store(O_PART + prow[:, None] * HEADDIM + offs_d[None, :], o, mask=row_ok[:, None] & dmask[None, :])
            if FUSED:
                # the last of the tile's splits to finish combines them: every thread's partial stores are
                # ordered before the ticket (barrier, then a gpu-scope acq_rel atomic), and the winner's loads
                # after it; it resets the counter for the next launch on this stream
                tl.debug_barrier()
                cidx = bh * num_m_blocks + mb
                ticket = tl.atomic_add(COUNTER + cidx, 1, sem="acq_rel")
                if ticket == num_splits - 1:
                    tl.debug_barrier()
                    tl.store(COUNTER + cidx, 0)
                    _combine_tile(O_PART, LSE_PART, OUT, LSE, bh, b, kvh, tl.num_programs(0), mb * BLOCK_M,
                                  tl.minimum(mb * BLOCK_M + BLOCK_M, rows), num_splits, rows_pad, group, q_start,
                                  stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt, HEADDIM,
                                  BLOCK_D, COMB_M, COMB_S, BLOCK_S)
        else:
            o_ptrs = (OUT + b.to(tl.int64) * stride_ob + (q_start + t).to(tl.int64)[:, None] * stride_ot
                      + head.to(tl.int64)[:, None] * stride_oh + offs_d[None, :])
            tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
            lse = tl.where(has, lse2 * 0.6931471805599453, float("inf"))
            tl.store(LSE + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                     + (q_start + t).to(tl.int64) * stride_lt, lse, mask=row_ok)


@triton.jit
def _combine_tile(O_PART, LSE_PART, OUT, LSE, bh, b, kvh, BH, r_lo, r_hi, num_splits, rows_pad, group, q_start,
                  stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                  HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, COMB_M: tl.constexpr, COMB_S: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Merge the splits' partials of query rows [r_lo, r_hi) of (sequence, KV head) ``bh``:
    out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse).

    COMB_M rows at a time; their partials are read COMB_S splits at a time as one (COMB_M, COMB_S, BLOCK_D)
    tile, so the loads are in flight together. Every partial was written (zeros for an empty one: lse -inf,
    weight 0), so the partial loads do not wait for the log-sum-exps; a row whose partials are all empty saw no
    key: output 0, log-sum-exp +inf. Partials are read past L1 (``.cg``): other programs wrote them.
    """
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEADDIM
    offs_all = tl.arange(0, BLOCK_S)
    for r0 in range(r_lo, r_hi, COMB_M):
        offs_r = r0 + tl.arange(0, COMB_M)
        r_ok = offs_r < r_hi
        lse_all = tl.load(LSE_PART + (offs_all[None, :] * BH + bh).to(tl.int64) * rows_pad + offs_r[:, None],
                          mask=r_ok[:, None] & (offs_all < num_splits)[None, :], other=float("-inf"),
                          cache_modifier=".cg")
        mx = tl.max(lse_all, 1)
        mx_use = tl.where(mx == float("-inf"), 0.0, mx)
        denom = tl.sum(tl.exp2(lse_all - mx_use[:, None]), 1)
        acc = tl.zeros((COMB_M, BLOCK_D), dtype=tl.float32)
        for s0 in range(0, num_splits, COMB_S):
            offs_s = s0 + tl.arange(0, COMB_S)
            prow = (offs_s[None, :] * BH + bh).to(tl.int64) * rows_pad + offs_r[:, None]
            ls = tl.load(LSE_PART + prow, mask=r_ok[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"),
                         cache_modifier=".cg")
            w = tl.exp2(ls - mx_use[:, None])
            o = tl.load(O_PART + prow[:, :, None] * HEADDIM + offs_d[None, None, :],
                        mask=(r_ok[:, None] & (offs_s < num_splits)[None, :])[:, :, None] & dmask[None, None, :],
                        other=0.0, cache_modifier=".cg")
            acc += tl.sum(w[:, :, None] * o, 1)
        has = denom > 0.0
        out = acc / tl.where(has, denom, 1.0)[:, None]
        lse = tl.where(has, (mx_use + tl.log2(tl.where(has, denom, 1.0))) * 0.6931471805599453, float("inf"))
        t = offs_r // group
        head = kvh * group + offs_r % group
        row_off = (b.to(tl.int64) * stride_ob + (q_start + t).to(tl.int64) * stride_ot
                   + head.to(tl.int64) * stride_oh)
        tl.store(OUT + row_off[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=r_ok[:, None] & dmask[None, :])
        tl.store(LSE + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                 + (q_start + t).to(tl.int64) * stride_lt, lse, mask=r_ok)


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, OUT, LSE, CU_Q,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
    num_splits, nheads_k, group, seqlen_q, rows_pad,
    VARLEN_Q: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_TILE: tl.constexpr, PDL: tl.constexpr,
):
    """Merge the splits' partials of one query row: out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse).

    One program per (sequence and KV head, row). The partials are read SPLIT_TILE splits at a time as one
    (SPLIT_TILE, BLOCK_D) tile, so their loads are in flight together (a loop of one split per step waits for
    each load in turn: at 32 splits that wait was most of a short decode step). Every split kernel writes every
    row's partial (zeros for an empty one, lse -inf: weight 0), so the partials' loads do not wait for the
    log-sum-exps; a row whose partials are all empty saw no key: output 0, log-sum-exp +inf.
    """
    bh = tl.program_id(0)
    r = tl.program_id(1)
    BH = tl.num_programs(0)
    b = bh // nheads_k
    kvh = bh % nheads_k
    if VARLEN_Q:
        q_start = tl.load(CU_Q + b)
        sq = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = 0
        sq = seqlen_q
    if PDL:
        # launched early (programmatic dependent launch): wait until the split kernel's partials are written.
        # CU_Q above was written before the split kernel started, so it is safe to read earlier.
        gdc_wait()
    if r < group * sq:
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEADDIM
        offs_all = tl.arange(0, BLOCK_S)
        lse_all = tl.load(LSE_PART + (offs_all * BH + bh).to(tl.int64) * rows_pad + r,
                          mask=offs_all < num_splits, other=float("-inf"))
        mx = tl.max(lse_all, 0)
        mx_use = tl.where(mx == float("-inf"), 0.0, mx)
        denom = tl.sum(tl.exp2(lse_all - mx_use), 0)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for s0 in range(0, num_splits, SPLIT_TILE):
            offs_s = s0 + tl.arange(0, SPLIT_TILE)
            prow = (offs_s * BH + bh).to(tl.int64) * rows_pad + r
            ls = tl.load(LSE_PART + prow, mask=offs_s < num_splits, other=float("-inf"))
            w = tl.exp2(ls - mx_use)
            o = tl.load(O_PART + prow[:, None] * HEADDIM + offs_d[None, :],
                        mask=(offs_s < num_splits)[:, None] & dmask[None, :], other=0.0)
            acc += tl.sum(w[:, None] * o, 0)
        has = denom > 0.0
        out = acc / tl.where(has, denom, 1.0)
        lse = tl.where(has, (mx_use + tl.log2(tl.where(has, denom, 1.0))) * 0.6931471805599453, float("inf"))
        t = r // group
        head = kvh * group + r % group
        row_off = b.to(tl.int64) * stride_ob + (q_start + t).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(OUT + row_off + offs_d, out.to(OUT.dtype.element_ty), mask=dmask)
        tl.store(LSE + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                 + (q_start + t).to(tl.int64) * stride_lt, lse)


@triton.jit
def _append_rotary_kernel(
    Q, Q_ROT, K_NEW, V_NEW, K, V, COS, SIN, CACHE_SEQLENS, BATCH_IDX, BLOCK_TABLE,
    stride_qb, stride_qt, stride_qh, stride_rb, stride_rt, stride_rh,
    stride_nkb, stride_nkt, stride_nkh, stride_nvb, stride_nvt, stride_nvh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_cos, stride_cb, stride_ct, stride_btb,
    seqlen_q, seqlen_new, nheads_k, capacity, seqlen_ro, num_pages,
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, Q_POS_PER_TOKEN: tl.constexpr, HAS_NEW: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HEADDIM: tl.constexpr,
    BLOCK_D: tl.constexpr, ROPE_PER_TOKEN: tl.constexpr,
):
    """One program per (sequence, token, head): rotate the query token (into Q_ROT, which may be Q itself: a
    program reads its row before it writes it), and write the new K/V token (rotated K) at cache slot
    cache_seqlens[b] + token. A slot past the capacity is not written. Rotary by a table (flash-attn:
    (seqlen_ro, rotary_dim / 2), indexed by the token's position) or, with ROPE_PER_TOKEN, by the cos/sin rows
    a transformers model computed for these tokens ((batch, seqlen, head dim), row (b, token))."""
    b = tl.program_id(0)
    i = tl.program_id(1)
    h = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEADDIM
    start = tl.load(CACHE_SEQLENS + b)
    if ROTARY_DIM > 0:
        if i < seqlen_q:
            if ROPE_PER_TOKEN:
                q_row = b.to(tl.int64) * stride_cb + i * stride_ct
            else:
                if Q_POS_PER_TOKEN:
                    qpos = start + i
                else:
                    qpos = start
                q_row = tl.minimum(tl.maximum(qpos, 0), seqlen_ro - 1).to(tl.int64) * stride_cos
            x = rotate_row(Q + b.to(tl.int64) * stride_qb + i * stride_qt + h * stride_qh, offs_d, dmask, COS, SIN,
                        q_row, ROTARY_DIM, INTERLEAVED, ROPE_PER_TOKEN, False)
            tl.store(Q_ROT + b.to(tl.int64) * stride_rb + i * stride_rt + h * stride_rh + offs_d,
                     x.to(Q_ROT.dtype.element_ty), mask=dmask)
    if HAS_NEW:
        if i < seqlen_new:
            if h < nheads_k:
                slot = start + i
                if (slot >= 0) & (slot < capacity):
                    k_src = K_NEW + b.to(tl.int64) * stride_nkb + i * stride_nkt + h * stride_nkh
                    if ROTARY_DIM > 0:
                        if ROPE_PER_TOKEN:
                            k_row = b.to(tl.int64) * stride_cb + i * stride_ct
                        else:
                            k_row = tl.minimum(tl.maximum(slot, 0), seqlen_ro - 1).to(tl.int64) * stride_cos
                        kx = rotate_row(k_src, offs_d, dmask, COS, SIN, k_row, ROTARY_DIM, INTERLEAVED, ROPE_PER_TOKEN, False)
                    else:
                        kx = tl.load(k_src + offs_d, mask=dmask, other=0.0)
                    vx = tl.load(V_NEW + b.to(tl.int64) * stride_nvb + i * stride_nvt + h * stride_nvh + offs_d,
                                 mask=dmask, other=0.0)
                    if PAGED:
                        page = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_btb + slot // PAGE_SIZE)
                        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
                        k_dst = K + page * stride_kb + (slot % PAGE_SIZE) * stride_ks + h * stride_kh
                        v_dst = V + page * stride_vb + (slot % PAGE_SIZE) * stride_vs + h * stride_vh
                    else:
                        if HAS_BATCH_IDX:
                            cb = tl.minimum(tl.maximum(tl.load(BATCH_IDX + b), 0), num_pages - 1).to(tl.int64)
                        else:
                            cb = b.to(tl.int64)
                        k_dst = K + cb * stride_kb + slot.to(tl.int64) * stride_ks + h * stride_kh
                        v_dst = V + cb * stride_vb + slot.to(tl.int64) * stride_vs + h * stride_vh
                    tl.store(k_dst + offs_d, kx.to(K.dtype.element_ty), mask=dmask)
                    tl.store(v_dst + offs_d, vx.to(V.dtype.element_ty), mask=dmask)


# ------------------------------------------------------------------------------------------ heuristics, config


@functools.lru_cache(maxsize=4096)
def num_splits_heuristic(batch: int, nheads_k: int, seqlen_k_upper: int, num_sms: int, m_blocks: int = 1,
                         block_n: int = 64, programs_per_sm: int = 2, min_keys_per_split: int = 256,
                         max_splits: int = 128, min_efficiency: float = 0.85) -> int:
    """How many chunks to cut the keys into, from host-known sizes only (no device lengths are read).

    ``seqlen_k_upper`` is the cache's capacity. Enough (batch, KV head, query tile) programs already fill the
    GPU: 1. Otherwise take the smallest split count whose grid fills ``num_sms * programs_per_sm`` slots in
    waves at least ``min_efficiency`` (85%) as efficiently as the best count, each chunk keeping at least
    ``min_keys_per_split`` keys (measured on the H100, tune_decode: a batch-1 32/8-head 4k cache ran at 0.92 TB/s
    with 16 chunks of 256 keys against 0.84 with 32 chunks of 128), and no chunk left empty.
    """
    n_blocks = max(1, -(-seqlen_k_upper // block_n))
    programs = batch * nheads_k * m_blocks
    slots = max(1, num_sms * programs_per_sm)
    if programs >= 0.8 * slots:
        return 1
    limit = max(1, min(max_splits, n_blocks // max(1, min_keys_per_split // block_n), n_blocks))
    candidates = []
    for s in range(1, limit + 1):
        per = -(-n_blocks // s)
        if s > 1 and -(-n_blocks // per) != s:
            continue  # the same chunking as a smaller count, with empty splits
        waves = programs * s / slots
        candidates.append((s, waves / math.ceil(waves)))
    best = max(eff for _, eff in candidates)
    for s, eff in candidates:
        if eff >= min_efficiency * best:
            return s
    return 1


@functools.lru_cache(maxsize=1024)
def decode_config(headdim: int, rows: int, device: torch.device, block_m: int | None = None) -> dict:
    """Tile sizes and launch options for the split-KV kernel.

    ``rows`` = query rows per (sequence, KV head) = group * seqlen_q: the tile takes them padded to 16 (the
    tensor-core minimum), up to 64; more rows make more tiles. ``block_m`` overrides (benchmarks).
    """
    block_d = max(16, next_pow2(headdim))
    if block_m is None:
        block_m = min(64, max(16, next_pow2(max(rows, 1))))
    if device.type != "cuda":
        return dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_D=block_d, num_warps=1, num_stages=1)
    # GQA decode tiles (several query heads per KV head, at most 16 rows) read best in 32-key blocks (H100,
    # tune_decode: 32/8 heads, 4k 0.92 vs 0.84 TB/s, 16k 1.63 vs 1.56); one query head per KV head keeps 64
    block_n = 64 if block_d <= 128 else 32
    if 1 < rows <= 16:
        block_n = 32
    num_stages = 3 if block_d <= 128 else 2
    num_warps = 4 if block_m <= 64 else 8
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------- launchers

def split_kv_forward(q, k, v, *, softmax_scale: float, window_left: int = -1, window_right: int = -1,
                     softcap: float = 0.0, alibi_slopes=None, seqlens_k=None, leftpad=None, batch_idx=None,
                     block_table=None, cu_seqlens_q=None, max_seqlen_q: int | None = None, num_splits: int = 0,
                     unified_max: float | None = None, block_m: int | None = None, seqlen_k_upper=None,
                     out=None, fused_combine: bool | None = None, record: list | None = None):
    """Attention of q against a KV cache, split over the keys. Inputs are validated by the caller.

    q: (batch, seqlen_q, nheads, d), or (total_q, nheads, d) with ``cu_seqlens_q`` (int32, batch + 1) and
    ``max_seqlen_q``. k, v: (batch_cache, capacity, nheads_k, d), or (num_pages, page_size, nheads_k, d) with
    ``block_table`` (batch, max_pages) int32. ``seqlens_k`` (batch,) int32 on the device: one past each
    sequence's last valid slot (None: the capacity). ``leftpad`` (batch,) int32: first valid slot.
    ``unified_max``: FlashDecoding++'s fixed maximum phi (natural-log units of the scaled score), or None for
    the exact online softmax. ``seqlen_k_upper``: a host bound on the key lengths tighter than the capacity
    (keys past it are ignored). ``fused_combine``: with several splits, the last program of each tile merges
    the partials in the split kernel itself (one launch; default, ``HF_FLASH_DECODE_FUSED=0`` turns it off)
    instead of a second combine kernel. ``record``: a list that receives, per kernel launched, (kernel function,
    grid, arguments, compiled kernel, launch options), for :class:`DecodePlan`.
    Returns (out like q, lse float32: (batch, nheads, seqlen_q) dense or (nheads, total_q) varlen).
    """
    global last_fallback_flags
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        total_q, nheads, d = q.shape
        seqlen_q = int(max_seqlen_q)
        sqb, sqt, sqh = 0, q.stride(0), q.stride(1)
    else:
        batch, seqlen_q, nheads, d = q.shape
        sqb, sqt, sqh = q.stride(0), q.stride(1), q.stride(2)
    nheads_k = k.shape[2]
    group = nheads // nheads_k
    paged = block_table is not None
    page_size = k.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k.shape[1]
    if seqlen_k_upper is not None:
        capacity = min(capacity, int(seqlen_k_upper))
    rows = group * seqlen_q
    cfg = decode_config(d, rows, q.device, block_m)
    override = os.environ.get("HF_FLASH_DECODE_CONFIG")  # "BLOCK_N,num_warps,num_stages", for tuning sweeps
    if override and q.is_cuda:
        bn, nw, ns = (int(x) for x in override.split(","))
        cfg = dict(cfg, BLOCK_N=bn, num_warps=nw, num_stages=ns)
    BLOCK_M, BLOCK_N, BLOCK_D = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    m_blocks = max(1, cdiv(rows, BLOCK_M))
    unified = unified_max is not None and q.dtype != torch.float16
    causal_only = window_right == 0 and window_left < 0
    if fused_combine is None:
        fused_combine = os.environ.get("HF_FLASH_DECODE_FUSED", "0") == "1"
    gluon = None
    if block_m is None and not fused_combine and record is None:
        # the Hopper TMA kernel, where the host time of a launch does not decide: not for a plan (a model's
        # eager per-layer decode call, kvcache.decode_attention), whose replays of the Triton kernels cost
        # 22-28 us of host time per call against 37-43 for the Gluon kernel's (H100 box), more than its GPU time
        # saves (4k keys, 32/8 heads: 5.8 vs 8.4 us)
        gluon = _gluon_decode()
        if gluon is not None and not gluon.supported(
                q, k, v, varlen_q=varlen, paged=paged, window=(window_left >= 0 or window_right >= 0)
                and not causal_only, softcap=float(softcap), alibi=alibi_slopes is not None, unified=unified,
                rows=rows):
            gluon = None
    if gluon is not None:
        # the TMA kernel's key blocks and one program per SM slot (kernels/gluon_decode.py)
        gcfg = gluon.config()
        BLOCK_N = gcfg["BLOCK_N"]
        if num_splits <= 0:
            num_splits = num_splits_heuristic(batch, nheads_k, capacity, num_sms(q.device), 1, BLOCK_N,
                                              programs_per_sm=gcfg["programs_per_sm"],
                                              min_keys_per_split=gcfg["min_keys"], min_efficiency=0.95)
    elif num_splits <= 0:
        # the interpreter's tests use caches of a few hundred keys: 2 blocks a chunk there, so they still split
        num_splits = num_splits_heuristic(batch, nheads_k, capacity, num_sms(q.device), m_blocks, BLOCK_N,
                                          min_keys_per_split=256 if q.is_cuda else 2 * BLOCK_N)
    n_blocks = max(1, cdiv(capacity, BLOCK_N))
    chunk = cdiv(n_blocks, num_splits) * BLOCK_N

    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if varlen:
        lse = torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)
        sob, sot, soh = 0, out.stride(0), out.stride(1)
        slb, slh, slt = 0, lse.stride(0), lse.stride(1)
    else:
        lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
        sob, sot, soh = out.stride(0), out.stride(1), out.stride(2)
        slb, slh, slt = lse.stride(0), lse.stride(1), lse.stride(2)
    if out.numel() == 0:
        return out, lse

    split = num_splits > 1
    rows_pad = m_blocks * BLOCK_M
    if split:
        o_part = torch.empty((num_splits, batch * nheads_k, rows_pad, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, batch * nheads_k, rows_pad), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = lse
    if unified:
        fallback = torch.zeros((num_splits, batch * nheads_k, m_blocks), dtype=torch.int32, device=q.device)
        last_fallback_flags = fallback
    else:
        fallback = lse
    dummy = lse
    softcap = float(softcap)
    has_softcap = softcap > 0.0
    qk_scale2 = softmax_scale if has_softcap else softmax_scale * LOG2E
    alibi_batch_stride = 0
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        alibi_batch_stride = alibi_slopes.stride(0)

    fused = split and bool(fused_combine)
    counter = _counters(q.device, batch * nheads_k * m_blocks) if fused else dummy
    comb_m = min(BLOCK_M, next_pow2(max(rows, 1)))
    block_s = max(2, next_pow2(num_splits))
    # up to 8192 float32 partial values in flight per combine step on the GPU (all the splits of a GQA decode
    # tile at once); 2 splits a step on the CPU, so that the interpreter tests walk the loop over several steps
    comb_s = min(block_s, max(1, 8192 // (comb_m * BLOCK_D))) if q.is_cuda else 2

    pdl = split and not fused and q.is_cuda and _pdl_ok(q.device)
    if gluon is not None:
        try:
            gluon.split_forward(q, k, v, out, lse=lse, o_part=o_part, lse_part=lse_part, softmax_scale=softmax_scale,
                                causal=causal_only and seqlen_q > 1, num_splits=num_splits, chunk=chunk,
                                rows_pad=rows_pad, seqlens_k=seqlens_k, leftpad=leftpad, batch_idx=batch_idx,
                                capacity=capacity, block_n=BLOCK_N, stages=gcfg["stages"])
        except _attention._GLUON_COMPILE_ERRORS as err:  # a Gluon API this kernel does not match: the Triton kernel
            _gluon_decode_failed(err)
            gluon = None
        else:
            LAUNCHES["split_kv"] += 1
            LAUNCHES["split_kv_gluon"] += 1
            # measured slower with the combine as a programmatic dependent launch of this kernel (H100, 32 calls
            # in a graph, 4k: 1.16 vs 1.34 TB/s), so it follows as a normal launch
            pdl = False
    if gluon is None:
        grid = (batch * nheads_k, num_splits, m_blocks)
        split_args = dict(
            Q=q, K=k, V=v, OUT=out, LSE=lse, O_PART=o_part, LSE_PART=lse_part, FALLBACK=fallback, COUNTER=counter,
            SEQLENS_K=seqlens_k if seqlens_k is not None else dummy,
            CU_Q=cu_seqlens_q if varlen else dummy,
            LEFTPAD=leftpad if leftpad is not None else dummy,
            BATCH_IDX=batch_idx if batch_idx is not None else dummy,
            BLOCK_TABLE=block_table if paged else dummy,
            ALIBI=alibi_slopes if alibi_slopes is not None else dummy,
            stride_qb=sqb, stride_qt=sqt, stride_qh=sqh,
            stride_kb=k.stride(0), stride_ks=k.stride(1), stride_kh=k.stride(2),
            stride_vb=v.stride(0), stride_vs=v.stride(1), stride_vh=v.stride(2),
            stride_ob=sob, stride_ot=sot, stride_oh=soh, stride_lb=slb, stride_lh=slh, stride_lt=slt,
            stride_btb=block_table.stride(0) if paged else 0, stride_alb=alibi_batch_stride,
            nheads_k=nheads_k, group=group, seqlen_q=seqlen_q, capacity=capacity, chunk=chunk, rows_pad=rows_pad,
            num_pages=k.shape[0],
            qk_scale2=qk_scale2, softcap=softcap if has_softcap else 1.0, softcap2=softcap * LOG2E,
            phi2=float(unified_max) * LOG2E if unified else 0.0, window_left=int(window_left),
            window_right=int(window_right),
            HAS_SEQLENS=seqlens_k is not None, VARLEN_Q=varlen, HAS_LEFTPAD=leftpad is not None,
            HAS_BATCH_IDX=batch_idx is not None, PAGED=paged, PAGE_SIZE=page_size,
            HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=has_softcap, WIN_LEFT=window_left >= 0,
            WIN_RIGHT=window_right >= 0, UNIFIED=unified, SPLIT=split, FUSED=fused, HEADDIM=d, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_PRECISION=dot_precision(q.dtype, q.device),
            NUM_STAGES=cfg["num_stages"], COMB_M=comb_m, COMB_S=comb_s, BLOCK_S=block_s, PDL=pdl,
        )
        split_opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        kernel = _launch.launch(_split_kv_kernel, grid, split_args, **split_opts)
        if record is not None:
            record.append((_split_kv_kernel, grid, split_args, kernel, split_opts))
        LAUNCHES["split_kv_unified" if unified else "split_kv"] += 1
    if fused:
        LAUNCHES["fused_combine"] += 1
    elif split:
        comb_args = dict(
            O_PART=o_part, LSE_PART=lse_part, OUT=out, LSE=lse, CU_Q=cu_seqlens_q if varlen else dummy,
            stride_ob=sob, stride_ot=sot, stride_oh=soh, stride_lb=slb, stride_lh=slh, stride_lt=slt,
            num_splits=num_splits, nheads_k=nheads_k, group=group, seqlen_q=seqlen_q, rows_pad=rows_pad,
            VARLEN_Q=varlen, HEADDIM=d, BLOCK_D=BLOCK_D, BLOCK_S=block_s,
            # 16 KiB of float32 partials in flight per step on the GPU; 4 splits a step on the CPU, so that the
            # interpreter tests walk the loop over several steps
            SPLIT_TILE=min(block_s, max(2, 4096 // BLOCK_D)) if q.is_cuda else 4, PDL=pdl,
        )
        comb_opts = dict(num_warps=4 if q.is_cuda else 1, launch_pdl=pdl)
        kernel = _launch.launch(_combine_kernel, (batch * nheads_k, rows), comb_args, **comb_opts)
        if record is not None:
            record.append((_combine_kernel, (batch * nheads_k, rows), comb_args, kernel, comb_opts))
        LAUNCHES["combine"] += 1
        if pdl:
            LAUNCHES["combine_pdl"] += 1
    return out, lse


class _Recorded:
    """One recorded launch: the kernel's argument values in parameter order, and where the per-call tensors go."""

    __slots__ = ("fn", "grid", "names", "values", "slots", "kernel", "opts")

    def __init__(self, fn, grid, args: dict, kernel, opts: dict, roles: dict):
        self.fn, self.grid, self.opts = fn, tuple(grid), opts
        # None under the interpreter (or a triton without a launcher): replayed through fn[grid]
        self.kernel = kernel if _launch.can_run_directly(kernel) else None
        self.names = tuple(fn.arg_names)
        self.values = [args[n] for n in self.names]
        # parameter index -> role ("q", "k", "v", "out", "seqlens", "leftpad") for the tensors a call brings; the
        # recorded call's tensors are dropped (a plan must not keep a KV cache alive)
        self.slots = tuple((self.names.index(n), role) for n, role in roles.items())
        for i, _ in self.slots:
            self.values[i] = None

    def run(self, call: dict, direct: bool):
        values = self.values.copy()
        for i, role in self.slots:
            values[i] = call[role]
        if direct and self.kernel is not None:
            _launch.run_compiled(self.kernel, self.grid, call["q"].device.index, values)
        else:
            self.fn[self.grid](**dict(zip(self.names, values)), **self.opts)
            _launch.STATS["normal"] += 1


class DecodePlan:
    """A split-KV decode call recorded once and replayed for calls whose shapes, strides, dtypes, alignment and
    options are the same (every layer of a model's decode step): the compiled kernels are launched directly
    with the call's q / k / v / lengths and a new output swapped into the recorded arguments, and the partials,
    their log-sum-exps and the log-sum-exp output live in the plan (reused call after call on the stream the plan
    belongs to, so in stream order). What is left per call is one output allocation (none when the
    caller gives ``out``, of the recorded shape, contiguous) and two launches.

    Why: a 32-layer model makes this call 32 times per generated token, and on the GPU box the general launcher
    (argument handling, four allocations, two argument dicts of ~60 entries) cost ~350 us of host time per call
    in a decode step, several times the kernel time at 4k tokens of context (benchmarks/results/logs_2026-11-25d).
    Made by :func:`plan_decode`; not used while a CUDA graph is captured or under torch.compile.
    """

    __slots__ = ("launches", "out_shape", "dtype", "device", "launch_labels")

    def __init__(self, launches, out_shape, dtype, device, launch_labels):
        self.launches, self.out_shape, self.dtype, self.device = launches, out_shape, dtype, device
        self.launch_labels = launch_labels

    def __call__(self, q, k, v, seqlens=None, leftpad=None, out=None):
        if out is None:
            out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        call = {"q": q, "k": k, "v": v, "out": out, "seqlens": seqlens, "leftpad": leftpad}
        direct = _launch.direct_launch_enabled() and _launch._no_hooks()
        for launch in self.launches:
            launch.run(call, direct)
        for label in self.launch_labels:
            LAUNCHES[label] += 1
        LAUNCHES["plan"] += 1
        return out


def plan_decode(q, k, v, *, softmax_scale: float, window_left: int, window_right: int, softcap: float,
                seqlens_k=None, leftpad=None, unified_max=None):
    """Run ``split_kv_forward`` on these inputs and return (out, a :class:`DecodePlan` that repeats the call for
    other tensors of the same shapes, strides, dtypes and alignment, or None where a plan cannot be made: the
    unified-max variant, whose fallback flags must be zeroed per call)."""
    record: list = []
    before = LAUNCHES.copy()
    out, _ = split_kv_forward(q, k, v, softmax_scale=softmax_scale, window_left=window_left,
                              window_right=window_right, softcap=softcap, seqlens_k=seqlens_k, leftpad=leftpad,
                              unified_max=unified_max, record=record)
    labels = [name for name, n in (LAUNCHES - before).items() for _ in range(n)]
    if unified_max is not None or not record or any(name == "fused_combine" for name in labels):
        return out, None
    roles = {"Q": "q", "K": "k", "V": "v", "OUT": "out", "SEQLENS_K": "seqlens", "LEFTPAD": "leftpad"}
    given = {"seqlens": seqlens_k is not None, "leftpad": leftpad is not None}
    launches = tuple(_Recorded(fn, grid, args, kernel, opts,
                               {n: r for n, r in roles.items() if n in args and given.get(r, True)})
                     for fn, grid, args, kernel, opts in record)
    return out, DecodePlan(launches, tuple(q.shape), q.dtype, q.device, labels)


class AppendPlan:
    """An :func:`append_kv` call with transformers' per-token rotary (``rope_per_token``, q rotated in place)
    recorded once and replayed for calls of the same shapes, strides, dtypes and alignment: every layer of a
    Llama-family decode step (patches/llama.py), whose cache buffers change shape only when they grow. One direct
    launch instead of the ~40 arguments ``append_kv`` assembles per call."""

    __slots__ = ("launch",)

    def __init__(self, launch):
        self.launch = launch

    def __call__(self, q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin):
        call = {"q": q, "k": k_new, "v": v_new, "kc": k_cache, "vc": v_cache, "slots": cache_seqlens, "cos": cos,
                "sin": sin}
        self.launch.run(call, _launch.direct_launch_enabled() and _launch._no_hooks())
        LAUNCHES["append_rotary"] += 1
        LAUNCHES["append_plan"] += 1
        return q


def plan_append(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin):
    """``append_kv(q, k_new, v_new, k_cache, v_cache, cache_seqlens, rotary_cos=cos, rotary_sin=sin,
    rotary_interleaved=False, rope_per_token=True, q_out=q)`` run now, and an :class:`AppendPlan` that repeats
    it for other tensors of the same layout (the caller keys plans by that layout), or None where nothing was
    launched (no tokens)."""
    record: list = []
    append_kv(q, k_new, v_new, k_cache, v_cache, cache_seqlens, rotary_cos=cos, rotary_sin=sin,
              rotary_interleaved=False, rope_per_token=True, q_out=q, record=record)
    if not record:
        return None
    (fn, grid, args, kernel, opts), = record
    roles = {"Q": "q", "Q_ROT": "q", "K_NEW": "k", "V_NEW": "v", "K": "kc", "V": "vc", "COS": "cos", "SIN": "sin",
             "CACHE_SEQLENS": "slots", "BATCH_IDX": "slots", "BLOCK_TABLE": "slots"}
    return AppendPlan(_Recorded(fn, grid, args, kernel, opts, roles))


_GLUON_DECODE: list = []  # kernels/gluon_decode.py once imported (None where it cannot be)
_GLUON_DECODE_BROKEN: list = []  # the first compile / launch failure, after which the Triton kernel runs


def _gluon_decode():
    """kernels/gluon_decode.py (the TMA split kernel for Hopper) unless ``HF_FLASH_GLUON_DECODE=0``, under the
    interpreter, with a Triton older than 3.6 or without Gluon's Hopper API (the import is tried once), or after it
    failed to compile here (:func:`_gluon_decode_failed`)."""
    if (_GLUON_DECODE_BROKEN or _launch.env_get("HF_FLASH_GLUON_DECODE", "1") == "0"
            or _launch.env_get("TRITON_INTERPRET") == "1"):
        return None
    if not _GLUON_DECODE:
        module = None
        if _attention._version(triton.__version__) >= _attention.GLUON_MIN_TRITON:
            try:
                from hf_flash.kernels import gluon_decode as module
            except (ImportError, AttributeError):
                module = None
        _GLUON_DECODE.append(module)
    return _GLUON_DECODE[0]


def _gluon_decode_failed(err: Exception) -> None:
    """The Gluon decode kernel did not compile with this Triton: warn once, use the Triton kernel from now on."""
    import warnings

    _GLUON_DECODE_BROKEN.append(err)
    first = str(err).splitlines()[0] if str(err) else ""
    warnings.warn(f"hf_flash: the Hopper (Gluon) split-KV decode kernel did not compile with triton "
                  f"{triton.__version__} ({type(err).__name__}: {first}); using the Triton kernel (set "
                  "HF_FLASH_GLUON_DECODE=0 to skip the attempt)", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=16)
def _pdl_capable(index: int) -> bool:
    return HAS_GDC and torch.cuda.get_device_capability(index)[0] >= 9


def _pdl_ok(device: torch.device) -> bool:
    """Launch the combine kernel as a programmatic dependent launch (PDL) of the split kernel: with
    ``HF_FLASH_DECODE_PDL=1``, on Hopper and later with a triton that has grid dependency control. Off by default.

    Measured on the H100 (benchmarks/results/logs_2026-11-25d): inside a captured 32-layer chain the combine's
    launch overlaps the split kernel's tail, 13.2 vs 13.6 us per layer at 4k tokens and 30.2 vs 30.9 at 16k
    (32/8 heads, 2.5%); launched eagerly, a host-bound 8-layer decode loop was slower with it (28.4 vs 14.9 ms
    per step). Turning it on only while a graph is captured would compile the PDL variant during the capture
    (not allowed), so it stays an opt-in for graph-captured decoding."""
    if os.environ.get("HF_FLASH_DECODE_PDL", "0") != "1":
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets for the fused combine, one per (sequence and KV head, query tile), allocated per
    launch. (A buffer kept across launches and reset by the kernel would save the memset, but one first
    allocated while torch.compile's CUDA-graph trees warm up lives in their private pool, which they reject:
    measured on the GPU.)"""
    return torch.zeros(n, dtype=torch.int32, device=device)


def append_kv(q, k_new, v_new, k_cache, v_cache, cache_seqlens, *, rotary_cos=None, rotary_sin=None,
              rotary_interleaved=True, q_pos_per_token=True, batch_idx=None, block_table=None,
              rope_per_token=False, q_out=None, record: list | None = None):
    """Write k_new/v_new (batch, seqlen_new, nheads_k, d) into the cache at slots cache_seqlens[b] + i, in
    place, rotating them when cos/sin (seqlen_ro, rotary_dim / 2) are given; returns q rotated (a new tensor, or
    ``q_out``, which may be q itself) when cos/sin are given, else q. ``cache_seqlens`` (batch,) int32 on the
    device. ``rope_per_token``: cos/sin are transformers' (batch, seqlen, d) rows for these tokens (full width,
    non-interleaved rotate_half), not a table. Inputs are validated by the caller; a slot past the capacity is
    skipped, never written out of bounds. ``record``: as in :func:`split_kv_forward` (see :class:`AppendPlan`)."""
    batch, seqlen_q, nheads, d = q.shape
    has_new = k_new is not None
    seqlen_new = k_new.shape[1] if has_new else 0
    if rotary_cos is None:
        rotary_dim = 0
    else:
        rotary_dim = rotary_cos.shape[-1] if rope_per_token else 2 * rotary_cos.shape[1]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    q_rot = (torch.empty_like(q) if q_out is None else q_out) if rotary_dim > 0 else q
    if rotary_dim == 0 and not has_new:
        return q
    tokens = max(seqlen_q if rotary_dim > 0 else 0, seqlen_new)
    heads = nheads if rotary_dim > 0 else k_new.shape[2]
    if batch == 0 or tokens == 0:
        return q_rot
    dummy = cache_seqlens
    kn = k_new if has_new else q
    vn = v_new if has_new else q
    cos = rotary_cos if rotary_dim > 0 else dummy
    sin = rotary_sin if rotary_dim > 0 else dummy
    grid = (batch, tokens, heads)
    args = dict(
        Q=q, Q_ROT=q_rot, K_NEW=kn, V_NEW=vn, K=k_cache, V=v_cache, COS=cos, SIN=sin, CACHE_SEQLENS=cache_seqlens,
        BATCH_IDX=batch_idx if batch_idx is not None else dummy, BLOCK_TABLE=block_table if paged else dummy,
        stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qh=q.stride(2),
        stride_rb=q_rot.stride(0), stride_rt=q_rot.stride(1), stride_rh=q_rot.stride(2),
        stride_nkb=kn.stride(0), stride_nkt=kn.stride(1), stride_nkh=kn.stride(2),
        stride_nvb=vn.stride(0), stride_nvt=vn.stride(1), stride_nvh=vn.stride(2),
        stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_cos=rotary_cos.stride(0) if rotary_dim > 0 and not rope_per_token else 0,
        stride_cb=rotary_cos.stride(0) if rope_per_token and rotary_dim > 0 else 0,
        stride_ct=rotary_cos.stride(1) if rope_per_token and rotary_dim > 0 else 0,
        stride_btb=block_table.stride(0) if paged else 0,
        seqlen_q=seqlen_q, seqlen_new=seqlen_new, nheads_k=k_cache.shape[2], capacity=capacity,
        seqlen_ro=rotary_cos.shape[0] if rotary_dim > 0 and not rope_per_token else 1, num_pages=k_cache.shape[0],
        ROTARY_DIM=rotary_dim, INTERLEAVED=bool(rotary_interleaved), Q_POS_PER_TOKEN=bool(q_pos_per_token),
        HAS_NEW=has_new, HAS_BATCH_IDX=batch_idx is not None, PAGED=paged, PAGE_SIZE=page_size, HEADDIM=d,
        BLOCK_D=max(16, next_pow2(d)), ROPE_PER_TOKEN=bool(rope_per_token) and rotary_dim > 0,
    )
    kernel = _launch.launch(_append_rotary_kernel, grid, args, num_warps=1)
    if record is not None:
        record.append((_append_rotary_kernel, grid, args, kernel, dict(num_warps=1, num_stages=1)))
    LAUNCHES["append_rotary" if rotary_dim > 0 else "append"] += 1
    return q_rot
