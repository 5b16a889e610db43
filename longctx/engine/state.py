"""Adapter state of one sequence, and the binding that hands it to the adapted layers.

SSM-style adapters (`ssmlora`, `ssmlora-scan`) keep a state that flows from chunk to chunk of
one sequence. It lives in a `SequenceState` that the caller owns and passes explicitly
(`with adapted.bind(state): model(...)`); nothing is kept in globals or across sequences.
A forward call with no bound state gets a fresh one that is dropped afterwards, so plain
`model(...)` calls (HF Trainer, lm-eval's HF path) are stateless and reproducible.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class SequenceState:
    """State of one batch of sequences, carried between consecutive chunks.

    carry: per state key, the state left by the previous chunk (ssmlora: (B, T_prev, r);
           ssmlora-scan: (B, r)).
    live:  per state key, the state produced so far in the forward call in progress (points that
           share a key are chained through it in layer order); moved into `carry` at the end.
    token_mask: (B, T) 1 for real tokens, 0 for padding, for the forward in progress.
    """

    carry: dict[str, Tensor] = field(default_factory=dict)
    live: dict[str, Tensor] = field(default_factory=dict)
    token_mask: Tensor | None = None

    def previous(self, key: str, like: Tensor) -> Tensor:
        """State seen by the next point of `key`, position-aligned to `like` (B, T, r).

        Within a forward: the state left by the previous point with the same key. Otherwise the
        previous chunk's last state, token j taking position j (a shorter chunk takes the first
        positions; positions the previous chunk did not have start from zeros); else zeros.
        """
        if key in self.live:  # on `like`'s device: points sharing a key may sit on different devices
            return self.live[key].to(like.device)
        prev = self.carry.get(key)
        if prev is None:
            return torch.zeros_like(like)
        if prev.shape[0] != like.shape[0]:
            raise ValueError(f"state for {key!r} holds {prev.shape[0]} sequences, input has {like.shape[0]}")
        t = like.shape[1]
        prev = prev[:, :t].to(like.device, like.dtype)  # (B, min(T_prev, T), r)
        if prev.shape[1] < t:
            pad = like.new_zeros(like.shape[0], t - prev.shape[1], like.shape[2])
            prev = torch.cat([prev, pad], dim=1)  # (B, T, r)
        return prev

    def reset(self) -> None:
        """Forget everything: the next chunk starts from zeros (`ssm_carry=reset`)."""
        self.carry.clear()
        self.live.clear()


class StateBinding:
    """Connects the adapted layers of one model to the `SequenceState` being run.

    Hooks on the causal LM begin and end each forward call: the start clears `live` and records
    the padding mask of the current tokens; the end moves `live` into `carry`.
    """

    def __init__(self) -> None:
        self.state: SequenceState | None = None
        self._ephemeral = False

    def current(self) -> SequenceState:
        if self.state is None:  # a layer called outside a hooked forward: stateless
            return SequenceState()
        return self.state

    @contextlib.contextmanager
    def bound(self, state: SequenceState) -> Iterator[SequenceState]:
        previous, self.state = self.state, state
        try:
            yield state
        finally:
            self.state = previous

    def install(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._begin, with_kwargs=True)
        model.register_forward_hook(self._end, with_kwargs=True)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.state is None or self._ephemeral:  # (a failed call may leave one behind)
            self.state, self._ephemeral = SequenceState(), True
        self.state.live.clear()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if ids is not None and isinstance(mask, Tensor) and mask.dim() == 2:
            self.state.token_mask = mask[:, -ids.shape[1]:]  # (B, T)
        else:
            self.state.token_mask = None

    def _end(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        state = self.state
        if state is None:
            return
        state.carry.update(state.live)
        state.live.clear()
        state.token_mask = None
        if self._ephemeral:
            self.state, self._ephemeral = None, False


@runtime_checkable
class BindsState(Protocol):
    """A model wrapped with adapters (`adapters.base.AdaptedModel`): the runner runs `model` with
    the adapters' state bound to `state` for the length of a forward."""

    model: nn.Module

    def bind(self, state: SequenceState) -> ContextManager[SequenceState]: ...
