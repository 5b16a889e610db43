"""Applying a method to a base: `wrap` (a fresh adapter) and `load_adapter` (a saved directory).

    adapted = wrap(model, "ssmlora")          # fresh adapter from adapters/recipes/ssmlora.yaml
    adapted = load_adapter(model, "runs/x")   # a saved directory (ours or PEFT's LoRA)

A LoRA directory's adapter_config.json is PEFT's own: PEFT parses it (`lora.peft_lora_config`)
and applies it, so it loads as `PeftModel.from_pretrained` loads it. Callers import these from
`longctx.adapters`; the methods themselves are named in `longctx.adapters.methods`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from longctx.adapters.base import (
    CONFIG_NAME,
    METADATA_NAME,
    WEIGHTS_NAME,
    AdaptedModel,
    AdapterMethod,
    base_dtype,
    common_dtype,
    dtype_fingerprints,
)
from longctx.adapters.lora import Lora, peft_lora_config, recipe_fields_from_peft
from longctx.adapters.methods import METHOD_NAMES, get_adapter
from longctx.adapters.recipe import Recipe, load_recipe, make_recipe
from longctx.core.errors import LongctxError
from longctx.core.identity import fingerprint
from longctx.engine.family import model_family
from longctx.engine.mamba import carry_ssm_state
from longctx.engine.state import StateBinding


def applicable(methods: list[str], model: nn.Module) -> list[str]:
    """The methods that apply to `model`'s family; a single method is kept so that it can fail
    with its own message."""
    family = model_family(model)
    return methods if len(methods) == 1 else [m for m in methods if family in get_adapter(m).families]


def wrap(model: nn.Module, method: str | AdapterMethod, recipe: Recipe | None = None, seed: int = 0,
         **overrides: Any) -> AdaptedModel:
    """Insert `method` (a name, or a method object such as a loaded directory's `Lora(config)`) into
    `model` (in place), freezing the base's own weights.

    The recipe defaults to `longctx/adapters/recipes/<method>.yaml` with `overrides` on top. Adapter weights are
    initialised from `seed` without disturbing the global RNG.
    """
    impl = method if isinstance(method, AdapterMethod) else get_adapter(method)
    recipe = recipe or load_recipe(impl.name, overrides)
    base_fp, base_fps, dtype = fingerprint(model), dtype_fingerprints(model), base_dtype(model)
    base_name = str(getattr(model.config, "longctx_base_name", getattr(model.config, "_name_or_path", "")))
    for param in model.parameters():
        param.requires_grad_(False)
    binding, training = StateBinding(), model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapted_model, points = impl.apply(model, recipe, binding)
    adapted_model.train(training)  # inserted modules follow the base's train/eval mode
    if model_family(adapted_model) == "mamba":  # chunk carry + adapter-honouring training path
        carry_ssm_state(adapted_model)
    return AdaptedModel(adapted_model, impl, recipe, points, base_fp, base_name, binding, dtype, base_fps)


def read_adapter_config(directory: str | Path, name: str = CONFIG_NAME) -> dict[str, Any]:
    """The JSON object in `directory`/`name`, or a one-line error saying what is wrong."""
    path = Path(directory)
    if not path.is_dir():
        raise LongctxError(f"adapter directory {str(directory)!r} does not exist")
    try:
        config = json.loads((path / name).read_text())
    except OSError:
        raise LongctxError(f"adapter directory {str(directory)!r} has no {name}") from None
    except json.JSONDecodeError as err:
        raise LongctxError(f"{path / name} is corrupt: {err}") from None
    if not isinstance(config, dict):
        raise LongctxError(f"{path / name} is corrupt: expected a JSON object")
    return config


def saved_metadata(directory: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """longctx's own block of a saved adapter (method, recipe, base fingerprint): in
    longctx_config.json next to a LoRA directory's adapter_config.json (which PEFT reads), else
    the `longctx` key of adapter_config.json (other methods, and LoRA directories saved before);
    empty for a directory written by PEFT. `config`: its adapter_config.json, if already read."""
    if (Path(directory) / METADATA_NAME).is_file():
        return read_adapter_config(directory, METADATA_NAME)
    ours = (config if config is not None else read_adapter_config(directory)).get("longctx")
    return ours if isinstance(ours, dict) else {}


def _method_and_recipe(config: dict[str, Any], directory: Path) -> tuple[AdapterMethod, Recipe, dict[str, Any]]:
    """(method, recipe, longctx's own block: empty for a directory written by PEFT). A LoRA
    directory's method carries the LoraConfig PEFT parsed from adapter_config.json."""
    ours = saved_metadata(directory, config)
    where = str(directory / CONFIG_NAME)
    if "method" in ours:
        method = get_adapter(ours["method"])
        fields = {k: v for k, v in ours.get("recipe", {}).items() if k != "method"}
        if method.name == "lora" and "peft_type" in config:
            method = Lora(peft_lora_config(config, where))
        return method, make_recipe(method.name, fields), ours
    if config.get("peft_type") == "LORA":  # written by PEFT's save_pretrained
        peft = peft_lora_config(config, where)
        return Lora(peft), make_recipe("lora", recipe_fields_from_peft(peft)), {}
    raise LongctxError(f"{where} names no method (no 'longctx' block and peft_type "
                       f"{config.get('peft_type')!r}); valid methods: {', '.join(METHOD_NAMES)}")


def load_adapter(model: nn.Module, directory: str | Path) -> AdaptedModel:
    """Rebuild the adapter saved in `directory` on `model`, refusing a different base."""
    directory = Path(directory)
    method, recipe, saved = _method_and_recipe(read_adapter_config(directory), directory)
    _check_base(model, saved, directory)
    try:
        weights = load_file(str(directory / WEIGHTS_NAME))
    except (OSError, SafetensorError) as err:
        raise LongctxError(f"cannot read {directory / WEIGHTS_NAME}: {err}") from None
    adapted = wrap(model, method, recipe)
    if not adapted.recipe.insertion:  # a PEFT regex target_modules: the modules it matched
        adapted.recipe = dataclasses.replace(adapted.recipe, insertion=tuple(adapted.insertion_points))
    try:
        adapted.method.load_weights(adapted.model, weights)
    except RuntimeError as err:
        raise LongctxError(f"adapter weights in {str(directory)!r} do not fit the model: "
                           f"{str(err).splitlines()[0]}") from None
    return adapted


def _check_base(model: nn.Module, saved: dict[str, Any], directory: Path) -> None:
    """Refuse a base other than the one the adapter was made on. The same checkpoint in another
    dtype (an adapter trained on float32 loaded on its bf16 copy, or back) is the same base."""
    saved_fp, actual_fp = saved.get("base_fingerprint"), fingerprint(model)
    if saved_fp is None or saved_fp == actual_fp:
        return
    saved_dtype, given_dtype = str(saved.get("base_dtype", "float32")), base_dtype(model)
    common = common_dtype(saved_dtype, given_dtype)
    by_dtype = saved.get("base_fingerprints") or {}
    if saved_dtype != given_dtype and common is None:
        raise LongctxError(f"adapter {str(directory)!r} was made on a {saved_dtype} base; it cannot be checked "
                           f"against this {given_dtype} one: load the base in {saved_dtype} or float32")
    if common is not None and common in by_dtype and by_dtype[common] == dtype_fingerprints(model)[common]:
        return
    raise LongctxError(f"adapter {str(directory)!r} was made for base {saved_fp}, but the given "
                       f"base has fingerprint {actual_fp}: load it on the base it was trained on")
