"""attn_implementation="flashtri" in transformers: registration, loading, the attention function's paths, and
training (per-step losses and gradients against "sdpa", dropout, gradient checkpointing, Trainer with padded and
packed batches, PEFT LoRA).

Models are tiny and random, built from a config and loaded through ``from_pretrained`` from a
``save_pretrained`` directory (the real loading code). On the CPU (Triton interpreter) they have 2 layers,
hidden 64, 4 query heads, and for Llama 2 KV heads with head dim 24; on CUDA the same tests run bigger models in
float32 (and bf16 autocast). Every comparison is in float32 against "sdpa" computed in float32: the only
differences are summation orders, so losses agree to ~1e-6 and gradients to ~1e-5 relative; the tolerances
below (2e-5 for losses, 1e-4 relative for gradients) leave a margin of ~10x.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math

import pytest
import torch

import hf_flash
from hf_flash.kernels import attention as kattn

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# (hidden, layers, heads, kv heads, head dim, sequence lengths) per device
SIZES = {"cpu": dict(hidden=64, layers=2, heads=4, kv=2, head_dim=24, seqlens=(37, 70)),
         "cuda": dict(hidden=512, layers=4, heads=8, kv=2, head_dim=80, seqlens=(300, 517))}
S = SIZES[DEVICE]
VOCAB = 101


def llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(vocab_size=VOCAB, hidden_size=S["hidden"], intermediate_size=2 * S["hidden"],
              num_hidden_layers=S["layers"], num_attention_heads=S["heads"], num_key_value_heads=S["kv"],
              head_dim=S["head_dim"], max_position_embeddings=1024, use_cache=False, pad_token_id=0)
    kw.update(over)
    return LlamaConfig(**kw)


def gpt2_config(**over):
    from transformers import GPT2Config

    kw = dict(vocab_size=VOCAB, n_embd=S["hidden"], n_layer=S["layers"], n_head=S["heads"], n_positions=1024,
              attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    kw.update(over)
    return GPT2Config(**kw)


_saved: dict = {}


def saved_dir(tmp_path_factory, kind: str, **over) -> str:
    """A save_pretrained directory of a tiny random model (one per kind and config override)."""
    key = (kind, tuple(sorted(over.items())))
    if key not in _saved:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(1234)
        cfg = llama_config(**over) if kind == "llama" else gpt2_config(**over)
        model = AutoModelForCausalLM.from_config(cfg)
        path = tmp_path_factory.mktemp(f"{kind}_model")
        model.save_pretrained(path)
        _saved[key] = str(path)
    return _saved[key]


def load(path: str, impl: str, train: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).to(DEVICE)
    return model.train(train)


def padded_batch(batch: int, seqlen: int, seed: int = 0, left: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seqlen), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):  # row 0 is full length, the others padded by different amounts
        n = (7 * b + 3) % (seqlen // 2) + 1
        if left:
            mask[b, :n] = 0
        else:
            mask[b, seqlen - n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def assert_grads_close(a, b, rtol=1e-4):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, p in pa.items():
        q = pb[name]
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name}: no gradient with flashtri"
        err = (p.grad - q.grad).abs().max().item()
        scale = q.grad.abs().max().item()
        assert err <= rtol * scale + 1e-7, f"{name}: gradient differs by {err:.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------------------------------------ registration


def test_import_registers_and_resolves_flash_machinery():
    from transformers import AttentionInterface
    from transformers import modeling_flash_attention_utils as mfau
    from transformers.masking_utils import AttentionMaskInterface

    hf_flash.register()  # idempotent
    hf_flash.register()
    assert AttentionInterface._global_mapping["flashtri"] is hf_flash.patches.flashtri_attention_forward
    assert "flashtri" in AttentionMaskInterface._global_mapping
    (fa, fv, fkv, pad, unpad), _ = mfau.lazy_import_flash_attention("flashtri")[:2]
    fkv = inspect.unwrap(fkv)  # transformers wraps it in torch.compiler.disable
    assert (fa, fv, fkv, pad, unpad) == (hf_flash.flash_attn_func, hf_flash.flash_attn_varlen_func,
                                         hf_flash.flash_attn_with_kvcache, hf_flash.pad_input, hf_flash.unpad_input)


def test_unsupported_transformers_internals_give_a_clear_error(monkeypatch):
    import transformers
    from transformers import modeling_flash_attention_utils as mfau

    from hf_flash.patches import registration

    monkeypatch.delattr(mfau, "_lazy_imports")
    with pytest.raises(registration.UnsupportedTransformersError) as e:
        registration._internals()
    msg = str(e.value)
    assert transformers.__version__ in msg and "5.17" in msg and "5.24" in msg and "_lazy_imports" in msg


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_from_pretrained_and_patch_by_hand(tmp_path_factory, kind):
    path = saved_dir(tmp_path_factory, kind)
    model = load(path, "flashtri", train=False)
    assert model.config._attn_implementation == "flashtri"
    ids, mask, _ = padded_batch(2, 21)
    before = kattn.launches["fwd"]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert kattn.launches["fwd"] == before + S["layers"], "the FA2 forward kernel should run once per layer"
    attn = [m for m in model.modules() if hasattr(m, "_hf_flash_plan")]
    assert len(attn) == S["layers"] and all(m._hf_flash_plan.family == kind for m in attn)

    sdpa = load(path, "sdpa", train=False)
    patch = hf_flash.patch_llama if kind == "llama" else hf_flash.patch_gpt2
    other = hf_flash.patch_gpt2 if kind == "llama" else hf_flash.patch_llama
    assert patch(sdpa) is sdpa and sdpa.config._attn_implementation == "flashtri"
    with pytest.raises(TypeError, match="no (gpt2|llama) attention modules"):
        other(sdpa)


def test_output_attentions_warns_and_cpu_without_interpreter_errors(tmp_path_factory, monkeypatch, caplog):
    model = load(saved_dir(tmp_path_factory, "llama"), "flashtri", train=False)
    ids, mask, _ = padded_batch(2, 13)
    with caplog.at_level(logging.WARNING, logger="hf_flash"), torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert "output_attentions" in caplog.text and "eager" in caplog.text
    assert all(a is None for a in out.attentions)
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"), torch.no_grad():
            model(ids, attention_mask=mask)


def test_4d_mask_and_softcap_paths_match_reference(tmp_path_factory):
    """A custom 4-D mask goes in as attn_bias; softcap/sliding window through the generic function."""
    from transformers import AttentionInterface

    path = saved_dir(tmp_path_factory, "llama")
    fl, ref = load(path, "flashtri", train=False), load(path, "eager", train=False)
    ids, _, _ = padded_batch(2, 29)
    L = ids.shape[1]
    # block-diagonal causal mask: two documents in each row
    doc = (torch.arange(L, device=DEVICE) >= 11).long()
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(L, L, dtype=torch.bool, device=DEVICE).tril()
    bool_mask = allowed[None, None].expand(2, 1, L, L)
    float_mask = torch.zeros(2, 1, L, L, device=DEVICE).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        want = ref(ids, attention_mask=float_mask).logits
        got = fl(ids, attention_mask=bool_mask).logits
    assert (got - want).abs().max().item() < 2e-5

    # softcap and sliding window, straight through the attention function, against attention_ref
    attn = fl.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, S["heads"], 33, S["head_dim"], generator=g).to(DEVICE)
    k, v = (torch.randn(2, S["kv"], 33, S["head_dim"], generator=g).to(DEVICE) for _ in range(2))
    out, w = AttentionInterface._global_mapping["flashtri"](attn, q, k, v, None, scaling=0.3, sliding_window=9,
                                                             softcap=5.0)
    want, _ = hf_flash.attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                     window_size=(8, 0), softcap=5.0, softmax_scale=0.3)
    assert w is None and (out - want).abs().max().item() < 2e-5
    with pytest.raises(ValueError, match="s_aux"):
        AttentionInterface._global_mapping["flashtri"](attn, q, k, v, None, s_aux=torch.zeros(S["heads"]))


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_per_step_losses_and_gradients_match_sdpa(tmp_path_factory, kind):
    """Three SGD steps on padded batches: every loss and every gradient of every step equal "sdpa"'s."""
    path = saved_dir(tmp_path_factory, kind)
    fl, ref = load(path, "flashtri"), load(path, "sdpa")
    opt_f = torch.optim.SGD(fl.parameters(), lr=0.5)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.5)
    seqlen = S["seqlens"][0]
    before = dict(kattn.launches)
    for step in range(3):
        ids, mask, labels = padded_batch(3, seqlen, seed=step)
        lf = fl(ids, attention_mask=mask, labels=labels).loss
        lr = ref(ids, attention_mask=mask, labels=labels).loss
        lf.backward()
        lr.backward()
        assert abs(lf.item() - lr.item()) < 2e-5, f"step {step}: loss {lf.item()} vs sdpa {lr.item()}"
        assert_grads_close(fl, ref)
        opt_f.step(), opt_r.step(), opt_f.zero_grad(), opt_r.zero_grad()
    n = 3 * S["layers"]
    dq = kattn.launches["bwd_dq"] + kattn.launches["bwd_fused_dq"] - before["bwd_dq"] - before["bwd_fused_dq"]
    gluon = kattn.launches["bwd_gluon"] - before["bwd_gluon"]  # the Hopper backward, where it takes a call
    assert kattn.launches["fwd"] - before["fwd"] == n and kattn.launches["bwd_dkdv"] - before["bwd_dkdv"] + gluon == n
    assert dq + gluon == n


