"""End-to-end benchmark of attn_implementation="flashtri" against "sdpa" (CUDA only): ``hf-flash bench e2e``.

Llama-3-8B shapes (hidden 4096, 32 layers, 32 query / 8 KV heads, head dim 128, MLP 14336, vocab 128256), random
weights, bfloat16, one model whose attention implementation is switched between "flashtri" and "sdpa" (the
same weights for both), everything measured in one run:

* decode time per step at 4k, 32k and 128k tokens of context with batch 1, and a left-padded batch of 8 at 4k:
  - ``generate()`` as users call it, with its default DynamicCache: the prompt is prefilled once, then
    ``generate(max_new_tokens=N)`` continues from that cache (cropped back after each repetition); the time of
    a step is the generate() wall time / N;
  - StaticCache + ``torch.compile(mode="reduce-overhead")`` of one decode step (the model's forward on one token
    per sequence, the static 2-D mask and position ids updated in place between steps); CUDA events around
    each step, median;
  - the floor of a default generate() step: the same generate() with an attention function that returns its
    query untouched (transformers' own time per step, which no attention implementation can go below);
  - the memory roofline of a step: (weight bytes read per token + KV-cache bytes read) / the device's copy rate
    measured in the same run (``dst.copy_(src)`` of 1 GiB: read + write bytes / time);
* prefill time at 32k and 128k (batch 1, a fresh DynamicCache, logits of the last token only);
* a training step (forward + backward with labels, bf16 weights and gradients, no optimizer state) at 4k and
  16k tokens, with and without gradient checkpointing: tokens/s and peak memory;
* ``long``: one ``generate()`` of 256 new tokens from a 128k-token prompt, as a user runs it (DynamicCache,
  greedy): time to the first token (the prefill), decode tokens/s over the other 255, peak memory above the
  weights, and how many leading tokens flashtri and sdpa agree on (bf16 with random weights: near-ties may
  flip a token, after which the sequences differ).

``quick=True`` runs 2 layers, contexts of 1k and 4k, fewer steps: a check of the plumbing, not the figures.
``HF_FLASH_E2E_PARTS`` (comma list of decode, static, prefill, train, long; default all) runs a subset, so each part
fits within a time-limited job; ``HF_FLASH_E2E_CONTEXTS`` (comma list of token counts) narrows the decode
contexts. Results go to ``e2e.json`` (written after every case, so an interrupted run keeps what it measured) and
``e2e.png``; a case that fails (out of memory, an unsupported path) is recorded as
null with its error. Ratios are sdpa time / flashtri time (> 1: flashtri is faster) and time / roofline.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time

import torch

from hf_flash.bench import common as C

IMPLS = ("flashtri", "sdpa")
PARTS = ("decode", "static", "prefill", "train", "long")

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 max_position_embeddings=131072 + 1024, rms_norm_eps=1e-5, tie_word_embeddings=False)

SIZES = {
    "full": dict(layers=32, decode=((4096, 1), (32768, 1), (131072, 1), (4096, 8)), prefill=(32768, 65536, 131072),
                 train=(4096, 16384), gen_steps=32, static_steps=48, reps=3, long=(131072, 256)),
    "quick": dict(layers=2, decode=((1024, 1), (4096, 1), (1024, 8)), prefill=(4096,), train=(1024,),
                  gen_steps=8, static_steps=12, reps=2, long=(4096, 16)),
}


def _sync():
    torch.cuda.synchronize()


def _wall_ms(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` (long calls: prefill, generate, training steps), synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _try(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - a failed case is a measurement too
        err = C.short_error(exc)
    _sync()
    torch.cuda.empty_cache()
    return None, err


def copy_rate(device) -> float:
    """Device memory copy rate in bytes/s: 1 GiB ``dst.copy_(src)``, counting read + write."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = C.time_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3)


