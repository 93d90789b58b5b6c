"""Helpers shared by the per-family patches."""

from __future__ import annotations

import torch

from hf_flash.patches.attention import LayerPlan, install_decode_path
from hf_flash.patches.registration import NAME, register


def class_names(module: torch.nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def stock_class(module: torch.nn.Module, names) -> type | None:
    """The transformers class (of a ``transformers.models`` module, named in ``names``) among the module's bases
    whose ``forward`` the module runs, or None: no such base, or a subclass overrides its ``forward`` (which may do
    more than a patch that reproduces the stock one)."""
    for cls in type(module).__mro__:
        if cls.__name__ in names and cls.__module__.startswith("transformers.models."):
            return cls if type(module).forward is cls.forward else None
    return None


def apply(model: torch.nn.Module, match, family: str) -> torch.nn.Module:
    """Switch ``model`` to "flashtri" if needed and set the plan of every attention module ``match`` accepts."""
    register()
    plans = [(m, match(m)) for m in model.modules()]
    plans = [(m, p) for m, p in plans if p is not None]
    if not plans:
        raise TypeError(f"patch_{family}: {type(model).__name__} has no {family} attention modules; the generic "
                        f'path serves other models (load them with attn_implementation="{NAME}")')
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) != NAME:
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"patch_{family}: {type(model).__name__} is not a transformers PreTrainedModel; load it "
                            f'with attn_implementation="{NAME}"')
        model.set_attn_implementation(NAME)
    parents = {id(c): m for m in model.modules() for c in m._modules.values() if c is not None}
    for m, p in plans:
        m._hf_flash_plan = p
        install_decode_path(m, p, parents.get(id(m)))
    return model


__all__ = ["class_names", "stock_class", "apply", "LayerPlan"]
