"""Multi-GPU training benchmark of attn_implementation="flashtri" against "sdpa" through accelerate (DDP and
FSDP2): ``hf-flash bench distributed`` or ``python -m hf_flash.bench.distributed [--quick] [--out DIR]``.

Needs 2 or more CUDA GPUs on one machine (all visible GPUs are used; ``HF_FLASH_DIST_NPROC`` picks fewer).

Model: Llama-3-8B shapes (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256) with **4 decoder
layers** (1.9 B parameters, 1.05 B of them in the embedding and the LM head), random weights from one seed, the
same in every process and run. Training: sequence 4096, 1 row per GPU per step (global batch = number of GPUs
rows), bf16 mixed precision from accelerate (float32 master weights, AdamW, lr 1e-4), 12 optimizer steps of
which the first 3 are warm-up (Triton compilation) and are left out of the timings. Random token rows: row
``i`` of the data comes from seed ``i``, and a global batch is the same rows whether one GPU takes them in
``world`` accumulated micro-batches or ``world`` GPUs take one each.

Runs, each in fresh processes, for "flashtri" and for "sdpa":

* ``single``: one GPU, gradient accumulation over ``world`` micro-batches: the same global batch per step;
* ``ddp``: ``torch.distributed.run`` on every GPU, the environment ``accelerate launch --config_file
  examples/accelerate/ddp.yaml`` sets (DDP, bf16);
* ``fsdp``: the same with ``examples/accelerate/fsdp.yaml``: FSDP2, every LlamaDecoderLayer its own shard unit,
  reshard after forward.

Measured per run: per-step loss (mean over the global batch), tokens/s per GPU (global tokens per step / GPUs /
median step time), peak memory per GPU during the timed steps (max over GPUs) and that peak minus the memory
held between steps (weights, optimizer state: what the step itself adds), as counted by PyTorch's
allocator (NCCL buffers and the CUDA context are not included).

Checks and ratios, in ``distributed.json``:

* loss agreement: the largest per-step |loss - loss of the single-GPU run of the same implementation|. With
  bf16 the runs differ by rounding (different batch shapes per matmul, all-reduce order); flashtri passes when
  its gap is within 3x sdpa's gap in the same configuration plus 0.02 (about 0.2% of the loss);
* flashtri / sdpa for tokens/s per GPU (> 1: flashtri faster) and peak memory per GPU (< 1: flashtri smaller),
  for single, DDP and FSDP; and the scaling efficiency (tokens/s per GPU distributed / single-GPU).

``quick=True``: 2 layers, sequence 1024, 5 steps (2 warm-up): a check of the plumbing, not the figures. A run
that fails (out of memory, an error) is recorded as null with its error, the others still run. Results are
written after every run, so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from hf_flash.bench import common as C

IMPLS = ("flashtri", "sdpa")
STRATEGIES = ("single", "ddp", "fsdp")
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# a smoke test of the worker on the CPU (gloo, Triton's interpreter); never used by run()
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
SIZES = {"full": dict(layers=4, seq_len=4096, rows=1, steps=12, warmup=3, timeout=300),
         "quick": dict(layers=2, seq_len=1024, rows=1, steps=5, warmup=2, timeout=240)}
LR = 1e-4
LOSS_FACTOR, LOSS_FLOOR = 3.0, 0.02
# What `accelerate launch` puts in the environment for examples/accelerate/{ddp,fsdp}.yaml (mixed precision is
# passed to the Accelerator directly).
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_OFFLOAD_PARAMS": "false", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
            "FSDP_USE_ORIG_PARAMS": "true", "FSDP_SYNC_MODULE_STATES": "true"}


# ------------------------------------------------------------------------------------------------ worker


def _rows(first: int, count: int, seq_len: int, vocab: int) -> torch.Tensor:
    return torch.stack([torch.randint(0, vocab, (seq_len,), generator=torch.Generator().manual_seed(first + i))
                        for i in range(count)])


def _worker(argv) -> None:
    """One process of one run (started by :func:`run`): trains and writes the measurements (rank 0)."""
    p = argparse.ArgumentParser(prog="python -m hf_flash.bench.distributed --worker")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--impl", choices=IMPLS, required=True)
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--world", type=int, required=True, help="GPUs of the distributed runs (global batch)")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", choices=("llama3-8b", "tiny"), default="llama3-8b")
    p.add_argument("--hang-timeout", type=float, default=None,
                   help="seconds after which a hung process prints every thread's stack and exits")
    a = p.parse_args(argv)
    if a.hang_timeout:
        faulthandler.dump_traceback_later(a.hang_timeout, exit=True)

    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_flash  # noqa: F401 - registers "flashtri"

    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    accum = a.world if a.strategy == "single" else 1
    acc = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=accum, cpu=not on_gpu)
    want = {"single": DistributedType.NO, "ddp": DistributedType.MULTI_GPU if on_gpu else DistributedType.MULTI_CPU,
            "fsdp": DistributedType.FSDP}
    if acc.distributed_type != want[a.strategy] or acc.num_processes != (1 if a.strategy == "single" else a.world):
        raise RuntimeError(f"{a.strategy}: accelerate runs {acc.distributed_type} on {acc.num_processes} "
                           f"processes, expected {want[a.strategy]} on {a.world}")
    config = LlamaConfig(**(LLAMA3_8B if a.shape == "llama3-8b" else TINY), num_hidden_layers=a.layers,
                         use_cache=False)
    torch.manual_seed(0)
    with torch.device(acc.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=a.impl, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model, opt = acc.prepare(model, opt)

    world, rank = acc.num_processes, acc.process_index
    global_rows = a.rows * a.world
    losses, times = [], []
    static_bytes = 0
    for step in range(a.steps):
        if step == a.warmup and on_gpu:
            sync()
            static_bytes = torch.cuda.memory_allocated()  # weights, optimizer state, between steps
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        step_losses = []
        for micro in range(accum):
            # chunk c of the global batch: micro-batch c on one GPU, process c on `world` GPUs
            chunk = micro * world + rank
            ids = _rows(step * global_rows + chunk * a.rows, a.rows, a.seq_len, config.vocab_size)
            ids = ids.to(acc.device, non_blocking=True)
            with acc.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                acc.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step_losses.append(loss.detach().float())
        losses.append(acc.reduce(torch.stack(step_losses).mean(), reduction="mean"))
        sync()
        times.append(time.perf_counter() - t0)

    peak = torch.tensor([torch.cuda.max_memory_allocated() if on_gpu else 0, static_bytes], device=acc.device,
                        dtype=torch.float64)
    mem = acc.gather(peak[None]).cpu()  # (world, 2)
    timed = times[a.warmup:] or times
    step_s = statistics.median(timed)
    if acc.is_main_process:
        out = {"impl": a.impl, "strategy": a.strategy, "gpus": world, "grad_accum": accum,
               "distributed_type": str(acc.distributed_type).split(".")[-1],
               "layers": a.layers, "seq_len": a.seq_len, "global_batch_rows": global_rows,
               "losses": [float(x) for x in torch.stack(losses).cpu()], "step_seconds": times,
               "median_step_s": step_s,
               "tokens_per_s_per_gpu": global_rows * a.seq_len / world / step_s,
               "peak_gib_per_gpu": float(mem[:, 0].max()) / 2**30,
               "step_extra_gib_per_gpu": float((mem[:, 0] - mem[:, 1]).max()) / 2**30,
               "params": sum(p.numel() for p in acc.unwrap_model(model).parameters())}
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    acc.wait_for_everyone()
    acc.end_training()


# ------------------------------------------------------------------------------------------------ driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(strategy: str, impl: str, world: int, sz: dict, out_file: str,
            log_dir: str) -> tuple[dict | None, str | None]:
    worker = ["-m", "hf_flash.bench.distributed", "--worker", "--impl", impl, "--strategy", strategy,
              "--world", str(world), "--layers", str(sz["layers"]), "--seq-len", str(sz["seq_len"]),
              "--rows", str(sz["rows"]), "--steps", str(sz["steps"]), "--warmup", str(sz["warmup"]),
              "--out", out_file, "--hang-timeout", str(sz["timeout"] - 20)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSDP_", "ACCELERATE_"))}
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("OMP_NUM_THREADS", "4")
    if strategy == "single":
        cmd = [sys.executable, *worker]
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *worker]
        if strategy == "fsdp":
            env.update(FSDP_ENV)
    log = os.path.join(log_dir, f"distributed_{strategy}_{impl}.log")
    with open(log, "w") as f:
        # own process group, so that a timeout can stop the launcher (and through it the workers)
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=sz["timeout"])
        except subprocess.TimeoutExpired:
            # SIGTERM first: torch.distributed.run then stops its workers (they run in sessions of their own)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None, f"timed out after {sz['timeout']}s (log: {log})"
    if proc.returncode != 0 or not os.path.exists(out_file):
        tail = open(log).read().strip().splitlines()
        errs = [l for l in tail if "Error" in l or "error" in l]
        return None, f"exit {proc.returncode}: {(errs or tail or [''])[-1][:240]} (log: {log})"
    with open(out_file) as f:
        return json.load(f), None


def _gpu_count() -> int:
    C.require_cuda("hf-flash bench distributed")
    n = torch.cuda.device_count()
    if n < 2:
        raise C.BenchUnavailable(f"hf-flash bench distributed needs 2 or more CUDA GPUs on this machine and "
                                 f"torch sees {n} ({torch.cuda.get_device_name(0)}); run it on a multi-GPU "
                                 "machine (it uses every visible GPU, or HF_FLASH_DIST_NPROC of them)")
    want = os.environ.get("HF_FLASH_DIST_NPROC")
    if want is not None:
        if not want.isdigit() or not 2 <= int(want) <= n:
            raise C.BenchUnavailable(f"HF_FLASH_DIST_NPROC must be an integer from 2 to {n} (the visible GPUs), "
                                     f"got {want!r}")
        n = int(want)
    return n


def run(quick: bool = False, out_dir: str = "benchmarks/results") -> dict:
    world = _gpu_count()
    sz = SIZES["quick" if quick else "full"]
    json_path = C.result_path(out_dir, "distributed", quick, "json")
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    result = {"env": C.env_info(), "gpus": world,
              "setup": dict(model="Llama-3-8B shapes", **LLAMA3_8B, num_hidden_layers=sz["layers"],
                            seq_len=sz["seq_len"], rows_per_gpu_per_step=sz["rows"],
                            global_batch_rows=sz["rows"] * world, steps=sz["steps"], warmup_steps=sz["warmup"],
                            optimizer=f"AdamW lr {LR}", precision="bf16 mixed (accelerate), float32 master weights",
                            single="1 GPU, gradient accumulation over the same global batch",
                            ddp="accelerate DDP", fsdp="accelerate FSDP2, LlamaDecoderLayer units, reshard after "
                                                       "forward"),
              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in STRATEGIES:
            for impl in IMPLS:
                key = f"{strategy}/{impl}"
                print(f"[distributed] {key} on {1 if strategy == 'single' else world} GPU(s) ...", flush=True)
                t0 = time.perf_counter()
                res, err = _launch(strategy, impl, world, sz, os.path.join(tmp, f"{strategy}_{impl}.json"),
                                   log_dir)
                result["runs"][key] = res if res is not None else {"error": err}
                print(f"[distributed] {key}: {'ok' if res else err} ({time.perf_counter() - t0:.0f}s)", flush=True)
                C.write_json(result, json_path)
    result.update(_compare(result["runs"]))
    result["table"] = _table(result)
    result["summary"] = _summary(result)
    files = [C.write_json({k: v for k, v in result.items() if k != "files"}, json_path)]
    png = _plot(result, C.result_path(out_dir, "distributed", quick, "png"))
    if png:
        files.append(png)
    result["files"] = files
    return result


def _get(runs, strategy, impl, field):
    r = runs.get(f"{strategy}/{impl}") or {}
    return r.get(field)


def _loss_gap(runs, strategy, impl):
    a, b = _get(runs, strategy, impl, "losses"), _get(runs, "single", impl, "losses")
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(x - y) for x, y in zip(a, b))


def _compare(runs) -> dict:
    checks, ratios = {}, {}
    for strategy in ("ddp", "fsdp"):
        gap_f, gap_s = _loss_gap(runs, strategy, "flashtri"), _loss_gap(runs, strategy, "sdpa")
        tol = None if gap_s is None else LOSS_FACTOR * gap_s + LOSS_FLOOR
        checks[strategy] = {"flashtri_max_loss_gap_vs_single": gap_f, "sdpa_max_loss_gap_vs_single": gap_s,
                            "tolerance": tol,
                            "ok": None if gap_f is None or tol is None else bool(gap_f <= tol)}
    fs = _get(runs, "single", "flashtri", "losses")
    ss = _get(runs, "single", "sdpa", "losses")
    checks["single_flashtri_vs_sdpa_max_loss_gap"] = (max(abs(x - y) for x, y in zip(fs, ss))
                                                      if fs and ss and len(fs) == len(ss) else None)
    for strategy in STRATEGIES:
        ratios[strategy] = {
            "tokens_per_s_per_gpu_flashtri_over_sdpa": C.ratio(_get(runs, strategy, "flashtri", "tokens_per_s_per_gpu"),
                                                               _get(runs, strategy, "sdpa", "tokens_per_s_per_gpu")),
            "peak_gib_per_gpu_flashtri_over_sdpa": C.ratio(_get(runs, strategy, "flashtri", "peak_gib_per_gpu"),
                                                           _get(runs, strategy, "sdpa", "peak_gib_per_gpu")),
            "step_extra_gib_flashtri_over_sdpa": C.ratio(_get(runs, strategy, "flashtri", "step_extra_gib_per_gpu"),
                                                         _get(runs, strategy, "sdpa", "step_extra_gib_per_gpu")),
        }
        if strategy != "single":
            for impl in IMPLS:
                ratios[strategy][f"scaling_efficiency_{impl}"] = C.ratio(
                    _get(runs, strategy, impl, "tokens_per_s_per_gpu"),
                    _get(runs, "single", impl, "tokens_per_s_per_gpu"))
    return {"checks": checks, "ratios": ratios}


def _table(result) -> dict:
    runs, checks, ratios = result["runs"], result["checks"], result["ratios"]
    rows = []
    for strategy in STRATEGIES:
        for impl in IMPLS:
            r = runs.get(f"{strategy}/{impl}") or {}
            gap = _loss_gap(runs, strategy, impl) if strategy != "single" else None
            rows.append([strategy, impl, r.get("gpus", result["gpus"] if strategy != "single" else 1),
                         r.get("tokens_per_s_per_gpu"), r.get("peak_gib_per_gpu"), r.get("step_extra_gib_per_gpu"),
                         (r.get("losses") or [None])[-1], gap, r.get("error", "")[:60] if "error" in r else ""])
        rt = ratios[strategy]
        ok = checks.get(strategy, {}).get("ok") if strategy != "single" else None
        rows.append([strategy, "flashtri/sdpa", "", rt["tokens_per_s_per_gpu_flashtri_over_sdpa"],
                     rt["peak_gib_per_gpu_flashtri_over_sdpa"], rt["step_extra_gib_flashtri_over_sdpa"], None, None,
                     "" if ok is None else ("loss ok" if ok else "LOSS GAP TOO LARGE")])
    s = result["setup"]
    return {"title": f"Llama-3-8B shapes, {s['num_hidden_layers']} layers, seq {s['seq_len']}, global batch "
                     f"{s['global_batch_rows']} rows, bf16, {result['gpus']} GPUs (loss gap: max per-step |loss - "
                     f"single-GPU loss|)",
            "columns": ["run", "attn", "GPUs", "tokens/s/GPU", "peak GiB/GPU", "step GiB/GPU", "final loss",
                        "loss gap", "note"],
            "rows": rows}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _summary(result) -> list:
    out = []
    for strategy in ("ddp", "fsdp"):
        rt, ck = result["ratios"][strategy], result["checks"][strategy]
        out.append([f"{strategy} x{result['gpus']} flashtri/sdpa tokens/s per GPU",
                    _fmt(rt["tokens_per_s_per_gpu_flashtri_over_sdpa"])])
        out.append([f"{strategy} x{result['gpus']} flashtri/sdpa peak memory per GPU",
                    _fmt(rt["peak_gib_per_gpu_flashtri_over_sdpa"])])
        out.append([f"{strategy} loss vs single GPU (flashtri gap / tol)",
                    f"{_fmt(ck['flashtri_max_loss_gap_vs_single'])} / {_fmt(ck['tolerance'])} "
                    f"{'ok' if ck['ok'] else 'FAIL' if ck['ok'] is False else '-'}"])
    return out


def _plot(result, path):
    runs = result["runs"]
    panels = []
    for impl in IMPLS:
        series = {}
        for strategy in STRATEGIES:
            losses = _get(runs, strategy, impl, "losses")
            if losses:
                series[strategy] = losses
        if series:
            n = max(len(v) for v in series.values())
            panels.append({"title": f"per-step loss, {impl}", "x": list(range(1, n + 1)), "series": series,
                           "xlabel": "step", "ylabel": "loss"})
    for field, label in (("tokens_per_s_per_gpu", "tokens/s per GPU"), ("peak_gib_per_gpu", "peak GiB per GPU")):
        panels.append({"title": label, "x": list(STRATEGIES), "kind": "bar", "xlabel": "", "ylabel": label,
                       "series": {impl: [_get(runs, s, impl, field) for s in STRATEGIES] for impl in IMPLS}})
    return C.plot_panels(path, panels, suptitle=f"flashtri vs sdpa, {result['gpus']} GPUs, "
                                                f"{result['env'].get('device', '')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        _worker(argv)
        return 0
    p = argparse.ArgumentParser(prog="python -m hf_flash.bench.distributed",
                                description="flashtri vs sdpa under DDP and FSDP2 on the GPUs of this machine")
    p.add_argument("--quick", action="store_true", help="2 layers, sequence 1024, 5 steps")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    args = p.parse_args(argv)
    try:
        result = run(args.quick, args.out)
    except C.BenchUnavailable as e:
        print(f"hf-flash bench distributed: error: {e}", file=sys.stderr)
        return 2
    print(C.format_table(result["table"]))
    for label, value in result["summary"]:
        print(f"{label}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