def build_model(layers: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_flash  # noqa: F401 - registers "flashtri"

    cfg = LlamaConfig(**dict(LLAMA3_8B, num_hidden_layers=layers), attn_implementation="flashtri")
    torch.manual_seed(0)
    with torch.device(device):
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(dtype)
    return model.eval()


def _cache_key(model) -> str:
    """transformers 5.24 calls the cache argument ``cache``; 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every parameter except the input embedding (one row per token)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)


def kv_bytes(model, context: int, batch: int) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context * batch * 2


def _prompt(batch: int, context: int, device, vocab: int = 32000):
    g = torch.Generator(device="cpu").manual_seed(context + batch)
    ids = torch.randint(10, min(vocab, 32000), (batch, context), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):  # left padding of up to a quarter of the context, different per row
        mask[b, : (b * context) // (4 * batch)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), (mask.to(device) if batch > 1 else None)


# ------------------------------------------------------------------------------------------------- decode


def prefilled_generate(model, context: int, batch: int, steps: int):
    """(gen, cache): ``gen()`` runs ``generate()`` (greedy, DynamicCache) for ``steps`` tokens continuing from
    ``cache``, prefilled here with a ``context``-token prompt, and crops the cache back to the prompt."""
    from transformers import DynamicCache

    device = model.device
    ids, mask = _prompt(batch, context, device, model.config.vocab_size)
    key = _cache_key(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **{key: cache})
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    full = torch.cat([ids, nxt], dim=1)
    full_mask = None if mask is None else torch.cat([mask, torch.ones_like(nxt)], dim=1)

    def gen():
        model.generate(full, attention_mask=full_mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       pad_token_id=0, **{key: cache})
        cache.crop(-(int(cache.get_seq_length()) - context))  # negative: tokens to remove (5.17 and 5.24)

    return gen, cache


def decode_generate_ms(model, context: int, batch: int, steps: int, reps: int) -> float:
    """ms per step of ``generate()`` (greedy, DynamicCache) continuing from a prefilled prompt."""
    gen, cache = prefilled_generate(model, context, batch, steps)
    ms = _wall_ms(gen, reps)
    del gen, cache
    torch.cuda.empty_cache()
    return ms / steps


def decode_static_compiled_ms(model, context: int, batch: int, steps: int) -> dict:
    """One decode step with a StaticCache, the step's forward compiled with mode="reduce-overhead".

    Two figures: ``synced_ms``, the median CUDA-event time of one step with the host synchronised before it (the
    GPU also waits for the host's work of the call: dynamo's guards, the CUDA-graph tree's bookkeeping), and
    ``pipelined_ms``, the time per step of ``steps`` steps enqueued back to back (each step's token comes from
    the previous step's argmax on the GPU, no synchronisation in between), as a decode loop that does not stop
    on the host at every token runs them.
    """
    from transformers import StaticCache

    device = model.device
    ids, mask = _prompt(batch, context, device, model.config.vocab_size)
    max_len = context + 2 * steps + 8
    key = _cache_key(model)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    # a static 2-D mask over every cache slot: valid tokens 1, padding and not-yet-written slots 0
    mask_buf = torch.zeros(batch, max_len, dtype=torch.long, device=device)
    mask_buf[:, :context] = 1 if mask is None else mask
    with torch.no_grad():
        out = model(ids, attention_mask=mask_buf[:, :context], use_cache=True, logits_to_keep=1, **{key: cache})
    tok = out.logits[:, -1:].argmax(-1)
    del out
    pos = mask_buf[:, :context].sum(-1, keepdim=True)  # position of the next token of each row

    def step(tok, pos, mask_buf):
        return model(tok, attention_mask=mask_buf, position_ids=pos, use_cache=True, logits_to_keep=1,
                     **{key: cache}).logits

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=False, dynamic=False)
    times = []
    with torch.no_grad():
        for i in range(steps):
            mask_buf[:, context + i] = 1
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = compiled(tok, pos, mask_buf)
            end.record()
            tok = logits[:, -1:].argmax(-1)
            pos = pos + 1
            _sync()
            if i >= steps // 2:  # the first half warms up (compilation, CUDA-graph capture)
                times.append(start.elapsed_time(end))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps, 2 * steps):
            mask_buf[:, context + i] = 1
            logits = compiled(tok, pos, mask_buf)
            tok = logits[:, -1:].argmax(-1)
            pos = pos + 1
        end.record()
        _sync()
        pipelined = start.elapsed_time(end) / steps
    del cache, compiled
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"synced_ms": statistics.median(times), "pipelined_ms": pipelined}


# ------------------------------------------------------------------------------------------------- prefill, train


def prefill_ms(model, context: int, reps: int) -> dict:
    """Median prefill time and the peak memory the prefill adds on top of the weights (GiB): with attention
    memory linear in the prompt, the peak grows linearly from 32k to 64k to 128k."""
    from transformers import DynamicCache

    ids, _ = _prompt(1, context, model.device, model.config.vocab_size)
    key = _cache_key(model)

    def run():
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1, **{key: DynamicCache(config=model.config)})

    ms = _wall_ms(run, reps)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    torch.cuda.empty_cache()
    return {"ms": ms, "peak_gib": peak}


def long_generate(model, context: int, new_tokens: int) -> dict:
    """One greedy ``generate()`` of ``new_tokens`` from a ``context``-token prompt (after a short warm-up that
    compiles the kernels): prefill seconds (to the first token), decode tokens/s, total seconds, peak GiB above
    the weights, and the generated ids (for the agreement check; removed before saving)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    ids, _ = _prompt(1, context, model.device, model.config.vocab_size)
    stamps = []

    class Clock(LogitsProcessor):  # called once per new token, after that token's forward
        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:, :1024], max_new_tokens=4, min_new_tokens=4, **kw)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             logits_processor=LogitsProcessorList([Clock()]), **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    torch.cuda.empty_cache()
    decode_tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"prefill_s": stamps[0] - t0, "decode_tokens_per_s": decode_tps, "total_s": total, "peak_gib": peak,
            "new_tokens": int(out.shape[1] - context), "ids": out[0, context:].tolist()}


