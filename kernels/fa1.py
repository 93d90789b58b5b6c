"""FlashAttention-1-form forward and backward, kept as the baseline that measures what FA2's changes buy.

The loop order is FlashAttention-1's (Dao et al. 2022, Algorithms 1 and 4), not FA2's:

* the grid is parallel over batch x heads only (one program per (batch, head) forward, per (batch, kv head)
  backward); no program ever owns a query block;
* each program's OUTER loop runs over K/V blocks (K_j, V_j stay on chip), the INNER loop over query blocks;
* forward: the running row max ``m``, row sum ``l`` and the output ``O`` live in HBM and are read, updated and
  written back at every outer step, ``O`` renormalised by ``1 / l`` each time (FA1 rescales every step; FA2
  keeps an unnormalised accumulator on chip and rescales once). Like flash-attn 1's ``o_tmp``, the running
  ``O`` is a float32 HBM buffer (the output itself for float32 inputs); the step that sees a query block's
  last visible K/V block writes the output in the input dtype and the log-sum-exp instead;
* backward: dK_j, dV_j accumulate on chip across the inner loop (and across the query heads of a GQA group)
  and are written once; P is recomputed from Q, K and the saved log-sum-exp; dQ_i is read-modified-written in
  a float32 HBM buffer at every outer step; delta = rowsum(dO * O) comes from a small preprocess kernel.

No N x N buffer anywhere, no atomics (dQ rows of one head belong to one program), so the backward is bitwise
deterministic.

Supported: (batch, seqlen, heads, headdim) tensors with any strides whose last dim is contiguous; float16,
bfloat16, float32 (float32 accumulation; float32 inputs multiply in IEEE float32 when
``torch.get_float32_matmul_precision() == "highest"``, else TF32); head dims 1..256 (padded to a power of two
inside the kernel, masked); seqlen_q != seqlen_k and any lengths; causal aligned bottom-right (query ``i`` sees
keys ``j <= i + seqlen_k - seqlen_q``), rows that see no key give zeros, log-sum-exp +inf and zero grads;
GQA/MQA (query head ``h`` reads kv head ``h // (nheads // nheads_k)``, no K/V copy). Not supported (FA2 path
only): dropout, windows, softcap, ALiBi, attn_bias, varlen.

Synchronisation: a program re-reads in outer step j+1 the HBM rows it wrote in step j; ``tl.debug_barrier()``
at the end of each outer step makes those writes visible to every thread of the program.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hf_flash.kernels import _common  # noqa: F401 - its import fixes old Triton interpreters (see there)

__all__ = ["fa1_block_config", "fa1_forward", "fa1_backward", "LAUNCHES"]

# Kernel launches since import, per kernel; tests reset and read it to check that the kernel ran.
LAUNCHES = {"fwd": 0, "bwd_preprocess": 0, "bwd": 0}

_LOG2E = 1.4426950408889634


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fa1_block_config(headdim: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the FA1 kernels: BLOCK_M rows of Q per inner step,
    BLOCK_N rows of K/V per outer step. Small blocks under the interpreter keep CPU tests fast while still
    making several blocks out of short odd sequences."""
    if _interp():
        return 16, 32, 4, 1
    # 16-bit picks: the fewest register spills in ptxas -v for sm_90a at these head dims (the HBM round-trip of
    # O, m, l per K/V block dominates anyway); float32 multiplies without tensor cores when "highest" is asked
    wide = dtype == torch.float32
    if not backward:
        if headdim <= 64:
            return 64, 64, 4, 1
        if headdim <= 128:
            return (64, 32, 4, 1) if wide else (128, 64, 8, 1)
        return 32, 32, 4, 1
    if headdim <= 64:
        return (64, 64, 4, 1) if wide else (32, 128, 8, 1)
    if headdim <= 128:
        return (32, 64, 4, 1) if wide else (32, 64, 8, 1)
    return (32, 32, 4, 1) if wide else (16, 64, 8, 1)


def _precision(dtype: torch.dtype) -> str:
    # only float32 operands read it; float16/bfloat16 always multiply on the tensor cores (Triton's default tag)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _interp() and dtype == torch.bfloat16


