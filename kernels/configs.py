"""Block shapes, warps and pipeline depth for the attention kernels, chosen in one place.

Keys are bucketed (head dim rounded to a power of two, device kind, and for the forward the grid's size in waves
over the SMs), never the raw sequence length, so a generate() loop whose length grows by one token never re-tunes
or recompiles. Under Triton's interpreter small blocks keep CPU tests fast while still crossing several block
boundaries.

GPU values were first picked by ``benchmarks/tune_attention.py`` on an H100 (bf16, seqlen 4k, batch x seqlen = 16k;
benchmarks/results/tune_attention_h100.json), then refined from GPU-time sweeps on an H200
(``benchmarks/probe_bwd_configs.py``); an override ``HF_FLASH_FWD_CONFIG`` / ``HF_FLASH_BWD_CONFIG`` =
"BLOCK_M,BLOCK_N,num_warps,num_stages" exists for tuning.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def cdiv(a: int, b: int) -> int:
    # plain integer maths on the host: triton.cdiv is a jit function whose host call costs tens of microseconds,
    # which a decode step pays per layer
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; the CPU interpreter pretends to have 16 (a small "GPU", so CPU
    tests take the paths that split work on small shapes)."""
    if device.type == "cuda":
        return _num_sms_cached(device.index if device.index is not None else torch.cuda.current_device())
    return 16


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``DOT_PREC`` for the kernels' ``tl.dot`` calls (``_common.mma``): float32 follows torch's matmul precision
    setting; "interp-bf16" is ``_common.mma``'s workaround for the interpreter's bfloat16 dot."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return "interp-bf16"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded to a power of two (at least 16, the tensor-core minimum) inside the kernels."""
    return max(16, next_pow2(head_dim))


def _override(var: str):
    v = os.environ.get(var)
    if not v:
        return None
    bm, bn, w, s = (int(x) for x in v.split(","))
    return Config(bm, bn, w, s)


def _interpreted(device) -> bool:
    return device.type == "cpu"


def fwd_config(head_dim: int, dtype, device, max_seqlen_q: int, max_seqlen_k: int, batch_heads: int = 1) -> Config:
    """Forward tiles. For 16-bit inputs with head dim 128 the choice follows the grid's size in waves of 128-row
    programs over the SMs (``batch_heads`` = batch x query heads): a small grid (under 24 waves) runs 64 x 64 tiles
    on 4 warps, whose shorter programs leave a shorter tail (causal rows differ in length); a large one (48 waves
    and more) 128 x 128 tiles; between them 128 x 64. Measured on an H200, causal, bf16, GPU time: a batch-1
    Llama-3-8B layer at 4k (8 waves) 316 vs 347 us for 128 x 64, Llama-2 2 x 4k (16 waves) 597 vs 645 us; at 16k
    (31 waves) 128 x 64 is best (4.25 ms; 64 x 64 4.32); at 32k (62 waves) 128 x 128 (16.9 ms vs 17.6)
    (benchmarks/NOTES.md). A bucket changes only with the grid's size, never token by token."""
    o = _override("HF_FLASH_FWD_CONFIG")
    if o:
        return o
    if _interpreted(device):
        return Config(32, 32, 4, 1)
    d = padded_head_dim(head_dim)
    wide = dtype.itemsize == 4
    if d <= 64:
        return Config(64, 64 if not wide else 32, 4, 3)
    if d <= 128:
        if wide:
            return Config(128, 32, 8, 3)
        waves = batch_heads * cdiv(max_seqlen_q, 128) / num_sms(device)
        if waves < 24:
            return Config(64, 64, 4, 3)
        if waves >= 48:
            return Config(128, 128, 8, 3)
        return Config(128, 64, 8, 3)
    return Config(64, 64 if not wide else 32, 8, 2)


def bwd_config(head_dim: int, dtype, device, max_seqlen_q: int, max_seqlen_k: int) -> Config:
    o = _override("HF_FLASH_BWD_CONFIG")
    if o:
        return o
    if _interpreted(device):
        return Config(32, 32, 4, 1)
    d = padded_head_dim(head_dim)
    wide = dtype.itemsize == 4
    if d <= 64:
        # GPT-2 small's 8 x 1k, H200: 2 stages 240 us per forward + backward against 244 for 3 (with dropout 354
        # against 364)
        return Config(64, 64, 4, 2) if not wide else Config(64, 32, 4, 3)
    if d <= 128:
        return Config(64, 128 if not wide else 32, 8, 2)
    return Config(32, 64 if not wide else 32, 8, 1)
