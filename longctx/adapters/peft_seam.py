"""The one module through which longctx uses PEFT: `lora` (PEFT's LoRA, applied as PEFT applies it)
and `sdlora` (PEFT's LoRA layer class, built directly on Mamba's out_proj) go through here.

Besides PEFT's public API (`LoraConfig`, `get_peft_model`, the state-dict helpers) this reaches
two names of `peft.tuners.lora` (`LoraLayer`, `Linear`) and `LoraConfig`'s parsing classmethods;
`tests/engine/test_hf_internals_canaries.py` names each with PEFT's version and this module when a release moves it.
PEFT takes seconds to import and only the LoRA-based methods need it, so every function imports
it when first called.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

ADAPTER_NAME = "default"  # PEFT's name of a model's one adapter


def lora_config(**fields: Any) -> Any:
    """PEFT's `LoraConfig(**fields)` (deferred import: see the module docstring)."""
    from peft import LoraConfig

    return LoraConfig(**fields)


def parse_lora_config(fields: dict[str, Any]) -> Any:
    """A `LoraConfig` of a saved adapter_config.json's fields, parsed as `LoraConfig.from_pretrained`
    parses them; PEFT's own TypeError/ValueError/KeyError for fields it rejects."""
    from peft import LoraConfig

    return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**fields))


def apply_lora(model: nn.Module, config: Any) -> nn.Module:
    """`get_peft_model(model, config)`: the PeftModel wrapping `model`; PEFT's ValueError for a
    placement it refuses."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's own tensors of a PeftModel, detached, as PEFT saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state_dict(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Load `weights` (PEFT's saved layout) into a PeftModel's adapter."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, weights)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of `model` that is one of PEFT's LoRA layers, by name."""
    from peft.tuners.lora import LoraLayer  # exported by peft.tuners.lora (its __all__)

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_linear(layer: nn.Linear, config: Any) -> nn.Module:
    """PEFT's LoRA layer around `layer`, built directly (no `get_peft_model` injection), with the
    rank and alpha of `config`, under `ADAPTER_NAME`."""
    from peft.tuners.lora import Linear

    return Linear(layer, ADAPTER_NAME, config=config, r=config.r, lora_alpha=config.lora_alpha)


def lora_pair(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """A PEFT LoRA layer's (A, B) weights: (r, in), (out, r)."""
    return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
