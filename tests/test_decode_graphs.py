"""Decode steps of Llama decoder layers replayed as graphs (patches/graphs.py).

On the GPU these are CUDA graphs. On the CPU the same code runs with ``HF_FLASH_DECODE_GRAPHS=emulate``: the
capture records the ATen calls and a replay repeats them on the recorded tensors, with no Python in between, as a
CUDA graph would; the attention between the two graphs runs the Triton kernels on the interpreter. Every test
checks what ran (captures, replays, kernel launches), not only the tokens.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import left_padded_prompt, llama_pair
import hf_flash  # noqa: F401 - registers "flashtri"
from hf_flash.kernels import decode as kdec
from hf_flash.patches import graphs

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
S = (dict(hidden=512, layers=3, heads=8, kv=2, head_dim=128, prompt=600, new=12, positions=4096) if ON_GPU else
     dict(hidden=64, layers=2, heads=4, kv=2, head_dim=24, prompt=40, new=5, positions=128))
VOCAB = 101
# float32 models; on the GPU both implementations run their products in TF32
TOL = 2e-2 if ON_GPU else 1e-4


@pytest.fixture(autouse=True)
def _graphs_on(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("HF_FLASH_DECODE_GRAPHS", "emulate")


def _models():
    return llama_pair(S, VOCAB, seed=5, intermediate_size=2 * S["hidden"])


@pytest.fixture(scope="module")
def models():
    return _models()


def _prompt(batch: int):
    return left_padded_prompt(batch, S["prompt"], VOCAB, step=7, first=3)


KW = dict(max_new_tokens=S["new"], min_new_tokens=S["new"], do_sample=False, pad_token_id=0, output_logits=True,
          return_dict_in_generate=True)


def _generate(model, ids, mask, **kw):
    before = graphs.STATS.copy(), kdec.LAUNCHES.copy()
    out = model.generate(ids, attention_mask=mask, **{**KW, **kw})
    return out, graphs.STATS - before[0], kdec.LAUNCHES - before[1]


def _assert_same(got, want):
    assert torch.equal(got.sequences, want.sequences), (got.sequences[:, S["prompt"]:].tolist(),
                                                        want.sequences[:, S["prompt"]:].tolist())
    for step, (lg, lw) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(lg, lw, rtol=TOL, atol=TOL, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_steps_match_sdpa_and_are_reused_across_calls(models, batch):
    """Each layer is captured once per shape at its first graphed step and replayed at every later step of this
    and the next generate() call (the cache grows meanwhile: the graphs hold no cache pointer); the attention
    between the graphs runs the fused append and the split-KV kernels at every step; logits equal sdpa's."""
    fl, sdpa = models
    layers, steps = S["layers"], S["new"] - 1
    ids, mask = _prompt(batch)
    want = sdpa.generate(ids, attention_mask=mask, **KW)
    got, stats, launches = _generate(fl, ids, mask)
    _assert_same(got, want)
    assert stats["captured"] == layers and stats["eager"] == 0
    assert stats["replayed"] == layers * steps
    assert launches["append_rotary"] == layers * steps and launches["split_kv"] == layers * steps
    recs = [r for layer in fl.model.layers for r in graphs._GRAPHS[layer].values()]
    kind = torch.cuda.CUDAGraph if ON_GPU else graphs._EmulatedGraph
    assert recs and all(isinstance(r.a, kind) and isinstance(r.b, kind) for r in recs)
    # layer i + 1 reads layer i's output buffer in place: a step copies the hidden state once, into layer 0
    by_key = [graphs._GRAPHS[layer][next(reversed(graphs._GRAPHS[layer]))] for layer in fl.model.layers]
    assert all(nxt.static_in is prev.out for prev, nxt in zip(by_key, by_key[1:]))
    got2, stats2, launches2 = _generate(fl, ids, mask)
    _assert_same(got2, want)
    assert stats2["captured"] == 0, "the second call should replay the graphs of the first"
    assert stats2["replayed"] == layers * steps and launches2["split_kv"] == layers * steps
    # a new cache of the same capacity: every rotary + append launch replays the plan recorded before
    assert launches2["append_plan"] == launches2["append_rotary"] == layers * steps


def test_graphs_follow_weights_replaced_or_changed_in_place(models):
    """A weight changed in place is read by the replay as it is; a parameter replaced by another tensor makes
    that layer (and only that one) capture again; either way the tokens follow the new weights."""
    fl, sdpa = models
    ids, mask = _prompt(1)
    _generate(fl, ids, mask)
    with torch.no_grad():
        for m in (fl, sdpa):
            m.model.layers[0].mlp.up_proj.weight.mul_(-1.5)
            m.model.layers[-1].self_attn.o_proj.weight = torch.nn.Parameter(
                m.model.layers[-1].self_attn.o_proj.weight.flip(0) * 0.7)
    want = sdpa.generate(ids, attention_mask=mask, **KW)
    got, stats, _ = _generate(fl, ids, mask)
    _assert_same(got, want)
    assert stats["captured"] == 1
    assert stats["replayed"] == S["layers"] * (S["new"] - 1)


