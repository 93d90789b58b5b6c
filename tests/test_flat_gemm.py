"""Flat GEMM (kernels/flat_gemm.py) and its use in Llama-family decode steps (patches/flat.py).

Kernel tests compare against float64 PyTorch on random data with odd sizes (K not a multiple of the block, N not
a multiple of the tile), 1 to 16 rows, bias, the fused gate/up, every dtype; the tolerance is twice the error of
torch's own linear in the same dtype. Model tests count the kernel's launches, not only the tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU, check_close, llama_pair
import hf_flash  # noqa: F401 - registers "flashtri"
from hf_flash.kernels import flat_gemm as kfg
from hf_flash.patches import flat, graphs

SHAPES = [(37, 100), (64, 96), (5, 333)] + ([(1024, 4096), (3000, 1111)] if ON_GPU else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _data(m, n, k, dtype, bias, gated, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.25).to(DEVICE, dtype)  # noqa: E731
    return mk(m, k), mk(n, k), (mk(n) if bias else None), (mk(n, k) if gated else None)


def _torch(x, w, b, u):
    y = F.linear(x, w, b)
    return F.silu(y) * F.linear(x, u) if u is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bias,gated", [(False, False), (True, False), (False, True), (True, True)])
def test_flat_linear_matches_float64(m, n, k, dtype, bias, gated):
    x, w, b, u = _data(m, n, k, dtype, bias, gated, seed=m * 7 + n)
    before = dict(kfg.LAUNCHES)
    got = kfg.flat_linear(x, w, b, up_weight=u)
    assert kfg.LAUNCHES["flat_gemm_gated" if gated else "flat_gemm"] == before["flat_gemm_gated" if gated
                                                                               else "flat_gemm"] + 1
    ref = _torch(*(t.double() if t is not None else None for t in (x, w, b, u)))
    check_close(f"flat_linear m={m} n={n} k={k}", got, ref, _torch(x, w, b, u))


def test_flat_linear_empty_sizes():
    """No output features: an empty result, no launch; no input features: the bias (or zeros)."""
    x = torch.randn(2, 8, device=DEVICE)
    assert kfg.flat_linear(x, torch.randn(0, 8, device=DEVICE)).shape == (2, 0)
    b = torch.randn(5, device=DEVICE)
    got = kfg.flat_linear(torch.randn(1, 0, device=DEVICE), torch.randn(5, 0, device=DEVICE), b)
    torch.testing.assert_close(got, b[None])


def test_flat_linear_writes_into_out_and_takes_strided_rows():
    x, w, b, _ = _data(8, 50, 70, torch.float32, True, False, seed=3)
    big = torch.randn(8, 90, device=DEVICE)
    big[:, :70] = x
    out = torch.full((8, 60), 7.0, device=DEVICE)[:, 5:55]  # rows of a wider buffer
    got = kfg.flat_linear(big[:, :70], w, b, out=out)
    assert got is out
    ref = F.linear(x.double(), w.double(), b.double())
    check_close("out=", out, ref, F.linear(x, w, b))


@pytest.mark.parametrize("case,match", [
    ("rows", "x has 17 rows; accepted: 1 to 16"),
    ("dtype", "weight has dtype torch.float16, x has torch.float32"),
    ("int", "x has dtype torch.int32; accepted: float16, bfloat16, float32"),
    ("k", "weight must be \\(out_features, 64\\)"),
    ("stride", "weight must have unit stride"),
    ("bias", "bias has shape \\(9,\\), expected \\(10,\\)"),
    ("up", "up_weight has shape \\(11, 64\\), weight \\(10, 64\\)"),
    ("out", "out must be a \\(2, 10\\) torch.float32 tensor"),
])
def test_flat_linear_rejects_bad_input(case, match):
    x, w = torch.randn(2, 64, device=DEVICE), torch.randn(10, 64, device=DEVICE)
    kw = {}
    if case == "rows":
        x = torch.randn(17, 64, device=DEVICE)
    elif case == "dtype":
        w = w.half()
    elif case == "int":
        x, w = x.int(), w.int()
    elif case == "k":
        w = torch.randn(10, 65, device=DEVICE)
    elif case == "stride":
        w = torch.randn(64, 10, device=DEVICE).t()
    elif case == "bias":
        kw["bias"] = torch.randn(9, device=DEVICE)
    elif case == "up":
        kw["up_weight"] = torch.randn(11, 64, device=DEVICE)
    else:
        kw["out"] = torch.empty(2, 11, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        kfg.flat_linear(x, w, **kw)


def test_custom_op_passes_opcheck():
    """The op's fake implementation and schema agree with the real one (what torch.compile relies on)."""
    x, w, b, u = _data(1, 40, 72, torch.float32, True, True, seed=9)
    torch.library.opcheck(flat.flat_linear_op, (x.view(1, 1, 72), w, b, None))
    torch.library.opcheck(flat.flat_linear_op, (x.view(1, 1, 72), w, None, u))


# ---------------------------------------------------------------------------------------------- model patches

