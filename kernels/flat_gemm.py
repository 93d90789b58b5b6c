"""Flat GEMM: the linear layers of a decode step, ``y = x @ W^T (+ b)`` for a few rows of ``x``, in Triton.

A decode step multiplies one token per sequence (or a few: speculative tokens, a small batch) by every weight
matrix of the model. Its time is the time to read the weights once, so what matters is the read rate, not
tensor-core throughput. FlashDecoding++ calls these shapes flat GEMMs and pads them to the tensor-core
minimum instead of the 64/128-row tiles a prefill GEMM uses; this module does that, and for a single row skips
the tensor cores altogether.

What it supports
  * ``x`` of shape (M, K) with M <= 16 rows (unit stride along K), ``weight`` (N, K) as ``nn.Linear`` keeps it
    (unit stride along K), optional ``bias`` (N,), float16 / bfloat16 / float32, float32 accumulation;
  * one row (M == 1): each program owns BLOCK_N output features and keeps a (BLOCK_N, BLOCK_K) float32 tile
    of products, summed once after the loop (FastGEMV's layout: no reduction inside the loop, every weight
    byte loaded as a 16-byte vector along K);
  * 2 to 16 rows: ``tl.dot`` with the rows padded to 16 (the tensor-core minimum);
  * ``gated``: FlashDecoding++-style fusion of an MLP's gate and up projections, ``act(x W_g^T) * (x W_u^T)``
    with act = SiLU, both weights read by the same program, one output;
  * output into a given ``out`` buffer (a CUDA-graph static buffer, a slice of a bigger one).

What it does not: gradients (forward only; a training step keeps torch's matmul), more than 16 rows (that is
a GEMM, for cuBLAS), activations other than SiLU.

Tested: Triton interpreter on CPU against float64 PyTorch (tests/test_flat_gemm.py, odd N and K, 1-16 rows,
bias, gated); on CUDA the same tests plus Llama-3-8B shapes. Configs are fixed per shape (``flat_config``), not
autotuned, so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hf_flash.kernels import _launch
from hf_flash.kernels._common import mma
from hf_flash.kernels.configs import cdiv, dot_precision

__all__ = ["flat_linear", "flat_config", "MAX_ROWS", "LAUNCHES"]

MAX_ROWS = 16
# launches per kernel name, for tests that must show the kernel ran
LAUNCHES = {"flat_gemm": 0, "flat_gemm_gated": 0}


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _flat_gemm_kernel(X, W, W2, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_w2n, stride_ym,
                      HAS_BIAS: tl.constexpr, GATED: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
                      DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    nmask = rn < N
    # rows past N read row 0 again (no mask on the weight loads of a full K block); their results are dropped
    rn_in = tl.where(nmask, rn, 0).to(tl.int64)
    w_ptrs = W + rn_in[:, None] * stride_wn + rk[None, :]
    w2_ptrs = W2 + rn_in[:, None] * stride_w2n + rk[None, :]
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
    mmask = rm[:, None] < M
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:  # one row: products summed along K once, after the loop
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=mmask, other=0.0)
            if GATED:
                w2 = tl.load(w2_ptrs)
        else:
            kmask = (k + rk) < K
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mmask & kmask[None, :], other=0.0)
            if GATED:
                w2 = tl.load(w2_ptrs, mask=kmask[None, :], other=0.0)
        if USE_DOT:
            acc = mma(x, tl.trans(w), acc, DOT_PREC)
            if GATED:
                acc2 = mma(x, tl.trans(w2), acc2, DOT_PREC)
        else:
            xf = x.to(tl.float32)  # (1, BLOCK_K), broadcast over the BLOCK_N weight rows
            acc += w.to(tl.float32) * xf
            if GATED:
                acc2 += w2.to(tl.float32) * xf
        w_ptrs += BLOCK_K
        w2_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if USE_DOT:
        y = acc
        y2 = acc2
    else:
        y = tl.sum(acc, axis=1)[None, :]
        y2 = tl.sum(acc2, axis=1)[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        y = _silu(y) * y2
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], y.to(Y.dtype.element_ty), mask=mmask & nmask[None, :])


@functools.lru_cache(maxsize=1024)
def flat_config(m: int, n: int, k: int, itemsize: int, gated: bool, device: torch.device) -> dict:
    """Tile and launch options for one flat GEMM shape, from the H100 sweep of benchmarks/probe_flat_gemm.py
    (Llama-3-8B's projections, bf16; ``benchmarks/NOTES.md``).

    One row: 4 weight rows of 256 bytes per program, 8 warps, 5 stages, the best or within 1% of it for
    every shape (q/o, k/v, gate/up, down): many small programs keep many loads in flight on every SM. More
    rows: 32 weight rows of 1 KiB, 4 warps, 3 stages (within 3% of the best per shape).
    """
    if device.type != "cuda":
        return dict(BLOCK_M=1 if m == 1 else 16, BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    if m == 1:
        return dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=256 // itemsize, num_warps=8, num_stages=5)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=1024 // itemsize, num_warps=4,
                num_stages=2 if gated and itemsize == 4 else 3)


def _check(name: str, t: torch.Tensor, x: torch.Tensor, ndim: int):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flat_linear: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"flat_linear: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"flat_linear: {name} has dtype {t.dtype}, x has {x.dtype}; they must match")
    if t.device != x.device:
        raise ValueError(f"flat_linear: {name} is on {t.device}, x on {x.device}; they must be on one device")
    if t.stride(-1) != 1:
        raise ValueError(f"flat_linear: {name} must have unit stride along its last dimension, got strides "
                         f"{t.stride()}")


def flat_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                up_weight: torch.Tensor | None = None, out: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for x of shape (M, K), M <= 16; with ``up_weight``, ``silu(x @ weight.T (+ bias))
    * (x @ up_weight.T)`` (an MLP's gate and up projections). Returns (M, N) in x's dtype, written into ``out``
    when given (shape (M, N), unit stride along N)."""
    _check("x", x, x, 2)
    _check("weight", weight, x, 2)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flat_linear: x has dtype {x.dtype}; accepted: float16, bfloat16, float32")
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"flat_linear: x has {m} rows; accepted: 1 to {MAX_ROWS} (more rows: use torch's matmul)")
    if weight.shape[1] != k:
        raise ValueError(f"flat_linear: weight has shape {tuple(weight.shape)}, x has {k} features: weight must "
                         f"be (out_features, {k})")
    if bias is not None:
        _check("bias", bias, x, 1)
        if bias.shape[0] != n:
            raise ValueError(f"flat_linear: bias has shape {tuple(bias.shape)}, expected ({n},)")
    gated = up_weight is not None
    if gated:
        _check("up_weight", up_weight, x, 2)
        if up_weight.shape != weight.shape:
            raise ValueError(f"flat_linear: up_weight has shape {tuple(up_weight.shape)}, weight "
                             f"{tuple(weight.shape)}; they must match")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(f"flat_linear: out must be a ({m}, {n}) {x.dtype} tensor on {x.device} with unit stride "
                         f"along its last dimension, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if n == 0:
        return out
    cfg = config or flat_config(m, n, k, x.element_size(), gated, x.device)
    w2 = up_weight if gated else weight
    grid = (cdiv(n, cfg["BLOCK_N"]),)
    _launch.launch(
        _flat_gemm_kernel, grid,
        dict(X=x, W=weight, W2=w2, BIAS=bias if bias is not None else weight, Y=out, M=m, N=n, K=k,
             stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_w2n=w2.stride(0), stride_ym=out.stride(0),
             HAS_BIAS=bias is not None, GATED=gated, USE_DOT=cfg["BLOCK_M"] > 1, EVEN_K=k % cfg["BLOCK_K"] == 0,
             DOT_PREC=dot_precision(x.dtype, x.device), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
             BLOCK_K=cfg["BLOCK_K"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    LAUNCHES["flat_gemm_gated" if gated else "flat_gemm"] += 1
    return out
