"""Recipes: the hyper-parameters of one adapter method, read from `adapters/recipes/<method>.yaml`.

Plain data, with no torch import: the sweep's driver and the command line validate recipes, and key
adapters by them, without loading a model (`adapters.base` builds the methods from them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from longctx.core.errors import LongctxError
from longctx.core.resources import recipe_dir


@dataclass(frozen=True)
class MethodField:
    """A recipe field that one method reads. `legacy` is the value that method used before the
    field existed: a recipe of that method without the field (an adapter saved then) gets it."""

    method: str
    legacy: float | int
    kind: type  # float or int
    valid: str  # the valid values, as the error message names them
    check: Callable[[float], bool]


# Fields one method reads; for every other method they are None and absent from `to_dict`, and
# setting one is an error. Each method's YAML states the value it trains with.
METHOD_FIELDS: dict[str, MethodField] = {
    # sdlora (longctx.adapters.sdlora): the fraction of each mixer's channels, and of a selected
    # channel's states, frozen by the selection; the optimiser steps of the warm-up before it
    "channel_freeze": MethodField("sdlora", 0.99, float, "a fraction in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "state_freeze": MethodField("sdlora", 0.75, float, "a fraction in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "selection_warmup_steps": MethodField("sdlora", 10, int, "a positive integer", lambda v: v > 0),
    # lora-xs: the standard deviation of R's normal start (0: R starts at zero, the base exactly)
    "r_init_std": MethodField("lora-xs", 1e-5, float, "a finite number >= 0", lambda v: 0.0 <= v < math.inf),
    # ssmlora-scan: the longest of the time scales, log-spaced from 1 token, the decays start at
    "max_timescale": MethodField("ssmlora-scan", 4096.0, float, "a finite number >= 1",
                                 lambda v: 1.0 <= v < math.inf),
}


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one adapter method, as read from `longctx/adapters/recipes/<method>.yaml`.

    insertion: a preset name (`sparse-qv`, `reference-all`, `every-qv`) or a list of module-name
    suffixes (`["q_proj", "v_proj"]`). `train` holds training settings used by `longctx train`.
    The fields of `METHOD_FIELDS` belong to one method each (None for the others).
    """

    method: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    insertion: str | tuple[str, ...] = "sparse-qv"
    learning_rate: float = 1e-4
    detach_state: bool = True
    train: dict[str, Any] = field(default_factory=dict)
    channel_freeze: float | None = None
    state_freeze: float | None = None
    selection_warmup_steps: int | None = None
    r_init_std: float | None = None
    max_timescale: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.insertion, list):
            object.__setattr__(self, "insertion", tuple(self.insertion))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise LongctxError(f"recipe field rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LongctxError(f"recipe field dropout must be in [0, 1), got {self.dropout!r}")
        if float(self.alpha) <= 0:
            raise LongctxError(f"recipe field alpha must be positive, got {self.alpha!r}")
        for name, spec in METHOD_FIELDS.items():
            object.__setattr__(self, name, _method_field(self.method, name, spec, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["insertion"] = self.insertion if isinstance(self.insertion, str) else list(self.insertion)
        return {k: v for k, v in out.items() if k not in METHOD_FIELDS or v is not None}


def _method_field(method: str, name: str, spec: MethodField, value: Any) -> float | int | None:
    """`value` of a method-specific field, checked: None for other methods, `legacy` if unset."""
    if method != spec.method:
        if value is not None:
            raise LongctxError(f"recipe field {name} is a setting of method {spec.method}, not of {method!r}")
        return None
    if value is None:
        return spec.legacy
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (spec.kind is int and not isinstance(value, int)) or not spec.check(value):
        raise LongctxError(f"recipe field {name} must be {spec.valid}, got {value!r}")
    return spec.kind(value)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def make_recipe(method: str, values: dict[str, Any]) -> Recipe:
    """Build a recipe, naming any unknown field and the valid ones."""
    unknown = sorted(set(values) - set(RECIPE_FIELDS))
    if unknown:
        raise LongctxError(f"unknown recipe field {unknown[0]!r} for method {method!r}; "
                           f"valid fields: {', '.join(RECIPE_FIELDS)}")
    return Recipe(**{**values, "method": method})


def load_recipe(method: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """`longctx/adapters/recipes/<method>.yaml` with `overrides` applied on top."""
    path = recipe_dir() / f"{method}.yaml"
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError:
        raise LongctxError(f"no recipe for method {method!r} at {path}") from None
    except yaml.YAMLError as err:
        raise LongctxError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    values.pop("method", None)
    return make_recipe(method, {**values, **(overrides or {})})
