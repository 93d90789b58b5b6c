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


def chain_case(seqlen, hk, layers=32):
    """A model step's view: ``layers`` decode calls on as many caches (one per layer, so nothing stays in L2)
    captured in one CUDA graph; the replay time / layers is what one layer's attention costs inside a captured
    step, where the graph-launch floor is paid once per step, not once per call. hf_flash with the combine
    launched normally, as a programmatic dependent launch, and fused into the split kernel, and SDPA's
    FLASH_ATTENTION and CUDNN_ATTENTION (enable_gqa; expanded KV heads where a backend refuses it) on the same
    caches."""
    from hf_flash.bench.decode import _sdpa_call

    qs = [torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    ks = [torch.randn(1, seqlen, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    vs = [torch.randn_like(k) for k in ks]
    lens = torch.full((1,), seqlen, dtype=torch.int32, device="cuda")

    def hf():
        for q, k, v in zip(qs, ks, vs):
            decode.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens)

    def sdpa(name, expand):
        # the decode benchmark's SDPA call per layer (bench/decode.py), on this chain's caches
        if expand:
            kvs = [(k.repeat_interleave(32 // hk, dim=2), v.repeat_interleave(32 // hk, dim=2)) for k, v in zip(ks, vs)]
        else:
            kvs = list(zip(ks, vs))
        form = "enable_gqa" if hk != 32 and not expand else "native"
        calls = [_sdpa_call(name, q, k, v, form) for q, (k, v) in zip(qs, kvs)]

        def fn():
            for call in calls:
                call()
        return fn

    out = {"seqlen": seqlen, "hk": hk, "layers": layers}
    kv = 2 * ks[0].numel() * 2
    runs = [("hf_split_pdl", hf, "1"), ("hf_split", hf, "0"), ("hf_split_fused", hf, "fused")]
    for name in ("sdpa_flash", "sdpa_cudnn"):
        fn = sdpa(name, False)
        try:
            fn()
        except Exception:  # noqa: BLE001 - this backend wants equal head counts
            fn = sdpa(name, True)
            name += "_expanded"
        runs.append((name, fn, "1"))
    for name, fn, pdl in runs:
        # "fused": the combine inside the split kernel (one launch per layer), no PDL
        os.environ["HF_FLASH_DECODE_PDL"] = "0" if pdl == "fused" else pdl
        os.environ["HF_FLASH_DECODE_FUSED"] = "1" if pdl == "fused" else "0"
        try:
            g = graph_of(fn)
            ms = triton.testing.do_bench(g.replay, warmup=20, rep=100, return_mode="median")
            out[name] = {"us_per_layer": ms * 1e3 / layers, "tbs": kv * layers / ms / 1e9}
        except Exception as exc:  # noqa: BLE001 - the failure is the measurement
            out[name] = {"error": str(exc)[:200]}
    os.environ.pop("HF_FLASH_DECODE_PDL", None)
    os.environ.pop("HF_FLASH_DECODE_FUSED", None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--chain", action="store_true", help="also the 32-layer chained measurement")
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
    res["HF_FLASH_DECODE_PDL"] = os.environ.get("HF_FLASH_DECODE_PDL")
    if args.chain:
        res["chain"] = []
        for seqlen, hk in ((4096, 8), (16384, 8), (65536, 32)):
            res["chain"].append(chain_case(seqlen, hk, layers=32 if seqlen * hk <= 16384 * 8 else 8))
            print(json.dumps(res["chain"][-1]), flush=True)
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
