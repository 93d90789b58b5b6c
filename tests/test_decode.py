"""Split-KV decode kernels, flash_attn_with_kvcache and the paged varlen prefill against attention_ref.

On the CPU (Triton interpreter) shapes are small and odd; on CUDA the same tests run bigger, plus a 128k cache
and a CUDA-graph capture + replay of a decode step. Every test checks that the kernel it exercises ran
(``hf_flash.kernels.decode.LAUNCHES``).
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_flash
from hf_flash import flash_attn_varlen_func, flash_attn_with_kvcache
from hf_flash._validate import interpreter_enabled
from hf_flash.kernels import decode as D
from hf_flash.kvcache import num_splits_heuristic, split_kv_attention
from hf_flash.reference import attention_ref, rotary_per_token_ref

CUDA = torch.cuda.is_available()
INTERP = interpreter_enabled()
# CPU cases run through Triton's interpreter; without it (a GPU run) only the CUDA cases run
DEVICES = (["cpu"] if INTERP else []) + (["cuda"] if CUDA else [])
BASE = "cpu" if INTERP or not CUDA else "cuda"  # device of the small, unparametrized tests
pytestmark = pytest.mark.skipif(not (INTERP or CUDA), reason="needs a CUDA GPU or TRITON_INTERPRET=1")
LOW = torch.bfloat16


def _big(device):
    return device == "cuda"


class launched:
    """Context manager: asserts that the named kernels launched inside the block."""

    def __init__(self, *names):
        self.names = names

    def __enter__(self):
        self.before = dict(D.LAUNCHES)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            for n in self.names:
                assert D.LAUNCHES[n] > self.before.get(n, 0), f"kernel {n} did not launch"


def rotary_ref(x, cos, sin, pos, interleaved):
    """Plain-torch rotary of x (batch, seqlen, heads, d) at integer positions pos (batch, seqlen)."""
    rd = 2 * cos.shape[1]
    c = cos.float()[pos].unsqueeze(2)  # (batch, seqlen, 1, rd/2)
    s = sin.float()[pos].unsqueeze(2)
    xf = x.float()
    rot, rest = xf[..., :rd], xf[..., rd:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
        o = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((o, rest), dim=-1).to(x.dtype)


def paginate(k_dense, page_size, gen=None, *more):
    """A paged copy of dense caches (batch, cap, hk, d) with shuffled pages, two spare pages and random data past
    the end: (pages, block_table) for k_dense, then the pages of each of ``more`` under the same table."""
    batch, cap, hk, d = k_dense.shape
    nb = -(-cap // page_size)
    num_pages = batch * nb + 2
    perm = torch.randperm(num_pages, generator=gen)[: batch * nb].view(batch, nb)
    result = []
    for dense in (k_dense,) + more:
        pages = torch.randn(num_pages, page_size, hk, d, generator=gen).to(dense.dtype)
        padded = torch.randn(batch, nb * page_size, hk, d, generator=gen).to(dense.dtype)
        padded[:, :cap] = dense.cpu()
        pages[perm.flatten()] = padded.view(batch * nb, page_size, hk, d)
        result.append(pages.to(dense.device))
    bt = perm.to(torch.int32).to(k_dense.device)
    return (result[0], bt) if not more else (result[0], bt, *result[1:])


def unpaginate(pages, block_table):
    batch, nb = block_table.shape
    return pages[block_table.long().flatten()].view(batch, nb * pages.shape[1], *pages.shape[2:])


def ref_cache_attention(q, k_cache, v_cache, ends, leftpad=None, batch_idx=None, **kw):
    """attention_ref per sequence over cache slots [leftpad[b], ends[b]) of row batch_idx[b]: (out in float64,
    out computed in q's dtype, lse)."""
    outs, outs_lo, lses = [], [], []
    for b in range(q.shape[0]):
        row = int(batch_idx[b]) if batch_idx is not None else b
        lo = int(leftpad[b]) if leftpad is not None else 0
        hi = int(ends[b])
        kb, vb = k_cache[row: row + 1, lo:hi], v_cache[row: row + 1, lo:hi]
        kwb = dict(kw)
        if kw.get("alibi_slopes") is not None and kw["alibi_slopes"].dim() == 2:
            kwb["alibi_slopes"] = kw["alibi_slopes"][b: b + 1]
        if hi <= lo:  # no key at all (attention_ref needs one): zeros and +inf, flash-attn's convention
            o = torch.zeros_like(q[b: b + 1], dtype=torch.float64)
            o_lo = torch.zeros_like(q[b: b + 1])
            lse = torch.full((1, q.shape[2], q.shape[1]), float("inf"), device=q.device)
        else:
            o, _, lse = attention_ref(q[b: b + 1], kb, vb, upcast_dtype=torch.float64, return_lse=True, **kwb)
            o_lo, _ = attention_ref(q[b: b + 1], kb, vb, upcast_dtype=None, **kwb)
        outs.append(o)
        outs_lo.append(o_lo)
        lses.append(lse)
    return torch.cat(outs), torch.cat(outs_lo), torch.cat(lses)


def check_out(out, ref, ref_lo, lse=None, lse_ref=None):
    """The kernel's error vs the float64 reference stays within 2x that of plain PyTorch in the same dtype
    (plus a small floor: the dtype's rounding of the output)."""
    floor = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[out.dtype]
    err = (out.double() - ref.double()).abs().max().item()
    torch_err = (ref_lo.double() - ref.double()).abs().max().item()
    bad = (out.double() - ref.double()).abs() > 2 * torch_err + floor
    assert err <= 2 * torch_err + floor, (f"max error {err:.3g} vs PyTorch's {torch_err:.3g}; {int(bad.sum())} of "
                                          f"{bad.numel()} elements off, first at {bad.nonzero()[:3].tolist()}")
    if lse is not None:
        fin = torch.isfinite(lse_ref)
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), "log-sum-exp +inf rows differ"
        assert (lse[fin].double() - lse_ref[fin].double()).abs().max().item() <= 1e-3 if fin.any() else True


