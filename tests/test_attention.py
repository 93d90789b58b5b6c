"""FA2 forward/backward against attention_ref: dtypes, causal, GQA/MQA, odd sizes, fully masked rows, views,
determinism, torch.compile and bad inputs. On CUDA the same tests run at larger sizes."""

from __future__ import annotations

import pytest
import torch

import hf_flash
from hf_flash import attention_ref, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from hf_flash.kernels import attention as kern
from conftest import DEVICE, ON_GPU, check_close

# (batch, seqlen_q, seqlen_k, headdim): lengths that are not multiples of any block, both orders of q/k
SHAPES_CPU = [(1, 113, 113, 64), (3, 45, 70, 40), (2, 70, 45, 80), (1, 37, 37, 96)]
SHAPES_GPU = [(1, 1023, 1023, 64), (3, 513, 1700, 80), (2, 2049, 1000, 128), (2, 4097, 4097, 96)]
SHAPES = SHAPES_GPU if ON_GPU else SHAPES_CPU
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, requires_grad=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, seqlen_q, nheads, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, d, generator=g).to(DEVICE, dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def compare_with_reference(q, k, v, grads=True, ref_kwargs=None, **kwargs):
    """Run hf_flash and the reference (float32 and the input dtype) on the same inputs; check out, lse, grads."""
    ref_kwargs = dict(kwargs, **(ref_kwargs or {}))
    ref_kwargs.pop("deterministic", None)
    before = dict(kern.launches)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kwargs)
    assert kern.launches["fwd"] == before["fwd"] + 1, "the FA2 forward kernel did not run"
    ref, _, lse_ref = attention_ref(q, k, v, return_lse=True, **ref_kwargs)
    ref_lp, _ = attention_ref(q, k, v, upcast_dtype=None if q.dtype != torch.float32 else torch.float32,
                              **ref_kwargs)
    check_close("out", out, ref, ref_lp)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), "lse is +inf exactly where a row sees no key"
    assert (lse[~finite] == float("inf")).all()
    torch.testing.assert_close(lse[finite], lse_ref[finite], atol=1e-3 if q.dtype == torch.float32 else 2e-2,
                               rtol=1e-3)
    if not grads:
        return out
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    dq_runs = kern.launches["bwd_dq"] + kern.launches["bwd_fused_dq"] - before["bwd_dq"] - before["bwd_fused_dq"]
    triton_runs = kern.launches["bwd_dkdv"] - before["bwd_dkdv"]
    gluon_runs = kern.launches["bwd_gluon"] - before["bwd_gluon"]  # the Hopper backward, where it takes the call
    assert (gluon_runs, triton_runs, dq_runs) in ((1, 0, 0), (0, 1, 1)), "one backward kernel set ran"
    want = torch.autograd.grad(ref, (q, k, v), dout)
    want_lp = torch.autograd.grad(ref_lp, (q, k, v), dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, want_lp):
        check_close(name, a, b, c, factor=3.0)
    empty = ~finite  # (batch, nheads, seqlen_q): rows that see no key get zero output and zero dq
    if empty.any():
        rows = empty.permute(0, 2, 1)
        assert (out[rows] == 0).all() and (got[0][rows] == 0).all()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
