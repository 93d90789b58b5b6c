"""Shared fixtures: the device the kernels run on, and tolerance checks that scale themselves.

On a machine without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1 must be set
before triton is imported; .ci/run and the README's test command set it). Tests marked ``gpu`` need CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

if not ON_GPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise pytest.UsageError("No CUDA device: run the tests with TRITON_INTERPRET=1 (Triton's CPU interpreter)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (larger shapes)")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Absolute floor of the error allowed on top of the low-precision baseline, per dtype.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_close(name, got, ref, ref_lowp, factor=2.0, dtype=None):
    """Assert ``got`` is as close to the float32/64 ``ref`` as ``factor`` times what plain PyTorch in the same
    low precision (``ref_lowp``) gets, plus a small dtype floor; report where it is off if not."""
    dtype = dtype or got.dtype
    got, ref, ref_lowp = got.double(), ref.double(), ref_lowp.double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values"
    scale = max(ref.abs().max().item(), 1.0)
    base = (ref_lowp - ref).abs().max().item()
    tol = factor * base + ATOL[dtype] * scale
    err = (got - ref).abs()
    worst = err.max().item()
    if worst > tol:
        bad = err > tol
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(f"{name}: max error {worst:.3g} > tol {tol:.3g} (baseline {base:.3g}); "
                             f"{int(bad.sum())}/{err.numel()} elements off, first at {idx}: got "
                             f"{got[idx].item():.6g}, ref {ref[idx].item():.6g}")
    return worst


def subprocess_env(env: dict) -> dict:
    """``env`` with the directory hf_flash was imported from first on PYTHONPATH, so that a script started in a
    subprocess (``python examples/x.py``, a distributed worker) imports the same hf_flash: the pip-installed
    one in CI, the checkout itself where the package is not installed (the GPU machine runs from a copy of the
    working tree)."""
    import hf_flash

    root = os.path.dirname(os.path.dirname(os.path.abspath(hf_flash.__file__)))
    old = env.get("PYTHONPATH", "")
    return dict(env, PYTHONPATH=root + (os.pathsep + old if old else ""))


def left_padded_prompt(batch: int, length: int, vocab: int, step: int, first: int):
    """(input_ids, attention_mask) of random tokens in [3, vocab) on DEVICE, seeded by ``batch``; row b > 0 is
    left-padded (token 0, mask 0) over its first ``step * b + first`` positions, so every row pads differently."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : step * b + first] = 0
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


def llama_pair(sizes: dict, vocab: int, seed: int, intermediate_size: int, dtype=torch.float32):
    """(flashtri model, sdpa model) of one tiny random Llama from its config (``sizes``: hidden, layers, heads,
    kv, head_dim, positions), the same weights in both, on DEVICE in ``dtype``, eval mode. Weight matrices are
    scaled by 3 for sharper logits than the default init, so greedy choices are not near-ties."""
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=sizes["hidden"], intermediate_size=intermediate_size,
                         num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                         num_key_value_heads=sizes["kv"], head_dim=sizes["head_dim"],
                         max_position_embeddings=sizes["positions"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    fl = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="flashtri")
    with torch.no_grad():
        for p in fl.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    sdpa.load_state_dict(fl.state_dict())
    return fl.to(DEVICE, dtype).eval(), sdpa.to(DEVICE, dtype).eval()
