"""GPU probe of the Hopper forwards, same process, same card: the Gluon kernel without warp specialisation
(benchmarks/gluon_fwd_variants.py, two tile configs), the warp-specialised one (kernels/gluon_attention.py, as
hf_flash dispatches it, under HF_FLASH_GLUON_FWD=1), the Triton forward (HF_FLASH_GLUON_FWD=0), SDPA cuDNN and SDPA
FLASH_ATTENTION (on K/V with the heads repeated). Max error against float32 torch on odd shapes first, then GPU
time per call (CUDA events around the Python call, median of 10).

    python benchmarks/probe_gluon_fwd.py            # writes probe_gluon.json into $OUTDIR (default .)"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.getcwd())
import hf_flash  # noqa: E402
from gluon_fwd_variants import gluon_fwd  # noqa: E402
from hf_flash.bench.common import _time_with_events  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
import triton  # noqa: E402
res["triton"] = triton.__version__
CONFIGS = [(128, 64, 3, 8), (128, 128, 2, 8)]


def ref(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(g, 1)
    vv = v.float().repeat_interleave(g, 1)
    s = q.float() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        m = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        s = s.masked_fill(~m, float("-inf"))
    return (s.softmax(-1) @ vv)


def hf_forward(q, k, v, causal, gluon: str):
    """hf_flash's forward on (B, H, S, D) tensors: the Triton kernel (gluon="0") or the Gluon one ("1")."""
    os.environ["HF_FLASH_GLUON_FWD"] = gluon
    out = hf_flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


errs = []
for (b, h, hk, sq, sk, causal) in [(1, 4, 1, 300, 300, True), (2, 4, 2, 257, 257, False), (1, 8, 2, 1000, 1000, True),
                                   (2, 2, 2, 130, 390, True), (1, 4, 4, 64, 64, True)]:
    q = torch.randn(b, h, sq, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hk, sk, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hk, sk, 128, device=dev, dtype=torch.bfloat16)
    r = ref(q, k, v, causal)
    e_tri = (hf_forward(q, k, v, causal, "0").float() - r).abs().max().item()
    e_ws = (hf_forward(q, k, v, causal, "1").float() - r).abs().max().item()
    errs.append({"shape": [b, h, hk, sq, sk, causal], "cfg": "warp-specialised", "err": e_ws, "triton_err": e_tri})
    print("check ws", b, h, hk, sq, sk, causal, e_ws, "triton", e_tri, flush=True)
    for cfg in CONFIGS:
        try:
            o, lse = gluon_fwd(q, k, v, causal, None, *cfg)
            e = (o.float() - r).abs().max().item()
        except Exception as ex:  # noqa: BLE001
            e = repr(ex)[:300]
        errs.append({"shape": [b, h, hk, sq, sk, causal], "cfg": cfg, "err": e, "triton_err": e_tri})
        print("check", b, h, hk, sq, sk, causal, cfg, e, "triton", e_tri, flush=True)
res["checks"] = errs


def bench(fn):
    return _time_with_events(fn, warmup=3, rep=10)


rows = []
for (b, h, hk, s, causal) in [(1, 32, 8, 4096, True), (1, 32, 8, 16384, True), (1, 32, 8, 32768, True),
                              (1, 32, 8, 16384, False), (2, 32, 32, 4096, True)]:
    q = torch.randn(b, h, s, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hk, s, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hk, s, 128, device=dev, dtype=torch.bfloat16)
    ke = k.repeat_interleave(h // hk, 1)
    ve = v.repeat_interleave(h // hk, 1)
    flops = 4 * b * h * s * s * 128 / (2 if causal else 1)
    row = {"shape": [b, h, hk, s, causal]}
    row["triton_ms"] = bench(lambda: hf_forward(q, k, v, causal, "0"))
    row["warp_specialised_ms"] = bench(lambda: hf_forward(q, k, v, causal, "1"))
    for name, be in (("cudnn_ms", SDPBackend.CUDNN_ATTENTION), ("flash_ms", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(be):
                row[name] = bench(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=causal))
        except Exception as ex:  # noqa: BLE001
            row[name] = repr(ex)[:200]
    for cfg in CONFIGS:
        try:
            row["gluon_%d_%d_%d_%d" % cfg] = bench(lambda: gluon_fwd(q, k, v, causal, None, *cfg))
        except Exception as ex:  # noqa: BLE001
            row["gluon_%d_%d_%d_%d" % cfg] = repr(ex)[:200]
    row["tflops_per_ms"] = flops / 1e9
    rows.append(row)
    print(json.dumps(row), flush=True)
res["timing"] = rows
json.dump(res, open(os.path.join(os.environ.get("OUTDIR", "."), "probe_gluon.json"), "w"), indent=1)
