"""``hf-flash demo``: fine-tune and generate with a small GPT-2 and a small Llama, "flashtri" against "sdpa".

For each model family it builds a random model from a config, saves it with ``save_pretrained`` and loads it
twice with ``AutoModelForCausalLM.from_pretrained(dir, attn_implementation=...)`` ("flashtri" and "sdpa"), so
both start from the same weights and go through the real loading code. Each copy is fine-tuned for a few steps
with ``transformers.Trainer`` (same seed, same data order, dropout 0) on token sequences drawn from a fixed
random bigram chain (no tokenizer, no network). Then the flashtri-fine-tuned model generates greedily from one
prompt with each implementation (``set_attn_implementation``): the same weights, so any difference in the
tokens comes from attention (two copies fine-tuned in bf16 drift apart by rounding alone). It prints one
table: the largest per-step loss difference against its limit, whether the greedy tokens are equal, and the
time of each phase.

Sizes and precision:

* CUDA GPU: models of ~50M (GPT-2) and ~110M (Llama) parameters, batches of 8x1024 tokens, bf16 autocast training
  (fp32 master weights) and bf16 generation. The loss limit scales itself: 3x the largest per-step difference
  between "sdpa" in bf16 and "sdpa" in float32 (a third, untimed run), plus 1e-3. Both implementations are
  warmed up before they are timed (Triton compiles each kernel on first use).
* CPU: the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set by the demo when CUDA is
  absent and it is unset), so models are tiny (2 layers, width 64, 40 tokens) and the times say nothing about
  speed. Everything is float32: the two implementations differ only in summation order (~1e-6), the loss limit
  is 1e-4.

Greedy tokens are compared up to the first difference. A difference counts as a tie, not a failure, when at
that step the two candidate tokens' logits are closer than the dtype can tell apart (bf16: 2^-6 of the largest
logit, i.e. two steps of bf16's 8-bit mantissa; float32: 1e-5 of it): rounding alone may pick either.

Exit code 0 when every loss is within its limit and the tokens are equal (or differ only at such a tie), else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

__all__ = ["main", "build_parser"]

MODELS = ("gpt2", "llama")

# Per device: model shapes, training batch, and generation lengths.
SIZES = {
    "cpu": dict(vocab=96, seq_len=40, batch=2, steps=3, lr=5e-3, prompt=20, new_tokens=6,
                gpt2=dict(n_embd=64, n_layer=2, n_head=4),
                llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16)),
    "cuda": dict(vocab=8192, seq_len=1024, batch=8, steps=30, lr=1e-3, prompt=512, new_tokens=128,
                 gpt2=dict(n_embd=768, n_layer=6, n_head=12),
                 llama=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=128)),
}
# A token pair closer than this fraction of the largest logit is a tie the dtype's rounding may flip.
TIE_RTOL = {"float32": 1e-5, "bfloat16": 2.0 ** -6, "float16": 2.0 ** -9}
CPU_LOSS_LIMIT = 1e-4


def build_parser() -> argparse.ArgumentParser:
    from hf_flash.cli import _Parser  # usage errors in one line, like every hf-flash command

    p = _Parser(
        prog="hf-flash demo",
        description="Fine-tune a small random GPT-2 and Llama with transformers.Trainer and generate greedily, "
                    "once with attn_implementation=\"flashtri\" and once with \"sdpa\" from the same weights and "
                    "seed; print the per-step loss difference, whether the greedy tokens are equal, and the "
                    "times. No network. On a CPU it runs tiny models through Triton's interpreter.")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated model families to run: gpt2, llama (default: both)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run (default: 3 on the CPU, 30 on a GPU)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens to generate (default: 6 on the CPU, 128 on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the Trainer (default 0)")
    return p


def _parse(args) -> argparse.Namespace:
    parser = build_parser()
    if args is None:
        args = sys.argv[1:]
    if isinstance(args, argparse.Namespace):
        defaults = vars(parser.parse_args([]))
        defaults.update(vars(args))
        ns = argparse.Namespace(**defaults)
    else:
        ns = parser.parse_args(list(args))
    given = ns.models if isinstance(ns.models, (list, tuple)) else str(ns.models).split(",")
    models = [m.strip() for m in given if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        parser.error(f"--models: unknown model {', '.join(bad) or '(none given)'}; choose from {', '.join(MODELS)}")
    ns.models = models
    for name in ("steps", "new_tokens"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return ns


def _to_argv(ns: argparse.Namespace) -> list[str]:
    argv = ["--models", ",".join(ns.models), "--seed", str(ns.seed)]
    if ns.steps is not None:
        argv += ["--steps", str(ns.steps)]
    if ns.new_tokens is not None:
        argv += ["--new-tokens", str(ns.new_tokens)]
    return argv


# ---------------------------------------------------------------------------------------------------------------
# data: sequences from a fixed random bigram chain (learnable, so the loss falls and greedy choices are clear)


class _ChainDataset:
    """``n`` sequences of ``seq_len`` tokens: each token is followed by its own likely successor with
    probability 0.75, else by a uniformly random token."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        successor = torch.randperm(vocab, generator=g)
        ids = torch.empty(n, seq_len, dtype=torch.long)
        ids[:, 0] = torch.randint(vocab, (n,), generator=g)
        for t in range(1, seq_len):
            follow = torch.rand(n, generator=g) < 0.75
            ids[:, t] = torch.where(follow, successor[ids[:, t - 1]], torch.randint(vocab, (n,), generator=g))
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# ---------------------------------------------------------------------------------------------------------------


