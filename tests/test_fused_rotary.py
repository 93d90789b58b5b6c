"""The rotary kernel (kernels/rotary.py) against transformers' formula in float64, forward and gradient, and the
Llama training path that uses it (on by default, HF_FLASH_FUSED_ROTARY=0 turns it off; patches/llama.py): the same
losses and gradients as the class forward, with the kernels counted; calls with a cache or a sliding window keep
the class forward."""

from __future__ import annotations

import pytest
import torch

from hf_flash.kernels import rotary
from hf_flash.reference import rotary_per_token_ref
from conftest import DEVICE, llama_pair

DTYPES = [torch.float32, torch.bfloat16]


def _reference(x, cos, sin):
    return rotary_per_token_ref(x.double(), cos.double(), sin.double())


def _tables(batch, seqlen, dim, seed, halves_equal=True):
    g = torch.Generator().manual_seed(seed)
    if halves_equal:  # transformers' Llama tables: cat((freqs, freqs))
        freqs = torch.rand(batch, seqlen, dim // 2, generator=g) * 6.0
        ang = torch.cat((freqs, freqs), dim=-1)
        return ang.cos().to(DEVICE), ang.sin().to(DEVICE)
    return (torch.randn(batch, seqlen, dim, generator=g).to(DEVICE) for _ in range(2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 3, 24), (1, 70, 8, 80), (3, 5, 2, 128)], ids=str)
@pytest.mark.parametrize("halves_equal", [True, False], ids=["llama-tables", "any-tables"])
def test_rotary_and_its_gradient_match_the_formula(shape, dtype, halves_equal):
    b, s, h, d = shape
    g = torch.Generator().manual_seed(s)
    # x as a slice of a wider projection (strided rows), as the q / k views of a fused projection are
    wide = torch.randn(b, s, h * d + 16, generator=g).to(DEVICE, dtype)
    x = wide[..., : h * d].view(b, s, h, d).requires_grad_(False).clone().requires_grad_(True)
    cos, sin = _tables(b, s, d, seed=d, halves_equal=halves_equal)
    cos, sin = cos.to(dtype), sin.to(dtype)
    before = dict(rotary.launches)
    y = rotary.apply_rotary(x, cos, sin)
    ref = _reference(x.detach(), cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), ref, atol=tol * max(ref.abs().max().item(), 1.0), rtol=0)
    dy = torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(_reference(xr, cos, sin), xr, dy.double())
    torch.testing.assert_close(dx.double(), want, atol=tol * max(want.abs().max().item(), 1.0), rtol=0)
    assert rotary.launches["rotary"] == before["rotary"] + 1
    assert rotary.launches["rotary_inverse"] == before["rotary_inverse"] + 1


def test_rotary_broadcasts_a_batch_of_one_table_and_rejects_bad_shapes():
    x = torch.randn(3, 9, 2, 16, device=DEVICE)
    cos, sin = _tables(1, 9, 16, seed=1)
    torch.testing.assert_close(rotary.rotate(x, cos, sin).double(), _reference(x, cos, sin), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rotate: x"):
        rotary.rotate(x, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="even head dim"):
        rotary.rotate(torch.randn(3, 9, 2, 15, device=DEVICE), cos[..., :15], sin[..., :15])


SIZES = dict(hidden=64, layers=2, heads=4, kv=2, head_dim=16, positions=128)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_llama_training_step_with_fused_rotary_matches_the_class_forward(monkeypatch):
    """Two forward + backward passes of the same batch through one tiny Llama, the class forward's rotary then the
    fused one: equal losses and gradients; the fused pass launched the rotary kernel and its inverse twice per
    layer (q and k)."""
    fl, _ = llama_pair(SIZES, vocab=97, seed=3, intermediate_size=96)
    fl.train()
    ids = torch.randint(3, 97, (2, 41), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("HF_FLASH_FUSED_ROTARY", flag)
        fl.zero_grad()
        before = dict(rotary.launches)
        loss = fl(ids, labels=ids, use_cache=False).loss
        loss.backward()
        launched = (rotary.launches["rotary"] - before["rotary"],
                    rotary.launches["rotary_inverse"] - before["rotary_inverse"])
        results.append((loss.item(), _grads(fl), launched))
    (l0, g0, n0), (l1, g1, n1) = results
    assert n0 == (0, 0) and n1 == (2 * SIZES["layers"], 2 * SIZES["layers"])
    assert abs(l0 - l1) < 1e-5
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_calls_with_a_cache_keep_the_class_forward(monkeypatch):
    monkeypatch.setenv("HF_FLASH_FUSED_ROTARY", "1")
    fl, sdpa = llama_pair(SIZES, vocab=97, seed=4, intermediate_size=96)
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        fl(ids)  # first call: hf_flash sets the modules up
        before = rotary.launches["rotary"]
        out = fl(ids, use_cache=True).logits
        assert rotary.launches["rotary"] == before, "a prefill with a cache took the no-cache path"
        out_nc = fl(ids, use_cache=False).logits
        assert rotary.launches["rotary"] == before + 2 * SIZES["layers"]
        ref = sdpa(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out_nc, ref, atol=2e-4, rtol=1e-4)


def test_gradient_checkpointing_recomputes_the_path_of_its_forward(monkeypatch):
    """A model set up lazily during its first checkpointed training step: that step's forward ran the class path
    (the fused forward is installed inside it), so its recomputation must too, or torch's checkpoint finds other
    saved tensors and raises. Later steps rotate with the kernel in the forward and in the recomputation. The
    gradients of both steps equal "sdpa"'s."""
    monkeypatch.setenv("HF_FLASH_FUSED_ROTARY", "1")
    fl, sdpa = llama_pair(SIZES, vocab=97, seed=5, intermediate_size=96)
    for m in (fl, sdpa):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 97, (2, 33), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    counts = []
    for _ in range(2):
        fl.zero_grad(), sdpa.zero_grad()
        before = rotary.launches["rotary"]
        lf = fl(ids, labels=ids, use_cache=False).loss
        lf.backward()
        counts.append(rotary.launches["rotary"] - before)
        ls = sdpa(ids, labels=ids, use_cache=False).loss
        ls.backward()
        assert abs(lf.item() - ls.item()) < 1e-5
        gs = _grads(sdpa)
        for name, g in _grads(fl).items():
            torch.testing.assert_close(g, gs[name], atol=1e-5, rtol=1e-4, msg=name)
    # step 1: class path in the forward and its recomputation; step 2: q and k per layer, forward + recomputation
    assert counts == [0, 2 * 2 * SIZES["layers"]]
