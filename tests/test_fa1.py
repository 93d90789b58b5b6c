"""FA1-form forward/backward (``flash_attn_fa1_func``) against attention_ref: dtypes, causal, MHA/GQA/MQA,
seqlen_q != seqlen_k both ways (fully masked rows), head dims 40..256, fused-QKV views, batch 1 and 3, launch
counts, determinism, torch.compile and bad inputs. On CUDA the same tests run at larger sizes."""

from __future__ import annotations

import pytest
import torch

from hf_flash import attention_ref, flash_attn_fa1_func
from hf_flash.fa1 import fa1_fwd
from hf_flash.kernels import fa1 as kern
from conftest import DEVICE, ON_GPU, check_close

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
GPU_SCALE = 29  # CPU lengths x 29 on CUDA: still odd, still not multiples of any block


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, seqlen_q, nheads, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, d, generator=g).to(DEVICE, dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def compare_with_reference(q, k, v, leaves=None, softmax_scale=None, causal=False):
    """Run the FA1 form and the reference (float32 and the input dtype) on the same inputs; check that the
    kernels ran, then out, lse and the gradients of ``leaves`` (default q, k, v)."""
    leaves = leaves or (q, k, v)
    before = dict(kern.LAUNCHES)
    out, lse = flash_attn_fa1_func(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=True)
    assert kern.LAUNCHES["fwd"] == before["fwd"] + 1, "the FA1 forward kernel did not run"
    ref, _, lse_ref = attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=True)
    ref_lp, _ = attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal,
                              upcast_dtype=None if q.dtype != F32 else F32)
    check_close("out", out, ref, ref_lp)
    assert not lse.requires_grad
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be +inf exactly where a row sees no key"
    assert (lse[~finite] == float("inf")).all()
    torch.testing.assert_close(lse[finite], lse_ref[finite], atol=1e-3 if q.dtype == F32 else 2e-2, rtol=1e-3)

    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    assert kern.LAUNCHES["bwd"] == before["bwd"] + 1, "the FA1 backward kernel did not run"
    assert kern.LAUNCHES["bwd_preprocess"] == before["bwd_preprocess"] + 1
    want = torch.autograd.grad(ref, leaves, dout)
    want_lp = torch.autograd.grad(ref_lp, leaves, dout)
    for i, (a, b, c) in enumerate(zip(got, want, want_lp)):
        check_close(("dq", "dk", "dv")[i] if len(leaves) == 3 else f"grad{i}", a, b, c, factor=3.0)
    empty = ~finite  # (batch, nheads, seqlen_q): rows that see no key get zero output and zero dq
    if empty.any() and len(leaves) == 3:
        rows = empty.permute(0, 2, 1)
        assert (out[rows] == 0).all() and (got[0][rows] == 0).all()
    return out, lse


def _len(n):
    return n * GPU_SCALE if ON_GPU and n > 1 else n


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, causal): every dtype causal and not; MHA, GQA
# (groups of 2 and 3), MQA; seqlen_q < seqlen_k, > (causal: the first rows see no key) and ==; single query,
# single key; batch 1 and 3; head dims 40/64/80/96/128
CASES = [
    (1, 37, 70, 2, 2, 64, F16, False),
    (1, 37, 70, 2, 2, 64, F16, True),
    (3, 70, 37, 4, 2, 80, BF16, False),
    (3, 70, 37, 4, 2, 80, BF16, True),
    (1, 45, 45, 2, 1, 40, F32, False),
    (1, 45, 45, 4, 1, 96, F32, True),
    (3, 70, 37, 4, 1, 40, F16, True),
    (1, 37, 70, 6, 2, 128, BF16, True),
    (1, 70, 37, 2, 1, 80, F32, True),
    (3, 1, 70, 4, 2, 96, F16, False),
    (1, 70, 1, 2, 2, 64, BF16, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-q{}-k{}-h{}/{}-d{}-{}-{}".format(
    *c[:6], str(c[6]).split(".")[-1], "causal" if c[7] else "full"))
def test_fwd_bwd(case):
    b, sq, sk, h, hk, d, dtype, causal = case
    q, k, v = make_qkv(b, _len(sq), _len(sk), h, hk, d, dtype, seed=CASES.index(case))
    compare_with_reference(q, k, v, causal=causal)


def test_headdim_256_and_scale():
    q, k, v = make_qkv(1, _len(21), _len(33), 2, 1, 256, F16, seed=256)
    compare_with_reference(q, k, v, causal=True, softmax_scale=0.05)


