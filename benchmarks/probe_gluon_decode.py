"""The Gluon (TMA) split-KV decode kernel against the Triton one, cuDNN and FLASH on the same caches.

    python benchmarks/probe_gluon_decode.py [OUT_DIR] [--quick]

1. checks: outputs of ``split_kv_forward`` with the Gluon kernel (its launch counted) against a float64
   reference on odd cases (device lengths, left padding, cache rows, seqlen_q > 1 causal, fp16, one split), next
   to the Triton kernel's error on the same inputs;
2. per call, as `hf-flash bench decode` times it (each call its own CUDA-graph replay, L2 flushed between reps):
   Triton split-KV, Gluon split-KV, SDPA cuDNN / FLASH, and a read-only kernel over the same bytes (the floor of
   one call that reads the cache);
3. a sweep of the Gluon kernel's key block, ring depth and split count at 4k / 16k (32/8 heads);
4. a model step's view: 32 calls on 32 caches in one graph (per-layer time);
5. per-kernel GPU times under graph replay (profiler).
Writes probe_gluon_decode.json into OUT_DIR (default: current folder) and prints one JSON line per result.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

from hf_flash.bench.decode import _Env, _sdpa_call, read_floor_call, time_clean_flush_ms  # noqa: E402
from hf_flash.kernels import decode as D  # noqa: E402
from hf_flash.kernels import gluon_decode as GD  # noqa: E402
from hf_flash.kernels.gluon_attention import _producer, _release_ring  # noqa: E402
from probe_decode import graph_of  # noqa: E402 - benchmarks/, this script's folder
from hf_flash.reference import attention_ref  # noqa: E402

DT = torch.bfloat16
RES: dict = {"checks": [], "per_call": [], "sweep": [], "chain": [], "kernels": [], "ablate": []}


def emit(kind, row):
    RES[kind].append(row)
    print(json.dumps({kind: row}), flush=True)


@gluon.jit
def _stream_consumer(k_full, v_full, k_empty, v_empty, n_tiles, NSTAGES: gl.constexpr):
    _release_ring(k_full, v_full, k_empty, v_empty, 0, n_tiles, NSTAGES)


@gluon.jit
def _stream_kernel(k_desc, v_desc, chunk, nheads_k, HEAD_D: gl.constexpr, BN: gl.constexpr,
                   NSTAGES: gl.constexpr):
    """The Gluon decode kernel's producer and ring with a consumer that only releases the slots: the rate at
    which the kernel's TMA pipeline can stream the cache with no arithmetic."""
    bh = gl.program_id(0)
    split = gl.program_id(1)
    b = bh // nheads_k
    kvh = bh % nheads_k
    n_tiles = chunk // BN
    k_smem, v_smem, k_full, v_full, k_empty, v_empty = GD._kv_ring(k_desc, v_desc, NSTAGES, BN, HEAD_D)
    gl.warp_specialize([
        (_stream_consumer, (k_full, v_full, k_empty, v_empty, n_tiles, NSTAGES)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_full, v_full, k_empty, v_empty, b, kvh, split * chunk,
                     n_tiles, BN, HEAD_D, NSTAGES)),
    ], [1], [24])


def stream_call(k, v, splits, bn=64, stages=4):
    chunk = k.shape[1] // splits
    grid = (k.shape[0] * k.shape[2], splits)
    kd, vd = GD._desc(k, bn), GD._desc(v, bn)
    return lambda: _stream_kernel[grid](kd, vd, chunk, k.shape[2], HEAD_D=128, BN=bn, NSTAGES=stages, num_warps=4)


def time_read_flush(fn):
    """Per-call time of fn, captured in a graph, with the L2 flushed by a read-only pass (clean lines) where
    do_bench's flush writes zeros (dirty lines the next kernel's misses must write back first)."""
    return time_clean_flush_ms(graph_of(fn).replay)


