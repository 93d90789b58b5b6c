"""Train a Llama with attn_implementation="flashtri" on one or several GPUs through accelerate (DDP or FSDP2).

The same script runs single-process (``python train_llama_distributed.py ...``) and under
``accelerate launch --config_file ddp.yaml|fsdp.yaml`` (see launch.sh). It prints, per optimizer step, the loss
averaged over the global batch, tokens/s per GPU and peak memory per GPU, and with ``--out`` writes them as JSON.

* ``--model``: a Hub id or a local folder (``from_pretrained``), or a random model of a named shape:
  ``llama3-8b-shape`` (Llama-3-8B: hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256; use
  ``--num-layers`` to keep it small) or ``tiny`` (2 layers, hidden 64: a CPU smoke test).
* Data: random token rows, the same for every process count: row ``i`` is drawn from seed ``seed + i``, and
  accelerate hands process ``r`` the ``r``-th per-device batch of each global batch. One GPU with
  ``--grad-accum N`` therefore sees exactly the global batch that N GPUs see in one step. Replace
  ``RandomTokens`` with your dataset for real training.
* ``--activation-checkpointing``: under FSDP, accelerate's ``checkpoint_wrapper`` around every sharded
  LlamaDecoderLayer (``fsdp_activation_checkpointing``); otherwise transformers' gradient checkpointing
  (non-reentrant).
* ``--compile``: ``torch.compile`` through accelerate's dynamo plugin, per decoder layer (regional
  compilation) where the installed accelerate has it; the flashtri kernels are custom ops with shape-only fakes,
  so the graphs hold them without breaks.
* Mixed precision comes from the accelerate config (``mixed_precision: bf16`` in ddp.yaml / fsdp.yaml); the
  master weights stay float32 unless ``--model-dtype bfloat16``.

Without a GPU the kernels run through Triton's interpreter: set ``TRITON_INTERPRET=1`` (tiny shapes only). On
the CPU accelerate runs DDP (gloo) when started by ``torchrun``; it does not turn FSDP on for CPU processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import hf_flash  # noqa: F401 - registers attn_implementation="flashtri"

SHAPES = {
    "llama3-8b-shape": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                            max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama3-8b-shape",
                   help=f"Hub id or folder for from_pretrained, or a random model: {', '.join(SHAPES)}")
    p.add_argument("--num-layers", type=int, default=None, help="number of decoder layers (named shapes only)")
    p.add_argument("--attn", default="flashtri", choices=("flashtri", "sdpa", "eager"),
                   help="attention implementation")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1, help="rows per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="steps left out of tokens/s (compilation, autotuning)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the weights (mixed precision itself comes from the accelerate config)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile through accelerate")
    p.add_argument("--compile-backend", default="inductor", help="dynamo backend for --compile")
    p.add_argument("--out", default=None, help="write per-step losses and measurements to this JSON file")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "grad_accum", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_layers is not None and args.model not in SHAPES:
        p.error(f"--num-layers only applies to the named shapes ({', '.join(SHAPES)}), not to --model {args.model}")
    return args


class RandomTokens(torch.utils.data.Dataset):
    """Row ``i``: ``seq_len`` random token ids drawn from seed ``seed + i`` (labels = inputs, no padding)."""

    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int):
        self.rows, self.seq_len, self.vocab, self.seed = rows, seq_len, vocab, seed

    def __len__(self):
        return self.rows

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed + i)
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        return {"input_ids": ids, "labels": ids}


def build_model(args, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, args.model_dtype)
    if args.model in SHAPES:
        kw = dict(SHAPES[args.model], use_cache=False)
        if args.num_layers is not None:
            kw["num_hidden_layers"] = args.num_layers
        config = LlamaConfig(**kw)
        torch.manual_seed(args.seed)  # the same weights in every process and in a single-GPU run
        # initialised on the GPU: the 8B shape takes minutes to initialise on the CPU
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation=args.attn, dtype=dtype)
        model.config.use_cache = False
    return model.train()


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import TorchDynamoPlugin

    kwargs = dict(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    if args.compile:
        plugin_kw = dict(backend=args.compile_backend)
        if "use_regional_compilation" in TorchDynamoPlugin.__dataclass_fields__:
            plugin_kw["use_regional_compilation"] = True  # one graph per decoder layer, compiled once
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(**plugin_kw)
    return Accelerator(**kwargs)


def main(argv=None) -> dict:
    from accelerate.utils import DistributedType

    args = parse_args(argv)
    accelerator = make_accelerator(args)
    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    on_gpu = accelerator.device.type == "cuda"
    model = build_model(args, accelerator.device)
    if args.activation_checkpointing:
        if is_fsdp:
            # applied by accelerate to the layers it shards (fsdp_transformer_layer_cls_to_wrap)
            accelerator.state.fsdp_plugin.activation_checkpointing = True
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    world = accelerator.num_processes
    global_rows = args.batch_size * world * args.grad_accum
    data = RandomTokens(args.steps * global_rows, args.seq_len, model.config.vocab_size, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    accelerator.print(f"{accelerator.distributed_type} x{world}  attn={args.attn}  compile={args.compile}  "
                      f"activation_checkpointing={args.activation_checkpointing}  layers="
                      f"{accelerator.unwrap_model(model).config.num_hidden_layers}  seq={args.seq_len}  "
                      f"global batch={global_rows} rows  mixed_precision={accelerator.mixed_precision}")
    losses, step_times, step_loss = [], [], []
    tokens_per_step = global_rows * args.seq_len
    micro = 0
    t0 = time.perf_counter()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        step_loss.append(loss.detach())
        micro += 1
        if micro % args.grad_accum:
            continue
        # mean over the micro-batches of this step and over the processes: the global-batch loss
        step_mean = accelerator.reduce(torch.stack(step_loss).mean(), reduction="mean")
        step_loss = []
        if on_gpu:
            torch.cuda.synchronize()  # timing only; the loss stays on the device until the end
        t1 = time.perf_counter()
        step_times.append(t1 - t0)
        t0 = t1
        losses.append(step_mean)
        if len(losses) == args.warmup_steps and on_gpu:
            torch.cuda.reset_peak_memory_stats()  # steady-state peak, after compilation and autotuning
        if accelerator.is_main_process and (len(losses) <= 3 or len(losses) % 5 == 0 or len(losses) == args.steps):
            print(f"step {len(losses):4d}  loss {step_mean.item():.5f}  "
                  f"{tokens_per_step / world / step_times[-1]:,.0f} tokens/s per device", flush=True)

    timed = step_times[args.warmup_steps:] or step_times
    tokens_per_s_per_device = tokens_per_step / world / (sum(timed) / len(timed))
    peak = torch.tensor(torch.cuda.max_memory_allocated() if on_gpu else 0, device=accelerator.device)
    peaks = accelerator.gather(peak[None]).tolist()
    result = {
        "distributed_type": str(accelerator.distributed_type).split(".")[-1], "num_processes": world,
        "attn": args.attn, "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
        "mixed_precision": accelerator.mixed_precision, "model": args.model,
        "num_layers": accelerator.unwrap_model(model).config.num_hidden_layers, "seq_len": args.seq_len,
        "batch_size_per_device": args.batch_size, "grad_accum": args.grad_accum, "global_batch_rows": global_rows,
        "steps": len(losses), "warmup_steps": args.warmup_steps,
        "losses": [float(x) for x in torch.stack(losses).float().cpu()],
        "step_seconds": step_times, "tokens_per_s_per_device": tokens_per_s_per_device,
        "peak_memory_gib_per_device": [p / 2**30 for p in peaks],
    }
    accelerator.print(f"done: {tokens_per_s_per_device:,.0f} tokens/s per device (steps {args.warmup_steps + 1}.."
                      f"{len(losses)}), peak memory per device {max(peaks) / 2**30:.2f} GiB, final loss "
                      f"{result['losses'][-1]:.5f}")
    if args.out and accelerator.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not all(math.isfinite(x) for x in result["losses"]):
        raise SystemExit("the loss is not finite")
    return result


if __name__ == "__main__":
    main()
