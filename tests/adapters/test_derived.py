"""Tensors a layer derives from its weights (scan plans, casts to a bf16 base's dtype, LoRA-XS's
folded B R) are kept only while those weights stay as they are: a kept value never goes stale."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import perturb, random_ids, tiny_llama

from longctx.adapters import wrap
from longctx.adapters.derived import DerivedCache

KEEPING = ["ssmlora", "ssmlora-scan", "lora-xs"]  # the methods whose layers keep derived operands


def test_keeps_recent_keys_while_the_weights_are_unchanged():
    """Built once per key; rebuilt (replacing it) after an in-place step or for a new weight
    tensor; the oldest key dropped beyond capacity; never kept while autograd records."""
    builds = []
    weight = torch.nn.Parameter(torch.ones(3))

    def build():
        builds.append(weight.detach().clone())
        return weight * 2

    cache = DerivedCache(capacity=2)
    with torch.no_grad():
        first = cache.get((5,), (weight,), build)
        assert cache.get((5,), (weight,), build) is first and len(builds) == 1
        cache.get((6,), (weight,), build)  # another length: its own entry
        assert len(builds) == 2
        weight.add_(1.0)  # an optimiser step
        assert torch.equal(cache.get((5,), (weight,), build), torch.full((3,), 4.0)) and len(builds) == 3
        assert list(cache.entries) == [(6,), (5,)]  # replaced, not kept beside; (5,) now the most recent
        cache.get((7,), (weight,), build)
        assert list(cache.entries) == [(5,), (7,)]  # (6,) was the least recently used
        replaced = torch.nn.Parameter(torch.full((3,), 2.0))  # a new tensor (as a load may make)
        assert torch.equal(cache.get((7,), (replaced,), lambda: replaced * 3), torch.full((3,), 6.0))
    recorded = [cache.get((5,), (weight,), build) for _ in range(2)]
    assert len(builds) == 6 and all(r.requires_grad for r in recorded)


def test_a_swapped_or_reallocated_weight_is_not_mistaken_for_the_kept_one():
    """`.data` replaced (version counter restarts) and a freed weight whose successor has its
    address and version: both rebuild, so neither the address nor the version identifies a weight."""
    cache = DerivedCache(capacity=1)
    weight = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    assert torch.equal(cache.cast("w", weight, torch.float64), torch.ones(4, dtype=torch.float64))
    weight.data = torch.full((4,), 3.0)
    assert torch.equal(cache.cast("w", weight, torch.float64), torch.full((4,), 3.0, dtype=torch.float64))
    storage = torch.ones(4).untyped_storage()
    first = torch.empty(0).set_(storage)  # (4,) ones
    assert torch.equal(cache.cast("w", first, torch.float64), torch.ones(4, dtype=torch.float64))
    del first
    torch.empty(0).set_(storage).fill_(3.0)  # the memory rewritten through another tensor
    second = torch.empty(0).set_(storage)  # a new tensor: same address, same version as `first` had
    assert torch.equal(cache.cast("w", second, torch.float64), torch.full((4,), 3.0, dtype=torch.float64))


def test_cast_returns_the_weight_itself_in_its_own_dtype():
    weight = torch.ones(2)
    cache = DerivedCache(capacity=1)
    assert cache.cast("w", weight, torch.float32) is weight and not cache.entries


def _outputs(adapted, ids):
    with torch.no_grad():
        return adapted(input_ids=ids).logits


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", KEEPING)
def test_kept_operands_follow_the_weights_on_a_bf16_base(method, device):
    """On a bf16 base each layer keeps its weights cast (and LoRA-XS its B R) between calls; after
    an in-place step its output equals a fresh model's with the stepped weights, bit for bit."""
    adapted = wrap(tiny_llama().to(device=device, dtype=torch.bfloat16), method)
    perturb(adapted)
    ids = random_ids(1, 40).to(device)
    _outputs(adapted, ids)
    layers = [adapted.model.get_submodule(p) for p in adapted.insertion_points]
    kept = [dict(layer.operands.entries) for layer in layers]
    assert all(entries for entries in kept)
    _outputs(adapted, ids)
    assert all(layer.operands.entries[k][1] is v[1] for layer, entries in zip(layers, kept) for k, v in entries.items())
    perturb(adapted, seed=2)  # an optimiser step, in place
    stepped = _outputs(adapted, ids)
    fresh = wrap(tiny_llama().to(device=device, dtype=torch.bfloat16), method)
    fresh.model.load_state_dict(adapted.model.state_dict())
    assert stepped.dtype == torch.bfloat16 and torch.equal(stepped, _outputs(fresh, ids))


@pytest.mark.parametrize("method", KEEPING)
def test_training_steps_never_read_a_kept_operand(method):
    """Three optimiser steps with gradients recorded, after an inference call kept operands: each
    step's loss equals a model trained the same way that never kept any (bf16 base), and every
    weight that is kept cast or folded (A, B; LoRA-XS's R) moved: a kept operand would carry no
    gradient back to its weight."""
    def losses(warm: bool) -> list[float]:
        adapted = wrap(tiny_llama().to(torch.bfloat16), method, seed=0)
        if warm:
            _outputs(adapted, random_ids(1, 16))
        params = [p for p in adapted.model.parameters() if p.requires_grad]
        through_kept = [p for n, p in adapted.model.named_parameters()
                        if p.requires_grad and n[-2:] in ("_A", "_B", "_R")]
        start = [p.detach().clone() for p in through_kept]
        opt = torch.optim.SGD(params, lr=0.5)
        out = []
        for step in range(3):
            loss = adapted(input_ids=random_ids(1, 16, seed=step), labels=random_ids(1, 16, seed=step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        assert through_kept and all(not torch.equal(p, p0) for p, p0 in zip(through_kept, start))
        return out + [_outputs(adapted, random_ids(1, 16, seed=9)).float().sum().item()]

    assert losses(warm=True) == losses(warm=False)


@pytest.mark.parametrize("method", KEEPING)
def test_a_model_with_kept_operands_copies_and_saves_whole(method):
    """deepcopy and torch.save of the whole model after a call kept operands (weak references do
    not pickle): the copy and the reloaded model start with nothing kept and give the same logits."""
    adapted = wrap(tiny_llama().to(torch.bfloat16), method)
    perturb(adapted)
    ids = random_ids(1, 24)
    want = _outputs(adapted, ids)
    buffer = io.BytesIO()
    torch.save(adapted.model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(adapted.model), torch.load(buffer, weights_only=False)):
        assert not any(layer.operands.entries for layer in other.modules() if hasattr(layer, "operands"))
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids).logits, want)
