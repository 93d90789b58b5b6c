"""Host time of a graphed decode step (patches/graphs.py) and what the first generate() pays to capture (GPU box).

    python benchmarks/probe_graph_host.py --layers 8 --context 4096 --out probe_graph_host.json

Llama-3-8B shapes with fewer layers, batch 1, a prefilled DynamicCache: the wall time of a first generate()
without graphs (it compiles the decode kernels), of the first with graphs (it captures every layer's graphs)
and of the next one; the host time to enqueue a plain decode
loop's step and its wall time, with graphs on and off (``HF_FLASH_DECODE_GRAPHS=0``) in turn; and a cProfile of
the graphed loop (functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hf_flash.bench import e2e  # noqa: E402
from hf_flash.patches import graphs  # noqa: E402
from probe_generate import timed_steps  # noqa: E402 - beside this script


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="probe_graph_host.json")
    args = ap.parse_args()
    model = e2e.build_model(args.layers, torch.device("cuda"))
    result = {"layers": args.layers, "context": args.context, "steps": args.steps,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    gen, cache = e2e.prefilled_generate(model, args.context, 1, args.steps)
    firsts = []
    # the first call without graphs compiles the decode kernels; the next (graphs on) captures every layer
    for off in (True, False, False):
        if off:
            os.environ["HF_FLASH_DECODE_GRAPHS"] = "0"
        before = graphs.STATS["captured"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen()
        torch.cuda.synchronize()
        firsts.append({"graphs": not off, "ms": (time.perf_counter() - t0) * 1e3,
                       "captured": graphs.STATS["captured"] - before})
        os.environ.pop("HF_FLASH_DECODE_GRAPHS", None)
    result["generate_calls"] = firsts
    print("generate() calls:", firsts, flush=True)

    from transformers import DynamicCache

    key = e2e._cache_key(model)
    ids, _ = e2e._prompt(1, args.context, model.device, model.config.vocab_size)
    loop_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        tok = model(ids, use_cache=True, logits_to_keep=1, **{key: loop_cache}).logits[:, -1:].argmax(-1)
    rows = []
    for mode in ("on", "off", "on", "off"):
        if mode == "off":
            os.environ["HF_FLASH_DECODE_GRAPHS"] = "0"
        timed_steps(model, loop_cache, tok, 4, key, args.context)  # warm-up (captures when on)
        host, wall = timed_steps(model, loop_cache, tok, args.steps, key, args.context)
        os.environ.pop("HF_FLASH_DECODE_GRAPHS", None)
        rows.append({"graphs": mode, "host_ms_per_step": host, "wall_ms_per_step": wall,
                     "host_us_per_layer": host * 1e3 / args.layers})
        print(rows[-1], flush=True)
    result["loop"] = rows

    prof = cProfile.Profile()
    prof.enable()
    timed_steps(model, loop_cache, tok, args.steps, key, args.context)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    result["profile"] = s.getvalue()
    print(s.getvalue()[:6000], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
