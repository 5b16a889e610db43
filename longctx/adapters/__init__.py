"""Adapter methods: the one table of them, and the two ways to get an adapted model:
`wrap(model, "ssmlora")` (a fresh adapter from adapters/recipes/ssmlora.yaml) and
`load_adapter(model, "runs/x")` (a saved directory, ours or PEFT's LoRA).

`METHODS` (name -> module and class, in display order), `METHOD_NAMES`, `ADAPTERS` (name ->
method, a read-only mapping) and `get_adapter` come from `methods.py`, which imports no torch, so
`import longctx.adapters` stays light for the CLI's choices, the sweep's driver and the plots;
so do `Recipe` and `load_recipe` (`recipe.py`). The names that need torch (`wrap`,
`load_adapter`, `AdaptedModel`, ...) are re-exported lazily from `apply.py` and `base.py` by the
module `__getattr__` below: a fixed table, resolved on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from longctx.adapters.methods import ADAPTERS, METHOD_NAMES, METHODS, get_adapter
from longctx.adapters.recipe import Recipe, load_recipe

_LAZY = {
    "wrap": "longctx.adapters.apply",
    "load_adapter": "longctx.adapters.apply",
    "applicable": "longctx.adapters.apply",
    "read_adapter_config": "longctx.adapters.apply",
    "saved_metadata": "longctx.adapters.apply",
    "AdaptedModel": "longctx.adapters.base",
    "AdapterMethod": "longctx.adapters.base",
    "SequenceState": "longctx.engine.state",
}

__all__ = ["ADAPTERS", "METHODS", "METHOD_NAMES", "Recipe", "get_adapter", "load_recipe", *_LAZY]


def __getattr__(name: str) -> Any:
    """The torch-dependent names of `_LAZY`, imported from their module on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'longctx.adapters' has no attribute {name!r}")
