"""Where adapters go: insertion points by module-name pattern per model family.

Presets (design §4, from the SSMLoRA reference code):
- `sparse-qv`: q_proj in even layers, v_proj in odd layers, each point with its own state key.
- `reference-all`: `sparse-qv` plus o_proj of every layer sharing one key, gate/up/down_proj of
  every layer sharing one key each, and a classification head (`score`) if present.
- `every-qv`: q_proj and v_proj in every layer (LoRA's default), each with its own key.
A list of module-name suffixes selects every linear module ending in one of them.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from longctx.adapters.recipe import Recipe
from longctx.core.errors import LongctxError
from longctx.engine.family import model_family
from longctx.engine.hf_internals import RAW_WEIGHT_MODULES
from longctx.engine.state import StateBinding

PRESETS = ("sparse-qv", "reference-all", "every-qv")
_LAYER = re.compile(r"layers\.(\d+)\.")


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def resolve_points(model: nn.Module, insertion: str | tuple[str, ...]) -> dict[str, str]:
    """Map each insertion point (module name) to its state key, in layer order."""
    family = model_family(model)
    linears = linear_modules(model)
    if isinstance(insertion, str):
        if insertion not in PRESETS:
            raise LongctxError(f"unknown insertion preset {insertion!r}; valid choices: "
                               f"{', '.join(PRESETS)}, or a list of module-name suffixes")
        points = _preset_points(family, insertion, linears)
    else:
        points = {n: n for n in linears if n.rsplit(".", 1)[-1] in insertion}
    raw = sorted({n.rsplit(".", 1)[-1] for n in points} & RAW_WEIGHT_MODULES.get(family, set()))
    if raw:
        raise LongctxError(f"insertion point {raw[0]!r} cannot be adapted on a {family} model: transformers reads its "
                           f"weight directly instead of calling the module, so an adapter there would be silently "
                           f"ignored; adaptable: in_proj, x_proj, out_proj")
    if not points:
        found = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise LongctxError(f"insertion {insertion!r} matched no module of this {family} model; "
                           f"linear modules found: {', '.join(found) or 'none'}")
    return points


# On Mamba the presets mirror their Llama meaning with the mixer's projections that read the token
# stream: in_proj for q_proj, x_proj for v_proj (every-qv: both in every layer; sparse-qv: in_proj
# in even layers, x_proj in odd ones; reference-all: in_proj, x_proj and out_proj everywhere).
MAMBA_PRESETS = {"every-qv": ("in_proj", "x_proj"), "sparse-qv": ("in_proj", "x_proj"),
                 "reference-all": ("in_proj", "x_proj", "out_proj")}


def _mamba_preset_points(preset: str, linears: dict[str, nn.Linear]) -> dict[str, str]:
    points: dict[str, str] = {}
    for name in linears:
        layer, leaf = _layer_index(name), name.rsplit(".", 1)[-1]
        if layer is None or leaf not in MAMBA_PRESETS[preset]:
            continue
        if preset != "sparse-qv" or leaf == ("in_proj" if layer % 2 == 0 else "x_proj"):
            points[name] = name
    return points


def _preset_points(family: str, preset: str, linears: dict[str, nn.Linear]) -> dict[str, str]:
    if family == "mamba":
        return _mamba_preset_points(preset, linears)
    points: dict[str, str] = {}
    for name in linears:
        layer, leaf = _layer_index(name), name.rsplit(".", 1)[-1]
        if layer is None:
            if preset == "reference-all" and leaf == "score":
                points[name] = "score"
            continue
        if preset == "every-qv" and leaf in ("q_proj", "v_proj"):
            points[name] = name
        elif preset != "every-qv" and leaf == ("q_proj" if layer % 2 == 0 else "v_proj"):
            points[name] = name
        elif preset == "reference-all" and leaf in ("o_proj", "gate_proj", "up_proj", "down_proj"):
            points[name] = leaf  # one shared key per projection type, chained across layers
    return points


def insert_stateful_layers(model: nn.Module, recipe: Recipe, binding: StateBinding, layer_cls: type,
                           own_keys: bool = False) -> list[str]:
    """Wrap every insertion point in `layer_cls(layer, rank, alpha, dropout, key, binding, detach)`.

    Keys come from the preset (shared keys chain points), or are the module names (`own_keys`).
    The binding's hooks are installed on `model`; returns the insertion points in layer order.
    """
    points = resolve_points(model, recipe.insertion)
    replace_modules(model, list(points), lambda name, layer: layer_cls(
        layer, recipe.rank, recipe.alpha, recipe.dropout, name if own_keys else points[name], binding,
        recipe.detach_state))
    binding.install(model)
    return list(points)


def replace_modules(model: nn.Module, names: list[str], build: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Swap each named linear module for `build(name, module)`."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, build(name, getattr(parent, leaf)))