def ablate(gen, quick):
    """Where the per-call time goes at 4k / 16k: the TMA stream alone (no arithmetic), the read-only kernel, and
    the decode kernels, under do_bench's zero-writing flush and under a read-only flush; kernel times without a
    flush from the profiler."""
    for b, s, hk in ((1, 4096, 8), (1, 16384, 8), (1, 65536, 32)):
        q, k, v, lens = make(b, s, hk, gen)
        kv = 2 * k.numel() * 2
        row = dict(batch=b, seqlen=s, hk=hk)
        calls = {"read_only": read_floor_call(k, v)}
        for splits in (16, 33):
            if s % (splits * 64) == 0 or splits == 16:
                calls[f"stream_s{splits}"] = stream_call(k, v, splits)
        calls["stream_s16_bn128_st3"] = stream_call(k, v, 16, 128, 3)
        dec = lambda: D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens)  # noqa: E731
        dec16 = lambda: D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens,  # noqa: E731
                                           num_splits=16 if hk == 8 else 4)
        for name, fn, env in [(n, f, {}) for n, f in calls.items()] + [
                ("triton", dec, TRITON), ("gluon", dec, GLUON), ("gluon_s16", dec16, GLUON),
                ("triton_pdl", dec, dict(TRITON, HF_FLASH_DECODE_PDL="1")),
                ("sdpa_cudnn", _sdpa_call("sdpa_cudnn", q, k, v, "enable_gqa" if hk != 32 else "native"), {})]:
            try:
                zero_ms = with_env(env, lambda: time_graph(fn))
                read_ms = with_env(env, lambda: time_read_flush(fn))
                row[name] = dict(zero_flush_tbs=kv / zero_ms / 1e9, read_flush_tbs=kv / read_ms / 1e9,
                                 zero_flush_us=zero_ms * 1e3, read_flush_us=read_ms * 1e3)
            except Exception as exc:  # noqa: BLE001
                row[name] = dict(error=str(exc)[:200])
        emit("ablate", row)


def time_graph(fn):
    g = graph_of(fn)
    return triton.testing.do_bench(g.replay, warmup=25, rep=150, return_mode="median")


def with_env(env: dict, fn):
    with _Env(**env):
        return fn()


TRITON = {"HF_FLASH_GLUON_DECODE": "0"}
GLUON = {"HF_FLASH_GLUON_DECODE": "1"}


def checks(gen):
    _checks(gen, "default")


def _checks(gen, label):
    cases = [
        # batch, seqlen_q, heads, kv heads, capacity, lengths, leftpad, cache rows, dtype, causal, splits
        (1, 1, 32, 8, 4096, [4096], None, None, DT, False, 0),
        (1, 1, 32, 8, 16384, [16384], None, None, DT, False, 0),
        (1, 1, 32, 32, 3001, [2999], None, None, DT, False, 0),
        (3, 1, 32, 8, 5000, [1, 4097, 3333], [0, 100, 1000], None, DT, False, 0),
        (2, 1, 28, 4, 2048, [2048, 777], None, [3, 0], torch.float16, False, 0),
        (2, 4, 32, 8, 1500, [1500, 1111], [5, 0], None, DT, True, 0),
        (1, 8, 64, 8, 4100, [4100], None, None, DT, True, 0),
        (2, 1, 32, 8, 700, [700, 0], None, None, DT, False, 1),
        (2, 1, 32, 8, 9000, [9000, 64], [0, 64], None, DT, False, 7),
    ]
    for b, sq, h, hk, cap, lens, lp, bidx, dt, causal, splits in cases:
        rows_cache = (max(bidx) + 1) if bidx else b
        q = torch.randn(b, sq, h, 128, device="cuda", dtype=dt, generator=gen)
        k = torch.randn(rows_cache, cap, hk, 128, device="cuda", dtype=dt, generator=gen)
        v = torch.randn(rows_cache, cap, hk, 128, device="cuda", dtype=dt, generator=gen)
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        leftpad = torch.tensor(lp, dtype=torch.int32, device="cuda") if lp else None
        batch_idx = torch.tensor(bidx, dtype=torch.int32, device="cuda") if bidx else None
        kw = dict(softmax_scale=128 ** -0.5, seqlens_k=seqlens, leftpad=leftpad, batch_idx=batch_idx,
                  num_splits=splits, window_right=0 if causal else -1)
        before = D.LAUNCHES["split_kv_gluon"]
        out_g, lse_g = with_env(GLUON, lambda: D.split_kv_forward(q, k, v, **kw))
        ran = D.LAUNCHES["split_kv_gluon"] - before
        out_t, lse_t = with_env(TRITON, lambda: D.split_kv_forward(q, k, v, **kw))
        errs_g, errs_t, lse_err = [], [], []
        for i in range(b):
            lo = lp[i] if lp else 0
            row = bidx[i] if bidx else i
            if lens[i] - lo <= 0:
                errs_g.append(out_g[i].abs().max().item())
                errs_t.append(out_t[i].abs().max().item())
                lse_err.append(0.0 if bool(torch.isinf(lse_g[i]).all()) else float("nan"))
                continue
            o, _, lse = attention_ref(q[i:i + 1], k[row:row + 1, lo:lens[i]], v[row:row + 1, lo:lens[i]],
                                      causal=causal, upcast_dtype=torch.float64, return_lse=True)
            errs_g.append((out_g[i:i + 1].double() - o).abs().max().item())
            errs_t.append((out_t[i:i + 1].double() - o).abs().max().item())
            lse_err.append((lse_g[i:i + 1].double() - lse.double()).abs().max().item())
        emit("checks", dict(config=label, case=[b, sq, h, hk, cap, lens, lp, bidx, str(dt), causal, splits],
                            gluon_ran=ran,
                            err_gluon=max(errs_g), err_triton=max(errs_t), lse_err=max(lse_err),
                            finite=bool(torch.isfinite(out_g).all())))


