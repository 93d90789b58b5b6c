"""FlashAttention-3-style forward for Hopper (sm_90), written in Gluon (Triton's lower-level dialect).

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
not), not varlen, seqlen_q <= seqlen_k when causal (so every query row sees a key), strides that TMA accepts
(multiples of 16 bytes, 16-byte aligned base). The output and the log-sum-exp follow kernels/attention.py's
conventions, so its backward takes them as they are. Gluon has no CPU interpreter: CI compiles this kernel for
sm_90 (tests/test_compile_sm90.py), the GPU tests run it (tests/test_gluon_attention.py).
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from hf_flash.kernels.configs import cdiv

# names that moved between Triton releases (3.6 on the GPU image, 3.9 in CI)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

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
def _consumer(q_smem, k_smem, v_smem, k_full, v_full, k_empty, v_empty, O, LSE, b, h, nheads, m_start,
              stride_ob, stride_om, stride_oh, seqlen_q, seqlen_k, n_blocks, n_total, n_full, shift, qk_scale,
              HEAD_D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, NSTAGES: gl.constexpr, CAUSAL: gl.constexpr):
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
    for j in range(n_blocks, n_total):
        st = j % NSTAGES
        ph = (j // NSTAGES) & 1
        mbarrier.wait(k_full.index(st), ph)
        mbarrier.arrive(k_empty.index(st))
        mbarrier.wait(v_full.index(st), ph)
        mbarrier.arrive(v_empty.index(st))

    empty = l_i == 0.0
    inv_l = gl.where(empty, 0.0, 1.0 / gl.where(empty, 1.0, l_i))
    lse = gl.where(empty, float("inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    acc = acc * gl.expand_dims(gl.convert_layout(inv_l, row_o), 1)
    rows = m_start + gl.arange(0, BM, layout=row_o)
    cols = gl.arange(0, HEAD_D, layout=col_o)
    o_ptrs = (O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
              + gl.expand_dims(rows.to(gl.int64) * stride_om, 1) + gl.expand_dims(cols, 0))
    gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(rows < seqlen_q, 1))
    gl.store(LSE + (b * nheads + h).to(gl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_full, v_full, k_empty, v_empty, b, hk, n_blocks,
              BN: gl.constexpr, HEAD_D: gl.constexpr, NSTAGES: gl.constexpr):
    KV_BYTES: gl.constexpr = BN * HEAD_D * 2
    for j in range(0, n_blocks):
        st = j % NSTAGES
        ph = ((j // NSTAGES) & 1) ^ 1  # the release of this slot's previous block
        again = j >= NSTAGES
        mbarrier.wait(k_empty.index(st), ph, pred=again)
        mbarrier.expect(k_full.index(st), KV_BYTES)
        _tma_load(k_desc, [b, j * BN, hk, 0], k_full.index(st), k_smem.index(st))
        mbarrier.wait(v_empty.index(st), ph, pred=again)
        mbarrier.expect(v_full.index(st), KV_BYTES)
        _tma_load(v_desc, [b, j * BN, hk, 0], v_full.index(st), v_smem.index(st))


@gluon.jit
def _fwd_ws_kernel(q_desc, k_desc, v_desc, O, LSE, stride_ob, stride_om, stride_oh, nheads, group, seqlen_q,
                   seqlen_k, qk_scale, HEAD_D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                   NSTAGES: gl.constexpr, CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                   PRODUCER_REGS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m  # the longest rows first: the grid's tail is short work
    pid_bh = gl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group
    m0 = pid_m * 2 * BM
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
    n_blocks = gl.cdiv(n_hi, BN)
    n_blocks0 = gl.cdiv(n_hi0, BN)

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
    _tma_load(q_desc, [b, m0, h, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [b, m0 + BM, h, 0], q_bar, q_smem.index(1))
    mbarrier.wait(q_bar, 0)
    gl.warp_specialize([
        (_consumer, (q_smem.index(0), k_smem, v_smem, k_full, v_full, k_empty, v_empty, O, LSE, b, h, nheads, m0,
                     stride_ob, stride_om, stride_oh, seqlen_q, seqlen_k, n_blocks0, n_blocks, n_full0, shift,
                     qk_scale, HEAD_D, BM, BN, NSTAGES, CAUSAL)),
        (_consumer, (q_smem.index(1), k_smem, v_smem, k_full, v_full, k_empty, v_empty, O, LSE, b, h, nheads,
                     m0 + BM, stride_ob, stride_om, stride_oh, seqlen_q, seqlen_k, n_blocks, n_blocks, n_full1,
                     shift, qk_scale, HEAD_D, BM, BN, NSTAGES, CAUSAL)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_full, v_full, k_empty, v_empty, b, hk, n_blocks, BN, HEAD_D,
                     NSTAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


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
    if varlen or has_bias or has_alibi or dropout_p > 0 or softcap > 0 or windowed_other_than_causal:
        return False
    if seqlen_k < 1 or seqlen_q < 1 or (causal and seqlen_q > seqlen_k):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if _capability(index) != (9, 0):
        return False
    return _tma_ok(q) and _tma_ok(k) and _tma_ok(v)


def _desc(t: torch.Tensor, rows: int):
    return TensorDescriptor(t, list(t.shape), _strides(t), [1, rows, 1, HEAD_DIM], smem_layout())


def forward(q, k, v, causal: bool, softmax_scale: float, out: torch.Tensor, lse: torch.Tensor):
    """Attention of q (batch, seqlen_q, heads, 128) over k / v (batch, seqlen_k, kv heads, 128) into ``out``
    (q's shape) and ``lse`` ((batch, heads, seqlen_q) float32, natural log), the Triton forward's conventions."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    grid = (cdiv(seqlen_q, 2 * BLOCK_M), batch * nheads)
    _fwd_ws_kernel[grid](
        _desc(q, BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N), out, lse, out.stride(0), out.stride(1),
        out.stride(2), nheads, nheads // nheads_k, seqlen_q, seqlen_k, softmax_scale * 1.4426950408889634,
        HEAD_D=HEAD_DIM, BM=BLOCK_M, BN=BLOCK_N, NSTAGES=STAGES, CAUSAL=causal, CONSUMER_REGS=REGS[0],
        PRODUCER_REGS=REGS[1], num_warps=4)
    return out, lse
