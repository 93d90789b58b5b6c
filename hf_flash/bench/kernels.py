"""Attention kernel benchmark (CUDA only): ``hf-flash bench kernels``.

Group 1, FlashAttention-2's paper grid: hidden size 2048 (nheads = 2048 / headdim), head dims 64 and 128,
seqlen 512 to 16k with batch = 16384 / seqlen, causal and not, bfloat16. Forward and forward+backward TFLOP/s
for hf_flash's FA2 form (``flash_attn_func``), its FA1 form (``flash_attn_fa1_func``), and PyTorch SDPA with the
FLASH_ATTENTION and CUDNN_ATTENTION backends. FLOPs as in the paper: ``4 * b * h * s * s * d`` forward, 2.5x
that for the backward (so 3.5x for forward+backward), halved for causal. hf_flash gets (batch, seqlen, heads,
headdim) tensors; SDPA gets (batch, heads, seqlen, headdim) transposed views of the same tensors (no copy), as a
model with that layout would pass them. The forward is timed with inputs that require grad (a training
forward: every implementation saves its log-sum-exp). Each hf_flash/cuDNN output is also compared with SDPA's
FLASH_ATTENTION output, so a fast but wrong kernel shows up in the results file.

Group 2, the features of issue 4, as ratios in the same run:
  * varlen: a batch of mixed lengths through ``flash_attn_varlen_func`` vs the padded dense call vs SDPA on the
    padded batch with the padding+causal mask;
  * sliding window (4k, plus 1k and 16k in a full run) on a 32k causal sequence vs full causal: the time ratio
    is set beside the FLOP ratio, since the cost must scale with the window;
  * dropout 0.1 forward+backward vs SDPA (FLASH_ATTENTION backend) with dropout 0.1;
  * a float bias (batch, heads, N, N) forward+backward vs SDPA with the same float mask, without and with a
    gradient for the bias.

Ratios are always other-implementation time / hf_flash time (= hf_flash TFLOP/s / other TFLOP/s): > 1 means
hf_flash is faster. A case that errors is recorded as null with its error message.
Writes ``kernels.json``, ``kernels.png`` and ``kernels_features.png`` (``kernels_quick.*`` with ``quick``).
"""

from __future__ import annotations

import contextlib
import statistics

import torch
import torch.nn.functional as F

from hf_flash.bench import common as C

HIDDEN = 2048
HEADDIMS = (64, 128)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS = 16384
DTYPE = torch.bfloat16
IMPLS = ("hf_flash_fa2", "hf_flash_fa1", "sdpa_flash", "sdpa_cudnn")
LABELS = {"hf_flash_fa2": "hf_flash FA2", "hf_flash_fa1": "hf_flash FA1", "sdpa_flash": "SDPA flash",
          "sdpa_cudnn": "SDPA cuDNN"}
MODES = ("fwd", "fwd_bwd")

# Problem sizes per run kind; tests shrink them to run the plumbing on the CPU with stand-in kernels.
SIZES = {
    "full": {"headdims": HEADDIMS, "seqlens": SEQLENS, "tokens": TOKENS, "hidden": HIDDEN,
             "varlen": (16, 128, 4096, 16, 128),  # (sequences, min len, max len, nheads, headdim)
             "window": (32768, 16, 128, (1024, 4096, 16384)),  # (seqlen, nheads, headdim, windows)
             "dropout": (8, 2048, 16, 128),  # (batch, seqlen, nheads, headdim)
             "bias": (2, 2048, 16, 128)},
    "quick": {"headdims": (128,), "seqlens": (1024, 4096), "tokens": TOKENS, "hidden": HIDDEN,
              "varlen": (8, 64, 1024, 16, 128),
              "window": (32768, 16, 128, (4096,)),
              "dropout": (2, 2048, 16, 128),
              "bias": (1, 1024, 16, 128)},
}


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


def _impl(name):
    """(context manager factory, fn(q, k, v, causal) on (b, s, h, d) tensors returning (b, s, h, d))."""
    import hf_flash

    if name == "hf_flash_fa2":
        return contextlib.nullcontext, lambda q, k, v, causal: hf_flash.flash_attn_func(q, k, v, causal=causal)
    if name == "hf_flash_fa1":
        fa1 = getattr(hf_flash, "flash_attn_fa1_func", None)

        def run_fa1(q, k, v, causal):
            if fa1 is None:
                raise NotImplementedError("hf_flash.flash_attn_fa1_func is not in this build")
            return fa1(q, k, v, causal=causal)

        return contextlib.nullcontext, run_fa1

    def run_sdpa(q, k, v, causal):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal)
        return out.transpose(1, 2)

    return (lambda: _sdpa_backend(name)), run_sdpa


