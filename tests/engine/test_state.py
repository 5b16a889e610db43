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


def _kept_plans(adapted) -> dict:
    """Per insertion point: chunk length -> the plan kept for it."""
    return {p: {key[0]: plan for key, (_, plan) in adapted.model.get_submodule(p).plans.entries.items()}
            for p in adapted.insertion_points}


def _same_plans(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[p].keys() == b[p].keys() and all(a[p][t] is b[p][t] for t in a[p])
                                        for p in a)


def test_scan_plans_are_built_once_per_layer_and_chunk_length_across_sequences():
    """A chunked ssmlora-scan run keeps one plan per insertion point and chunk length (the ragged
    last chunk is a second length); the next sequence reuses them; a forward that records
    gradients keeps none; an optimiser step rebuilds them. (That chunked runs equal unchunked
    ones, plans kept, is test_chunking's; that they follow the equations, test_ssmlora_scan_equations'.)"""
    from longctx.engine.runner import chunked_forward

    adapted = wrap(tiny_llama(), "ssmlora-scan")
    perturb(adapted)
    with torch.no_grad():
        chunked_forward(adapted, random_ids(1, 100), chunk_size=32)
    kept = _kept_plans(adapted)
    assert all(set(plans) == {32, 4} for plans in kept.values())
    with torch.no_grad():
        chunked_forward(adapted, random_ids(1, 68, seed=3), chunk_size=32)  # another sequence, same lengths
    assert _same_plans(_kept_plans(adapted), kept)
    state = adapted.new_state()
    with adapted.bind(state):  # weights require grad: plans built in the call, none kept
        adapted(input_ids=random_ids(1, 16)).logits.sum().backward()
    assert _same_plans(_kept_plans(adapted), kept) and sorted(state.carry)
    assert all(p.grad is not None for n, p in adapted.model.named_parameters() if "scan_log_tau" in n)
    with torch.no_grad():
        for n, p in adapted.model.named_parameters():
            if "scan_log_tau" in n:
                p.add_(0.1)  # an optimiser step
        chunked_forward(adapted, random_ids(1, 64), chunk_size=32)
    assert all(after[32] is not kept[point][32] for point, after in _kept_plans(adapted).items())


def test_a_plan_built_in_inference_mode_serves_a_later_call_that_records_gradients():
    """Frozen adapter: a plan kept from an inference_mode run is reused while a gradient flows to
    the input embeddings (attribution, soft prompts), and that gradient equals a fresh model's."""
    adapted = wrap(tiny_llama(), "ssmlora-scan")
    perturb(adapted)
    adapted.model.requires_grad_(False)
    ids = random_ids(1, 24)
    with torch.inference_mode():
        adapted(input_ids=ids)
    assert all(adapted.model.get_submodule(p).plans.entries for p in adapted.insertion_points)

    def input_gradient(model):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.sum().backward()
        return embeds.grad

    fresh = wrap(tiny_llama(), "ssmlora-scan")
    fresh.model.load_state_dict(adapted.model.state_dict())
    fresh.model.requires_grad_(False)
    torch.testing.assert_close(input_gradient(adapted.model), input_gradient(fresh.model), rtol=0, atol=1e-6)
