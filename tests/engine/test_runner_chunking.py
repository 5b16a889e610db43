"""Chunked execution equals the unchunked run (design §5), and bad runner input is refused."""
from __future__ import annotations

import pytest
import torch
from conftest import EXACT_UNDER_CHUNKING, perturb, random_ids, tiny_llama

from longctx.adapters import wrap
from longctx.core.errors import LongctxError
from longctx.engine.runner import chunked_forward, greedy_generate, score_continuation

LENGTH = 100
CHUNK_SIZES = [1, 7, 32, 45, 99]  # several that do not divide the length


@pytest.fixture(scope="module", params=EXACT_UNDER_CHUNKING)
def adapted(request):
    model = wrap(tiny_llama(), request.param)
    perturb(model, scale=0.1)
    return model


def logprobs(adapted, ids, chunk_size):
    out = chunked_forward(adapted, ids, chunk_size=chunk_size, keep=torch.arange(ids.shape[1] - 1))
    return torch.log_softmax(out.logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, N-1)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunked_log_probs_equal_unchunked(adapted, chunk_size):
    ids = random_ids(2, LENGTH, seed=11)
    expected = logprobs(adapted, ids, None)
    torch.testing.assert_close(logprobs(adapted, ids, chunk_size), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [7, 32, 45])
def test_chunked_greedy_output_is_identical(adapted, chunk_size):
    ids = random_ids(2, LENGTH, seed=12)
    expected = greedy_generate(adapted, ids, 12)
    assert torch.equal(greedy_generate(adapted, ids, 12, chunk_size=chunk_size), expected)


def test_scoring_matches_a_plain_forward(adapted):
    ids = random_ids(1, 60, seed=13)
    with torch.no_grad():
        full = torch.log_softmax(adapted(input_ids=ids).logits.float(), -1)  # (1, N, V)
    expected = full[0, 49:59].gather(-1, ids[0, 50:, None]).sum().item()
    total, greedy = score_continuation(adapted, ids[0, :50].tolist(), ids[0, 50:].tolist(), chunk_size=16)
    assert total == pytest.approx(expected, abs=1e-4)
    assert greedy == bool((full[0, 49:59].argmax(-1) == ids[0, 50:]).all())


def test_only_requested_logits_are_computed():
    adapted = wrap(tiny_llama(), "base")
    out = chunked_forward(adapted, random_ids(1, LENGTH), chunk_size=32, keep=torch.tensor([5, 70, 99]))
    assert out.logits.shape == (1, 3, 300) and out.n_chunks == 4


@pytest.mark.parametrize("bad", [0, -3, "abc", 2.5])
def test_bad_chunk_size_is_refused(bad):
    with pytest.raises(LongctxError, match="chunk_size must be a positive integer"):
        chunked_forward(wrap(tiny_llama(), "base"), random_ids(1, 10), chunk_size=bad)


def test_length_beyond_position_limit_is_refused_with_remedies():
    adapted = wrap(tiny_llama(max_positions=64), "lora")
    with pytest.raises(LongctxError, match="exceeds the model's position limit of 64.*rope_scaling"):
        chunked_forward(adapted, random_ids(1, 65), chunk_size=16)
    with pytest.raises(LongctxError, match="position limit of 64"):
        greedy_generate(adapted, random_ids(1, 60), 10)


def test_bad_ssm_carry_is_refused():
    with pytest.raises(LongctxError, match="unknown ssm_carry 'keep'; valid choices: chunk, reset"):
        chunked_forward(wrap(tiny_llama(), "ssmlora"), random_ids(1, 10), ssm_carry="keep")
