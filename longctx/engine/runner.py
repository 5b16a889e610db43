"""Chunk-wise execution of long inputs (design §5).

A forward over N tokens runs in chunks of `chunk_size` tokens, carrying the model's KV cache
and each adapter's `SequenceState` from chunk to chunk. Logits are computed only at the
positions a score or a next token needs, never as an N × vocab tensor. For every method whose
state is exact under chunking (all but paper-faithful `ssmlora`, whose chunk carry is part of
its definition) a chunked run equals the unchunked run.
"""
from __future__ import annotations

import array
import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from longctx.core.errors import LongctxError, choice_error, positive_int
from longctx.engine.attention import LAST_LAYER_ROWS, last_layer_rows_skippable
from longctx.engine.family import check_length, model_family
from longctx.engine.hf_internals import llama_cache_keyword, mamba_cache_keyword, preallocated_cache
from longctx.engine.mamba import carry_ssm_state
from longctx.engine.placement import input_device, is_dispatched
from longctx.engine.settings import CARRY_CHOICES
from longctx.engine.state import BindsState, SequenceState


@dataclass
class ChunkedOutput:
    logits: Tensor  # (B, K, V) float32, at `positions`
    positions: Tensor  # (K,) absolute positions whose next-token logits were kept
    cache: Any  # the KV cache after the last chunk (None for models without one)
    state: SequenceState  # adapter state after the last chunk
    n_chunks: int


def _model_of(adapted: BindsState | nn.Module) -> nn.Module:
    return adapted.model if isinstance(adapted, BindsState) else adapted


def _bind(adapted: BindsState | nn.Module, state: SequenceState) -> contextlib.AbstractContextManager:
    return adapted.bind(state) if isinstance(adapted, BindsState) else contextlib.nullcontext(state)


def new_cache(model: nn.Module, capacity: int) -> Any:
    """KV cache preallocated for `capacity` tokens (no concatenation copies while it fills);
    for Mamba, the model's own conv/SSM state cache, with the SSM state carried across chunks."""
    if model_family(model) == "mamba":
        carry_ssm_state(model)
        return DynamicCache(config=model.config)
    return preallocated_cache(model.config, capacity)


def forward_chunk(model: nn.Module, ids: Tensor, mask: Tensor | None, positions: Tensor, cache: Any, keep: Any,
                  family: str | None = None, rows_read: int | None = None) -> Any:
    """One forward of a chunk (B, C) after `cache`, which every layer fills in place; `mask` covers every token so far (B, N), or is
    None when nothing is padded (no mask to build or inspect: no host-device sync per chunk).
    `family`: the model's (`family.model_family`), given when `model` is a wrapper without a config
    (DDP under `accelerate launch`). `rows_read` (Llama, inference): how many of the chunk's last
    rows the kept logits read, so the last layer attends only those (`attention.LAST_LAYER_ROWS`).
    Evaluation and chunked training both run chunks through here."""
    if (family or model_family(model)) == "mamba":  # no positions; the mask covers the chunk's own tokens
        chunk_mask = None if mask is None else mask[:, -ids.shape[1]:]
        return model(input_ids=ids, attention_mask=chunk_mask, use_cache=True, logits_to_keep=keep,
                     **{mamba_cache_keyword(): cache})
    rows = {} if rows_read is None else {LAST_LAYER_ROWS: rows_read}
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep,
                 **{llama_cache_keyword(): cache}, **rows)


