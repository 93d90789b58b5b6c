"""Where the GPU time of a StaticCache + torch.compile decode step goes ("flashtri", Llama-3-8B shapes, GPU box).

    python benchmarks/probe_static.py --context 32768

The step is compiled as ``hf-flash bench e2e`` compiles it (mode="reduce-overhead"); after the warm-up, the
profiler records a few steps and the kernels are listed by GPU time per step, grouped into attention (the
split-KV and combine kernels), matrix products and the rest.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hf_flash.bench import e2e  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    model = e2e.build_model(32, torch.device("cuda"))
    e2e._set_impl(model, "flashtri")
    context, warm = args.context, 16
    max_len = context + warm + args.steps + 8
    key = e2e._cache_key(model)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    ids, _ = e2e._prompt(1, context, model.device, model.config.vocab_size)
    mask_buf = torch.zeros(1, max_len, dtype=torch.long, device="cuda")
    mask_buf[:, :context] = 1
    with torch.no_grad():
        tok = model(ids, attention_mask=mask_buf[:, :context], use_cache=True, logits_to_keep=1,
                    **{key: cache}).logits[:, -1:].argmax(-1)
    pos = torch.full((1, 1), context, device="cuda")

    def step(tok, pos, mask_buf):
        return model(tok, attention_mask=mask_buf, position_ids=pos, use_cache=True, logits_to_keep=1,
                     **{key: cache}).logits

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=False, dynamic=False)
    with torch.no_grad():
        for i in range(warm):
            mask_buf[:, context + i] = 1
            tok = compiled(tok, pos, mask_buf)[:, -1:].argmax(-1)
            pos = pos + 1
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(args.steps):
                mask_buf[:, context + warm + i] = 1
                tok = compiled(tok, pos, mask_buf)[:, -1:].argmax(-1)
                pos = pos + 1
            torch.cuda.synchronize()
    groups: dict = {}
    rows = []
    for e in prof.key_averages():
        t = e.self_device_time_total / 1e3 / args.steps
        if t <= 0:
            continue
        name = e.key
        g = ("attention" if ("split_kv" in name or "combine" in name) else
             "matmul" if any(s in name for s in ("gemm", "gemv", "nvjet", "cutlass", "mm", "splitK")) else "other")
        groups[g] = groups.get(g, 0.0) + t
        rows.append((t, e.count // args.steps, name[:100], g))
    print(f"context {context}: GPU ms per step by group: " + ", ".join(f"{g} {t:.2f}" for g, t in groups.items())
          + f"; total {sum(groups.values()):.2f}")
    for t, n, name, g in sorted(rows, reverse=True)[:25]:
        print(f"  {t:7.3f} ms/step {n:5d}/step  [{g}] {name}")


if __name__ == "__main__":
    main()
