"""Adapter state is owned by one sequence: no leaks between calls, position-aligned carry."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb, random_ids, tiny_llama
from longctx.adapters import SequenceState, wrap


def test_position_aligned_carry_takes_first_positions_and_pads_with_zeros():
    state = SequenceState(carry={"k": torch.arange(12.0).reshape(1, 4, 3)})
    shorter = state.previous("k", torch.zeros(1, 2, 3))
    assert torch.equal(shorter, torch.arange(6.0).reshape(1, 2, 3))
    longer = state.previous("k", torch.zeros(1, 6, 3))
    assert torch.equal(longer[:, :4], state.carry["k"]) and torch.equal(longer[:, 4:], torch.zeros(1, 2, 3))
    assert torch.equal(state.previous("other", torch.ones(1, 2, 3)), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="holds 1 sequences, input has 2"):
        state.previous("k", torch.zeros(2, 2, 3))


@pytest.mark.parametrize("method", ["ssmlora", "ssmlora-scan"])
def test_bound_state_is_carried_and_unbound_calls_start_fresh(method):
    adapted = wrap(tiny_llama(), method)
    perturb(adapted)
    ids = random_ids(1, 20)
    state = adapted.new_state()
    with adapted.bind(state), torch.no_grad():
        adapted(input_ids=ids)
    assert sorted(state.carry) == sorted(adapted.model.get_submodule(p).state_key for p in adapted.insertion_points)
    assert state.live == {}
    with torch.no_grad():
        fresh = adapted(input_ids=ids).logits
        again = adapted(input_ids=ids).logits
    assert torch.equal(fresh, again)
    with adapted.bind(state), torch.no_grad():
        continued = adapted(input_ids=ids).logits
    assert not torch.allclose(continued, fresh)  # the carried state changes the second chunk


def test_a_failed_call_does_not_leak_state_into_the_next():
    adapted = wrap(tiny_llama(), "ssmlora")
    perturb(adapted)
    ids = random_ids(1, 20)
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits

        def fail_midway(module, args, output):
            raise RuntimeError("boom")

        handle = adapted.model.model.layers[2].register_forward_hook(fail_midway)  # after layers 0-1 wrote state
        with pytest.raises(RuntimeError, match="boom"):
            adapted(input_ids=ids)
        handle.remove()
        assert torch.equal(adapted(input_ids=ids).logits, expected)


def test_derived_values_are_built_once_per_weights_version():
    state, builds = SequenceState(), []
    weight = torch.nn.Parameter(torch.ones(3))

    def build():
        builds.append(weight.detach().clone())
        return weight * 2

    with torch.no_grad():
        first = state.derive(("k", 5), (weight,), build)
        assert state.derive(("k", 5), (weight,), build) is first and len(builds) == 1
        state.derive(("k", 6), (weight,), build)  # another length: its own entry
        assert len(builds) == 2
        weight.add_(1.0)  # an optimiser step between chunks
        assert torch.equal(state.derive(("k", 5), (weight,), build), torch.full((3,), 4.0)) and len(builds) == 3
        assert len(state.derived) == 2  # the stale value was replaced, not kept beside
    # While autograd records through the weight, every call builds (its result is that call's graph).
    recorded = [state.derive(("k", 5), (weight,), build) for _ in range(2)]
    assert len(builds) == 5 and all(r.requires_grad for r in recorded)
    state.reset()
    assert state.derived == {}


def test_scan_matrices_are_built_once_per_layer_and_chunk_length():
    """A chunked ssmlora-scan run keeps one plan per insertion point and chunk length (the ragged
    last chunk is a second length); a forward that records gradients keeps none. (That chunked
    runs equal unchunked ones, plans kept, is test_chunking's.)"""
    from longctx.runner import chunked_forward

    adapted = wrap(tiny_llama(), "ssmlora-scan")
    perturb(adapted)
    ids = random_ids(1, 100)
    with torch.no_grad():
        result = chunked_forward(adapted, ids, chunk_size=32)
    points = len(adapted.insertion_points)
    assert len(result.state.derived) == 2 * points  # lengths 32 and 4
    assert {key[1] for key in result.state.derived} == {32, 4}
    state = adapted.new_state()
    with adapted.bind(state):  # weights require grad: plans built in the call, none kept
        adapted(input_ids=ids[:, :32]).logits.sum().backward()
    assert state.derived == {} and sorted(state.carry)
    assert all(p.grad is not None for n, p in adapted.model.named_parameters() if "scan_log_tau" in n)
