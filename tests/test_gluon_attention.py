"""The warp-specialised Hopper forward and backward (kernels/gluon_attention.py) against attention_ref, with their
launches counted: odd lengths, GQA / MQA, batches, causal with seqlen_q < seqlen_k, the layouts transformers hands
over (heads-major views, slices of a fused projection), packed (varlen) sequences, both 16-bit dtypes, the
backward's GQA split; and the cases they leave to the Triton kernels. Gluon has no CPU interpreter: on CPU only the
dispatch is tested here, and CI compiles the kernels for sm_90 (test_compile_sm90.py)."""

from __future__ import annotations

import pytest
import torch

from hf_flash import flash_attn_func, flash_attn_varlen_func, pad_input, unpad_input
from hf_flash.kernels import attention as kern
from hf_flash.reference import attention_ref
from conftest import DEVICE, ON_GPU, check_close
from test_attention import compare_with_reference, make_qkv

HOPPER = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of capability 9.0 (H100 / H200)")

# (batch, seqlen_q, seqlen_k, heads, kv heads, causal): lengths off every block size (64-row consumers, 128-key
# blocks), one shorter than a block, one CTA's worth, and a long one
CASES = [(1, 1000, 1000, 8, 2, True), (2, 257, 257, 4, 4, False), (3, 130, 390, 4, 1, True),
         (1, 64, 64, 4, 4, True), (2, 300, 2000, 8, 8, False), (1, 4173, 4173, 32, 8, True),
         (2, 1, 129, 4, 2, True)]


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b%d-q%d-k%d-h%d/%d-%s" % (*c[:5], "causal" if c[5] else "full"))
def test_gluon_kernels_match_reference(case, dtype):
    b, sq, sk, h, hk, causal = case
    q, k, v = make_qkv(b, sq, sk, h, hk, 128, dtype, seed=sq + sk)
    before = dict(kern.launches)
    grads = sq * sk < 5_000_000
    compare_with_reference(q, k, v, causal=causal, grads=grads)
    assert kern.launches["fwd_gluon"] == before["fwd_gluon"] + 1, "the Gluon forward did not run"
    assert kern.launches["bwd_gluon"] == before["bwd_gluon"] + grads, "the Gluon backward did not run"
    assert kern.launches["bwd_dkdv"] == before["bwd_dkdv"]


@needs_hopper
@pytest.mark.parametrize("split", ["2", "4"])
def test_gluon_backward_gqa_split(split, monkeypatch):
    """HF_FLASH_GLUON_BWD_SPLIT shares a GQA group's query heads out over several programs (float32 partials of
    dK / dV, summed); a value that does not divide the group is a clear error."""
    monkeypatch.setenv("HF_FLASH_GLUON_BWD_SPLIT", split)
    q, k, v = make_qkv(2, 1111, 1111, 8, 2, 128, torch.bfloat16, seed=int(split))
    before = kern.launches["bwd_gluon"]
    compare_with_reference(q, k, v, causal=True)
    assert kern.launches["bwd_gluon"] == before + 1
    monkeypatch.setenv("HF_FLASH_GLUON_BWD_SPLIT", "3")
    out = flash_attn_func(q, k, v, causal=True)
    with pytest.raises(ValueError, match="HF_FLASH_GLUON_BWD_SPLIT"):
        out.sum().backward()


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gluon_kernels_take_packed_sequences(causal, dtype):
    """Varlen (packed) sequences, as transformers' flash path hands over padded and packed training batches: the
    Gluon forward and backward read each sequence's rows out of the packed tensors (TMA brings in the next
    sequence's rows past a sequence's end: the kernels mask them). Lengths off every block size, an empty query
    sequence, an empty key sequence (its rows see no key: output 0, dq 0), and under the causal mask a sequence
    with more queries than keys (its first rows see no key). Against attention_ref on the padded batch."""
    lens_q = [300, 5, 0, 777, 40, 129]
    lens_k = [300, 0, 7, 777, 20, 1000]
    batch, mq, mk = len(lens_q), max(lens_q), max(lens_k)
    qpad = (torch.arange(mq).view(1, -1) < torch.tensor(lens_q).view(-1, 1)).to(DEVICE)
    kpad = (torch.arange(mk).view(1, -1) < torch.tensor(lens_k).view(-1, 1)).to(DEVICE)
    q, k, v = make_qkv(batch, mq, mk, 8, 2, 128, dtype, seed=7 + causal)
    q_u, idx_q, cu_q, max_q, _ = unpad_input(q, qpad)
    k_u, _, cu_k, max_k, _ = unpad_input(k, kpad)
    v_u = unpad_input(v, kpad)[0]
    before = dict(kern.launches)
    out_u = flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, causal=causal)
    assert kern.launches["fwd_gluon"] == before["fwd_gluon"] + 1, "the Gluon forward did not take the varlen call"
    out = pad_input(out_u, idx_q, batch, mq)
    ref, _ = attention_ref(q, k, v, qpad, kpad, causal=causal)
    ref_lp, _ = attention_ref(q, k, v, qpad, kpad, causal=causal, upcast_dtype=None)
    check_close("out", out, ref, ref_lp)
    dout = torch.randn_like(out) * qpad[:, :, None, None]
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert kern.launches["bwd_gluon"] == before["bwd_gluon"] + 1, "the Gluon backward did not take the varlen call"
    want = torch.autograd.grad(ref, (q, k, v), dout)
    want_lp = torch.autograd.grad(ref_lp, (q, k, v), dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, want_lp):
        check_close(name, a, b, c, factor=3.0)
    # the sequence with no keys: zero output and zero dq
    assert (out[1, :5] == 0).all() and (got[0][1, :5] == 0).all()


