"""`base`: the frozen base model with nothing inserted — the zero-shot reference."""
from __future__ import annotations

from torch import nn

from longctx.adapters.base import AdapterMethod
from longctx.adapters.recipe import Recipe
from longctx.engine.state import StateBinding


class FrozenBase(AdapterMethod):
    name = "base"

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        return model, []
