"""Launch a compiled Triton kernel again without ``JITFunction.run``'s per-call work.

``kernel[grid](*args)`` binds every argument, builds a specialization key from all of them and looks the
compiled kernel up before it launches. A 32-layer model pays that twice per layer per generated token, for
kernels that run ~10 us at 4k tokens of context. Measured on the GPU box (triton 3.6, a slow host where a
``torch.add`` launch took 10 us): one split-KV decode call (split + combine launches, output allocations) took
125 us of host time with this launcher against 188 us through ``kernel[grid]`` (logs_2026-11-25c/probe_host_d.log).

:func:`launch` keeps, per kernel, the compiled kernels it has seen under a key of what Triton specializes on
(each tensor's dtype and 16-byte alignment, each int's ``== 1`` / ``% 16 == 0`` / 32-bit range, the constexpr
values and launch options) and calls the compiled kernel's launcher directly when the key is known. The first
launch of a key, any launch while Triton's launch hooks are set (profilers), the CPU interpreter and
``HF_FLASH_DIRECT_LAUNCH=0`` go through ``kernel[grid](...)`` as usual. The launcher's calling convention
(grid, stream, function, packed metadata, launch metadata, the two hooks, then every parameter in order,
constexprs included) is the one ``JITFunction.run`` uses in triton 3.3 to 3.9; a kernel object without it
falls back to the normal path for good.
"""

from __future__ import annotations

import os

import torch

__all__ = ["launch", "run_compiled", "can_run_directly", "direct_launch_enabled", "env_get", "STATS"]

# direct / normal launches, for tests that must show which path ran
STATS = {"direct": 0, "normal": 0}

_INT32 = (-(2**31), 2**31 - 1)


# CPython keeps os.environ's values in this dict (bytes keys and values on POSIX), updated by every os.environ
# assignment and deletion (pytest's monkeypatch.setenv included). Reading it costs a dict lookup, against ~1 us for
# os.environ.get (key and value encoding), which a decode step pays several times per layer.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEYS: dict = {}


def env_get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, at dict speed where the interpreter allows it."""
    if _ENV_DATA is None:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = _ENV_DATA.get(key)
    return default if value is None else os.fsdecode(value)


def direct_launch_enabled() -> bool:
    return env_get("HF_FLASH_DIRECT_LAUNCH", "1") != "0" and env_get("TRITON_INTERPRET") != "1"


def _int_flags(x: int) -> int:
    # what Triton's binder specializes an int argument on: == 1, divisible by 16, outside int32
    return (x == 1) | ((x % 16 == 0) << 1) | ((not _INT32[0] <= x <= _INT32[1]) << 2)


try:
    from triton import knobs as _knobs
except ImportError:  # triton < 3.3: no knobs module
    _knobs = None


def _no_hooks() -> bool:
    """No launch hook is set (triton 3.6 keeps them as HookChain objects, empty unless a profiler adds one)."""
    if _knobs is None:
        return True
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and (not hasattr(hook, "calls") or hook.calls):
            return False
    return True


class _Cache:
    """Per kernel: its parameter names, which of them are constexprs, and (from the first call) which positions
    hold tensors and which ints, so a key costs one pass over those positions."""

    __slots__ = ("kernels", "names", "constexprs", "ptr_idx", "int_idx", "broken")

    def __init__(self, fn, values):
        self.kernels: dict = {}
        self.names = tuple(fn.arg_names)
        constexpr_names = {p.name for p in fn.params if p.is_constexpr}
        self.constexprs = tuple(i for i, n in enumerate(self.names) if n in constexpr_names)
        runtime = [i for i in range(len(self.names)) if i not in self.constexprs]
        self.ptr_idx = tuple(i for i in runtime if isinstance(values[i], torch.Tensor))
        self.int_idx = tuple(i for i in runtime if type(values[i]) is int)
        self.broken = False


def can_run_directly(kernel) -> bool:
    """``kernel`` (what ``fn[grid](...)`` returned) has the launcher :func:`run_compiled` calls."""
    return all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata"))


def run_compiled(kernel, grid, device: int, values) -> None:
    """Launch a compiled kernel on the current stream of ``device`` with every parameter value in order."""
    g = tuple(grid) + (1, 1)
    stream = torch._C._cuda_getCurrentRawStream(device)
    kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *values)
    STATS["direct"] += 1


def launch(fn, grid, args: dict, *, num_warps: int, num_stages: int = 1, launch_pdl: bool = False):
    """``fn[grid](**args, num_warps=..., num_stages=...)``, through the compiled kernel's launcher once known.

    ``args`` maps every parameter name of ``fn`` to its value, constexprs included (their values go into the
    key as they are). A parameter gets the same kind of value (tensor, int, float) at every call.
    ``launch_pdl``: launch as a programmatic dependent launch (Hopper and later; the kernel must call
    ``gdc_wait`` before it reads what the previous kernel on the stream writes).
    """
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if launch_pdl:
        opts["launch_pdl"] = True
    if not direct_launch_enabled():
        STATS["normal"] += 1
        return fn[tuple(grid)](**args, **opts)
    cache = getattr(fn, "_hf_flash_launch", None)
    if cache is None:
        cache = _Cache(fn, [args[n] for n in fn.arg_names])
        fn._hf_flash_launch = cache
    direct = not cache.broken and _no_hooks()
    if direct:
        values = [args[n] for n in cache.names]
        device = torch.cuda.current_device()
        key = (device, num_warps, num_stages, launch_pdl, tuple([values[i] for i in cache.constexprs]),
               tuple([(values[i].dtype, values[i].data_ptr() % 16 == 0) for i in cache.ptr_idx]),
               tuple([_int_flags(values[i]) for i in cache.int_idx]))
        kernel = cache.kernels.get(key)
        if kernel is not None:
            run_compiled(kernel, grid, device, values)
            return kernel
    kernel = fn[tuple(grid)](**args, **opts)
    STATS["normal"] += 1
    if direct:
        if can_run_directly(kernel):
            cache.kernels[key] = kernel
        else:
            cache.broken = True
    return kernel
