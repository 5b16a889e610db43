"""`lora`: LoRA through the PEFT library (Hu et al., 2021) — not re-implemented here.

W x + (alpha / r) · B A x on the recipe's target modules (default q_proj, v_proj in every
layer, r=8, alpha=16). Saved directories are PEFT's own (`PeftModel.from_pretrained` reads
them), and a directory written by PEFT's `save_pretrained` loads here too: its adapter_config.json
is parsed by PEFT's `LoraConfig` and applied by `get_peft_model`, so every option PEFT honours
(rslora, rank/alpha patterns, DoRA, biases, modules_to_save, …) is applied as PEFT applies it;
the few that cannot work on longctx's chunked path are refused (docs/peft-options.md).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from longctx.adapters.base import AdaptedModel, AdapterMethod
from longctx.adapters.insertion import resolve_points
from longctx.adapters.peft_seam import (
    ADAPTER_NAME,
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    lora_config,
    parse_lora_config,
)
from longctx.adapters.recipe import Recipe
from longctx.core.errors import LongctxError
from longctx.engine.state import StateBinding

# Keys of adapter_config.json that are not LoraConfig fields: longctx's own block (directories
# saved before it moved to its own file) and PEFT's runtime-only settings (PEFT drops them too).
_NOT_PEFT_KEYS = ("longctx", "runtime_config")


def _refusal(config: Any) -> str | None:
    """Why `config` cannot run on longctx's chunked path, or None if it can."""
    tokens = getattr(config, "alora_invocation_tokens", None)
    if tokens:
        return (f"alora_invocation_tokens={tokens!r} is not supported: PEFT's activated LoRA looks for the "
                f"invocation tokens in each forward's own input_ids, which on longctx's chunked path hold one "
                f"chunk, not the whole input; use a plain LoRA adapter")
    return None


def peft_lora_config(fields: dict[str, Any], where: str) -> Any:
    """PEFT's own `LoraConfig` of the fields of a saved adapter_config.json (`where` names the
    file in errors), parsed as `LoraConfig.from_pretrained` parses them; a one-line LongctxError
    for a config PEFT rejects or an option longctx cannot honour."""
    if fields.get("peft_type") != "LORA":
        raise LongctxError(f"{where}: peft_type {fields.get('peft_type')!r} is not a LoRA; valid: 'LORA'")
    kwargs = {k: v for k, v in fields.items() if k not in _NOT_PEFT_KEYS}
    try:
        config = parse_lora_config(kwargs)
    except (TypeError, ValueError, KeyError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise LongctxError(f"{where}: PEFT cannot read this LoRA config: {first}") from None
    reason = _refusal(config)
    if reason:
        raise LongctxError(f"{where}: {reason}")
    config.inference_mode = False  # loaded adapters train on, as freshly wrapped ones do
    return config


def recipe_fields_from_peft(config: Any) -> dict[str, Any]:
    """Recipe values describing a PEFT `LoraConfig` (the config itself is what gets applied).
    A regex `target_modules` has no suffix list: `load_adapter` fills the insertion in from the
    modules PEFT matched."""
    targets = config.target_modules or ["q_proj", "v_proj"]
    insertion = tuple(sorted(targets)) if not isinstance(targets, str) else ()
    return {"rank": int(config.r), "alpha": float(config.lora_alpha), "dropout": float(config.lora_dropout),
            "insertion": insertion}


class Lora(AdapterMethod):
    """PEFT's LoRA. `config`: a saved directory's `LoraConfig`, applied as it is; None builds one
    from the recipe (a fresh adapter)."""

    name = "lora"

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def peft_config(self, model: nn.Module, recipe: Recipe) -> Any:
        if self.config is not None:
            return self.config
        points = resolve_points(model, recipe.insertion)  # fails loudly on a bad target
        targets = sorted({p.rsplit(".", 1)[-1] for p in points})
        if recipe.insertion == "sparse-qv":
            targets = sorted(points)  # exact module names: PEFT matches full names too
        return lora_config(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        try:
            peft_model = apply_lora(model, self.peft_config(model, recipe))
        except ValueError as err:  # PEFT's own refusals (e.g. out_proj on Mamba), as one line
            raise LongctxError(f"PEFT refused this LoRA placement: {str(err).splitlines()[0]}") from None
        points = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and len(getattr(m, "lora_A"))]
        return peft_model, points

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        return adapter_state_dict(model)

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        expected = set(self.weights(model))
        if set(weights) != expected:
            super().load_weights(model, weights)  # raises the one-line mismatch error
        load_adapter_state_dict(model, weights)

    def config_fields(self, adapted: AdaptedModel) -> dict[str, Any]:
        config = adapted.model.peft_config[ADAPTER_NAME].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
