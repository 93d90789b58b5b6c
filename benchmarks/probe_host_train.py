"""Host time of one ``flash_attn_func`` forward and forward + backward with the Triton launches stubbed out: the
Python and autograd work around the kernels (validation, allocation, autograd, dispatch), which a small training
step (GPT-2's 1k-token layers) pays per layer per step. Runs on a CPU without a GPU or the interpreter.

    python benchmarks/probe_host_train.py [--profile]

The eager path goes through ``hf_flash.ops._Attention`` (an ``autograd.Function``); ``--op`` times the
``torch.library`` custom op that ``torch.compile`` traces instead, for comparison.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import hf_flash  # noqa: E402
from hf_flash import _validate, ops  # noqa: E402
from hf_flash.kernels import attention as A  # noqa: E402


class _Stub:
    """Stands for a jit kernel: ``kernel[grid](...)`` does nothing."""

    def __init__(self, fn):
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    for name in ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        setattr(A, name, _Stub(getattr(A, name)))
    _validate.interpreter_enabled = lambda: True  # CPU tensors pass the device check
    if "--op" in sys.argv:
        ops.torch.compiler.is_compiling = lambda: True  # take the custom op, as under torch.compile
    q, k, v = (torch.randn(1, 16, 12, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            hf_flash.flash_attn_func(q, k, v, causal=True)

    def fwd_grad():
        hf_flash.flash_attn_func(q, k, v, causal=True)

    def fwd_bwd():
        hf_flash.flash_attn_func(q, k, v, causal=True).backward(do)

    for label, fn in (("forward, no grad", fwd), ("forward with autograd", fwd_grad), ("forward + backward", fwd_bwd)):
        for _ in range(10):
            fn()
        n = 200
        t = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"{label}: {(time.perf_counter() - t) / n * 1e6:.0f} us")
    if "--profile" in sys.argv:
        import cProfile
        import pstats

        cProfile.runctx("for _ in range(200): fwd_bwd()", globals(), {"fwd_bwd": fwd_bwd}, "/tmp/hf_flash_host.prof")
        pstats.Stats("/tmp/hf_flash_host.prof").sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