S = (dict(hidden=512, layers=2, heads=8, kv=2, head_dim=128, prompt=300, new=10, positions=4096) if ON_GPU else
     dict(hidden=64, layers=2, heads=4, kv=2, head_dim=16, prompt=30, new=5, positions=128))
VOCAB = 101
# the flat path takes float16 / bfloat16 on CUDA; on the CPU the tests switch it on for float32 models
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


@pytest.fixture(autouse=True)
def _flat_on(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv(flat.ENV, "1")
        monkeypatch.setenv(graphs.ENV, "emulate")


@pytest.fixture(scope="module")
def models():
    return llama_pair(S, VOCAB, seed=11, intermediate_size=3 * S["hidden"] - 8, dtype=DTYPE)


KW = dict(max_new_tokens=S["new"], min_new_tokens=S["new"], do_sample=False, pad_token_id=0, output_logits=True,
          return_dict_in_generate=True)


def _ids():
    g = torch.Generator().manual_seed(4)
    return torch.randint(3, VOCAB, (1, S["prompt"]), generator=g).to(DEVICE)


def _logits_close(got, want):
    """float32 on the CPU: the same tokens, logits to rounding. bf16 on the GPU: every step's logits within bf16
    tolerance (a near-tie may still pick another token, so the tokens are not compared)."""
    if ON_GPU:
        for step, (lg, lw) in enumerate(zip(got.logits, want.logits)):
            scale = lw.float().abs().max().item()
            err = (lg.float() - lw.float()).abs().max().item()
            assert err <= 0.05 * scale, (step, err, scale)
            if not torch.equal(lg.argmax(-1), lw.argmax(-1)):
                break  # the sequences fork from here
    else:
        assert torch.equal(got.sequences, want.sequences)
        for lg, lw in zip(got.logits, want.logits):
            torch.testing.assert_close(lg, lw, rtol=1e-4, atol=1e-4)


def _run(model, **kw):
    before = dict(kfg.LAUNCHES), graphs.STATS.copy()
    out = model.generate(_ids(), attention_mask=torch.ones(1, S["prompt"], dtype=torch.long, device=DEVICE),
                         **{**KW, **kw})
    return out, {k: kfg.LAUNCHES[k] - before[0][k] for k in kfg.LAUNCHES}, graphs.STATS - before[1]


def test_install_covers_every_projection_and_the_mlp(models):
    """A model made with "flashtri" gets the flat forwards at its first forward (where its attention modules are
    set up), on the 7 projections and the MLP of every layer; an "sdpa" model gets none."""
    fl, sdpa = models
    with torch.no_grad():
        fl(_ids())
        sdpa(_ids())
    for layer in fl.model.layers:
        linears = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        assert all(m.__dict__["forward"].__func__ is flat._flat_linear_forward for m in linears)
        assert layer.mlp.__dict__["forward"].__func__ is flat._flat_mlp_forward
        assert flat.install(layer) == 8  # idempotent
    assert not any("forward" in m.__dict__ for m in sdpa.modules())


def test_eager_decode_runs_the_flat_gemm(models, monkeypatch):
    """Graphs off: every decode step launches the flat GEMM for q, k, v, o and down in every layer, and the
    fused gate/up once per layer; the prefill (many rows) keeps torch's linear. Tokens and logits match sdpa."""
    monkeypatch.setenv(graphs.ENV, "0")
    fl, sdpa = models
    want = sdpa.generate(_ids(), **KW)
    got, launches, _ = _run(fl)
    _logits_close(got, want)
    steps = S["new"] - 1
    assert launches["flat_gemm"] == 5 * S["layers"] * steps
    assert launches["flat_gemm_gated"] == S["layers"] * steps
    monkeypatch.setenv(flat.ENV, "0")
    got, launches, _ = _run(fl)
    _logits_close(got, want)
    assert launches == {k: 0 for k in launches}


def test_decode_graphs_hold_the_flat_gemm(models):
    """With the decode graphs on, the captured graphs contain the flat GEMM and every later step replays them."""
    fl, sdpa = models
    want = sdpa.generate(_ids(), **KW)
    got, launches, stats = _run(fl)
    _logits_close(got, want)
    assert stats["replayed"] == S["layers"] * (S["new"] - 1) and stats["eager"] == 0
    assert launches["flat_gemm"] >= 5 * S["layers"] and launches["flat_gemm_gated"] >= S["layers"]
    recs = [r for layer in fl.model.layers for r in graphs._GRAPHS[layer].values()]
    assert recs
    if not ON_GPU:  # the emulated graphs list their calls: the op is among them
        op = torch.ops.hf_flash.flat_linear.default
        for r in recs:
            assert sum(f is op for f, *_ in r.a.calls) == 3 and sum(f is op for f, *_ in r.b.calls) == 3


def test_fused_mlp_steps_aside_for_hooks_and_replaced_forwards(models):
    """The fused gate/up kernel skips the gate and up modules' calls, so a hook on one of them, or a forward
    replaced on its instance, makes the MLP run its class's forward (which calls them)."""
    fl, _ = models
    with torch.no_grad():
        fl(_ids())  # sets the patches up, if no test did before
    mlp = copy.deepcopy(fl.model.layers[0].mlp)
    x = torch.randn(1, 1, S["hidden"], device=DEVICE, dtype=DTYPE)

    def run():
        before = kfg.LAUNCHES["flat_gemm_gated"]
        with torch.no_grad():
            y = mlp(x)
        return y, kfg.LAUNCHES["flat_gemm_gated"] - before

    plain, fused = run()
    assert fused == 1
    handle = mlp.up_proj.register_forward_hook(lambda m, i, o: o * 2)
    y, fused = run()
    handle.remove()
    assert fused == 0 and not torch.allclose(y, plain)
    mlp.gate_proj.forward = lambda t: F.linear(t, mlp.gate_proj.weight) * 0  # silu(0) = 0: the output is zero
    y, fused = run()
    assert fused == 0 and torch.count_nonzero(y) == 0


def test_lora_base_layer_keeps_the_flat_path(models):
    """PEFT wraps q/v in LoRA layers (not nn.Linear: no graphs, the wrapper's forward runs); their base layers are
    the original linears, whose flat forward still serves the single-row decode step."""
    peft = pytest.importorskip("peft")
    fl, _ = models
    model = copy.deepcopy(fl)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    merged = copy.deepcopy(lora).merge_and_unload()
    got, launches, _ = _run(lora)
    want, _, _ = _run(merged)
    _logits_close(got, want)
    assert launches["flat_gemm"] > 0


def test_flat_forwards_follow_deepcopy_and_pickling(models, tmp_path):
    """copy.deepcopy binds the flat forwards to the copy's modules (its own weights); a model saved whole with
    torch.save loads with the classes' forwards and gives the same logits."""
    fl, _ = models
    with torch.no_grad():
        fl(_ids())  # sets the patches up, if no test did before
    twin = copy.deepcopy(fl)
    for m in (twin.model.layers[0].self_attn.q_proj, twin.model.layers[-1].mlp):
        assert m.__dict__["forward"].__self__ is m
    with torch.no_grad():
        twin.model.layers[0].mlp.up_proj.weight.mul_(-1.0)
    x = torch.randn(1, 1, S["hidden"], device=DEVICE, dtype=DTYPE)
    mlp, twin_mlp = fl.model.layers[0].mlp, twin.model.layers[0].mlp
    before = dict(kfg.LAUNCHES)
    with torch.no_grad():
        a, b = mlp(x), twin_mlp(x)
        ref = type(twin_mlp).forward(twin_mlp, x)
    assert kfg.LAUNCHES["flat_gemm_gated"] - before["flat_gemm_gated"] == 2
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    path = tmp_path / "model.pt"
    torch.save(fl, path)
    loaded = torch.load(path, weights_only=False)
    loaded_mlp = loaded.model.layers[0].mlp
    assert loaded_mlp.forward.__func__ is type(loaded_mlp).forward  # a bound method pickles as getattr(m, "forward")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fl(ids).logits)


def test_dynamo_traces_the_flat_path(models):
    """Decode steps on a StaticCache through dynamo (backend "eager": the traced graph runs as traced, on any
    device): the checks of patches/flat.py trace to the flat path, so the op runs for every projection and the
    fused MLP at every step."""
    from transformers import StaticCache

    fl, _ = models
    ids = _ids()
    cache = StaticCache(config=fl.config, max_cache_len=S["prompt"] + 8)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            tok = fl(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            step = torch.compile(lambda t, p: fl(t, position_ids=p, past_key_values=cache, use_cache=True).logits,
                                 backend="eager", dynamic=False)
            before = dict(kfg.LAUNCHES)
            for i in range(3):
                pos = torch.tensor([[S["prompt"] + i]], device=DEVICE)
                logits = step(tok, pos)
                tok = logits[:, -1:].argmax(-1)
    finally:
        torch._dynamo.reset()
    assert kfg.LAUNCHES["flat_gemm"] - before["flat_gemm"] == 3 * 5 * S["layers"]
    assert kfg.LAUNCHES["flat_gemm_gated"] - before["flat_gemm_gated"] == 3 * S["layers"]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_static_cache_compiled_decode_runs_the_flat_op(models):
    """transformers' own torch.compile of a StaticCache decode step (mode="reduce-overhead") keeps the op in its
    graph: launched while the compiled step warms up, logits within bf16 tolerance of sdpa's."""
    from torch._dynamo.utils import counters

    fl, sdpa = models
    want = sdpa.generate(_ids(), cache_implementation="static", disable_compile=True, **KW)
    torch._dynamo.reset()
    counters.clear()
    try:
        got, launches, _ = _run(fl, cache_implementation="static")
        compiled = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert compiled > 0
    assert launches["flat_gemm"] > 0 and launches["flat_gemm_gated"] > 0
    _logits_close(got, want)