def _measure(fn, ctx, inputs, mode, dout=None):
    """Median ms of the forward or forward+backward of ``fn(*inputs)`` under ``ctx()``; (ms, error)."""
    if mode == "fwd":
        call = lambda: fn(*inputs)  # noqa: E731
        grads = None
    else:
        call = lambda: fn(*inputs).backward(dout)  # noqa: E731
        grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    try:
        with ctx():
            return C.try_time(call, grad_to_none=grads)
    except Exception as exc:  # noqa: BLE001 - entering the context can fail on old torch
        return None, C.short_error(exc)


def _max_diff(a, b):
    if a is None or b is None:
        return None
    return (a.float() - b.float()).abs().max().item()


def _grid(sz, device, gen, rows, accuracy):
    """Appends to ``rows``/``accuracy`` as it goes, so an interrupted run keeps what it measured."""
    headdims, seqlens = sz["headdims"], sz["seqlens"]
    configs = [(d, s, causal) for d in headdims for s in seqlens for causal in (False, True)]
    bar = C.progress(configs, desc="kernels: paper grid")
    for d, s, causal in bar:
        h, b = sz["hidden"] // d, max(1, sz["tokens"] // s)
        q, k, v = (torch.randn(b, s, h, d, device=device, dtype=DTYPE, generator=gen).requires_grad_(True)
                   for _ in range(3))
        dout = torch.randn(b, s, h, d, device=device, dtype=DTYPE, generator=gen)
        outs = {}
        for impl in IMPLS:
            ctx, fn = _impl(impl)
            try:
                with torch.no_grad(), ctx():
                    outs[impl] = fn(q, k, v, causal)
            except Exception as exc:  # noqa: BLE001 - recorded below through the timing error
                outs[impl] = None
                del exc
            for mode in MODES:
                ms, err = _measure(fn, ctx, (q, k, v, causal), mode, dout)
                flops = C.attention_flops(b, h, s, s, d, causal, mode)
                rows.append({"impl": impl, "mode": mode, "headdim": d, "nheads": h, "batch": b, "seqlen": s,
                             "causal": causal, "ms": ms, "tflops": C.tflops(flops, ms), "error": err})
        for impl in ("hf_flash_fa2", "hf_flash_fa1", "sdpa_cudnn"):
            accuracy.append({"impl": impl, "headdim": d, "seqlen": s, "causal": causal,
                             "max_abs_diff_vs_sdpa_flash": _max_diff(outs.get(impl), outs.get("sdpa_flash"))})
        del q, k, v, dout, outs
        torch.cuda.empty_cache()


def _ratio_rows(rows):
    by_key = {(r["mode"], r["headdim"], r["seqlen"], r["causal"], r["impl"]): r for r in rows}
    keys = sorted({(r["mode"], r["headdim"], r["seqlen"], r["causal"]) for r in rows},
                  key=lambda t: (MODES.index(t[0]), t[3], t[1], t[2]))
    out = []
    for mode, d, s, causal in keys:
        tf = {impl: by_key.get((mode, d, s, causal, impl), {}).get("tflops") for impl in IMPLS}
        base = tf["sdpa_flash"]
        out.append({"mode": mode, "headdim": d, "seqlen": s, "causal": causal, "tflops": tf,
                    "fa2_vs_sdpa_flash": C.ratio(tf["hf_flash_fa2"], base),
                    "fa1_vs_sdpa_flash": C.ratio(tf["hf_flash_fa1"], base),
                    "cudnn_vs_sdpa_flash": C.ratio(tf["sdpa_cudnn"], base)})
    return out


# -------------------------------------------------------------------------------------------------------------
# group 2: features

def _varlen(sz, device, gen):
    import hf_flash

    nseq, lo, hi, h, d = sz["varlen"]
    lens = torch.randint(lo, hi + 1, (nseq,), generator=torch.Generator().manual_seed(0)).tolist()
    total, maxlen = sum(lens), max(lens)
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(nseq)], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(total, h, d, device=device, dtype=DTYPE, generator=gen).requires_grad_(True)
                  for _ in range(3))
    dout_v = torch.randn(total, h, d, device=device, dtype=DTYPE, generator=gen)
    qp, kp, vp = (torch.randn(nseq, maxlen, h, d, device=device, dtype=DTYPE, generator=gen).requires_grad_(True)
                  for _ in range(3))
    dout_p = torch.randn(nseq, maxlen, h, d, device=device, dtype=DTYPE, generator=gen)
    keep = torch.arange(maxlen, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    causal_mask = torch.ones(maxlen, maxlen, dtype=torch.bool, device=device).tril()
    sdpa_mask = causal_mask[None, None] & keep[:, None, None, :]

    def varlen(q, k, v):
        return hf_flash.flash_attn_varlen_func(q, k, v, cu, cu, maxlen, maxlen, causal=True)

    def dense(q, k, v):
        return hf_flash.flash_attn_func(q, k, v, causal=True)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=sdpa_mask).transpose(1, 2)

    res = {"lengths": lens, "total_tokens": total, "max_seqlen": maxlen, "nheads": h, "headdim": d,
           "causal": True, "padding_waste": 1 - total / (nseq * maxlen)}
    for mode in MODES:
        for name, fn, inputs, dout in (("varlen", varlen, (qv, kv, vv), dout_v),
                                       ("padded_dense", dense, (qp, kp, vp), dout_p),
                                       ("sdpa_padded_masked", sdpa, (qp, kp, vp), dout_p)):
            ms, err = _measure(fn, contextlib.nullcontext, inputs, mode, dout)
            res[f"{name}_{mode}_ms"] = ms
            if err:
                res[f"{name}_{mode}_error"] = err
        res[f"speedup_vs_padded_dense_{mode}"] = C.ratio(res[f"padded_dense_{mode}_ms"], res[f"varlen_{mode}_ms"])
        res[f"speedup_vs_sdpa_padded_{mode}"] = C.ratio(res[f"sdpa_padded_masked_{mode}_ms"],
                                                        res[f"varlen_{mode}_ms"])
    return res


def _window(sz, device, gen):
    import hf_flash

    s, h, d, windows = sz["window"]
    b = 1
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=DTYPE, generator=gen).requires_grad_(True)
               for _ in range(3))
    dout = torch.randn(b, s, h, d, device=device, dtype=DTYPE, generator=gen)
    points = []
    for w in (None,) + windows:
        ws = (-1, -1) if w is None else (w, 0)
        fn = lambda q_, k_, v_, ws=ws: hf_flash.flash_attn_func(q_, k_, v_, causal=True, window_size=ws)  # noqa: E731
        point = {"window": w}
        for mode in MODES:
            ms, err = _measure(fn, contextlib.nullcontext, (q, k, v), mode, dout)
            point[f"{mode}_ms"] = ms
            point[f"{mode}_flops"] = C.attention_flops(b, h, s, s, d, True, mode, window=w)
            point[f"{mode}_tflops"] = C.tflops(point[f"{mode}_flops"], ms)
            if err:
                point[f"{mode}_error"] = err
        points.append(point)
    full = points[0]
    for p in points[1:]:
        for mode in MODES:
            p[f"{mode}_time_ratio_to_full"] = C.ratio(p[f"{mode}_ms"], full[f"{mode}_ms"])
            p[f"{mode}_flop_ratio_to_full"] = C.ratio(p[f"{mode}_flops"], full[f"{mode}_flops"])
            t, f = p[f"{mode}_time_ratio_to_full"], p[f"{mode}_flop_ratio_to_full"]
            # the cost must follow the work: allow 2x the FLOP ratio for the diagonal blocks and launch overhead
            p[f"{mode}_scales_with_window"] = None if t is None else bool(t <= 2 * f)
    return {"seqlen": s, "batch": b, "nheads": h, "headdim": d, "causal": True, "points": points}


def _dropout(sz, device, gen):
    import hf_flash

    b, s, h, d = sz["dropout"]
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=DTYPE, generator=gen).requires_grad_(True)
               for _ in range(3))
    dout = torch.randn(b, s, h, d, device=device, dtype=DTYPE, generator=gen)
    res = {"batch": b, "seqlen": s, "nheads": h, "headdim": d, "causal": True, "dropout_p": 0.1}
    for p in (0.0, 0.1):
        def ours(q_, k_, v_, p=p):
            return hf_flash.flash_attn_func(q_, k_, v_, dropout_p=p, causal=True)

        def sdpa(q_, k_, v_, p=p):
            return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                  dropout_p=p, is_causal=True).transpose(1, 2)

        tag = "p0" if p == 0 else "p0.1"
        for name, fn, ctx in (("hf_flash", ours, contextlib.nullcontext),
                              ("sdpa_flash", sdpa, lambda: _sdpa_backend("sdpa_flash"))):
            ms, err = _measure(fn, ctx, (q, k, v), "fwd_bwd", dout)
            res[f"{name}_{tag}_fwd_bwd_ms"] = ms
            if err:
                res[f"{name}_{tag}_error"] = err
    res["ratio_vs_sdpa_fwd_bwd"] = C.ratio(res["sdpa_flash_p0.1_fwd_bwd_ms"], res["hf_flash_p0.1_fwd_bwd_ms"])
    res["hf_flash_dropout_overhead"] = C.ratio(res["hf_flash_p0.1_fwd_bwd_ms"], res["hf_flash_p0_fwd_bwd_ms"])
    res["sdpa_dropout_overhead"] = C.ratio(res["sdpa_flash_p0.1_fwd_bwd_ms"], res["sdpa_flash_p0_fwd_bwd_ms"])
    return res


def _bias(sz, device, gen):
    import hf_flash

    b, s, h, d = sz["bias"]
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=DTYPE, generator=gen).requires_grad_(True)
               for _ in range(3))
    dout = torch.randn(b, s, h, d, device=device, dtype=DTYPE, generator=gen)
    res = {"batch": b, "seqlen": s, "nheads": h, "headdim": d, "causal": False, "bias_shape": [b, h, s, s],
           "bias_dtype": str(DTYPE).replace("torch.", "")}
    for grad in (False, True):
        bias = torch.randn(b, h, s, s, device=device, dtype=DTYPE, generator=gen).requires_grad_(grad)

        def ours(q_, k_, v_, bias_):
            return hf_flash.flash_attn_func(q_, k_, v_, attn_bias=bias_)

        def sdpa(q_, k_, v_, bias_):
            return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                  attn_mask=bias_).transpose(1, 2)

        tag = "bias_grad" if grad else "bias"
        # the bias is passed as an input so that its gradient is reset between repetitions
        for name, fn in (("hf_flash", ours), ("sdpa", sdpa)):
            ms, err = _measure(fn, contextlib.nullcontext, (q, k, v, bias), "fwd_bwd", dout)
            res[f"{name}_{tag}_fwd_bwd_ms"] = ms
            if err:
                res[f"{name}_{tag}_error"] = err
        res[f"ratio_vs_sdpa_{tag}_fwd_bwd"] = C.ratio(res[f"sdpa_{tag}_fwd_bwd_ms"], res[f"hf_flash_{tag}_fwd_bwd_ms"])
        del bias
    return res


# -------------------------------------------------------------------------------------------------------------

def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _tables(ratios, features, sz):
    grid = {"title": f"Attention kernels, bf16, hidden {sz['hidden']}, batch x seqlen = {sz['tokens']}: TFLOP/s "
                     "and ratio to SDPA FLASH_ATTENTION (> 1: faster)",
            "columns": ["mode", "causal", "d", "seqlen", "FA2", "FA1", "SDPA-FA", "cuDNN", "FA2/SDPA", "FA1/SDPA",
                        "cuDNN/SDPA"],
            "rows": [[r["mode"], r["causal"], r["headdim"], r["seqlen"], r["tflops"]["hf_flash_fa2"],
                      r["tflops"]["hf_flash_fa1"], r["tflops"]["sdpa_flash"], r["tflops"]["sdpa_cudnn"],
                      r["fa2_vs_sdpa_flash"], r["fa1_vs_sdpa_flash"], r["cudnn_vs_sdpa_flash"]] for r in ratios]}
    rows = []
    vl = features.get("varlen")
    for mode in MODES if vl else ():
        rows.append([f"varlen {mode} ({len(vl['lengths'])} seqs, {vl['padding_waste']:.0%} padding)",
                     vl[f"varlen_{mode}_ms"], vl[f"padded_dense_{mode}_ms"],
                     vl[f"speedup_vs_padded_dense_{mode}"], "vs padded hf_flash"])
        rows.append([f"varlen {mode}", vl[f"varlen_{mode}_ms"], vl[f"sdpa_padded_masked_{mode}_ms"],
                     vl[f"speedup_vs_sdpa_padded_{mode}"], "vs SDPA padded+mask"])
    wd = features.get("window", {"points": []})
    full = wd["points"][0] if wd["points"] else None
    for p in wd["points"][1:]:
        for mode in MODES:
            rows.append([f"window {p['window']} / full causal, {wd['seqlen']}, {mode}", p[f"{mode}_ms"], full[f"{mode}_ms"],
                         p[f"{mode}_time_ratio_to_full"],
                         f"time ratio (FLOP ratio {_fmt(p[f'{mode}_flop_ratio_to_full'])}, scales: "
                         f"{p[f'{mode}_scales_with_window']})"])
    dr = features.get("dropout")
    if dr:
        rows.append(["dropout 0.1 fwd+bwd", dr["hf_flash_p0.1_fwd_bwd_ms"], dr["sdpa_flash_p0.1_fwd_bwd_ms"],
                     dr["ratio_vs_sdpa_fwd_bwd"], "vs SDPA flash with dropout"])
    bs = features.get("bias")
    for tag, what in (("bias", "float bias fwd+bwd"), ("bias_grad", "float bias + dbias fwd+bwd")) if bs else ():
        rows.append([what, bs[f"hf_flash_{tag}_fwd_bwd_ms"], bs[f"sdpa_{tag}_fwd_bwd_ms"],
                     bs[f"ratio_vs_sdpa_{tag}_fwd_bwd"], "vs SDPA with the same float mask"])
    feat = {"title": "Features (bf16): hf_flash ms, other ms, ratio other/hf_flash (> 1: hf_flash faster; "
                     "window rows: time ratio to full causal)",
            "columns": ["case", "hf_flash ms", "other ms", "ratio", "against"], "rows": rows}
    return [grid, feat]


def _summary(ratios, features):
    def stat(key, mode, min_seqlen=2048):
        vals = [r[key] for r in ratios if r["mode"] == mode and r["seqlen"] >= min_seqlen and r[key] is not None]
        if not vals:
            return "-"
        return f"min {min(vals):.2f} / median {statistics.median(vals):.2f}"

    s = [["kernels: FA2/SDPA-FA fwd (s>=2k)", stat("fa2_vs_sdpa_flash", "fwd")],
         ["kernels: FA2/SDPA-FA fwd+bwd (s>=2k)", stat("fa2_vs_sdpa_flash", "fwd_bwd")],
         ["kernels: FA1/SDPA-FA fwd (s>=2k)", stat("fa1_vs_sdpa_flash", "fwd")],
         ["kernels: cuDNN/SDPA-FA fwd (s>=2k)", stat("cudnn_vs_sdpa_flash", "fwd")]]
    if set(features) != {"varlen", "window", "dropout", "bias"}:
        s.append(["kernels: features", f"only {', '.join(features) or 'none'} measured (interrupted)"])
        return s
    vl, dr, bs = features["varlen"], features["dropout"], features["bias"]
    s.append(["kernels: varlen speedup fwd+bwd vs padded / vs SDPA",
              f"{_fmt(vl['speedup_vs_padded_dense_fwd_bwd'])} / {_fmt(vl['speedup_vs_sdpa_padded_fwd_bwd'])}"])
    wpts = features["window"]["points"][1:]
    w4 = next((p for p in wpts if p["window"] == 4096), wpts[0] if wpts else None)
    if w4:
        s.append([f"kernels: window {w4['window']}/full time fwd+bwd (FLOP ratio)",
                  f"{_fmt(w4['fwd_bwd_time_ratio_to_full'])} ({_fmt(w4['fwd_bwd_flop_ratio_to_full'])})"])
    s.append(["kernels: dropout 0.1 fwd+bwd vs SDPA", _fmt(dr["ratio_vs_sdpa_fwd_bwd"])])
    s.append(["kernels: float bias fwd+bwd vs SDPA (with dbias)",
              f"{_fmt(bs['ratio_vs_sdpa_bias_fwd_bwd'])} ({_fmt(bs['ratio_vs_sdpa_bias_grad_fwd_bwd'])})"])
    return s


def _plots(ratios, features, env, quick, out_dir):
    files = []
    panels = []
    headdims = sorted({r["headdim"] for r in ratios})
    for mode in MODES:
        for causal in (False, True):
            for d in headdims:
                sel = sorted((r for r in ratios if r["mode"] == mode and r["causal"] == causal
                              and r["headdim"] == d), key=lambda r: r["seqlen"])
                if not sel:
                    continue
                panels.append({"title": f"{'fwd+bwd' if mode == 'fwd_bwd' else 'fwd'}, "
                                        f"{'causal' if causal else 'non-causal'}, d={d}",
                               "x": [r["seqlen"] for r in sel], "xlog": True, "xlabel": "seqlen",
                               "ylabel": "TFLOP/s",
                               "series": {LABELS[i]: [r["tflops"][i] for r in sel] for i in IMPLS}})
    title = f"hf_flash attention kernels, bf16, {env.get('device')}, torch {env.get('torch')}, " \
            f"triton {env.get('triton')}, {env.get('date', '')[:10]}"
    path = C.plot_panels(C.result_path(out_dir, "kernels", quick, "png"), panels, suptitle=title,
                         ncols=2 * len(headdims))
    if path:
        files.append(path)
    if set(features) != {"varlen", "window", "dropout", "bias"}:
        return files
    vl, dr, bs = features["varlen"], features["dropout"], features["bias"]
    labels = ["varlen vs padded", "varlen vs SDPA pad", "dropout vs SDPA", "bias vs SDPA", "bias+dbias vs SDPA"]
    vals = [vl["speedup_vs_padded_dense_fwd_bwd"], vl["speedup_vs_sdpa_padded_fwd_bwd"], dr["ratio_vs_sdpa_fwd_bwd"],
            bs["ratio_vs_sdpa_bias_fwd_bwd"], bs["ratio_vs_sdpa_bias_grad_fwd_bwd"]]
    wpts = features["window"]["points"]
    feat_panels = [
        {"title": "fwd+bwd ratio other/hf_flash (>1: hf_flash faster)", "x": labels, "kind": "bar", "hline": 1.0,
         "series": {"ratio": vals}},
        {"title": f"sliding window, {features['window']['seqlen']} causal: time and FLOPs as ratio to full",
         "xlabel": "window (left)", "x": [p["window"] for p in wpts[1:]],
         "kind": "bar", "series": {"time fwd+bwd": [p.get("fwd_bwd_time_ratio_to_full") for p in wpts[1:]],
                                   "FLOPs": [p.get("fwd_bwd_flop_ratio_to_full") for p in wpts[1:]]}},
    ]
    path = C.plot_panels(C.result_path(out_dir, "kernels_features", quick, "png"), feat_panels, suptitle=title,
                         ncols=2)
    if path:
        files.append(path)
    return files


def run(quick: bool = False, out_dir: str = "benchmarks/results") -> dict:
    device = C.require_cuda("hf-flash bench kernels")
    env = C.env_info()
    gen = torch.Generator(device=device).manual_seed(0)
    sz = SIZES["quick" if quick else "full"]
    rows, accuracy, features = [], [], {}
    interrupted = False
    try:
        _grid(sz, device, gen, rows, accuracy)
        for name, fn in C.progress((("varlen", _varlen), ("window", _window), ("dropout", _dropout),
                                    ("bias", _bias)), desc="kernels: features", total=4):
            features[name] = fn(sz, device, gen)
            torch.cuda.empty_cache()
    except KeyboardInterrupt:  # e.g. the time budget of gpu_run.sh (SIGINT): keep what was measured
        interrupted = True
    ratios = _ratio_rows(rows)
    result = {
        "benchmark": "kernels",
        "quick": quick,
        "env": env,
        "config": {"dtype": "bfloat16", "hidden": sz["hidden"], "tokens_per_batch": sz["tokens"],
                   "flops": "fwd 4*b*h*s*s*d, fwd+bwd 3.5x, halved when causal (FlashAttention-2 paper)",
                   "forward_timing": "inputs require grad (training forward)",
                   "timing": "median of triton.testing.do_bench (L2 flushed between repetitions)",
                   "sdpa_layout": "(b, h, s, d) transposed views of the (b, s, h, d) tensors"},
        "grid": rows,
        "ratios": ratios,
        "accuracy": accuracy,
        "features": features,
        "interrupted": interrupted,
    }
    result["table"] = _tables(ratios, features, sz)
    result["summary"] = _summary(ratios, features)
    files = [C.write_json({k: v for k, v in result.items() if k != "table"},
                          C.result_path(out_dir, "kernels", quick, "json"))]
    files += _plots(ratios, features, env, quick, out_dir)
    result["files"] = files
    return result
