"""FlashAttention-2 forward and recompute backward in Triton, with launchers.

Supports: (batch, seqlen, heads, dim) and varlen (total, heads, dim) layouts with any strides whose last
dimension is contiguous; float16 / bfloat16 / float32 (float32 accumulation; float32 inputs multiply in full
float32 unless ``torch.get_float32_matmul_precision()`` allows TF32); head dims 1..256 (padded to a power of
two inside the kernel); seqlen_q != seqlen_k with bottom-right alignment; GQA/MQA without copying K/V;
causal and sliding windows (blocks outside the window are skipped); softcap; ALiBi; an additive float or
boolean attention bias read with stride-0 broadcasting (tiles that are fully masked by it are skipped) and its
gradient; in-kernel Philox dropout regenerated in the backward.

Forward: grid (query blocks, batch * heads); each program streams K/V blocks with an online softmax in the exp2
domain and rescales once at the end; writes O and the float32 log-sum-exp (natural log; +inf for rows that see
no key, whose output is 0).

Backward: a preprocess for delta = rowsum(dO * O); a dK/dV kernel, one program per (key block, batch, KV head),
looping over the query heads of its GQA group and their query blocks, so dK/dV are reduced in registers and
written once (where the grid would be too small for the GPU, a group is shared out over several programs that
write float32 partials, summed afterwards: see :func:`gqa_split`). dQ is added into a float32 accumulator with
atomics from the same kernel, as in flash-attn (:func:`fused_dq_enabled`); with ``deterministic=True`` (or
torch's deterministic algorithms, or a bias gradient) a separate dQ kernel, one program per (query block, batch,
head), computes it without atomics, so that backward is bitwise repeatable. The gradient of a bias broadcast over
batch or heads is reduced with atomics unless ``deterministic`` is set, in which case a dedicated pass sums it in
a fixed order. Nothing N x N is allocated apart from the bias gradient itself.

Not supported here: key-padding masks other than through varlen or a bias; paged K/V (see kernels/decode.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from hf_flash.kernels._common import (
    LOG2E,
    UNBOUNDED,
    dropout_keep,
    head_params,
    mma,
    key_range,
    load_bias_tile,
    query_range,
    score_mod,
    seq_bounds,
)
from hf_flash.kernels import configs
from hf_flash.kernels.configs import cdiv, dot_precision

# Launch counters: tests check that a kernel ran, not only that the output looks right.
# "fwd" counts every forward, "fwd_gluon" those that ran kernels/gluon_attention.py's kernel; "bwd_gluon" counts
# the backwards that ran its backward kernel (the others count "bwd_dkdv" and what follows it).
launches = {"fwd": 0, "fwd_gluon": 0, "bwd_gluon": 0, "bwd_dkdv": 0, "bwd_dkdv_gqa_split": 0, "bwd_fused_dq": 0,
            "bwd_dq": 0, "bwd_dbias": 0}


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(acc, m_i, l_i, start_n, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bm, stride_bn,
               offs_m, offs_d, d_ok, seqlen_q, seqlen_k, shift, scale_log2, softcap, slope, window_left, window_right,
               seed, rng_offset, bh, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """One key block of the forward's online softmax: returns the updated (acc, m_i, l_i)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_mask = (offs_n < seqlen_k)[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    bias, live = load_bias_tile(bias_base, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, stride_bm,
                                stride_bn, BIAS_TYPE)
    if live:
        if HEAD_DIM == BLOCK_D and not MASKED:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :])
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = mma(q, tl.trans(k), None, DOT_PREC)
        if not MASKED and not HAS_SOFTCAP and not HAS_ALIBI and BIAS_TYPE == 0:
            # a block every row sees in full, plain scores: all finite, so the running max is finite after
            # it, and the scale folds into one multiply-add per score (exp2(qk * c - m))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            p = tl.exp2(qk * scale_log2 - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
        else:
            s2, _ = score_mod(qk, offs_m[:, None], offs_n[None, :], shift, seqlen_k, scale_log2, softcap, slope,
                              bias, window_left, window_right, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, MASKED,
                              WINDOWED)
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            # rows that have seen only -inf so far keep a finite reference so exp2 gives 0, not NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s2 - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        if HEAD_DIM == BLOCK_D and not MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = mma(p.to(v.dtype), v, acc, DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bm, stride_bn,
               offs_m, offs_d, n_lo, n_hi, seqlen_q, seqlen_k, shift, scale_log2, softcap, slope,
               window_left, window_right, seed, rng_offset, bh, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
               DOT_PREC: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(n_lo, n_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, start_n, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bm, stride_bn,
            offs_m, offs_d, d_ok, seqlen_q, seqlen_k, shift, scale_log2, softcap, slope, window_left, window_right,
            seed, rng_offset, bh, dropout_p, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE,
            HAS_DROPOUT, MASKED, WINDOWED, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, Bias, Alibi, Rng, CuQ, CuK,
                stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                stride_bb, stride_bh, stride_bm, stride_bn, stride_ab,
                nheads, group, seqlen_q_arg, seqlen_k_arg, scale_log2, softcap, dropout_p, window_left, window_right,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                IS_VARLEN: tl.constexpr, WINDOWED: tl.constexpr, REVERSE_M: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    if REVERSE_M:
        # causal: the longest rows first, so the tail of the grid is short work
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(CuQ, CuK, b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b64 * stride_qb + q_start.to(tl.int64) * stride_qm + h.to(tl.int64) * stride_qh
    k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kn + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vn + hk.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    bias_base = Bias + b64 * stride_bb + h.to(tl.int64) * stride_bh
    slope, seed, rng_offset = head_params(Alibi, Rng, b, h, stride_ab, HAS_ALIBI, HAS_DROPOUT)
    shift = seqlen_k - seqlen_q
    m_end = tl.minimum(m_start + BLOCK_M, seqlen_q)
    lo, full_lo, full_hi, hi = key_range(m_start, m_end, shift, seqlen_k, window_left, window_right, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # masked blocks before the fully visible ones (window's left edge)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bm,
                               stride_bn, offs_m, offs_d, lo, full_lo, seqlen_q, seqlen_k, shift, scale_log2, softcap,
                               slope, window_left, window_right, seed, rng_offset, pid_bh, dropout_p, HEAD_DIM,
                               BLOCK_N, BLOCK_D, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, HAS_DROPOUT, True, WINDOWED,
                               DOT_PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bm,
                               stride_bn, offs_m, offs_d, full_lo, full_hi, seqlen_q, seqlen_k, shift, scale_log2,
                               softcap, slope, window_left, window_right, seed, rng_offset, pid_bh, dropout_p,
                               HEAD_DIM, BLOCK_N, BLOCK_D, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, HAS_DROPOUT, False,
                               WINDOWED, DOT_PREC)
    # masked blocks after them (diagonal of a causal mask, window's right edge, ragged end of the keys)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bm,
                               stride_bn, offs_m, offs_d, full_hi, hi, seqlen_q, seqlen_k, shift, scale_log2, softcap,
                               slope, window_left, window_right, seed, rng_offset, pid_bh, dropout_p, HEAD_DIM,
                               BLOCK_N, BLOCK_D, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, HAS_DROPOUT, True, WINDOWED,
                               DOT_PREC)
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    acc = acc * inv_l[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = O + b64 * stride_ob + q_start.to(tl.int64) * stride_om + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
    tl.store(lse_base + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(O, DO, Delta, CuQ, stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                    stride_lb, stride_lh, nheads, seqlen_q_arg,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        seqlen_q = tl.load(CuQ + b + 1) - q_start
    else:
        q_start = 0
        seqlen_q = seqlen_q_arg
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b64 = b.to(tl.int64)
    o = tl.load(O + b64 * stride_ob + (q_start + offs_m[:, None]).to(tl.int64) * stride_om + h * stride_oh
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + (q_start + offs_m[:, None]).to(tl.int64) * stride_dom + h * stride_doh
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + b64 * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, bias_base,
                    stride_bm, stride_bn, offs_n, offs_d, m_lo, m_hi, seqlen_q, seqlen_k, shift, scale_log2, softcap,
                    slope, window_left, window_right, seed, rng_offset, bh, dropout_p, dq_base, stride_dqm, sm_scale,
                    n_start, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
                    DOT_PREC: tl.constexpr, FUSE_DQ: tl.constexpr):
    # Tiles are key-major here: rows are keys (offs_n), columns are queries (offs_m).
    d_ok = offs_d < HEAD_DIM
    # blocks that every key sees in full hold only rows < seqlen_q: their loads need no mask (when the head dim
    # fills the tile too)
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        if MASKED:
            q_mask = m_ok[:, None] & d_ok[None, :]
        else:
            q_mask = d_ok[None, :]
        bias, live = load_bias_tile(bias_base, offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, stride_bm,
                                    stride_bn, BIAS_TYPE)
        if live:
            if not MASKED and HEAD_DIM == BLOCK_D:
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :])
                do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :])
            else:
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
            if MASKED:
                # rows past the end get lse = +inf, hence p = 0, and contribute nothing
                lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
            else:
                lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
                delta = tl.load(delta_base + offs_m)
            qk_t = mma(k, tl.trans(q), None, DOT_PREC)
            s2, t = score_mod(qk_t, offs_m[None, :], offs_n[:, None], shift, seqlen_k, scale_log2, softcap, slope,
                              bias, window_left, window_right, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, MASKED, WINDOWED)
            p_t = tl.exp2(s2 - lse2[None, :])
            dp_t = mma(v, tl.trans(do), None, DOT_PREC)
            if HAS_DROPOUT:
                keep = tl.trans(dropout_keep(seed, rng_offset, bh, offs_m, n_start, dropout_p, BLOCK_N))
                inv_keep = 1.0 / (1.0 - dropout_p)
                pd_t = tl.where(keep, p_t * inv_keep, 0.0)
                dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
            else:
                pd_t = p_t
            dv = mma(pd_t.to(do.dtype), do, dv, DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - t * t)
            dk = mma(ds_t.to(q.dtype), q, dk, DOT_PREC)
            if FUSE_DQ:
                # this key block's share of dQ, added into the float32 accumulator (FlashAttention-2's atomic dQ)
                dq_part = mma(tl.trans(ds_t.to(k.dtype)), k, None, DOT_PREC) * sm_scale
                if not MASKED and HEAD_DIM == BLOCK_D:
                    tl.atomic_add(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :], dq_part, sem="relaxed")
                else:
                    tl.atomic_add(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :], dq_part,
                                  mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, DQ, Bias, Alibi, Rng, CuQ, CuK,
                     stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                     stride_vh, stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh,
                     stride_dvb, stride_dvn, stride_dvh, stride_lb, stride_lh,
                     stride_bb, stride_bh, stride_bm, stride_bn, stride_ab,
                     nheads, nheads_k, group, seqlen_q_arg, seqlen_k_arg, scale_log2, sm_scale, softcap, dropout_p,
                     window_left, window_right, gsplit, stride_dks, stride_dvs, stride_dqb, stride_dqm, stride_dqh,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     IS_VARLEN: tl.constexpr, WINDOWED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     DOT_PREC: tl.constexpr, FUSE_DQ: tl.constexpr):
    # gsplit > 1: the GQA group's query heads are shared out over gsplit programs per (key block, KV head); each
    # writes its partial dK/dV (float32) at DK/DV + split * stride_dks/dvs, summed afterwards on the host side
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1) // gsplit
    gs = tl.program_id(1) % gsplit
    per = group // gsplit
    b = pid_bhk // nheads_k
    hk = pid_bhk % nheads_k
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(CuQ, CuK, b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN)
    n_start = pid_n * BLOCK_N
    if n_start >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k_row = (k_start + offs_n[:, None]).to(tl.int64)
    k = tl.load(K + b64 * stride_kb + k_row * stride_kn + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + k_row * stride_vn + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    shift = seqlen_k - seqlen_q
    n_end = tl.minimum(n_start + BLOCK_N, seqlen_k)
    lo, full_lo, full_hi, hi = query_range(n_start, n_end, shift, seqlen_q, window_left, window_right, BLOCK_M)
    if n_start + BLOCK_N > seqlen_k:
        # a ragged key block is masked everywhere
        full_lo = hi
        full_hi = hi
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(gs * per, gs * per + per):
        h = hk * group + g
        q_base = Q + b64 * stride_qb + q_start.to(tl.int64) * stride_qm + h.to(tl.int64) * stride_qh
        do_base = DO + b64 * stride_dob + q_start.to(tl.int64) * stride_dom + h.to(tl.int64) * stride_doh
        lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
        delta_base = Delta + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
        bias_base = Bias + b64 * stride_bb + h.to(tl.int64) * stride_bh
        dq_base = DQ + b64 * stride_dqb + q_start.to(tl.int64) * stride_dqm + h.to(tl.int64) * stride_dqh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + b * stride_ab + h)
        bh = b * nheads + h
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 bias_base, stride_bm, stride_bn, offs_n, offs_d, lo, full_lo, seqlen_q, seqlen_k,
                                 shift, scale_log2, softcap, slope, window_left, window_right, seed, rng_offset, bh,
                                 dropout_p, dq_base, stride_dqm, sm_scale, n_start, HEAD_DIM, BLOCK_M, BLOCK_N,
                                 BLOCK_D, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, HAS_DROPOUT, True, WINDOWED,
                                 DOT_PREC, FUSE_DQ)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 bias_base, stride_bm, stride_bn, offs_n, offs_d, full_lo, full_hi, seqlen_q,
                                 seqlen_k, shift, scale_log2, softcap, slope, window_left, window_right, seed,
                                 rng_offset, bh, dropout_p, dq_base, stride_dqm, sm_scale, n_start, HEAD_DIM,
                                 BLOCK_M, BLOCK_N, BLOCK_D, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, HAS_DROPOUT, False,
                                 WINDOWED, DOT_PREC, FUSE_DQ)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 bias_base, stride_bm, stride_bn, offs_n, offs_d, full_hi, hi, seqlen_q, seqlen_k,
                                 shift, scale_log2, softcap, slope, window_left, window_right, seed, rng_offset, bh,
                                 dropout_p, dq_base, stride_dqm, sm_scale, n_start, HEAD_DIM, BLOCK_M, BLOCK_N,
                                 BLOCK_D, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, HAS_DROPOUT, True, WINDOWED,
                                 DOT_PREC, FUSE_DQ)
    dk = dk * sm_scale
    gs64 = gs.to(tl.int64)
    tl.store(DK + gs64 * stride_dks + b64 * stride_dkb + k_row * stride_dkn + hk * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + gs64 * stride_dvs + b64 * stride_dvb + k_row * stride_dvn + hk * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, dbias_acc, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bm,
                  stride_bn, dbias_base, stride_dbm, stride_dbn, offs_m, offs_d, n_lo, n_hi, seqlen_q, seqlen_k,
                  shift, scale_log2, softcap, slope, window_left, window_right, seed, rng_offset, bh, dropout_p,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
                  DBIAS_MODE: tl.constexpr, DOT_PREC: tl.constexpr):
    # DBIAS_MODE: 0 no bias grad, 1 store dS (bias not broadcast), 2 atomically add dS (broadcast bias)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (offs_n < seqlen_k)[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        b_mask = (offs_m < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :]
        bias, live = load_bias_tile(bias_base, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, stride_bm,
                                    stride_bn, BIAS_TYPE)
        if live:
            if not MASKED and HEAD_DIM == BLOCK_D:  # whole key blocks: no mask needed
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :])
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
            else:
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            qk = mma(q, tl.trans(k), None, DOT_PREC)
            s2, t = score_mod(qk, offs_m[:, None], offs_n[None, :], shift, seqlen_k, scale_log2, softcap, slope,
                              bias, window_left, window_right, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, MASKED, WINDOWED)
            p = tl.exp2(s2 - lse2[:, None])
            dp = mma(do, tl.trans(v), None, DOT_PREC)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])
            if DBIAS_MODE == 1:
                tl.store(dbias_base + offs_m[:, None] * stride_dbm + offs_n[None, :] * stride_dbn,
                         ds.to(dbias_base.dtype.element_ty), mask=b_mask)
            if DBIAS_MODE == 2:
                tl.atomic_add(dbias_base + offs_m[:, None] * stride_dbm + offs_n[None, :] * stride_dbn, ds,
                              mask=b_mask)
            if DBIAS_MODE == 3:
                dbias_acc += tl.where(b_mask, ds, 0.0)
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = mma(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq, dbias_acc


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, Bias, DBias, Alibi, Rng, CuQ, CuK,
                   stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                   stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
                   stride_bb, stride_bh, stride_bm, stride_bn, stride_dbb, stride_dbh, stride_dbm, stride_dbn,
                   stride_ab,
                   nheads, group, seqlen_q_arg, seqlen_k_arg, scale_log2, sm_scale, softcap, dropout_p,
                   window_left, window_right,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   IS_VARLEN: tl.constexpr, WINDOWED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DBIAS_MODE: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(CuQ, CuK, b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    q_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_row = (q_start + offs_m[:, None]).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + q_row * stride_qm + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + q_row * stride_dom + h * stride_doh + offs_d[None, :], mask=q_mask,
                 other=0.0)
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
    lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kn + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vn + hk.to(tl.int64) * stride_vh
    bias_base = Bias + b64 * stride_bb + h.to(tl.int64) * stride_bh
    dbias_base = DBias + b64 * stride_dbb + h.to(tl.int64) * stride_dbh
    slope, seed, rng_offset = head_params(Alibi, Rng, b, h, stride_ab, HAS_ALIBI, HAS_DROPOUT)
    shift = seqlen_k - seqlen_q
    m_end = tl.minimum(m_start + BLOCK_M, seqlen_q)
    lo, full_lo, full_hi, hi = key_range(m_start, m_end, shift, seqlen_k, window_left, window_right, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    unused = tl.zeros([1, 1], dtype=tl.float32)
    dq, unused = _bwd_dq_inner(dq, unused, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, bias_base,
                               stride_bm, stride_bn, dbias_base, stride_dbm, stride_dbn, offs_m, offs_d, lo, full_lo,
                               seqlen_q, seqlen_k, shift, scale_log2, softcap, slope, window_left, window_right, seed,
                               rng_offset, pid_bh, dropout_p, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_SOFTCAP, HAS_ALIBI,
                               BIAS_TYPE, HAS_DROPOUT, True, WINDOWED, DBIAS_MODE, DOT_PREC)
    dq, unused = _bwd_dq_inner(dq, unused, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, bias_base,
                               stride_bm, stride_bn, dbias_base, stride_dbm, stride_dbn, offs_m, offs_d, full_lo,
                               full_hi, seqlen_q, seqlen_k, shift, scale_log2, softcap, slope, window_left,
                               window_right, seed, rng_offset, pid_bh, dropout_p, HEAD_DIM, BLOCK_N, BLOCK_D,
                               HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE, HAS_DROPOUT, False, WINDOWED, DBIAS_MODE, DOT_PREC)
    dq, unused = _bwd_dq_inner(dq, unused, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, bias_base,
                               stride_bm, stride_bn, dbias_base, stride_dbm, stride_dbn, offs_m, offs_d, full_hi, hi,
                               seqlen_q, seqlen_k, shift, scale_log2, softcap, slope, window_left, window_right, seed,
                               rng_offset, pid_bh, dropout_p, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_SOFTCAP, HAS_ALIBI,
                               BIAS_TYPE, HAS_DROPOUT, True, WINDOWED, DBIAS_MODE, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + q_row * stride_dqm + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dbias_kernel(Q, K, V, DO, LSE, Delta, Bias, DBias, Alibi, Rng, CuQ, CuK,
                      stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                      stride_vh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
                      stride_bb, stride_bh, stride_bm, stride_bn, stride_dbb, stride_dbh, stride_dbm, stride_dbn,
                      stride_ab,
                      nheads, group, bias_batch_span, bias_head_span, bias_heads, seqlen_q_arg, seqlen_k_arg,
                      scale_log2, softcap, dropout_p, window_left, window_right,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      IS_VARLEN: tl.constexpr, WINDOWED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      ROW_BCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Deterministic gradient of a bias broadcast over batch, heads and/or query rows: one program per tile of
    the bias's own shape sums dS over every (batch, head, row) that shares it, in a fixed order."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2)
    bb = pid_b // bias_heads
    bhh = pid_b % bias_heads
    offs_d = tl.arange(0, BLOCK_D)
    n_start = pid_n * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ROW_BCAST:
        n_mblocks = tl.cdiv(seqlen_q_arg, BLOCK_M)
    else:
        n_mblocks = 1
    for i in range(0, bias_batch_span * bias_head_span):
        b = bb * bias_batch_span + (i // bias_head_span)
        h = bhh * bias_head_span + (i % bias_head_span)
        hk = h // group
        q_start, seqlen_q, k_start, seqlen_k = seq_bounds(CuQ, CuK, b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN)
        b64 = b.to(tl.int64)
        k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kn + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vn + hk.to(tl.int64) * stride_vh
        bias_base = Bias + b64 * stride_bb + h.to(tl.int64) * stride_bh
        slope, seed, rng_offset = head_params(Alibi, Rng, b, h, stride_ab, HAS_ALIBI, HAS_DROPOUT)
        for mb in range(0, n_mblocks):
            offs_m = (pid_m + mb) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seqlen_q
            q_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
            q_row = (q_start + offs_m[:, None]).to(tl.int64)
            q = tl.load(Q + b64 * stride_qb + q_row * stride_qm + h * stride_qh + offs_d[None, :], mask=q_mask,
                        other=0.0)
            do = tl.load(DO + b64 * stride_dob + q_row * stride_dom + h * stride_doh + offs_d[None, :],
                         mask=q_mask, other=0.0)
            lse2 = tl.load(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, mask=m_ok,
                           other=float("inf")) * 1.4426950408889634
            delta = tl.load(Delta + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, mask=m_ok,
                            other=0.0)
            dq_unused = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            dq_unused, acc = _bwd_dq_inner(dq_unused, acc, q, do, lse2, delta, k_base, v_base, stride_kn,
                                           stride_vn, bias_base, stride_bm, stride_bn, DBias, stride_dbm, stride_dbn,
                                           offs_m, offs_d, n_start,
                                           tl.minimum(n_start + BLOCK_N, tl.maximum(seqlen_k, n_start)),
                                           seqlen_q, seqlen_k, seqlen_k - seqlen_q, scale_log2, softcap, slope,
                                           window_left, window_right, seed, rng_offset, b * nheads + h, dropout_p,
                                           HEAD_DIM, BLOCK_N, BLOCK_D, HAS_SOFTCAP, HAS_ALIBI, BIAS_TYPE,
                                           HAS_DROPOUT, True, WINDOWED, 3, DOT_PREC)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    db_base = DBias + bb.to(tl.int64) * stride_dbb + bhh.to(tl.int64) * stride_dbh
    if ROW_BCAST:
        tl.store(db_base + offs_n * stride_dbn, tl.sum(acc, 0).to(DBias.dtype.element_ty), mask=offs_n < seqlen_k_arg)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < seqlen_q_arg)[:, None] & (offs_n < seqlen_k_arg)[None, :]
        tl.store(db_base + offs_m[:, None] * stride_dbm + offs_n[None, :] * stride_dbn,
                 acc.to(DBias.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(Out, Rng, stride_ob, stride_oh, stride_om, nheads, seqlen_q, seqlen_k, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(Rng), tl.load(Rng + 1), pid_bh, offs_m, pid_n * BLOCK_N, dropout_p, BLOCK_N)
    mask = (offs_m < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :]
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_n[None, :],
             keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------


class _Layout:
    """Strides and sizes of the dense (b, s, h, d) or varlen (total, h, d) layout, as the kernels take them."""

    def __init__(self, t: torch.Tensor, varlen: bool):
        if varlen:
            self.sb, self.sm, self.sh = 0, t.stride(0), t.stride(1)
        else:
            self.sb, self.sm, self.sh = t.stride(0), t.stride(1), t.stride(2)

    def strides(self):
        return self.sb, self.sm, self.sh


def _lse_strides(lse: torch.Tensor, varlen: bool):
    # dense lse is (b, h, s); varlen lse is (h, total): batch stride 0, rows offset by cu_seqlens
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _or(t, placeholder):
    # Absent optional tensors are passed as a placeholder pointer that the kernel never dereferences
    # (Triton's interpreter cannot take None for a pointer argument).
    return placeholder if t is None else t


_GLUON = []  # kernels/gluon_attention.py once imported (None where it cannot be), tried once
_GLUON_BROKEN = set()  # "fwd" / "bwd": that Gluon kernel failed to compile with this Triton
# Gluon's API moves between Triton releases: 3.6 (the GPU image) and 3.9 (CI) are the ones tested
GLUON_MIN_TRITON = (3, 6)
_GLUON_ENV = {"fwd": "HF_FLASH_GLUON_FWD", "bwd": "HF_FLASH_GLUON_BWD"}


def _gluon(direction: str):
    """kernels/gluon_attention.py (the warp-specialised Hopper kernels) when its ``direction`` ("fwd" or "bwd")
    kernel can be used here, else None: not under the interpreter, not with ``HF_FLASH_GLUON_FWD=0`` /
    ``HF_FLASH_GLUON_BWD=0``, not with a Triton older than 3.6 or without Gluon's Hopper API (the import is tried
    once), not after that kernel failed to compile here (:func:`_gluon_failed`)."""
    if os.environ.get(_GLUON_ENV[direction], "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if direction in _GLUON_BROKEN:
        return None
    if not _GLUON:
        module = None
        if _version(triton.__version__) >= GLUON_MIN_TRITON:
            try:
                from hf_flash.kernels import gluon_attention as module
            except (ImportError, AttributeError):
                module = None
        _GLUON.append(module)
    return _GLUON[0]


def _gluon_forward():
    return _gluon("fwd")


def _gluon_backward():
    return _gluon("bwd")


def _version(text: str) -> tuple:
    """(major, minor) of a version string such as "3.6.0", "3.10.0+git1234" or "3.7.0rc1"."""
    import re

    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _gluon_failed(err: Exception, direction: str = "fwd") -> None:
    """A Gluon kernel did not compile with this Triton: warn once, use the Triton kernel from now on."""
    import warnings

    _GLUON_BROKEN.add(direction)
    name = "forward" if direction == "fwd" else "backward"
    warnings.warn(f"hf_flash: the Hopper (Gluon) attention {name} did not compile with triton {triton.__version__} "
                  f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); using the Triton {name} "
                  f"(set {_GLUON_ENV[direction]}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)


# what a Gluon API this kernel does not match raises while compiling (before anything runs on the GPU)
_GLUON_COMPILE_ERRORS = (CompilationError, AttributeError, TypeError, NotImplementedError)


def fused_dq_enabled() -> bool:
    """dQ from the dK/dV kernel: each key block's share of dQ is added into a float32 accumulator with atomics
    (FlashAttention-2's backward: 5 matrix products per tile pair instead of the 7 of a separate dQ pass, which
    recomputes QK^T and dO V^T), and the dQ kernel does not run. The default (as in flash-attn, whose dQ is also
    accumulated with atomics): forward + backward measured 1.16x faster than with the two-kernel backward for
    causal GQA at 16k and 1.10x for multi-head attention at 4k, and, with the GQA split, 1.18x for batch-1 GQA at
    4k (H200, benchmarks/NOTES.md). Not bitwise deterministic, so ``deterministic=True``,
    ``torch.use_deterministic_algorithms(True)`` and bias gradients keep the two-kernel backward;
    ``HF_FLASH_BWD_FUSED_DQ=0`` forces it."""
    return os.environ.get("HF_FLASH_BWD_FUSED_DQ", "1") != "0"


def gqa_split(batch: int, nheads_k: int, group: int, n_blocks_k: int, device: torch.device) -> int:
    """Programs per (key block, KV head) in the dK/dV kernel: each takes group / split of the GQA group's query
    heads. ``HF_FLASH_BWD_GQA_SPLIT``: ``auto`` (default) splits only as far as needed for the grid to cover the
    GPU about four times (batch-1 GQA training has few, long programs: 256 for a 4k Llama-3-8B layer on 132 SMs;
    with the fused dQ this measured 1.18x faster there, and it changes nothing at 16k, where the grid is large);
    ``1`` one program loops over the whole group; an integer that divides the group splits it that many ways.
    The split costs float32 partials of dK/dV and their sum."""
    mode = os.environ.get("HF_FLASH_BWD_GQA_SPLIT", "auto").strip().lower()
    if group <= 1 or mode in ("", "1", "0"):
        return 1
    if mode == "auto":
        sms = configs.num_sms(device)
        for s in range(1, group + 1):
            if group % s == 0 and batch * nheads_k * n_blocks_k * s >= 4 * sms:
                return s
        return group
    try:
        s = int(mode)
    except ValueError:
        s = 0
    if s < 1 or group % s:
        raise ValueError(f"HF_FLASH_BWD_GQA_SPLIT={mode!r}: takes 1, 'auto' or a divisor of the GQA group "
                         f"({group} query heads per KV head here)")
    return s


def _window_args(left: int, right: int):
    windowed = left >= 0 or right >= 0
    return (left if left >= 0 else UNBOUNDED), (right if right >= 0 else UNBOUNDED), windowed


def _bcast_strides(t):
    # dimensions of size 1 are read with stride 0: the bias is never expanded in memory
    return tuple(st if sz > 1 else 0 for st, sz in zip(t.stride(), t.shape))


def _bias_args(bias):
    if bias is None:
        return None, 0, (0, 0, 0, 0)
    return bias, (2 if bias.dtype == torch.bool else 1), _bcast_strides(bias)


def _alibi_args(alibi, q):
    if alibi is None:
        return None, 0
    return alibi, (alibi.stride(0) if alibi.dim() == 2 else 0)


def _scale_arg(softmax_scale: float, softcap: float) -> float:
    # score_mod takes the plain scale when softcap is on (tanh needs natural units), else scale * log2(e)
    return softmax_scale if softcap > 0 else softmax_scale * LOG2E


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, rng, dropout_p,
            softmax_scale, window_left, window_right, softcap):
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        _, nheads, head_dim = q.shape
        nheads_k = k.shape[1]
    else:
        batch, _, nheads, head_dim = q.shape
        nheads_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((nheads, q.shape[0]) if varlen else (batch, nheads, q.shape[1]), dtype=torch.float32,
                      device=q.device)
    if q.numel() == 0 or batch == 0 or max_seqlen_q == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    left, right, windowed = _window_args(window_left, window_right)
    gluon = _gluon_forward()
    other_window = windowed and (left != UNBOUNDED or right != 0)  # a window that is not plain causal
    if gluon is not None and gluon.supported(
            q, k, v, causal=windowed, varlen=varlen, has_bias=bias is not None, has_alibi=alibi_slopes is not None,
            dropout_p=dropout_p, softcap=softcap, windowed_other_than_causal=other_window, seqlen_q=max_seqlen_q,
            seqlen_k=max_seqlen_k):
        # the warp-specialised Hopper forward (kernels/gluon_attention.py); same outputs and conventions
        try:
            gluon.forward(q, k, v, windowed, softmax_scale, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k)
        except _GLUON_COMPILE_ERRORS as err:
            _gluon_failed(err)
        else:
            launches["fwd"] += 1
            launches["fwd_gluon"] += 1
            return out, lse
    bias_t, bias_type, bias_strides = _bias_args(bias)
    alibi_t, stride_ab = _alibi_args(alibi_slopes, q)
    cfg = configs.fwd_config(head_dim, q.dtype, q.device, max_seqlen_q, max_seqlen_k, batch * nheads)
    grid = (cdiv(max_seqlen_q, cfg.block_m), batch * nheads)
    _fwd_kernel[grid](
        q, k, v, out, lse, _or(bias_t, lse), _or(alibi_t, lse), _or(rng, lse), _or(cu_seqlens_q, lse),
        _or(cu_seqlens_k, lse),
        *_Layout(q, varlen).strides(), *_Layout(k, varlen).strides(), *_Layout(v, varlen).strides(),
        *_Layout(out, varlen).strides(), *_lse_strides(lse, varlen), *bias_strides, stride_ab,
        nheads, nheads // nheads_k, max_seqlen_q, max_seqlen_k, _scale_arg(softmax_scale, softcap), softcap,
        dropout_p, left, right,
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=configs.padded_head_dim(head_dim),
        IS_VARLEN=varlen, WINDOWED=windowed, REVERSE_M=windowed and right == 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, BIAS_TYPE=bias_type,
        HAS_DROPOUT=dropout_p > 0, DOT_PREC=dot_precision(q.dtype, q.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    launches["fwd"] += 1
    return out, lse


def dbias_shape(bias):
    return tuple(bias.shape)


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes,
             rng, dropout_p, softmax_scale, window_left, window_right, softcap, deterministic, bias_needs_grad):
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        _, nheads, head_dim = q.shape
        nheads_k = k.shape[1]
    else:
        batch, _, nheads, head_dim = q.shape
        nheads_k = k.shape[2]
    group = nheads // nheads_k
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    bias_t, bias_type, bias_strides = _bias_args(bias)
    dbias = q.new_empty((0,))
    dbias_mode = 0
    dbias_buf = None
    reduce = False
    if bias_needs_grad:
        # a bias broadcast over batch, heads or query rows gets the sum of dS over them
        reduce = bias.shape[0] < batch or bias.shape[1] < nheads or bias.shape[2] < max_seqlen_q
        if reduce:
            dbias_mode = 0 if deterministic else 2
            dbias_buf = torch.zeros(bias.shape, dtype=torch.float32, device=q.device)
        else:
            dbias_mode = 1
            dbias_buf = torch.zeros(bias.shape, dtype=bias.dtype, device=q.device)
    dbias_strides = _bcast_strides(dbias_buf) if dbias_buf is not None else (0, 0, 0, 0)
    if q.numel() == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        return dq, dk, dv, (dbias_buf.to(bias.dtype) if dbias_buf is not None else dbias)
    left, right, windowed = _window_args(window_left, window_right)
    alibi_t, stride_ab = _alibi_args(alibi_slopes, q)
    cfg = configs.bwd_config(head_dim, q.dtype, q.device, max_seqlen_q, max_seqlen_k)
    block_d = configs.padded_head_dim(head_dim)
    delta = torch.empty_like(lse)
    lse_strides = _lse_strides(lse, varlen)
    bias_t, alibi_t, rng, cu_q, cu_k = (_or(t, lse) for t in (bias_t, alibi_t, rng, cu_seqlens_q, cu_seqlens_k))
    _bwd_preprocess[(cdiv(max_seqlen_q, cfg.block_m), batch * nheads)](
        out, dout, delta, cu_q, *_Layout(out, varlen).strides(), *_Layout(dout, varlen).strides(),
        *lse_strides, nheads, max_seqlen_q, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_D=block_d, IS_VARLEN=varlen)
    fuse_dq = (fused_dq_enabled() and not deterministic and not bias_needs_grad
               and not torch.are_deterministic_algorithms_enabled())
    gluon = _gluon_backward() if fuse_dq else None
    if gluon is not None and gluon.supported_backward(
            q, k, v, dout, causal=windowed, varlen=varlen, has_bias=bias is not None,
            has_alibi=alibi_slopes is not None, dropout_p=dropout_p, softcap=softcap,
            windowed_other_than_causal=windowed and (left != UNBOUNDED or right != 0), seqlen_q=max_seqlen_q,
            seqlen_k=max_seqlen_k):
        # the warp-specialised Hopper backward (kernels/gluon_attention.py): dQ with atomics, as the fused path
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        try:
            dk, dv = gluon.backward(dout, q, k, v, lse, delta, windowed, softmax_scale, dq_acc,
                                    split=gluon.backward_split(batch, nheads_k, group, max_seqlen_k, q.device),
                                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                    max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
        except _GLUON_COMPILE_ERRORS as err:
            _gluon_failed(err, "bwd")
        else:
            launches["bwd_gluon"] += 1
            return dq_acc.to(q.dtype), dk, dv, dbias
    common = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, IS_VARLEN=varlen,
                  WINDOWED=windowed, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, BIAS_TYPE=bias_type,
                  HAS_DROPOUT=dropout_p > 0, DOT_PREC=dot_precision(q.dtype, q.device), num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    scale_arg = _scale_arg(softmax_scale, softcap)
    ql, kl, vl, dol = (_Layout(t, varlen).strides() for t in (q, k, v, dout))
    n_blocks_k = cdiv(max_seqlen_k, cfg.block_n)
    gsplit = gqa_split(batch, nheads_k, group, n_blocks_k, q.device)
    if gsplit > 1:  # float32 partials, one per share of the group, summed below
        dk_out = torch.empty((gsplit,) + tuple(k.shape), dtype=torch.float32, device=k.device)
        dv_out = torch.empty((gsplit,) + tuple(v.shape), dtype=torch.float32, device=v.device)
        dk_layout, dv_layout = _Layout(dk_out[0], varlen).strides(), _Layout(dv_out[0], varlen).strides()
        split_strides = (dk_out.stride(0), dv_out.stride(0))
    else:
        dk_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv_out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dk_layout, dv_layout = _Layout(dk_out, varlen).strides(), _Layout(dv_out, varlen).strides()
        split_strides = (0, 0)
    if fuse_dq:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dq_strides = _Layout(dq_acc, varlen).strides()
    else:
        dq_acc, dq_strides = lse, (0, 0, 0)
    _bwd_dkdv_kernel[(n_blocks_k, batch * nheads_k * gsplit)](
        q, k, v, dout, lse, delta, dk_out, dv_out, dq_acc, bias_t, alibi_t, rng, cu_q, cu_k,
        *ql, *kl, *vl, *dol, *dk_layout, *dv_layout, *lse_strides,
        *bias_strides, stride_ab, nheads, nheads_k, group, max_seqlen_q, max_seqlen_k, scale_arg, softmax_scale,
        softcap, dropout_p, left, right, gsplit, *split_strides, *dq_strides, FUSE_DQ=fuse_dq,
        **common)
    launches["bwd_dkdv"] += 1
    dk, dv = dk_out, dv_out
    if gsplit > 1:
        dk, dv = dk_out.sum(0).to(k.dtype), dv_out.sum(0).to(v.dtype)
        launches["bwd_dkdv_gqa_split"] += 1
    if fuse_dq:
        launches["bwd_fused_dq"] += 1
        return dq_acc.to(q.dtype), dk, dv, dbias
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _bwd_dq_kernel[(cdiv(max_seqlen_q, cfg.block_m), batch * nheads)](
        q, k, v, dout, lse, delta, dq, bias_t, _or(dbias_buf, lse), alibi_t, rng, cu_q, cu_k,
        *ql, *kl, *vl, *dol, *_Layout(dq, varlen).strides(), *lse_strides, *bias_strides, *dbias_strides, stride_ab,
        nheads, group, max_seqlen_q, max_seqlen_k, scale_arg, softmax_scale, softcap, dropout_p, left, right,
        DBIAS_MODE=dbias_mode, **common)
    launches["bwd_dq"] += 1
    if bias_needs_grad and reduce and deterministic:
        bias_batch, bias_heads, bias_rows = bias.shape[0], bias.shape[1], bias.shape[2]
        row_bcast = bias_rows < max_seqlen_q
        grid = (1 if row_bcast else cdiv(max_seqlen_q, cfg.block_m), cdiv(max_seqlen_k, cfg.block_n),
                bias_batch * bias_heads)
        _bwd_dbias_kernel[grid](
            q, k, v, dout, lse, delta, bias_t, dbias_buf, alibi_t, rng, cu_q, cu_k,
            *ql, *kl, *vl, *dol, *lse_strides, *bias_strides, *dbias_strides, stride_ab,
            nheads, group, batch // bias_batch, nheads // bias_heads, bias_heads, max_seqlen_q, max_seqlen_k,
            scale_arg, softcap, dropout_p, left, right, ROW_BCAST=row_bcast, **common)
        launches["bwd_dbias"] += 1
    if dbias_buf is not None:
        dbias = dbias_buf.to(bias.dtype)
    return dq, dk, dv, dbias


def dropout_keep_mask(rng, dropout_p, batch, nheads, seqlen_q, seqlen_k):
    out = torch.empty((batch, nheads, seqlen_q, seqlen_k), dtype=torch.int8, device=rng.device)
    block = 32
    grid = (cdiv(seqlen_q, block), cdiv(seqlen_k, block), batch * nheads)
    _dropout_mask_kernel[grid](out, rng, out.stride(0), out.stride(1), out.stride(2), nheads, seqlen_q, seqlen_k,
                               dropout_p, BLOCK_M=block, BLOCK_N=block)
    return out.bool()
