"""`lora`: LoRA through the PEFT library (Hu et al., 2021) — not re-implemented here.

W x + (alpha / r) · B A x on the recipe's target modules (default q_proj, v_proj in every
layer, r=8, alpha=16). Saved directories are PEFT's own (`PeftModel.from_pretrained` reads
them), and a directory written by PEFT's `save_pretrained` loads here too.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from longctx.adapters.base import AdapterMethod, AdaptedModel, Recipe
from longctx.adapters.insertion import resolve_points
from longctx.adapters.state import StateBinding
from longctx.errors import LongctxError


def recipe_fields_from_peft(config: dict[str, Any]) -> dict[str, Any]:
    """Recipe values of a PEFT LoRA adapter_config.json."""
    targets = config.get("target_modules") or ["q_proj", "v_proj"]
    if isinstance(targets, str):
        raise ValueError(f"regex target_modules {targets!r} are not supported; use a list")
    return {"rank": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout", 0.0)), "insertion": tuple(sorted(targets))}


class Lora(AdapterMethod):
    name = "lora"

    def peft_config(self, model: nn.Module, recipe: Recipe) -> Any:
        from peft import LoraConfig

        points = resolve_points(model, recipe.insertion)  # fails loudly on a bad target
        targets = sorted({p.rsplit(".", 1)[-1] for p in points})
        if recipe.insertion == "sparse-qv":
            targets = sorted(points)  # exact module names: PEFT matches full names too
        return LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        from peft import get_peft_model

        try:
            peft_model = get_peft_model(model, self.peft_config(model, recipe))
        except ValueError as err:  # PEFT's own refusals (e.g. out_proj on Mamba), as one line
            raise LongctxError(f"PEFT refused this LoRA placement: {str(err).splitlines()[0]}") from None
        points = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and len(getattr(m, "lora_A"))]
        return peft_model, points

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.weights(model))
        if set(weights) != expected:
            super().load_weights(model, weights)  # raises the one-line mismatch error
        set_peft_model_state_dict(model, weights)

    def config_fields(self, adapted: AdaptedModel) -> dict[str, Any]:
        config = adapted.model.peft_config["default"].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
