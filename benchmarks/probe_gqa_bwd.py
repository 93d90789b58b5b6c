"""Forward + backward of causal GQA attention as a batch-1 Llama-3-8B training step runs it (32 query / 8 KV heads,
head dim 128, bf16), for several backward tile configs, the GQA split and the fused (atomic) dQ, against SDPA's
FLASH_ATTENTION and CUDNN_ATTENTION (``enable_gqa=True``) in the same run (GPU box).

    python benchmarks/probe_gqa_bwd.py

The dK/dV kernel runs one program per (key block, KV head) and loops over the GQA group inside, so a batch-1 GQA
call has 4x fewer (and 4x longer) programs than the multi-head grid the configs were tuned on.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

import hf_flash  # noqa: E402

CONFIGS = (None, "64,64,4,3", "64,64,8,2", "32,64,4,3", "64,128,8,3", "32,128,8,2")
GQA_SPLITS = ("2", "4", "auto")  # HF_FLASH_BWD_GQA_SPLIT: the group shared out over dK/dV programs


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    rows = []
    for seqlen in (4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(seqlen)
        q = torch.randn(1, seqlen, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(1, seqlen, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(1, seqlen, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        do = torch.randn_like(q)
        flops = 4 * seqlen * seqlen * 32 * 128 / 2 * 3.5  # causal; fwd + bwd = 3.5x the forward

        def hf():
            hf_flash.flash_attn_func(q, k, v, causal=True).backward(do)

        def sdpa(backend):
            qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))

            def fn():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).backward(dot)
            return fn

        cases = [(f"hf_flash bwd {c or 'default'}", hf, {"HF_FLASH_BWD_CONFIG": c} if c else {}) for c in CONFIGS]
        cases += [(f"hf_flash gqa split {g}", hf, {"HF_FLASH_BWD_GQA_SPLIT": g}) for g in GQA_SPLITS]
        cases += [("hf_flash fused dq", hf, {"HF_FLASH_BWD_FUSED_DQ": "1"}),
                  ("hf_flash fused dq + gqa split auto", hf, {"HF_FLASH_BWD_FUSED_DQ": "1",
                                                             "HF_FLASH_BWD_GQA_SPLIT": "auto"})]
        cases += [("sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION), {}),
                  ("sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION), {})]
        for name, fn, env in cases:
            os.environ.update(env)
            try:
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
                row = {"seqlen": seqlen, "impl": name, "ms": ms, "tflops": flops / ms / 1e9}
            except Exception as exc:  # noqa: BLE001 - the failure is the measurement
                row = {"seqlen": seqlen, "impl": name, "error": str(exc)[:200]}
            finally:
                for var in env:
                    os.environ.pop(var, None)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
