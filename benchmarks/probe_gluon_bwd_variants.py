"""GPU probe: the Hopper (Gluon) backward kernel alone against variants of it, then the whole backward (hf_flash's
Gluon, its Triton one, SDPA cuDNN's as forward + backward minus forward) on GQA and MHA shapes, bf16, head dim 128.

Variants: ``--compare FILE`` times the ``backward`` of another copy of kernels/gluon_attention.py (for example the
previous commit's: ``git show 51316d0:kernels/gluon_attention.py > /tmp/prev.py``); ``--no-dq-atomics`` times a
copy with dQ's atomic adds removed (wrong dQ: an ablation that shows what the atomics cost). Run from the repo root:
``python benchmarks/probe_gluon_bwd_variants.py OUT_DIR [--compare FILE] [--no-dq-atomics]``; writes
probe_gluon_bwd_variants.json."""
import argparse
import importlib.util
import json
import os
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_flash.bench.common import _time_with_events
from hf_flash.kernels import attention as A
from hf_flash.kernels import gluon_attention as G

SHAPES = [(1, 16384, 32, 8, True), (1, 4096, 32, 8, True), (1, 2048, 32, 8, True), (1, 8192, 32, 8, True),
          (1, 4096, 32, 32, True), (2, 8192, 32, 32, True), (1, 16384, 32, 32, True), (4, 2048, 32, 8, True),
          (1, 4096, 32, 32, False)]


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--compare", help="another copy of kernels/gluon_attention.py to time")
    ap.add_argument("--no-dq-atomics", action="store_true", help="also time a copy without dQ's atomic adds")
    args = ap.parse_args()
    variants = {}
    if args.compare:
        variants["compare"] = load(args.compare, "gluon_compare")
    if args.no_dq_atomics:
        lines = open(G.__file__).read().splitlines()
        cut = [ln[:len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip().startswith("gl.atomic_add(") else ln
               for ln in lines]
        adds = [ln for ln in lines if ln.lstrip().startswith("gl.atomic_add(")]
        assert adds and all(ln.rstrip().endswith(")") for ln in adds), "expected one-line atomic adds in the kernel"
        cut = "\n".join(cut) + "\n"
        path = os.path.join(tempfile.mkdtemp(), "gluon_no_dq_atomics.py")
        open(path, "w").write(cut)
        variants["no_dq_atomics"] = load(path, "gluon_no_dq_atomics")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": list(variants),
           "rows": []}
    for (b, s, h, hk, causal) in SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (torch.randn(b, s, n, 128, generator=g).to("cuda", torch.bfloat16) for n in (h, hk, hk, h))
        sc = 128 ** -0.5
        o, lse = A.forward(q, k, v, None, None, s, s, None, None, None, 0.0, sc, -1, 0 if causal else -1, 0.0)
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
        row = {"shape": [b, s, h, hk, causal]}
        row["gluon_kernel_ms"] = _time_with_events(lambda: G.backward(do, q, k, v, lse, delta, causal, sc, dq), 3, 10)
        for name, mod in variants.items():
            row[f"{name}_kernel_ms"] = _time_with_events(
                lambda: mod.backward(do, q, k, v, lse, delta, causal, sc, dq), 3, 10)
        call = lambda: A.backward(do, q, k, v, o, lse, None, None, s, s, None, None, None, 0.0, sc, -1,  # noqa: E731
                                  0 if causal else -1, 0.0, False, False)
        row["gluon_ms"] = _time_with_events(call, 3, 10)
        os.environ["HF_FLASH_GLUON_BWD"] = "0"
        row["triton_ms"] = _time_with_events(call, 3, 10)
        os.environ.pop("HF_FLASH_GLUON_BWD")
        qh = q.transpose(1, 2).contiguous().requires_grad_(True)
        kh, vh = (t.repeat_interleave(h // hk, 2).transpose(1, 2).contiguous().requires_grad_(True) for t in (k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            f = _time_with_events(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal), 3, 10)
            fb = _time_with_events(lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal), (qh, kh, vh), do.transpose(1, 2)), 3, 10)
        row["cudnn_ms"] = fb - f
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, do, o, lse, delta, dq, qh, kh, vh
        torch.cuda.empty_cache()
    json.dump(res, open(os.path.join(args.out_dir, "probe_gluon_bwd_variants.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
