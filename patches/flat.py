"""Flat GEMM for the linear layers of Llama-family decode steps (FlashDecoding++'s flat-GEMM idea).

A decode step of one token per sequence multiplies a single row by every weight matrix of the layer; the time
is the time to read the weights. torch's linear runs cuBLAS's matrix-vector kernels there, which read
Llama-3-8B's weights at 1.1-2.7 TB/s on the H100 (k/v 1.11, q/o 2.09, gate/up 2.72, down 2.60); the flat GEMM of
:mod:`hf_flash.kernels.flat_gemm` reads them at 1.33, 2.13, 2.79 and 2.68, and computes an MLP's
``silu(gate(x)) * up(x)`` in one kernel that reads both weights (2.83 TB/s, against 2.62 for torch's four
kernels); ``benchmarks/NOTES.md``, ninth session. A 32-layer Llama-3-8B StaticCache + torch.compile step at 32k:
8.42 -> 7.79 ms.

What is installed, per Llama / Mistral / Qwen2 decoder layer (with the fused decode of :mod:`.llama`):

* the attention's ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` and the MLP's ``gate_proj`` / ``up_proj`` /
  ``down_proj``, where they are plain ``nn.Linear`` modules with their class's ``forward``, get a ``forward``
  that runs the flat GEMM for a single row and ``torch.nn.functional.linear`` otherwise;
* the MLP (its class's own ``forward``, SiLU activation, no biases on gate / up) gets a ``forward`` that fuses
  the gate and up projections for a single row (its ``down_proj`` is called as usual).

The flat path runs when: one row (a decode step of batch 1: the H100 sweep found no win for 8 rows), no
gradient needed (no input or weight requiring grad while grad mode is on), no autocast, float16 / bfloat16 on
CUDA (or ``HF_FLASH_FLAT_GEMM=1`` under the Triton interpreter, for tests), unit stride along the features,
``HF_FLASH_FLAT_GEMM`` not ``0``; the fused MLP also needs no hooks on the gate / up modules (it bypasses their
calls). Everything else (training, prefill, batches, PEFT's LoRA wrappers, quantised layers, which are not
``nn.Linear``) runs as before; a LoRA layer's base ``nn.Linear`` still takes the flat path under it.

Works eagerly, inside the decode graphs (:mod:`.graphs`) and under ``torch.compile`` (the kernel is the custom
op ``hf_flash::flat_linear``, opaque to the compiler, which a CUDA graph of ``mode="reduce-overhead"`` holds).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from hf_flash.kernels import _launch
from hf_flash.kernels import flat_gemm as _kern
from hf_flash.patches import graphs
from hf_flash.patches._common import stock_class

__all__ = ["install", "FORWARDS", "ENV", "MLP_CLASSES", "ROWS"]

ENV = "HF_FLASH_FLAT_GEMM"
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
# rows the flat path takes (H100, benchmarks/probe_flat_gemm.py: 1 row 1.02-1.20x cuBLAS, 8 rows 0.82-1.08x)
ROWS = 1
_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _flat_nd(x, weight, bias, up_weight):
    """``x @ weight.T (+ bias)`` (or ``silu(...) * (x @ up_weight.T)``) over x's last dimension."""
    y = _kern.flat_linear(x.reshape(-1, x.shape[-1]), weight, bias, up_weight=up_weight)
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("hf_flash::flat_linear", mutates_args=(), device_types=("cuda", "cpu"))
def flat_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   up_weight: torch.Tensor | None) -> torch.Tensor:
    """:func:`_flat_nd` as an op that torch.compile keeps opaque."""
    return _flat_nd(x, weight, bias, up_weight)


