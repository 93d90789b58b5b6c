"""The Hopper (Gluon, TMA) split-KV decode kernel (kernels/gluon_decode.py) against attention_ref, its launch
counted: GQA groups 1 / 4 / 7 / 8, lengths on the device off every block, left padding, cache rows, an empty
sequence, one split and more splits than chunks of keys, seqlen_q > 1 under the causal mask up to the 64 rows of its
tile, both 16-bit dtypes, a CUDA-graph replay; the calls it leaves to the Triton kernel (decode plans among them);
and, on CPU, the fallback when it does not compile. Gluon has no CPU interpreter: CI compiles the kernel for sm_90
(test_compile_sm90.py)."""

from __future__ import annotations

import pytest
import torch

from hf_flash import flash_attn_with_kvcache
from hf_flash.kernels import decode as D
from test_decode import check_out, launched, make_cache, ref_cache_attention

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of capability 9.0 (H100 / H200)")

# (batch, seqlen_q, heads, kv heads, capacity, key lengths, left padding, cache rows, causal, num_splits)
CASES = [
    (1, 1, 32, 8, 4096, [4096], None, None, False, 0),
    (1, 1, 32, 8, 16384, [16001], None, None, False, 0),
    (1, 1, 8, 8, 3001, [2999], None, None, False, 0),
    (3, 1, 28, 4, 5000, [1, 4097, 3333], [0, 100, 1000], None, False, 0),
    (2, 1, 32, 8, 2048, [2048, 777], None, [3, 0], False, 0),
    (2, 4, 32, 8, 1500, [1500, 1111], [5, 0], None, True, 0),
    (1, 8, 64, 8, 4100, [4100], None, None, True, 0),
    (2, 3, 14, 2, 700, [700, 0], None, None, True, 1),
    (2, 1, 32, 8, 9000, [9000, 64], [0, 64], None, False, 40),
]


def _ids(c):
    return "b%d-q%d-h%d/%d-cap%d%s%s%s-s%d" % (c[0], c[1], c[2], c[3], c[4], "-leftpad" if c[6] else "",
                                              "-rows" if c[7] else "", "-causal" if c[8] else "", c[9])


def _run_case(case, dtype, **kw):
    b, sq, h, hk, cap, lens, lp, rows, causal, splits = case
    gen = torch.Generator().manual_seed(cap + sq * 7 + h)
    n_cache = max(rows) + 1 if rows else b
    q = torch.randn(b, sq, h, 128, dtype=dtype, generator=gen).cuda()
    k, v = make_cache("cuda", n_cache, cap, hk, 128, dtype, gen)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    leftpad = torch.tensor(lp, dtype=torch.int32, device="cuda") if lp else None
    batch_idx = torch.tensor(rows, dtype=torch.int32, device="cuda") if rows else None
    out, lse = D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=seqlens, leftpad=leftpad,
                                  batch_idx=batch_idx, num_splits=splits, window_right=0 if causal else -1, **kw)
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, seqlens, leftpad, batch_idx, causal=causal)
    check_out(out, ref, ref_lo, lse, lse_ref)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gluon_decode_matches_reference(case, dtype):
    before = D.LAUNCHES["combine"]
    with launched("split_kv_gluon"):
        _run_case(case, dtype)
    assert D.LAUNCHES["combine"] > before or case[9] == 1, "the case did not split the keys"


@needs_hopper
def test_gluon_decode_with_pdl_requested_launches_the_combine_normally(monkeypatch):
    """HF_FLASH_DECODE_PDL=1 asks for the combine as a programmatic dependent launch: measured slower after the
    Gluon kernel, so it follows that kernel as a normal launch (and still as a PDL one after the Triton kernel)."""
    monkeypatch.setenv("HF_FLASH_DECODE_PDL", "1")
    before = D.LAUNCHES["combine_pdl"]
    with launched("split_kv_gluon", "combine"):
        _run_case(CASES[3], torch.bfloat16)
    assert D.LAUNCHES["combine_pdl"] == before


