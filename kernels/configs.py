"""Block shapes, warps and pipeline depth for the attention kernels, chosen in one place.

Keys are bucketed (head dim rounded to a power of two, device kind), never the raw sequence length, so a
generate() loop whose length grows by one token never re-tunes or recompiles. Under Triton's interpreter small
blocks keep CPU tests fast while still crossing several block boundaries.

GPU values were picked by ``benchmarks/tune_attention.py`` on an H100 (bf16, seqlen 4k, batch x seqlen = 16k; the
sweep is in benchmarks/results/tune_attention_h100.json); an override
``HF_FLASH_FWD_CONFIG`` / ``HF_FLASH_BWD_CONFIG`` = "BLOCK_M,BLOCK_N,num_warps,num_stages" exists for tuning.
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


def fwd_config(head_dim: int, dtype, device, max_seqlen_q: int, max_seqlen_k: int) -> Config:
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
        return Config(128, 64 if not wide else 32, 8, 3)
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
        return Config(64, 64 if not wide else 32, 4, 3)
    if d <= 128:
        return Config(64, 128 if not wide else 32, 8, 2)
    return Config(32, 64 if not wide else 32, 8, 1)
