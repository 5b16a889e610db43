"""`dense`: full fine-tuning of every weight (the dense baseline).

The saved "adapter" is the whole set of parameters (tied weights once), so a dense directory
is as large as the model; it is still refused on a base with another fingerprint.
"""
from __future__ import annotations

from torch import Tensor, nn

from longctx.adapters.base import AdapterMethod
from longctx.adapters.recipe import Recipe
from longctx.engine.state import StateBinding


class Dense(AdapterMethod):
    name = "dense"

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        for param in model.parameters():
            param.requires_grad_(True)
        return model, ["all parameters"]

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in model.named_parameters()}