def test_gpt2_dropout_in_kernel_statistics_repeatability_and_checkpointing(tmp_path_factory, monkeypatch):
    """attn_pdrop=0.1: the loss over many seeds has the same mean as "eager"'s (within 4 standard errors),
    the same seed gives bitwise the same loss and gradients (with transformers' FLASH_ATTENTION_DETERMINISTIC=1,
    as flash-attn: the default backward adds dQ with atomics, whose order varies on a GPU), and gradient
    checkpointing (which replays the RNG) gives the same gradients as no checkpointing."""
    monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", "1")
    before = kattn.launches["bwd_dq"]
    path = saved_dir(tmp_path_factory, "gpt2", attn_pdrop=0.1)
    fl, ref = load(path, "flashtri"), load(path, "eager")
    ids, mask, labels = padded_batch(2, S["seqlens"][0], seed=5)
    with torch.no_grad():
        fl.eval()
        clean = fl(ids, attention_mask=mask, labels=labels).loss.item()
        fl.train()
        stats = {}
        for name, model in (("flashtri", fl), ("eager", ref)):
            losses = []
            for seed in range(6):
                torch.manual_seed(seed)
                losses.append(model(ids, attention_mask=mask, labels=labels).loss.item())
            stats[name] = (sum(losses) / len(losses), torch.tensor(losses).std().item())
    (mf, sf), (me, se) = stats["flashtri"], stats["eager"]
    assert sf > 0 and abs(mf - me) < 4 * math.sqrt((sf ** 2 + se ** 2) / 6) + 1e-6, stats
    assert abs(mf - clean) < 0.5 and sf > 1e-5, "dropout should perturb the loss a little"

    def run(model):
        torch.manual_seed(42)
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    l1, g1 = run(fl)
    l2, g2 = run(fl)
    assert torch.equal(l1, l2) and all(torch.equal(g1[n], g2[n]) for n in g1), "same seed, different result"
    gc = load(path, "flashtri")
    gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    l3, g3 = run(gc)
    assert torch.equal(l1, l3)
    assert kattn.launches["bwd_dq"] - before == 3 * S["layers"], "the deterministic (two-kernel) backward ran"
    for n in g1:
        assert (g1[n] - g3[n]).abs().max().item() <= 1e-6 * max(g1[n].abs().max().item(), 1.0), n


