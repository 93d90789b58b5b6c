"""Unpad / pad helpers with flash-attn's ``bert_padding`` behaviour, so padded batches run through the varlen
kernels with no wasted work.

``unpad_input`` gathers the real tokens of a padded batch into one (total_tokens, ...) tensor and returns the
int32 ``cu_seqlens`` and the host-side ``max_seqlen`` that :func:`hf_flash.flash_attn_varlen_func` takes;
``pad_input`` scatters the result back. Both are differentiable (index_select / index_put).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["unpad_input", "pad_input", "index_first_axis", "unpad_indices"]


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x.flatten(0, 1)[indices]`` for a (batch, seqlen, ...) tensor, without copying the rest."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """Remove padding.

    Arguments:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen), 1/True for tokens that are kept.
        unused_mask: (batch, seqlen) or None, tokens allocated but not attended (kept in the output, not counted
            in ``seqused``), as in flash-attn.
    Returns:
        hidden_states (total_nnz, ...), indices (total_nnz,) into the flattened batch, cu_seqlens (batch + 1,)
        int32, max_seqlen_in_batch (int), seqused (batch,) int32.

    ``max_seqlen_in_batch`` is read on the host (one synchronisation per call), as in flash-attn; callers that
    own the lengths can pass them to the varlen function directly.
    """
    indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch = unpad_indices(attention_mask, unused_mask)
    return (index_first_axis(hidden_states, indices), indices, cu_seqlens, max_seqlen_in_batch,
            used_seqlens_in_batch)


def unpad_indices(attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """What :func:`unpad_input` derives from the mask alone: (indices, cu_seqlens, max_seqlen_in_batch, seqused),
    so that several tensors under one mask (every layer's K and V) are unpadded with one host read."""
    all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: (total_nnz, ...) -> (batch, seqlen, ...), zeros where padded."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices,), hidden_states)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
