"""Where a batch-1 decode step's time goes on the GPU: per-kernel durations (split-KV, combine) from the profiler
under CUDA-graph replay, the graph-replay floor of an empty kernel, and the host time of one launch.

    python benchmarks/probe_decode.py [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402


from hf_flash.kernels import decode  # noqa: E402


@triton.jit
def _empty(X):
    pass


def graph_of(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def kernel_times(g, reps=50):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            out[e.key[:60]] = e.device_time_total / max(1, e.count)
    return out


def host_us(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "cases": []}
    x = torch.empty(16, device="cuda")
    g = graph_of(lambda: _empty[(1,)](x))
    res["empty_graph_us"] = triton.testing.do_bench(g.replay, warmup=20, rep=100, return_mode="median") * 1e3
    res["empty_launch_host_us"] = host_us(lambda: _empty[(1,)](x))
    print("empty kernel: graph replay", res["empty_graph_us"], "us; host launch", res["empty_launch_host_us"], "us")
    for seqlen, hk, splits in ((4096, 8, 0), (4096, 8, 16), (16384, 8, 0), (16384, 8, 16), (16384, 8, 32),
                               (65536, 32, 0), (65536, 32, 3)):
        q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, seqlen, hk, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        fn = lambda: decode.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, num_splits=splits)  # noqa: E731
        g = graph_of(fn)
        ms = triton.testing.do_bench(g.replay, warmup=20, rep=100, return_mode="median")
        kt = kernel_times(g)
        hu = host_us(fn)
        tbs = 2 * k.numel() * 2 / ms / 1e9
        case = dict(seqlen=seqlen, hk=hk, splits=splits, graph_us=ms * 1e3, tbs=tbs, kernels_us=kt, host_us=hu)
        res["cases"].append(case)
        print(json.dumps(case), flush=True)
    res["HF_FLASH_DIRECT_LAUNCH"] = os.environ.get("HF_FLASH_DIRECT_LAUNCH")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
