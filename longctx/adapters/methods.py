"""The adapter methods, defined once: name -> (module, class), in display order.

A light module (no torch): the CLI, plots and sweep configs read the names from here without
loading any adapter; `get_adapter` imports a method's module the first time it is asked for.
Adding a method is one line here plus its module (docs/howto/add-a-method.md).
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from longctx.core.errors import choice_error

METHODS: dict[str, tuple[str, str]] = {
    "base": ("longctx.adapters.frozen", "FrozenBase"),
    "dense": ("longctx.adapters.dense", "Dense"),
    "lora": ("longctx.adapters.lora", "Lora"),
    "ssmlora": ("longctx.adapters.ssmlora", "SSMLoRA"),
    "ssmlora-scan": ("longctx.adapters.ssmlora_scan", "SSMLoRAScan"),
    "lora-xs": ("longctx.adapters.lora_xs", "LoraXS"),
    "sdlora": ("longctx.adapters.sdlora", "SDLoRA"),
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

# Method instances (`adapters.base.AdapterMethod`), typed `Any` here: naming the class would import torch.
_instances: dict[str, Any] = {}


def get_adapter(name: str) -> Any:
    """The method called `name` (one shared instance), its module imported on first use; a
    one-line error naming the valid methods for any other name."""
    if name not in METHODS:
        raise choice_error("method", name, METHOD_NAMES)
    if name not in _instances:
        module, cls = METHODS[name]
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


class _Adapters(Mapping):
    """name -> method instance, read through `get_adapter`: `name in ADAPTERS` and iteration
    (display order) import nothing."""

    def __getitem__(self, name: str) -> Any:
        if name not in METHODS:
            raise KeyError(name)
        return get_adapter(name)

    def __contains__(self, name: object) -> bool:
        return name in METHODS

    def __iter__(self) -> Iterator[str]:
        return iter(METHOD_NAMES)

    def __len__(self) -> int:
        return len(METHODS)

    def __repr__(self) -> str:
        return f"ADAPTERS({', '.join(METHOD_NAMES)})"


ADAPTERS: Mapping[str, Any] = _Adapters()