@needs_hopper
@pytest.mark.parametrize("layout", ["heads-major", "fused-qkv", "batch-1-odd-stride"])
def test_gluon_forward_takes_strided_layouts(layout):
    """transformers hands the attention (batch, seqlen, heads, dim) views of (batch, heads, seqlen, dim) tensors,
    or slices of one fused projection: TMA reads them with their strides, no copy; a batch of 1 may carry any
    batch stride."""
    b, s, h, hk, d = 2, 777, 8, 2, 128
    g = torch.Generator(device="cpu").manual_seed(3)
    if layout == "heads-major":
        q, k, v = (torch.randn(b, n, s, d, generator=g).to(DEVICE, torch.bfloat16).transpose(1, 2)
                   for n in (h, hk, hk))
    elif layout == "fused-qkv":
        qkv = torch.randn(b, s, (h + 2 * hk) * d, generator=g).to(DEVICE, torch.bfloat16)
        q, k, v = (t.view(b, s, -1, d) for t in qkv.split([h * d, hk * d, hk * d], dim=-1))
    else:  # a batch of 1 whose batch stride TMA could not take (a dimension of size 1 is read at index 0 only)
        q, k, v = (torch.randn(s, n, d, generator=g).to(DEVICE, torch.bfloat16).as_strided((1, s, n, d),
                                                                                        (3, n * d, d, 1))
                   for n in (h, hk, hk))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    before = dict(kern.launches)
    compare_with_reference(q, k, v, causal=True)
    assert kern.launches["fwd_gluon"] == before["fwd_gluon"] + 1
    assert kern.launches["bwd_gluon"] == before["bwd_gluon"] + 1


@needs_hopper
def test_other_calls_take_the_triton_forward(monkeypatch):
    """Head dims other than 128, float32, windows, softcap, dropout, seqlen_q > seqlen_k under a causal mask and
    HF_FLASH_GLUON_FWD=0 run the Triton forward, still correct."""
    b, sq, sk = 1, 300, 300
    for d, dtype, kw in [(64, torch.bfloat16, {}), (128, torch.float32, {}),
                         (128, torch.bfloat16, {"window_size": (64, 0)}), (128, torch.bfloat16, {"softcap": 5.0})]:
        q, k, v = make_qkv(b, sq, sk, 4, 2, d, dtype, seed=d)
        before = dict(kern.launches)
        compare_with_reference(q, k, v, causal=True, grads=False, **kw)
        assert kern.launches["fwd_gluon"] == before["fwd_gluon"], (d, dtype, kw)
    q, k, v = make_qkv(1, 400, 200, 4, 2, 128, torch.bfloat16, seed=9)
    before = kern.launches["fwd_gluon"]
    compare_with_reference(q, k, v, causal=True, grads=False)
    assert kern.launches["fwd_gluon"] == before
    monkeypatch.setenv("HF_FLASH_GLUON_FWD", "0")
    q, k, v = make_qkv(1, 300, 300, 4, 2, 128, torch.bfloat16, seed=10)
    compare_with_reference(q, k, v, causal=True, grads=False)
    assert kern.launches["fwd_gluon"] == before


