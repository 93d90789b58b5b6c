"""Sweep the split-KV decode kernel's BLOCK_N / warps / stages and split counts on the GPU for batch-1 decode
shapes (32 query heads, 8 or 32 KV heads, head dim 128, bf16), timing CUDA-graph replays; prints KV TB/s.
The first row of each shape is what the library picks by itself (decode_config and num_splits=0); the split
counts swept are the heuristic's for 64-key blocks, half and double.

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


def kv_tbs(batch, seqlen, hq, hk, d, splits, cfg):
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seqlen, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if cfg != "default":
        os.environ["HF_FLASH_DECODE_CONFIG"] = cfg
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
    return 2 * k.numel() * k.element_size() / ms / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for seqlen, hk in ((4096, 8), (16384, 8), (65536, 32)):
        heur = decode.num_splits_heuristic(1, hk, seqlen, sms, 1, 64)
        best = (0, None)
        tbs = kv_tbs(1, seqlen, 32, hk, 128, 0, "default")
        rows.append(dict(seqlen=seqlen, hk=hk, cfg="default", splits=0, heuristic=heur, tbs=tbs))
        print(f"32/{hk} {seqlen:>6} the defaults (decode_config, num_splits=0): {tbs:.2f} TB/s", flush=True)
        n_blocks = seqlen // 64
        for cfg in ("32,4,3", "64,4,3", "64,4,4", "64,8,3", "128,4,3", "128,8,3"):
            for splits in sorted({heur, min(2 * heur, n_blocks), max(1, heur // 2)}):
                tbs = kv_tbs(1, seqlen, 32, hk, 128, splits, cfg)
                rows.append(dict(seqlen=seqlen, hk=hk, cfg=cfg, splits=splits, heuristic=heur, tbs=tbs))
                print(f"32/{hk} {seqlen:>6} cfg {cfg:>8} splits {splits:>4} (heur {heur}): {tbs:.2f} TB/s",
                      flush=True)
                if tbs > best[0]:
                    best = (tbs, (cfg, splits))
        print(f"best 32/{hk} {seqlen}: {best}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