def _trainer_losses(path, impl, features, collator, tmp_path, steps=3, **args):
    from transformers import Trainer, TrainingArguments

    model = load(path, impl)
    targs = TrainingArguments(output_dir=str(tmp_path / impl), max_steps=steps, per_device_train_batch_size=3,
                              learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", seed=7,
                              data_seed=7, use_cpu=not ON_GPU, dataloader_num_workers=0, disable_tqdm=True,
                              lr_scheduler_type="constant", **args)
    trainer = Trainer(model=model, args=targs, train_dataset=features, data_collator=collator)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], model


def _features(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(5, S["seqlens"][0] + 8, (n,), generator=g)]
    return [{"input_ids": torch.randint(3, VOCAB, (L,), generator=g).tolist()} for L in lens]


def _pad_collator(features):
    L = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("kind,collate", [("llama", "padded"), ("llama", "packed_kwargs"), ("gpt2", "packed")])
def test_trainer_padded_and_packed_batches_match_sdpa(tmp_path_factory, tmp_path, kind, collate):
    from transformers import DataCollatorWithFlattening

    path = saved_dir(tmp_path_factory, kind)
    feats = _features(9)
    if collate == "padded":
        collator = _pad_collator
    else:
        collator = DataCollatorWithFlattening(return_flash_attn_kwargs=collate == "packed_kwargs")
    extra = {"gradient_checkpointing": True} if kind == "llama" and collate == "padded" else {}
    before = kattn.launches["fwd"]
    lf, _ = _trainer_losses(path, "flashtri", feats, collator, tmp_path, **extra)
    assert kattn.launches["fwd"] - before >= 3 * S["layers"]
    ls, _ = _trainer_losses(path, "sdpa", feats, collator, tmp_path, **extra)
    assert len(lf) == len(ls) == 3
    assert max(abs(a - b) for a, b in zip(lf, ls)) < 1e-4, (lf, ls)