def _block_d(headdim: int) -> int:
    return max(16, triton.next_power_of_2(headdim))  # tl.dot needs an inner dim >= 16


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bfloat16 operands as their raw uint16 bits; upcasting is exact (the GPU's
    # bf16 products are exact in the float32 accumulator too), so UPCAST is set only under the interpreter.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _fa1_fwd_kernel(
    Q, K, V, Out, Lse, Acc, M, L,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_ab, stride_as, stride_ah,
    nheads, group, seqlen_q, seqlen_k, headdim, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // nheads).to(tl.int64)
    h = (pid % nheads).to(tl.int64)
    hk = h // group
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh
    a_base = Acc + b * stride_ab + h * stride_ah
    stat_off = (b * nheads + h) * seqlen_q  # Lse, M, L: contiguous (batch, nheads, seqlen_q)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < headdim
    shift = seqlen_k - seqlen_q  # bottom-right alignment: query i sees keys j <= i + shift
    n_q_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    n_kv_blocks = tl.cdiv(seqlen_k, BLOCK_N)

    dead_blocks = 0
    if CAUSAL:
        # query blocks whose every row sees no key (seqlen_q > seqlen_k): zeros and +inf, never visited below
        dead_blocks = tl.minimum(tl.maximum(-shift, 0) // BLOCK_M, n_q_blocks)
        for i in range(0, dead_blocks):
            offs_m = (i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_ok = offs_m < seqlen_q
            tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :],
                     tl.zeros([BLOCK_M, BLOCK_D], dtype=Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
            tl.store(Lse + stat_off + offs_m, tl.full([BLOCK_M], float("inf"), tl.float32), mask=m_ok)

    for j in range(0, n_kv_blocks):
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        i_start = dead_blocks
        if CAUSAL:
            i_start = tl.maximum(j * BLOCK_N - shift, 0) // BLOCK_M  # first query block that sees key j*BLOCK_N
        not_first = j > 0
        for i in range(i_start, n_q_blocks):
            offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seqlen_q
            rows = offs_m.to(tl.int64)
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
            # running statistics and output from HBM (nothing to read at the first K/V block)
            m_old = tl.load(M + stat_off + rows, mask=m_ok & not_first, other=float("-inf"))
            l_old = tl.load(L + stat_off + rows, mask=m_ok & not_first, other=0.0)
            a_ptrs = a_base + rows[:, None] * stride_as + offs_d[None, :]
            o_old = tl.load(a_ptrs, mask=q_mask & not_first, other=0.0)

            s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale  # log2 domain
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_old, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet: avoid inf - inf
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_old - m_use)
            l_new = alpha * l_old + tl.sum(p, 1)
            pv = _mm(p.to(v.dtype), v, PRECISION, UPCAST)
            l_div = tl.where(l_new == 0.0, 1.0, l_new)
            # FA1's Algorithm 1: O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + P V_j)
            o_new = (o_old * (alpha * l_old)[:, None] + pv) / l_div[:, None]

            last_j = n_kv_blocks - 1
            if CAUSAL:
                last_j = tl.minimum(seqlen_k - 1, (i + 1) * BLOCK_M - 1 + shift) // BLOCK_N
            if j == last_j:
                tl.store(o_base + rows[:, None] * stride_os + offs_d[None, :], o_new.to(Out.dtype.element_ty),
                         mask=q_mask)
                lse = tl.where(l_new == 0.0, float("inf"), (m_use + tl.log2(l_div)) * 0.6931471805599453)
                tl.store(Lse + stat_off + rows, lse, mask=m_ok)
            else:
                tl.store(a_ptrs, o_new, mask=q_mask)
                tl.store(M + stat_off + rows, m_new, mask=m_ok)
                tl.store(L + stat_off + rows, l_new, mask=m_ok)
        tl.debug_barrier()


@triton.jit
def _fa1_bwd_preprocess(
    Out, DO, Delta,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    nheads, seqlen_q, headdim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = (pid_bh % nheads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < headdim)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_ds + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(Delta + (b * nheads + h) * seqlen_q + rows, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _fa1_bwd_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DK, DV,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    nheads, nheads_k, group, seqlen_q, seqlen_k, headdim, sm_scale, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // nheads_k).to(tl.int64)
    hk = (pid % nheads_k).to(tl.int64)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < headdim
    shift = seqlen_k - seqlen_q
    n_q_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    n_kv_blocks = tl.cdiv(seqlen_k, BLOCK_N)

    for j in range(0, n_kv_blocks):
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        cols = offs_n.to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        i_start = 0
        if CAUSAL:
            i_start = tl.maximum(j * BLOCK_N - shift, 0) // BLOCK_M
        # the query heads of this kv head's group, each summed into the same on-chip dK_j, dV_j
        for g in range(0, group):
            h = hk * group + g
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            dq_base = DQ + b * stride_dqb + h * stride_dqh
            stat_off = (b * nheads + h) * seqlen_q
            for i in range(i_start, n_q_blocks):
                offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
                m_ok = offs_m < seqlen_q
                rows = offs_m.to(tl.int64)
                q_mask = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
                # +inf (rows that see no key, rows past the end) makes P = 0 there: zero grads
                lse = tl.load(Lse + stat_off + rows, mask=m_ok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(Delta + stat_off + rows, mask=m_ok, other=0.0)

                s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
                keep = n_ok[None, :]
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
                s = tl.where(keep, s, float("-inf"))
                p = tl.exp2(s - lse[:, None])
                dv += _mm(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
                dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
                ds = (p * (dp - delta[:, None])).to(q.dtype)
                dk += _mm(tl.trans(ds), q, PRECISION, UPCAST)
                dq_ptrs = dq_base + rows[:, None] * stride_dqs + offs_d[None, :]
                dq = tl.load(dq_ptrs, mask=q_mask, other=0.0)
                dq += _mm(ds, k, PRECISION, UPCAST) * sm_scale
                tl.store(dq_ptrs, dq, mask=q_mask)
        tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)
        tl.debug_barrier()


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def fa1_forward(q, k, v, softmax_scale: float, causal: bool):
    """FA1-form forward. q (batch, seqlen_q, nheads, d), k/v (batch, seqlen_k, nheads_k, d), last dim
    contiguous. Returns out (contiguous, q's dtype) and the float32 log-sum-exp (batch, nheads, seqlen_q)."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.empty((batch, seqlen_q, nheads, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:  # no key at all: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    # running O in HBM, float32 (flash-attn 1's o_tmp); float32 inputs renormalise the output in place
    acc = out if q.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=q.device)
    m_buf = torch.empty_like(lse)
    l_buf = torch.empty_like(lse)
    block_m, block_n, num_warps, num_stages = fa1_block_config(d, q.dtype)
    _fa1_fwd_kernel[(batch * nheads,)](
        q, k, v, out, lse, acc, m_buf, l_buf,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_strides3(acc),
        nheads, nheads // nheads_k, seqlen_q, seqlen_k, d, softmax_scale * _LOG2E,
        CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(d),
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    LAUNCHES["fwd"] += 1
    return out, lse


def fa1_backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool):
    """FA1-form backward. Returns dq, dk, dv (contiguous, the inputs' dtype); dk/dv of a kv head are summed
    over its group of query heads inside the kernel."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dk = torch.empty((batch, seqlen_k, nheads_k, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, seqlen_k, nheads_k, d), dtype=v.dtype, device=v.device)
    # float32 dQ buffer, read-modified-written at every outer step; rows never visited stay zero
    dq_acc = torch.zeros((batch, seqlen_q, nheads, d), dtype=torch.float32, device=q.device)
    if seqlen_q == 0 or seqlen_k == 0 or batch == 0 or nheads == 0:
        return dq_acc.to(q.dtype), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    block_d = _block_d(d)
    delta = torch.empty_like(lse)
    pre_m = 16 if block_d > 128 else 64
    _fa1_bwd_preprocess[(triton.cdiv(seqlen_q, pre_m), batch * nheads)](
        out, dout, delta, *_strides3(out), *_strides3(dout), nheads, seqlen_q, d,
        BLOCK_M=pre_m, BLOCK_D=block_d,
    )
    LAUNCHES["bwd_preprocess"] += 1
    block_m, block_n, num_warps, num_stages = fa1_block_config(d, q.dtype, backward=True)
    _fa1_bwd_kernel[(batch * nheads_k,)](
        q, k, v, dout, lse, delta, dq_acc, dk, dv,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dq_acc), *_strides3(dk),
        *_strides3(dv),
        nheads, nheads_k, nheads // nheads_k, seqlen_q, seqlen_k, d, softmax_scale, softmax_scale * _LOG2E,
        CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    LAUNCHES["bwd"] += 1
    dq = dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)
    return dq, dk, dv
