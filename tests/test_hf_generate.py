"""generate() with attn_implementation="flashtri": tokens equal "sdpa"'s, and the right kernel runs.

Tiny random GPT-2 and Llama (GQA, head dim 24) from a config, loaded with from_pretrained; DynamicCache and
StaticCache; batch 1 and a left-padded batch of 3; prompts longer than the kernels' blocks (70 tokens against
blocks of 32 on the interpreter). The FA2 forward must run for the prompt (once per layer) and only the split-KV
decode kernel for each new token (once per layer and step), with no per-step gather of the cache. On CUDA the
same tests run larger models, and bf16 checks every step's logits against "sdpa" and a torch.compile'd
StaticCache decode.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import left_padded_prompt
import hf_flash  # noqa: F401 - registers "flashtri"
from hf_flash.kernels import attention as kattn
from hf_flash.kernels import decode as kdec

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SIZES = {"cpu": dict(hidden=64, layers=2, heads=4, kv=2, head_dim=24, prompt=70, new=5, positions=128),
         "cuda": dict(hidden=512, layers=4, heads=8, kv=2, head_dim=128, prompt=1100, new=24, positions=4096)}
S = SIZES[DEVICE]
VOCAB = 101


def _config(kind: str):
    from transformers import GPT2Config, LlamaConfig

    if kind == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=S["hidden"], intermediate_size=2 * S["hidden"],
                           num_hidden_layers=S["layers"], num_attention_heads=S["heads"],
                           num_key_value_heads=S["kv"], head_dim=S["head_dim"],
                           max_position_embeddings=S["positions"],
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2Config(vocab_size=VOCAB, n_embd=S["hidden"], n_layer=S["layers"], n_head=S["heads"],
                      n_positions=S["positions"], pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: (flashtri model, sdpa model)} loaded from one save_pretrained directory per kind."""
    from transformers import AutoModelForCausalLM

    out = {}
    for kind in ("llama", "gpt2"):
        torch.manual_seed(99)
        path = tmp_path_factory.mktemp(kind)
        model = AutoModelForCausalLM.from_config(_config(kind))
        with torch.no_grad():  # sharper logits than the default init, so greedy choices are not near-ties
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(3.0)
        model.save_pretrained(path)
        out[kind] = tuple(AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).to(DEVICE).eval()
                          for impl in ("flashtri", "sdpa"))
    return out


def _prompt(batch: int):
    return left_padded_prompt(batch, S["prompt"], VOCAB, step=9, first=4)


def _counts():
    return kattn.launches["fwd"], kdec.LAUNCHES["split_kv"] + kdec.LAUNCHES["split_kv_unified"]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_tokens_equal_sdpa_and_decode_uses_split_kv(models, kind, cache, batch):
    fl, sdpa = models[kind]
    ids, mask = _prompt(batch)
    kw = dict(max_new_tokens=S["new"], min_new_tokens=S["new"], do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    fwd0, dec0 = _counts()
    got = fl.generate(ids, attention_mask=mask, **kw)
    fwd1, dec1 = _counts()
    want = sdpa.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want), f"flashtri {got[:, S['prompt']:].tolist()} vs sdpa {want[:, S['prompt']:].tolist()}"
    layers = S["layers"]
    assert fwd1 - fwd0 == layers, "the prompt should take the FA2 forward kernel once per layer"
    assert dec1 - dec0 == layers * (S["new"] - 1), "each decode step should take the split-KV kernel once per layer"