def make_cache(device, batch, cap, hk, d, dtype, gen=None):
    k = torch.randn(batch, cap, hk, d, dtype=dtype, generator=gen).to(device)
    v = torch.randn(batch, cap, hk, d, dtype=dtype, generator=gen).to(device)
    return k, v


# ------------------------------------------------------------------------------------------------ split counts

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_every_split_count(device, group, fused, monkeypatch):
    """Every split count from 1 to more splits than blocks, lengths 1 / odd / not a multiple of the block;
    partials combined by the separate combine kernel (the default) and inside the split kernel (fused)."""
    monkeypatch.setenv("HF_FLASH_DECODE_FUSED", fused)
    combine = "fused_combine" if fused == "1" else "combine"
    g = torch.Generator().manual_seed(group)
    hk, d, dtype = (2, 40, torch.float32) if not _big(device) else (4, 128, LOW)
    cap = 37 if not _big(device) else 1000
    lengths = [1, 37, 20] if not _big(device) else [1, 999, 513]
    block_n = D.decode_config(d, group, torch.device(device))["BLOCK_N"]
    n_blocks = -(-cap // block_n)
    batch = len(lengths)
    q = torch.randn(batch, 1, hk * group, d, dtype=dtype, generator=g).to(device)
    k, v = make_cache(device, batch, cap, hk, d, dtype, g)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, lengths)
    counts = sorted({1, 2, 3, n_blocks, n_blocks + 3}) if not _big(device) else [1, 2, 7, 64, n_blocks + 5]
    for ns in counts:
        with launched("split_kv", *([combine] if ns > 1 else [])):
            out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=ns,
                                               return_softmax_lse=True)
        check_out(out, ref, ref_lo, lse, lse_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlen_q", [2, 5])
def test_seqlen_q_causal_gqa(device, seqlen_q):
    """A few query tokens (speculative decoding) with causal alignment to the end of each sequence's keys."""
    g = torch.Generator().manual_seed(seqlen_q)
    big = _big(device)
    hk, group, d, dtype = (2, 4, 80, LOW) if not big else (8, 4, 128, LOW)
    cap = 45 if not big else 4000
    lengths = [seqlen_q + 1, 45, 3] if not big else [3999, 17, 2048]
    batch = len(lengths)
    q = torch.randn(batch, seqlen_q, hk * group, d, dtype=dtype, generator=g).to(device)
    k, v = make_cache(device, batch, cap, hk, d, dtype, g)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, lengths, causal=True)
    for ns in (1, 3):
        with launched("split_kv"):
            out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, causal=True, num_splits=ns,
                                               return_softmax_lse=True)
        check_out(out, ref, ref_lo, lse, lse_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature", ["window", "softcap", "alibi", "no_key_rows"])
def test_features(device, feature):
    g = torch.Generator().manual_seed(7)
    big = _big(device)
    batch, sq, hk, group, d, dtype = (2, 3, 1, 3, 40, torch.float32) if not big else (2, 4, 8, 4, 128, LOW)
    cap = 50 if not big else 3000
    lengths = [50, 23] if not big else [3000, 1501]
    q = torch.randn(batch, sq, hk * group, d, dtype=dtype, generator=g).to(device)
    k, v = make_cache(device, batch, cap, hk, d, dtype, g)
    kw, api = {}, {}
    if feature == "window":
        kw = api = dict(window_size=(7, 1))
    elif feature == "softcap":
        q = q * 4
        kw = api = dict(softcap=5.0, causal=True)
    elif feature == "alibi":
        slopes = torch.rand(batch, hk * group, generator=g).to(device)
        kw = api = dict(alibi_slopes=slopes, causal=True)
    else:
        # rows that see no key: a window that ends before the first key, and an empty sequence
        kw = api = dict(window_size=(1, 0))
        lengths = [2, 0]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, lengths, **kw)
    for ns in (1, 4):
        with launched("split_kv"):
            out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=ns,
                                               return_softmax_lse=True, **api)
        check_out(out, ref, ref_lo, lse, lse_ref)
        if feature == "no_key_rows":
            assert torch.isinf(lse).any() and (out[1] == 0).all()


