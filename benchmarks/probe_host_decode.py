"""Host time of one layer's attention in a decode step, piece by piece, "flashtri" against "sdpa" (GPU box).

    python benchmarks/probe_host_decode.py [--context 4096] [--calls 2000] [--rounds 5] [--out FILE]

A default generate() is host-bound at every context measured (benchmarks/NOTES.md): what a decode step costs is
mostly the Python and launch work of its 32 layers. This times, per call, in one process and in turn over several
rounds (the host's speed drifts by tens of percent between runs, so only neighbours compare):

* ``torch.add`` of a tiny tensor (the host's launch speed), ``torch.empty``;
* the cache update of one layer: transformers' ``DynamicLayer.update`` (``torch.cat``) and hf_flash's
  ``GrowingLayer.update`` (in place), cropped back every 64 calls;
* the attention function alone, as a Llama attention module calls it in a decode step (q of one token, K/V views
  of the cache, the 2-D mask of ones that generate() passes to "flashtri", none for "sdpa"):
  ``flashtri_attention_forward`` and transformers' ``sdpa_attention_forward``; and inside flashtri's,
  ``kvcache.decode_attention`` and the recorded plan's call;
* the same with the GPU synchronised after every call (wall time per call: what the kernels take when the
  host is not the limit).

* a decode step through 8 ``LlamaAttention`` modules (projections, rotary, cache update, attention, output
  projection) with an 8-layer DynamicCache, per layer: "sdpa", "flashtri" (the fused step of patches/llama.py),
  "flashtri" with ``HF_FLASH_FUSED_DECODE=0``.

Then a cProfile of the flashtri attention function (own time per call). Llama-3-8B attention shapes: 32 query
heads, 8 KV heads, head dim 128, bf16, batch 1.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import hf_flash  # noqa: E402,F401 - registers "flashtri"
from hf_flash import kvcache  # noqa: E402
from hf_flash.patches import attention as patt  # noqa: E402
from hf_flash.patches import cache as pcache  # noqa: E402


def per_call_us(fn, calls: int, sync_each: bool = False) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if sync_each:
        for _ in range(calls):
            fn()
            torch.cuda.synchronize()
    else:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import transformers
    from transformers import LlamaConfig
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaAttention

    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      num_hidden_layers=1, intermediate_size=256, vocab_size=128)
    cfg._attn_implementation = "flashtri"
    module = LlamaAttention(cfg, layer_idx=0).to(dev, dt).eval()
    L = a.context
    g = torch.Generator(device=dev).manual_seed(0)
    k0 = torch.randn(1, 8, L, 128, device=dev, dtype=dt, generator=g)
    v0 = torch.randn_like(k0)
    knew = torch.randn(1, 8, 1, 128, device=dev, dtype=dt, generator=g)
    vnew = torch.randn_like(knew)
    q = torch.randn(1, 1, 32, 128, device=dev, dtype=dt, generator=g).transpose(1, 2)  # as the module makes it
    mask = torch.ones(1, L + 1, dtype=torch.long, device=dev)
    scale = 128 ** -0.5

    def layer(cls):
        lay = DynamicLayer()
        lay.update(k0.clone(), v0.clone())
        lay.__class__ = cls
        return lay

    dyn, grow = layer(DynamicLayer), layer(pcache.growing_layer_class())
    with torch.no_grad():
        grow.update(knew, vnew)  # the first in-place update allocates the buffer
        grow.crop(-1)
    counter = {"dyn": 0, "grow": 0}

    def update(lay, name):
        def fn():
            lay.update(knew, vnew)
            counter[name] += 1
            if counter[name] % 64 == 0:
                lay.crop(-64)
        return fn

    # K/V of the attention call: views of the growing buffer, L + 1 tokens (a step's cache after its update)
    with torch.no_grad():
        kv_k, kv_v = grow.update(knew, vnew)
    ft = lambda: patt.flashtri_attention_forward(module, q, kv_k, kv_v, mask, dropout=0.0, scaling=scale)  # noqa
    sd = lambda: sdpa_attention_forward(module, q, kv_k, kv_v, None, dropout=0.0, scaling=scale)  # noqa: E731
    qf, kf, vf = (x.transpose(1, 2) for x in (q, kv_k, kv_v))
    lengths = patt._decode_lengths(mask[:, -(L + 1):])
    da = lambda: kvcache.decode_attention(qf, kf, vf, lengths[0], lengths[1], scale, True, (-1, -1), 0.0)  # noqa
    da()
    plan = next(reversed(kvcache._PLANS.values()))
    pl = lambda: plan(qf, kf, vf, lengths[0], lengths[1])  # noqa: E731
    # a whole attention module's decode step (projections, rotary, cache update, attention, output projection):
    # transformers' "sdpa" module, hf_flash's fused step, and hf_flash's with HF_FLASH_FUSED_DECODE=0
    from transformers import DynamicCache

    ckw = "past_key_values" if transformers.__version__.startswith("5.17") else "cache"

    def module_step(impl, fused=True, layers=8):
        """One decode step through ``layers`` attention modules (a model's layers: the first of a step records a
        decode plan, the others replay it); the time is reported per layer."""
        c = LlamaConfig(**cfg.to_dict())
        c._attn_implementation = impl
        mods = [LlamaAttention(c, layer_idx=i).to(dev, dt).eval() for i in range(layers)]
        cache = DynamicCache()
        for i, mod in enumerate(mods):
            if impl == "flashtri":
                patt.plan_for(mod)  # installs the growing cache and the fused decode forward
            cache.update(k0.clone(), v0.clone(), i)
        h = torch.randn(1, 1, 4096, device=dev, dtype=dt, generator=g)
        pe = (torch.randn(1, 1, 128, device=dev, dtype=dt, generator=g),
              torch.randn(1, 1, 128, device=dev, dtype=dt, generator=g))
        calls = [0]

        def fn():
            for mod in mods:
                mod(hidden_states=h, position_embeddings=pe, attention_mask=None, use_cache=True, **{ckw: cache})
            calls[0] += 1
            if calls[0] % 64 == 0:
                cache.crop(-64)
        fn.env = {} if fused else {"HF_FLASH_FUSED_DECODE": "0"}
        fn.per = layers
        return fn

    x = torch.empty(8, device=dev)
    cases = {
        "torch.add": lambda: torch.add(x, 1),
        "torch.empty": lambda: torch.empty((1, 1, 32, 128), dtype=dt, device=dev),
        "DynamicLayer.update (torch.cat)": update(dyn, "dyn"),
        "GrowingLayer.update (in place)": update(grow, "grow"),
        "sdpa_attention_forward": sd,
        "flashtri_attention_forward": ft,
        "kvcache.decode_attention": da,
        "DecodePlan call": pl,
        "LlamaAttention step per layer, sdpa": module_step("sdpa"),
        "LlamaAttention step per layer, flashtri fused": module_step("flashtri"),
        "LlamaAttention step per layer, flashtri unfused": module_step("flashtri", fused=False),
    }
    rows = {name: [] for name in cases}
    synced = {name: [] for name in ("sdpa_attention_forward", "flashtri_attention_forward",
                                    "LlamaAttention step per layer, sdpa",
                                    "LlamaAttention step per layer, flashtri fused")}
    with torch.no_grad():
        for r in range(a.rounds):
            for name, fn in cases.items():
                os.environ.update(getattr(fn, "env", {}))
                try:
                    per = getattr(fn, "per", 1)
                    rows[name].append(per_call_us(fn, max(1, a.calls // per)) / per)
                finally:
                    for var in getattr(fn, "env", {}):
                        os.environ.pop(var, None)
            for name in synced:
                per = getattr(cases[name], "per", 1)
                synced[name].append(per_call_us(cases[name], max(1, a.calls // 4 // per), sync_each=True) / per)
            print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rows.items()), flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.calls):
            ft()
        prof.disable()
        torch.cuda.synchronize()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(30)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "context": L, "calls": a.calls,
              "host_us_per_call_median": {n: round(statistics.median(v), 2) for n, v in rows.items()},
              "host_us_per_call_rounds": {n: [round(x, 2) for x in v] for n, v in rows.items()},
              "wall_us_per_call_synced_median": {n: round(statistics.median(v), 2) for n, v in synced.items()},
              "profile": f"cProfile of {a.calls} flashtri_attention_forward calls\n" + s.getvalue()[:8000]}
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))
    print(result["profile"])
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