def _padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """The mask to hand the model, or None when every token is real (checked once, not per chunk)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def _positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding: (B, N) -> (B, N)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _validate(chunk_size: Any, ssm_carry: str, n_tokens: int) -> int:
    if ssm_carry not in CARRY_CHOICES:
        raise choice_error("ssm_carry", ssm_carry, CARRY_CHOICES)
    return n_tokens if chunk_size is None else positive_int("chunk_size", chunk_size)


def chunked_forward(adapted: BindsState | nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    chunk_size: int | None = None, keep: Tensor | None = None,
                    state: SequenceState | None = None, ssm_carry: str = "chunk",
                    reserve: int = 0) -> ChunkedOutput:
    """Run `input_ids` (B, N) in chunks; return next-token logits at the `keep` positions.

    keep: absolute positions (K,) whose logits are needed (default: the last one). A model split over
    devices (`placement.dispatch`) is asked for its last `rows` positions as a number, not by index:
    the positions are picked from its logits, which come back on the inputs' device, since an index
    tensor would meet the hidden states on the last layer's device.
    attention_mask: (B, N), 0 on left padding. state: the sequence's adapter state (fresh if
    None). `ssm_carry=reset` starts every chunk's adapter state from zeros. `reserve`: extra
    cache room for tokens that will follow (generation).
    """
    model = _model_of(adapted)
    n = input_ids.shape[1]
    size = _validate(chunk_size, ssm_carry, n)
    check_length(model, n)
    mask = _padding_mask(attention_mask)
    positions = _positions(mask) if mask is not None else torch.arange(n, device=input_ids.device)[None]  # (B|1, N)
    keep = torch.tensor([n - 1]) if keep is None else keep.to(torch.long).cpu()
    ordered, order = keep.sort()
    keep_on_device = ordered.to(input_ids.device)  # one copy; chunks take slices of it (no per-chunk sync)
    bounds = torch.searchsorted(ordered, torch.arange(0, n + size, size)).tolist()  # chunk -> first kept index
    state = state if state is not None else SequenceState()
    cache, kept, n_chunks = new_cache(model, n + reserve), [], 0
    skips_rows = mask is None and model_family(model) == "llama" and last_layer_rows_skippable(model)
    split = is_dispatched(model)
    for index, start in enumerate(range(0, n, size)):
        end = min(start + size, n)
        local = keep_on_device[bounds[index]:bounds[index + 1]] - start  # (K_chunk,)
        rows = end - int(ordered[bounds[index]]) if bounds[index] < bounds[index + 1] else 0  # host: no sync
        if ssm_carry == "reset":
            state.reset()
        with _bind(adapted, state), torch.no_grad():
            out = forward_chunk(model, input_ids[:, start:end], None if mask is None else mask[:, :end],
                                positions[:, start:end], cache, max(rows, 1) if split else local,
                                rows_read=rows if skips_rows else None)
        n_chunks += 1  # `cache` was filled in place by every layer (whatever the output calls it)
        if local.numel():
            logits = out.logits[:, local - (end - start - rows)] if split else out.logits  # (B, K_chunk, V)
            kept.append(logits.float())
    logits = torch.cat(kept, dim=1) if kept else torch.empty(input_ids.shape[0], 0, 0)
    logits = logits[:, order.argsort().to(logits.device)] if kept else logits  # back to the caller's order
    return ChunkedOutput(logits, keep, cache, state, n_chunks)


def token_tensor(ids: list[int], device: Any) -> torch.Tensor:
    """Token ids (1, N) int64 on `device`, read from a packed buffer: `torch.tensor` walks a Python
    list several times slower, time in which the GPU waits."""
    if not ids:
        return torch.empty(1, 0, dtype=torch.int64, device=device)
    return torch.frombuffer(array.array("q", ids), dtype=torch.int64).view(1, -1).to(device)  # keeps the buffer


def score_tokens(adapted: BindsState | nn.Module, ids: list[int], n_cont: int, chunk_size: int | None = None,
                 ssm_carry: str = "chunk", device: torch.device | None = None) -> tuple[float, bool]:
    """(log p(the last `n_cont` of `ids` | the tokens before them), whether each is the greedy next
    token), from one chunked forward over all but the last token, which is never an input. The
    one scorer of a continuation: the `ssmlora` model type, `longctx forward` and training's probes.
    `device`: where the inputs go (default: a dispatched model's input device, else its weights')."""
    model = _model_of(adapted)
    device = device or input_device(model) or next(model.parameters()).device
    inputs = token_tensor(ids[:-1], device)  # (1, N-1)
    keep = torch.arange(len(ids) - 1 - n_cont, len(ids) - 1)  # positions predicting the continuation
    out = chunked_forward(adapted, inputs, chunk_size=chunk_size, keep=keep, ssm_carry=ssm_carry)
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)  # (n_cont, V)
    target = torch.tensor(ids[-n_cont:], device=logprobs.device)
    total = logprobs.gather(-1, target[:, None]).sum().item()
    return total, bool((logprobs.argmax(-1) == target).all())


def score_continuation(adapted: BindsState | nn.Module, context: list[int], continuation: list[int],
                       chunk_size: int | None = None, ssm_carry: str = "chunk") -> tuple[float, bool]:
    """(log p(continuation | context), whether it is the greedy continuation), chunked (`score_tokens`)."""
    if not context or not continuation:
        raise LongctxError("score_continuation needs a non-empty context and continuation")
    return score_tokens(adapted, context + continuation, len(continuation), chunk_size, ssm_carry)


def greedy_generate(adapted: BindsState | nn.Module, input_ids: Tensor, max_new_tokens: int,
                    attention_mask: Tensor | None = None, chunk_size: int | None = None,
                    eos_token_id: int | None = None, ssm_carry: str = "chunk",
                    stop: Callable[[Tensor], bool] | None = None) -> Tensor:
    """Greedy decoding after a chunked prefill; returns the new tokens (B, <= max_new_tokens).

    Rows that produced `eos_token_id` are padded with it until every row has finished.
    `stop(new_tokens)` (B, t) -> True ends decoding early (e.g. a stop string was produced).
    """
    model = _model_of(adapted)
    max_new = positive_int("max_new_tokens", max_new_tokens)
    check_length(model, input_ids.shape[1] + max_new)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = chunked_forward(adapted, input_ids, attention_mask, chunk_size, ssm_carry=ssm_carry, reserve=max_new)
    cache, state = out.cache, out.state
    token = out.logits[:, -1].argmax(-1)  # (B,)
    done = torch.zeros_like(token, dtype=torch.bool)
    new, position = [], _positions(mask)[:, -1:]  # (B, 1)
    for _ in range(max_new):
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        new.append(token)
        if len(new) == max_new or bool(done.all()) or (stop is not None and stop(torch.stack(new, dim=1))):
            break
        if attention_mask is not None:  # without padding no mask at all, as in the prefill
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, N + t)
        position = position + 1
        if ssm_carry == "reset":
            state.reset()
        with _bind(adapted, state), torch.no_grad():
            step = forward_chunk(model, token[:, None], None if attention_mask is None else mask, position, cache, 1)
        token = step.logits[:, -1].argmax(-1)  # `cache` filled in place
    return torch.stack(new, dim=1)  # (B, T_new)
