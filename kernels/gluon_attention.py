"""FlashAttention-3-style forward and backward for Hopper (sm_90), written in Gluon (Triton's lower-level dialect).

Why a second forward: Triton's ``tl.dot`` on Hopper waits for every wgmma whose result is not a loop-carried
accumulator right after issuing it (read in the compiled kernels: ``warp_group_dot_wait {pendings = 0}`` after the
Q K^T product), so the softmax of one key block can never overlap a matrix product of the same warps, and warp
specialisation is out of reach from ``tl``. Gluon exposes both. This kernel uses, per CTA of 2 x 64 query rows:

* a one-warp producer partition that streams K / V blocks (TMA, 4-D descriptors on the caller's strided
  (batch, seqlen, heads, dim) tensors, so rows past a sequence's end come back as zeros) into a ring of
  ``STAGES`` shared-memory slots, with a "full" and an "empty" mbarrier per slot;
* two consumer partitions of one warpgroup each, 64 query rows each, not synchronised with each other, so one's
  softmax runs while the other's wgmma do (FlashAttention-3's ping-pong, left to the warp schedulers);
* inside each consumer, FlashAttention-3's intra-warpgroup overlap: block j+1's S = Q K^T is issued before block
  j's O += P V, and block j+1's softmax runs while that P V is in flight;
* registers moved from the producer to the consumers (``setmaxnreg``: 24 / 240).

Measured on an H100 (bf16, head dim 128, causal, GPU time per call; benchmarks/NOTES.md): 32k 13.6 ms against
cuDNN's 14.1 and this project's Triton forward's 17.0; 16k 3.43 / 3.31 / 4.51.

Scope (``supported`` says where it runs; everything else takes the Triton kernel in kernels/attention.py): CUDA
capability 9.0, float16 / bfloat16, head dim 128, no bias, ALiBi, softcap, dropout or sliding window (causal or
not), dense with seqlen_q <= seqlen_k when causal, or varlen (packed sequences, read as one batch of packed rows:
the rows TMA brings in past a sequence's end belong to the next sequence and are masked; a program whose rows see
no key takes one fully masked block and writes output 0, lse +inf), strides that TMA accepts (multiples of 16
bytes, 16-byte aligned base). The output and the log-sum-exp follow kernels/attention.py's
conventions, so its backward takes them as they are. Gluon has no CPU interpreter: CI compiles these kernels for
sm_90 (tests/test_compile_sm90.py), the GPU tests run them (tests/test_gluon_attention.py).

The backward (:func:`backward`, same scope; kernels/attention.py sends it the calls whose dQ may be added with
atomics, i.e. not deterministic ones) is the same pattern turned around, FlashAttention-2 / 3's dK/dV-major loop:

* one CTA per (key block of 128, batch, KV head, share of the GQA group); its K / V block stays in shared memory and
  it loops over the group's query heads and their query blocks of 64 (the "items");
* a one-warp producer streams each item's Q and dO blocks (TMA) into a ring of ``BWD_STAGES`` slots;
* two consumer warpgroups own 64 keys each, with dK / dV accumulating in registers. Per item: S = Q K^T and
  dP = dO V^T issued together, P computed while dP runs, dV += P^T dO and dK += dS^T Q issued asynchronously
  (P and dS through shared memory), then dQ = dS K, each warpgroup computing half of its columns from both
  warpgroups' dS;
* a two-warp dQ writer partition takes each item's dQ from shared memory and adds it into a float32 buffer with
  vector atomics (as in flash-attn), so the consumers do not wait on the atomics (with the consumers issuing
  them, the backward measured 1.08x slower at 16k GQA and 1.55x for MHA at 2 x 8k);
* the grid launches every (batch, head) of a key block before the next key block, so under a causal mask the
  longest programs start first.

Measured on an H100 (bf16, head dim 128, causal, GPU time of the whole backward; benchmarks/NOTES.md): batch 1,
32 / 8 heads, 16k 13.9 ms against cuDNN's 11.1 and the Triton backward's 16.0; 4k 1.30 / 0.79 / 1.54; MHA, batch 2,
8k 7.3 / 5.6 / 7.8. The dQ reduction is what keeps it behind cuDNN (without it the kernel measured 10.4 ms at 16k).
"""

from __future__ import annotations

import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the dense / varlen stride conventions of the Triton kernels (this module is imported from that one, lazily)
from hf_flash.kernels.attention import _Layout, _lse_strides
from hf_flash.kernels.configs import cdiv