@needs_hopper
def test_gluon_decode_through_flash_attn_with_kvcache_and_a_cuda_graph():
    """A decode step (append + rotary-free attention over the updated cache) captured once and replayed after the
    device lengths moved: the Gluon kernel runs inside the graph and reads the lengths on the device."""
    gen = torch.Generator().manual_seed(5)
    b, h, hk, cap = 2, 32, 8, 6000
    k_cache, v_cache = make_cache("cuda", b, cap, hk, 128, torch.bfloat16, gen)
    q = torch.randn(b, 1, h, 128, dtype=torch.bfloat16, generator=gen).cuda()
    k_new = torch.randn(b, 1, hk, 128, dtype=torch.bfloat16, generator=gen).cuda()
    v_new = torch.randn(b, 1, hk, 128, dtype=torch.bfloat16, generator=gen).cuda()
    lens = torch.tensor([3000, 4711], dtype=torch.int32, device="cuda")
    step = lambda: flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens)  # noqa: E731
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with launched("split_kv_gluon"):
        with torch.cuda.graph(graph):
            out = step()
    lens.copy_(torch.tensor([1234, 5999], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    ends = lens + 1
    ref, ref_lo, _ = ref_cache_attention(q, k_cache, v_cache, ends)
    check_out(out, ref, ref_lo)


@needs_hopper
def test_a_decode_plan_keeps_the_triton_kernel():
    """A plan (a model's eager per-layer decode call) records and replays the Triton kernels, whose direct
    replays cost less host time than the Gluon kernel's launch (kernels/decode.py)."""
    gen = torch.Generator().manual_seed(9)
    layers = [make_cache("cuda", 1, 4096, 8, 128, torch.bfloat16, gen) for _ in range(2)]
    qs = [torch.randn(1, 1, 32, 128, dtype=torch.bfloat16, generator=gen).cuda() for _ in layers]
    lens = torch.tensor([4000], dtype=torch.int32, device="cuda")
    before = D.LAUNCHES["split_kv_gluon"]
    out0, plan = D.plan_decode(qs[0], *layers[0], softmax_scale=128 ** -0.5, window_left=-1, window_right=-1,
                               softcap=0.0, seqlens_k=lens)
    assert plan is not None
    with launched("split_kv", "plan"):
        out1 = plan(qs[1], *layers[1], seqlens=lens)
    assert D.LAUNCHES["split_kv_gluon"] == before
    for q, (k, v), out in zip(qs, layers, (out0, out1)):
        ref, ref_lo, _ = ref_cache_attention(q, k, v, lens)
        check_out(out, ref, ref_lo)


@needs_hopper
@pytest.mark.parametrize("what", ["headdim64", "paged", "window", "softcap", "rows128", "unified"])
def test_other_decode_calls_take_the_triton_kernel(what):
    gen = torch.Generator().manual_seed(3)
    d = 64 if what == "headdim64" else 128
    sq = 16 if what == "rows128" else 1
    q = torch.randn(1, sq, 32, d, dtype=torch.bfloat16, generator=gen).cuda()
    k, v = make_cache("cuda", 1, 1024, 4 if what == "rows128" else 8, d, torch.bfloat16, gen)
    lens = torch.tensor([1000], dtype=torch.int32, device="cuda")
    kw = dict(softmax_scale=d ** -0.5, seqlens_k=lens)
    if what == "paged":
        kw["block_table"] = torch.arange(4, dtype=torch.int32, device="cuda").view(1, 4)
        k, v = k.view(4, 256, 8, d), v.view(4, 256, 8, d)
    elif what == "window":
        kw.update(window_left=100, window_right=0)
    elif what == "softcap":
        kw["softcap"] = 30.0
    elif what == "rows128":
        kw["window_right"] = 0
    elif what == "unified":
        kw["unified_max"] = 0.0
    before = D.LAUNCHES["split_kv_gluon"]
    D.split_kv_forward(q, k, v, **kw)
    assert D.LAUNCHES["split_kv_gluon"] == before, f"{what}: the Gluon kernel took a call it does not support"


def test_a_gluon_decode_kernel_that_does_not_compile_falls_back_with_a_warning(monkeypatch):
    """Gluon's API moves between Triton releases: a kernel that does not compile here warns once, and this call
    and the next take the Triton kernel (here the interpreter's, or the GPU's)."""
    from triton.compiler.errors import CompilationError

    class Fake:
        calls = 0

        @staticmethod
        def supported(*a, **k):
            return True

        @staticmethod
        def config():
            return dict(BLOCK_N=32, stages=2, programs_per_sm=1, min_keys=64)

        @classmethod
        def split_forward(cls, *a, **k):
            cls.calls += 1
            raise CompilationError("", None, "a Gluon API this kernel does not match")

    broken: list = []
    monkeypatch.setattr(D, "_GLUON_DECODE_BROKEN", broken)
    monkeypatch.setattr(D, "_gluon_decode", lambda: None if broken else Fake)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = (2, 1, 8, 2, 300, [300, 123], None, None, False, 3)
    if device == "cpu":
        from hf_flash._validate import interpreter_enabled

        if not interpreter_enabled():
            pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 8, 128, dtype=torch.float32 if device == "cpu" else torch.bfloat16, generator=gen)
    k, v = make_cache("cpu", 2, 300, 2, 128, q.dtype, gen)
    q, k, v = q.to(device), k.to(device), v.to(device)
    lens = torch.tensor(case[5], dtype=torch.int32, device=device)
    with pytest.warns(RuntimeWarning, match="did not compile"):
        with launched("split_kv"):
            out, _ = D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens, num_splits=3)
    out2, _ = D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5, seqlens_k=lens, num_splits=3)
    assert Fake.calls == 1, "the broken kernel was tried again"
    ref, ref_lo, _ = ref_cache_attention(q, k, v, lens)
    check_out(out, ref, ref_lo)
    check_out(out2, ref, ref_lo)