def test_fully_masked_rows_are_zero():
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key (whole query blocks too)
    sq, sk = _len(70), _len(20)
    q, k, v = make_qkv(2, sq, sk, 2, 2, 32, F32, seed=3)
    out, lse = compare_with_reference(q, k, v, causal=True)
    assert (out[:, : sq - sk] == 0).all() and torch.isinf(lse[:, :, : sq - sk]).all()
    flash_attn_fa1_func(q, k, v, causal=True).sum().backward()
    assert (q.grad[:, : sq - sk] == 0).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("causal", [False, True])
def test_fused_qkv_views_are_not_copied(causal):
    # slices of one fused GQA projection (b, s, h + 2 * hk, d): strided, last dim contiguous
    b, s, h, hk, d = 3, _len(37), 4, 2, 48
    qkv = torch.randn(b, s, h + 2 * hk, d, device=DEVICE, dtype=F16, requires_grad=True)
    q, k, v = qkv[:, :, :h], qkv[:, :, h:h + hk], qkv[:, :, h + hk:]
    assert not q.is_contiguous() and not k.is_contiguous()
    compare_with_reference(q, k, v, leaves=(qkv,), causal=causal)
    # (b, h, s, d) tensors transposed to (b, s, h, d)
    qt = torch.randn(1, h, _len(45), d, device=DEVICE, dtype=BF16).transpose(1, 2).requires_grad_()
    kt = torch.randn(1, hk, s, d, device=DEVICE, dtype=BF16).transpose(1, 2).requires_grad_()
    vt = torch.randn(1, hk, s, d, device=DEVICE, dtype=BF16).transpose(1, 2).requires_grad_()
    compare_with_reference(qt, kt, vt, causal=causal)


def test_backward_is_bitwise_repeatable():
    q, k, v = make_qkv(3, _len(37), _len(45), 4, 2, 40, BF16, seed=7)
    dout = torch.randn(q.shape, device=DEVICE, dtype=BF16)
    runs = []
    for _ in range(2):
        out = flash_attn_fa1_func(q, k, v, causal=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_matmul_precision_follows_torch():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kern._precision(F32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kern._precision(F32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


def test_block_config():
    for d in (40, 64, 80, 128, 160, 256):
        for dtype in (F16, BF16, F32):
            for backward in (False, True):
                bm, bn, warps, stages = kern.fa1_block_config(d, dtype, backward)
                assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0
                assert warps in (1, 2, 4, 8) and stages >= 1


def test_custom_op_and_compile_fullgraph():
    q, k, v = make_qkv(1, 19, 23, 2, 1, 16, F32, seed=11)
    torch.library.opcheck(fa1_fwd, (q.detach(), k.detach(), v.detach(), 0.25, True),
                          test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v):
        return flash_attn_fa1_func(q, k, v, causal=True).sin().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    before = kern.LAUNCHES["fwd"]
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    assert kern.LAUNCHES["fwd"] > before
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_memory_linear_at_16k():
    """Forward+backward allocates memory linear in the sequence length (nothing N x N)."""
    peaks = {}
    for s in (4096, 8192, 16384):
        q, k, v = make_qkv(1, s, s, 16, 16, 128, BF16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = flash_attn_fa1_func(q, k, v, causal=True)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        peaks[s] = torch.cuda.max_memory_allocated() - base
        del q, k, v, out
    print("FA1 peak bytes above inputs:", peaks)
    assert peaks[16384] < 2.5 * peaks[8192] and peaks[8192] < 2.5 * peaks[4096]
    assert peaks[16384] < 1 << 30


def _t(*shape, dtype=F16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_t(8, 2, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16)), {}, ValueError, "q must have 4 dimensions"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 16, dtype=F32), _t(1, 8, 2, 16)), {}, TypeError, "k has dtype"),
    ((_t(1, 8, 2, 16).to(torch.float64),) * 3, {}, TypeError, "q has dtype"),
    ((_t(1, 8, 2, 16), _t(1, 8, 3, 16), _t(1, 8, 3, 16)), {}, ValueError, "multiple of that of k"),
    ((_t(1, 8, 2, 300),) * 3, {}, ValueError, "head dim is 300"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 9, 2, 16)), {}, ValueError, "k and v must have the same shape"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 32), _t(1, 8, 2, 32)), {}, ValueError, "k's head dim"),
    ((_t(1, 8, 2, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16)), {}, ValueError, "batch sizes differ"),
    ((_t(1, 8, 2, 32)[..., ::2], _t(1, 8, 2, 16), _t(1, 8, 2, 16)), {}, ValueError, "contiguous in its last"),
    ((_t(1, 8, 2, 16),) * 3, {"softmax_scale": -1.0}, ValueError, "softmax_scale"),
    ((_t(1, 8, 2, 16),) * 3, {"causal": "yes"}, TypeError, "causal must be a bool"),
])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flash_attn_fa1_func(*args, **kwargs)