# names that moved between Triton releases (3.6 on the GPU image, 3.9 in CI)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # a partition's warps (bar.sync id, 128)

BLOCK_M = 64  # query rows per consumer warpgroup (a CTA holds two)
BLOCK_N = 128
STAGES = 2
HEAD_DIM = 128
REGS = (240, 24)  # consumer, producer (setmaxnreg)

@gluon.jit
def _softmax_step(s, m_i, l_i, n_start, offs_m, offs_n, seqlen_k, shift, qk_scale, MASKED: gl.constexpr,
                  CAUSAL: gl.constexpr):
    """Online softmax of one block of scores (exp2 domain): (p, alpha, new max, new sum)."""
    if MASKED:
        cols = n_start + offs_n
        ok = gl.expand_dims(cols < seqlen_k, 0)
        if CAUSAL:
            ok = ok & (gl.expand_dims(cols, 0) <= gl.expand_dims(offs_m + shift, 1))
        s = gl.where(ok, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        # a row that has seen only masked keys keeps a finite reference, so exp2 gives 0, not NaN
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_ref = m_new
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_ref, 1))
    alpha = gl.exp2(m_i - m_ref)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _release_ring(k_full, v_full, k_empty, v_empty, start, stop, NSTAGES: gl.constexpr):
    """Follow the K / V ring over blocks [start, stop) without reading them: wait for each slot, then release it."""
    for j in range(start, stop):
        st = j % NSTAGES
        ph = (j // NSTAGES) & 1
        mbarrier.wait(k_full.index(st), ph)
        mbarrier.arrive(k_empty.index(st))
        mbarrier.wait(v_full.index(st), ph)
        mbarrier.arrive(v_empty.index(st))


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, k_full, v_full, k_empty, v_empty, O, LSE, b, h, q_off, m_start,
              stride_ob, stride_om, stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, n_blocks, n_total, n_full,
              shift, qk_scale, HEAD_D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, NSTAGES: gl.constexpr,
              CAUSAL: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    col_o: gl.constexpr = gl.SliceLayout(0, mma_o)
    q = q_smem.reshape([BM, HEAD_D])
    offs_m = m_start + gl.arange(0, BM, layout=row_s)
    offs_n = gl.arange(0, BN, layout=col_s)
    zero_s = gl.zeros([BM, BN], gl.float32, layout=mma_s)
    acc = gl.zeros([BM, HEAD_D], gl.float32, layout=mma_o)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BM], gl.float32, layout=row_s)

    # block 0: S = Q K^T, then its softmax
    mbarrier.wait(k_full.index(0), 0)
    k0 = k_smem.index(0).reshape([BN, HEAD_D])
    s_tok = warpgroup_mma(q, k0.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s_tok, q, k0])[0]
    mbarrier.arrive(k_empty.index(0))
    if n_full > 0:
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, offs_m, offs_n, seqlen_k, shift, qk_scale, False, CAUSAL)
    else:
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, offs_m, offs_n, seqlen_k, shift, qk_scale, True, CAUSAL)
    for j in range(0, n_blocks - 1):
        st = j % NSTAGES
        nst = (j + 1) % NSTAGES
        # block j+1's S first, then block j's P V: S completes first and its softmax overlaps the P V
        mbarrier.wait(k_full.index(nst), ((j + 1) // NSTAGES) & 1)
        kn = k_smem.index(nst).reshape([BN, HEAD_D])
        s_tok = warpgroup_mma(q, kn.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_full.index(st), (j // NSTAGES) & 1)
        vj = v_smem.index(st).reshape([BN, HEAD_D])
        o_tok = warpgroup_mma(p_op, vj, acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok, kn])[0]
        mbarrier.arrive(k_empty.index(nst))
        n_start = (j + 1) * BN
        if j + 1 < n_full:
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, n_start, offs_m, offs_n, seqlen_k, shift, qk_scale,
                                               False, CAUSAL)
        else:
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, n_start, offs_m, offs_n, seqlen_k, shift, qk_scale,
                                               True, CAUSAL)
        acc = warpgroup_mma_wait(0, deps=[o_tok, vj])[0]
        mbarrier.arrive(v_empty.index(st))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    last = n_blocks - 1
    lst = last % NSTAGES
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    mbarrier.wait(v_full.index(lst), (last // NSTAGES) & 1)
    vl = v_smem.index(lst).reshape([BN, HEAD_D])
    o_tok = warpgroup_mma(p_op, vl, acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[o_tok, vl])[0]
    mbarrier.arrive(v_empty.index(lst))
    # blocks the other consumer still reads (its rows see more keys under a causal mask): follow the ring without
    # reading them, so each slot's "empty" barrier still gets its two arrivals
    _release_ring(k_full, v_full, k_empty, v_empty, n_blocks, n_total, NSTAGES)

    empty = l_i == 0.0
    inv_l = gl.where(empty, 0.0, 1.0 / gl.where(empty, 1.0, l_i))
    lse = gl.where(empty, float("inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    acc = acc * gl.expand_dims(gl.convert_layout(inv_l, row_o), 1)
    rows = m_start + gl.arange(0, BM, layout=row_o)
    cols = gl.arange(0, HEAD_D, layout=col_o)
    # rows are this sequence's; q_off is where it starts in the tensor (varlen: the packed rows)
    o_ptrs = (O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
              + gl.expand_dims((q_off + rows).to(gl.int64) * stride_om, 1) + gl.expand_dims(cols, 0))
    gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(rows < seqlen_q, 1))
    lse_ptrs = LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_off + offs_m
    gl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_full, v_full, k_empty, v_empty, b, hk, k_off, n_blocks,
              BN: gl.constexpr, HEAD_D: gl.constexpr, NSTAGES: gl.constexpr):
    KV_BYTES: gl.constexpr = BN * HEAD_D * 2
    for j in range(0, n_blocks):
        st = j % NSTAGES
        ph = ((j // NSTAGES) & 1) ^ 1  # the release of this slot's previous block
        again = j >= NSTAGES
        mbarrier.wait(k_empty.index(st), ph, pred=again)
        mbarrier.expect(k_full.index(st), KV_BYTES)
        _tma_load(k_desc, [b, k_off + j * BN, hk, 0], k_full.index(st), k_smem.index(st))
        mbarrier.wait(v_empty.index(st), ph, pred=again)
        mbarrier.expect(v_full.index(st), KV_BYTES)
        _tma_load(v_desc, [b, k_off + j * BN, hk, 0], v_full.index(st), v_smem.index(st))


@gluon.jit
def _fwd_ws_kernel(q_desc, k_desc, v_desc, O, LSE, CuQ, CuK, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                   nheads, group, seqlen_q, seqlen_k, qk_scale, HEAD_D: gl.constexpr, BM: gl.constexpr,
                   BN: gl.constexpr, NSTAGES: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m  # the longest rows first: the grid's tail is short work
    pid_bh = gl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group
    m0 = pid_m * 2 * BM
    q_off = 0
    k_off = 0
    if VARLEN:  # packed sequences (batch 1 in the descriptors): this one's rows and lengths
        q_off = gl.load(CuQ + b)
        seqlen_q = gl.load(CuQ + b + 1) - q_off
        k_off = gl.load(CuK + b)
        seqlen_k = gl.load(CuK + b + 1) - k_off
        b = 0
    if m0 >= seqlen_q:
        return
    shift = seqlen_k - seqlen_q
    n_hi = seqlen_k
    n_hi0 = seqlen_k
    n_full0 = seqlen_k // BN
    n_full1 = seqlen_k // BN
    if CAUSAL:
        n_hi = gl.minimum(seqlen_k, m0 + 2 * BM + shift)
        n_hi0 = gl.minimum(seqlen_k, m0 + BM + shift)
        n_full0 = gl.minimum(n_full0, (m0 + shift + 1) // BN)
        n_full1 = gl.minimum(n_full1, (m0 + BM + shift + 1) // BN)
    # at least one block: a row that sees no key (an empty key sequence, a causal row before the keys start)
    # takes block 0 fully masked and ends with output 0 and lse +inf
    n_blocks = gl.maximum(gl.cdiv(n_hi, BN), 1)
    n_blocks0 = gl.maximum(gl.cdiv(n_hi0, BN), 1)

    q_smem = gl.allocate_shared_memory(dtype, [2, 1, BM, 1, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NSTAGES, 1, BN, 1, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NSTAGES, 1, BN, 1, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NSTAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    mbarrier.expect(q_bar, 2 * BM * HEAD_D * 2)
    _tma_load(q_desc, [b, q_off + m0, h, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [b, q_off + m0 + BM, h, 0], q_bar, q_smem.index(1))
    mbarrier.wait(q_bar, 0)
    gl.warp_specialize([
        (_consumer, (q_smem.index(0), k_smem, v_smem, k_full, v_full, k_empty, v_empty, O, LSE, b, h, q_off, m0,
                     stride_ob, stride_om, stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, n_blocks0, n_blocks,
                     n_full0, shift, qk_scale, HEAD_D, BM, BN, NSTAGES, CAUSAL)),
        (_consumer, (q_smem.index(1), k_smem, v_smem, k_full, v_full, k_empty, v_empty, O, LSE, b, h, q_off,
                     m0 + BM, stride_ob, stride_om, stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, n_blocks,
                     n_blocks, n_full1, shift, qk_scale, HEAD_D, BM, BN, NSTAGES, CAUSAL)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_full, v_full, k_empty, v_empty, b, hk, k_off, n_blocks, BN,
                     HEAD_D, NSTAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------

BWD_BLOCK_M = 64  # query rows per item (the producer streams Q and dO blocks of this size)
BWD_BLOCK_N = 128  # keys per CTA, 64 per consumer warpgroup
BWD_STAGES = 2
BWD_WRITER_REGS = 32  # the dQ writer warps (setmaxnreg is per warpgroup: the producer and the writer share one, which
# gets what two 240-register consumer warpgroups leave: 65536 / 128 - 2 x 240 = 32)


@gluon.jit
def _bwd_consumer(q_smem, do_smem, k_all, v_all, ds_all, p_all, dq_smem, ds_bar, full, empty, dq_full, dq_empty,
                  LSE, Delta, DK, DV, q_off, k_off,
                  b, hk, group, g_lo, n_items_per_head, n_items, n_start, wg, seqlen_q, seqlen_k, m_lo,
                  shift, scale_log2, sm_scale, stride_lb, stride_lh, stride_dkb, stride_dkn, stride_dkh,
                  stride_dvb, stride_dvn, stride_dvh, HEAD_D: gl.constexpr, BM: gl.constexpr, WN: gl.constexpr,
                  NSTAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """One warpgroup's 64 keys: dK / dV accumulate in registers over the (head, query block) items. S = Q K^T and
    dP = dO V^T are (queries) x (keys) tiles, so each thread holds 2 rows' lse and delta (transposed tiles would
    need 32 registers for them, and spilled); P and dS go through shared memory as the A operands of dV and dK."""
    dtype: gl.constexpr = q_smem.dtype
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, WN, 16])
    mma_kv: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, HEAD_D, 16])
    mma_q: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, HEAD_D // 2, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
    row_kv: gl.constexpr = gl.SliceLayout(1, mma_kv)
    col_kv: gl.constexpr = gl.SliceLayout(0, mma_kv)
    key0 = n_start + wg * WN
    k_full = k_all.reshape([2 * WN, HEAD_D])
    k_w = k_full.slice(wg * WN, WN, dim=0)
    v_w = v_all.reshape([2 * WN, HEAD_D]).slice(wg * WN, WN, dim=0)
    k_cols = k_full.slice(wg * (HEAD_D // 2), HEAD_D // 2, dim=1)  # this warpgroup's half of dQ's columns
    p_w = p_all.index(wg)
    offs_k = key0 + gl.arange(0, WN, layout=col_s)
    zero_s = gl.zeros([BM, WN], gl.float32, layout=mma_s)
    zero_q = gl.zeros([BM, HEAD_D // 2], gl.float32, layout=mma_q)
    dk = gl.zeros([WN, HEAD_D], gl.float32, layout=mma_kv)
    dv = gl.zeros([WN, HEAD_D], gl.float32, layout=mma_kv)
    dq_w = dq_smem.index(wg)
    for it in range(0, n_items):
        h = hk * group + g_lo + it // n_items_per_head
        m0 = (m_lo + it % n_items_per_head) * BM
        st = it % NSTAGES
        offs_m = m0 + gl.arange(0, BM, layout=row_s)
        row_ok = offs_m < seqlen_q
        stats = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_off
        # rows past seqlen_q (zeros from TMA, or the next packed sequence's): lse = +inf gives P = 0
        lse2 = gl.load(LSE + stats + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = gl.load(Delta + stats + offs_m, mask=row_ok, other=0.0)
        mbarrier.wait(full.index(st), (it // NSTAGES) & 1)
        q = q_smem.index(st).reshape([BM, HEAD_D])
        do = do_smem.index(st).reshape([BM, HEAD_D])
        # S and dP issued together; P is computed while dP runs
        s_tok = warpgroup_mma(q, k_w.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v_w.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok, q, k_w])[0]
        x = s * scale_log2 - gl.expand_dims(lse2, 1)
        if CAUSAL:
            if m0 + shift < key0 + WN - 1:  # on the diagonal: keys after a query's position are masked
                ok = gl.expand_dims(offs_k, 0) <= gl.expand_dims(offs_m + shift, 1)
                x = gl.where(ok, x, float("-inf"))
        else:
            if key0 + WN > seqlen_k:  # keys past the sequence (zeros from TMA, or the next packed sequence's)
                x = gl.where(gl.expand_dims(offs_k < seqlen_k, 0), x, float("-inf"))
        p = gl.exp2(x)
        p_w.store(p.to(dtype))
        fence_async_shared()
        _thread_barrier()  # every row of P stored before the wgmma reads it
        dv_tok = warpgroup_mma(p_w.permute((1, 0)), do, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=[dp_tok, do, v_w])[0]
        ds = (p * (dp - gl.expand_dims(delta, 1))).to(dtype)
        # dQ = dS K over both warpgroups' keys: each stores its columns of dS and waits for the other's, then
        # computes half of dQ's columns. Double-buffered: passing item it's barrier means both finished item it-1.
        ds_buf = ds_all.index(it % 2)
        ds_w = ds_buf.slice(wg * WN, WN, dim=1)
        ds_w.store(ds)
        fence_async_shared()
        mbarrier.arrive(ds_bar)
        mbarrier.wait(ds_bar, it & 1)
        dk_tok = warpgroup_mma(ds_w.permute((1, 0)), q, dk, is_async=True)
        dq_tok = warpgroup_mma(ds_buf, k_cols, zero_q, use_acc=False, is_async=True)
        done = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok, p_w, ds_buf])
        dv = done[0]
        dk = done[1]
        dq = done[2]
        mbarrier.arrive(empty.index(st))
        # dQ goes to the writer partition through shared memory (once it has drained the previous item's)
        mbarrier.wait(dq_empty.index(wg), (it & 1) ^ 1, pred=it > 0)
        dq_w.store(dq * sm_scale)
        mbarrier.arrive(dq_full.index(wg))
    # rows past seqlen_k are not stored
    krows = key0 + gl.arange(0, WN, layout=row_kv)
    cols = gl.expand_dims(gl.arange(0, HEAD_D, layout=col_kv), 0)
    kmask = gl.expand_dims(krows < seqlen_k, 1)
    krows64 = gl.expand_dims((k_off + krows).to(gl.int64), 1)
    dk_ptr = DK + b.to(gl.int64) * stride_dkb + hk.to(gl.int64) * stride_dkh + krows64 * stride_dkn + cols
    dv_ptr = DV + b.to(gl.int64) * stride_dvb + hk.to(gl.int64) * stride_dvh + krows64 * stride_dvn + cols
    gl.store(dk_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    gl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=kmask)


@gluon.jit
def _bwd_dq_writer(dq_smem, dq_full, dq_empty, DQ, b, hk, group, g_lo, m_lo, n_items_per_head, n_items, q_off,
                   seqlen_q,
                   stride_dqb, stride_dqm, stride_dqh, BM: gl.constexpr, HEAD_D: gl.constexpr,
                   WARPS: gl.constexpr):
    """Warps that add each item's dQ (both consumers' halves of its columns, from shared memory) into the float32
    buffer with vector atomics, so the consumers do not wait on the atomics' memory traffic."""
    # rows per load, the swizzle pattern's height: 8 values per thread with 2 warps (unrolled; the writer warps
    # have 32 registers per thread)
    ROWS: gl.constexpr = 8
    HALF: gl.constexpr = HEAD_D // 2
    layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[2, 16],
                                            warps_per_cta=[WARPS, 1], order=[1, 0])
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, HALF, layout=gl.SliceLayout(0, layout))
    for it in range(0, n_items):
        h = hk * group + g_lo + it // n_items_per_head
        m0 = (m_lo + it % n_items_per_head) * BM
        base = DQ + b.to(gl.int64) * stride_dqb + h.to(gl.int64) * stride_dqh
        for wg in gl.static_range(2):
            mbarrier.wait(dq_full.index(wg), it & 1)
            buf = dq_smem.index(wg)
            for j in gl.static_range(BM // ROWS):
                vals = buf.slice(j * ROWS, ROWS, dim=0).load(layout)
                rows = m0 + j * ROWS + r
                offs = gl.expand_dims((q_off + rows) * stride_dqm, 1) + gl.expand_dims(wg * HALF + c, 0)
                gl.atomic_add(base + offs, vals, mask=gl.expand_dims(rows < seqlen_q, 1), sem="relaxed")
            mbarrier.arrive(dq_empty.index(wg))


@gluon.jit
def _bwd_producer(q_desc, do_desc, q_smem, do_smem, full, empty, b, hk, group, g_lo, m_lo, n_items_per_head,
                  n_items, q_off, BM: gl.constexpr, HEAD_D: gl.constexpr, NSTAGES: gl.constexpr):
    BYTES: gl.constexpr = 2 * BM * HEAD_D * 2
    for it in range(0, n_items):
        h = hk * group + g_lo + it // n_items_per_head
        m0 = (m_lo + it % n_items_per_head) * BM
        st = it % NSTAGES
        mbarrier.wait(empty.index(st), ((it // NSTAGES) & 1) ^ 1, pred=it >= NSTAGES)
        mbarrier.expect(full.index(st), BYTES)
        _tma_load(q_desc, [b, q_off + m0, h, 0], full.index(st), q_smem.index(st))
        _tma_load(do_desc, [b, q_off + m0, h, 0], full.index(st), do_smem.index(st))


@gluon.jit
def _bwd_ws_kernel(q_desc, k_desc, v_desc, do_desc, LSE, Delta, DQ, DK, DV, CuQ, CuK, nheads, nheads_k, group,
                   split, seqlen_q, seqlen_k, scale_log2, sm_scale, stride_lb, stride_lh, stride_dqb, stride_dqm,
                   stride_dqh, stride_dks, stride_dkb, stride_dkn, stride_dkh, stride_dvs, stride_dvb, stride_dvn,
                   stride_dvh, HEAD_D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, NSTAGES: gl.constexpr,
                   CAUSAL: gl.constexpr, VARLEN: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                   PRODUCER_REGS: gl.constexpr, WRITER_REGS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    WN: gl.constexpr = BN // 2
    # axis 0 runs fastest: every (batch, KV head, share of the group) of one key block is launched before the next
    # key block, so under a causal mask the longest programs (the first key blocks) start first
    pid = gl.program_id(0)
    n_start = gl.program_id(1) * BN
    gs = pid % split
    hk = (pid // split) % nheads_k
    b = pid // (split * nheads_k)
    g_per = group // split
    g_lo = gs * g_per
    q_off = 0
    k_off = 0
    if VARLEN:  # packed sequences (batch 1 in the descriptors): this one's rows and lengths
        q_off = gl.load(CuQ + b)
        seqlen_q = gl.load(CuQ + b + 1) - q_off
        k_off = gl.load(CuK + b)
        seqlen_k = gl.load(CuK + b + 1) - k_off
        b = b * 0
    if n_start >= seqlen_k:
        return
    shift = seqlen_k - seqlen_q
    m_lo = 0
    if CAUSAL:
        m_lo = gl.maximum(n_start - shift, 0) // BM
    n_items_per_head = gl.cdiv(seqlen_q, BM) - m_lo
    n_items = n_items_per_head * g_per
    DK = DK + gs.to(gl.int64) * stride_dks
    DV = DV + gs.to(gl.int64) * stride_dvs

    q_smem = gl.allocate_shared_memory(dtype, [NSTAGES, 1, BM, 1, HEAD_D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NSTAGES, 1, BM, 1, HEAD_D], do_desc.layout)
    k_all = gl.allocate_shared_memory(dtype, [1, BN, 1, HEAD_D], k_desc.layout)
    v_all = gl.allocate_shared_memory(dtype, [1, BN, 1, HEAD_D], v_desc.layout)
    sw: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ds_all = gl.allocate_shared_memory(dtype, [2, BM, BN], sw)  # dS of both warpgroups, double-buffered
    p_all = gl.allocate_shared_memory(dtype, [2, BM, WN], sw)  # each warpgroup's P
    dq_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, BM, HEAD_D // 2], dq_layout)  # each warpgroup's dQ half
    dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ds_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.init(ds_bar, count=2)  # one arrival per consumer
    for i in gl.static_range(NSTAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(dq_full.index(i), count=1)
        mbarrier.init(dq_empty.index(i), count=1)
    fence_async_shared()
    mbarrier.expect(kv_bar, 2 * BN * HEAD_D * 2)
    _tma_load(k_desc, [b, k_off + n_start, hk, 0], kv_bar, k_all)
    _tma_load(v_desc, [b, k_off + n_start, hk, 0], kv_bar, v_all)
    mbarrier.wait(kv_bar, 0)
    gl.warp_specialize([
        (_bwd_consumer, (q_smem, do_smem, k_all, v_all, ds_all, p_all, dq_smem, ds_bar, full, empty, dq_full,
                         dq_empty, LSE, Delta, DK, DV, q_off, k_off, b, hk, group, g_lo, n_items_per_head,
                         n_items, n_start, 0, seqlen_q, seqlen_k, m_lo, shift, scale_log2, sm_scale, stride_lb,
                         stride_lh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, HEAD_D, BM,
                         WN, NSTAGES, CAUSAL)),
        (_bwd_consumer, (q_smem, do_smem, k_all, v_all, ds_all, p_all, dq_smem, ds_bar, full, empty, dq_full,
                         dq_empty, LSE, Delta, DK, DV, q_off, k_off, b, hk, group, g_lo, n_items_per_head,
                         n_items, n_start, 1, seqlen_q, seqlen_k, m_lo, shift, scale_log2, sm_scale, stride_lb,
                         stride_lh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, HEAD_D, BM,
                         WN, NSTAGES, CAUSAL)),
        (_bwd_producer, (q_desc, do_desc, q_smem, do_smem, full, empty, b, hk, group, g_lo, m_lo,
                         n_items_per_head, n_items, q_off, BM, HEAD_D, NSTAGES)),
        (_bwd_dq_writer, (dq_smem, dq_full, dq_empty, DQ, b, hk, group, g_lo, m_lo, n_items_per_head, n_items,
                          q_off, seqlen_q, stride_dqb, stride_dqm, stride_dqh, BM, HEAD_D, 2)),
    ], [4, 1, 2], [CONSUMER_REGS, PRODUCER_REGS, WRITER_REGS])


def smem_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def _strides(t: torch.Tensor) -> list:
    # a dimension of size 1 is read at index 0 only, whatever its stride (a batch of 1 may carry any): give TMA a
    # valid one
    return [st if n > 1 else HEAD_DIM * 8 for st, n in zip(t.stride(), t.shape)]


def _tma_ok(t: torch.Tensor) -> bool:
    # TMA: 16-byte aligned base, every stride but the last a multiple of 16 bytes, unit stride along the head dim
    st = _strides(t)
    return st[-1] == 1 and t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in st[:-1])


def supported(q, k, v, *, causal: bool, varlen: bool, has_bias: bool, has_alibi: bool, dropout_p: float,
              softcap: float, windowed_other_than_causal: bool, seqlen_q: int, seqlen_k: int) -> bool:
    """Whether :func:`forward` takes this call (see the module docstring); cheap host checks only."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] == HEAD_DIM and k.shape[-1] == HEAD_DIM and v.shape[-1] == HEAD_DIM):
        return False
    if has_bias or has_alibi or dropout_p > 0 or softcap > 0 or windowed_other_than_causal:
        return False
    # varlen: the lengths live on the device; a causal row that sees no key is handled in the kernel (and tested
    # for packed sequences), the dense case keeps the condition it was measured with
    if seqlen_k < 1 or seqlen_q < 1 or (causal and seqlen_q > seqlen_k and not varlen):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if _capability(index) != (9, 0):
        return False
    return all(_tma_ok(_as4d(t)) for t in (q, k, v))


def supported_backward(q, k, v, dout, **kw) -> bool:
    """Whether :func:`backward` takes this call: :func:`supported`'s conditions, dO readable by TMA, and dQ's
    row offsets within 32 bits (its atomics use them)."""
    if not supported(q, k, v, **kw) or not _tma_ok(_as4d(dout)) or dout.dtype != q.dtype:
        return False
    rows = q.shape[0] if q.dim() == 3 else kw["seqlen_q"]  # varlen: offsets run over the packed rows
    return rows * q.shape[-2] * HEAD_DIM < 2 ** 31


def backward_split(batch: int, nheads_k: int, group: int, seqlen_k: int, device: torch.device) -> int:
    """Programs per (key block, KV head): each takes group / split of the GQA group's query heads (float32
    partials of dK / dV, summed after). ``HF_FLASH_GLUON_BWD_SPLIT`` sets it (a divisor of the group); by default
    1."""
    env = os.environ.get("HF_FLASH_GLUON_BWD_SPLIT", "").strip()
    if env:
        s = int(env)
        if s < 1 or group % s:
            raise ValueError(f"HF_FLASH_GLUON_BWD_SPLIT={env!r}: takes a divisor of the GQA group ({group} query "
                             "heads per KV head here)")
        return s
    return 1


def _as4d(t: torch.Tensor) -> torch.Tensor:
    # varlen tensors (total, heads, dim) are read as one batch of packed rows
    return t.unsqueeze(0) if t.dim() == 3 else t


def _desc(t: torch.Tensor, rows: int):
    t = _as4d(t)
    return TensorDescriptor(t, list(t.shape), _strides(t), [1, rows, 1, HEAD_DIM], smem_layout())


def _problem(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(varlen, batch, seqlen_q, seqlen_k, cu_q, cu_k) of a dense or varlen call; the lengths of a varlen call are
    the maxima (each program reads its own from cu_seqlens), and a dense call passes ``lse`` as the never-read
    cu_seqlens pointers."""
    if cu_seqlens_q is not None:
        return True, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k
    return False, q.shape[0], q.shape[1], k.shape[1], lse, lse


def forward(q, k, v, causal: bool, softmax_scale: float, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q=None,
            cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0):
    """Attention of q (batch, seqlen_q, heads, 128) over k / v (batch, seqlen_k, kv heads, 128) into ``out``
    (q's shape) and ``lse`` ((batch, heads, seqlen_q) float32, natural log), the Triton forward's conventions.
    Varlen: q (total_q, heads, 128), k / v (total_k, kv heads, 128), ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32,
    batch + 1) and the maximum lengths; lse is then (heads, total_q)."""
    varlen, batch, seqlen_q, seqlen_k, cu_q, cu_k = _problem(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                             max_seqlen_k)
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    grid = (cdiv(seqlen_q, 2 * BLOCK_M), batch * nheads)
    _fwd_ws_kernel[grid](
        _desc(q, BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N), out, lse, cu_q, cu_k, *_Layout(out, varlen).strides(),
        *_lse_strides(lse, varlen), nheads, nheads // nheads_k, seqlen_q, seqlen_k,
        softmax_scale * 1.4426950408889634, HEAD_D=HEAD_DIM, BM=BLOCK_M, BN=BLOCK_N, NSTAGES=STAGES, CAUSAL=causal,
        VARLEN=varlen, CONSUMER_REGS=REGS[0], PRODUCER_REGS=REGS[1], num_warps=4)
    return out, lse


def backward(dout, q, k, v, lse, delta, causal: bool, softmax_scale: float, dq_acc: torch.Tensor, split: int = 1,
             cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0):
    """Gradients of :func:`forward`'s attention: ``dq_acc`` (q's shape, float32, zeroed) gets dQ added with atomics;
    returns dK and dV (k's dtype; float32 with a leading dimension of ``split`` partial sums when the GQA group is
    split between programs). ``lse`` is the forward's, ``delta`` rowsum(O * dO), both in lse's layout. Varlen as in
    :func:`forward`."""
    varlen, batch, seqlen_q, seqlen_k, cu_q, cu_k = _problem(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                             max_seqlen_k)
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    group = nheads // nheads_k
    if split > 1:
        dk = torch.empty((split,) + tuple(k.shape), dtype=torch.float32, device=k.device)
        dv = torch.empty((split,) + tuple(v.shape), dtype=torch.float32, device=v.device)
        dks, dvs = dk.stride(0), dv.stride(0)
        dkl, dvl = dk[0], dv[0]
    else:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dks = dvs = 0
        dkl, dvl = dk, dv
    grid = (batch * nheads_k * split, cdiv(seqlen_k, BWD_BLOCK_N))
    _bwd_ws_kernel[grid](
        _desc(q, BWD_BLOCK_M), _desc(k, BWD_BLOCK_N), _desc(v, BWD_BLOCK_N), _desc(dout, BWD_BLOCK_M), lse, delta,
        dq_acc, dk, dv, cu_q, cu_k, nheads, nheads_k, group, split, seqlen_q, seqlen_k,
        softmax_scale * 1.4426950408889634, softmax_scale, *_lse_strides(lse, varlen),
        *_Layout(dq_acc, varlen).strides(), dks, *_Layout(dkl, varlen).strides(), dvs, *_Layout(dvl, varlen).strides(),
        HEAD_D=HEAD_DIM, BM=BWD_BLOCK_M, BN=BWD_BLOCK_N, NSTAGES=BWD_STAGES, CAUSAL=causal, VARLEN=varlen,
        CONSUMER_REGS=REGS[0], PRODUCER_REGS=REGS[1], WRITER_REGS=BWD_WRITER_REGS, num_warps=4)
    if split > 1:
        return dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    return dk, dv