# ---------------------------------------------------------------------------------- leftpad, batch idx, paged

@pytest.mark.parametrize("device", DEVICES)
def test_leftpad_and_batch_idx(device):
    g = torch.Generator().manual_seed(3)
    big = _big(device)
    hk, group, d, dtype = (2, 2, 40, torch.float32) if not big else (8, 4, 128, LOW)
    cap = 41 if not big else 5000
    batch = 3
    k, v = make_cache(device, 5, cap, hk, d, dtype, g)
    batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    ends = [41, 30, 9] if not big else [5000, 3001, 77]
    pads = [5, 0, 8] if not big else [1000, 0, 70]
    q = torch.randn(batch, 2, hk * group, d, dtype=dtype, generator=g).to(device)
    seqlens = torch.tensor(ends, dtype=torch.int32, device=device)
    leftpad = torch.tensor(pads, dtype=torch.int32, device=device)
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, ends, pads, batch_idx, causal=True)
    for ns in (1, 3):
        with launched("split_kv"):
            out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
                                               cache_leftpad=leftpad, causal=True, num_splits=ns,
                                               return_softmax_lse=True)
        check_out(out, ref, ref_lo, lse, lse_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [16, 5])
def test_paged_shuffled(device, page_size):
    g = torch.Generator().manual_seed(page_size)
    big = _big(device)
    hk, group, d, dtype = (2, 4, 40, LOW) if not big else (8, 4, 128, LOW)
    if big:
        page_size *= 16
    cap = 43 if not big else 9000
    ends = [43, 1, 26] if not big else [9000, 1, 4097]
    k, v = make_cache(device, 3, cap, hk, d, dtype, g)
    kp, bt, vpages = paginate(k, page_size, g, v)
    q = torch.randn(3, 1, hk * group, d, dtype=dtype, generator=g).to(device)
    seqlens = torch.tensor(ends, dtype=torch.int32, device=device)
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, ends)
    for ns in (1, 2, 5):
        with launched("split_kv"):
            out, lse = flash_attn_with_kvcache(q, kp, vpages, cache_seqlens=seqlens, block_table=bt,
                                               num_splits=ns, return_softmax_lse=True)
        check_out(out, ref, ref_lo, lse, lse_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_prefill_from_paged_cache(device):
    """flash_attn_varlen_func(..., block_table=...): chunked prefill whose K/V come from the paged cache."""
    g = torch.Generator().manual_seed(11)
    big = _big(device)
    hk, group, d, dtype, page = (2, 2, 40, torch.float32, 8) if not big else (8, 4, 128, LOW, 256)
    q_lens = [5, 1, 19] if not big else [300, 1, 1024]
    k_lens = [29, 1, 19] if not big else [3000, 1, 1024]
    cap = max(k_lens)
    k, v = make_cache(device, 3, cap, hk, d, dtype, g)
    kp, bt, vpages = paginate(k, page, g, v)
    qs = [torch.randn(n, hk * group, d, dtype=dtype, generator=g).to(device) for n in q_lens]
    q = torch.cat(qs)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(k_lens).cumsum(0)), dtype=torch.int32, device=device)
    with launched("split_kv"):
        out, lse, _ = flash_attn_varlen_func(q, kp, vpages, cu_q, cu_k, max(q_lens), max(k_lens), causal=True,
                                             block_table=bt, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (hk * group, q.shape[0])
    for b, (qb, kl) in enumerate(zip(qs, k_lens)):
        ref, ref_lo, lse_ref = ref_cache_attention(qb[None], k[b: b + 1], v[b: b + 1], [kl], causal=True)
        s = int(cu_q[b])
        check_out(out[s: s + len(qb)][None], ref, ref_lo, lse[:, s: s + len(qb)][None], lse_ref)


# ---------------------------------------------------------------------------------------- append and rotary

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotary", [None, "interleaved", "halves"])
@pytest.mark.parametrize("paged", [False, True])
def test_append_in_place(device, rotary, paged):
    g = torch.Generator().manual_seed(5)
    big = _big(device)
    batch, hk, group, d, dtype = (2, 2, 2, 40, torch.float32) if not big else (3, 8, 4, 128, LOW)
    cap, page = (30, 7) if not big else (4096, 256)
    new = 3
    causal = rotary != "halves"  # q at one position (non-causal) or per token (causal)
    starts = [4, 27] if not big else [100, 4093, 2000][:batch]
    starts = starts[:batch]
    k, v = make_cache(device, batch, cap, hk, d, dtype, g)
    k_new = torch.randn(batch, new, hk, d, dtype=dtype, generator=g).to(device)
    v_new = torch.randn(batch, new, hk, d, dtype=dtype, generator=g).to(device)
    q = torch.randn(batch, new, hk * group, d, dtype=dtype, generator=g).to(device)
    cos = sin = None
    kw = {}
    rd = 24 if not big else 64
    if rotary:
        ang = torch.rand(cap + 5, rd // 2, generator=g) * 6.28
        cos, sin = ang.cos().to(device), ang.sin().to(device)
        kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "interleaved")
    seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
    # expected cache and query after the append
    pos_k = (torch.tensor(starts).view(-1, 1) + torch.arange(new)).to(device)
    pos_q = pos_k if causal else torch.tensor(starts).view(-1, 1).expand(-1, new).to(device)
    k_exp, v_exp = k.clone(), v.clone()
    k_rot = rotary_ref(k_new, cos, sin, pos_k, rotary == "interleaved") if rotary else k_new
    q_rot = rotary_ref(q, cos, sin, pos_q, rotary == "interleaved") if rotary else q
    for b, s in enumerate(starts):
        k_exp[b, s: s + new] = k_rot[b]
        v_exp[b, s: s + new] = v_new[b]
    if paged:
        kc, bt, vc = paginate(k, page, g, v)
        kw["block_table"] = bt
    else:
        kc, vc = k.clone(), v.clone()
    names = ["append_rotary" if rotary else "append", "split_kv"]
    with launched(*names):
        out = flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, causal=causal,
                                      num_splits=2, **kw)
    k_got = unpaginate(kc, bt)[:, :cap] if paged else kc
    v_got = unpaginate(vc, bt)[:, :cap] if paged else vc
    atol = 0 if dtype == torch.float32 and not rotary else (1e-5 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(k_got, k_exp, atol=atol, rtol=0 if not atol else 1e-2)
    torch.testing.assert_close(v_got, v_exp, atol=0, rtol=0)
    ends = [s + new for s in starts]
    ref, ref_lo, _ = ref_cache_attention(q_rot, k_exp, v_exp, ends, causal=causal)
    check_out(out, ref, ref_lo)


# --------------------------------------------------------------------------------------------- unified max

@pytest.mark.parametrize("device", DEVICES)
def test_unified_max_exact_and_fallback(device):
    g = torch.Generator().manual_seed(9)
    big = _big(device)
    batch, hk, group, d, dtype = (2, 2, 4, 40, torch.float32) if not big else (2, 8, 4, 128, LOW)
    cap = 70 if not big else 20000
    q = torch.randn(batch, 1, hk * group, d, dtype=dtype, generator=g).to(device)
    k, v = make_cache(device, batch, cap, hk, d, dtype, g)
    seqlens = torch.tensor([cap, cap // 2 + 1], dtype=torch.int32, device=device)
    lengths = seqlens.tolist()
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, lengths)
    with launched("split_kv_unified", "combine"):
        out, lse = split_kv_attention(q, k, v, d ** -0.5, False, -1, -1, 0.0, None, cache_seqlens=seqlens,
                                      num_splits=3, unified_max=0.0)
    check_out(out, ref, ref_lo, lse, lse_ref)
    assert D.last_fallback_flags.sum().item() == 0, "no row should have needed the exact path"

    # one query head of one sequence gets scores around +300: exp(300 - phi) overflows, that row falls back
    q2 = q.clone()
    q2[1, 0, 3] = k[1, 5, 3 // group] / k[1, 5, 3 // group].norm() * 300 * math.sqrt(d) / k[1, 5, 3 // group].norm()
    ref, ref_lo, lse_ref = ref_cache_attention(q2, k, v, lengths)
    with launched("split_kv_unified"):
        out, lse = split_kv_attention(q2, k, v, d ** -0.5, False, -1, -1, 0.0, None, cache_seqlens=seqlens,
                                      num_splits=3, unified_max=0.0)
    check_out(out, ref, ref_lo, lse, lse_ref)
    flags = D.last_fallback_flags
    assert flags.sum().item() >= 1 and flags[:, :hk].sum().item() == 0, "only sequence 1's programs fall back"
    # every score far below phi (underflow side) also falls back, still exact
    with launched("split_kv_unified"):
        out, lse = split_kv_attention(q, k, v, d ** -0.5, False, -1, -1, 0.0, None, cache_seqlens=seqlens,
                                      num_splits=1, unified_max=200.0)
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, lengths)
    check_out(out, ref, ref_lo, lse, lse_ref)
    assert D.last_fallback_flags.all()


# -------------------------------------------------------------------------------------- heuristic and guards

def test_num_splits_heuristic():
    # plenty of programs: no split
    assert num_splits_heuristic(32, 32, 131072, 132) == 1
    # batch 1, long cache: enough splits to fill the GPU, none empty
    s = num_splits_heuristic(1, 8, 65536, 132)
    assert 8 <= s <= 128
    nb = 65536 // 64
    per = -(-nb // s)
    assert -(-nb // per) == s
    # short cache: chunks keep at least 256 keys (min_keys_per_split), whatever the block
    assert num_splits_heuristic(1, 8, 256, 132) == 1
    assert num_splits_heuristic(1, 8, 4096, 132, block_n=32) <= 16
    assert num_splits_heuristic(1, 8, 4096, 132, block_n=32, min_keys_per_split=64) > 16
    assert num_splits_heuristic(1, 1, 1, 132) == 1


def test_device_lengths_past_capacity_are_clamped():
    """Lengths on the device beyond the capacity, page indices outside the cache and cache rows out of range
    never make a kernel read or write out of bounds (the host cannot check them without a sync)."""
    g = torch.Generator().manual_seed(2)
    k, v = make_cache(BASE, 2, 20, 1, 16, torch.float32, g)
    q = torch.randn(2, 1, 2, 16, generator=g).to(BASE)
    seqlens = torch.tensor([500, 20], dtype=torch.int32, device=BASE)
    out = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=2)
    ref, ref_lo, _ = ref_cache_attention(q, k, v, [20, 20])
    check_out(out, ref, ref_lo)
    kp, bt = paginate(k, 8, g)
    bt = bt.clone()
    bt[0, 1] = 10_000
    bt[1, 0] = -3
    out = flash_attn_with_kvcache(q, kp, kp.clone(), cache_seqlens=seqlens, block_table=bt)
    assert torch.isfinite(out).all()
    # new tokens past the capacity are not written
    kc, vc = k.clone(), v.clone()
    knew = torch.randn(2, 2, 1, 16, generator=g).to(BASE)
    flash_attn_with_kvcache(q, kc, vc, knew, knew, cache_seqlens=torch.tensor([19, 30], dtype=torch.int32,
                                                                              device=BASE))
    assert torch.equal(kc[0, 19], knew[0, 0]) and torch.equal(kc[1], k[1]) and torch.equal(kc[0, :19], k[0, :19])


def _bad_case(name):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 16, generator=g)
    k, v = make_cache("cpu", 2, 12, 2, 16, torch.float32, g)
    kn = torch.randn(2, 1, 2, 16, generator=g)
    cos = torch.ones(12, 4)
    kp, bt = paginate(k, 4, g)
    cases = {
        "q": (dict(q=q[0]), "q"),
        "k_cache": (dict(k_cache=k.half()), "k_cache"),
        "v_cache": (dict(v_cache=v[:, :5]), "k_cache and v_cache"),
        "heads": (dict(q=torch.randn(2, 1, 3, 16)), "k_cache"),
        "k": (dict(k=kn, v=None, cache_seqlens=3), "k and v"),
        "k_shape": (dict(k=kn[:, :, :1], v=kn[:, :, :1], cache_seqlens=3), "k must have shape"),
        "cache_seqlens_range": (dict(k=kn, v=kn, cache_seqlens=12), "cache_seqlens"),
        "cache_seqlens_neg": (dict(cache_seqlens=-1), "cache_seqlens"),
        "cache_seqlens_dtype": (dict(cache_seqlens=torch.ones(2)), "cache_seqlens"),
        "cache_seqlens_shape": (dict(cache_seqlens=torch.ones(3, dtype=torch.int32)), "cache_seqlens"),
        "cache_seqlens_missing": (dict(k=kn, v=kn), "cache_seqlens"),
        "cache_leftpad": (dict(cache_leftpad=torch.zeros(2, dtype=torch.int64)), "cache_leftpad"),
        "cache_batch_idx": (dict(cache_batch_idx=torch.zeros(1, dtype=torch.int32)), "cache_batch_idx"),
        "rows": (dict(q=torch.randn(3, 1, 4, 16)), "cache_batch_idx"),
        "rotary_cos": (dict(k=kn, v=kn, cache_seqlens=3, rotary_cos=cos, rotary_sin=None), "rotary_sin"),
        "rotary_len": (dict(k=kn, v=kn, cache_seqlens=3, rotary_cos=cos[:5], rotary_sin=cos[:5]), "rotary_cos"),
        "rotary_dim": (dict(k=kn, v=kn, cache_seqlens=3, rotary_cos=torch.ones(12, 9), rotary_sin=torch.ones(12, 9)),
                       "rotary_dim"),
        "rotary_no_k": (dict(cache_seqlens=3, rotary_cos=cos, rotary_sin=cos), "rotary_cos"),
        "num_splits": (dict(num_splits=-1), "num_splits"),
        "window_size": (dict(window_size=(-2, 0)), "window_size"),
        "softcap": (dict(softcap=-1.0), "softcap"),
        "alibi_slopes": (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),
        "block_table_dtype": (dict(k_cache=kp, v_cache=kp, block_table=bt.long()), "block_table"),
        "block_table_shape": (dict(k_cache=kp, v_cache=kp, block_table=bt[:1]), "block_table"),
        "block_table_outside": (dict(k_cache=kp, v_cache=kp, block_table=bt * 0 + kp.shape[0], cache_seqlens=5),
                                "block_table points outside"),
        "block_table_capacity": (dict(k_cache=kp, v_cache=kp, block_table=bt, k=kn, v=kn, cache_seqlens=12),
                                 "block_table"),
        "block_table_batch_idx": (dict(k_cache=kp, v_cache=kp, block_table=bt,
                                       cache_batch_idx=torch.zeros(2, dtype=torch.int32)), "cache_batch_idx"),
    }
    kwargs = dict(q=q, k_cache=k, v_cache=v)
    kwargs.update(cases[name][0])
    kwargs = {n: t.to(BASE) if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()}
    return kwargs, cases[name][1]


BAD = ["q", "k_cache", "v_cache", "heads", "k", "k_shape", "cache_seqlens_range", "cache_seqlens_neg",
       "cache_seqlens_dtype", "cache_seqlens_shape", "cache_seqlens_missing", "cache_leftpad", "cache_batch_idx",
       "rows", "rotary_cos", "rotary_len", "rotary_dim", "rotary_no_k", "num_splits", "window_size", "softcap",
       "alibi_slopes", "block_table_dtype", "block_table_shape", "block_table_outside", "block_table_capacity",
       "block_table_batch_idx"]


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(case):
    kwargs, msg = _bad_case(case)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        flash_attn_with_kvcache(**kwargs)


def test_varlen_paged_bad_inputs():
    q = torch.randn(5, 4, 16, device=BASE)
    k, v = make_cache(BASE, 2, 12, 2, 16, torch.float32)
    kp, bt = paginate(k, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=BASE)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q, kp, kp, cu, cu, 3, 13, block_table=bt)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q, kp, kp, cu, cu, 3, 3, block_table=bt[:1])
    with pytest.raises(ValueError, match="k_cache"):
        flash_attn_varlen_func(q, kp[..., :8], kp[..., :8], cu, cu, 3, 3, block_table=bt)


