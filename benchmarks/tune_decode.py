"""Sweep the split-KV decode kernel's BLOCK_N / warps / stages and split counts on the GPU for batch-1 decode
shapes (32 query heads, 8 or 32 KV heads, head dim 128, bf16), timing CUDA-graph replays; prints KV TB/s.
The first rows of each shape are what the library picks by itself (decode_config and num_splits=0), with the
combine fused into the split kernel (the default) and as a second kernel; the sweep (fused) covers split counts
that give 1, 2 or 3 programs per SM, the heuristic's and a few round ones.

    python benchmarks/tune_decode.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# run from a checkout without installing: the repository root makes hf_flash importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton

from hf_flash.kernels import decode


def kv_tbs(batch, seqlen, hq, hk, d, splits, cfg, fused="1"):
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seqlen, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if cfg != "default":
        os.environ["HF_FLASH_DECODE_CONFIG"] = cfg
    os.environ["HF_FLASH_DECODE_FUSED"] = fused
    try:
        fn = lambda: decode.split_kv_forward(q, k, v, softmax_scale=d ** -0.5, num_splits=splits)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        ms = triton.testing.do_bench(g.replay, warmup=20, rep=80, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
        print("  fail", cfg, splits, type(e).__name__, str(e)[:80])
        return float("nan")
    finally:
        os.environ.pop("HF_FLASH_DECODE_CONFIG", None)
        os.environ.pop("HF_FLASH_DECODE_FUSED", None)
    return 2 * k.numel() * k.element_size() / ms / 1e9


SHAPES = ((4096, 8), (16384, 8), (131072, 8), (65536, 32))
CONFIGS = ("32,4,3", "32,4,4", "64,4,3", "64,4,4", "64,8,4", "128,4,3", "128,8,3")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for seqlen, hk in SHAPES:
        cfg0 = decode.decode_config(128, 32 // hk, torch.device("cuda"))
        heur = decode.num_splits_heuristic(1, hk, seqlen, sms, 1, cfg0["BLOCK_N"])
        for fused in ("1", "0"):
            tbs = kv_tbs(1, seqlen, 32, hk, 128, 0, "default", fused)
            rows.append(dict(seqlen=seqlen, hk=hk, cfg="default", fused=fused == "1", splits=0, heuristic=heur,
                             tbs=tbs))
            print(f"32/{hk} {seqlen:>6} defaults (decode_config, num_splits=0 -> {heur}), fused={fused}: "
                  f"{tbs:.2f} TB/s", flush=True)
        best = (0, None)
        # split counts that fill the SMs in 1, 2 or 3 programs each, the heuristic's, and a few round ones
        cands = {heur, 16, 32, 64} | {-(-w * sms // hk) for w in (1, 2, 3)}
        cands = sorted(c for c in cands if 1 <= c <= seqlen // 64)
        for cfg in CONFIGS:
            for splits in cands:
                tbs = kv_tbs(1, seqlen, 32, hk, 128, splits, cfg)
                rows.append(dict(seqlen=seqlen, hk=hk, cfg=cfg, fused=True, splits=splits, heuristic=heur, tbs=tbs))
                print(f"32/{hk} {seqlen:>6} cfg {cfg:>8} splits {splits:>4} (heur {heur}): {tbs:.2f} TB/s",
                      flush=True)
                if tbs > best[0]:
                    best = (tbs, (cfg, splits))
        print(f"best 32/{hk} {seqlen}: {best}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
