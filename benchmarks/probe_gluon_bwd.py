"""GPU probe of the Hopper (Gluon) backward in kernels/gluon_attention.py: gradients against float32 torch on odd
shapes next to the Triton backward's error, then GPU time of the backward alone (hf_flash's Gluon backward with
each GQA split, its Triton backward, SDPA cuDNN's and FLASH_ATTENTION's as forward + backward minus forward), for
batch-1 Llama-3-8B layer shapes and a multi-head case; then forward + backward of packed (varlen) batches with the
Gluon kernels on and off. Run from the repo root: python benchmarks/probe_gluon_bwd.py
[OUT_DIR]; writes probe_gluon_bwd.json."""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_flash
from hf_flash.bench.common import _time_with_events
from hf_flash.kernels import attention as A
from hf_flash.reference import attention_ref

dev = "cuda"
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
import triton  # noqa: E402

res["triton"] = triton.__version__
out_dir = sys.argv[1] if len(sys.argv) > 1 else "."


def mk(b, sq, sk, h, hk, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, sq, h, 128, generator=g).to(dev, dtype)
    k = torch.randn(b, sk, hk, 128, generator=g).to(dev, dtype)
    v = torch.randn(b, sk, hk, 128, generator=g).to(dev, dtype)
    do = torch.randn(b, sq, h, 128, generator=g).to(dev, dtype)
    return q, k, v, do


def ref_grads(q, k, v, do, causal):
    # the project's reference in float64 (it repeats KV heads for GQA and aligns the causal mask bottom-right)
    qf, kf, vf = (t.double().requires_grad_(True) for t in (q, k, v))
    o = attention_ref(qf, kf, vf, causal=causal, upcast_dtype=torch.float64)[0]
    return torch.autograd.grad(o, (qf, kf, vf), do.double())


def grads(q, k, v, do, causal, gluon):
    os.environ["HF_FLASH_GLUON_BWD"] = "1" if gluon else "0"
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    before = A.launches["bwd_gluon"]
    out = hf_flash.flash_attn_func(qr, kr, vr, causal=causal)
    got = torch.autograd.grad(out, (qr, kr, vr), do)
    ran = A.launches["bwd_gluon"] - before
    os.environ.pop("HF_FLASH_GLUON_BWD")
    return got, ran


checks = []
for (b, sq, sk, h, hk, causal, split) in [(1, 300, 300, 4, 1, True, 1), (2, 257, 257, 4, 2, False, 1),
                                          (1, 1000, 1000, 8, 2, True, 1), (1, 1000, 1000, 8, 2, True, 4),
                                          (2, 130, 390, 4, 4, True, 1), (1, 64, 64, 4, 4, True, 1),
                                          (3, 77, 77, 8, 1, True, 2), (1, 2000, 2000, 32, 8, True, 2)]:
    q, k, v, do = mk(b, sq, sk, h, hk, sq + split)
    want = ref_grads(q, k, v, do, causal)
    os.environ["HF_FLASH_GLUON_BWD_SPLIT"] = str(split)
    row = {"shape": [b, sq, sk, h, hk, causal], "split": split}
    try:
        got, ran = grads(q, k, v, do, causal, True)
        row["gluon_ran"] = ran
        row["gluon_err"] = [(a.double() - w).abs().max().item() for a, w in zip(got, want)]
    except Exception as ex:  # noqa: BLE001
        row["gluon_err"] = repr(ex)[:400]
    os.environ.pop("HF_FLASH_GLUON_BWD_SPLIT")
    tri, _ = grads(q, k, v, do, causal, False)
    row["triton_err"] = [(a.double() - w).abs().max().item() for a, w in zip(tri, want)]
    row["ref_max"] = [w.abs().max().item() for w in want]
    checks.append(row)
    print(json.dumps(row), flush=True)
res["checks"] = checks


