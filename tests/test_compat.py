"""Compatibility shims: the fix that lets Triton <= 3.6's CPU interpreter run with numpy >= 2.4.

The real failure (triton 3.6.0 + numpy 2.4.6 / 2.5.2): every kernel with a runtime loop bound raised
"only 0-dimensional arrays can be converted to Python scalars". CI has a Triton whose interpreter is already
fixed, so the shim is checked here against a stand-in with the old conversion, the way the old interpreter
installs it.
"""

import os

import numpy as np
import pytest

from hf_flash.kernels import _common


class _Scope:  # the interpreter's _LangPatchScope: set_attr records the original, restore undoes in reverse
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, obj.__dict__.get(name, None)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, original = self.changes.pop()
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)


class _Handle:
    def __init__(self, data):
        self.data = data


def _old_patch_lang_tensor(tensor, scope):  # triton 3.6's conversion, verbatim
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def _fixed_patch_lang_tensor(tensor, scope):  # triton 3.9's
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


def _make_tensor_class():
    class Tensor:
        def __init__(self, data):
            self.handle = _Handle(np.asarray(data))
    return Tensor


def test_old_interpreter_conversion_is_patched_and_restored(monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    assert _common.fix_interpreter_scalar_index() is True
    assert _common.fix_interpreter_scalar_index() is False  # idempotent: the patched one is recognised
    Tensor = _make_tensor_class()
    scope = _Scope()
    interpreter._patch_lang_tensor(Tensor, scope)
    scalar = Tensor(np.array([7], dtype=np.int32))  # how the interpreter holds a scalar: shape (1,)
    assert list(range(scalar.__index__())) == list(range(7))
    assert Tensor(np.array(5, dtype=np.int64)).__index__() == 5  # 0-d still works
    scope.restore()
    assert "__index__" not in Tensor.__dict__  # the interpreter's restore removes ours with its own


def test_fixed_interpreter_is_left_alone(monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _fixed_patch_lang_tensor)
    assert _common.fix_interpreter_scalar_index() is False
    assert interpreter._patch_lang_tensor is _fixed_patch_lang_tensor


def test_installed_triton_interpreter_runs_a_runtime_loop_bound():
    """Whatever Triton is installed: a scalar argument as a loop bound works under the interpreter (CI) or on
    the GPU. This is the construct every hf_flash kernel uses."""
    import torch
    import triton
    import triton.language as tl

    from hf_flash.kernels.decode import LAUNCHES  # noqa: F401 - imports _common, which applies the fix

    @triton.jit
    def count(X, n):
        acc = 0.0
        for _ in range(0, n + tl.load(X + 1).to(tl.int32), 4):
            acc += 1.0
        tl.store(X, acc)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    x = torch.tensor([0.0, 3.0], device=device)
    count[(1,)](x, 10)
    assert x[0].item() == 4.0  # range(0, 13, 4)