@flat_linear_op.register_fake
def _(x, weight, bias, up_weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _flat(x, weight, bias=None, up_weight=None):
    # the custom op where a tracer must see one (torch.compile, an emulated graph capture); else the kernel
    # itself, without the op's dispatch (host time counts in an eager decode step)
    if torch.compiler.is_compiling() or graphs.active() is not None:
        return flat_linear_op(x, weight, bias, up_weight)
    return _flat_nd(x, weight, bias, up_weight)


def _enabled(x: torch.Tensor) -> bool:
    env = _launch.env_get(ENV)
    if env == "0":
        return False
    if x.is_cuda:
        return x.dtype in (torch.float16, torch.bfloat16)
    return env == "1" and _launch.env_get("TRITON_INTERPRET") == "1"


def _flat_ok(x: torch.Tensor, *tensors) -> bool:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.numel() != ROWS * x.shape[-1] or x.stride(-1) != 1:
        return False
    if not _enabled(x) or torch.is_autocast_enabled(x.device.type):
        return False
    grad = torch.is_grad_enabled()
    for t in (x,) + tensors:
        if t is not None and (t.dtype != x.dtype or t.device != x.device or (grad and t.requires_grad)
                              or t.stride(-1) != 1):
            return False
    return True


def _flat_linear_forward(self, input):
    """``nn.Linear.forward``, with the flat GEMM for a single row (see the module docstring)."""
    if _flat_ok(input, self.weight, self.bias):
        return _flat(input, self.weight, self.bias)
    return F.linear(input, self.weight, self.bias)


_SILU: list = []


def _silu_classes() -> tuple:
    """nn.SiLU and transformers' SiLUActivation (what ``ACT2FN["silu"]`` gives, by version)."""
    if not _SILU:
        classes = [torch.nn.SiLU]
        try:
            from transformers.activations import SiLUActivation

            classes.append(SiLUActivation)
        except ImportError:
            pass
        _SILU.append(tuple(classes))
    return _SILU[0]


def _bare(m) -> bool:
    """An ``nn.Linear`` without bias whose call is only its forward, ours: no hooks, no ``forward`` replaced on the
    instance by someone else. The fused kernel skips the call, so nothing may hang on it. Under torch.compile
    the forward check is left out: torch 2.11's dynamo did not trace the instance ``forward`` through
    ``__dict__`` as eager Python does (the fused path never ran compiled); types and hook dicts trace."""
    if type(m) is not torch.nn.Linear or m.bias is not None or m._forward_hooks or m._forward_pre_hooks:
        return False
    return (torch.compiler.is_compiling()
            or getattr(m.__dict__.get("forward"), "__func__", None) is _flat_linear_forward)


def _flat_mlp_forward(self, x):
    """The MLP's forward: for a single row, ``silu(gate(x)) * up(x)`` in one kernel, then ``down_proj``."""
    gate, up = self.gate_proj, self.up_proj
    if (_bare(gate) and _bare(up) and isinstance(self.act_fn, _silu_classes()) and not _global_hooks()
            and gate.weight.shape == up.weight.shape and _flat_ok(x, gate.weight, up.weight)):
        return self.down_proj(_flat(x, gate.weight, None, up.weight))
    return type(self).forward(self, x)


# bound methods pickle as getattr(module, "forward"): a model saved whole loads with the class's forward
_flat_linear_forward.__name__ = "forward"
_flat_mlp_forward.__name__ = "forward"
FORWARDS = (_flat_linear_forward, _flat_mlp_forward)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def install(layer: torch.nn.Module) -> int:
    """Install the flat forwards on a decoder layer's attention projections and MLP (see the module docstring);
    idempotent. Returns how many modules have them. A module whose ``forward`` someone else replaced on the
    instance (accelerate's hooks), or of another class, is left alone."""
    count = 0
    for parent_name, names in _LINEARS.items():
        parent = layer._modules.get(parent_name)
        if parent is None:
            continue
        for name in names:
            m = parent._modules.get(name)
            if type(m) is not torch.nn.Linear:
                continue
            current = m.__dict__.get("forward")
            if current is None:
                m.forward = types.MethodType(_flat_linear_forward, m)
                count += 1
            elif getattr(current, "__func__", None) is _flat_linear_forward:
                count += 1
    mlp = layer._modules.get("mlp")
    if mlp is not None:
        current = mlp.__dict__.get("forward")
        if current is None and stock_class(mlp, MLP_CLASSES) is not None:
            mlp.forward = types.MethodType(_flat_mlp_forward, mlp)
            count += 1
        elif getattr(current, "__func__", None) is _flat_mlp_forward:
            count += 1
    return count