def make(b, s, hk, gen, h=32):
    q = torch.randn(b, 1, h, 128, device="cuda", dtype=DT, generator=gen)
    k = torch.randn(b, s, hk, 128, device="cuda", dtype=DT, generator=gen)
    v = torch.randn_like(k)
    lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    return q, k, v, lens


def per_call(gen, quick):
    shapes = [(1, 4096, 8), (1, 16384, 8), (1, 65536, 32), (1, 131072, 8), (8, 16384, 8)]
    if quick:
        shapes = shapes[:2]
    for b, s, hk in shapes:
        q, k, v, lens = make(b, s, hk, gen)
        kv = 2 * k.numel() * 2
        row = dict(batch=b, seqlen=s, hk=hk)
        call = lambda: D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens)  # noqa: E731
        for name, env in (("triton", TRITON), ("gluon", GLUON)):
            ms = with_env(env, lambda: time_graph(call))
            row[name] = dict(us=ms * 1e3, tbs=kv / ms / 1e9)
        for name in ("sdpa_cudnn", "sdpa_flash"):
            try:
                fn = _sdpa_call(name, q, k, v, "enable_gqa" if hk != 32 else "native")
                ms = time_graph(fn)
                row[name] = dict(us=ms * 1e3, tbs=kv / ms / 1e9)
            except Exception as exc:  # noqa: BLE001 - the failure is the measurement
                row[name] = dict(error=str(exc)[:120])
        ms = time_graph(read_floor_call(k, v))
        row["read_only"] = dict(us=ms * 1e3, tbs=kv / ms / 1e9)
        emit("per_call", row)


def sweep(gen, quick):
    configs = [(64, 2, 1, 256), (64, 4, 1, 256), (64, 3, 1, 256), (64, 2, 2, 256), (128, 2, 1, 256),
               (64, 2, 1, 128), (64, 2, 1, 512)]
    if quick:
        configs = configs[:3]
    for b, s, hk in ((1, 4096, 8), (1, 16384, 8), (1, 131072, 8)):
        q, k, v, lens = make(b, s, hk, gen)
        kv = 2 * k.numel() * 2
        for bn, st, pps, mk in configs:
            env = dict(GLUON, HF_FLASH_GLUON_DECODE_CONFIG=f"{bn},{st},{pps},{mk}")
            call = lambda: D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens)  # noqa: E731
            try:
                ms = with_env(env, lambda: time_graph(call))
                splits = D.num_splits_heuristic(b, hk, s, D.num_sms(q.device), 1, bn, programs_per_sm=pps,
                                                min_keys_per_split=mk, min_efficiency=0.95)
                emit("sweep", dict(seqlen=s, hk=hk, block_n=bn, stages=st, pps=pps, min_keys=mk, splits=splits,
                                   us=ms * 1e3, tbs=kv / ms / 1e9))
            except Exception as exc:  # noqa: BLE001
                emit("sweep", dict(seqlen=s, block_n=bn, stages=st, pps=pps, min_keys=mk, error=str(exc)[:200]))
        for splits in (8, 12, 16, 24, 32, 48):
            call = lambda: D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens,  # noqa: E731
                                              num_splits=splits)
            ms = with_env(GLUON, lambda: time_graph(call))
            emit("sweep", dict(seqlen=s, hk=hk, splits=splits, default_config=True, us=ms * 1e3, tbs=kv / ms / 1e9))


def chain(gen, quick):
    layers = 32
    for s, hk in ((4096, 8), (16384, 8)):
        qs = [torch.randn(1, 1, 32, 128, device="cuda", dtype=DT, generator=gen) for _ in range(layers)]
        ks = [torch.randn(1, s, hk, 128, device="cuda", dtype=DT, generator=gen) for _ in range(layers)]
        vs = [torch.randn_like(k) for k in ks]
        lens = torch.full((1,), s, dtype=torch.int32, device="cuda")
        kv = 2 * ks[0].numel() * 2 * layers

        def hf():
            for q, k, v in zip(qs, ks, vs):
                D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens)
        row = dict(seqlen=s, hk=hk, layers=layers)
        for name, env in (("triton", TRITON), ("gluon", GLUON),
                          ("triton_pdl", dict(TRITON, HF_FLASH_DECODE_PDL="1"))):
            ms = with_env(env, lambda: time_graph(hf))
            row[name] = dict(us_per_layer=ms * 1e3 / layers, tbs=kv / ms / 1e9)
        calls = [_sdpa_call("sdpa_cudnn", q, k, v, "enable_gqa") for q, k, v in zip(qs, ks, vs)]

        def cud():
            for c in calls:
                c()
        ms = time_graph(cud)
        row["sdpa_cudnn"] = dict(us_per_layer=ms * 1e3 / layers, tbs=kv / ms / 1e9)
        emit("chain", row)


def kernel_times(gen):
    from torch.profiler import ProfilerActivity, profile
    for s, hk in ((4096, 8), (16384, 8)):
        q, k, v, lens = make(1, s, hk, gen)
        for name, env in (("triton", TRITON), ("gluon", GLUON)):
            g = with_env(env, lambda: graph_of(lambda: D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5,
                                                                         seqlens_k=lens)))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(50):
                    g.replay()
                torch.cuda.synchronize()
            ks = {e.key[:50]: e.device_time_total / max(1, e.count) for e in prof.key_averages()
                  if e.device_time_total > 0}
            emit("kernels", dict(seqlen=s, hk=hk, impl=name, us=ks))


def main():
    out_dir = next((a for a in sys.argv[1:] if not a.startswith("--")), ".")
    quick = "--quick" in sys.argv
    gen = torch.Generator(device="cuda").manual_seed(0)
    RES["device"] = torch.cuda.get_device_name()
    RES["versions"] = dict(torch=torch.__version__, triton=triton.__version__)
    parts = [checks, per_call, sweep, chain, kernel_times, ablate]
    only = next((a[len("--only="):] for a in sys.argv if a.startswith("--only=")), None)
    if only:
        parts = [p for p in parts if p.__name__ in only.split(",")]
    for part in parts:
        try:
            part(gen, quick) if part not in (checks, kernel_times) else part(gen)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next part
            import traceback
            traceback.print_exc()
            RES.setdefault("errors", []).append(f"{part.__name__}: {type(exc).__name__}: {exc}"[:500])
        torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "probe_gluon_decode.json"), "w") as f:
        json.dump(RES, f, indent=1)
    for r in RES["per_call"]:
        print("per call", r["batch"], r["seqlen"], r["hk"], {k: round(v.get("tbs", 0), 3) for k, v in r.items()
                                                           if isinstance(v, dict)})
    for r in RES["chain"]:
        print("chain", r["seqlen"], {k: round(v["tbs"], 3) for k, v in r.items() if isinstance(v, dict)})


if __name__ == "__main__":
    main()
