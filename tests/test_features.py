"""Dropout, varlen, sliding window, softcap, ALiBi and attention bias, alone and combined, forward and backward,
against attention_ref."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from hf_flash import (
    attention_ref,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    pad_input,
    unpad_input,
)
from hf_flash.kernels import attention as kern
from conftest import DEVICE, ON_GPU, check_close
from test_attention import compare_with_reference, make_qkv

B, SQ, SK, D = (2, 1000, 1500, 80) if ON_GPU else (2, 45, 70, 40)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(16, 0), (7, 9), (-1, 5), (20, -1)])
def test_sliding_window(window, causal):
    if ON_GPU:
        window = tuple(w * 20 if w >= 0 else w for w in window)
    q, k, v = make_qkv(B, SQ, SK, 4, 2, D, torch.float16)
    compare_with_reference(q, k, v, causal=causal, window_size=window)


def test_window_skips_blocks():
    """Blocks outside the window are skipped: a narrow window costs less, shown by the kernel's own trip count
    (the interpreter counts loads; here we check the block range helper through outputs of a tiny window)."""
    q, k, v = make_qkv(1, SQ, SQ, 2, 2, D, torch.float32)
    compare_with_reference(q, k, v, window_size=(0, 0))  # each row sees only its own key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_softcap_and_alibi(dtype):
    q, k, v = make_qkv(B, SQ, SK, 4, 2, D, dtype)
    slopes = torch.rand(B, 4, device=DEVICE) * 0.5
    compare_with_reference(q, k, v, causal=True, softcap=5.0, alibi_slopes=slopes)
    compare_with_reference(q, k, v, softcap=1.5)
    compare_with_reference(q, k, v, alibi_slopes=slopes[0].contiguous(), window_size=(11, 3))


@pytest.mark.parametrize("shape", [(B, 4, SQ, SK), (1, 4, SQ, SK), (B, 1, 1, SK), (SQ, SK)],
                         ids=["full", "batch-bcast", "key-padding", "2d"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_float_bias_and_its_gradient(shape, deterministic):
    q, k, v = make_qkv(B, SQ, SK, 4, 2, D, torch.float32)
    bias = torch.randn(*shape, device=DEVICE)
    bias[..., : SK // 7] = float("-inf")  # a masked band: whole tiles of it are skipped
    bias.requires_grad_(True)
    out = flash_attn_func(q, k, v, causal=True, attn_bias=bias, deterministic=deterministic)
    ref, _ = attention_ref(q, k, v, causal=True, attn_bias=bias)
    check_close("out", out, ref, ref)
    dout = torch.randn_like(out)
    before = kern.launches["bwd_dbias"]
    got = torch.autograd.grad(out, (q, k, v, bias), dout)
    want = torch.autograd.grad(ref, (q, k, v, bias), dout)
    reduced = shape[0] < B or len(shape) == 2 or shape[1] < 4 or shape[2] < SQ
    assert kern.launches["bwd_dbias"] == before + (1 if deterministic and reduced else 0)
    assert got[3].shape == bias.shape
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, want):
        b = torch.nan_to_num(b, nan=0.0)
        check_close(name, a, b, b, factor=3.0)
    if deterministic:
        again = torch.autograd.grad(flash_attn_func(q, k, v, causal=True, attn_bias=bias, deterministic=True),
                                    bias, dout)[0]
        assert torch.equal(again, got[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bias_causal_gqa_low_precision(dtype):
    q, k, v = make_qkv(B, SQ, SK, 4, 1, D, dtype)
    bias = torch.randn(B, 4, SQ, SK, device=DEVICE, dtype=dtype)
    compare_with_reference(q, k, v, causal=True, attn_bias=bias)


def test_bool_mask_skips_tiles_and_zeroes_empty_rows():
    q, k, v = make_qkv(B, SQ, SK, 4, 2, D, torch.float32)
    mask = torch.rand(B, 1, SQ, SK, device=DEVICE) > 0.4
    mask[:, :, :3] = False  # rows that see nothing
    mask[:, :, :, 32:] &= False  # a block-sparse region
    out = compare_with_reference(q, k, v, attn_bias=mask)
    assert (out[:, :3] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_on_the_same_mask(causal):
    p = 0.17
    q, k, v = make_qkv(B, SQ, SK, 4, 2, D, torch.float32)
    torch.manual_seed(11)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=p, causal=causal, return_attn_probs=True)
    keep = s_dmask >= 0
    ref, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, causal=causal)
    check_close("out", out, ref, ref)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        check_close(name, a, b, b, factor=3.0)


def test_dropout_keep_fraction_and_seeding():
    p = 0.3
    q, k, v = make_qkv(2, 64, 64, 2, 2, 32, torch.float16, requires_grad=False)
    torch.manual_seed(0)
    _, _, s1 = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    n = s1.numel()
    kept = (s1 > 0).float().mean().item()  # probabilities are > 0 everywhere without a mask
    # binomial: 5 standard deviations
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    # one Philox call serves 8 neighbouring columns (two 16-bit draws from each of its 4 words): every one of those
    # 8 lanes keeps 1 - p on its own, and neighbours are not correlated (a lane mapping that reused bits would
    # show up as agreement far from the independent rate)
    keep = s1 > 0
    lanes = keep.reshape(*keep.shape[:-1], -1, 8).float()
    for j in range(8):
        assert abs(lanes[..., j].mean().item() - (1 - p)) < 5 * (p * (1 - p) / (n / 8)) ** 0.5, j
    agree = (keep[..., 1:] == keep[..., :-1]).float().mean().item()
    indep = (1 - p) ** 2 + p ** 2
    assert abs(agree - indep) < 5 * (indep * (1 - indep) / keep[..., 1:].numel()) ** 0.5
    torch.manual_seed(0)
    a = flash_attn_func(q, k, v, dropout_p=p)
    torch.manual_seed(0)
    b = flash_attn_func(q, k, v, dropout_p=p)
    c = flash_attn_func(q, k, v, dropout_p=p)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_checkpoint_replays_the_mask():
    q, k, v = make_qkv(B, SQ, SK, 4, 2, D, torch.float32)
    dout = torch.randn(B, SQ, 4, D, device=DEVICE)

    def f(q, k, v):
        return flash_attn_func(q, k, v, dropout_p=0.25, causal=True)

    torch.manual_seed(5)
    plain = torch.autograd.grad(f(q, k, v), (q, k, v), dout)
    torch.manual_seed(5)
    ckpt = torch.autograd.grad(checkpoint(f, q, k, v, use_reentrant=False), (q, k, v), dout)
    # dK and dV are written once per key block: bitwise equal when the recomputed forward drew the same mask. dQ
    # is summed with float32 atomics on the GPU (the fused backward), whose order varies from run to run: equal
    # to rounding there, while a different mask would move it by the size of the gradient itself.
    torch.testing.assert_close(plain[0], ckpt[0], rtol=0, atol=1e-5 * plain[0].abs().max().item())
    for a, b in zip(plain[1:], ckpt[1:]):
        assert torch.equal(a, b)


def test_dropout_causal_gqa_combination():
    q, k, v = make_qkv(B, SQ, SK, 4, 1, D, torch.bfloat16)
    torch.manual_seed(3)
    out, _, s = flash_attn_func(q, k, v, dropout_p=0.1, causal=True, return_attn_probs=True)
    ref, _ = attention_ref(q, k, v, dropout_p=0.1, dropout_mask=s >= 0, causal=True)
    ref_lp, _ = attention_ref(q, k, v, dropout_p=0.1, dropout_mask=s >= 0, causal=True, upcast_dtype=None)
    check_close("out", out, ref, ref_lp)


# ---------------------------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------------------------


def _varlen_case(lens_q, lens_k, nheads, nheads_k, d, dtype):
    batch = len(lens_q)
    mq, mk = max(lens_q), max(lens_k)
    qpad = torch.arange(mq).view(1, -1) < torch.tensor(lens_q).view(-1, 1)
    kpad = torch.arange(mk).view(1, -1) < torch.tensor(lens_k).view(-1, 1)
    q, k, v = make_qkv(batch, mq, mk, nheads, nheads_k, d, dtype)
    return q, k, v, qpad.to(DEVICE), kpad.to(DEVICE)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (9, 2)])
def test_varlen_matches_padded_reference(causal, window):
    lens_q = [37, 0, 1, 66] if not ON_GPU else [1000, 0, 1, 2500]
    lens_k = [50, 3, 1, 66] if not ON_GPU else [1200, 3, 1, 2500]
    q, k, v, qpad, kpad = _varlen_case(lens_q, lens_k, 4, 2, D, torch.float16)
    q_u, idx_q, cu_q, max_q, _ = unpad_input(q, qpad)
    k_u, idx_k, cu_k, max_k, _ = unpad_input(k, kpad)
    v_u = unpad_input(v, kpad)[0]
    before = kern.launches["fwd"]
    out_u = flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, causal=causal, window_size=window)
    assert kern.launches["fwd"] == before + 1
    out = pad_input(out_u, idx_q, len(lens_q), max(lens_q))
    ref, _ = attention_ref(q, k, v, qpad, kpad, causal=causal, window_size=window)
    ref_lp, _ = attention_ref(q, k, v, qpad, kpad, causal=causal, window_size=window, upcast_dtype=None)
    check_close("out", out, ref, ref_lp)
    dout = torch.randn_like(out) * qpad[:, :, None, None]
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    want_lp = torch.autograd.grad(ref_lp, (q, k, v), dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, want_lp):
        check_close(name, a, b, c, factor=3.0)


def test_varlen_two_kernel_dq_backward(monkeypatch):
    """The varlen case above with the separate dQ kernel (HF_FLASH_BWD_FUSED_DQ=0; by default dQ is added with
    atomics inside the dK/dV kernel, which the test above runs)."""
    monkeypatch.setenv("HF_FLASH_GLUON_BWD", "0")
    before = kern.launches["bwd_fused_dq"], kern.launches["bwd_dq"]
    test_varlen_matches_padded_reference(True, (-1, -1))
    assert (kern.launches["bwd_fused_dq"], kern.launches["bwd_dq"]) == (before[0] + 1, before[1])
    monkeypatch.setenv("HF_FLASH_BWD_FUSED_DQ", "0")
    test_varlen_matches_padded_reference(True, (-1, -1))
    assert (kern.launches["bwd_fused_dq"], kern.launches["bwd_dq"]) == (before[0] + 1, before[1] + 1)


def test_varlen_packed_forms_softcap_alibi_bias():
    lens = [23, 41, 5]
    cu = torch.tensor([0, 23, 64, 69], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(69, 3, 4, 32, device=DEVICE, requires_grad=True)
    slopes = torch.rand(4, device=DEVICE)
    bias = torch.randn(1, 4, 41, 41, device=DEVICE)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, 41, causal=True, softcap=3.0, alibi_slopes=slopes,
                                           attn_bias=bias)
    out_kv = flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 41, 41, causal=True, softcap=3.0,
                                             alibi_slopes=slopes, attn_bias=bias)
    assert torch.equal(out, out_kv)
    for i, n in enumerate(lens):
        s = slice(int(cu[i]), int(cu[i + 1]))
        q, k, v = (qkv[s, j][None] for j in range(3))
        ref, _ = attention_ref(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes,
                               attn_bias=bias[:, :, :n, :n])
        check_close(f"seq{i}", out[s][None], ref, ref)


def test_varlen_bad_inputs():
    q = torch.randn(10, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        flash_attn_varlen_func(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k has"):
        flash_attn_varlen_func(q, q, q, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        flash_attn_varlen_func(q, q, q, cu, cu, -1, 6)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        flash_attn_varlen_func(q[None], q, q, cu, cu, 6, 6)