@pytest.mark.parametrize("fused", ["on", "off"])
def test_llama_decode_fuses_rotary_and_cache_append(models, monkeypatch, fused):
    """Llama decode steps with a DynamicCache rotate the query and the new key and write K/V into the cache in one
    kernel (patches/llama.py): one append launch per layer per step (none with HF_FLASH_FUSED_DECODE=0), the
    split-KV kernel as before, every step's logits equal to sdpa's (left-padded batch), and the cache afterwards
    holding what sdpa's holds."""
    from hf_flash.patches import llama as pllama

    if fused == "off":
        monkeypatch.setenv("HF_FLASH_FUSED_DECODE", "0")
    fl, sdpa = models["llama"]
    ids, mask = _prompt(3)
    kw = dict(max_new_tokens=S["new"], min_new_tokens=S["new"], do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    a0, s0 = kdec.LAUNCHES["append_rotary"], kdec.LAUNCHES["split_kv"]
    got = fl.generate(ids, attention_mask=mask, **kw)
    appended, split = kdec.LAUNCHES["append_rotary"] - a0, kdec.LAUNCHES["split_kv"] - s0
    # installed at the model's first forward (the prompt's)
    attn = fl.model.layers[0].self_attn
    assert getattr(attn.__dict__.get("forward"), "__func__", None) is pllama._fused_forward
    want = sdpa.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, want.sequences)
    steps = S["new"] - 1
    assert appended == (S["layers"] * steps if fused == "on" else 0)
    assert split == S["layers"] * steps
    # float32 models; on the GPU both implementations run their products in TF32
    tol = 2e-2 if ON_GPU else 1e-4
    for step, (lg, lw) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(lg, lw, rtol=tol, atol=tol, msg=lambda m: f"step {step}: {m}")
    for layer, ref in zip(got.past_key_values.layers, want.past_key_values.layers):
        torch.testing.assert_close(layer.keys, ref.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(layer.values, ref.values, rtol=tol, atol=tol)


def test_fused_decode_runs_lora_projections(tmp_path):
    """A PEFT LoRA model (adapters on q/k/v/o, non-zero) decodes through the fused step with the adapters applied:
    greedy tokens and logits equal those of the same adapters on "sdpa"."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_config(_config("llama"))
    base.save_pretrained(tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          lora_dropout=0.0, init_lora_weights=False)  # random B: the adapters change the output
    wrapped = {}
    for impl in ("flashtri", "sdpa"):
        torch.manual_seed(8)  # the same adapter weights for both
        m = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).to(DEVICE).eval()
        wrapped[impl] = peft.get_peft_model(m, cfg).eval()
    ids, mask = _prompt(2)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    a0 = kdec.LAUNCHES["append_rotary"]
    got = wrapped["flashtri"].generate(input_ids=ids, attention_mask=mask, **kw)
    assert kdec.LAUNCHES["append_rotary"] - a0 == S["layers"] * 3
    want = wrapped["sdpa"].generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, want.sequences)
    tol = 2e-2 if ON_GPU else 1e-4
    for lg, lw in zip(got.logits, want.logits):
        torch.testing.assert_close(lg, lw, rtol=tol, atol=tol)


def test_fused_decode_forward_survives_deepcopy_and_pickling(models, tmp_path):
    """copy.deepcopy keeps the fused attention forward and the graphed decoder-layer forward, bound to the copy
    (not to the original's weights); a model saved whole with torch.save loads and generates the same tokens (with
    the classes' forwards)."""
    import copy

    from transformers import AutoModelForCausalLM

    from hf_flash.patches import graphs

    # a model of its own: after a StaticCache generate() on CUDA, transformers keeps a torch.compile'd call on the
    # model (``_compiled_call``), which torch.save cannot pickle, whatever the attention
    fl = AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="flashtri").to(DEVICE).eval()
    fl.load_state_dict(models["llama"][0].state_dict())
    ids, mask = _prompt(1)
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    want = fl.generate(ids, attention_mask=mask, **kw)
    twin = copy.deepcopy(fl)
    fwd = twin.model.layers[0].self_attn.__dict__["forward"]
    assert fwd.__self__ is twin.model.layers[0].self_attn
    layer_fwd = twin.model.layers[0].__dict__["forward"]
    assert layer_fwd.__func__ is graphs._graphed_forward and layer_fwd.__self__ is twin.model.layers[0]
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)  # a copy with other weights must give other logits than the original
    assert not torch.equal(twin(ids, attention_mask=mask).logits, fl(ids, attention_mask=mask).logits)
    # and a decode step of the copy (graphed on the GPU) reads the copy's weights
    lkw = dict(kw, output_logits=True, return_dict_in_generate=True)
    assert not torch.equal(twin.generate(ids, attention_mask=mask, **lkw).logits[-1],
                           fl.generate(ids, attention_mask=mask, **lkw).logits[-1])
    path = tmp_path / "model.pt"
    torch.save(fl, path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **kw), want)


