"""A KV cache whose buffers are allocated once for the whole input.

transformers' `DynamicLayer` grows by concatenation: each chunk copies the layer's whole cache,
so for a moment a layer holds its old and new cache together and peak memory exceeds the
KV-cache floor by about one layer's cache. `PreallocatedLayer` writes each chunk into a buffer
sized for the known total length and returns views, so peak memory is the floor itself.
A layer's buffer is created on the device of the first keys it receives, so in a model split over
devices (`longctx.engine.placement`) each layer's cache lives on the device that layer runs on.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """DynamicLayer semantics (keys/values are the filled prefix) over a fixed-capacity buffer."""

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
    """A DynamicCache for `config`'s decoder whose every layer is preallocated for `capacity` tokens."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache
