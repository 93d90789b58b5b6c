"""Split-KV decode for Hopper (sm_90) in Gluon: the key chunks stream through a ring of shared-memory slots filled
by TMA.

Why a second split kernel: the Triton one (kernels/decode.py) loads K / V with pointer loads and a 32-key tile. Here
a one-warp producer partition issues TMA copies of BLOCK_N keys x 128 dims into ``NSTAGES`` slots per tensor, ahead of
the consumer warpgroup, which computes S^T = K Q^T and O^T += V^T P^T with wgmma (the keys and head dims on the
64-row side, the GQA group's query rows, padded to 8-64, on the narrow side) and the online softmax down the
columns in between. Measured on the H100 (32/8 heads, batch 1, bf16; benchmarks/NOTES.md): the split kernel alone
4.9 us at 4k keys against the Triton kernel's 8.3, 25.3 vs 26.4 at 16k; a decode call in a 32-layer graph 1.41 vs
1.20 TB/s at 4k, 2.29 vs 2.21 at 16k; 2.99 vs 2.80 TB/s per call at 32/32 heads, 64k. Tried and dropped: the query
rows padded to 64 as the MMA's tall side (S = Q K^T: 8x the tensor work, 5.6 us at 4k), two consumer warpgroups,
3 to 6 slots (2 is best), the combine as a programmatic dependent launch, merging the splits in the last program
(atomic tickets), and merging them in a thread-block cluster per (sequence, KV head) at ``barrier.cluster``: on the
H100 this kernel streams the cache 20-30% slower when launched in clusters of 4 or more, unchanged otherwise
(benchmarks/probe_cluster_launch.py).

Each program owns one (sequence, KV head) and one chunk of its keys, as the Triton kernel does, and writes the
same float32 partials and log2-domain log-sum-exps (every row, zeros for an empty one), so kernels/decode.py's
combine kernel merges them; with one split it writes the output and the natural-log log-sum-exp itself.

Scope (``supported``): CUDA capability 9.0, float16 / bfloat16, head dim 128, dense caches (batch_cache, capacity,
nheads_k, 128) that TMA can read (16-byte strides and base), optional ``seqlens_k`` / ``leftpad`` / ``batch_idx`` on the
device, dense queries (batch, seqlen_q, nheads, 128) with group * seqlen_q <= 64 rows, causal alignment to the end
of the cache or none; no window, softcap, ALiBi, paged cache or unified maximum (those take the Triton kernel).
Keys past a sequence's length inside the capacity are masked in the last blocks; TMA returns zeros past the
capacity. Gluon has no CPU interpreter: CI compiles this kernel for sm_90 (tests/test_compile_sm90.py), the GPU tests
run it against the reference (tests/test_gluon_decode.py).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from hf_flash.kernels import _launch
from hf_flash.kernels.configs import next_pow2
from hf_flash.kernels.gluon_attention import _capability, _producer, _strides, _thread_barrier, _tma_ok, smem_layout

HEAD_DIM = 128
BLOCK_M = 64  # most query rows per (sequence, KV head): the GQA group times the query tokens
BLOCK_N = 64
STAGES = 2  # measured on the H100 against 3, 4 and 6 (benchmarks/NOTES.md)
REGS = 24  # the producer warp (setmaxnreg)


@gluon.jit
def _kv_ring(k_desc, v_desc, NSTAGES: gl.constexpr, BN: gl.constexpr, HEAD_D: gl.constexpr):
    """The K / V ring: NSTAGES shared-memory slots of BN keys per tensor (TMA's layout) and their "full" / "empty"
    mbarriers, one producer and one consumer each: (k_smem, v_smem, k_full, v_full, k_empty, v_empty)."""
    dtype: gl.constexpr = k_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [NSTAGES, 1, BN, 1, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NSTAGES, 1, BN, 1, HEAD_D], v_desc.layout)
    k_full = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NSTAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)
    fence_async_shared()
    return k_smem, v_smem, k_full, v_full, k_empty, v_empty


@gluon.jit
def _dec_consumer(Q, OUT, LSE, O_PART, LSE_PART, q_smem, p_smem, k_smem, v_smem, k_full, v_full, k_empty, v_empty,
                  b, kvh, bh, split, n_bh, group, seqlen_q, L, lo, n_tiles, n_full, qk_scale, rows_pad,
                  stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
                  stride_lt, HEAD_D: gl.constexpr, NQ: gl.constexpr, BN: gl.constexpr, NSTAGES: gl.constexpr,
                  CAUSAL: gl.constexpr, SPLIT: gl.constexpr):
    """The consumer warpgroup, with the products turned around: S^T = K Q^T and O^T += V^T P^T, the keys (and head
    dims) on the 64-row side of the warpgroup MMA and the NQ (>= 8) query rows on its narrow side (NQ / 64 of the
    tensor work of query rows padded to 64: measured faster, benchmarks/NOTES.md). The softmax runs down the
    columns: one cross-warp maximum per block, the sums kept per thread and reduced once at the end; P^T goes
    through shared memory as the second product's B operand."""
    dtype: gl.constexpr = k_smem.dtype
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, NQ, 16])
    col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    col_o: gl.constexpr = gl.SliceLayout(0, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_s)
    ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                        order=[1, 0])
    rows = group * seqlen_q
    shift = L - seqlen_q

    r_ld = gl.arange(0, NQ, layout=gl.SliceLayout(1, ld))
    d_ld = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, ld))
    q_rows = (b.to(gl.int64) * stride_qb + (r_ld // group).to(gl.int64) * stride_qt
              + (kvh * group + r_ld % group).to(gl.int64) * stride_qh)
    q = gl.load(Q + gl.expand_dims(q_rows, 1) + gl.expand_dims(d_ld, 0), mask=gl.expand_dims(r_ld < rows, 1),
                other=0.0)
    q_smem.store(q)
    fence_async_shared()
    _thread_barrier()
    q_t = q_smem.permute((1, 0))  # (HEAD_D, NQ): the B operand

    offs_n = gl.arange(0, BN, layout=row_s)
    t_q = gl.arange(0, NQ, layout=col_s) // group
    zero_s = gl.zeros([BN, NQ], gl.float32, layout=mma_s)
    acc = gl.zeros([HEAD_D, NQ], gl.float32, layout=mma_s)
    m_i = gl.full([NQ], float("-inf"), gl.float32, layout=col_s)
    l_t = gl.zeros([BN, NQ], gl.float32, layout=mma_s)
    for j in range(0, n_tiles):
        st = j % NSTAGES
        ph = (j // NSTAGES) & 1
        mbarrier.wait(k_full.index(st), ph)
        kt = k_smem.index(st).reshape([BN, HEAD_D])
        s_tok = warpgroup_mma(kt, q_t, zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s_tok, kt, q_t])[0]
        mbarrier.arrive(k_empty.index(st))
        s = s * qk_scale
        if j >= n_full:
            keys = lo + j * BN + offs_n
            ok = gl.expand_dims(keys < L, 1)
            if CAUSAL:
                ok = ok & (gl.expand_dims(keys, 1) <= gl.expand_dims(t_q + shift, 0))
            s = gl.where(ok, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 0))
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - gl.expand_dims(m_ref, 0))
        alpha = gl.exp2(m_i - m_ref)
        l_t = l_t * gl.expand_dims(alpha, 0) + p
        m_i = m_new
        acc = acc * gl.expand_dims(alpha, 0)
        p_smem.store(gl.permute(p.to(dtype), (1, 0)))  # (NQ, BN), the keys contiguous
        fence_async_shared()
        _thread_barrier()  # every column of P stored before the product reads it
        mbarrier.wait(v_full.index(st), ph)
        vt = v_smem.index(st).reshape([BN, HEAD_D])
        o_tok = warpgroup_mma(vt.permute((1, 0)), p_smem.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[o_tok, vt, p_smem])[0]
        mbarrier.arrive(v_empty.index(st))

    l_i = gl.sum(l_t, 0)
    has = l_i > 0.0
    inv_l = gl.where(has, 1.0 / gl.where(has, l_i, 1.0), 0.0)
    o = acc * gl.expand_dims(inv_l, 0)
    lse2 = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
    q_o = gl.arange(0, NQ, layout=col_o)
    d_o = gl.arange(0, HEAD_D, layout=row_o)
    q_ok = gl.expand_dims(q_o < rows, 0)
    if SPLIT:
        prow = (split * n_bh + bh).to(gl.int64) * rows_pad
        gl.store(LSE_PART + prow + q_o, lse2, mask=q_o < rows)
        gl.store(O_PART + gl.expand_dims((prow + q_o) * HEAD_D, 0) + gl.expand_dims(d_o, 1), o, mask=q_ok)
    else:
        o_rows = (b.to(gl.int64) * stride_ob + (q_o // group).to(gl.int64) * stride_ot
                  + (kvh * group + q_o % group).to(gl.int64) * stride_oh)
        gl.store(OUT + gl.expand_dims(o_rows, 0) + gl.expand_dims(d_o, 1), o.to(dtype), mask=q_ok)
        lse = gl.where(has, lse2 * 0.6931471805599453, float("inf"))
        gl.store(LSE + b.to(gl.int64) * stride_lb + (kvh * group + q_o % group).to(gl.int64) * stride_lh
                 + (q_o // group).to(gl.int64) * stride_lt, lse, mask=q_o < rows)


@gluon.jit
def _decode_kernel(k_desc, v_desc, Q, OUT, LSE, O_PART, LSE_PART, SEQLENS_K, LEFTPAD, BATCH_IDX,
                   stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                   nheads_k, group, seqlen_q, capacity, batch_cache, chunk, rows_pad, qk_scale,
                   HAS_SEQLENS: gl.constexpr, HAS_LEFTPAD: gl.constexpr, HAS_BATCH_IDX: gl.constexpr,
                   CAUSAL: gl.constexpr, SPLIT: gl.constexpr, HEAD_D: gl.constexpr,
                   BN: gl.constexpr, NSTAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr, NQ: gl.constexpr):
    dtype: gl.constexpr = k_desc.dtype
    bh = gl.program_id(0)
    split = gl.program_id(1)
    n_bh = gl.num_programs(0)
    b = bh // nheads_k
    kvh = bh % nheads_k
    # this sequence's keys: cache slots [leftpad, end), clamped to the capacity (device lengths never make a
    # program read past it)
    end_slot = capacity
    if HAS_SEQLENS:
        end_slot = gl.minimum(gl.load(SEQLENS_K + b), capacity)
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = gl.minimum(gl.maximum(gl.load(LEFTPAD + b), 0), capacity)
    cb = b
    if HAS_BATCH_IDX:
        cb = gl.minimum(gl.maximum(gl.load(BATCH_IDX + b), 0), batch_cache - 1)
    L = gl.maximum(end_slot - leftpad, 0)
    lo = split * chunk
    hi = gl.minimum(lo + chunk, L)
    if CAUSAL:
        mask_from = L - seqlen_q + 1  # keys from here on are hidden from some query token
    else:
        mask_from = L
    # a chunk without keys runs no block: the consumer then writes an empty partial (lse -inf), or with one split
    # a row that sees no key at all gets output 0 and lse +inf (flash-attn's convention)
    n_tiles = gl.cdiv(gl.maximum(hi - lo, 0), BN)
    n_full = (gl.minimum(hi, mask_from) - lo) // BN  # blocks that need no mask (may be negative: none)

    k_smem, v_smem, k_full, v_full, k_empty, v_empty = _kv_ring(k_desc, v_desc, NSTAGES, BN, HEAD_D)
    sw2: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_smem = gl.allocate_shared_memory(dtype, [NQ, HEAD_D], sw2)
    p_smem = gl.allocate_shared_memory(dtype, [NQ, BN], sw2)
    gl.warp_specialize([
        (_dec_consumer, (Q, OUT, LSE, O_PART, LSE_PART, q_smem, p_smem, k_smem, v_smem, k_full, v_full, k_empty,
                         v_empty, b, kvh, bh, split, n_bh, group, seqlen_q, L, lo, n_tiles, n_full, qk_scale,
                         rows_pad, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb,
                         stride_lh, stride_lt, HEAD_D, NQ, BN, NSTAGES, CAUSAL, SPLIT)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_full, v_full, k_empty, v_empty, cb, kvh, leftpad + lo, n_tiles,
                     BN, HEAD_D, NSTAGES)),
    ], [1], [PRODUCER_REGS])


def config() -> dict:
    """Key block, ring depth and the split heuristic's programs per SM / fewest keys per split;
    ``HF_FLASH_GLUON_DECODE_CONFIG="BLOCK_N,STAGES,PROGRAMS_PER_SM,MIN_KEYS"`` overrides (tuning sweeps)."""
    env = _launch.env_get("HF_FLASH_GLUON_DECODE_CONFIG")
    if env:
        bn, st, pps, mk = (int(x) for x in env.split(","))
        return dict(BLOCK_N=bn, stages=st, programs_per_sm=pps, min_keys=mk)
    return dict(BLOCK_N=BLOCK_N, stages=STAGES, programs_per_sm=1, min_keys=256)


_LAYOUT = smem_layout()  # made once: a layout costs ~5 us of host time, and every call makes two descriptors


def supported(q, k, v, *, varlen_q: bool, paged: bool, window: bool, softcap: float, alibi: bool, unified: bool,
              rows: int) -> bool:
    """Whether :func:`split_forward` takes this call (see the module docstring); cheap host checks only."""
    if varlen_q or paged or window or softcap > 0 or alibi or unified or rows > BLOCK_M or rows < 1:
        return False
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] == HEAD_DIM and k.dim() == 4 and k.shape[-1] == HEAD_DIM and v.shape[-1] == HEAD_DIM):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if _capability(index) != (9, 0):
        return False
    return _tma_ok(k) and _tma_ok(v)


