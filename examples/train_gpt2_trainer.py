"""Train GPT-2 with ``transformers.Trainer`` and ``attn_implementation="flashtri"``: attention dropout on, and
padding-free packed batches.

``DataCollatorWithFlattening`` concatenates the documents of a batch into one row with no padding and passes
their boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``, restarting ``position_ids``); "flashtri" runs them
through the varlen kernel, so no token attends across a document boundary and no work is spent on padding.
GPT-2's ``attn_pdrop`` is applied inside the kernel (the backward regenerates the same mask).

    python examples/train_gpt2_trainer.py                       # a tiny random GPT-2, offline
    python examples/train_gpt2_trainer.py --model PATH --text corpus.txt --bf16 --steps 500 --seq-len 1024

Without ``--model`` it trains a small random GPT-2 (saved with ``save_pretrained`` and loaded back with
``from_pretrained``) on documents drawn from a random bigram chain. With ``--model`` it loads that checkpoint
from disk; ``--text`` (one document per line) is then tokenized with the checkpoint's tokenizer. Without a GPU
the kernels run on the CPU through Triton's interpreter (slow; the default sizes are tiny there).
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
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, GPT2Config,  # noqa: E402
                          Trainer, TrainingArguments)

ON_GPU = torch.cuda.is_available()
# (documents per batch, longest document, steps, model width, layers, heads, vocabulary) for the random model
DEFAULTS = dict(batch_size=16, seq_len=1024, steps=50, n_embd=768, n_layer=12, n_head=12, vocab=8192) if ON_GPU \
    else dict(batch_size=3, seq_len=36, steps=4, n_embd=64, n_layer=2, n_head=4, vocab=96)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="PATH", help="a GPT-2 checkpoint on disk (default: a tiny random GPT-2)")
    p.add_argument("--text", metavar="FILE", help="training text, one document per line (needs --model with a "
                                                  "tokenizer; default: random documents)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"],
                   help="longest document in tokens; longer ones are truncated (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="documents packed into each batch (default %(default)s)")
    p.add_argument("--attn-dropout", type=float, default=0.1, help="GPT-2 attn_pdrop (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3 if ON_GPU else 5e-3, help="learning rate")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (float32 master weights)")
    p.add_argument("--out", metavar="DIR", help="save the trained model here (default: not saved)")
    args = p.parse_args(argv)
    if args.text and not args.model:
        p.error("--text needs --model (a checkpoint with a tokenizer); the random model has no tokenizer")
    for name in ("steps", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.attn_dropout < 1.0:
        p.error("--attn-dropout must be in [0, 1)")
    return args


def random_gpt2(path: str, seq_len: int) -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=DEFAULTS["vocab"], n_positions=max(seq_len, 64), n_embd=DEFAULTS["n_embd"],
                     n_layer=DEFAULTS["n_layer"], n_head=DEFAULTS["n_head"], bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def random_documents(n: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` documents of random lengths from a bigram chain (each token usually followed by its successor)."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=g)
    docs = []
    for length in torch.randint(max(2, max_len // 4), max_len + 1, (n,), generator=g).tolist():
        ids = [int(torch.randint(vocab, (1,), generator=g))]
        for _ in range(length - 1):
            follow = torch.rand(1, generator=g).item() < 0.75
            ids.append(int(successor[ids[-1]]) if follow else int(torch.randint(vocab, (1,), generator=g)))
        docs.append({"input_ids": ids})
    return docs


def text_documents(path: str, tokenizer, max_len: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    docs = [{"input_ids": tokenizer(line, truncation=True, max_length=max_len)["input_ids"]} for line in lines]
    return [d for d in docs if len(d["input_ids"]) > 1]


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = os.path.join(tmp, "gpt2-random")
            random_gpt2(path, args.seq_len)
        # attn_pdrop is a config field: override it at load time
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashtri",
                                                     attn_pdrop=args.attn_dropout)
        if args.seq_len > model.config.n_positions:
            raise SystemExit(f"--seq-len {args.seq_len} is longer than the model's n_positions "
                             f"({model.config.n_positions})")
        if args.text:
            docs = text_documents(args.text, AutoTokenizer.from_pretrained(args.model), args.seq_len)
        else:
            docs = random_documents(args.steps * args.batch_size, args.seq_len, model.config.vocab_size)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {args.model or 'random GPT-2'} ({n_params / 1e6:.2f}M parameters), "
              f"attn_implementation={model.config._attn_implementation}, attn_pdrop={model.config.attn_pdrop}")
        print(f"device: {'cuda' if ON_GPU else 'CPU through Triton interpreter (tiny sizes)'}; {len(docs)} "
              f"documents, {args.batch_size} packed per batch (no padding)")

        # One row per batch: documents back to back, labels -100 at each document's first token, and the
        # boundaries as flash-attention kwargs (cu_seq_lens) so nothing is recomputed per layer.
        collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        example = collator(docs[: args.batch_size])
        print(f"packed batch: input_ids {tuple(example['input_ids'].shape)}, documents of "
              f"{example['cu_seq_lens_q'].diff().tolist()} tokens")

        targs = TrainingArguments(output_dir=os.path.join(tmp, "run"), max_steps=args.steps,
                                  per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                  lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10),
                                  bf16=args.bf16, use_cpu=not ON_GPU, save_strategy="no", report_to="none",
                                  dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=docs, data_collator=collator)
        before = dict(flash_kernels.launches)
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"trained {args.steps} steps in {secs:.1f}s: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        fwd = flash_kernels.launches["fwd"] - before["fwd"]
        bwd = flash_kernels.launches["bwd_dkdv"] - before["bwd_dkdv"]
        print(f"flashtri FA2 kernel launches: forward {fwd}, backward {bwd}")
        if args.out:
            trainer.save_model(args.out)
            print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
