"""The one module through which longctx reaches into transformers' internals.

Everything here relies on something transformers does not document as public API: a class of
its cache layers, its Mamba mixer's slow-path kernels, its attention-mask registry, its private
device-map helpers, a config's private attribute, Trainer's printer callback and checkpoint
file name. When a transformers release moves one of these, this is the only file to change,
and `tests/engine/test_hf_internals_canaries.py` names the internal, the version and this module. Public API
(`AutoModelForCausalLM`, `Trainer`, `DynamicCache`, `AttentionInterface`, configs) is used
where it is needed. Submodules that take seconds to import (the Mamba model, the masking
utilities, the trainer) are imported in the function that needs them, as transformers itself
defers them.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer

# A Trainer checkpoint's last-written file (`transformers.trainer.TRAINER_STATE_NAME`), spelled out
# so that reading checkpoints does not import the trainer; a canary checks that they agree.
TRAINER_STATE_NAME = "trainer_state.json"

# Linear modules whose weight transformers' model reads as a tensor (bypassing any wrapper on the
# module), per model family: an adapter there would be silently ignored.
RAW_WEIGHT_MODULES = {"mamba": {"dt_proj"}}


class PreallocatedLayer(DynamicLayer):
    """DynamicLayer semantics (keys/values are the filled prefix) over a fixed-capacity buffer.

    transformers' `DynamicLayer` grows by concatenation: each chunk copies the layer's whole cache,
    so for a moment a layer holds its old and new cache together. This layer writes each chunk into
    a buffer sized for the known total length and returns views, created on the device of the first
    keys it receives (in a model split over devices, the device that layer runs on)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.filled = capacity, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._key_buffer = key_states.new_empty(b, h, self.capacity, d)  # (B, H_kv, capacity, d)
        self._value_buffer = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.filled = 0
        self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:  # more tokens than planned: grow once, geometrically
            self._grow(max(end, 2 * self.capacity))
        self._key_buffer[:, :, self.filled:end] = key_states
        self._value_buffer[:, :, self.filled:end] = value_states
        self.filled = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        pad = lambda buf: torch.cat([buf, buf.new_empty(*buf.shape[:2], extra, buf.shape[-1])], dim=2)
        self._key_buffer, self._value_buffer = pad(self._key_buffer), pad(self._value_buffer)
        self.capacity = capacity

    def get_seq_length(self) -> int:
        return self.filled if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            self.filled = max(0, self.filled + tokens_to_remove)
            self.keys, self.values = self._key_buffer[:, :, :self.filled], self._value_buffer[:, :, :self.filled]


def preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """A DynamicCache for `config`'s decoder whose every layer is a `PreallocatedLayer` of `capacity` tokens."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


class UnfusedMambaCache:
    """Passed as the cache of a training forward so that a Mamba mixer takes its unfused path.

    Without a cache, a training mixer calls the fused `mamba_inner_fn`, which reads x_proj,
    dt_proj and out_proj weights as tensors: with the mamba-ssm kernels it would bypass any
    adapter on them, and without them it still fails on wrappers that have no `.weight`. This
    stand-in holds nothing: no past state, and updates hand the chunk back unchanged, so the
    unfused path computes exactly what the no-cache path does.
    """

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> None:
        return None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> None:
        return None

    def update_conv_state(self, states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Tensor:
        return states  # (B, D, T): the convolution pads it itself, as without a cache

    def update_recurrent_state(self, states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Tensor:
        return states

    def get_recurrent_states_to_keep(self, layer_idx: int) -> int:  # transformers >= 5.25
        return 0  # no per-token states recorded: the whole chunk takes the parallel scan

    def is_recording_past(self, layer_idx: int) -> bool:  # transformers >= 5.25
        return False


def mamba_mixer_class() -> type:
    """transformers' `MambaMixer` (deferred: the Mamba model module takes seconds to import)."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    return MambaMixer


def mamba_mixers(model: nn.Module) -> list[nn.Module]:
    """Every Mamba mixer of `model`, in module order (none for a model without Mamba layers)."""
    mixer = mamba_mixer_class()
    return [m for m in model.modules() if isinstance(m, mixer)]


def mamba_slow_path() -> tuple[Callable[..., Tensor], Callable[..., Tensor], Callable[..., Any]]:
    """(apply_mask_to_padding_states, causal_conv1d_fn, mamba_selective_scan): the pieces of the
    mixer's slow path that `longctx.engine.mamba` reruns from a carried state (deferred, as above)."""
    from transformers.models.mamba.modeling_mamba import (
        apply_mask_to_padding_states,
        causal_conv1d_fn,
        mamba_selective_scan,
    )

    return apply_mask_to_padding_states, causal_conv1d_fn, mamba_selective_scan


@functools.cache
def mamba_cache_keyword() -> str:
    """The name under which transformers' Mamba model and mixer take the cache: `cache` from
    transformers 5.24 on, `cache_params` before (the old name still works there, deprecated).
    Read off the class, since wrappers such as PEFT's forward only `**kwargs`."""
    parameters = inspect.signature(mamba_mixer_class().forward).parameters
    return "cache" if "cache" in parameters else "cache_params"


@functools.cache
def llama_cache_keyword() -> str:
    """`cache` from transformers 5.24 on (`past_key_values` deprecated there), `past_key_values`
    before; read off the class, since wrappers such as PEFT's forward only `**kwargs`."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def register_attention(name: str, function: Callable[..., Any]) -> None:
    """Register `function` as attention `name`, with flash-attention's mask: none without padding,
    else the 2D (B, N) padding mask (deferred: the masking utilities take seconds to import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)


def attn_implementation(config: Any) -> str | None:
    """The attention a loaded model's config runs (its private `_attn_implementation`), or None."""
    return getattr(config, "_attn_implementation", None)


def planned_device_map(config: Any, device_map: Any, max_memory: dict[Any, int] | None,
                       dtype: torch.dtype | None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Every module's device as `from_pretrained(device_map=…)` would place them: a strategy is
    computed on an empty model, a device or a dict is taken as given. Raises transformers' own
    ValueError for a bad `device_map` (deferred: accelerate and the model classes are heavy)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import _get_device_map, check_and_set_device_map

    requested = check_and_set_device_map(device_map)
    if isinstance(requested, dict):
        return requested
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    return _get_device_map(empty, requested, max_memory, None)


def printer_callback() -> type:
    """Trainer's callback that prints each log dict (deferred: the trainer takes seconds to import)."""
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback
