"""Host time of one decode-step attention call on the GPU box, and where it goes (cProfile).

    python benchmarks/probe_host.py
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hf_flash.kernels import decode  # noqa: E402
from hf_flash.kernels import _launch  # noqa: E402
from hf_flash import kvcache  # noqa: E402
from probe_decode import host_us  # noqa: E402 - benchmarks/ is this script's directory


def main():
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    seqlens = torch.full((1,), 4096, dtype=torch.int32, device="cuda")
    fn = lambda: decode.split_kv_forward(q, k, v, softmax_scale=0.088, seqlens_k=seqlens)  # noqa: E731
    fn2 = lambda: kvcache.decode_attention(q, k, v, seqlens, None, 0.088, True, (-1, -1), 0.0)  # noqa: E731
    x = torch.empty(8, device="cuda")
    fn3 = lambda: torch.add(x, 1)  # noqa: E731
    for name, f in (("split_kv_forward", fn), ("decode_attention", fn2), ("torch.add", fn3)):
        print(f"{name}: host {host_us(f):.1f} us/call, stats {_launch.STATS}", flush=True)
    os.environ["HF_FLASH_DIRECT_LAUNCH"] = "0"
    print(f"split_kv_forward without direct launch: host {host_us(fn):.1f} us/call", flush=True)
    os.environ["HF_FLASH_DIRECT_LAUNCH"] = "1"
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
