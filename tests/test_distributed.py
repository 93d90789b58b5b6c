"""attn_implementation="flashtri" under multi-process training through accelerate: DDP and FSDP2.

Each test starts 2 processes with the environment ``torch.distributed.run`` gives its workers (rendezvous on
127.0.0.1, a free port), where an ``accelerate.Accelerator`` prepares a tiny random Llama loaded with
"flashtri", an SGD optimizer and a DataLoader (accelerate shards the global batch of 4 padded rows, 2 rows per
process). Every process takes one step and saves its gradients, the rows it saw, its loss and the kernel launch
counts. The test then runs the same step in this process on the whole global batch and asserts:

* the two processes saw disjoint halves of the global batch;
* the gradients of every parameter (all-reduced by DDP, reduce-scattered by FSDP2 and gathered back here) equal
  the single-process gradients, and so do the parameters after the SGD step;
* the FA2 forward and backward kernels ran in every process (launch counters), and with activation
  checkpointing the forward ran twice per layer (recompute).

The loss is normalised by the token count of the global batch (``num_items_in_batch``, times the number of
processes because DDP/FSDP average gradients), as transformers' Trainer does, so that rows with different
padding weigh the same in both runs. Everything is float32 and the only differences are summation orders
(all-reduce, batch split): gradients agree to ~1e-6 relative; the 1e-4 tolerance leaves a wide margin.

On the CPU the processes use gloo and Triton's interpreter (the model has 2 layers, hidden 64, 4 query heads,
2 KV heads, head dim 24); on a machine with 2 or more GPUs the same tests use NCCL and a larger model, and
they are skipped on a machine with one GPU.

FSDP on the CPU: accelerate only turns on FSDP for GPU-like distributed types, so on the CPU the worker sets
``AcceleratorState.distributed_type = FSDP`` and the FSDP2 plugin by hand before ``prepare``; from there the code
is accelerate's own FSDP2 path (``fully_shard`` of every LlamaDecoderLayer by the transformer auto-wrap policy,
activation checkpointing through ``checkpoint_wrapper``). On GPUs the worker reads the same settings from the
environment that ``accelerate launch --config_file examples/accelerate/fsdp.yaml`` sets.

The worker is this file run as a script (``python tests/test_distributed.py --worker ...``).

Also here: the multi-GPU benchmark (:mod:`hf_flash.bench.distributed`) refuses to run without 2 GPUs, and its
loss check (flashtri's gap to the single-GPU run within 3x sdpa's gap + 0.02) decides as documented.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

ON_GPU = torch.cuda.is_available()
WORLD = 2
# (hidden, layers, heads, kv heads, head dim, rows per process, sequence length) per device
SIZES = {"cpu": dict(hidden=64, layers=2, heads=4, kv=2, head_dim=24, rows=2, seqlen=37),
         "cuda": dict(hidden=512, layers=4, heads=8, kv=2, head_dim=80, rows=2, seqlen=517)}
S = SIZES["cuda" if ON_GPU else "cpu"]
VOCAB = 101
LR = 0.5
TIMEOUT_S = 600 if ON_GPU else 300
# What `accelerate launch` sets from examples/accelerate/fsdp.yaml: FSDP2, every LlamaDecoderLayer sharded,
# activation checkpointing.
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_ACTIVATION_CHECKPOINTING": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=S["hidden"], intermediate_size=2 * S["hidden"],
                       num_hidden_layers=S["layers"], num_attention_heads=S["heads"],
                       num_key_value_heads=S["kv"], head_dim=S["head_dim"], max_position_embeddings=1024,
                       use_cache=False, pad_token_id=0)


def _global_batch(seed: int = 0):
    """WORLD * rows padded rows (right padding, different amounts, one row full) with a row index."""
    n, L = WORLD * S["rows"], S["seqlen"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, L), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, n):
        mask[b, L - ((7 * b + 3) % (L // 2) + 1):] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
            "row": torch.arange(n)}


def _scaled_loss(model, batch, num_items, num_processes):
    """Sum of the token losses over the global token count, times the process count (DDP/FSDP average)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                num_items_in_batch=num_items)
    return out.loss * num_processes


