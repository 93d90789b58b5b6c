"""The tenth session's first Gluon experiment (benchmarks/probe_gluon_fwd.py runs it): a Hopper forward with
FlashAttention-3's intra-warpgroup overlap (block j+1's S = Q K^T issued before block j's P V, block j+1's softmax
computed while P V runs) but without warp specialisation: every warp of the CTA waits on the TMA mbarriers and
issues the refills after a CTA barrier. It measured the same as the Triton forward; the warp-specialised kernel
that replaced it is kernels/gluon_attention.py. Layout: q (B, H, Sq, D), k / v (B, HK, Sk, D), contiguous, read
through 2-D TMA views (B * H * S, D)."""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from hf_flash.kernels.gluon_attention import _softmax_step

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _fa_fwd(q_desc, k_desc, v_desc, O, LSE, nheads, group, seqlen_q, seqlen_k, qk_scale,
            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
            CAUSAL: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_desc.dtype
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                     instr_shape=[16, BLOCK_N, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                     instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    col_o: gl.constexpr = gl.SliceLayout(0, mma_o)

    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    pid_bh = gl.program_id(1)
    hk = (pid_bh % nheads) // group
    b = pid_bh // nheads
    m_start = pid_m * BLOCK_M
    q_row = pid_bh * seqlen_q + m_start
    k_row0 = (b * (nheads // group) + hk) * seqlen_k
    shift = seqlen_k - seqlen_q
    n_hi = seqlen_k
    if CAUSAL:
        n_hi = gl.minimum(seqlen_k, m_start + BLOCK_M + shift)
    n_blocks = gl.cdiv(n_hi, BLOCK_N)
    # blocks from n_full on need a mask (causal diagonal, ragged end)
    n_full = seqlen_k // BLOCK_N
    if CAUSAL:
        n_full = gl.minimum(n_full, gl.maximum(m_start + shift + 1, 0) // BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    fence_async_shared()

    KV_BYTES: gl.constexpr = BLOCK_N * HEAD_DIM * 2
    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
    _tma_load(q_desc, [q_row, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        live = i < n_blocks
        mbarrier.expect(k_bar.index(i), KV_BYTES, pred=live)
        _tma_load(k_desc, [k_row0 + i * BLOCK_N, 0], k_bar.index(i), k_smem.index(i), pred=live)
        mbarrier.expect(v_bar.index(i), KV_BYTES, pred=live)
        _tma_load(v_desc, [k_row0 + i * BLOCK_N, 0], v_bar.index(i), v_smem.index(i), pred=live)

    offs_m = m_start + gl.arange(0, BLOCK_M, layout=row_s)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=mma_o)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)

    # block 0: S and its softmax
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s_tok, q_smem, k_smem.index(0)])[0]
    if n_full > 0:
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, offs_m, offs_n, seqlen_k, shift, qk_scale, False, CAUSAL)
    else:
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, offs_m, offs_n, seqlen_k, shift, qk_scale, True, CAUSAL)

    for j in range(0, n_blocks - 1):
        st = j % STAGES
        nst = (j + 1) % STAGES
        nph = ((j + 1) // STAGES) & 1
        # the next block's S first, then this block's P V: S completes first, its softmax overlaps P V
        mbarrier.wait(k_bar.index(nst), nph)
        s_tok = warpgroup_mma(q_smem, k_smem.index(nst).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_bar.index(st), (j // STAGES) & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(st), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok, k_smem.index(nst)])[0]
        n_start = (j + 1) * BLOCK_N
        if j + 1 < n_full:
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, n_start, offs_m, offs_n, seqlen_k, shift, qk_scale,
                                               False, CAUSAL)
        else:
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, n_start, offs_m, offs_n, seqlen_k, shift, qk_scale,
                                               True, CAUSAL)
        acc = warpgroup_mma_wait(0, deps=[o_tok, v_smem.index(st)])[0]
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        # stage st is free (K_j used by S_j long ago, V_j by the P V just waited for): load block j + STAGES there
        _cta_barrier()
        nxt = j + STAGES
        live = nxt < n_blocks
        mbarrier.expect(k_bar.index(st), KV_BYTES, pred=live)
        _tma_load(k_desc, [k_row0 + nxt * BLOCK_N, 0], k_bar.index(st), k_smem.index(st), pred=live)
        mbarrier.expect(v_bar.index(st), KV_BYTES, pred=live)
        _tma_load(v_desc, [k_row0 + nxt * BLOCK_N, 0], v_bar.index(st), v_smem.index(st), pred=live)

    last = n_blocks - 1
    lst = last % STAGES
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    mbarrier.wait(v_bar.index(lst), (last // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(lst), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[o_tok, v_smem.index(lst)])[0]

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))

    empty = l_i == 0.0
    inv_l = gl.where(empty, 0.0, 1.0 / gl.where(empty, 1.0, l_i))
    lse = gl.where(empty, float("inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    acc = acc * gl.expand_dims(gl.convert_layout(inv_l, row_o), 1)
    rows = m_start + gl.arange(0, BLOCK_M, layout=row_o)
    cols = gl.arange(0, HEAD_DIM, layout=col_o)
    o_ptrs = O + (pid_bh.to(gl.int64) * seqlen_q + gl.expand_dims(rows, 1)) * HEAD_DIM + gl.expand_dims(cols, 0)
    gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(rows < seqlen_q, 1))
    gl.store(LSE + pid_bh.to(gl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


def _layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


def gluon_fwd(q, k, v, causal, sm_scale=None, block_m=64, block_n=64, stages=3, num_warps=4):
    B, H, Sq, D = q.shape
    HK, Sk = k.shape[1], k.shape[2]
    sm_scale = sm_scale or D ** -0.5
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    qd = TensorDescriptor.from_tensor(q.view(B * H * Sq, D), [block_m, D], _layout())
    kd = TensorDescriptor.from_tensor(k.view(B * HK * Sk, D), [block_n, D], _layout())
    vd = TensorDescriptor.from_tensor(v.view(B * HK * Sk, D), [block_n, D], _layout())
    grid = (triton.cdiv(Sq, block_m), B * H)
    _fa_fwd[grid](qd, kd, vd, o, lse, H, H // HK, Sq, Sk, sm_scale * 1.4426950408889634,
                  HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CAUSAL=causal, num_warps=num_warps)
    return o, lse
