"""The last layer attends only the rows whose logits are kept, and nothing a caller reads changes.

A log-likelihood request keeps the logits of its last few positions, so every other row's output
of the last layer is dead. `runner.chunked_forward` tells `longctx_sdpa` how many of a chunk's
last rows are read; these tests check, per method and dtype, that the logits, the KV cache, the
adapter state and greedy decoding equal the run that attends every row, and that anything that
would make the skip inexact (an adapter past the q/k/v projections, another attention) turns it off.
"""
from __future__ import annotations

import pytest
import torch
from conftest import perturb, random_ids, tiny_llama

from longctx.adapters import wrap
from longctx.engine import attention, runner
from longctx.engine.runner import chunked_forward, greedy_generate

METHODS = ["base", "dense", "lora", "ssmlora", "ssmlora-scan", "lora-xs"]
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def adapted_llama(method: str, dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides):
    attention.register()
    model = tiny_llama().to(device, dtype)
    model.config._attn_implementation = attention.NAME
    adapted = wrap(model, method, **overrides)
    perturb(adapted, scale=0.1)
    return adapted


@pytest.fixture
def attended_rows(monkeypatch):
    """(query rows of the chunk, rows attended) of every call that skipped rows."""
    calls, run = [], attention._read_rows_only
    monkeypatch.setattr(attention, "_read_rows_only",
                        lambda q, k, v, s, rows: calls.append((q.shape[2], rows)) or run(q, k, v, s, rows))
    return calls


def every_row(monkeypatch):
    monkeypatch.setattr(runner, "last_layer_rows_skippable", lambda model: False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_skipping_unread_rows_changes_no_logit_cache_or_state(method, dtype, tol, device, attended_rows, monkeypatch):
    adapted = adapted_llama(method, dtype, device)
    ids = random_ids(2, 150, seed=4).to(device)
    keep = torch.tensor([70, 141, 142, 148])  # a kept row mid-chunk, and the request's tail
    skipped = chunked_forward(adapted, ids, chunk_size=64, keep=keep)
    assert attended_rows == [(64, 0), (64, 58), (22, 9)]  # chunks [0, 64), [64, 128), [128, 150)
    every_row(monkeypatch)
    full = chunked_forward(adapted, ids, chunk_size=64, keep=keep)
    assert skipped.logits.dtype == full.logits.dtype
    # CUDA: the tail's own kernel call may be another kernel than the whole chunk's (see kernels)
    torch.testing.assert_close(skipped.logits, full.logits, rtol=0, atol=tol * (10 if device == "cuda" else 1))
    for ours, theirs in zip(skipped.cache.layers, full.cache.layers):  # every layer's K/V, bit for bit
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert skipped.state.carry.keys() == full.state.carry.keys()
    assert bool(full.state.carry) == method.startswith("ssmlora")
    for key, carried in full.state.carry.items():  # the adapters' state for the next chunk
        assert torch.equal(skipped.state.carry[key], carried), key


@pytest.mark.parametrize("method", ["base", "ssmlora", "lora"])
def test_greedy_decoding_after_a_skipping_prefill_is_identical(method, attended_rows, monkeypatch):
    adapted = adapted_llama(method)
    ids = random_ids(2, 90, seed=5)
    ours = greedy_generate(adapted, ids, 10, chunk_size=32)
    assert attended_rows and all(rows < query for query, rows in attended_rows)
    every_row(monkeypatch)
    assert torch.equal(ours, greedy_generate(adapted, ids, 10, chunk_size=32))


@pytest.mark.parametrize("method,overrides", [
    ("ssmlora", {"insertion": "reference-all"}),  # o_proj and the MLP carry state through every row
    ("lora", {"insertion": ["q_proj", "o_proj"]}),
])
def test_an_adapter_past_the_projections_keeps_every_row(method, overrides, attended_rows, monkeypatch):
    adapted = adapted_llama(method, **overrides)
    assert not attention.last_layer_rows_skippable(adapted.model)
    ids, keep = random_ids(1, 80, seed=6), torch.tensor([78, 79])
    full = chunked_forward(adapted, ids, chunk_size=32, keep=keep)
    assert attended_rows == []
    if method == "ssmlora":  # why: skipping anyway would change what the kept rows see
        monkeypatch.setattr(runner, "last_layer_rows_skippable", lambda model: True)
        forced = chunked_forward(adapted, ids, chunk_size=32, keep=keep)
        assert (forced.logits - full.logits).abs().max() > 1e-3


def test_only_longctx_attention_and_unpadded_inputs_skip(attended_rows):
    plain = tiny_llama()  # transformers' sdpa: the keyword would mean nothing to it
    assert not attention.last_layer_rows_skippable(plain)
    adapted = adapted_llama("base")
    assert attention.last_layer_rows_skippable(adapted.model)
    ids = random_ids(2, 80, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the masked path attends every row
    chunked_forward(adapted, ids, mask, chunk_size=32)
    assert attended_rows == []
