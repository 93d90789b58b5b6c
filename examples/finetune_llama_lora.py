"""Fine-tune a Llama-family model with PEFT LoRA and gradient checkpointing, ``attn_implementation="flashtri"``.

LoRA adapters on the attention projections (q/k/v/o), the base weights frozen, activations recomputed in the
backward (gradient checkpointing, non-reentrant). Batches are right-padded: "flashtri" drops the padding and
runs the varlen kernel, so padded positions cost nothing. After training the adapter is saved, loaded back
onto a fresh base model, and its logits are checked against the trained model's.

    python examples/finetune_llama_lora.py                      # a tiny random Llama (GQA), offline
    python examples/finetune_llama_lora.py --model PATH --text data.txt --bf16 --steps 200 --seq-len 2048

Without ``--model`` it fine-tunes a small random Llama (grouped-query attention; saved with ``save_pretrained``
and loaded back with ``from_pretrained``) on sequences from a random bigram chain. With ``--model`` it loads
that checkpoint (Llama, Mistral, Qwen2, ...) from disk; ``--text`` (one example per line) is then tokenized with
the checkpoint's tokenizer. Without a GPU the kernels run on the CPU through Triton's interpreter (slow; the
default sizes are tiny there).
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
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Trainer,  # noqa: E402
                          TrainingArguments)

ON_GPU = torch.cuda.is_available()
# sizes of the random model and the default run
DEFAULTS = dict(batch_size=8, seq_len=2048, steps=30, hidden=2048, layers=8, heads=16, kv_heads=4, head_dim=128,
                vocab=32000) if ON_GPU else \
    dict(batch_size=2, seq_len=40, steps=3, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=96)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="PATH", help="a Llama-family checkpoint on disk (default: a tiny random "
                                                   "Llama)")
    p.add_argument("--text", metavar="FILE", help="training text, one example per line (needs --model with a "
                                                  "tokenizer; default: random sequences)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"],
                   help="longest example in tokens; longer ones are truncated (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="examples per batch")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4 if ON_GPU else 1e-2, help="learning rate")
    p.add_argument("--bf16", action="store_true", help="load the base model in bf16 and train with bf16 autocast")
    p.add_argument("--out", metavar="DIR", help="where to save the adapter (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.text and not args.model:
        p.error("--text needs --model (a checkpoint with a tokenizer); the random model has no tokenizer")
    for name in ("steps", "seq_len", "batch_size", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def random_llama(path: str, seq_len: int) -> None:
    torch.manual_seed(0)
    d = DEFAULTS
    cfg = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=int(2.75 * d["hidden"]),
                      num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                      head_dim=d["head_dim"], max_position_embeddings=max(seq_len, 64), bos_token_id=0,
                      eos_token_id=1, pad_token_id=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def random_examples(n: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` token lists of random lengths from a bigram chain (each token usually followed by its successor)."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=g)
    out = []
    for length in torch.randint(max(2, max_len // 2), max_len + 1, (n,), generator=g).tolist():
        ids = torch.empty(length, dtype=torch.long)
        ids[0] = torch.randint(vocab, (1,), generator=g)
        for t in range(1, length):
            follow = torch.rand(1, generator=g).item() < 0.75
            ids[t] = successor[ids[t - 1]] if follow else torch.randint(vocab, (1,), generator=g)
        out.append(ids.tolist())
    return out


def text_examples(path: str, tokenizer, max_len: int) -> list[list[int]]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    ids = [tokenizer(line, truncation=True, max_length=max_len)["input_ids"] for line in lines]
    return [x for x in ids if len(x) > 1]


def pad_right(pad_id: int):
    """A collator: right-pad to the longest example; padding is masked out and ignored by the loss."""

    def collate(examples):
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    return collate


def checkpointing_args() -> dict:
    """Gradient checkpointing (non-reentrant) in TrainingArguments: recent transformers call the fields
    ``activation_checkpointing*`` (the old ``gradient_checkpointing*`` names still work, with a warning)."""
    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = os.path.join(tmp, "llama-random")
            random_llama(path, args.seq_len)
        base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashtri", dtype=dtype)
        if args.text:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            seqs = text_examples(args.text, tokenizer, args.seq_len)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        else:
            seqs = random_examples(args.steps * args.batch_size, args.seq_len, base.config.vocab_size)
            pad_id = base.config.pad_token_id if base.config.pad_token_id is not None else 0
        cfg = base.config
        print(f"model: {args.model or 'random Llama'} ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M "
              f"parameters, {cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value heads), "
              f"attn_implementation={cfg._attn_implementation}")
        print(f"device: {'cuda' if ON_GPU else 'CPU through Triton interpreter (tiny sizes)'}; {len(seqs)} "
              f"examples, batches of {args.batch_size} right-padded")

        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(base, lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={args.rank} on q/k/v/o: {trainable:,} trainable parameters of {total:,} "
              f"({100 * trainable / total:.2f}%)")

        targs = TrainingArguments(output_dir=os.path.join(tmp, "run"), max_steps=args.steps,
                                  per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                  lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10),
                                  **checkpointing_args(),
                                  bf16=args.bf16, use_cpu=not ON_GPU, save_strategy="no", report_to="none",
                                  dataloader_num_workers=0, remove_unused_columns=False, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=[{"input_ids": s} for s in seqs],
                          data_collator=pad_right(pad_id))
        before = dict(flash_kernels.launches)
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"trained {args.steps} steps in {secs:.1f}s (gradient checkpointing on): loss {losses[0]:.4f} -> "
              f"{losses[-1]:.4f}")
        fwd = flash_kernels.launches["fwd"] - before["fwd"]
        bwd = flash_kernels.launches["bwd_dkdv"] - before["bwd_dkdv"]
        # with checkpointing every layer's forward runs twice per step: once plain, once recomputed in backward
        print(f"flashtri FA2 kernel launches: forward {fwd}, backward {bwd}")

        out_dir = args.out or os.path.join(tmp, "adapter")
        model.save_pretrained(out_dir)
        batch = pad_right(pad_id)([{"input_ids": s} for s in seqs[: args.batch_size]])
        batch = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
        model.eval()
        with torch.no_grad():
            want = model(**batch).logits
            fresh = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashtri", dtype=dtype)
            reloaded = PeftModel.from_pretrained(fresh.to(model.device), out_dir).eval()
            got = reloaded(**batch).logits
        real = batch["attention_mask"].bool()
        diff = (got - want)[real].abs().max().item()
        print(f"adapter saved to {out_dir if args.out else '(a temporary folder)'} and reloaded: max |logit diff| "
              f"{diff:.2e}")


if __name__ == "__main__":
    main()