def _num_items(labels):
    return (labels[:, 1:] != -100).sum()  # causal LM loss: labels shift left by one


# ------------------------------------------------------------------------------------------------ worker


def _full(t):
    """A DTensor shard (FSDP2) gathered into the full tensor; a plain tensor as is; on the CPU."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().cpu().clone()


def _worker(args) -> None:
    faulthandler.dump_traceback_later(TIMEOUT_S - 30, exit=True)  # a hung worker shows where it hangs
    import hf_flash  # noqa: F401 - registers "flashtri"
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    from hf_flash.kernels import attention as kattn

    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not on_gpu)
    if accelerator.num_processes != WORLD:
        raise RuntimeError(f"expected {WORLD} processes, accelerate sees {accelerator.num_processes}")
    if args.mode == "fsdp" and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate enables FSDP only for GPU-like distributed types (see the module docstring); the plugin
        # reads the same FSDP_* variables (FSDP_ENV) as on GPUs
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        accelerator.state.distributed_type = DistributedType.FSDP
    expected = DistributedType.FSDP if args.mode == "fsdp" else (
        DistributedType.MULTI_GPU if on_gpu else DistributedType.MULTI_CPU)
    distributed_type = str(accelerator.distributed_type)
    if accelerator.distributed_type != expected:
        raise RuntimeError(f"accelerate runs {distributed_type}, expected {expected}")

    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="flashtri",
                                                 dtype=torch.float32)
    model.train()
    data = torch.load(args.batch)
    rows = [{k: v[i] for k, v in data.items()} for i in range(len(data["row"]))]
    loader = torch.utils.data.DataLoader(rows, batch_size=S["rows"], shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt, loader = accelerator.prepare(model, opt, loader)

    batch = next(iter(loader))
    num_items = accelerator.reduce(_num_items(batch["labels"]), reduction="sum")
    before = dict(kattn.launches)
    loss = _scaled_loss(model, batch, num_items, accelerator.num_processes)
    accelerator.backward(loss)
    launches = {k: kattn.launches[k] - before[k] for k in before}
    params = dict(accelerator.unwrap_model(model).named_parameters())
    grads = {_clean(n): _full(p.grad) for n, p in params.items() if p.grad is not None}
    opt.step()
    stepped = {_clean(n): _full(p) for n, p in params.items()}
    global_loss = accelerator.reduce(loss.detach() / accelerator.num_processes, reduction="sum")

    attn = [m for m in accelerator.unwrap_model(model).modules() if hasattr(m, "_hf_flash_plan")]
    sharded_layers = checkpointed_layers = 0
    if args.mode == "fsdp":
        from torch.distributed.fsdp import FSDPModule
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        modules = list(accelerator.unwrap_model(model).modules())
        wrappers = {id(m._checkpoint_wrapped_module): m for m in modules if hasattr(m, "_checkpoint_wrapped_module")}
        layers = [m for m in modules if isinstance(m, LlamaDecoderLayer)]
        sharded_layers = sum(isinstance(m, FSDPModule) or isinstance(wrappers.get(id(m)), FSDPModule) for m in layers)
        checkpointed_layers = sum(id(m) in wrappers for m in layers)
    torch.save({"rank": accelerator.process_index, "distributed_type": distributed_type,
                "backend": accelerator.state.backend, "rows": batch["row"].cpu().tolist(),
                "loss": float(global_loss), "grads": grads, "params": stepped, "launches": launches,
                "attn_impl": accelerator.unwrap_model(model).config._attn_implementation,
                "flashtri_modules": len(attn), "sharded_layers": sharded_layers,
                "checkpointed_layers": checkpointed_layers},
               os.path.join(args.out, f"rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    # Leave without the process-group teardown: under load a rank was once seen blocked there after the rank
    # hosting the rendezvous store had exited. Everything this process had to do is on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _clean(name: str) -> str:
    """Parameter names without the wrappers' prefixes (activation checkpointing adds one)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")


