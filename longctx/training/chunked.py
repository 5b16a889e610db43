"""Chunked training with carried state (truncated back-propagation through chunks).

A training sequence runs through the same chunked path as evaluation (`runner.forward_chunk`):
the KV cache and the adapter's `SequenceState` flow from chunk to chunk, so `ssmlora`'s
transition matrix C sees the non-zero state it meets at evaluation time (in an unchunked call
every `sparse-qv` point starts from zeros and C's gradient is exactly 0). At each chunk
boundary the carried cache and state are detached, as the SSMLoRA reference code detaches its
state between calls: a chunk's loss back-propagates through that chunk only, so activation
memory is bounded by the chunk, not the sequence, and a chunk with no answer token contributes
no gradient at all and runs without autograd.

The loss is the mean next-token cross-entropy over the labelled tokens of the batch, as HF's
causal-LM loss, computed chunk by chunk; for methods exact under chunking (`lora`, `lora-xs`,
`dense`, `sdlora`, `ssmlora-scan`) its value equals the unchunked loss. Batches are right-padded
(`train.pad_batch`): a real token never attends to or scans over padding that follows it, so no
mask is needed and the fast attention path stays available.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.adapters.base import AdaptedModel
from longctx.engine.family import model_family
from longctx.engine.runner import forward_chunk, new_cache
from longctx.engine.state import SequenceState

IGNORE = -100


def next_token_targets(labels: Tensor) -> Tensor:
    """HF labels (label t is token t, -100 where unscored) -> the target of position t's logits,
    labels[t + 1] (-100 at the last position): (B, N) -> (B, N)."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach() if value.requires_grad else value
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def detach_cache(cache: Any) -> None:
    """Cut every tensor a cache layer holds (attention K/V; Mamba's per-state lists of conv and
    recurrent states) out of the autograd graph, in place. Detached tensors share their storage,
    so a preallocated cache stays preallocated and in-place updates still land in it."""
    for layer in getattr(cache, "layers", []):
        for name, value in list(vars(layer).items()):
            setattr(layer, name, _detached(value))


def detach_state(state: SequenceState) -> None:
    """Carried adapter state enters the next chunk as a constant (truncation at the boundary)."""
    state.carry = {key: value.detach() for key, value in state.carry.items()}


def _chunk_loss(model: nn.Module, family: str, ids: Tensor, targets: Tensor, start: int, cache: Any,
                n_items: Tensor) -> Tensor:
    """Forward one chunk (B, C) with autograd; its share of the batch's mean loss (a scalar)."""
    scored = (targets != IGNORE).any(0).nonzero().squeeze(1)  # (K,) positions in the chunk with a target
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]  # (1, C)
    out = forward_chunk(model, ids, None, positions, cache, scored, family=family)
    logits = out.logits.float()  # (B, K, V)
    chosen = targets[:, scored]  # (B, K)
    loss = F.cross_entropy(logits.flatten(0, 1), chosen.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss / n_items


def chunked_training_loss(adapted: AdaptedModel, input_ids: Tensor, labels: Tensor, chunk_size: int,
                          backward: Callable[[Tensor], None], model: nn.Module | None = None) -> Tensor:
    """Run one right-padded batch (B, N) in chunks of `chunk_size`, calling `backward` on each
    chunk's loss as soon as it exists (so one chunk's activations are alive at a time), and
    return the batch's mean loss, detached. `model`: what to call (e.g. a DDP wrapper of
    `adapted.model`); default `adapted.model`."""
    model = model if model is not None else adapted.model
    family, n = model_family(adapted.model), input_ids.shape[1]
    targets = next_token_targets(labels)  # (B, N)
    n_items = (targets != IGNORE).sum().clamp(min=1)
    state, cache = SequenceState(), new_cache(adapted.model, n)
    total = torch.zeros((), device=input_ids.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        chunk_targets = targets[:, start:end]  # (B, C)
        with adapted.bind(state):
            if bool((chunk_targets != IGNORE).any()):
                loss = _chunk_loss(model, family, input_ids[:, start:end], chunk_targets, start, cache, n_items)
                backward(loss)
                total += loss.detach()
            else:  # nothing scored here: no gradient can come out of this chunk
                with torch.no_grad():
                    positions = torch.arange(start, end, device=input_ids.device)[None]  # (1, C)
                    forward_chunk(model, input_ids[:, start:end], None, positions, cache, 1, family=family)
        detach_cache(cache)
        detach_state(state)
    return total