def test_exported():
    assert hf_flash.flash_attn_with_kvcache is flash_attn_with_kvcache


# ------------------------------------------------------------------------------------------------ CUDA only

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cache_128k_cuda():
    g = torch.Generator().manual_seed(1)
    cap, hk, group, d = 131072, 8, 4, 128
    k, v = make_cache("cuda", 1, cap, hk, d, LOW, g)
    q = torch.randn(1, 1, hk * group, d, dtype=LOW, generator=g).cuda()
    seqlens = torch.tensor([cap - 3], dtype=torch.int32, device="cuda")
    with launched("split_kv", "combine"):
        out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, return_softmax_lse=True)
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, [cap - 3])
    check_out(out, ref, ref_lo, lse, lse_ref)
    with launched("split_kv_unified"):
        out, lse = split_kv_attention(q, k, v, d ** -0.5, False, -1, -1, 0.0, None, cache_seqlens=seqlens,
                                      unified_max=0.0)
    check_out(out, ref, ref_lo, lse, lse_ref)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_decode_step():
    """A decode step (rotary + append + split-KV attention) with lengths on the device, captured once and
    replayed for several steps: the cache grows and the outputs match eager calls."""
    g = torch.Generator().manual_seed(4)
    batch, cap, hk, group, d = 2, 8192, 8, 4, 128
    k, v = make_cache("cuda", batch, cap, hk, d, LOW, g)
    ang = torch.rand(cap, 32, generator=g).cuda() * 6.28
    cos, sin = ang.cos(), ang.sin()
    seqlens = torch.tensor([1000, 5000], dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 1, hk * group, d, dtype=LOW, device="cuda")
    kn = torch.randn(batch, 1, hk, d, dtype=LOW, device="cuda")
    vn = torch.randn(batch, 1, hk, d, dtype=LOW, device="cuda")
    k_eager, v_eager = k.clone(), v.clone()

    def step(kc, vc):
        return flash_attn_with_kvcache(q, kc, vc, kn, vn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                       causal=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(k.clone(), v.clone())  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(k, v)
    lens0 = seqlens.clone()
    for i in range(3):
        q.normal_()
        kn.normal_()
        vn.normal_()
        seqlens.copy_(lens0 + i)
        graph.replay()
        expect = step(k_eager, v_eager)
        torch.cuda.synchronize()
        torch.testing.assert_close(out_static, expect, atol=0, rtol=0)
    torch.testing.assert_close(k, k_eager, atol=0, rtol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_direct_launch_reuses_the_compiled_kernel_and_respects_its_specialization():
    """The second identical call launches the compiled kernel directly (no JITFunction.run); a query whose data
    pointer is not 16-byte aligned (Triton specializes on alignment) takes the normal path, and every result
    matches the reference."""
    from hf_flash.kernels import _launch

    g = torch.Generator().manual_seed(3)
    hk, group, d, cap = 8, 4, 128, 3000
    k, v = make_cache("cuda", 2, cap, hk, d, LOW, g)
    q = torch.randn(2, 1, hk * group, d, dtype=LOW, generator=g).cuda()
    seqlens = torch.tensor([cap, 1234], dtype=torch.int32, device="cuda")
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, [cap, 1234])
    flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    before = dict(_launch.STATS)
    out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, return_softmax_lse=True)
    assert _launch.STATS["direct"] > before["direct"] and _launch.STATS["normal"] == before["normal"]
    check_out(out, ref, ref_lo, lse, lse_ref)
    # the same values at a 2-byte offset: a different specialization, so the normal path (and a new compile)
    buf = torch.empty(q.numel() + 1, dtype=LOW, device="cuda")
    q_odd = buf[1:].view_as(q)
    q_odd.copy_(q)
    assert q_odd.data_ptr() % 16 != 0
    before = dict(_launch.STATS)
    out, lse = flash_attn_with_kvcache(q_odd, k, v, cache_seqlens=seqlens, return_softmax_lse=True)
    assert _launch.STATS["normal"] > before["normal"]
    check_out(out, ref, ref_lo, lse, lse_ref)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper (sm_90+) GPU")
