"""Tensors an adapter layer derives from its own weights, kept while those weights stay as they are.

A scan plan (`ssmlora-scan`), an adapter weight cast to a bf16 base's dtype for a GEMM, LoRA-XS's
B R product: each is a pure function of some weights (and of a key such as the chunk length or
the dtype), like a merged LoRA weight, so it is not sequence state and may outlive a sequence.
On a GPU the host issuing operations is these adapters' cost (benchmarks/README.md, P3-GPU), and
each kept tensor is a kernel or more that a layer call no longer issues.

Each entry is stamped with its weights' identity (a weak reference), storage address and
in-place version, so an optimiser step, a load (`copy_`), a `.data` swap or a new tensor rebuilds
it. Nothing is kept while autograd records through the weights: such a result belongs to that
call's graph. The weights must be the layer's own tensors (parameters, buffers), not views made
in the call, whose identity changes every call.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

Stamp = tuple[tuple[weakref.ref, int, int], ...]


def _stamp(weights: tuple[Tensor, ...]) -> Stamp:
    return tuple((weakref.ref(w), w.data_ptr(), w._version) for w in weights)


def _unchanged(stamp: Stamp, weights: tuple[Tensor, ...]) -> bool:
    return len(stamp) == len(weights) and all(
        ref() is w and ptr == w.data_ptr() and version == w._version for (ref, ptr, version), w in zip(stamp, weights))


class DerivedCache:
    """The `capacity` most recently used entries of one layer, key -> (weights' stamp, value).

    A chunked run uses two chunk lengths (full chunks and the ragged last one), generation a third:
    `ssmlora-scan` keeps three plans. A value first built under `torch.inference_mode()` is built
    outside it, so a later call that records a gradient through the input (weights frozen) can
    use it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[Hashable, tuple[Stamp, Any]] = {}  # oldest first

    def __getstate__(self) -> dict[str, Any]:
        """A copy or a pickle (`copy.deepcopy`, `torch.save` of a whole model) starts empty: the
        entries are rebuildable, and a copy's weights are other tensors anyway."""
        return {"capacity": self.capacity, "entries": {}}

    def get(self, key: Hashable, weights: tuple[Tensor, ...], build: Callable[[], Any]) -> Any:
        """build()'s value for `key`, rebuilt only when one of `weights` changed since it was kept."""
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return build()
        kept = self.entries.pop(key, None)
        if kept is None or not _unchanged(kept[0], weights):
            with torch.inference_mode(False), torch.no_grad():  # ordinary constants, usable by any later call
                kept = (_stamp(weights), build())
        self.entries[key] = kept  # now the most recent
        while len(self.entries) > self.capacity:
            del self.entries[next(iter(self.entries))]
        return kept[1]

    def cast(self, name: str, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """`weight` in `dtype` (itself when already so): the operand of a GEMM in the activations'
        dtype (`longctx.adapters.precision`), cast once rather than in every call."""
        if weight.dtype == dtype:
            return weight
        return self.get((name, dtype), (weight,), lambda: weight.to(dtype))
