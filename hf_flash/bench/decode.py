"""Decode benchmark (CUDA only): ``hf-flash bench decode``.

One query token per sequence against a KV cache, bfloat16, head dim 128, 32 query heads with 32 or 8 KV heads,
batch 1, 8 and 32, cache length 1k to 128k (cases whose cache would pass ``MAX_CACHE_GIB`` are skipped and
recorded as such; so is an SDPA backend whose expanded copy would pass ``MAX_EXPANDED_GIB``). The figure of
merit is KV bytes read per second: ``2 * batch * seqlen_k * nheads_k * headdim * 2 bytes / time`` (what the
attention must read at least), set against the device's copy bandwidth measured in the same run (bytes read +
bytes written per second of a 1 GiB device-to-device copy).

Implementations, all on the same cache:
  * ``hf_split``: hf_flash's split-KV kernel, ``num_splits`` from the heuristic, exact online softmax;
  * ``hf_unified``: the same with FlashDecoding++'s unified maximum (phi = 0; the scores here are ~N(0, 1), so
    no row falls back; the JSON records whether any did);
  * ``hf_nosplit``: ``num_splits=1`` (one program per sequence and KV head);
  * ``hf_split_m64``: the split kernel with the query tile padded to 64 rows instead of 16 (what the flat-GEMM
    padding saves);
  * ``sdpa_flash`` / ``sdpa_cudnn``: ``F.scaled_dot_product_attention`` with the FLASH_ATTENTION and
    CUDNN_ATTENTION backends on (b, h, s, d) transposed views of the cache. With 8 KV heads SDPA first tries
    ``enable_gqa=True``; a backend that refuses it gets the cache with its KV heads expanded to 32
    (``repeat_interleave``, done once outside the timing; its bytes/s still counts the unexpanded cache, the
    bytes a GQA kernel needs). Which form ran is recorded per case.

  * ``hf_split_triton``: ``hf_split`` with the Triton split kernel where the Hopper (Gluon, TMA) kernel would
    run (``HF_FLASH_GLUON_DECODE=0``; the same kernel elsewhere);
  * ``read_floor``: a kernel that only reads the cache's K and V once (a streaming sum): what one call that reads
    those bytes costs here, the floor of every implementation under the same timing.

Every call is captured in a CUDA graph and the graph replay is timed (median of ``triton.testing.do_bench``,
which flushes the L2 cache between repetitions, so caches that fit in L2 are read cold from HBM), so Python
launch overhead is not measured: this is the cost a graph-captured decode step pays. A capture that fails falls
back to timing the eager call, recorded per case. hf_flash outputs are compared with SDPA's.

For the three target shapes (``TARGETS``) the JSON's ``views`` also times each call (1) with the L2 flushed by
reading 256 MiB instead of do_bench's writing of zeros (whose dirty lines the next kernel's misses write back to
HBM first, which a decode step's previous kernels do not leave) and (2) as one layer of a model step: 32 calls on
32 caches (one per layer) captured in one graph, the replay's time / 32, where the graph launch is paid once.
Writes ``decode.json`` and ``decode.png`` (``decode_quick.*`` with ``quick``).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_flash.bench import common as C

DTYPE = torch.bfloat16
HEADDIM = 128
NHEADS = 32
KV_HEADS = (32, 8)
BATCHES = (1, 8, 32)
SEQLENS = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k
MAX_CACHE_GIB = 24.0  # the cache itself
MAX_EXPANDED_GIB = 32.0  # SDPA's expanded copy, when a backend refuses enable_gqa
IMPLS = ("hf_split", "hf_split_triton", "hf_unified", "hf_nosplit", "hf_split_m64", "sdpa_flash", "sdpa_cudnn",
         "read_floor")
LABELS = {"hf_split": "hf_flash split-KV", "hf_split_triton": "hf_flash split-KV, Triton kernel",
          "hf_unified": "hf_flash unified max", "hf_nosplit": "hf_flash no split",
          "hf_split_m64": "hf_flash split, M tile 64", "sdpa_flash": "SDPA flash", "sdpa_cudnn": "SDPA cuDNN",
          "read_floor": "read-only floor"}
STEP_LAYERS = 32  # calls per graph in the model-step view
SIZES = {
    "full": {"batches": BATCHES, "seqlens": SEQLENS, "kv_heads": KV_HEADS},
    "quick": {"batches": (1, 8), "seqlens": (4096, 65536), "kv_heads": KV_HEADS},
}
# The done-when targets of the decode issue: (nheads_k, seqlen_k, TB/s) at batch 1.
TARGETS = ((32, 65536, 2.75), (8, 16384, 2.4), (8, 4096, 1.3))


def copy_bandwidth_tbs(device, gib: float = 1.0) -> float:
    """Device-to-device copy rate, (read + write) bytes per second, in TB/s."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = C.time_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / (ms * 1e-3) / 1e12