def bwd_call(do, q, k, v, out, lse, causal, sc):
    return lambda: A.backward(do, q, k, v, out, lse, None, None, q.shape[1], k.shape[1], None, None, None, 0.0, sc,
                              -1, 0 if causal else -1, 0.0, False, False)


rows = []
for (b, s, h, hk, causal) in [(1, 4096, 32, 8, True), (1, 16384, 32, 8, True), (1, 8192, 32, 8, False),
                              (4, 2048, 32, 8, True), (2, 4096, 32, 32, True), (2, 8192, 32, 32, True)]:
    q, k, v, do = mk(b, s, s, h, hk, 1)
    sc = 128 ** -0.5
    out, lse = A.forward(q, k, v, None, None, s, s, None, None, None, 0.0, sc, -1, 0 if causal else -1, 0.0)
    row = {"shape": [b, s, h, hk, causal]}
    for split in (1, 2):
        if (h // hk) % split:
            continue
        os.environ["HF_FLASH_GLUON_BWD_SPLIT"] = str(split)
        row[f"gluon_split{split}_ms"] = _time_with_events(bwd_call(do, q, k, v, out, lse, causal, sc), warmup=3,
                                                          rep=10)
    os.environ.pop("HF_FLASH_GLUON_BWD_SPLIT")
    os.environ["HF_FLASH_GLUON_BWD"] = "0"
    row["triton_ms"] = _time_with_events(bwd_call(do, q, k, v, out, lse, causal, sc), warmup=3, rep=10)
    os.environ.pop("HF_FLASH_GLUON_BWD")
    qh = q.transpose(1, 2).contiguous().requires_grad_(True)
    kh, vh = (t.repeat_interleave(h // hk, 2).transpose(1, 2).contiguous().requires_grad_(True) for t in (k, v))
    doh = do.transpose(1, 2)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(be):
            fwd = _time_with_events(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal), warmup=3,
                                    rep=10)
            both = _time_with_events(lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal), (qh, kh, vh), doh), warmup=3, rep=10)
        row[f"{name}_ms"] = both - fwd
    rows.append(row)
    print(json.dumps(row), flush=True)
    del q, k, v, do, out, lse, qh, kh, vh
    torch.cuda.empty_cache()
res["timing"] = rows

# packed (varlen) training batch: forward + backward through flash_attn_varlen_func, Gluon kernels on and off
packed = []
for lens in ([2048] * 8, [3000, 1200, 700, 4096, 333, 2500, 1500, 2900]):
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    total, mx = int(cu[-1]), max(lens)
    g = torch.Generator(device="cpu").manual_seed(2)
    q = torch.randn(total, 32, 128, generator=g).to(dev, torch.bfloat16).requires_grad_(True)
    k, v = (torch.randn(total, 8, 128, generator=g).to(dev, torch.bfloat16).requires_grad_(True) for _ in range(2))
    do = torch.randn(total, 32, 128, generator=g).to(dev, torch.bfloat16)

    def step():
        o = hf_flash.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True)
        torch.autograd.grad(o, (q, k, v), do)

    row = {"lens": lens}
    before = dict(A.launches)
    row["gluon_fwd_bwd_ms"] = _time_with_events(step, warmup=3, rep=10)
    row["gluon_ran"] = [A.launches["fwd_gluon"] - before["fwd_gluon"], A.launches["bwd_gluon"] - before["bwd_gluon"]]
    os.environ["HF_FLASH_GLUON_FWD"] = os.environ["HF_FLASH_GLUON_BWD"] = "0"
    row["triton_fwd_bwd_ms"] = _time_with_events(step, warmup=3, rep=10)
    os.environ.pop("HF_FLASH_GLUON_FWD"), os.environ.pop("HF_FLASH_GLUON_BWD")
    packed.append(row)
    print(json.dumps(row), flush=True)
res["packed"] = packed
json.dump(res, open(os.path.join(out_dir, "probe_gluon_bwd.json"), "w"), indent=1)
