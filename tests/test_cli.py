"""The hf-flash command line and the benchmark plumbing.

CPU: help texts, one-line usage errors with exit code 2, ``bench`` refusing to run without a GPU, ``check``
through the Triton interpreter (it sets TRITON_INTERPRET=1 itself), check's pass/FAIL/not-available logic with
stand-in kernels, and the kernel benchmark's JSON/PNG/table code with stand-in kernels and a wall-clock timer at
toy sizes. CUDA (skipped without a GPU): ``check`` on the GPU at its large shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hf_flash
from hf_flash import cli
from hf_flash.bench import common as C

REPO = Path(__file__).resolve().parents[1]
CHECK_ROWS = ("FA2 forward", "FA2 backward", "FA2 bwd determinist", "varlen fwd+bwd", "FA1 fwd+bwd", "split-KV decode",
              "flat GEMM decode")


def hf_flash_cmd(*args, env=None, timeout=300):
    from conftest import subprocess_env

    env = subprocess_env(dict(os.environ) if env is None else env)
    return subprocess.run([sys.executable, "-m", "hf_flash", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_main(capsys, *argv):
    """``cli.main`` in this process: (exit code, stdout, stderr); argparse's SystemExit is turned into a code."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_python_m_hf_flash_help():
    proc = hf_flash_cmd("--help")
    assert proc.returncode == 0, proc.stderr
    assert "check" in proc.stdout and "bench" in proc.stdout
    # the demo command is listed exactly when hf_flash.demo exists
    assert ("demo" in proc.stdout.split("positional arguments")[-1]) == cli._demo_available()


@pytest.mark.parametrize("command", [("check", "--help"), ("bench", "--help")])
def test_subcommand_help(capsys, command):
    code, out, _ = run_main(capsys, *command)
    assert code == 0
    assert out.startswith(f"usage: hf-flash {command[0]}")
    if command[0] == "bench":
        for name in ("kernels", "decode", "e2e", "distributed", "--quick", "--out"):
            assert name in out


def test_console_script_installed():
    exe = shutil.which("hf-flash")
    if exe is None:
        pytest.skip("the hf-flash console script is not on PATH (package not pip-installed here)")
    proc = subprocess.run([exe, "bench", "kernels", "--bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert _one_line(proc.stderr) == ("hf-flash bench: error: unrecognized arguments: --bogus "
                                      "(see 'hf-flash bench --help')")


def _one_line(stderr):
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("argv, fragment", [
    (("bench", "kernels", "--bogus"), "unrecognized arguments: --bogus"),
    (("bench", "nope"), "invalid choice: 'nope'"),
    (("check", "--device", "tpu"), "invalid choice: 'tpu'"),
    (("--frobnicate",), "unrecognized arguments"),
    ((), "a command is required"),
])
def test_bad_flags_exit_2_one_line(capsys, argv, fragment):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    line = _one_line(err)
    assert fragment in line and line.startswith("hf-flash")


def test_bench_without_gpu_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in cli.BENCHMARKS:
        code, out, err = run_main(capsys, "bench", name, "--quick")
        assert code == 2
        line = _one_line(err)
        assert "CUDA GPU" in line and line.startswith(f"hf-flash bench {name}: error:")


def _rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        for name in CHECK_ROWS:
            if line.startswith(name):
                rows[name] = line
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path is CI's (triton 3.9); on a GPU "
                    "machine `check --device cuda` is tested instead")
