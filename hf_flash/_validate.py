"""Input validation shared by the public functions: one check per argument, each error names the argument."""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreter_enabled():
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            f"{name} is on the CPU: hf_flash's Triton kernels run on a CUDA GPU, or on the CPU only through "
            "Triton's interpreter (set TRITON_INTERPRET=1 before triton is imported; slow, for tests)."
        )
    raise RuntimeError(f"{name} is on device '{t.device}'; accepted: a CUDA device (or the CPU under "
                       "TRITON_INTERPRET=1).")


def check_tensor(t, name: str, ndim: int, dtype=None, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: float16, bfloat16, float32")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {like.dtype}; they must match")
        if t.device != like.device:
            raise RuntimeError(f"{name} is on {t.device} but q is on {like.device}; they must be on one device")
    check_device(t, name)
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride(-1) == 1), got strides "
                         f"{t.stride()}; call .contiguous() on it")


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int]:
    """Dense (batch, seqlen, heads, headdim) q, k, v: returns (batch, seqlen_q, nheads, headdim, seqlen_k,
    nheads_k) after checking each tensor, the shared batch, k/v shapes, head dims and the GQA head ratio."""
    check_tensor(q, "q", 4)
    check_tensor(k, "k", 4, like=q)
    check_tensor(v, "v", 4, like=q)
    batch, seqlen_q, nheads, d = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k's head dim ({k.shape[3]}) must equal q's ({d})")
    check_headdim(d)
    check_heads(nheads, k.shape[2])
    return batch, seqlen_q, nheads, d, k.shape[1], k.shape[2]


def check_heads(nheads: int, nheads_k: int, what: str = "k") -> None:
    if nheads_k <= 0 or nheads % nheads_k:
        raise ValueError(f"the number of heads of q ({nheads}) must be a multiple of that of {what} ({nheads_k})")


def check_headdim(d: int, name: str = "q") -> None:
    if d < 1 or d > MAX_HEADDIM:
        raise ValueError(f"{name}'s head dim is {d}; accepted: 1 to {MAX_HEADDIM}")


def check_window(window_size) -> tuple[int, int]:
    try:
        left, right = (int(x) for x in window_size)
    except Exception:  # noqa: BLE001 - re-raised with the argument name
        raise ValueError(f"window_size must be a pair (left, right) of ints, got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded; got {window_size!r}")
    return left, right


def check_dropout(dropout_p) -> float:
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return p


def check_softcap(softcap) -> float:
    c = float(softcap)
    if c < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    return c


def check_scale(softmax_scale, headdim: int) -> float:
    if softmax_scale is None:
        return headdim ** -0.5
    s = float(softmax_scale)
    if not s > 0 or s != s:
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale}")
    return s


def check_alibi(alibi_slopes, batch: int, nheads: int, q: torch.Tensor):
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError("alibi_slopes must be a float32 tensor of shape (nheads,) or (batch, nheads)")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.shape not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        raise RuntimeError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    if alibi_slopes.stride(-1) != 1:
        raise ValueError("alibi_slopes must be contiguous in its last dimension")
    return alibi_slopes


def check_attn_bias(attn_bias, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, q: torch.Tensor):
    """Returns the bias as a 4-D view (batch|1, nheads|1, seqlen_q|1, seqlen_k), never expanded in memory."""
    if attn_bias is None:
        return None
    if not isinstance(attn_bias, torch.Tensor):
        raise TypeError("attn_bias must be a float or bool tensor broadcastable to (batch, nheads, seqlen_q, "
                        "seqlen_k)")
    if attn_bias.dtype not in (torch.bool, torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attn_bias has dtype {attn_bias.dtype}; accepted: bool (True = attend), float16, "
                        "bfloat16, float32")
    if attn_bias.device != q.device:
        raise RuntimeError(f"attn_bias is on {attn_bias.device} but q is on {q.device}")
    shape = tuple(attn_bias.shape)
    target = (batch, nheads, seqlen_q, seqlen_k)
    if attn_bias.dim() > 4:
        raise ValueError(f"attn_bias must have at most 4 dimensions, got shape {shape}")
    full = (1,) * (4 - attn_bias.dim()) + shape
    for i, (got, want, what) in enumerate(zip(full, target, ("batch", "nheads", "seqlen_q", "seqlen_k"))):
        if got != want and (got != 1 or i == 3):
            accepted = f"{want}" if i == 3 else f"{want} or 1"
            raise ValueError(f"attn_bias of shape {shape} does not broadcast to (batch, nheads, seqlen_q, "
                             f"seqlen_k) = {target}: its {what} dimension is {got}, accepted {accepted}")
    bias = attn_bias.reshape(full) if attn_bias.dim() < 4 else attn_bias
    if bias.stride(3) != 1 and full[3] != 1:
        raise ValueError("attn_bias must be contiguous in its last dimension")
    return bias
