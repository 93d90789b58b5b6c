"""The ``hf-flash`` command line.

``hf-flash check``
    Prints the versions and the device, then runs every kernel once on small random inputs against
    :func:`hf_flash.attention_ref` and prints pass/fail per kernel with the error measured. The tolerance scales
    itself: the kernel's largest error against the float32 reference must stay within 2x (forward) / 3x
    (gradients) of what plain PyTorch in the same low precision gets, plus a small absolute floor. A kernel whose
    code has not landed (missing function, ``NotImplementedError``) is reported "not available" and does not fail
    the command unless ``--strict``. Exit code 1 when any kernel fails.
    With no CUDA GPU it runs on the CPU through Triton's interpreter, setting ``TRITON_INTERPRET=1`` itself (in a
    child process when triton was already imported without it) and saying so.

``hf-flash bench kernels|decode|e2e|distributed [--quick] [--out DIR]``
    Runs ``hf_flash.bench.<name>.run(quick, out_dir)`` (CUDA only), which writes JSON and PNG files, then prints
    its table of ratios against PyTorch SDPA's backends.

``hf-flash demo``
    Listed only when ``hf_flash.demo`` exists; its arguments go to ``hf_flash.demo.main``.

Usage errors (bad flags, no GPU for a benchmark) print one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = ("kernels", "decode", "e2e", "distributed")
_REEXEC_ENV = "_HF_FLASH_SET_INTERPRET"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), not the usage block."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _usage_error(prog: str, message: str) -> int:
    sys.stderr.write(f"{prog}: error: {message}\n")
    return 2


def _demo_available() -> bool:
    try:
        return importlib.util.find_spec("hf_flash.demo") is not None
    except (ImportError, ValueError):
        return False


def _default_out_dir() -> str:
    """``benchmarks/results`` when run from the hf_flash repository root, else ``./hf_flash_results``."""
    cwd = Path.cwd()
    pyproject = cwd / "pyproject.toml"
    try:
        in_repo = (cwd / "benchmarks").is_dir() and 'name = "hf-flash"' in pyproject.read_text()
    except OSError:
        in_repo = False
    return str(Path("benchmarks") / "results") if in_repo else "hf_flash_results"


def build_parser() -> argparse.ArgumentParser:
    import hf_flash

    parser = _Parser(prog="hf-flash",
                     description="FlashAttention-2 / Flash-Decoding in Triton for HuggingFace Transformers "
                                 "(attn_implementation=\"flashtri\").")
    parser.add_argument("--version", action="version", version=f"hf_flash {hf_flash.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    check = sub.add_parser("check", help="print versions and device, run every kernel once against the reference",
                           description="Print the versions and the device, then run each kernel once on small "
                                       "random inputs against hf_flash.attention_ref and print pass/fail with the "
                                       "error measured. Exit code 1 if a kernel fails.")
    check.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                       help="where to run the kernels (default: cuda when available, else the CPU through "
                            "Triton's interpreter)")
    check.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                       help="input dtype (default: bfloat16 on CUDA, float16 on the CPU)")
    check.add_argument("--strict", action="store_true",
                       help="also fail (exit code 1) when a kernel is not available")
    check.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")

    bench = sub.add_parser("bench", help="run a benchmark on the GPU: " + ", ".join(BENCHMARKS),
                           description="Run a benchmark (CUDA GPU only): write <name>.json and PNG plots into "
                                       "the output folder and print the ratios against PyTorch SDPA.")
    bench.add_argument("name", choices=BENCHMARKS, help="which benchmark: kernels (attention kernels, FA2 paper "
                                                        "grid and features), decode (split-KV decoding), e2e "
                                                        "(HuggingFace models end to end), distributed (DDP/FSDP2 "
                                                        "training, 2+ GPUs)")
    bench.add_argument("--quick", action="store_true",
                       help="a few points only (writes <name>_quick.json, never overwriting full results)")
    bench.add_argument("--out", metavar="DIR", default=None,
                       help="output folder (default: benchmarks/results inside the repository, else "
                            "./hf_flash_results)")

    parser.subparsers = {"check": check, "bench": bench}
    if _demo_available():
        sub.add_parser("demo", add_help=False,
                       help="fine-tune and generate with small GPT-2/Llama models, flashtri vs sdpa "
                            "(see 'hf-flash demo --help')")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# running on the CPU through Triton's interpreter

def _want_interpreter(device: str) -> bool:
    if device == "cpu":
        return True
    if device == "cuda":
        return False
    import torch

    return not torch.cuda.is_available()


def _ensure_interpreter(argv: list[str]) -> int | None:
    """Make sure Triton's interpreter is on before any kernel is compiled.

    ``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, i.e. when ``hf_flash`` is imported,
    which happens before this module runs. So if triton is already loaded, re-run the command in a child
    process with the variable set and return its exit code; otherwise set it here and return None.
    """
    from hf_flash._validate import interpreter_enabled

    if interpreter_enabled():
        return None
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ[_REEXEC_ENV] = "1"
        return None
    env = dict(os.environ, TRITON_INTERPRET="1", **{_REEXEC_ENV: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.call([sys.executable, "-m", "hf_flash", *argv], env=env)


# ---------------------------------------------------------------------------------------------------------------
# hf-flash check

FWD_FACTOR, GRAD_FACTOR = 2.0, 3.0


def _floor(dtype) -> float:
    import torch

    return {torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float32: 1e-5}[dtype]


class _NotAvailable(Exception):
    pass


def _compare(name, got, ref32, ref_low, factor, floor):
    """(ok, text) for one tensor: the kernel's max error vs float32 against factor x PyTorch's own error."""
    err = (got.float() - ref32.float()).abs().max().item() if got.numel() else 0.0
    base = (ref_low.float() - ref32.float()).abs().max().item() if got.numel() else 0.0
    limit = factor * base + floor
    ok = err <= limit  # False for NaN
    return ok, f"{name} {err:.1e} (limit {limit:.1e})"


def _rand(shape, dtype, device, gen):
    import torch

    return torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu").to(device=device, dtype=dtype)


def _attention_grads(fn, tensors, dout):
    """Output and gradients of ``fn`` w.r.t. ``tensors`` (fresh leaves) for the upstream gradient ``dout``."""
    import torch

    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def _lookup(name):
    import hf_flash

    fn = getattr(hf_flash, name, None)
    if fn is None:
        raise _NotAvailable(f"hf_flash.{name} is not in this build")
    return fn


class _Shapes:
    def __init__(self, cuda: bool):
        if cuda:
            self.batch, self.seqlen_q, self.seqlen_k, self.nheads, self.nheads_k, self.headdim = 2, 1023, 1029, 16, 4, 128
            self.varlen = [1000, 1, 517, 2048]
            self.square = 1027
            self.cache_len, self.cache_seqlens = 4096, [4096, 1, 2000, 3333]
            self.flat = (3001, 4096)
        else:  # the interpreter runs every program in numpy: keep it small but odd
            self.batch, self.seqlen_q, self.seqlen_k, self.nheads, self.nheads_k, self.headdim = 2, 37, 70, 4, 2, 40
            self.varlen = [37, 1, 20]
            self.square = 45
            self.cache_len, self.cache_seqlens = 80, [70, 13]
            self.flat = (37, 100)


def _check_cases(device, dtype, gen):
    """(label, callable) per kernel; each callable returns (ok, detail)."""
    import torch

    from hf_flash.reference import attention_ref

    sh = _Shapes(device.type == "cuda")
    b, sq, sk, h, hk, d = sh.batch, sh.seqlen_q, sh.seqlen_k, sh.nheads, sh.nheads_k, sh.headdim
    fl = _floor(dtype)

    def dense_inputs(sq_, sk_, h_, hk_):
        return (_rand((b, sq_, h_, d), dtype, device, gen), _rand((b, sk_, hk_, d), dtype, device, gen),
                _rand((b, sk_, hk_, d), dtype, device, gen))

    def ref_fn(upcast):
        return lambda q, k, v: attention_ref(q, k, v, causal=True, upcast_dtype=upcast)[0]

    def fwd_case(func_name, sq_, sk_, h_, hk_):
        def case():
            fn = _lookup(func_name)
            q, k, v = dense_inputs(sq_, sk_, h_, hk_)
            with torch.no_grad():
                out = fn(q, k, v, causal=True)
                ref32 = ref_fn(torch.float32)(q, k, v)
                ref_low = ref_fn(None)(q, k, v)
            return _compare("out", out, ref32, ref_low, FWD_FACTOR, fl)
        return case

    def fwd_bwd_case(func_name, sq_, sk_, h_, hk_, with_out, **kw):
        def case():
            fn = _lookup(func_name)
            q, k, v = dense_inputs(sq_, sk_, h_, hk_)
            dout = _rand((b, sq_, h_, d), dtype, device, gen)
            out, grads = _attention_grads(lambda q_, k_, v_: fn(q_, k_, v_, causal=True, **kw), (q, k, v), dout)
            out32, grads32 = _attention_grads(ref_fn(torch.float32), (q, k, v), dout)
            out_low, grads_low = _attention_grads(ref_fn(None), (q, k, v), dout)
            results = [_compare("out", out, out32, out_low, FWD_FACTOR, fl)] if with_out else []
            results += [_compare(n, g, g32, gl, GRAD_FACTOR, fl)
                        for n, g, g32, gl in zip(("dq", "dk", "dv"), grads, grads32, grads_low)]
            return all(r[0] for r in results), "  ".join(r[1] for r in results)
        return case

    def varlen_case():
        fn = _lookup("flash_attn_varlen_func")
        lens = sh.varlen
        total = sum(lens)
        cu = torch.tensor([0] + list(__import__("itertools").accumulate(lens)), dtype=torch.int32, device=device)
        q = _rand((total, h, d), dtype, device, gen)
        k = _rand((total, hk, d), dtype, device, gen)
        v = _rand((total, hk, d), dtype, device, gen)
        dout = _rand((total, h, d), dtype, device, gen)

        def per_sequence(upcast):
            def f(q_, k_, v_):
                outs = []
                for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
                    outs.append(attention_ref(q_[s:e][None], k_[s:e][None], v_[s:e][None], causal=True,
                                              upcast_dtype=upcast)[0][0])
                return torch.cat(outs)
            return f

        kern = lambda q_, k_, v_: fn(q_, k_, v_, cu, cu, max(lens), max(lens), causal=True)  # noqa: E731
        out, grads = _attention_grads(kern, (q, k, v), dout)
        out32, grads32 = _attention_grads(per_sequence(torch.float32), (q, k, v), dout)
        out_low, grads_low = _attention_grads(per_sequence(None), (q, k, v), dout)
        results = [_compare("out", out, out32, out_low, FWD_FACTOR, fl)]
        results += [_compare(n, g, g32, gl, GRAD_FACTOR, fl)
                    for n, g, g32, gl in zip(("dq", "dk", "dv"), grads, grads32, grads_low)]
        return all(r[0] for r in results), "  ".join(r[1] for r in results)

    def decode_case():
        fn = _lookup("flash_attn_with_kvcache")
        nb = len(sh.cache_seqlens)
        q = _rand((nb, 1, h, d), dtype, device, gen)
        k_cache = _rand((nb, sh.cache_len, hk, d), dtype, device, gen)
        v_cache = _rand((nb, sh.cache_len, hk, d), dtype, device, gen)
        seqlens = torch.tensor(sh.cache_seqlens, dtype=torch.int32, device=device)
        mask = torch.arange(sh.cache_len, device=device)[None, :] < seqlens[:, None]
        with torch.no_grad():
            out = fn(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True)
            ref32 = attention_ref(q, k_cache, v_cache, key_padding_mask=mask, causal=True)[0]
            ref_low = attention_ref(q, k_cache, v_cache, key_padding_mask=mask, causal=True, upcast_dtype=None)[0]
        return _compare("out", out, ref32, ref_low, FWD_FACTOR, fl)

    def flat_case():
        import torch.nn.functional as F

        from hf_flash.kernels.flat_gemm import flat_linear

        n, kdim = sh.flat
        x, w, u = (_rand(shape, dtype, device, gen) for shape in ((1, kdim), (n, kdim), (n, kdim)))
        x32, w32, u32 = x.float(), w.float(), u.float()
        with torch.no_grad():
            got, got_gated = flat_linear(x, w), flat_linear(x, w, up_weight=u)
            ref32 = x32 @ w32.t()
            ref32_gated = F.silu(ref32) * (x32 @ u32.t())
            low, low_gated = F.linear(x, w), F.silu(F.linear(x, w)) * F.linear(x, u)
        results = [_compare("y", got, ref32, low, FWD_FACTOR, fl),
                   _compare("gated", got_gated, ref32_gated, low_gated, FWD_FACTOR, fl)]
        return all(r[0] for r in results), "  ".join(r[1] for r in results)

    sq_sq = sh.square
    return [
        (f"FA2 forward         (causal, GQA {h}/{hk}, s_q={sq} s_k={sk}, d={d})",
         fwd_case("flash_attn_func", sq, sk, h, hk)),
        (f"FA2 backward        (causal, GQA {h}/{hk}, s_q={sq} s_k={sk}, d={d})",
         fwd_bwd_case("flash_attn_func", sq, sk, h, hk, with_out=False)),
        (f"FA2 bwd determinist (causal, GQA {h}/{hk}, s_q={sq} s_k={sk}, d={d}; dQ kernel, no atomics)",
         fwd_bwd_case("flash_attn_func", sq, sk, h, hk, with_out=False, deterministic=True)),
        (f"varlen fwd+bwd      (causal, GQA {h}/{hk}, lengths {sh.varlen}, d={d})", varlen_case),
        (f"FA1 fwd+bwd         (causal, MHA {h}, s={sq_sq}, d={d})",
         fwd_bwd_case("flash_attn_fa1_func", sq_sq, sq_sq, h, h, with_out=True)),
        (f"split-KV decode     (GQA {h}/{hk}, cache {sh.cache_len}, lengths {sh.cache_seqlens}, d={d})",
         decode_case),
        (f"flat GEMM decode    (1 row, N={sh.flat[0]} K={sh.flat[1]}; plain, gate + up + SiLU fused)", flat_case),
    ]


def _versions() -> list[tuple[str, str]]:
    import torch

    import hf_flash

    def ver(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - reported as missing
            return "not installed"

    return [("python", platform.python_version()), ("torch", torch.__version__), ("triton", ver("triton")),
            ("transformers", ver("transformers")), ("hf_flash", hf_flash.__version__)]


def cmd_check(args) -> int:
    import torch

    from hf_flash._validate import interpreter_enabled

    use_cpu = _want_interpreter(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        return _usage_error("hf-flash check", "--device cuda but torch.cuda.is_available() is False")
    print("  ".join(f"{k} {v}" for k, v in _versions()))
    if use_cpu:
        how = ("set by hf-flash" if os.environ.get(_REEXEC_ENV) else "from the environment")
        print(f"device: CPU (Triton interpreter; TRITON_INTERPRET=1 {how}; small shapes, slow)")
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        print(f"device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
              + ("  [warning: TRITON_INTERPRET=1 is set]" if interpreter_enabled() else ""))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if use_cpu else torch.bfloat16)
    print(f"dtype: {str(dtype).replace('torch.', '')}; error = max |kernel - float32 reference|, limit = "
          f"{FWD_FACTOR:g}x (forward) / {GRAD_FACTOR:g}x (gradients) PyTorch's own error in that dtype + "
          f"{_floor(dtype):.0e}")
    gen = torch.Generator().manual_seed(args.seed)
    failed = unavailable = 0
    for label, case in _check_cases(device, dtype, gen):
        t0 = time.perf_counter()
        try:
            ok, detail = case()
            status = "pass" if ok else "FAIL"
        except (_NotAvailable, NotImplementedError) as exc:
            status, detail = "not available", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - a crashing kernel is a failed check, reported in one line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            status, detail = "FAIL", f"{type(exc).__name__}: {msg}"[:240]
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        failed += status == "FAIL"
        unavailable += status == "not available"
        print(f"{label:<72} {status:<13} {secs:6.1f}s  {detail}", flush=True)
    verdict = ("FAILED" if failed else "ok")
    print(f"check {verdict}: {failed} failed, {unavailable} not available")
    if failed or (args.strict and unavailable):
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------
# hf-flash bench

def cmd_bench(args) -> int:
    import torch

    prog = f"hf-flash bench {args.name}"
    if not torch.cuda.is_available():
        return _usage_error(prog, "needs a CUDA GPU and torch.cuda.is_available() is False here; the benchmarks "
                                  "do not run on the CPU")
    mod_name = f"hf_flash.bench.{args.name}"
    if importlib.util.find_spec(mod_name) is None:
        return _usage_error(prog, f"not available in this build ({mod_name} is missing)")
    from hf_flash.bench.common import BenchUnavailable, format_table

    module = importlib.import_module(mod_name)
    out_dir = args.out or _default_out_dir()
    try:
        result = module.run(quick=args.quick, out_dir=out_dir)
    except BenchUnavailable as exc:
        return _usage_error(prog, str(exc))
    table = result.get("table") if isinstance(result, dict) else None
    tables = table if isinstance(table, list) else [table] if table else []
    for t in tables:
        print(format_table(t))
        print()
    for path in (result.get("files") or []) if isinstance(result, dict) else []:
        print(f"wrote {path}")
    if isinstance(result, dict) and result.get("interrupted"):
        print(f"{prog}: interrupted; the files hold what was measured until then")
        return 130
    return 0


# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo" and _demo_available():
        if not any(a in ("-h", "--help") for a in argv[1:]) and _want_interpreter("auto"):
            code = _ensure_interpreter(argv)
            if code is not None:
                return code
        demo = importlib.import_module("hf_flash.demo")
        return int(demo.main(argv[1:]) or 0)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser.subparsers.get(getattr(args, "command", None), parser)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        return _usage_error("hf-flash", "a command is required: check, bench" + (", demo" if _demo_available()
                                                                                 else "") + " (see 'hf-flash --help')")
    if args.command == "check":
        if _want_interpreter(args.device):
            code = _ensure_interpreter(argv)
            if code is not None:
                return code
        return cmd_check(args)
    if args.command == "bench":
        return cmd_bench(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