@pytest.mark.parametrize("pdl", ["default", "1", "0"])
def test_combine_as_programmatic_dependent_launch(pdl, monkeypatch):
    """On Hopper the combine kernel is launched as a programmatic dependent launch of the split kernel (it starts
    early and waits for the partials with griddepcontrol.wait) with HF_FLASH_DECODE_PDL=1, not by default or with
    0. Results match the reference for several split counts, eagerly and replayed from a CUDA graph. (After the
    Triton split kernel: the Hopper Gluon kernel's combine is never a PDL launch, test_gluon_decode.py.)"""
    monkeypatch.setenv("HF_FLASH_GLUON_DECODE", "0")
    if pdl == "default":
        monkeypatch.delenv("HF_FLASH_DECODE_PDL", raising=False)
    else:
        monkeypatch.setenv("HF_FLASH_DECODE_PDL", pdl)
    g = torch.Generator().manual_seed(11)
    hk, group, d, cap = 8, 4, 128, 9000
    lengths = [cap, 4097, 1]
    k, v = make_cache("cuda", 3, cap, hk, d, LOW, g)
    q = torch.randn(3, 1, hk * group, d, dtype=LOW, generator=g).cuda()
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    ref, ref_lo, lse_ref = ref_cache_attention(q, k, v, lengths)
    for ns in (0, 5, 64):
        before = D.LAUNCHES["combine_pdl"]
        with launched("split_kv", "combine"):
            out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=ns,
                                               return_softmax_lse=True)
        assert (D.LAUNCHES["combine_pdl"] > before) == (pdl == "1")
        check_out(out, ref, ref_lo, lse, lse_ref)
    flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=7)  # compiles outside the capture
    torch.cuda.synchronize()
    before = D.LAUNCHES["combine_pdl"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=7)
    assert (D.LAUNCHES["combine_pdl"] > before) == (pdl == "1")
    for i in range(3):
        q.normal_()
        graph.replay()
        expect = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=7)
        torch.cuda.synchronize()
        torch.testing.assert_close(out_static, expect, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_plan_replays_for_other_layers(device):
    """The check-free decode entry records a plan at the first call of a signature and replays it for the
    next calls (other layers' caches): outputs match the reference for every call, the replay is counted, a new
    signature (a longer cache) records a new plan, and a plan keeps no reference to the caches it saw."""
    import gc
    import weakref

    from hf_flash import kvcache

    g = torch.Generator().manual_seed(21)
    big = _big(device)
    hk, group, d, dtype = (2, 4, 40, torch.float32) if not big else (8, 4, 128, LOW)
    cap = 70 if not big else 5000
    lengths = [cap, 33] if not big else [cap, 4097]
    batch = len(lengths)
    kvcache._PLANS.clear()
    layers = []
    for _ in range(3):
        q = torch.randn(batch, 1, hk * group, d, dtype=dtype, generator=g).to(device)
        k, v = make_cache(device, batch, cap, hk, d, dtype, g)
        layers.append((q, k, v))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    leftpad = torch.tensor([0, 3], dtype=torch.int32, device=device)
    for i, (q, k, v) in enumerate(layers):
        before = D.LAUNCHES["plan"]
        with launched("split_kv"):
            out = kvcache.decode_attention(q, k, v, seqlens, leftpad, d ** -0.5, True, (-1, -1), 0.0)
        assert D.LAUNCHES["plan"] - before == (0 if i == 0 else 1)
        ref, ref_lo, _ = ref_cache_attention(q, k, v, lengths, leftpad=[0, 3])
        check_out(out, ref, ref_lo)
    assert len(kvcache._PLANS) == 1
    # a longer cache is another signature: a second plan
    q, k, v = layers[0]
    k2, v2 = torch.cat([k, k[:, :5]], 1), torch.cat([v, v[:, :5]], 1)
    kvcache.decode_attention(q, k2, v2, seqlens, leftpad, d ** -0.5, True, (-1, -1), 0.0)
    assert len(kvcache._PLANS) == 2
    ref_k = weakref.ref(k2)
    del k2, v2, layers, k, v
    gc.collect()
    assert ref_k() is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [24, 80])
