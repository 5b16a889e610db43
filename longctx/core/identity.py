"""Every identity hash of longctx, in one place: of a base's weights, of a base's files, of an
adapter's training inputs, of a results cell and of a sweep's cell group.

A hash here decides what is reused (an adapter, a finished cell) and what is refused (an adapter on
another base), so each is defined once and its inputs are spelled out in its docstring.
"""
from __future__ import annotations

import hashlib
import re

import torch
from torch import nn


def fingerprint(model: nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """Hash of the base's architecture, parameter names/shapes and leading weight values.

    Cheap (a few values per tensor) yet distinguishes two checkpoints of one architecture, so an
    adapter trained on one base is refused on another. Meta tensors contribute shapes only.
    `as_dtype`: hash the values as they read once cast to that dtype, so a float32 base and its
    bf16 copy agree at bfloat16 (casting rounds the same way whatever did it).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    for name, param in model.named_parameters():
        clean = re.sub(r"(base_model\.model\.|\.base_layer)", "", name)
        digest.update(f"{clean}:{tuple(param.shape)};".encode())
        if param.device.type != "meta":
            head = param.detach().reshape(-1)[:16]
            head = (head if as_dtype is None else head.to(as_dtype)).to(torch.float32).cpu()  # (≤16,)
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]