def train_step(model, tokens: int, checkpointing: bool, reps: int) -> dict:
    ids, _ = _prompt(1, tokens, model.device, model.config.vocab_size)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        for p in params:
            p.grad = None

    try:
        run()  # warm-up outside the peak measurement
        torch.cuda.reset_peak_memory_stats()
        ms = _wall_ms(run, reps, warmup=0)
        peak = torch.cuda.max_memory_allocated() / 2**30
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
    return {"ms": ms, "tokens_per_s": tokens / (ms * 1e-3), "peak_gib": peak}


# ------------------------------------------------------------------------------------------------- driver


# no "flash" in the name: transformers would treat it as a FlashAttention flavour and look for a hub kernel
NULL_ATTENTION = "null_attention_floor"


def _null_attention(module, query, key, value, attention_mask, **kwargs):
    return query.transpose(1, 2), None


def _set_impl(model, impl: str):
    if impl == NULL_ATTENTION:
        from transformers import AttentionInterface

        AttentionInterface.register(NULL_ATTENTION, _null_attention)
    model.set_attn_implementation(impl)
    if impl == "flashtri":
        import hf_flash

        hf_flash.patch_llama(model)


def _parts() -> tuple[str, ...]:
    env = os.environ.get("HF_FLASH_E2E_PARTS", "")
    if not env.strip():
        return PARTS
    parts = tuple(p.strip() for p in env.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise C.BenchUnavailable(f"HF_FLASH_E2E_PARTS has {bad}; accepted: {', '.join(PARTS)}")
    return parts


def _contexts(sz):
    """The decode / static contexts to run: ``HF_FLASH_E2E_CONTEXTS`` (comma list of token counts) narrows them."""
    env = os.environ.get("HF_FLASH_E2E_CONTEXTS", "").strip()
    if not env:
        return sz["decode"]
    want = {int(x) for x in env.split(",") if x.strip()}
    return tuple((c, b) for c, b in sz["decode"] if c in want)


def _cases(sz, parts):
    cases = []
    for context, batch in _contexts(sz):
        if "decode" in parts:
            cases.append(("decode", context, batch))
        if "static" in parts:
            cases.append(("static", context, batch))
    cases += [("prefill", n, 1) for n in sz["prefill"] if "prefill" in parts]
    if "long" in parts:
        cases.append(("long", sz["long"][0], 1))
    for n in sz["train"]:
        if "train" in parts:
            cases += [("train", n, 1), ("train_ckpt", n, 1)]
    return cases


def run(quick: bool = False, out_dir: str = "benchmarks/results") -> dict:
    device = C.require_cuda("hf-flash bench e2e")
    sz = SIZES["quick" if quick else "full"]
    parts = _parts()
    env = C.env_info()
    json_path = C.result_path(out_dir, "e2e", quick, "json")
    rate = copy_rate(device)
    model = build_model(sz["layers"], device)
    wbytes = weight_bytes_per_token(model)
    result = {"benchmark": "e2e", "quick": quick, "env": env,
              "config": {"model": "Llama-3-8B shapes, random weights", "layers": sz["layers"],
                         "dtype": "bfloat16", "parts": list(parts), "copy_rate_gb_s": rate / 1e9,
                         "weight_bytes_per_token": wbytes,
                         "decode_generate": f"generate() from a prefilled DynamicCache, {sz['gen_steps']} steps, "
                                            "wall time / steps, median of reps",
                         "decode_static": "StaticCache + torch.compile(mode='reduce-overhead') of one step; "
                                          "ms_per_step: steps enqueued back to back (no synchronisation between "
                                          "them), time / steps; synced_ms: median CUDA-event time of one step "
                                          "with the host synchronised before it",
                         "roofline": "(weight bytes + KV bytes) / copy rate",
                         "train": "forward + backward with labels, bf16 weights and grads, no optimizer"},
              "cases": []}

    def save():
        C.write_json(result, json_path)

    for kind, n, batch in C.progress(_cases(sz, parts), desc="e2e", total=len(_cases(sz, parts))):
        case = {"kind": kind, "tokens": n, "batch": batch}
        for impl in IMPLS:
            _set_impl(model, impl)
            if kind == "decode":
                ms, err = _try(lambda: decode_generate_ms(model, n, batch, sz["gen_steps"], sz["reps"]))
                case[impl] = {"ms_per_step": ms, "error": err}
            elif kind == "static":
                res, err = _try(lambda: decode_static_compiled_ms(model, n, batch, sz["static_steps"]))
                res = res or {}
                # the step of a decode loop that does not synchronise at every token; synced_ms beside it
                case[impl] = {"ms_per_step": res.get("pipelined_ms"), "synced_ms": res.get("synced_ms"),
                              "error": err}
            elif kind == "prefill":
                res, err = _try(lambda: prefill_ms(model, n, sz["reps"]))
                case[impl] = dict(res or {"ms": None}, error=err)
            elif kind == "long":
                res, err = _try(lambda: long_generate(model, n, sz["long"][1]))
                case[impl] = dict(res or {"prefill_s": None}, error=err)
            else:
                res, err = _try(lambda: train_step(model, n, kind == "train_ckpt", sz["reps"]))
                case[impl] = dict(res or {}, error=err)
        if kind in ("decode", "static"):
            roof = (wbytes + kv_bytes(model, n, batch)) / rate * 1e3
            case["roofline_ms"] = roof
            f, s = case["flashtri"]["ms_per_step"], case["sdpa"]["ms_per_step"]
            case["speedup_vs_sdpa"] = C.ratio(s, f)
            case["flashtri_over_roofline"] = C.ratio(f, roof)
            case["sdpa_over_roofline"] = C.ratio(s, roof)
            case["tokens_per_s"] = {impl: (batch * 1e3 / case[impl]["ms_per_step"]
                                           if case[impl]["ms_per_step"] else None) for impl in IMPLS}
            if kind == "static":  # one step with the host synchronised before it (see decode_static_compiled_ms)
                case["flashtri_synced_over_roofline"] = C.ratio(case["flashtri"].get("synced_ms"), roof)
                case["sdpa_synced_over_roofline"] = C.ratio(case["sdpa"].get("synced_ms"), roof)
            if kind == "decode":
                # the same generate() with an attention function that does no work: transformers' own time per
                # step (the rest of the model, the cache's torch.cat, generate()'s loop), below which no
                # attention implementation can bring a default generate() step
                _set_impl(model, NULL_ATTENTION)
                ms, err = _try(lambda: decode_generate_ms(model, n, batch, sz["gen_steps"], sz["reps"]))
                case["null_attention"] = {"ms_per_step": ms, "error": err}
        elif kind == "prefill":
            case["speedup_vs_sdpa"] = C.ratio(case["sdpa"]["ms"], case["flashtri"]["ms"])
            case["peak_ratio"] = C.ratio(case["flashtri"].get("peak_gib"), case["sdpa"].get("peak_gib"))
        elif kind == "long":
            a, b = case["flashtri"].pop("ids", None), case["sdpa"].pop("ids", None)
            if a is not None and b is not None:
                case["agree_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            case["speedup_vs_sdpa"] = C.ratio(case["sdpa"].get("total_s"), case["flashtri"].get("total_s"))
            case["decode_speedup_vs_sdpa"] = C.ratio(case["flashtri"].get("decode_tokens_per_s"),
                                                     case["sdpa"].get("decode_tokens_per_s"))
            case["peak_ratio"] = C.ratio(case["flashtri"].get("peak_gib"), case["sdpa"].get("peak_gib"))
        else:
            case["speedup_vs_sdpa"] = C.ratio(case["flashtri"].get("tokens_per_s"), case["sdpa"].get("tokens_per_s"))
            case["peak_ratio"] = C.ratio(case["flashtri"].get("peak_gib"), case["sdpa"].get("peak_gib"))
        result["cases"].append(case)
        save()

    result["table"] = _table(result["cases"])
    result["summary"] = _summary(result["cases"])
    save()
    files = [json_path]
    png = _plot(result["cases"], C.result_path(out_dir, "e2e", quick, "png"), env)
    if png:
        files.append(png)
    result["files"] = files
    save()
    return result


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _label(c) -> str:
    n = f"{c['tokens'] // 1024}k"
    return f"{c['kind']} {n}" + (f" b{c['batch']}" if c["batch"] > 1 else "")


def _table(cases) -> dict:
    rows = []
    for c in cases:
        f, s = c["flashtri"], c["sdpa"]
        if c["kind"] in ("decode", "static"):
            rows.append([_label(c), f["ms_per_step"], s["ms_per_step"], c["speedup_vs_sdpa"], c["roofline_ms"],
                         c["flashtri_over_roofline"], c.get("null_attention", {}).get("ms_per_step"), None, None,
                         f["error"] or s["error"]])
        elif c["kind"] == "prefill":
            rows.append([_label(c), f["ms"], s["ms"], c["speedup_vs_sdpa"], None, None, None, f.get("peak_gib"),
                         s.get("peak_gib"), f["error"] or s["error"]])
        elif c["kind"] == "long":
            ms = {k: (None if x.get("total_s") is None else x["total_s"] * 1e3) for k, x in (("f", f), ("s", s))}
            rows.append([_label(c) + f" +{f.get('new_tokens') or s.get('new_tokens')} tokens", ms["f"], ms["s"],
                         c["speedup_vs_sdpa"], None, None, None, f.get("peak_gib"), s.get("peak_gib"),
                         f["error"] or s["error"]])
        else:
            rows.append([_label(c), f.get("ms"), s.get("ms"), c["speedup_vs_sdpa"], None, None, None,
                         f.get("peak_gib"), s.get("peak_gib"), f["error"] or s["error"]])
    return {"title": "e2e: Llama-3-8B shapes, bf16 (speedup = sdpa time / flashtri time)",
            "columns": ["case", "flashtri ms", "sdpa ms", "speedup", "roofline ms", "flashtri/roof",
                        "null-attention ms", "flashtri GiB", "sdpa GiB", "error"],
            "rows": rows}


def _summary(cases) -> list:
    out = []
    for c in cases:
        if c["kind"] == "static":
            out.append([f"e2e {_label(c)}: speedup vs sdpa / x roofline (steps back to back; one synced step)",
                        f"{_fmt(c['speedup_vs_sdpa'])} / {_fmt(c['flashtri_over_roofline'])}; "
                        f"{_fmt(c.get('flashtri_synced_over_roofline'))}"])
        elif c["kind"] == "decode":
            out.append([f"e2e {_label(c)}: speedup vs sdpa / x roofline",
                        f"{_fmt(c['speedup_vs_sdpa'])} / {_fmt(c['flashtri_over_roofline'])}"])
        elif c["kind"] == "prefill":
            out.append([f"e2e {_label(c)}: speedup vs sdpa", _fmt(c["speedup_vs_sdpa"])])
        elif c["kind"] == "long":
            f = c["flashtri"]
            out.append([f"e2e {_label(c)} generate: prefill s, decode tok/s, peak GiB (flashtri); "
                        "decode speedup vs sdpa",
                        f"{_fmt(f.get('prefill_s'))}, {_fmt(f.get('decode_tokens_per_s'))}, "
                        f"{_fmt(f.get('peak_gib'))}; {_fmt(c.get('decode_speedup_vs_sdpa'))}"])
        else:
            out.append([f"e2e {_label(c)}: tokens/s ratio, peak ratio",
                        f"{_fmt(c['speedup_vs_sdpa'])}, {_fmt(c.get('peak_ratio'))}"])
    return out


def _plot(cases, path, env):
    panels = []
    for kind, title in (("decode", "generate() decode, DynamicCache"), ("static", "StaticCache + compile decode")):
        cs = [c for c in cases if c["kind"] == kind]
        if cs:
            panels.append({"title": title + " (ms/step)", "x": [_label(c).split(" ", 1)[1] for c in cs],
                           "kind": "bar", "ylabel": "ms per step",
                           "series": {"flashtri": [c["flashtri"]["ms_per_step"] for c in cs],
                                      "sdpa": [c["sdpa"]["ms_per_step"] for c in cs],
                                      "roofline": [c["roofline_ms"] for c in cs]}})
            if any(c.get("null_attention", {}).get("ms_per_step") for c in cs):
                # transformers' own time per step (an attention that does nothing): no implementation goes below
                panels[-1]["series"]["null attention (floor)"] = [c.get("null_attention", {}).get("ms_per_step")
                                                                  for c in cs]
    cs = [c for c in cases if c["kind"] == "prefill"]
    if cs:
        panels.append({"title": "prefill (ms)", "x": [_label(c).split(" ", 1)[1] for c in cs], "kind": "bar",
                       "ylabel": "ms", "series": {i: [c[i]["ms"] for c in cs] for i in IMPLS}})
        panels.append({"title": "prefill peak memory above weights (GiB)",
                       "x": [_label(c).split(" ", 1)[1] for c in cs], "kind": "bar", "ylabel": "GiB",
                       "series": {i: [c[i].get("peak_gib") for c in cs] for i in IMPLS}})
    cs = [c for c in cases if c["kind"] == "long"]
    if cs:
        panels.append({"title": f"{_label(cs[0]).split(' ', 1)[1]} prompt: decode tokens/s", "x": list(IMPLS),
                       "kind": "bar", "ylabel": "tokens/s",
                       "series": {"generate()": [cs[0][i].get("decode_tokens_per_s") for i in IMPLS]}})
    cs = [c for c in cases if c["kind"].startswith("train")]
    if cs:
        panels.append({"title": "training step (tokens/s)", "x": [_label(c) for c in cs], "kind": "bar",
                       "ylabel": "tokens/s", "series": {i: [c[i].get("tokens_per_s") for c in cs] for i in IMPLS}})
        panels.append({"title": "training peak memory (GiB)", "x": [_label(c) for c in cs], "kind": "bar",
                       "ylabel": "GiB", "series": {i: [c[i].get("peak_gib") for c in cs] for i in IMPLS}})
    if not panels:
        return None
    return C.plot_panels(path, panels, suptitle=f"hf_flash e2e, {env.get('device')}, transformers "
                                                f"{env.get('transformers')}", ncols=min(4, len(panels)))
