"""`longctx_sdpa` (two flash calls merged by log-sum-exp) equals plain SDPA with a mask."""
from __future__ import annotations

import pytest
import torch

from conftest import random_ids, tiny_llama
from longctx.attention import NAME, register
from longctx.runner import chunked_forward


def with_attention(model, name):
    register()
    model.config._attn_implementation = name
    return model


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 32])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_sdpa_chunked_and_padded(chunk_size, padded):
    ids = random_ids(2, 80, seed=3)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :11] = 0
    keep = torch.arange(80)
    expected = chunked_forward(with_attention(tiny_llama(), "sdpa"), ids, mask, chunk_size, keep).logits
    ours = chunked_forward(with_attention(tiny_llama(), NAME), ids, mask, chunk_size, keep).logits
    rows = slice(None) if not padded else 1
    torch.testing.assert_close(ours[rows], expected[rows], rtol=0, atol=1e-5)
    if padded:
        torch.testing.assert_close(ours[0, 11:], expected[0, 11:], rtol=0, atol=1e-5)


def test_gradients_match_sdpa():
    ids = random_ids(1, 40)
    grads = []
    for name in ("sdpa", NAME):
        model = with_attention(tiny_llama(), name).train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
