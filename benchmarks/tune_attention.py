"""Sweep block shapes / warps / stages of the FA2 forward and backward on the GPU, beside SDPA's FLASH_ATTENTION
and CUDNN_ATTENTION backends, and print TFLOP/s. Its winners go into kernels/configs.py.

    python benchmarks/tune_attention.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import sys
import itertools
import json
import os

# run from a checkout without installing: the repository root makes hf_flash importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_flash
from hf_flash.kernels import configs


def flops(b, h, s, d, causal, mode):
    f = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * (1.0 if mode == "fwd" else 3.5)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_case(b, h, s, d, causal, mode, cfg_env=None):
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd")
               for _ in range(3))
    do = torch.randn_like(q)
    if cfg_env:
        os.environ[cfg_env[0]] = cfg_env[1]

    def ours():
        o = hf_flash.flash_attn_func(q, k, v, causal=causal)
        if mode != "fwd":
            o.backward(do)

    try:
        ms = bench(ours)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
        ms = float("nan")
        print("  fail", cfg_env, type(e).__name__, str(e)[:100])
    finally:
        if cfg_env:
            os.environ.pop(cfg_env[0], None)
    return flops(b, h, s, d, causal, mode) / ms / 1e9


def run_sdpa(b, h, s, d, causal, mode, backend):
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd")
               for _ in range(3))
    do = torch.randn_like(q)

    def fn():
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if mode != "fwd":
            o.backward(do)

    try:
        return flops(b, h, s, d, causal, mode) / bench(fn) / 1e9
    except Exception:  # noqa: BLE001
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    fwd_cfgs = ["128,64,4,3", "128,128,8,3", "128,64,8,3", "128,128,4,3", "64,64,4,3", "128,32,4,4", "128,64,4,4",
                "64,128,4,3"]
    bwd_cfgs = ["64,128,8,2", "64,64,4,3", "64,128,4,2", "32,128,4,3", "64,64,8,3", "128,128,8,2", "32,64,4,3",
                "128,64,8,2"]
    if args.quick:
        fwd_cfgs, bwd_cfgs = fwd_cfgs[:4], bwd_cfgs[:4]
    for d, causal in itertools.product((64, 128), (False, True)):
        s = 4096
        b, h = 16384 // s, 2048 // d
        fa2 = run_sdpa(b, h, s, d, causal, "fwd", SDPBackend.FLASH_ATTENTION)
        cud = run_sdpa(b, h, s, d, causal, "fwd", SDPBackend.CUDNN_ATTENTION)
        print(f"d={d} causal={causal} fwd: sdpa-fa2 {fa2:.0f} cudnn {cud:.0f} TFLOP/s")
        for c in fwd_cfgs:
            t = run_case(b, h, s, d, causal, "fwd", ("HF_FLASH_FWD_CONFIG", c))
            print(f"   fwd {c:>12}: {t:6.0f}  ({t / fa2:.2f}x fa2)")
            results.append(dict(d=d, causal=causal, mode="fwd", cfg=c, tflops=t, sdpa_fa2=fa2, cudnn=cud))
        fa2 = run_sdpa(b, h, s, d, causal, "fwdbwd", SDPBackend.FLASH_ATTENTION)
        cud = run_sdpa(b, h, s, d, causal, "fwdbwd", SDPBackend.CUDNN_ATTENTION)
        print(f"d={d} causal={causal} fwd+bwd: sdpa-fa2 {fa2:.0f} cudnn {cud:.0f} TFLOP/s")
        for c in bwd_cfgs:
            t = run_case(b, h, s, d, causal, "fwdbwd", ("HF_FLASH_BWD_CONFIG", c))
            print(f"   bwd {c:>12}: {t:6.0f}  ({t / fa2:.2f}x fa2)")
            results.append(dict(d=d, causal=causal, mode="fwdbwd", cfg=c, tflops=t, sdpa_fa2=fa2, cudnn=cud))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