def test_append_with_per_token_rotary_rows(device, d):
    """``append_kv(rope_per_token=True)``: cos/sin are the (batch, tokens, head dim) rows a transformers model
    computed (here random, halves not tied, so the formula itself is checked): q is rotated in place and the new
    K (rotated) / V land at slot cache_seqlens[b] + i, as ``x * cos + rotate_half(x) * sin``; other slots are
    untouched."""
    from hf_flash.kernels import decode as dec

    g = torch.Generator().manual_seed(31)
    batch, n, hk, group, cap = 2, 3, 2, 2, 19
    q = torch.randn(batch, n, hk * group, d, generator=g)
    k_new, v_new = torch.randn(batch, n, hk, d, generator=g), torch.randn(batch, n, hk, d, generator=g)
    cos, sin = torch.randn(batch, n, d, generator=g), torch.randn(batch, n, d, generator=g)
    k_cache, v_cache = torch.randn(batch, cap, hk, d, generator=g), torch.randn(batch, cap, hk, d, generator=g)
    starts = [5, 11]

    want_q, want_k = rotary_per_token_ref(q, cos, sin), rotary_per_token_ref(k_new, cos, sin)
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    for b, s in enumerate(starts):
        want_kc[b, s:s + n], want_vc[b, s:s + n] = want_k[b], v_new[b]
    q_d, k_c, v_c = q.to(device), k_cache.to(device), v_cache.to(device)
    before = dec.LAUNCHES["append_rotary"]
    out = dec.append_kv(q_d, k_new.to(device), v_new.to(device), k_c, v_c,
                        torch.tensor(starts, dtype=torch.int32, device=device), rotary_cos=cos.to(device),
                        rotary_sin=sin.to(device), rotary_interleaved=False, rope_per_token=True, q_out=q_d)
    assert dec.LAUNCHES["append_rotary"] - before == 1
    assert out is q_d  # rotated in place
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cpu(), want_q, **tol)
    torch.testing.assert_close(k_c.cpu(), want_kc, **tol)
    torch.testing.assert_close(v_c.cpu(), want_vc, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_plan_takes_heads_first_tensors(device):
    """transformers' attention functions get (batch, heads, seqlen, dim) views; ``heads_first=True`` hands them to
    the decode entry as they are: the first call records a plan (its own signature, apart from the flash-layout
    one), the next replays it on another layer's tensors, and both match the reference."""
    from hf_flash import kvcache

    g = torch.Generator().manual_seed(22)
    big = _big(device)
    hk, group, d, dtype = (2, 3, 48, torch.float32) if not big else (8, 4, 128, LOW)
    cap = 45 if not big else 4100
    lengths = [cap, 20] if not big else [cap, 3001]
    batch = len(lengths)
    kvcache._PLANS.clear()
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    for i in range(2):
        q = torch.randn(batch, 1, hk * group, d, dtype=dtype, generator=g).to(device)
        k, v = make_cache(device, batch, cap, hk, d, dtype, g)
        # a transformers cache: (batch, kv heads, seqlen, dim) contiguous
        k_hf, v_hf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        before = D.LAUNCHES["plan"]
        with launched("split_kv"):
            out = kvcache.decode_attention(q.transpose(1, 2), k_hf, v_hf, seqlens, None, d ** -0.5, True, (-1, -1),
                                           0.0, heads_first=True)
        assert out.shape == q.shape
        assert D.LAUNCHES["plan"] - before == i
        ref, ref_lo, _ = ref_cache_attention(q, k, v, lengths)
        check_out(out, ref, ref_lo)
    assert len(kvcache._PLANS) == 1
    # the same tensors in the flash layout are another signature, and the same result
    out2 = kvcache.decode_attention(q, k_hf.transpose(1, 2), v_hf.transpose(1, 2), seqlens, None, d ** -0.5, True,
                                    (-1, -1), 0.0)
    assert len(kvcache._PLANS) == 2
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
