"""A GPT-2 small training step (124M parameters, 12 layers of 12 heads x 64, random weights from the real config)
with "flashtri", "sdpa" and "eager" in the same run (GPU box): the regime where attention is small and the host
can bound the step, which the Llama-3-8B benchmarks do not show.

    python benchmarks/probe_gpt2_train.py [--batch 8] [--seqlen 1024] [--out probe_gpt2_train.json]

Per implementation: the wall time of forward + backward + AdamW step (bf16 autocast, fp32 weights, dropout as in
the config), tokens/s and peak memory; then, under the profiler, the GPU time of the step's kernels and of the
attention kernels alone, so that wall time above GPU time (host-bound steps) shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import hf_flash  # noqa: E402, F401 - registers "flashtri"

IMPLS = ("flashtri", "sdpa", "eager")


def build(impl: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=2048, attn_implementation=impl)  # GPT-2 small's sizes, longer positions
    return GPT2LMHeadModel(cfg).cuda().train()


def step_fn(model, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def gpu_times(step, reps: int = 5) -> dict:
    """Sum of kernel times per step (all kernels, and those whose name says attention / flash / fmha / sdpa / cudnn /
    hf_flash's kernels), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    total = attn = 0.0
    keys = ("attn", "flash", "fmha", "sdpa", "_fwd_kernel", "_bwd_", "cudnn")  # eager's bmm/softmax not counted
    for e in prof.key_averages():
        kind = getattr(getattr(e, "device_type", None), "name", "")
        if kind != "CUDA":  # kernels only: CPU-side events carry their kernels' time again
            continue
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        total += t
        if any(k in e.key.lower() for k in keys):
            attn += t
    return {"gpu_ms": total / reps / 1e3, "attention_gpu_ms": attn / reps / 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ids = torch.randint(0, 50257, (a.batch, a.seqlen), device="cuda")
    rows = []
    for impl in IMPLS:
        model = build(impl)
        step = step_fn(model, ids)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(a.reps):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / a.reps * 1e3
        row = {"impl": impl, "batch": a.batch, "seqlen": a.seqlen, "ms": ms,
               "tokens_per_s": a.batch * a.seqlen / ms * 1e3,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        try:
            row.update(gpu_times(step))
        except Exception as exc:  # noqa: BLE001 - the wall-time figures stand without the profile
            row["profile_error"] = str(exc)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, step
        torch.cuda.empty_cache()
    base = next(r for r in rows if r["impl"] == "sdpa")
    for r in rows:
        r["speedup_vs_sdpa"] = base["ms"] / r["ms"]
    print(" ".join(f"{r['impl']} {r['speedup_vs_sdpa']:.2f}x" for r in rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