def test_sampling_equals_sdpa_under_a_seed(models):
    fl, sdpa = models["llama"]
    ids, mask = _prompt(3)
    kw = dict(max_new_tokens=S["new"], min_new_tokens=S["new"], do_sample=True, top_k=8, temperature=0.7,
              pad_token_id=0)
    torch.manual_seed(5)
    got = fl.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(5)
    want = sdpa.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_decode_reads_the_cache_in_place(models, monkeypatch):
    """A decode step hands the split-KV kernel the cache storage itself (no repeat_kv, no gather)."""
    from transformers import DynamicCache

    from hf_flash import kvcache

    fl, _ = models["llama"]
    ids, mask = _prompt(3)
    cache = DynamicCache(config=fl.config)
    # transformers 5.24 renamed past_key_values to cache (the old name still works); 5.17 only knows the old one
    ckw = {"past_key_values": cache} if transformers.__version__.startswith("5.17") else {"cache": cache}
    with torch.no_grad():
        out = fl(ids, attention_mask=mask, use_cache=True, **ckw)
    seen = []
    real = kvcache.decode_attention

    def spy(q, k_cache, v_cache, cache_seqlens, cache_leftpad, *args, heads_first=False, **kw):
        # seen in the flash layout (batch, seq, heads, dim), whichever layout the call used
        flash = (k_cache.transpose(1, 2), v_cache.transpose(1, 2)) if heads_first else (k_cache, v_cache)
        seen.append((*flash, dict(cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad)))
        return real(q, k_cache, v_cache, cache_seqlens, cache_leftpad, *args, heads_first=heads_first, **kw)

    monkeypatch.setattr(kvcache, "decode_attention", spy)
    nxt = out.logits[:, -1:].argmax(-1)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        fl(nxt, attention_mask=mask2, use_cache=True, **ckw,
           position_ids=(mask2.sum(-1, keepdim=True) - 1))
    assert len(seen) == S["layers"]
    for layer, (k_cache, v_cache, kw) in enumerate(seen):
        stored = cache.layers[layer].keys  # (batch, kv heads, seq, dim)
        assert k_cache.shape[2] == S["kv"], "K/V heads must not be repeated"
        assert k_cache.data_ptr() == stored.data_ptr() and k_cache.stride() == stored.transpose(1, 2).stride()
        assert torch.equal(kw["cache_leftpad"].cpu(), (mask2 == 0).sum(-1).int().cpu())
        assert torch.equal(kw["cache_seqlens"].cpu(), torch.full((3,), mask2.shape[1], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_bf16_logits_of_every_step_close_to_sdpa(models, cache):
    """bf16 on the GPU: the logits of every generated step stay within bf16 tolerance of "sdpa"'s, fed the same
    tokens (teacher-forced on sdpa's sequence so that one near-tie cannot fork the two runs)."""
    fl, sdpa = (m.to(torch.bfloat16) for m in models["llama"])
    try:
        ids, mask = _prompt(4)
        kw = dict(max_new_tokens=S["new"], min_new_tokens=S["new"], do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
        if cache == "static":
            kw["cache_implementation"] = "static"
        want = sdpa.generate(ids, attention_mask=mask, **kw)
        seq = want.sequences
        full_mask = torch.cat([mask, torch.ones_like(seq[:, S["prompt"]:])], dim=1)
        with torch.no_grad():
            got = fl(seq, attention_mask=full_mask).logits[:, S["prompt"] - 1:-1].float()
            ref32 = sdpa.float()(seq, attention_mask=full_mask).logits[:, S["prompt"] - 1:-1]
        sdpa.to(torch.bfloat16)
        lo = torch.stack(want.logits, 1).float()
        base = (lo - ref32).abs().max().item()
        err = (got - ref32).abs().max().item()
        assert err <= 2 * base + 1e-2 * ref32.abs().max().item(), (err, base)
    finally:
        for m in models["llama"]:
            m.float()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_static_cache_compiled_decode_matches_eager(models):
    """StaticCache decode under torch.compile gives the same tokens as the eager run.

    On a GPU, transformers 5.x compiles the decode step by itself when generate() gets a static cache
    (mode="reduce-overhead": CUDA graphs; the prefill stays eager, so the cache is allocated outside the
    graphs). That is the path users get, so it is the one tested; ``disable_compile=True`` gives the eager
    reference. (Compiling the whole forward by hand, prefill included, failed on the H100 with transformers
    5.17: the static cache's tensors are allocated lazily inside the compiled prefill, so they are CUDA-graph
    outputs that the next replay overwrites, and torch's CUDA-graph trees refuse the cache update.)"""
    from torch._dynamo.utils import counters

    fl, _ = models["llama"]
    ids, mask = _prompt(1)
    kw = dict(max_new_tokens=S["new"], min_new_tokens=S["new"], do_sample=False, pad_token_id=0,
              cache_implementation="static")
    want = fl.generate(ids, attention_mask=mask, disable_compile=True, **kw)
    torch._dynamo.reset()
    counters.clear()
    try:
        got = fl.generate(ids, attention_mask=mask, **kw)
        compiled_graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert compiled_graphs > 0  # the decode steps ran compiled, not eagerly
    assert torch.equal(got, want)


def test_dynamic_cache_grows_in_place(models):
    """Decode steps write into spare slots of one buffer per layer (no torch.cat of the whole cache per token):
    the layers become GrowingDynamicLayer, their keys stay views of the same storage from step to step, the cache
    holds exactly what sdpa's cat-grown cache holds, and crop / beam reordering still work."""
    from transformers.cache_utils import DynamicLayer

    fl, sdpa = models["llama"]
    ids, mask = _prompt(3)
    kw = dict(max_new_tokens=S["new"], min_new_tokens=S["new"], do_sample=False, pad_token_id=0,
              return_dict_in_generate=True)
    got = fl.generate(ids, attention_mask=mask, **kw)
    want = sdpa.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, want.sequences)
    cache, ref = got.past_key_values, want.past_key_values
    assert cache.get_seq_length() == ref.get_seq_length() == S["prompt"] + S["new"] - 1
    for layer, ref_layer in zip(cache.layers, ref.layers):
        assert type(layer).__name__ == "GrowingDynamicLayer" and isinstance(layer, DynamicLayer)
        assert type(ref_layer) is DynamicLayer, "sdpa models keep transformers' own layers"
        buf_k, buf_v = layer._hf_flash_buf
        assert layer.keys.data_ptr() == buf_k.data_ptr() and buf_k.shape[2] > layer.keys.shape[2]
        # float32; on the GPU the attention runs in TF32 (both implementations), so deeper layers' inputs differ
        tol = 2e-2 if ON_GPU else 2e-5
        torch.testing.assert_close(layer.keys, ref_layer.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(layer.values, ref_layer.values, rtol=tol, atol=tol)

    # one more step by hand: the storage does not move, the token lands in the next slot
    ptrs = [layer.keys.data_ptr() for layer in cache.layers]
    seq = got.sequences
    mask2 = torch.cat([mask, torch.ones(3, seq.shape[1] - mask.shape[1] + 1, dtype=mask.dtype, device=DEVICE)], 1)
    ckw = {"past_key_values": cache} if transformers.__version__.startswith("5.17") else {"cache": cache}
    with torch.no_grad():
        fl(seq[:, -1:], attention_mask=mask2, use_cache=True, position_ids=mask2.sum(-1, keepdim=True) - 1, **ckw)
    assert [layer.keys.data_ptr() for layer in cache.layers] == ptrs
    assert cache.get_seq_length() == S["prompt"] + S["new"]

    # crop keeps a view (still in place); beam search reorders rows (a new buffer) and stays equal to sdpa
    cache.crop(-(S["new"]))  # negative: tokens to remove (5.17 and 5.24)
    assert cache.get_seq_length() == S["prompt"] and cache.layers[0].keys.data_ptr() == ptrs[0]
    beams = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(fl.generate(ids, attention_mask=mask, **beams), sdpa.generate(ids, attention_mask=mask, **beams))


def test_growing_layer_update_paths():
    """GrowingDynamicLayer.update on its own, against torch.cat: consecutive decode updates write into the same
    buffer (the views it made last time are trusted without a full check), crop keeps the buffer, a keys tensor
    replaced from outside is copied into a fresh buffer (the old one is released, not kept alive by the layer),
    and running out of spare slots grows the buffer with every token kept."""
    import gc
    import weakref

    from transformers.cache_utils import DynamicLayer

    from hf_flash.patches import cache as pcache

    g = torch.Generator().manual_seed(5)
    rnd = lambda n: torch.randn(2, 3, n, 8, generator=g)  # noqa: E731 - (batch, kv heads, tokens, dim)
    layer, ref = DynamicLayer(), DynamicLayer()
    k0, v0 = rnd(10), rnd(10)
    layer.update(k0, v0)
    ref.update(k0, v0)
    layer.__class__ = pcache.growing_layer_class()

    def step(n=1):
        kn, vn = rnd(n), rnd(n)
        with torch.no_grad():
            out = layer.update(kn, vn)
            want = ref.update(kn, vn)
        assert out[0] is layer.keys and out[1] is layer.values
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])

    step()
    buf = layer._hf_flash_buf[0]
    for n in (1, 3, 1):
        step(n)
        assert layer.keys.data_ptr() == buf.data_ptr()  # in place, same storage
    layer.crop(-2)
    ref.crop(-2)
    step()
    assert layer.keys.data_ptr() == buf.data_ptr()
    # keys replaced from outside (as beam search's reordering does): a fresh buffer, the old one released
    old = weakref.ref(buf)
    del buf
    layer.keys, layer.values = layer.keys.flip(0).contiguous(), layer.values.flip(0).contiguous()
    ref.keys, ref.values = ref.keys.flip(0).contiguous(), ref.values.flip(0).contiguous()
    step()
    gc.collect()
    assert old() is None
    # past the spare slots: grows, nothing lost
    cap = layer._hf_flash_buf[0].shape[2]
    while layer.keys.shape[2] < cap:
        step(min(16, cap - layer.keys.shape[2]))
    step()
    assert layer._hf_flash_buf[0].shape[2] > cap


def test_decode_mask_is_handed_over_without_a_host_check():
    """Decode steps of the Llama/GPT-2 families get the 2-D mask as it is (no `.all()` sync on the host); prefill
    and other models keep transformers' FlashAttention mask (None when nothing is padded)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from hf_flash.patches.attention import DECODE_MODEL_TYPES

    fn = ALL_MASK_ATTENTION_FUNCTIONS["flashtri"]
    ones = torch.ones(2, 40, dtype=torch.bool)
    llama = transformers.LlamaConfig()
    assert "llama" in DECODE_MODEL_TYPES
    decode = fn(batch_size=2, q_length=1, kv_length=40, attention_mask=ones, config=llama)
    assert decode is not None and decode.shape == (2, 40)
    assert fn(batch_size=2, q_length=40, kv_length=40, attention_mask=ones, config=llama) is None  # prefill
    other = transformers.BertConfig()
    assert fn(batch_size=2, q_length=1, kv_length=40, attention_mask=ones, config=other) is None