@needs_hopper
def test_other_backwards_take_the_triton_kernels(monkeypatch):
    """deterministic=True, a sliding window, head dim 64 and HF_FLASH_GLUON_BWD=0 run the Triton backward, still
    correct; the Gluon backward also takes the gradients of a Triton forward (HF_FLASH_GLUON_FWD=0)."""
    for d, kw in [(64, {}), (128, {"deterministic": True}), (128, {"window_size": (100, 0)})]:
        q, k, v = make_qkv(1, 300, 300, 4, 2, d, torch.bfloat16, seed=d)
        before = dict(kern.launches)
        compare_with_reference(q, k, v, causal=True, **kw)
        assert kern.launches["bwd_gluon"] == before["bwd_gluon"] and kern.launches["bwd_dkdv"] == before["bwd_dkdv"] + 1
    monkeypatch.setenv("HF_FLASH_GLUON_FWD", "0")
    q, k, v = make_qkv(2, 333, 333, 4, 2, 128, torch.float16, seed=3)
    before = dict(kern.launches)
    compare_with_reference(q, k, v, causal=True)
    assert kern.launches["fwd_gluon"] == before["fwd_gluon"] and kern.launches["bwd_gluon"] == before["bwd_gluon"] + 1
    monkeypatch.setenv("HF_FLASH_GLUON_BWD", "0")
    compare_with_reference(q, k, v, causal=True)
    assert kern.launches["bwd_gluon"] == before["bwd_gluon"] + 1


def test_dispatch_declines_where_the_kernel_cannot_run():
    """Off Hopper (and always under the CPU interpreter) every call takes the Triton forward."""
    q, k, v = make_qkv(1, 70, 70, 4, 2, 128, torch.bfloat16, requires_grad=False)
    before = kern.launches["fwd_gluon"]
    out = flash_attn_func(q, k, v, causal=True)
    assert torch.isfinite(out.float()).all()
    if not HOPPER:
        assert kern.launches["fwd_gluon"] == before


def _failing_gluon(monkeypatch, direction: str, error: Exception):
    """A stand-in for kernels/gluon_attention.py whose ``direction`` kernel takes every call and fails to compile
    with ``error``, installed with a fresh broken-kernel set; returns (stand-in, that set)."""
    class Fake:
        calls = 0

        @staticmethod
        def supported(*a, **k):
            return direction == "fwd"

        @staticmethod
        def supported_backward(*a, **k):
            return direction == "bwd"

        @staticmethod
        def backward_split(*a, **k):
            return 1

        @classmethod
        def _fail(cls, *a, **k):
            cls.calls += 1
            raise error

    setattr(Fake, "forward" if direction == "fwd" else "backward", Fake._fail)
    broken = set()
    monkeypatch.setattr(kern, "_GLUON_BROKEN", broken)
    monkeypatch.setattr(kern, "_gluon", lambda d: None if d in broken else Fake)
    return Fake, broken


def test_a_gluon_api_this_kernel_does_not_match_falls_back_with_a_warning(monkeypatch):
    """Where the forward fails to compile (a Triton whose Gluon API moved), the call still returns the right answer
    from the Triton forward, with one warning, and later calls do not try the Gluon forward again."""
    fake, broken = _failing_gluon(monkeypatch, "fwd",
                                  AttributeError("module 'gluon.language' has no attribute 'warp_specialize'"))
    q, k, v = make_qkv(1, 70, 70, 4, 2, 128, torch.bfloat16)
    before = dict(kern.launches)
    with pytest.warns(RuntimeWarning, match="forward did not compile.*AttributeError.*HF_FLASH_GLUON_FWD=0"):
        compare_with_reference(q, k, v, causal=True, grads=False)
    assert kern.launches["fwd_gluon"] == before["fwd_gluon"] and broken == {"fwd"}
    compare_with_reference(q, k, v, causal=True, grads=False)
    assert fake.calls == 1


def test_a_gluon_backward_that_does_not_compile_falls_back_with_a_warning(monkeypatch):
    """The same for the backward: the Triton backward gives the gradients, one warning, no second attempt; the
    forward's Gluon state is left alone."""
    fake, broken = _failing_gluon(monkeypatch, "bwd",
                                  TypeError("warpgroup_mma() got an unexpected keyword argument 'is_async'"))
    q, k, v = make_qkv(1, 70, 70, 4, 2, 128, torch.bfloat16)
    before = dict(kern.launches)
    with pytest.warns(RuntimeWarning, match="backward did not compile.*TypeError.*HF_FLASH_GLUON_BWD=0"):
        compare_with_reference(q, k, v, causal=True)
    assert broken == {"bwd"} and kern.launches["bwd_dkdv"] == before["bwd_dkdv"] + 1
    compare_with_reference(q, k, v, causal=True)
    assert fake.calls == 1 and kern.launches["bwd_gluon"] == before["bwd_gluon"]


def test_triton_version_gate_reads_release_and_development_versions():
    assert kern._version("3.6.0") == (3, 6) and kern._version("3.10.0+git1234") == (3, 10)
    assert kern._version("3.7.0rc1") == (3, 7) and kern._version("nightly") == (0, 0)
    assert kern._version("3.5.1") < kern.GLUON_MIN_TRITON <= kern._version("3.9.0")