def test_hooks_env_switch_and_output_hidden_states(models, monkeypatch):
    """A hook inside a layer keeps that layer out of graphs (a replay would skip it); HF_FLASH_DECODE_GRAPHS=0
    turns graphs off; output_hidden_states runs the steps without graphs (transformers' hooks collect the
    per-layer outputs) and leaves them on for later calls; every result equal to sdpa's."""
    fl, sdpa = models
    layers, steps = S["layers"], S["new"] - 1
    ids, mask = _prompt(3)
    want = sdpa.generate(ids, attention_mask=mask, **KW)
    _generate(fl, ids, mask)  # captured

    calls = []
    handle = fl.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: calls.append(1))
    try:
        got, stats, _ = _generate(fl, ids, mask)
    finally:
        handle.remove()
    _assert_same(got, want)
    assert len(calls) == S["new"], "the hooked MLP should run at the prefill and at every decode step"
    assert stats["replayed"] == (layers - 1) * steps and stats["captured"] == 0

    monkeypatch.setenv("HF_FLASH_DECODE_GRAPHS", "0")
    got, stats, launches = _generate(fl, ids, mask)
    _assert_same(got, want)
    assert stats["replayed"] == 0 and launches["append_rotary"] == layers * steps
    monkeypatch.undo()
    if not ON_GPU:
        monkeypatch.setenv("HF_FLASH_DECODE_GRAPHS", "emulate")

    want_h = sdpa.generate(ids, attention_mask=mask, output_hidden_states=True, **KW)
    got_h, stats, _ = _generate(fl, ids, mask, output_hidden_states=True)
    _assert_same(got_h, want_h)
    assert stats["replayed"] == 0
    for step, (hs, hw) in enumerate(zip(got_h.hidden_states, want_h.hidden_states)):
        assert len(hs) == len(hw) == layers + 1
        for h, w in zip(hs, hw):
            torch.testing.assert_close(h, w, rtol=TOL, atol=TOL, msg=lambda m: f"step {step}: {m}")
    # transformers installed its output-capturing hooks (kept, inactive) on the attention modules: the layers
    # are captured once more with them, then replayed
    got, stats, _ = _generate(fl, ids, mask)
    _assert_same(got, want)
    assert stats["replayed"] == layers * steps and stats["captured"] <= layers
    got, stats, _ = _generate(fl, ids, mask)
    assert stats["replayed"] == layers * steps and stats["captured"] == 0


def test_capture_failure_warns_once_and_keeps_the_layer_forward(monkeypatch):
    fl, sdpa = _models()
    ids, mask = _prompt(1)

    def broken(self, module, hidden):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(graphs._Capture, "at_attention", broken)
    want = sdpa.generate(ids, attention_mask=mask, **KW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, stats, launches = _generate(fl, ids, mask)
    _assert_same(got, want)
    assert stats["captured"] == 0 and stats["replayed"] == 0
    assert launches["append_rotary"] == S["layers"] * (S["new"] - 1), "the fused step should still run"
    assert any("capture failed" in str(w.message) for w in caught)


def test_copied_model_captures_its_own_graphs(models):
    """Graphs live outside the modules: copy.deepcopy of a model with graphs copies none and the copy, whose
    layers keep the graphed forward bound to themselves, captures its own."""
    fl, sdpa = models
    ids, mask = _prompt(1)
    _generate(fl, ids, mask)
    twin = copy.deepcopy(fl)
    assert twin.model.layers[0].forward.__self__ is twin.model.layers[0]
    want = sdpa.generate(ids, attention_mask=mask, **KW)
    got, stats, _ = _generate(twin, ids, mask)
    _assert_same(got, want)
    assert stats["captured"] == S["layers"]


def test_patch_llama_by_hand_installs_the_graphed_layers():
    """A model loaded with another implementation and switched with hf_flash.patch_llama gets the fused attention
    and the graphed decoder layers at once (found from the model, not from a first call), and decodes through them."""
    from transformers import AutoModelForCausalLM

    _, sdpa = _models()
    model = AutoModelForCausalLM.from_config(copy.deepcopy(sdpa.config), attn_implementation="sdpa")
    model.load_state_dict(sdpa.state_dict())
    model = hf_flash.patch_llama(model.to(DEVICE).eval())
    for layer in model.model.layers:
        assert layer.__dict__["forward"].__func__ is graphs._graphed_forward
    ids, mask = _prompt(3)
    want = sdpa.generate(ids, attention_mask=mask, **KW)
    got, stats, _ = _generate(model, ids, mask)
    _assert_same(got, want)
    assert stats["captured"] == S["layers"] and stats["replayed"] == S["layers"] * (S["new"] - 1)


def test_emulated_graph_replays_recorded_calls_without_python():
    """The CPU stand-in for a CUDA graph: a replay repeats the ATen calls recorded at capture on the same tensors
    (inputs read anew, outputs written into the tensors the capture produced), and nothing else: Python values
    read at capture stay as they were, as in a CUDA graph."""
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    scale = [2.0]
    g = graphs._EmulatedGraph()
    graphs._Emulated.begin(g, None)
    y = torch.relu(x @ w) * scale[0]
    z = y.sum(-1)
    graphs._Emulated.end(g)
    assert g.calls, "the capture should have recorded the calls"
    x.copy_(torch.randn(4, 8))
    scale[0] = 5.0  # a Python value: not seen by the replay
    g.replay()
    torch.testing.assert_close(y, torch.relu(x @ w) * 2.0)
    torch.testing.assert_close(z, (torch.relu(x @ w) * 2.0).sum(-1))