def test_peft_lora_trains_and_saves(tmp_path_factory, tmp_path):
    peft = pytest.importorskip("peft")
    path = saved_dir(tmp_path_factory, "llama")
    model = load(path, "flashtri")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          lora_dropout=0.0, init_lora_weights=True)
    model = peft.get_peft_model(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, labels = padded_batch(2, S["seqlens"][0], seed=9)
    losses = []
    for _ in range(4):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    model.eval()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    base = load(path, "flashtri", train=False)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(ids, attention_mask=mask).logits
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_bf16_autocast_training_step_matches_sdpa(tmp_path_factory):
    """bf16 autocast, fp32 master weights: loss and gradients close to "sdpa" (same autocast)."""
    path = saved_dir(tmp_path_factory, "llama")
    fl, ref, exact = load(path, "flashtri"), load(path, "sdpa"), load(path, "sdpa")
    ids, mask, labels = padded_batch(4, S["seqlens"][1], seed=11)
    for m in (fl, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            m(ids, attention_mask=mask, labels=labels).loss.backward()
    exact(ids, attention_mask=mask, labels=labels).loss.backward()
    for name, p in fl.named_parameters():
        e = dict(exact.named_parameters())[name].grad
        r = dict(ref.named_parameters())[name].grad
        base = (r - e).abs().max().item()
        err = (p.grad - e).abs().max().item()
        assert err <= 3 * base + 1e-3 * e.abs().max().item(), f"{name}: {err:.3g} vs sdpa-bf16 {base:.3g}"


def test_deepcopied_model_keeps_working(tmp_path_factory):
    """A copied model (e.g. the reference model of RL trainers) keeps working with its own plan objects."""
    model = load(saved_dir(tmp_path_factory, "gpt2"), "flashtri", train=False)
    ids, mask, _ = padded_batch(2, 17)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = copy.deepcopy(model)(ids, attention_mask=mask).logits
    assert torch.equal(a, b)