def test_check_on_cpu_sets_interpreter_itself():
    """``hf-flash check`` with no GPU and no TRITON_INTERPRET: it turns the interpreter on and runs every kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.time()
    proc = hf_flash_cmd("check", env=env)
    out = proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "TRITON_INTERPRET=1 set by hf-flash" in out, out
    for lib in ("python", "torch", "triton", "transformers", "hf_flash"):
        assert f"{lib} " in out.splitlines()[0]
    rows = _rows(out)
    assert set(rows) == set(CHECK_ROWS), out
    for name, line in rows.items():
        assert ("pass" in line) or ("not available" in line), f"{name} failed:\n{out}"
    # must run and pass
    for name in ("FA2 forward", "FA2 backward", "FA2 bwd determinist", "varlen fwd+bwd", "flat GEMM decode"):
        assert " pass " in rows[name], out
        assert "limit" in rows[name]  # the error measured is printed
    assert proc.returncode == 0, out + proc.stderr
    assert time.time() - t0 < 200


# --- check's decision logic with stand-in kernels (no kernel runs, fast) -------------------------------------

def _fake_dense(shift=0.0):
    from hf_flash.reference import attention_ref

    def fn(q, k, v, causal=False, **kw):
        return attention_ref(q, k, v, causal=causal, upcast_dtype=None)[0] + shift
    return fn


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, **kw):
    from hf_flash.reference import attention_ref

    bounds = cu_q.tolist()
    return torch.cat([attention_ref(q[s:e][None], k[s:e][None], v[s:e][None], causal=causal,
                                    upcast_dtype=None)[0][0] for s, e in zip(bounds[:-1], bounds[1:])])


def _fake_kvcache(q, k_cache, v_cache, cache_seqlens=None, causal=False, **kw):
    from hf_flash.reference import attention_ref

    mask = torch.arange(k_cache.shape[1])[None, :] < cache_seqlens[:, None]
    return attention_ref(q, k_cache, v_cache, key_padding_mask=mask, causal=causal, upcast_dtype=None)[0]


def _fake_flat(x, weight, bias=None, *, up_weight=None, out=None, config=None):
    import torch.nn.functional as F

    y = F.linear(x, weight, bias)
    return y if up_weight is None else F.silu(y) * F.linear(x, up_weight)


def _run_check(monkeypatch, capsys, *argv):
    # the check's rows call the stand-ins set by each test; the flat GEMM row calls its kernel module directly, so
    # it gets one here (a real kernel on CPU tensors cannot run where triton was imported for a GPU)
    from hf_flash.kernels import flat_gemm

    monkeypatch.setattr(flat_gemm, "flat_linear", _fake_flat)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = cli.build_parser().parse_args(["check", "--device", "cpu", *argv])
    code = cli.cmd_check(args)
    return code, _rows(capsys.readouterr().out)


def test_check_reports_pass_fail_and_not_available(monkeypatch, capsys):
    monkeypatch.setattr(hf_flash, "flash_attn_func", _fake_dense())
    monkeypatch.setattr(hf_flash, "flash_attn_fa1_func", _fake_dense(shift=0.25), raising=False)
    monkeypatch.setattr(hf_flash, "flash_attn_varlen_func", _fake_varlen)

    def landing(*a, **k):
        raise NotImplementedError("kernel landing")
    monkeypatch.setattr(hf_flash, "flash_attn_with_kvcache", landing)
    code, rows = _run_check(monkeypatch, capsys)
    assert code == 1
    assert " pass " in rows["FA2 forward"] and " pass " in rows["FA2 backward"] and " pass " in rows["varlen fwd+bwd"]
    assert " FAIL " in rows["FA1 fwd+bwd"] and "out 2.5e-01" in rows["FA1 fwd+bwd"]
    assert "not available" in rows["split-KV decode"] and "kernel landing" in rows["split-KV decode"]


def test_check_not_available_fails_only_with_strict(monkeypatch, capsys):
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
        monkeypatch.setattr(hf_flash, name, {"flash_attn_func": _fake_dense(), "flash_attn_varlen_func": _fake_varlen,
                                             "flash_attn_with_kvcache": _fake_kvcache}[name])
    monkeypatch.delattr(hf_flash, "flash_attn_fa1_func", raising=False)
    code, rows = _run_check(monkeypatch, capsys)
    assert code == 0 and "not available" in rows["FA1 fwd+bwd"] and " pass " in rows["split-KV decode"]
    code, _ = _run_check(monkeypatch, capsys, "--strict")
    assert code == 1


def test_check_catches_nan_and_crashes(monkeypatch, capsys):
    monkeypatch.setattr(hf_flash, "flash_attn_func", _fake_dense(shift=float("nan")))

    def crash(*a, **k):
        raise RuntimeError("illegal memory access\nsecond line")
    monkeypatch.setattr(hf_flash, "flash_attn_varlen_func", crash)
    code, rows = _run_check(monkeypatch, capsys)
    assert code == 1
    assert " FAIL " in rows["FA2 forward"]
    assert " FAIL " in rows["varlen fwd+bwd"] and "RuntimeError: illegal memory access" in rows["varlen fwd+bwd"]
    assert "second line" not in rows["varlen fwd+bwd"]


# --- benchmark plumbing ----------------------------------------------------------------------------------------

def test_common_flops_tables_and_json(tmp_path):
    b, h, s, d = 2, 3, 128, 64
    assert C.attention_flops(b, h, s, s, d) == 4 * b * h * s * s * d
    assert C.attention_flops(b, h, s, s, d, causal=True) == 2 * b * h * s * s * d
    assert C.attention_flops(b, h, s, s, d, mode="fwd_bwd") == 3.5 * 4 * b * h * s * s * d
    # a window as wide as the sequence is plain causal attention (counted exactly: s(s+1)/2 pairs)
    assert C.attention_flops(1, 1, s, s, 1, window=s) == 4 * s * (s + 1) / 2
    assert C.attention_flops(1, 1, s, s, 1, window=0) == 4 * s
    assert C.tflops(1e12, 1000.0) == pytest.approx(1.0) and C.tflops(1e12, None) is None
    assert C.ratio(None, 1.0) is None and C.ratio(3.0, 2.0) == 1.5
    text = C.format_table({"title": "t", "columns": ["a", "bb"], "rows": [[None, 1.2345], [True, 1234.5]]})
    assert text.splitlines()[0] == "t" and " -" in text and "1.23" in text and "yes" in text
    assert C.result_path(str(tmp_path), "kernels", True, "json").endswith("kernels_quick.json")
    path = C.write_json({"x": float("nan")}, str(tmp_path / "r.json"))
    data = json.loads(Path(path).read_text())
    assert data["x"] is None
    for key in ("device", "torch", "triton", "transformers", "hf_flash", "date"):
        assert key in data["env"]


def test_default_out_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert cli._default_out_dir() == os.path.join("benchmarks", "results")
    monkeypatch.chdir(tmp_path)
    assert cli._default_out_dir() == "hf_flash_results"


def _toy_kernel_bench(monkeypatch):
    """The kernel benchmark module set up to run at toy sizes on the CPU, with SDPA stand-ins for hf_flash's
    kernels and a wall-clock timer, so the tables, ratios, JSON and plots are exercised before the GPU run."""
    from hf_flash.bench import kernels as K

    def dense(q, k, v, causal=False, dropout_p=0.0, window_size=(-1, -1), attn_bias=None, **kw):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=attn_bias, is_causal=causal and attn_bias is None,
                                              dropout_p=dropout_p).transpose(1, 2)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, **kw):
        bounds = cu_q.tolist()
        return torch.cat([dense(q[s:e][None], k[s:e][None], v[s:e][None], causal)[0]
                          for s, e in zip(bounds[:-1], bounds[1:])])

    def wall_ms(fn, grad_to_none=None, **kw):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(hf_flash, "flash_attn_func", dense)
    monkeypatch.setattr(hf_flash, "flash_attn_fa1_func", dense, raising=False)
    monkeypatch.setattr(hf_flash, "flash_attn_varlen_func", varlen)
    monkeypatch.setattr(C, "require_cuda", lambda what: torch.device("cpu"))
    monkeypatch.setattr(C, "time_ms", wall_ms)
    monkeypatch.setitem(K.SIZES, "quick", {"headdims": (16,), "seqlens": (32, 64), "tokens": 128, "hidden": 32,
                                           "varlen": (3, 5, 40, 2, 16), "window": (128, 2, 16, (16,)),
                                           "dropout": (2, 32, 2, 16), "bias": (1, 32, 2, 16)})
    return K


def test_bench_kernels_plumbing_on_cpu(monkeypatch, tmp_path):
    K = _toy_kernel_bench(monkeypatch)
    result = K.run(quick=True, out_dir=str(tmp_path))
    data = json.loads((tmp_path / "kernels_quick.json").read_text())
    assert (tmp_path / "kernels_quick.png").stat().st_size > 0
    assert data["env"]["torch"] == torch.__version__ and "date" in data["env"]
    # 2 seqlens x 2 causal x 4 implementations x 2 modes
    assert len(data["grid"]) == 32
    fa2 = [r for r in data["grid"] if r["impl"] == "hf_flash_fa2"]
    assert all(r["tflops"] is not None and r["error"] is None for r in fa2)
    # SDPA's cuDNN backend does not exist on the CPU: recorded as null with its error, not dropped
    cudnn = [r for r in data["grid"] if r["impl"] == "sdpa_cudnn"]
    assert cudnn and all(r["tflops"] is None and r["error"] for r in cudnn)
    assert all(r["fa2_vs_sdpa_flash"] is not None for r in data["ratios"])
    assert set(data["features"]) == {"varlen", "window", "dropout", "bias"}
    assert data["features"]["window"]["points"][1]["fwd_bwd_flop_ratio_to_full"] < 1
    for table in result["table"]:
        text = C.format_table(table)
        assert len(text.splitlines()) == len(table["rows"]) + 3
    assert result["summary"] and all(len(row) == 2 for row in result["summary"])


def test_bench_kernels_interrupted_keeps_what_it_measured(monkeypatch, tmp_path):
    K = _toy_kernel_bench(monkeypatch)

    def budget_over(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(K, "_window", budget_over)
    result = K.run(quick=True, out_dir=str(tmp_path))
    data = json.loads((tmp_path / "kernels_quick.json").read_text())
    assert data["interrupted"] is True and len(data["grid"]) == 32 and list(data["features"]) == ["varlen"]
    assert any("interrupted" in value for _, value in result["summary"])
    for table in result["table"]:
        C.format_table(table)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_check_on_cuda_large_shapes():
    proc = hf_flash_cmd("check", "--device", "cuda", timeout=600)
    rows = _rows(proc.stdout)
    assert set(rows) == set(CHECK_ROWS), proc.stdout + proc.stderr
    assert " pass " in rows["FA2 forward"] and " pass " in rows["FA2 backward"], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
