"""The interface every adapter method shares: recipe, wrapping, parameter report, save/load.

An adapted model is the HF causal LM with the method's modules inserted, plus what is needed to
reproduce and check it: the recipe, the insertion points and a fingerprint of the base it was
built on. Directories use PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`);
the config's `longctx` block records method, recipe and base fingerprint (design §4); for `lora`,
whose adapter_config.json PEFT reads, that block is longctx_config.json beside it.

dtype policy (bf16/fp16 bases; as PEFT's `autocast_adapter_dtype=True`): an adapter's own weights
(ssmlora, ssmlora-scan, lora-xs's R and SVD factors, sdlora's A_log and x_proj deltas, PEFT's LoRA) and
its SSM state are float32 (or the base's dtype if wider). PEFT's LoRA computes its branch in
float32; ssmlora(-scan) and lora-xs run the two width-sized products (x A, · B) as GEMMs in the
layer's dtype with float32 accumulation, their weights cast once and kept while unchanged
(`longctx.adapters.derived`), and their rank-r part in float32 (`longctx.adapters.precision`).
Every branch returns the layer's output dtype. `dense` trains
the base's weights in their own dtype. Adapters save as they are and load into a base of any
dtype (`copy_` casts).
"""
from __future__ import annotations

import abc
import contextlib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from longctx.adapters.recipe import Recipe
from longctx.core.errors import LongctxError
from longctx.core.fileio import atomic_directory
from longctx.core.identity import fingerprint
from longctx.engine.state import SequenceState, StateBinding

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
# longctx's own block, kept out of the adapter_config.json that PEFT reads (a `lora` directory):
# PEFT warns about every key it does not know. Other methods keep it in adapter_config.json.
METADATA_NAME = "longctx_config.json"
FORMAT_VERSION = 1


@functools.cache  # called in every adapted layer's forward: a dict lookup, not a dispatched operation
def adapter_dtype(base: torch.dtype) -> torch.dtype:
    """The dtype of an adapter's weights and state on a base of dtype `base`: float32 or wider."""
    return torch.promote_types(base, torch.float32)


# Fingerprints of a base as it reads once cast to each of these dtypes (design §3: bf16/fp16 work).
FINGERPRINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REDUCED = ("bfloat16", "float16")


def base_dtype(model: nn.Module) -> str:
    """The dtype of the base's floating-point weights, by name (`float32` if it has none)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def dtype_fingerprints(model: nn.Module) -> dict[str, str]:
    """Per dtype name, `identity.fingerprint` of the base with its values rounded to that dtype."""
    return {name: fingerprint(model, as_dtype=dtype) for name, dtype in FINGERPRINT_DTYPES.items()}


def common_dtype(saved: str, given: str) -> str | None:
    """The dtype at which a base saved in `saved` and one given in `given` can be compared: the
    narrower of the two; None for bf16 against fp16 (neither is a rounding of the other)."""
    if saved in _REDUCED and given in _REDUCED and saved != given:
        return None
    narrow = [d for d in (saved, given) if d in _REDUCED]
    return narrow[0] if narrow else "float32"


class AdapterMethod(abc.ABC):
    """One adapter method: how to insert it, which weights are its own, how to restore them."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]] = ("llama", "mamba")  # model families it applies to

    @abc.abstractmethod
    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        """Insert the method into `model` (whose weights are already frozen); return the model to
        run and the insertion points."""

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        """The tensors `save` writes: by default, every trainable parameter."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        own = dict(model.named_parameters())
        expected = set(self.weights(model))
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            bad = (missing or unexpected)[0]
            raise LongctxError(f"adapter weights do not fit the model: {'missing' if missing else 'unexpected'} "
                               f"tensor {bad!r} ({len(missing)} missing, {len(unexpected)} unexpected)")
        with torch.no_grad():
            for name, tensor in weights.items():
                if own[name].shape != tensor.shape:
                    raise LongctxError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, "
                                       f"the model expects {tuple(own[name].shape)}")
                own[name].copy_(tensor)

    def config_fields(self, adapted: "AdaptedModel") -> dict[str, Any]:
        """Extra top-level fields of adapter_config.json (PEFT's own, for `lora`)."""
        return {}


@dataclass
class AdaptedModel:
    """A base model with one adapter method inserted; call it like the HF model it wraps."""

    model: nn.Module
    method: AdapterMethod
    recipe: Recipe
    insertion_points: list[str]
    base_fingerprint: str
    base_name: str
    binding: StateBinding
    base_dtype: str = "float32"  # the base's weights' dtype when wrapped
    base_fingerprints: dict[str, str] = field(default_factory=dict)  # `dtype_fingerprints` of the base

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def config(self) -> Any:
        return self.model.config

    def new_state(self) -> SequenceState:
        return SequenceState()

    def bind(self, state: SequenceState) -> contextlib.AbstractContextManager[SequenceState]:
        """Run forward calls inside this block as chunks of the sequence owning `state`."""
        return self.binding.bound(state)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def save(self, directory: str | Path) -> Path:
        """Write the adapter directory atomically (temporary directory, then rename)."""
        from safetensors.torch import save_file

        fields = self.method.config_fields(self)
        ours = {
            "format_version": FORMAT_VERSION, "method": self.method.name,
            "recipe": self.recipe.to_dict(), "base_fingerprint": self.base_fingerprint,
            "base_dtype": self.base_dtype, "base_fingerprints": self.base_fingerprints,
            "base_name": self.base_name, "insertion_points": self.insertion_points,
            "trainable_parameters": self.trainable_parameters(),
            "total_parameters": self.total_parameters()}
        files = {CONFIG_NAME: fields, METADATA_NAME: ours} if fields else {CONFIG_NAME: {"longctx": ours}}
        weights = {n: t.contiguous().cpu() for n, t in self.method.weights(self.model).items()}
        with atomic_directory(Path(directory)) as tmp:
            save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            for name, content in files.items():
                (tmp / name).write_text(json.dumps(content, indent=2, default=list) + "\n")
        return Path(directory)
