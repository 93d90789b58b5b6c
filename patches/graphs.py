"""CUDA graphs for the decode steps of Llama-family decoder layers under "flashtri".

Why: a default ``generate()`` step of a 32-layer Llama launches about a thousand small kernels (norms,
projections, MLP, residuals), and on the GPU boxes measured the step is bound by the host time of launching them,
not by the GPU (``benchmarks/NOTES.md``: transformers' own step with an attention that does nothing costs more
than the whole step's GPU time). A graph replays a fixed sequence of launches for a few microseconds of host time.

What is captured: each decoder layer's decode step as two graphs around its attention,

* A: the input norm and the q / k / v projections;
* B: the output projection, the residual, the post-attention norm, the MLP and the second residual.

The attention itself (the fused rotary + cache append and the split-KV kernels of
:mod:`hf_flash.patches.llama`) runs between them as usual, with this step's cache slots, lengths and rotary
angles. So the graphs hold no cache pointer, no length and no position: they stay valid while the cache grows,
from step to step and from one ``generate()`` call to the next, and are captured once per (batch, new tokens,
dtype) at a layer's first decode step of that shape. Layer i + 1's graph reads layer i's output buffer directly,
so a step copies the hidden state once (into layer 0).

When a layer's step is replayed (checked at every step, in this order; otherwise the layer's own ``forward``
runs, as without graphs): CUDA tensors (or ``HF_FLASH_DECODE_GRAPHS=emulate``, below); no gradient, not
compiling, not inside someone else's capture, autocast off; a decode step that the fused step accepts (see
:mod:`hf_flash.patches.llama`: a growing DynamicCache layer, at most 16 new tokens, no sliding window, no
``output_attentions``); keyword arguments among those ``generate()`` passes; eval mode; and the layer as it was
at capture: every submodule of a class from ``torch.nn`` or ``transformers`` (PEFT adapters and quantised layers
change the computation through Python state a graph cannot see, so they are never captured), the same
submodules, parameters and buffers (the same tensor objects at the same addresses: a replaced or re-assigned
weight is noticed and the layer is captured anew), no hooks but those present at capture, no global module
hooks. A layer whose capture fails warns once and keeps its own ``forward``.

``HF_FLASH_DECODE_GRAPHS``: unset / ``1``: graphs on CUDA; ``0``: off; ``emulate``: also on the CPU, with a
recorder that replays the captured ATen calls on the same tensors instead of a CUDA graph (graph semantics: no
Python runs at replay, every shape, pointer and scalar is the one recorded). The tests use it to run this
module's logic on the CPU interpreter; it is slower than running the layer.

transformers internals used (read in 5.17 and 5.24): the decoder layers of ``LAYER_CLASSES`` with children
``self_attn``, ``mlp``, ``input_layernorm`` and ``post_attention_layernorm``, whose ``forward`` calls
``self_attn`` once, between the norm and the residual, and returns the hidden state tensor.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import weakref

import torch

from torch.nn.modules import module as _torch_module

from hf_flash.kernels import _launch
from hf_flash.patches._common import stock_class
from hf_flash.patches.registration import NAME

__all__ = ["install", "caller_layer", "LAYER_CLASSES", "STATS", "ENV"]

ENV = "HF_FLASH_DECODE_GRAPHS"
LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_CHILDREN = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
# what generate() passes to a decoder layer in a decode step (5.17: past_key_values, cache_position; 5.24: cache)
_KWARGS = frozenset({"attention_mask", "position_ids", "past_key_values", "cache", "use_cache", "cache_position",
                     "position_embeddings"})
_GRAPHS_PER_LAYER = 4
_CLEAR_WORKSPACES = True  # see _CudaBackend.own_workspaces (False only to measure what it prevents)

# counts for tests and benchmarks: "captured" graphs pairs, "replayed" steps, "eager" decode steps not replayed
STATS: collections.Counter = collections.Counter()

# the capture in progress in this thread (``_state.active``); read by patches.llama's fused forward
_state = threading.local()
# the output buffers of graphs, by id: a layer given one of them as its input reads it in place
_outputs: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
_warned: set = set()
# decoder layer -> its graphs by shape (weak: kept out of the module, so deepcopy / pickling never see them; a
# copied model captures its own)
_GRAPHS: "weakref.WeakKeyDictionary[torch.nn.Module, collections.OrderedDict]" = weakref.WeakKeyDictionary()


def install(layer: torch.nn.Module) -> bool:
    """Give a Llama-family decoder layer the graphed decode ``forward`` (see the module docstring); idempotent.
    False where it does not apply (another class, a subclass's forward, a forward replaced on the instance)."""
    current = layer.__dict__.get("forward")
    if current is not None:
        return getattr(current, "__func__", None) is _graphed_forward
    if stock_class(layer, LAYER_CLASSES) is None or not all(c in layer._modules for c in _CHILDREN):
        return False
    import types

    layer.forward = types.MethodType(_graphed_forward, layer)
    return True


def caller_layer(attn: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose ``forward`` is calling ``attn`` now as its ``self_attn`` (found among the callers'
    frames; used where the attention module is set up lazily, at its first call, without its parent)."""
    frame = sys._getframe(1)
    for _ in range(24):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and owner._modules.get("self_attn") is attn:
            return owner
        frame = frame.f_back
    return None


def _mode() -> str | None:
    value = _launch.env_get(ENV)
    if value == "0":
        return None
    return "emulate" if value == "emulate" else "cuda"


def _graphed_forward(self, *args, **kwargs):
    """The decoder layer's forward: a decode step that qualifies replays the layer's graphs around its
    attention; everything else runs the class's forward."""
    from hf_flash.patches import cache, llama

    cls_forward = type(self).forward
    mode = _mode()
    hidden = args[0] if len(args) == 1 else None
    if (mode is None or hidden is None or (mode == "cuda" and not hidden.is_cuda) or torch.is_grad_enabled()
            or torch.compiler.is_compiling() or self.training or not _KWARGS.issuperset(kwargs)
            or (hidden.is_cuda and torch.cuda.is_current_stream_capturing())):
        return cls_forward(self, *args, **kwargs)
    attn = self._modules["self_attn"]
    # the attention must run the fused step (installed where the module has what it uses), for "flashtri"
    if (getattr(attn.__dict__.get("forward"), "__func__", None) is not llama._fused_forward
            or getattr(attn.config, "_attn_implementation", None) != NAME):
        return cls_forward(self, *args, **kwargs)
    ready = llama._fused_inputs(attn, hidden, kwargs)
    if ready is None and getattr(attn, "_hf_flash_cache_hook", False):
        # the attention's pre-hook makes the cache layer grow in place at its first call with a cache layer
        # (transformers 5.24 makes the layers at the prefill's first update, after the hook ran): do it now
        cache._pre_hook(attn, (), kwargs)
        ready = llama._fused_inputs(attn, hidden, kwargs)
    if ready is None or torch.is_autocast_enabled(hidden.device.type) or _global_hooks() or _collecting():
        STATS["eager"] += 1 if ready is not None else 0
        return cls_forward(self, *args, **kwargs)
    batch, n = hidden.shape[0], hidden.shape[1]
    key = (batch, n, hidden.dtype, hidden.device, torch.is_inference_mode_enabled(), mode)
    graphs = _GRAPHS.get(self)
    if graphs is None:
        graphs = _GRAPHS[self] = collections.OrderedDict()
    rec = graphs.get(key)
    if rec is None or not rec.unchanged(self):
        if graphs.get("failed") or not _capturable(self, attn, hidden):
            STATS["eager"] += 1
            return cls_forward(self, *args, **kwargs)
        graphs.pop(key, None)
        try:
            rec = _capture(self, attn, hidden, kwargs, mode)
        except Exception as e:  # noqa: BLE001 - a layer that cannot be captured keeps its own forward
            graphs["failed"] = True
            _warn_once(f"hf_flash: decode graphs are off for {type(self).__name__} (capture failed: {e}); it "
                       f"runs its own forward.")
            STATS["eager"] += 1
            return cls_forward(self, *args, **kwargs)
        graphs[key] = rec
        while len(graphs) > _GRAPHS_PER_LAYER:
            graphs.popitem(last=False)
    else:
        graphs.move_to_end(key)
    if hidden is not rec.static_in:
        rec.static_in.copy_(hidden)
    rec.a.replay()
    layer, cos, sin, mask = ready
    if llama._fused_attention(attn, rec.q, rec.k, rec.v, layer, cos, sin, mask, out=rec.attn) is None:
        STATS["eager"] += 1  # not expected after the checks above: the layer's own forward, from the start
        return cls_forward(self, *args, **kwargs)
    rec.b.replay()
    STATS["replayed"] += 1
    # a forward hook on the layer may keep the output: give it a copy, not the buffer the next step overwrites
    # (transformers' output-capturing hooks keep nothing unless a call collects outputs, which runs eagerly)
    if self._forward_hooks and not all(_transformers_hook(h) for h in self._forward_hooks.values()):
        return rec.out.clone()
    return rec.out


_graphed_forward.__name__ = "forward"  # pickles as getattr(layer, "forward"): the class's, as in patches.llama


def _global_hooks() -> bool:
    m = _torch_module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or getattr(m, "_global_forward_hooks_always_called", None))


def _capturable(layer: torch.nn.Module, attn: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """Whether the layer's computation is what a graph can hold: modules of torch.nn / transformers only, one
    dtype for the weights, the hidden state and the cache, no hooks inside the layer but hf_flash's cache hook on
    the attention and transformers' output-capturing hooks (the layer's own hooks run outside its forward), no
    ``forward`` replaced on a submodule but hf_flash's (patches/flat.py)."""
    from hf_flash.patches import flat

    for m in layer.modules():
        mod = type(m).__module__
        if not (mod.startswith("torch.nn") or mod.startswith("transformers.")):
            return False
        if m is not layer and (m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
                               or not all(_transformers_hook(h) for h in m._forward_hooks.values())
                               or not all(h is _cache_hook() or _transformers_hook(h)
                                          for h in m._forward_pre_hooks.values())):
            return False
        fwd = m.__dict__.get("forward")
        if m is not layer and m is not attn and fwd is not None and getattr(fwd, "__func__", None) not in flat.FORWARDS:
            return False
        for p in list(m._parameters.values()) + list(m._buffers.values()):
            if p is not None and (p.device != hidden.device or (p.is_floating_point() and p.dtype != hidden.dtype)):
                return False
    return True


def _transformers_hook(fn) -> bool:
    """transformers' output-capturing hooks (installed for output_hidden_states / output_attentions and kept):
    inactive unless a call collects outputs, in which case the step runs without graphs (``_collecting``)."""
    return getattr(fn, "__module__", "").startswith("transformers.")


def _cache_hook():
    from hf_flash.patches import cache

    return cache._pre_hook


_collector: list = []


def _collecting() -> bool:
    """Whether transformers is collecting per-layer outputs in this call (output_hidden_states and the like)."""
    if not _collector:
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:
            _active_collector = None
        _collector.append(_active_collector)
    c = _collector[0]
    return c is not None and bool(c.get())


class _LayerGraphs:
    """One layer's two graphs for one shape, their static tensors, and what must not change for them to hold."""

    __slots__ = ("a", "b", "pool", "static_in", "q", "k", "v", "attn", "out", "children", "watch", "tensors",
                 "cls_forward")

    def unchanged(self, layer: torch.nn.Module) -> bool:
        # (the layer's own hooks run outside its forward; its submodules are held here, never the layer itself,
        # so that the layer can be freed with its graphs)
        if type(layer).forward is not self.cls_forward or layer._modules != self.children:
            return False
        for m, children, fwd, nhooks, npre in self.watch:
            if (m.training or m.__dict__.get("forward") is not fwd or m._modules != children
                    or len(m._forward_hooks) != nhooks or len(m._forward_pre_hooks) != npre):
                return False
        for store, name, t, ptr in self.tensors:
            cur = store.get(name)
            if cur is not t or cur.data_ptr() != ptr:
                return False
        return True


def _watch(layer: torch.nn.Module):
    watch, tensors = [], []
    for m in layer.modules():
        if m is not layer:
            watch.append((m, dict(m._modules), m.__dict__.get("forward"), len(m._forward_hooks),
                          len(m._forward_pre_hooks)))
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None:
                    tensors.append((store, name, t, t.data_ptr()))
    return tuple(watch), tuple(tensors)


class _Capture:
    """The state of a capture in progress: A is being recorded until the attention module splits it."""

    __slots__ = ("attn", "rec", "backend", "split")

    def __init__(self, attn, rec, backend):
        self.attn, self.rec, self.backend, self.split = attn, rec, backend, False

    def at_attention(self, module, hidden: torch.Tensor):
        """Called by the fused forward of ``self.attn`` during a capture, with its input: records the
        projections into A, closes A, opens B and returns the attention module's output as B computes it (from
        the static attention output the eager step fills)."""
        rec, d = self.rec, module.head_dim
        batch, n = hidden.shape[0], hidden.shape[1]
        rec.q = module.q_proj(hidden).view(batch, n, -1, d)
        rec.k = module.k_proj(hidden).view(batch, n, -1, d)
        rec.v = module.v_proj(hidden).view(batch, n, -1, d)
        self.backend.end(rec.a)
        self.split = True
        if rec.attn.shape[2] != rec.q.shape[2]:
            raise RuntimeError(f"the attention has {rec.q.shape[2]} query heads, the config "
                               f"{rec.attn.shape[2]}")
        self.backend.begin(rec.b, rec.pool)
        return module.o_proj(rec.attn.view(batch, n, -1)), None


def active():
    """The :class:`_Capture` in progress in this thread, or None."""
    return getattr(_state, "active", None)


def _capture(layer, attn, hidden, kwargs, mode) -> _LayerGraphs:
    backend = _CudaBackend if mode == "cuda" else _Emulated
    rec = _LayerGraphs()
    rec.cls_forward = type(layer).forward
    rec.children = dict(layer._modules)
    rec.watch, rec.tensors = _watch(layer)
    # the input: the previous layer's output buffer where that is what came, else a buffer of our own
    rec.static_in = hidden if _outputs.get(id(hidden)) is hidden else hidden.clone()
    heads = attn.config.num_attention_heads
    rec.attn = torch.empty((hidden.shape[0], hidden.shape[1], heads, attn.head_dim), dtype=hidden.dtype,
                           device=hidden.device)
    rec.pool = backend.pool()
    rec.a, rec.b = backend.graph(), backend.graph()
    cap = _Capture(attn, rec, backend)
    with backend.stream(hidden.device), backend.own_workspaces():
        backend.begin(rec.a, rec.pool)
        _state.active = cap
        try:
            out = rec.cls_forward(layer, rec.static_in, **kwargs)
        except BaseException:
            _state.active = None
            backend.abort(rec.b if cap.split else rec.a)
            raise
        _state.active = None
        if not cap.split:
            backend.abort(rec.a)
            raise RuntimeError("the layer's forward did not call its attention module's fused step")
        backend.end(rec.b)
    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
        raise RuntimeError(f"the layer's forward returned {type(out).__name__}, not the hidden state")
    rec.out = out
    _outputs[id(out)] = out
    STATS["captured"] += 1
    return rec


class _CudaBackend:
    _streams: dict = {}

    @staticmethod
    def pool():
        return torch.cuda.graph_pool_handle()

    @staticmethod
    def graph():
        return torch.cuda.CUDAGraph()

    @classmethod
    def stream(cls, device):
        s = cls._streams.get(device)
        if s is None:
            s = cls._streams[device] = torch.cuda.Stream(device)
        return _OnStream(s)

    @staticmethod
    @contextlib.contextmanager
    def own_workspaces():
        """cuBLAS keeps a workspace per (handle, stream), made at first use: one made during a capture lives in
        that capture's pool and its address is baked into the graph. Dropping the cached workspaces before and after
        the capture (as torch.compile's CUDA-graph trees do) gives each layer's graphs a workspace of their own
        pool, which outlives them, and leaves no other code (another capture, eager calls, compiled graphs that
        drop the workspaces themselves) sharing or freeing it."""
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None) if _CLEAR_WORKSPACES else None
        if clear is not None:
            clear()
        try:
            yield
        finally:
            if clear is not None:
                clear()

    @staticmethod
    def begin(g, pool):
        g.capture_begin(pool=pool, capture_error_mode="thread_local")

    @staticmethod
    def end(g):
        g.capture_end()

    @staticmethod
    def abort(g):
        try:
            g.capture_end()
        except Exception:  # noqa: BLE001 - the capture is already broken; its error is the one raised
            pass


class _OnStream:
    """Capture on a side stream (a capture cannot use the default stream), ordered after the current one."""

    def __init__(self, stream):
        self.stream, self.ctx = stream, torch.cuda.stream(stream)

    def __enter__(self):
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


class _EmulatedGraph:
    """``HF_FLASH_DECODE_GRAPHS=emulate``: the ATen calls made while capturing, replayed on the same tensors
    (the results written into the tensors the capture produced, so later calls see them), no Python between."""

    def __init__(self):
        self.calls: list = []
        self.mode = None

    def replay(self):
        from torch.utils._pytree import tree_leaves

        with torch.no_grad():
            for func, args, kwargs, out in self.calls:
                got = func(*args, **kwargs)
                for o, g in zip(tree_leaves(out), tree_leaves(got)):
                    if isinstance(o, torch.Tensor) and o is not g and not _same_view(o, g):
                        o.copy_(g)


def _same_view(a: torch.Tensor, b) -> bool:
    return (isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride())


class _Emulated:
    @staticmethod
    def pool():
        return None

    @staticmethod
    def graph():
        return _EmulatedGraph()

    @staticmethod
    def stream(device):
        return contextlib.nullcontext()

    @staticmethod
    def own_workspaces():
        return contextlib.nullcontext()

    @staticmethod
    def begin(g, pool):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                g.calls.append((func, args, kwargs, out))
                return out

        g.mode = _Record()
        g.mode.__enter__()

    @staticmethod
    def end(g):
        g.mode.__exit__(None, None, None)
        g.mode = None

    @staticmethod
    def abort(g):
        if g.mode is not None:
            _Emulated.end(g)


def _warn_once(msg: str) -> None:
    if msg in _warned:
        return
    _warned.add(msg)
    import warnings

    warnings.warn(msg, stacklevel=3)
