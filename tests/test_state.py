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
