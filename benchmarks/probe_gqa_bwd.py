"""Causal attention forward, and forward + backward, as training steps run it, for the backward's variants (fused
dQ with atomics or a separate dQ kernel, the GQA split) and a few tile configs, against SDPA's FLASH_ATTENTION
and CUDNN_ATTENTION (``enable_gqa=True``) in the same run (GPU box). bf16.

    python benchmarks/probe_gqa_bwd.py [--full]

Shapes: a batch-1 Llama-3-8B layer (32 query / 8 KV heads, head dim 128) at 4k and 16k; GPT-2 small (12 heads,
head dim 64, batch 8 x 1k); a multi-head head-dim-128 layer (Llama-2-7B: 32 heads, batch 2 x 4k). ``--full`` adds
the tile-config sweep of the Llama-3 shapes. (The sixth session's run also had rows for K/V, Q and dO loaded through
Hopper tensor descriptors, TMA, with and without warp specialisation: slower on every shape, so that option went;
``logs_2026-11-26/probe_attn.json``.) Wall time per call (``triton.testing.do_bench``): for small shapes it includes
host time; ``probe_bwd_configs.py`` reports GPU time.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

import hf_flash  # noqa: E402

SHAPES = (("llama3-8b 4k", 1, 4096, 32, 8, 128), ("llama3-8b 16k", 1, 16384, 32, 8, 128),
          ("gpt2 8x1k", 8, 1024, 12, 12, 64), ("llama2-7b 2x4k", 2, 4096, 32, 32, 128))
FWD_CONFIGS = (None, "128,64,8,3", "128,128,8,3", "64,64,4,3")
FWD_CONFIGS_FULL = ("128,128,8,2", "64,64,4,4", "128,32,4,4")
BWD_VARIANTS = (("default (fused dq, gqa split auto)", {}),
                ("two-kernel dq, no split", {"HF_FLASH_BWD_FUSED_DQ": "0", "HF_FLASH_BWD_GQA_SPLIT": "1"}),
                ("fused dq, no split", {"HF_FLASH_BWD_GQA_SPLIT": "1"}),
                ("two-kernel dq, gqa split auto", {"HF_FLASH_BWD_FUSED_DQ": "0"}))
BWD_CONFIGS_FULL = ("64,64,4,3", "64,128,8,3", "32,64,4,3")


def _bench(name, fn, env, flops, base, rows, grad_to_none=None):
    os.environ.update(env)
    try:
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
        row = dict(base, impl=name, ms=ms, tflops=flops / ms / 1e9)
    except Exception as exc:  # noqa: BLE001 - the failure is the measurement
        row = dict(base, impl=name, error=str(exc)[:200])
    finally:
        for var in env:
            os.environ.pop(var, None)
    rows.append(row)
    print(json.dumps(row), flush=True)


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    full = "--full" in sys.argv
    rows = []
    for label, batch, seqlen, hq, hk, d in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(seqlen)
        q = torch.randn(batch, seqlen, hq, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(batch, seqlen, hk, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(batch, seqlen, hk, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        do = torch.randn_like(q)
        fwd_flops = 4 * batch * seqlen * seqlen * hq * d / 2  # causal
        base = {"shape": label, "batch": batch, "seqlen": seqlen, "heads": f"{hq}/{hk}", "head_dim": d}

        def hf():
            hf_flash.flash_attn_func(q, k, v, causal=True).backward(do)

        def hf_fwd():
            with torch.no_grad():
                hf_flash.flash_attn_func(q, k, v, causal=True)

        def sdpa(backend, backward=True):
            qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))

            def fn():
                with sdpa_kernel(backend):
                    if backward:
                        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).backward(dot)
                    else:
                        with torch.no_grad():
                            F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            return fn

        fwd_cases = [(f"fwd hf_flash {c or 'default'}", hf_fwd, {"HF_FLASH_FWD_CONFIG": c} if c else {})
                     for c in FWD_CONFIGS + (FWD_CONFIGS_FULL if full else ())]
        fwd_cases += [("fwd sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION, False), {}),
                      ("fwd sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION, False), {})]
        for name, fn, env in fwd_cases:
            _bench(name, fn, env, fwd_flops, base, rows)
        cases = [(f"fwd+bwd hf_flash {n}", hf, env) for n, env in BWD_VARIANTS]
        if full:
            cases += [(f"fwd+bwd hf_flash bwd config {c}", hf, {"HF_FLASH_BWD_CONFIG": c}) for c in BWD_CONFIGS_FULL]
        cases += [("fwd+bwd sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION), {}),
                  ("fwd+bwd sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION), {})]
        for name, fn, env in cases:
            _bench(name, fn, env, fwd_flops * 3.5, base, rows, grad_to_none=[q, k, v])
        del q, k, v, do
        torch.cuda.empty_cache()
    out = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--out=")), None)
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