def _config(kind: str, size: dict):
    from transformers import GPT2Config, LlamaConfig

    positions = size["seq_len"] + size["new_tokens"] + 8
    if kind == "gpt2":  # dropout 0 everywhere, so both implementations compute the same function
        return GPT2Config(vocab_size=size["vocab"], n_positions=positions, attn_pdrop=0.0, resid_pdrop=0.0,
                          embd_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1, use_cache=False,
                          **size["gpt2"])
    return LlamaConfig(vocab_size=size["vocab"], max_position_embeddings=positions, attention_dropout=0.0,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1, use_cache=False, **size["llama"])


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _progress_callback(desc: str):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=desc, unit="step", leave=False, file=sys.stderr)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return _Bar()


def _train(path: str, impl: str, data, size: dict, run: dict, desc: str, autocast: bool, warmup: bool):
    """Fine-tune the model at ``path`` with ``impl``: (model, per-step losses, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _RecordingTrainer(Trainer):
        step_losses: list

        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            if model.training:
                self.step_losses.append(loss.detach().float())  # read after training: no sync per step
            return out

    device = run["device"]
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl)
    if warmup:  # Triton compiles each kernel on first use; keep that out of the timed run
        model.to(device).train()
        batch = {k: v[None].to(device) for k, v in data[0].items()}
        with torch.autocast(device, dtype=run["dtype"], enabled=autocast):
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
    with tempfile.TemporaryDirectory() as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir, max_steps=size["steps"], per_device_train_batch_size=size["batch"],
            learning_rate=size["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            seed=run["seed"], data_seed=run["seed"], bf16=autocast and run["dtype_name"] == "bfloat16",
            fp16=autocast and run["dtype_name"] == "float16", use_cpu=device == "cpu", report_to="none",
            save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = _RecordingTrainer(model=model, args=targs, train_dataset=data,
                                    callbacks=[_progress_callback(desc)])
        trainer.step_losses = []
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        _sync(device)
        t0 = time.perf_counter()
        trainer.train()
        _sync(device)
        secs = time.perf_counter() - t0
    losses = [float(x) for x in torch.stack(trainer.step_losses).cpu()]
    return trainer.model, losses, secs


def _generate(model, prompt, new_tokens: int, run: dict, warmup: bool):
    """Greedy tokens, per-step float32 scores and seconds."""
    import torch

    device = run["device"]
    model.eval()
    if device == "cuda":
        model.to(run["dtype"])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              pad_token_id=model.config.pad_token_id, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        if warmup:
            model.generate(prompt, **dict(kw, max_new_tokens=2, min_new_tokens=2))
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, **kw)
        _sync(device)
    secs = time.perf_counter() - t0
    tokens = out.sequences[0, prompt.shape[1]:].cpu()
    scores = torch.stack([s[0].float() for s in out.scores]).cpu()
    return tokens, scores, secs


def compare_tokens(a, b, scores_a, scores_b, dtype_name: str) -> tuple[bool, str]:
    """(ok, text): are two greedy sequences equal, or do they first differ at a tie the dtype cannot resolve?"""
    n = min(len(a), len(b))
    diff = [i for i in range(n) if int(a[i]) != int(b[i])]
    if not diff and len(a) == len(b):
        return True, "yes"
    if not diff:
        return False, f"NO (lengths {len(a)} vs {len(b)})"
    i = diff[0]
    ta, tb = int(a[i]), int(b[i])
    gap = max(abs(float(scores_a[i, ta] - scores_a[i, tb])), abs(float(scores_b[i, tb] - scores_b[i, ta])))
    # min_new_tokens sets the end-of-sequence logit to -inf: scale by the finite logits only
    scale = max(float(s[i][s[i].isfinite()].abs().max()) for s in (scores_a, scores_b))
    tol = TIE_RTOL[dtype_name] * scale
    if gap <= tol:
        return True, f"tie at token {i} (logit gap {gap:.2g} <= {tol:.2g})"
    return False, f"NO (first differs at token {i}, logit gap {gap:.2g})"


def _run_model(kind: str, size: dict, run: dict, root: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(run["seed"])
    model = AutoModelForCausalLM.from_config(_config(kind, size))
    path = os.path.join(root, kind)
    model.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    data = _ChainDataset(size["steps"] * size["batch"], size["seq_len"], size["vocab"], run["seed"] + 1)
    prompt_src = _ChainDataset(1, size["prompt"], size["vocab"], run["seed"] + 1)  # same chain, own start
    prompt = prompt_src.ids.to(run["device"])
    gpu = run["device"] == "cuda"
    row = {"model": kind, "params": n_params}
    trained = None
    for impl in ("flashtri", "sdpa"):
        model, losses, train_s = _train(path, impl, data, size, run, f"{kind} {impl} train", autocast=gpu,
                                        warmup=gpu)
        row[impl] = dict(losses=losses, train_s=train_s)
        if impl == "flashtri":
            trained = model
        else:
            del model
    # Both implementations generate from the same weights (the flashtri-fine-tuned ones): two separately
    # fine-tuned copies drift apart in bf16 (different rounding at every step), so their greedy tokens could
    # differ for reasons that have nothing to do with attention.
    for impl in ("flashtri", "sdpa"):
        trained.set_attn_implementation(impl)
        tokens, scores, gen_s = _generate(trained, prompt, size["new_tokens"], run, warmup=gpu)
        row[impl].update(gen_s=gen_s, tokens=tokens, scores=scores)
    del trained
    if gpu:
        torch.cuda.empty_cache()
    fl, sd = row["flashtri"], row["sdpa"]
    row["loss_diff"] = max(abs(a - b) for a, b in zip(fl["losses"], sd["losses"]))
    if gpu:  # the limit: how far sdpa itself moves between float32 and the low precision
        _, exact, _ = _train(path, "sdpa", data, size, dict(run, dtype=torch.float32, dtype_name="float32"),
                             f"{kind} sdpa float32 (sets the limit)", autocast=False, warmup=False)
        base = max(abs(a - b) for a, b in zip(sd["losses"], exact))
        row["loss_limit"] = 3.0 * base + 1e-3
    else:
        row["loss_limit"] = CPU_LOSS_LIMIT
    row["loss_ok"] = len(fl["losses"]) == len(sd["losses"]) == size["steps"] and row["loss_diff"] <= row["loss_limit"]
    row["tokens_ok"], row["tokens_text"] = compare_tokens(fl["tokens"], sd["tokens"], fl["scores"], sd["scores"],
                                                          run["dtype_name"])
    return row


def _table(rows: list[dict]) -> str:
    head = ["model", "params", "max |loss diff|", "limit", "greedy tokens equal", "train flashtri", "train sdpa",
            "generate flashtri", "generate sdpa"]
    body = []
    for r in rows:
        fl, sd = r["flashtri"], r["sdpa"]
        body.append([r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['loss_diff']:.2e}", f"{r['loss_limit']:.1e}",
                     r["tokens_text"], f"{fl['train_s']:.2f}s", f"{sd['train_s']:.2f}s", f"{fl['gen_s']:.2f}s",
                     f"{sd['gen_s']:.2f}s"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


@contextlib.contextmanager
def _quiet_transformers():
    """Errors only and no loading bars from transformers while the demo runs (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def main(args=None) -> int:
    """Run the demo. ``args``: a list of command-line arguments or an ``argparse.Namespace``; returns the exit
    code (0 when flashtri matches sdpa)."""
    ns = _parse(args)
    import torch

    from hf_flash import cli
    from hf_flash._validate import interpreter_enabled

    on_gpu = torch.cuda.is_available() and not interpreter_enabled()
    if not on_gpu and not interpreter_enabled():
        code = cli._ensure_interpreter(["demo", *_to_argv(ns)])
        if code is not None:  # re-ran in a child process with the interpreter on
            return code
    with _quiet_transformers():
        return _demo(ns, on_gpu)


def _demo(ns: argparse.Namespace, on_gpu: bool) -> int:
    import torch

    from hf_flash import cli

    device = "cuda" if on_gpu else "cpu"
    size = dict(SIZES[device])
    if ns.steps is not None:
        size["steps"] = ns.steps
    if ns.new_tokens is not None:
        size["new_tokens"] = ns.new_tokens
    if on_gpu:
        dtype_name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        print(f"device: {torch.cuda.get_device_name()} - training with {dtype_name} autocast (float32 weights), "
              f"generating in {dtype_name}")
    else:
        dtype_name = "float32"
        how = "set by hf-flash" if os.environ.get(cli._REEXEC_ENV) else "from the environment"
        print(f"device: CPU through Triton's interpreter (TRITON_INTERPRET=1 {how}): tiny float32 models; the "
              f"times measure the interpreter, not the kernels")
    run = dict(device=device, seed=ns.seed, dtype=getattr(torch, dtype_name), dtype_name=dtype_name)
    print(f"each model: {size['steps']} Trainer steps of {size['batch']}x{size['seq_len']} tokens, then "
          f"{size['new_tokens']} greedy tokens from a {size['prompt']}-token prompt; \"flashtri\" and \"sdpa\" "
          f"from the same weights and seed", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_flash_demo_") as root:
        for kind in ns.models:
            row = _run_model(kind, size, run, root)
            rows.append(row)
            for impl in ("flashtri", "sdpa"):
                losses = " ".join(f"{x:.4f}" for x in row[impl]["losses"])
                print(f"{kind:<5} {impl:<8} losses: {losses}", flush=True)
    print()
    print(_table(rows))
    failed = [f"{r['model']}: loss differs by {r['loss_diff']:.2e} > {r['loss_limit']:.1e}"
              for r in rows if not r["loss_ok"]]
    failed += [f"{r['model']}: greedy tokens differ ({r['tokens_text']})" for r in rows if not r["tokens_ok"]]
    if failed:
        print("demo FAILED: " + "; ".join(failed))
        return 1
    ties = " up to a tie the dtype cannot resolve" if any(r["tokens_text"] != "yes" for r in rows) else ""
    print(f"demo ok: \"flashtri\" matches \"sdpa\" (losses within the limit, same greedy tokens{ties})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
