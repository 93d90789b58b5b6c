"""Generate from a long prompt with ``attn_implementation="flashtri"`` and compare with ``"sdpa"``: prefill time,
decode tokens/s, peak GPU memory (prefill and decode), and whether the greedy tokens agree.

The prompt runs through the FlashAttention-2 kernel (memory linear in the prompt length); each new token runs
the split-KV (Flash-Decoding) kernel directly on the KV cache. Both implementations load the same checkpoint and
generate greedily from the same prompt with ``model.generate``; the times are taken at each step of generate
(a logits processor synchronizes and reads the clock), after one untimed warm-up run on a GPU (Triton compiles
each kernel on first use). If "sdpa" runs out of memory it is reported, not fatal.

    python examples/long_context_generate.py                    # a tiny random Llama, offline
    python examples/long_context_generate.py --model PATH --prompt-len 65536 --new-tokens 256

Without ``--model`` it uses a random Llama (grouped-query attention; saved with ``save_pretrained`` and loaded
back with ``from_pretrained``): on a GPU 4 layers of Llama-3-8B's attention shape (32 query / 8 key-value heads,
head dim 128) in bf16 with a 32k-token prompt; on the CPU a tiny one through Triton's interpreter, where the
times say nothing about speed and memory is not measured. The prompt is random token ids (no tokenizer needed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

if not torch.cuda.is_available():
    # No GPU: run the Triton kernels on the CPU through Triton's interpreter. Must be set before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_flash  # noqa: E402,F401 - registers attn_implementation="flashtri"
from hf_flash.kernels import attention as flash_kernels  # noqa: E402 - launch counters, to show the kernels ran
from hf_flash.kernels import decode as decode_kernels  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LogitsProcessor,  # noqa: E402
                          LogitsProcessorList)

ON_GPU = torch.cuda.is_available()
DEFAULTS = dict(prompt_len=32768, new_tokens=128, hidden=4096, layers=4, heads=32, kv_heads=8, head_dim=128,
                intermediate=14336, vocab=32000) if ON_GPU else \
    dict(prompt_len=200, new_tokens=8, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
         vocab=96)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="PATH", help="a checkpoint on disk (default: a random Llama)")
    p.add_argument("--prompt-len", type=int, default=DEFAULTS["prompt_len"],
                   help="prompt length in tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"],
                   help="tokens to generate (default %(default)s)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=ON_GPU,
                   help="run the model in bf16 (default: on with a GPU, off on the CPU)")
    p.add_argument("--impls", default="flashtri,sdpa",
                   help="comma-separated attention implementations to run (default %(default)s)")
    args = p.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 1:
        p.error("--prompt-len and --new-tokens must be >= 1")
    args.impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    if not args.impls:
        p.error("--impls: give at least one implementation, e.g. flashtri,sdpa")
    return args


def random_llama(path: str, positions: int) -> None:
    torch.manual_seed(0)
    d = DEFAULTS
    cfg = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                      num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                      head_dim=d["head_dim"], max_position_embeddings=positions, rope_theta=500000.0,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("cuda" if ON_GPU else "cpu"):  # initializing ~1B parameters is much faster on the GPU
        model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.to(torch.bfloat16 if ON_GPU else torch.float32).save_pretrained(path)


def decode_launches() -> int:
    return decode_kernels.LAUNCHES["split_kv"] + decode_kernels.LAUNCHES["split_kv_unified"]


class StepClock(LogitsProcessor):
    """Called once per generated token, right after that token's forward pass: records the time (and, on a GPU,
    the peak memory so far, resetting it after the prefill so decode's peak is measured on its own)."""

    def __init__(self, device: str):
        self.device, self.times, self.prefill_peak = device, [], None

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            torch.cuda.synchronize()
            if not self.times:
                self.prefill_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        self.times.append(time.perf_counter())
        return scores


def run(path: str, impl: str, prompt: torch.Tensor, new_tokens: int, dtype: torch.dtype) -> dict:
    device = "cuda" if ON_GPU else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=dtype).to(device).eval()
    weights = torch.cuda.memory_allocated() if ON_GPU else 0
    kw = dict(do_sample=False, use_cache=True, pad_token_id=model.config.pad_token_id,
              attention_mask=torch.ones_like(prompt))
    try:
        with torch.no_grad():
            if ON_GPU:  # warm-up: compile the kernels for these shapes outside the timed run
                model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **kw)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            clock = StepClock(device)
            launches = (flash_kernels.launches["fwd"], decode_launches())
            t0 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 logits_processor=LogitsProcessorList([clock]), **kw)
    except torch.cuda.OutOfMemoryError as exc:
        del model
        torch.cuda.empty_cache()
        return {"impl": impl, "error": f"out of memory ({str(exc).splitlines()[0][:120]})"}
    t = clock.times
    res = {"impl": impl, "tokens": out[0, prompt.shape[1]:].cpu(), "prefill_s": t[0] - t0,
           "decode_tok_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else float("nan"),
           "fa2_launches": flash_kernels.launches["fwd"] - launches[0],
           "decode_launches": decode_launches() - launches[1]}
    if ON_GPU:
        res["weights_gib"] = weights / 2 ** 30
        res["prefill_peak_gib"] = clock.prefill_peak / 2 ** 30
        res["decode_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del model, out
    if ON_GPU:
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = os.path.join(tmp, "llama-random")
            random_llama(path, args.prompt_len + args.new_tokens)
        cfg = AutoConfig.from_pretrained(path)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(2, cfg.vocab_size, (1, args.prompt_len), generator=g)
        prompt = prompt.to("cuda" if ON_GPU else "cpu")
        where = (f"{torch.cuda.get_device_name()}" if ON_GPU else
                 "CPU through Triton's interpreter (tiny sizes; times are not speed, memory not measured)")
        print(f"model: {args.model or 'random Llama'} ({cfg.num_hidden_layers} layers, "
              f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads), {str(dtype).replace('torch.', '')}; "
              f"device: {where}")
        print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens (greedy)")

        results = [run(path, impl, prompt, args.new_tokens, dtype) for impl in args.impls]
    print()
    head = f"{'implementation':<15}{'prefill':>10}{'decode':>14}"
    head += f"{'prefill peak':>15}{'decode peak':>14}" if ON_GPU else ""
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<15}{r['error']}")
            continue
        line = f"{r['impl']:<15}{r['prefill_s']:>9.2f}s{r['decode_tok_s']:>9.1f} tok/s"
        if ON_GPU:
            line += f"{r['prefill_peak_gib']:>11.2f} GiB{r['decode_peak_gib']:>10.2f} GiB"
        print(line)
    ok = [r for r in results if "error" not in r]
    if ON_GPU and ok:
        print(f"peak = torch.cuda.max_memory_allocated during prefill / during decode, model weights "
              f"({ok[0]['weights_gib']:.2f} GiB) included")
    fl = next((r for r in ok if r["impl"] == "flashtri"), None)
    if fl is not None:
        print(f"flashtri kernel launches: FA2 forward {fl['fa2_launches']} (prefill), split-KV decode "
              f"{fl['decode_launches']}")
    if len(ok) >= 2:
        a, b = ok[0], ok[1]
        diff = (a["tokens"] != b["tokens"]).nonzero()
        same = "yes" if diff.numel() == 0 else f"no, first difference at new token {int(diff[0])}"
        print(f"same greedy tokens ({a['impl']} vs {b['impl']}): {same}")


if __name__ == "__main__":
    main()
