"""Where the host time of a default generate() decode step goes, per attention implementation (GPU box).

    python benchmarks/probe_generate.py --layers 8 --context 4096 --out probe_generate.json

For "flashtri", "sdpa" and an attention function that does nothing (the floor), on Llama-3-8B shapes with fewer
layers: the ms per step of generate() from a prefilled DynamicCache (as ``hf-flash bench e2e`` measures it), the
host-device synchronisations of one generate() (``torch.cuda.set_sync_debug_mode``, with the code that asked for
each), and a cProfile of one generate() (the functions with the most own time, per step).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import pstats
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hf_flash.bench import e2e  # noqa: E402


def _profile(gen, steps: int, top: int = 30) -> str:
    prof = cProfile.Profile()
    prof.enable()
    gen()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return f"(one generate() of {steps} steps)\n" + s.getvalue()


def _sync_sites(gen) -> dict:
    """Where the synchronisations come from: set_sync_debug_mode('warn') issues a warning at each; a
    showwarning hook outside catch_warnings records the calling frames."""
    sites = collections.Counter()
    orig = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "site-packages/torch/" not in f.filename and "warnings" not in f.filename]
        sites[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in frames[-5:][::-1])] += 1

    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        gen()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = orig
        warnings.resetwarnings()
    return {"count": sum(sites.values()), "sites": dict(sites.most_common(15))}


def _gpu_profile(gen, steps: int, top: int = 15) -> str:
    """torch.profiler over one generate(): the CUDA kernels with the most device time and the CPU ops with the
    most own time, per step, and how busy the GPU was (device time / wall time)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    avg = prof.key_averages()
    dev = sorted((e for e in avg if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    busy = sum(e.self_device_time_total for e in dev) / 1e3
    lines = [f"wall {wall / steps:.2f} ms/step (profiled), GPU busy {busy / steps:.2f} ms/step"]
    for e in dev[:top]:
        lines.append(f"  gpu {e.self_device_time_total / 1e3 / steps:8.3f} ms/step  {e.count // steps:5d}/step  "
                     f"{e.key[:90]}")
    cpu = sorted(avg, key=lambda e: -e.self_cpu_time_total)
    for e in cpu[:top]:
        lines.append(f"  cpu {e.self_cpu_time_total / 1e3 / steps:8.3f} ms/step  {e.count // steps:5d}/step  "
                     f"{e.key[:90]}")
    return "\n".join(lines)


def _manual_loop(model, context, steps, reps=3):
    """A decode loop without generate(): (host ms/step to enqueue, wall ms/step after a sync), medians."""
    from transformers import DynamicCache

    ids, _ = e2e._prompt(1, context, model.device, model.config.vocab_size)
    key = e2e._cache_key(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        tok = model(ids, use_cache=True, logits_to_keep=1, **{key: cache}).logits[:, -1:].argmax(-1)
    hosts, walls = [], []
    for _ in range(reps + 1):
        host, wall = timed_steps(model, cache, tok, steps, key, context)
        hosts.append(host)
        walls.append(wall)
    del cache
    return sorted(hosts[1:])[reps // 2], sorted(walls[1:])[reps // 2]


def timed_steps(model, cache, tok, steps: int, key: str, context: int):
    """``steps`` greedy decode steps of a plain forward loop from ``cache`` (then cropped back to ``context``):
    (host ms per step to enqueue, wall ms per step after a sync)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            tok = model(tok, use_cache=True, logits_to_keep=1, **{key: cache}).logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    cache.crop(context)
    return (t1 - t0) * 1e3 / steps, (t2 - t0) * 1e3 / steps


class _Timed:
    """Wraps an attention function: host time per call."""

    def __init__(self, fn):
        self.fn, self.total, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0
            self.calls += 1


def ablation(model, context, steps) -> list:
    """generate() and a plain decode loop per implementation and per hf_flash switch, in one process."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    off = {"HF_FLASH_DECODE_GRAPHS": "0"}
    modes = [("sdpa", {}), (e2e.NULL_ATTENTION, {}), ("flashtri", {}), ("flashtri", off),
             ("flashtri", {"HF_FLASH_FUSED_DECODE": "0"}), ("flashtri", {}), ("flashtri", off), ("sdpa", {})]
    if os.environ.get("PROBE_MORE_MODES") == "1":
        modes[4:4] = [("flashtri", {"HF_FLASH_DECODE_PLAN": "0"}), ("flashtri", {"HF_FLASH_GROW_CACHE": "0"})]
    rows = []
    for impl, env in modes:
        os.environ.update(env)
        try:
            e2e._set_impl(model, impl)
            orig = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None
            timed = _Timed(orig) if orig is not None else None
            if timed is not None:
                ALL_ATTENTION_FUNCTIONS[impl] = timed
            try:
                gen_ms = e2e.decode_generate_ms(model, context, 1, steps, reps=3)
                calls0, total0 = (timed.calls, timed.total) if timed else (0, 0.0)
                host, wall = _manual_loop(model, context, steps)
                attn_us = ((timed.total - total0) / max(1, timed.calls - calls0) * 1e6) if timed else None
            finally:
                if timed is not None:
                    ALL_ATTENTION_FUNCTIONS[impl] = orig
        finally:
            for k in env:
                os.environ.pop(k, None)
        row = {"impl": impl, "env": env, "generate_ms_per_step": gen_ms, "loop_host_ms_per_step": host,
               "loop_wall_ms_per_step": wall, "attention_fn_host_us_per_call": attn_us}
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="probe_generate.json")
    ap.add_argument("--ablation", action="store_true", help="only the per-switch timing table")
    args = ap.parse_args()
    model = e2e.build_model(args.layers, torch.device("cuda"))
    result = {"layers": args.layers, "context": args.context, "steps": args.steps, "impls": {}}
    if args.ablation:
        result["ablation"] = ablation(model, args.context, args.steps)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return
    for impl in ("sdpa", "flashtri", e2e.NULL_ATTENTION, "flashtri"):
        e2e._set_impl(model, impl)
        ms = e2e.decode_generate_ms(model, args.context, 1, args.steps, reps=3)
        gen, _cache = e2e.prefilled_generate(model, args.context, 1, args.steps)
        gen()  # warm-up
        entry = {"ms_per_step": ms, "syncs": _sync_sites(gen)}
        prof = _profile(gen, args.steps)
        entry["profile_head"] = prof[:6000]
        entry["torch_profile"] = _gpu_profile(gen, args.steps)
        print(entry["torch_profile"], flush=True)
        result["impls"][impl + ("_again" if impl in result["impls"] else "")] = entry
        print(f"== {impl}: {ms:.2f} ms/step; syncs in one generate() of {args.steps} steps: "
              f"{entry['syncs']['count']}", flush=True)
        for site, n in entry["syncs"]["sites"].items():
            print(f"   {n:5d}  {site}")
        print(prof[:3000], flush=True)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