# ------------------------------------------------------------------------------------------------ tests


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, model_dir: str, batch_file: str, out_dir: str) -> None:
    """Start WORLD worker processes with the environment torchrun gives its workers (rendezvous on 127.0.0.1,
    a free port); wait for all, killing the others when one fails or the time is up."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--model", model_dir,
           "--batch", batch_file, "--out", out_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    if mode == "fsdp":
        env.update(FSDP_ENV)
    if not ON_GPU:
        env["TRITON_INTERPRET"] = "1"
    logs = [open(os.path.join(out_dir, f"rank{r}.log"), "w+") for r in range(WORLD)]
    from conftest import subprocess_env

    env = subprocess_env(env)
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in range(WORLD)]
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = "timeout"
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    failed = failed if failed is not None else next((r for r, p in enumerate(procs) if p.returncode), None)
    if failed is not None:
        text = []
        for r, f in enumerate(logs):
            f.seek(0)
            text.append(f"--- rank {r} (exit {procs[r].returncode})\n" + f.read()[-4000:])
        what = f"did not finish in {TIMEOUT_S}s" if failed == "timeout" else f"rank {failed} failed"
        raise AssertionError(f"{mode}: {what}\n" + "\n".join(text))


def _single_process_step(model_dir: str, data: dict):
    from transformers import AutoModelForCausalLM

    device = "cuda" if ON_GPU else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="flashtri",
                                                 dtype=torch.float32).to(device).train()
    batch = {k: v.to(device) for k, v in data.items()}
    loss = _scaled_loss(model, batch, _num_items(batch["labels"]), 1)
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD(model.parameters(), lr=LR).step()
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return loss.item(), grads, params


def _assert_close(what: str, got: dict, want: dict, rtol: float = 1e-4) -> None:
    assert got.keys() == want.keys(), f"{what}: parameters differ: {sorted(set(got) ^ set(want))[:5]}"
    bad = []
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = (g - w).abs().max().item()
        scale = w.abs().max().item()
        if not err <= rtol * scale + 1e-7:
            bad.append(f"{name}: max diff {err:.3g} (scale {scale:.3g})")
    assert not bad, f"{what}: {len(bad)}/{len(want)} tensors differ from the single-process run: " + "; ".join(bad[:5])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import hf_flash  # noqa: F401

    if ON_GPU and torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs, {torch.cuda.device_count()} visible")
    torch.manual_seed(1234)
    model_dir = str(tmp_path_factory.mktemp("llama"))
    AutoModelForCausalLM.from_config(_llama_config()).save_pretrained(model_dir)
    data = _global_batch()
    batch_file = str(tmp_path_factory.mktemp("batch") / "batch.pt")
    torch.save(data, batch_file)
    loss, grads, params = _single_process_step(model_dir, data)
    return dict(model_dir=model_dir, batch_file=batch_file, data=data, loss=loss, grads=grads, params=params)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_step_matches_single_process(setup, tmp_path, mode):
    """2 processes, one step on a sharded global batch: gradients, stepped parameters and loss equal the
    single-process step on the whole batch, and the flashtri kernels ran in every process."""
    _launch(mode, setup["model_dir"], setup["batch_file"], str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    rows = [r["rows"] for r in results]
    assert sorted(sum(rows, [])) == list(range(WORLD * S["rows"])) and all(len(r) == S["rows"] for r in rows), \
        f"accelerate should give each process a disjoint part of the global batch, got {rows}"
    for r in results:
        who = f"{mode} rank {r['rank']}"
        assert r["backend"] == ("nccl" if ON_GPU else "gloo"), who
        assert "FSDP" in r["distributed_type"] if mode == "fsdp" else "MULTI" in r["distributed_type"], who
        assert r["attn_impl"] == "flashtri" and r["flashtri_modules"] == S["layers"], who
        # FSDP runs with activation checkpointing: the forward runs again in the backward
        n_fwd = 2 * S["layers"] if mode == "fsdp" else S["layers"]
        assert r["launches"]["fwd"] == n_fwd, f"{who}: forward kernel launches {r['launches']}"
        gluon = r["launches"]["bwd_gluon"]  # the Hopper backward, where it takes a call
        dq_runs = r["launches"]["bwd_dq"] + r["launches"]["bwd_fused_dq"] + gluon
        assert dq_runs == S["layers"] and r["launches"]["bwd_dkdv"] + gluon == S["layers"], \
            f"{who}: backward kernel launches {r['launches']}"
        if mode == "fsdp":
            assert r["sharded_layers"] == S["layers"] and r["checkpointed_layers"] == S["layers"], \
                f"{who}: {r['sharded_layers']} decoder layers sharded, {r['checkpointed_layers']} checkpointed"
        assert abs(r["loss"] - setup["loss"]) <= 2e-5 * max(1.0, abs(setup["loss"])), \
            f"{who}: loss {r['loss']} vs single process {setup['loss']}"
        _assert_close(f"{who} gradients", r["grads"], setup["grads"])
        _assert_close(f"{who} parameters after the SGD step", r["params"], setup["params"])


# ------------------------------------------------------------------------------------------------ benchmark


def test_bench_needs_two_gpus(tmp_path):
    from hf_flash.bench import common as C
    from hf_flash.bench import distributed as bench

    if ON_GPU and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has several GPUs: the benchmark would run")
    with pytest.raises(C.BenchUnavailable, match="CUDA GPU" if not ON_GPU else "2 or more CUDA GPUs"):
        bench.run(quick=True, out_dir=str(tmp_path))
    assert not list(tmp_path.iterdir()), "nothing should be written when the benchmark cannot run"


def test_bench_loss_check_scales_with_sdpa_gap():
    """The bench's pass rule: flashtri's largest per-step gap to its single-GPU run within 3x sdpa's + 0.02."""
    from hf_flash.bench import distributed as bench

    single = [11.9, 11.8, 11.7]
    runs = {"single/flashtri": {"losses": single, "tokens_per_s_per_gpu": 100.0, "peak_gib_per_gpu": 40.0,
                                "step_extra_gib_per_gpu": 8.0},
            "single/sdpa": {"losses": single, "tokens_per_s_per_gpu": 80.0, "peak_gib_per_gpu": 42.0,
                            "step_extra_gib_per_gpu": 10.0},
            "ddp/flashtri": {"losses": [11.9, 11.83, 11.7], "tokens_per_s_per_gpu": 90.0},
            "ddp/sdpa": {"losses": [11.9, 11.81, 11.7], "tokens_per_s_per_gpu": 75.0},
            "fsdp/flashtri": {"losses": [11.9, 11.9, 11.7]},
            "fsdp/sdpa": {"error": "exit 1: OutOfMemoryError"}}
    out = bench._compare(runs)
    ddp, fsdp = out["checks"]["ddp"], out["checks"]["fsdp"]
    assert ddp["ok"] is True and ddp["tolerance"] == pytest.approx(3 * 0.01 + 0.02)
    assert fsdp["ok"] is None and fsdp["sdpa_max_loss_gap_vs_single"] is None  # no sdpa run: no verdict
    runs["fsdp/sdpa"] = {"losses": single}
    assert bench._compare(runs)["checks"]["fsdp"]["ok"] is False  # a 0.1 gap against an exact sdpa run
    r = out["ratios"]
    assert r["single"]["tokens_per_s_per_gpu_flashtri_over_sdpa"] == pytest.approx(1.25)
    assert r["single"]["peak_gib_per_gpu_flashtri_over_sdpa"] == pytest.approx(40 / 42)
    assert r["ddp"]["scaling_efficiency_flashtri"] == pytest.approx(0.9)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="worker of tests/test_distributed.py (one process per rank)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    _worker(parser.parse_args())