@triton.jit
def _read_kernel(K, V, Y, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Sum the same stretch of K and of V per program: every byte read once, 16-byte loads from both."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ITERS):
        offs = (pid.to(tl.int64) * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(K + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += tl.load(V + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(Y + pid, tl.sum(acc, 0))


def read_floor_call(k, v):
    """fn() that reads contiguous k and v (same size) once each, in one launch."""
    n = k.numel()
    block, iters = 2048, 8
    grid = (triton.cdiv(n, block * iters),)
    y = torch.empty(grid[0], device=k.device)
    return lambda: _read_kernel[grid](k, v, y, n, BLOCK=block, ITERS=iters, num_warps=8)


_FLUSH: dict = {}


def time_clean_flush_ms(fn, reps: int = 100) -> float:
    """Median time of fn() (events around it) after the L2 was flushed by reading 256 MiB: the lines left in L2
    are clean, as a decode step's earlier kernels (weight reads) leave them."""
    if "call" not in _FLUSH:
        buf = torch.randn(2, 64 * 2**20, device="cuda", dtype=torch.bfloat16)
        _FLUSH["call"] = read_floor_call(buf[0], buf[1])
        _FLUSH["buf"] = buf
    flush = _FLUSH["call"]
    for _ in range(5):
        flush()
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in zip(starts, ends))[reps // 2]


class _Env:
    """Set environment variables inside a block (the decode kernel choice), restoring them after."""

    def __init__(self, **env):
        self.env = env

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


TRITON_KERNEL = {"HF_FLASH_GLUON_DECODE": "0"}


def _graph_or_eager(fn):
    """(callable to time, "graph" | "eager: <why>"): fn captured in a CUDA graph after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, "graph"
    except Exception as exc:  # noqa: BLE001 - recorded, then timed eagerly
        torch.cuda.synchronize()
        return fn, "eager: " + C.short_error(exc)


def _sdpa_call(name, q, k, v, gqa_form):
    """fn() for an SDPA backend; q (b, 1, h, d), k/v (b, s, hk, d); gqa_form "enable_gqa" or "expanded"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kwargs = {"enable_gqa": True} if gqa_form == "enable_gqa" else {}

    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, **kwargs)

    return fn


def _case(batch, seqlen, nheads_k, device, gen):
    from hf_flash import kvcache
    from hf_flash.kernels import decode as D

    d, h = HEADDIM, NHEADS
    scale = d ** -0.5
    q = torch.randn(batch, 1, h, d, device=device, dtype=DTYPE, generator=gen)
    k = torch.randn(batch, seqlen, nheads_k, d, device=device, dtype=DTYPE, generator=gen)
    v = torch.randn(batch, seqlen, nheads_k, d, device=device, dtype=DTYPE, generator=gen)
    lens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    kv_bytes = 2 * batch * seqlen * nheads_k * d * k.element_size()
    rows, outs = [], {}
    cfg = D.decode_config(d, h // nheads_k, device)
    split_count = kvcache.num_splits_heuristic(batch, nheads_k, seqlen, D.num_sms(device), 1, cfg["BLOCK_N"])

    def hf(unified=None, splits=0, block_m=None):
        def fn():
            return D.split_kv_forward(q, k, v, softmax_scale=scale, seqlens_k=lens, num_splits=splits,
                                      unified_max=unified, block_m=block_m)[0]
        return fn

    def triton_kernel(fn):
        def wrapped():
            with _Env(**TRITON_KERNEL):
                return fn()
        return wrapped

    calls = {"hf_split": hf(), "hf_split_triton": triton_kernel(hf()), "hf_unified": hf(unified=0.0),
             "hf_nosplit": hf(splits=1), "hf_split_m64": hf(block_m=64), "read_floor": read_floor_call(k, v)}
    expanded = None
    for impl in IMPLS:
        form = "native"
        try:
            if impl.startswith("sdpa"):
                form = "enable_gqa" if nheads_k != h else "native"
                fn = _sdpa_call(impl, q, k, v, form)
                try:
                    fn()
                except Exception:  # noqa: BLE001 - this backend wants equal head counts: expand once
                    if nheads_k == h:
                        raise
                    if expanded is None:
                        need = 2 * k.numel() * (h // nheads_k) * k.element_size() / 2**30
                        if need > MAX_EXPANDED_GIB:
                            raise RuntimeError(f"not run: the backend needs KV heads expanded, a {need:.0f} GiB "
                                               f"copy (over {MAX_EXPANDED_GIB} GiB)")
                        expanded = (k.repeat_interleave(h // nheads_k, dim=2),
                                    v.repeat_interleave(h // nheads_k, dim=2))
                    form = "expanded"
                    fn = _sdpa_call(impl, q, expanded[0], expanded[1], form)
                outs[impl] = fn().transpose(1, 2)
            elif impl == "read_floor":
                fn = calls[impl]
            else:
                fn = calls[impl]
                outs[impl] = fn()
            timed, how = _graph_or_eager(fn)
            ms, err = C.try_time(timed)
        except Exception as exc:  # noqa: BLE001 - the failure is the measurement
            torch.cuda.synchronize()
            ms, err, how = None, C.short_error(exc), None
        tbs = kv_bytes / (ms * 1e-3) / 1e12 if ms else None
        row = {"impl": impl, "batch": batch, "seqlen_k": seqlen, "nheads": h, "nheads_k": nheads_k, "ms": ms,
               "kv_tbs": tbs, "error": err, "timing": how, "gqa_form": form if impl.startswith("sdpa") else None}
        if impl == "hf_unified":
            flags = D.last_fallback_flags
            row["fallback_programs"] = int(flags.sum().item()) if flags is not None else None
        if impl in ("hf_unified", "hf_split_m64", "hf_split_triton"):
            row["num_splits"] = split_count
        rows.append(row)
    ref = outs.get("sdpa_flash") if outs.get("sdpa_flash") is not None else outs.get("sdpa_cudnn")
    for row in rows:
        out = outs.get(row["impl"])
        if ref is not None and out is not None and row["impl"].startswith("hf"):
            row["max_abs_diff_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
    del q, k, v, expanded, outs
    torch.cuda.empty_cache()
    return rows


def _views(nheads_k, seqlen, device, gen):
    """One target shape (batch 1) timed three ways per implementation: per call as in the grid (do_bench's
    zero-writing flush), per call after a read-only flush, and per layer of a ``STEP_LAYERS``-layer step captured
    in one graph (a cache per layer)."""
    from hf_flash.kernels import decode as D

    d, h = HEADDIM, NHEADS
    qs = [torch.randn(1, 1, h, d, device=device, dtype=DTYPE, generator=gen) for _ in range(STEP_LAYERS)]
    ks = [torch.randn(1, seqlen, nheads_k, d, device=device, dtype=DTYPE, generator=gen) for _ in range(STEP_LAYERS)]
    vs = [torch.randn(1, seqlen, nheads_k, d, device=device, dtype=DTYPE, generator=gen) for _ in range(STEP_LAYERS)]
    lens = torch.full((1,), seqlen, dtype=torch.int32, device=device)
    kv_bytes = 2 * seqlen * nheads_k * d * 2
    form = "enable_gqa" if nheads_k != h else "native"

    def hf(env):
        def make(q, k, v):
            def fn():
                with _Env(**env):
                    return D.split_kv_forward(q, k, v, softmax_scale=d ** -0.5, seqlens_k=lens)[0]
            return fn
        return make

    makers = {"hf_split": hf({}), "hf_split_triton": hf(TRITON_KERNEL),
              "sdpa_cudnn": lambda q, k, v: _sdpa_call("sdpa_cudnn", q, k, v, form),
              "sdpa_flash": lambda q, k, v: _sdpa_call("sdpa_flash", q, k, v, form),
              "read_floor": lambda q, k, v: read_floor_call(k, v)}
    row = {"batch": 1, "nheads": h, "nheads_k": nheads_k, "seqlen_k": seqlen, "layers": STEP_LAYERS}
    for name, make in makers.items():
        try:
            calls = [make(q, k, v) for q, k, v in zip(qs, ks, vs)]
            one, how = _graph_or_eager(calls[0])
            zero_ms = C.time_ms(one)
            clean_ms = time_clean_flush_ms(one)

            def step():
                for call in calls:
                    call()
            step_fn, step_how = _graph_or_eager(step)
            step_ms = C.time_ms(step_fn) / STEP_LAYERS
            row[name] = {"per_call_tbs": kv_bytes / zero_ms / 1e9, "per_call_clean_l2_tbs": kv_bytes / clean_ms / 1e9,
                         "step_tbs": kv_bytes / step_ms / 1e9, "per_call_us": zero_ms * 1e3,
                         "per_call_clean_l2_us": clean_ms * 1e3, "step_us_per_layer": step_ms * 1e3,
                         "timing": how if how == step_how else f"{how} / step {step_how}"}
        except Exception as exc:  # noqa: BLE001 - the failure is the measurement
            torch.cuda.synchronize()
            row[name] = {"error": C.short_error(exc)}
    del qs, ks, vs
    torch.cuda.empty_cache()
    return row


def _cases(sz):
    cases = []
    for hk in sz["kv_heads"]:
        for b in sz["batches"]:
            for s in sz["seqlens"]:
                cases.append((b, s, hk))
    return cases


def _cache_gib(b, s, hk):
    return 2 * b * s * hk * HEADDIM * 2 / 2**30


def _targets(rows, views=()):
    out = []
    view_of = {(v["nheads_k"], v["seqlen_k"]): v for v in views}
    for hk, s, target in TARGETS:
        got = {r["impl"]: r["kv_tbs"] for r in rows
               if r["batch"] == 1 and r["seqlen_k"] == s and r["nheads_k"] == hk}
        hf_best = max((v for k, v in got.items() if k.startswith("hf") and v is not None), default=None)
        floor = got.get("read_floor")
        sdpa_best = max((v for k, v in got.items() if k.startswith("sdpa") and v is not None), default=None)
        out.append({"nheads": NHEADS, "nheads_k": hk, "seqlen_k": s, "batch": 1, "target_tbs": target,
                    "hf_split_tbs": got.get("hf_split"), "hf_unified_tbs": got.get("hf_unified"),
                    "hf_best_tbs": hf_best, "sdpa_best_tbs": sdpa_best, "read_floor_tbs": floor,
                    "hf_split_triton_tbs": got.get("hf_split_triton"),
                    "met": None if got.get("hf_split") is None else got["hf_split"] >= target})
        view = view_of.get((hk, s), {})
        for impl in ("hf_split", "sdpa_cudnn", "read_floor"):
            for key in ("per_call_clean_l2_tbs", "step_tbs"):
                out[-1][f"{impl}_{key}"] = view.get(impl, {}).get(key)
    return out


def _fmt3(*xs) -> str:
    return " / ".join("-" if x is None else f"{x:.2f}" for x in xs)


def _unified_verdict(rows):
    """Geometric mean of split time / unified time over the cases both ran: > 1 means unified is faster."""
    by = {}
    for r in rows:
        by.setdefault((r["batch"], r["seqlen_k"], r["nheads_k"]), {})[r["impl"]] = r["ms"]
    logs = [math.log(v["hf_split"] / v["hf_unified"]) for v in by.values()
            if v.get("hf_split") and v.get("hf_unified")]
    logs_m = [math.log(v["hf_split_m64"] / v["hf_split"]) for v in by.values()
              if v.get("hf_split") and v.get("hf_split_m64")]
    gm = math.exp(sum(logs) / len(logs)) if logs else None
    gm_m = math.exp(sum(logs_m) / len(logs_m)) if logs_m else None
    return {"unified_speedup_geomean": gm, "unified_wins": None if gm is None else gm > 1.0,
            "m16_vs_m64_speedup_geomean": gm_m}


def _table(rows, copy_tbs):
    by = {}
    for r in rows:
        by.setdefault((r["nheads_k"], r["batch"], r["seqlen_k"]), {})[r["impl"]] = r["kv_tbs"]
    table_rows = [[f"{NHEADS}/{hk}", b, f"{s // 1024}k" if s >= 1024 else str(s)] + [v.get(i) for i in IMPLS]
                  for (hk, b, s), v in sorted(by.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2]))]
    return {"title": f"decode: KV TB/s (bf16, d={HEADDIM}, seqlen_q 1); device copy rate {copy_tbs:.2f} TB/s",
            "columns": ["heads q/kv", "batch", "cache"] + [LABELS[i] for i in IMPLS], "rows": table_rows}


def _plot(rows, copy_tbs, env, sz, quick, out_dir):
    panels = []
    for hk in sz["kv_heads"]:
        for b in sz["batches"]:
            xs = list(sz["seqlens"])
            series = {}
            for impl in IMPLS:
                vals = {r["seqlen_k"]: r["kv_tbs"] for r in rows
                        if r["impl"] == impl and r["batch"] == b and r["nheads_k"] == hk}
                series[LABELS[impl]] = [vals.get(s) for s in xs]
            series["device copy rate"] = [copy_tbs] * len(xs)
            panels.append({"title": f"batch {b}, {NHEADS} q / {hk} kv heads", "x": xs, "series": series,
                           "xlabel": "cache length (tokens)", "ylabel": "KV read TB/s", "xlog": True})
    path = C.result_path(out_dir, "decode", quick, "png")
    return C.plot_panels(path, panels, suptitle=f"decode, bf16, d={HEADDIM} on {env.get('device')}",
                         ncols=len(sz["batches"]))


def run(quick: bool = False, out_dir: str = "benchmarks/results") -> dict:
    device = C.require_cuda("hf-flash bench decode")
    env = C.env_info()
    gen = torch.Generator(device=device).manual_seed(0)
    sz = SIZES["quick" if quick else "full"]
    copy_tbs = copy_bandwidth_tbs(device)
    rows, skipped = [], []
    cases = _cases(sz)
    for b, s, hk in C.progress(cases, desc="decode grid", total=len(cases)):
        if _cache_gib(b, s, hk) > MAX_CACHE_GIB:
            skipped.append({"batch": b, "seqlen_k": s, "nheads_k": hk,
                            "why": f"cache over {MAX_CACHE_GIB} GiB"})
            continue
        rows.extend(_case(b, s, hk, device, gen))
    views = [_views(hk, s, device, gen) for hk, s, _ in C.progress(TARGETS, desc="decode target views",
                                                                   total=len(TARGETS))]
    result = {
        "benchmark": "decode",
        "quick": quick,
        "env": env,
        "config": {"dtype": "bfloat16", "headdim": HEADDIM, "nheads": NHEADS, "seqlen_q": 1,
                   "kv_bytes": "2 * batch * seqlen_k * nheads_k * headdim * 2",
                   "copy_rate": "(read + write) bytes / time of a 1 GiB device copy",
                   "timing": "CUDA-graph replay, median of triton.testing.do_bench (L2 flushed between reps)",
                   "sdpa_layout": "(b, h, s, d) transposed views; enable_gqa, else KV heads expanded once"},
        "copy_tbs": copy_tbs,
        "grid": rows,
        "skipped": skipped,
        "targets": _targets(rows, views),
        "views": views,
        "variants": _unified_verdict(rows),
    }
    result["table"] = _table(rows, copy_tbs)
    summary = [["device copy rate TB/s", copy_tbs]]
    for t in result["targets"]:
        shape = f"b1 {NHEADS}/{t['nheads_k']} {t['seqlen_k'] // 1024}k"
        summary.append([f"{shape} split-KV TB/s (target {t['target_tbs']})", t["hf_split_tbs"]])
        summary.append([f"{shape} read-only floor TB/s, same timing", t["read_floor_tbs"]])
        summary.append([f"{shape} split-KV / cuDNN / floor TB/s, clean-L2 flush",
                        _fmt3(t["hf_split_per_call_clean_l2_tbs"], t["sdpa_cudnn_per_call_clean_l2_tbs"],
                              t["read_floor_per_call_clean_l2_tbs"])])
        summary.append([f"{shape} split-KV / cuDNN / floor TB/s, {STEP_LAYERS}-layer step",
                        _fmt3(t["hf_split_step_tbs"], t["sdpa_cudnn_step_tbs"], t["read_floor_step_tbs"])])
    summary.append(["unified max vs split speed (geomean)", result["variants"]["unified_speedup_geomean"]])
    summary.append(["M tile 16 vs 64 speed (geomean)", result["variants"]["m16_vs_m64_speedup_geomean"]])
    result["summary"] = summary
    files = [C.write_json({k: v for k, v in result.items() if k != "table"},
                          C.result_path(out_dir, "decode", quick, "json"))]
    png = _plot(rows, copy_tbs, env, sz, quick, out_dir)
    if png:
        files.append(png)
    result["files"] = files
    return result