def _desc(t: torch.Tensor, block_n: int):
    return TensorDescriptor(t, list(t.shape), _strides(t), [1, block_n, 1, HEAD_DIM], _LAYOUT)


def split_forward(q, k, v, out, *, lse, o_part, lse_part, softmax_scale: float, causal: bool, num_splits: int,
                  chunk: int, rows_pad: int, seqlens_k=None, leftpad=None, batch_idx=None, capacity: int,
                  block_n: int = BLOCK_N, stages: int = STAGES):
    """The split kernel of kernels/decode.py's ``split_kv_forward`` for the calls :func:`supported` takes: with
    ``num_splits`` > 1 it writes the partials (o_part (splits, batch * nheads_k, rows_pad, 128) float32, lse_part
    (splits, batch * nheads_k, rows_pad), log2 domain) for that module's combine kernel; with one split ``out`` and
    ``lse`` ((batch, nheads, seqlen_q), natural log). ``chunk``: keys per split, a multiple of ``block_n``."""
    batch, seqlen_q, nheads, _ = q.shape
    nheads_k = k.shape[2]
    dummy = lse
    args = dict(
        k_desc=_desc(k, block_n), v_desc=_desc(v, block_n), Q=q, OUT=out, LSE=lse, O_PART=o_part, LSE_PART=lse_part,
        SEQLENS_K=seqlens_k if seqlens_k is not None else dummy, LEFTPAD=leftpad if leftpad is not None else dummy,
        BATCH_IDX=batch_idx if batch_idx is not None else dummy,
        stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qh=q.stride(2),
        stride_ob=out.stride(0), stride_ot=out.stride(1), stride_oh=out.stride(2),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_lt=lse.stride(2),
        nheads_k=nheads_k, group=nheads // nheads_k, seqlen_q=seqlen_q, capacity=capacity, batch_cache=k.shape[0],
        chunk=chunk, rows_pad=rows_pad, qk_scale=softmax_scale * 1.4426950408889634,
        HAS_SEQLENS=seqlens_k is not None, HAS_LEFTPAD=leftpad is not None, HAS_BATCH_IDX=batch_idx is not None,
        CAUSAL=bool(causal), SPLIT=num_splits > 1, HEAD_D=HEAD_DIM, BN=block_n, NSTAGES=stages,
        PRODUCER_REGS=REGS, NQ=max(8, next_pow2(seqlen_q * (nheads // nheads_k))))
    # through hf_flash's direct launcher: a decode step calls this once per layer, and the JIT's own launch path
    # cost ~60-100 us of host time per call more (measured on the H100 box)
    _launch.launch(_decode_kernel, (batch * nheads_k, num_splits), args, num_warps=4)
