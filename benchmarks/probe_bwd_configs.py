"""Forward + backward GPU time per kernel, from the profiler (not wall time, so host overhead cannot hide a slow
kernel), for the backward's tile configs and the forward's, with and without dropout, against SDPA's
FLASH_ATTENTION and CUDNN_ATTENTION on the same inputs (GPU box, bf16, causal).

    python benchmarks/probe_bwd_configs.py [--out FILE] [--shapes gpt2,llama3-4k,llama2-4k] [--fwd-only]
                                           [--bwd-configs 64,64,4,3/32,64,4,3] [--fwd-configs ...]
                                           [--envs K=V,K=V/K=V] [--label TEXT]

A config of ``default`` runs the launcher's own choice for the shape.

Each row: the shape, the variant (``HF_FLASH_FWD_CONFIG`` / ``HF_FLASH_BWD_CONFIG`` = BLOCK_M,BLOCK_N,warps,stages),
the GPU microseconds per forward + backward summed over all kernels, and the five largest kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import hf_flash  # noqa: E402

SHAPES = {"gpt2": (8, 1024, 12, 12, 64), "llama3-4k": (1, 4096, 32, 8, 128), "llama2-4k": (2, 4096, 32, 32, 128),
          "llama3-16k": (1, 16384, 32, 8, 128), "llama3-32k": (1, 32768, 32, 8, 128)}
BWD = {64: ("64,64,4,3", "32,64,4,3", "64,64,4,2", "64,64,8,3", "64,128,4,3", "64,128,8,3", "32,128,4,3",
            "128,128,8,2", "128,64,8,3"),
       128: ("64,128,8,2", "64,128,8,3", "32,128,8,2", "32,128,4,2", "64,128,4,2", "64,64,4,3", "32,64,4,3",
             "128,128,8,1")}
FWD = {64: ("64,64,4,3", "128,64,4,3", "128,64,8,3", "128,128,8,3", "64,128,4,3"),
       128: ("128,64,8,3", "128,128,8,3", "64,64,4,3", "64,64,4,4", "64,64,4,2", "64,128,4,3", "64,32,4,3",
             "128,64,4,3")}


def gpu_us(fn, reps: int = 10) -> tuple[float, list]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        if getattr(getattr(e, "device_type", None), "name", "") != "CUDA":
            continue
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        per[e.key[:60]] = per.get(e.key[:60], 0.0) + t / reps
    top = sorted(per.items(), key=lambda kv: -kv[1])[:5]
    return sum(per.values()), [(k, round(v, 1)) for k, v in top]


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="gpt2,llama3-4k,llama2-4k")
    ap.add_argument("--fwd-only", action="store_true", help="only the forward configs (and SDPA's forward)")
    ap.add_argument("--bwd-configs", default=None, help="a list like 64,64,4,3/32,64,4,3 (default: all)")
    ap.add_argument("--fwd-configs", default=None,
                    help="a list like 128,64,8,3/64,64,4,3 or 'default' (the launcher's choice); default: all")
    ap.add_argument("--envs", default=None,
                    help="environment variants crossed with the configs, like HF_FLASH_FWD_EXP2_EMU=0/HF_FLASH_FWD_EXP2_EMU=2")
    ap.add_argument("--label", default="", help="appended to each hf_flash row's name (e.g. the env it ran with)")
    a = ap.parse_args()
    F = torch.nn.functional
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for label in a.shapes.split(","):
        batch, seqlen, hq, hk, d = SHAPES[label]
        g = torch.Generator(device="cuda").manual_seed(seqlen)
        q, k, v = (torch.randn(batch, seqlen, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
                   .requires_grad_() for h in (hq, hk, hk))
        do = torch.randn_like(q)
        for p in ((0.0, 0.1) if label == "gpt2" else (0.0,)):
            def hf(backward=True):
                def fn():
                    o = hf_flash.flash_attn_func(q, k, v, dropout_p=p, causal=True)
                    if backward:
                        o.backward(do)
                        q.grad = k.grad = v.grad = None
                return fn

            base = {"shape": label, "dropout_p": p}
            bwd = a.bwd_configs.split("/") if a.bwd_configs else BWD[d]
            # "default" runs the launcher's own choice (no override)
            variants = [] if a.fwd_only else [(f"bwd {c}", {} if c == "default" else {"HF_FLASH_BWD_CONFIG": c}, True)
                                              for c in bwd]
            fwd = a.fwd_configs.split("/") if a.fwd_configs else FWD[d]
            variants += [(f"fwd {c}", {} if c == "default" else {"HF_FLASH_FWD_CONFIG": c}, False) for c in fwd]
            # each variant once per --envs entry (in turn, so a slow spell of the GPU hits them alike)
            envs = [dict(kv.split("=", 1) for kv in e.split(",") if kv) for e in (a.envs.split("/") if a.envs
                                                                                 else [""])]
            variants = [(" ".join([n, ",".join(f"{k}={v}" for k, v in extra.items()), a.label]).strip(),
                         dict(env, **extra), b) for extra in envs for n, env, b in variants]
            for name, env, backward in variants:
                os.environ.update(env)
                try:
                    us, top = gpu_us(hf(backward))
                    record(dict(base, variant=name, gpu_us=round(us, 1), top=top))
                except Exception as exc:  # noqa: BLE001 - the failure is the measurement
                    record(dict(base, variant=name, error=str(exc)[:200]))
                finally:
                    for var in env:
                        os.environ.pop(var, None)
            qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                for backward in ((False,) if a.fwd_only else (True, False)):
                    def fn():
                        with sdpa_kernel(backend):
                            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, dropout_p=p,
                                                               enable_gqa=hq != hk)
                            if backward:
                                o.backward(dot)
                                q.grad = k.grad = v.grad = None
                    try:
                        us, top = gpu_us(fn)
                        record(dict(base, variant=f"{'bwd' if backward else 'fwd'} sdpa {backend.name}",
                                    gpu_us=round(us, 1), top=top))
                    except Exception as exc:  # noqa: BLE001
                        record(dict(base, variant=f"sdpa {backend.name}", error=str(exc)[:200]))
        del q, k, v, do
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
