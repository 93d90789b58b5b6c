"""hf_flash.patches: everything that touches transformers.

* :mod:`~hf_flash.patches.registration`: registers ``attn_implementation="flashtri"`` (the only module that
  touches transformers' internals, behind a version check);
* :mod:`~hf_flash.patches.attention`: the attention function with transformers' signature;
* :mod:`~hf_flash.patches.cache`: DynamicCache layers of the decode families grow in place during decoding;
* :mod:`~hf_flash.patches.graphs`: Llama-family decoder layers replay their decode steps as CUDA graphs;
* :mod:`~hf_flash.patches.flat`: their projections and MLP run batch-1 decode steps through the flat GEMM;
* :mod:`~hf_flash.patches.gpt2`, :mod:`~hf_flash.patches.llama`: per-family plans, applied automatically to
  models loaded with "flashtri" and by hand with :func:`patch_gpt2` / :func:`patch_llama`.

Support table (what "flashtri" does per model family):

==================  ==========================================================================================
family              support
==================  ==========================================================================================
GPT-2               training (attn_pdrop in the kernel, scale_attn_weights, scale_attn_by_inverse_layer_idx,
                    reorder_and_upcast_attn), padded and packed batches, generate() with split-KV decoding
Llama/Mistral/Qwen2 training with GQA, RoPE, sliding window; padded and packed batches; generate() with
                    split-KV decoding on DynamicCache/StaticCache, left-padded batches without per-step gathers,
                    DynamicCache layers that grow in place (no per-token torch.cat), decode steps that rotate q/k
                    and append K/V in one kernel (DynamicCache), the rest of each decoder layer's decode step
                    replayed as CUDA graphs around that attention (:mod:`~hf_flash.patches.graphs`), batch-1
                    decode projections and MLP (gate + up fused) through a flat GEMM (:mod:`~hf_flash.patches.flat`)
other models        the generic path (dense, padded, packed, 4-D masks as attn_bias, softcap, sliding window);
                    attention sinks (s_aux) rejected; decode through the generic varlen/dense kernels
==================  ==========================================================================================
"""

from hf_flash.patches.attention import flashtri_attention_forward
from hf_flash.patches.gpt2 import patch_gpt2
from hf_flash.patches.llama import patch_llama
from hf_flash.patches.registration import NAME, SUPPORTED_RANGE, UnsupportedTransformersError, register

__all__ = ["register", "patch_gpt2", "patch_llama", "flashtri_attention_forward", "NAME", "SUPPORTED_RANGE",
           "UnsupportedTransformersError"]