def test_fwd_bwd(dtype, causal, heads):
    # each (dtype, causal, heads) combination takes a different odd shape, so every shape meets every feature
    i = (DTYPES.index(dtype) + 2 * causal + HEADS.index(heads)) % len(SHAPES)
    b, sq, sk, d = SHAPES[i]
    q, k, v = make_qkv(b, sq, sk, *heads, d, dtype, seed=i)
    compare_with_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("split", ["2", "4", "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_backward_split_over_programs(split, causal, monkeypatch):
    """HF_FLASH_BWD_GQA_SPLIT shares a GQA group's query heads out over several dK/dV programs (float32 partials,
    summed): gradients still match the reference, and the split path ran. A split that does not divide the
    group is a clear error."""
    monkeypatch.setenv("HF_FLASH_BWD_GQA_SPLIT", split)
    monkeypatch.setenv("HF_FLASH_GLUON_BWD", "0")  # the Triton backward's split (the Hopper one has its own)
    b, sq, sk, d = SHAPES[1]
    dtype = torch.bfloat16 if causal else torch.float32
    q, k, v = make_qkv(b, sq, sk, 8, 2, d, dtype, seed=5 + causal)
    before = kern.launches["bwd_dkdv_gqa_split"]
    compare_with_reference(q, k, v, causal=causal)
    assert kern.launches["bwd_dkdv_gqa_split"] == before + 1
    monkeypatch.setenv("HF_FLASH_BWD_GQA_SPLIT", "3")
    out = flash_attn_func(q, k, v, causal=causal)
    with pytest.raises(ValueError, match="HF_FLASH_BWD_GQA_SPLIT"):
        out.sum().backward()


FUSED_DQ_CASES = ["causal-gqa", "mha-window-softcap", "mqa-alibi-split"]


@pytest.mark.parametrize("fused", ["default", "0"])
@pytest.mark.parametrize("case", FUSED_DQ_CASES)
def test_fused_and_two_kernel_dq_backward(case, fused, monkeypatch):
    """Both dQ paths match the reference with GQA/MQA, causal, sliding window, softcap, ALiBi and the GQA split
    (varlen: in test_features): by default dQ is accumulated with atomics inside the dK/dV kernel (the dQ kernel
    does not run); HF_FLASH_BWD_FUSED_DQ=0 runs the separate dQ kernel. deterministic=True and torch's
    deterministic algorithms keep the two-kernel backward."""
    monkeypatch.setenv("HF_FLASH_GLUON_BWD", "0")  # these are the Triton backward's paths
    if fused == "0":
        monkeypatch.setenv("HF_FLASH_BWD_FUSED_DQ", "0")
    else:
        monkeypatch.delenv("HF_FLASH_BWD_FUSED_DQ", raising=False)
    b, sq, sk, d = SHAPES[(FUSED_DQ_CASES.index(case) + 1) % len(SHAPES)]
    heads = {"causal-gqa": (8, 2), "mha-window-softcap": (4, 4), "mqa-alibi-split": (4, 1)}[case]
    dtype = torch.bfloat16 if case != "mha-window-softcap" else torch.float16
    before = dict(kern.launches)
    q, k, v = make_qkv(b, sq, sk, *heads, d, dtype, seed=31)
    kw = {"causal-gqa": dict(causal=True),
          "mha-window-softcap": dict(window_size=(17, 5), softcap=8.0),
          "mqa-alibi-split": dict(causal=True, alibi_slopes=torch.rand(heads[0], device=DEVICE, dtype=torch.float32))}
    if case == "mqa-alibi-split":
        monkeypatch.setenv("HF_FLASH_BWD_GQA_SPLIT", "2")
    compare_with_reference(q, k, v, **kw[case])
    fused_runs = 1 if fused == "default" else 0
    assert kern.launches["bwd_fused_dq"] == before["bwd_fused_dq"] + fused_runs
    assert kern.launches["bwd_dq"] == before["bwd_dq"] + 1 - fused_runs
    if fused == "0":
        return
    # deterministic=True and torch.use_deterministic_algorithms: the two-kernel backward
    q, k, v = make_qkv(1, 40, 40, 4, 2, 32, torch.float32, seed=1)
    flash_attn_func(q, k, v, causal=True, deterministic=True).sum().backward()
    assert kern.launches["bwd_dq"] == before["bwd_dq"] + 1
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        flash_attn_func(q, k, v, causal=True).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert kern.launches["bwd_dq"] == before["bwd_dq"] + 2
    assert kern.launches["bwd_fused_dq"] == before["bwd_fused_dq"] + 1


@pytest.mark.parametrize("d", [40, 64, 80, 96, 128, 160, 256])
def test_head_dims(d):
    b, sq, sk = (2, 300, 257) if ON_GPU else (1, 33, 40)
    q, k, v = make_qkv(b, sq, sk, 2, 1, d, torch.float16, seed=d)
    compare_with_reference(q, k, v, causal=True, softmax_scale=0.3)


def test_fully_masked_rows():
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key
    q, k, v = make_qkv(2, 50, 20, 2, 2, 32, torch.float32)
    out = compare_with_reference(q, k, v, causal=True)
    assert (out[:, :30] == 0).all()


def test_fused_qkv_views_are_not_copied():
    b, s, h, d = 2, 67, 3, 48
    qkv = torch.randn(b, s, 3, h, d, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    ref, _ = attention_ref(q, k, v, causal=True)
    ref_lp, _ = attention_ref(q, k, v, causal=True, upcast_dtype=None)
    check_close("out", out, ref, ref_lp)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    (gr,) = torch.autograd.grad(ref, qkv, dout)
    (gl,) = torch.autograd.grad(ref_lp, qkv, dout)
    check_close("dqkv", g, gr, gl, factor=3.0)
    # kv-packed, and a (b, h, s, d) tensor transposed to (b, s, h, d): strided, last dim contiguous
    qt = torch.randn(b, h, s, d, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    kv = torch.randn(b, s, 2, h, d, device=DEVICE, dtype=torch.float16)
    out = flash_attn_kvpacked_func(qt, kv)
    ref, _ = attention_ref(qt, kv[:, :, 0], kv[:, :, 1])
    ref_lp, _ = attention_ref(qt, kv[:, :, 0], kv[:, :, 1], upcast_dtype=None)
    check_close("out", out, ref, ref_lp)


def test_deterministic_backward_is_bitwise_repeatable():
    q, k, v = make_qkv(2, 70, 90, 4, 2, 64, torch.bfloat16)
    dout = torch.randn(2, 70, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self, d=32, h=2):
            super().__init__()
            self.h = h
            self.qkv = torch.nn.Linear(d, 3 * d)
            self.o = torch.nn.Linear(d, d)

        def forward(self, x):
            b, s, d = x.shape
            qkv = self.qkv(x).view(b, s, 3, self.h, d // self.h)
            y = hf_flash.flash_attn_qkvpacked_func(qkv, causal=True)
            return self.o(y.reshape(b, s, d))

    torch.manual_seed(0)
    m = Block().to(DEVICE)
    x = torch.randn(2, 37, 32, device=DEVICE)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    before = kern.launches["fwd"]
    out = compiled(x)
    assert kern.launches["fwd"] > before
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    out.sum().backward()


def test_eager_function_and_custom_op_give_the_same_results(monkeypatch):
    """Eager calls run through an autograd.Function (not the custom op, whose dispatch costs host time); the
    custom op (what torch.compile traces) gives bitwise the same output and gradients, with GQA, dropout and a
    bias that needs its gradient (deterministic backward: no atomics, so the two runs can be compared bitwise)."""
    from hf_flash import ops

    calls = []
    real_op = ops.attn_fwd
    monkeypatch.setattr(ops, "attn_fwd", lambda *a: calls.append(1) or real_op(*a))
    q, k, v = make_qkv(2, 45, 53, 4, 2, 40, torch.float32, seed=11)
    bias = torch.randn(1, 4, 45, 53, device=DEVICE, requires_grad=True)
    rng = torch.tensor([7, 0], dtype=torch.int64, device=DEVICE)
    args = (None, None, 45, 53, bias, None, rng, 0.1, 0.2, -1, 0, 0.0, True)
    results = []
    for path in ("eager", "op"):
        if path == "eager":
            out, lse = ops.attention(q, k, v, *args)
        else:
            out, lse = real_op(q, k, v, *args)
        grads = torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))
        results.append((out, lse) + grads)
    assert calls == [], "an eager call went through the custom op"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), *results):
        assert torch.equal(a, b), name


def test_forward_tiles_follow_the_grid_not_the_token_count(monkeypatch):
    """The GPU forward's tiles for 16-bit head dim 128 follow the grid's size in waves over the SMs (64 x 64 for a
    small grid, 128 x 128 for a large one); the key length never enters, so a decode loop whose cache grows by
    one token keeps its compiled kernel, and float32 keeps its narrower key tile."""
    from hf_flash.kernels import configs

    monkeypatch.delenv("HF_FLASH_FWD_CONFIG", raising=False)
    monkeypatch.setattr(configs, "num_sms", lambda device: 132)
    gpu = torch.device("cuda", 0)
    pick = lambda bh, sq, sk=4096, dt=torch.bfloat16: configs.fwd_config(128, dt, gpu, sq, sk, bh)  # noqa: E731
    assert pick(32, 4096) == configs.Config(64, 64, 4, 3)  # batch-1 Llama-3-8B layer at 4k: 8 waves
    assert pick(32, 16384) == configs.Config(128, 64, 8, 3)  # 31 waves
    assert pick(32, 32768) == configs.Config(128, 128, 8, 3)  # 62 waves
    assert len({pick(32, 4096, sk) for sk in range(4096, 4200)}) == 1
    assert pick(32, 32768, dt=torch.float32).block_n == 32
    assert configs.fwd_config(128, torch.bfloat16, torch.device("cpu"), 32768, 32768, 32).block_m == 32


@pytest.mark.gpu
def test_memory_linear_at_16k():
    """Forward+backward at 16k allocates memory linear in the sequence length (nothing N x N)."""
    peaks = {}
    for s in (4096, 8192, 16384):
        q, k, v = make_qkv(1, s, s, 16, 16, 128, torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = flash_attn_func(q, k, v, causal=True)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        peaks[s] = torch.cuda.max_memory_allocated() - base
        del q, k, v, out
    print("peak bytes above inputs:", peaks)
    # doubling the length doubles the peak (O(N)); an N x N fp32 buffer at 16k would be 16 GiB
    assert peaks[16384] < 2.5 * peaks[8192] and peaks[8192] < 2.5 * peaks[4096]
    assert peaks[16384] < 1 << 30


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: one per validated argument, each error names the argument
# ---------------------------------------------------------------------------------------------------------------


def _qkv(**over):
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, torch.float16, requires_grad=False)
    d = dict(q=q, k=k, v=v)
    d.update(over)
    return d


@pytest.mark.parametrize("case,exc,match", [
    (lambda: flash_attn_func(**_qkv(q=torch.randn(8, 2, 16, device=DEVICE, dtype=torch.float16))), ValueError,
     "q must have 4 dimensions"),
    (lambda: flash_attn_func(**_qkv(k=torch.randn(1, 8, 2, 16, device=DEVICE, dtype=torch.float32))), TypeError,
     "k has dtype"),
    (lambda: flash_attn_func(**_qkv(q=torch.randint(0, 3, (1, 8, 2, 16), device=DEVICE))), TypeError,
     "q has dtype"),
    (lambda: flash_attn_func(**_qkv(k=torch.randn(1, 8, 3, 16, device=DEVICE, dtype=torch.float16),
                                    v=torch.randn(1, 8, 3, 16, device=DEVICE, dtype=torch.float16))), ValueError,
     "multiple of that of k"),
    (lambda: flash_attn_func(**_qkv(q=torch.randn(1, 8, 2, 300, device=DEVICE, dtype=torch.float16),
                                    k=torch.randn(1, 8, 2, 300, device=DEVICE, dtype=torch.float16),
                                    v=torch.randn(1, 8, 2, 300, device=DEVICE, dtype=torch.float16))), ValueError,
     "head dim is 300"),
    (lambda: flash_attn_func(**_qkv(v=torch.randn(1, 9, 2, 16, device=DEVICE, dtype=torch.float16))), ValueError,
     "k and v must have the same shape"),
    (lambda: flash_attn_func(**_qkv(k=torch.randn(2, 8, 2, 16, device=DEVICE, dtype=torch.float16),
                                    v=torch.randn(2, 8, 2, 16, device=DEVICE, dtype=torch.float16))), ValueError,
     "batch sizes differ"),
    (lambda: flash_attn_func(**_qkv(q=torch.randn(1, 8, 2, 32, device=DEVICE, dtype=torch.float16)[..., ::2])),
     ValueError, "contiguous in its last dimension"),
    (lambda: flash_attn_func(**_qkv(), dropout_p=1.0), ValueError, "dropout_p must be in"),
    (lambda: flash_attn_func(**_qkv(), window_size=(-2, 0)), ValueError, "window_size"),
    (lambda: flash_attn_func(**_qkv(), window_size=3), ValueError, "window_size"),
    (lambda: flash_attn_func(**_qkv(), softcap=-1.0), ValueError, "softcap"),
    (lambda: flash_attn_func(**_qkv(), softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda: flash_attn_func(**_qkv(), alibi_slopes=torch.ones(3, device=DEVICE)), ValueError, "alibi_slopes"),
    (lambda: flash_attn_func(**_qkv(), alibi_slopes=torch.ones(2, device=DEVICE, dtype=torch.float16)), TypeError,
     "alibi_slopes must be float32"),
    (lambda: flash_attn_func(**_qkv(), attn_bias=torch.zeros(1, 2, 8, 5, device=DEVICE)), ValueError,
     "attn_bias of shape"),
    (lambda: flash_attn_func(**_qkv(), attn_bias=torch.zeros(1, 2, 8, 8, device=DEVICE, dtype=torch.int32)),
     TypeError, "attn_bias has dtype"),
])
def test_bad_input(case, exc, match):
    with pytest.raises(exc, match=match):
        case()


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        flash_attn_func(q, q, q)


def test_decode_shaped_calls_take_the_split_kv_kernel():
    from hf_flash.kernels import decode

    q, k, v = make_qkv(2, 3, 300, 4, 2, 64, torch.float16, requires_grad=False)
    before_fwd, before_dec = kern.launches["fwd"], dict(decode.LAUNCHES)
    out = flash_attn_func(q, k, v, causal=True)
    assert kern.launches["fwd"] == before_fwd, "a decode-shaped call without grad must not run the FA2 kernel"
    assert dict(decode.LAUNCHES) != before_dec
    ref, _ = attention_ref(q, k, v, causal=True)
    ref_lp, _ = attention_ref(q, k, v, causal=True, upcast_dtype=None)
    check_close("out", out, ref, ref_lp)
    # with a gradient to record, the FA2 kernel serves the same call
    q.requires_grad_(True)
    flash_attn_func(q, k, v, causal=True)
    assert kern.launches["fwd"] == before_fwd + 1


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_16k_against_reference(causal):
    q, k, v = make_qkv(1, 16384, 16384, 2, 1, 128, torch.bfloat16)
    compare_with_reference(q, k, v, causal=causal)
