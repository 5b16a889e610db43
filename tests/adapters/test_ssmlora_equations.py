"""SSMLoRA against the design §4 equations, written out here independently of longctx's layers.

The reference runs the plain base model with forward hooks that add the SSMLoRA branch computed
from the equations below, keeping its own per-key states, chain order and chunk carry.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny_llama

from longctx.adapters import wrap
from longctx.engine.runner import chunked_forward


def ssmlora_branch(x, A, B, C, D, h, alpha):
    """z = xA; h' = hC + zD + h; ĥ = minmax_r(h'); y = α (z + LeakyReLU(ĥ)) B (eval: no dropout)."""
    z = x @ A
    h_new = h @ C + z @ D + h
    lo = h_new.min(dim=-1, keepdim=True).values
    hi = h_new.max(dim=-1, keepdim=True).values
    h_hat = (h_new - lo) / (hi - lo + 1e-8)
    return alpha * (z + F.leaky_relu(h_hat, negative_slope=0.01)) @ B, h_hat


class ReferenceSSMLoRA:
    """Hooks on a plain base: per-key chaining within a forward, position-aligned carry across."""

    def __init__(self, base, weights, keys, alpha):
        self.weights, self.keys, self.alpha = weights, keys, alpha
        self.carry, self.live = {}, {}
        for name in keys:
            base.get_submodule(name).register_forward_hook(self.hook(name))
        base.register_forward_pre_hook(lambda m, a: self.live.clear())
        base.register_forward_hook(lambda m, a, o: self.carry.update(self.live))

    def initial_state(self, key, like):
        if key in self.live:
            return self.live[key]
        h = torch.zeros_like(like)
        if key in self.carry:  # token j of this chunk starts from token j of the previous one
            prev = self.carry[key]
            n = min(prev.shape[1], like.shape[1])
            h[:, :n] = prev[:, :n]
        return h

    def hook(self, name):
        def add_branch(module, inputs, output):
            (x,) = inputs
            A, B, C, D = (self.weights[f"{name}.ssmlora_{k}"] for k in "ABCD")
            key = self.keys[name]
            h = self.initial_state(key, x.new_zeros(*x.shape[:-1], A.shape[1]))  # (B, T, r)
            delta, self.live[key] = ssmlora_branch(x, A, B, C, D, h, self.alpha)
            return output + delta
        return add_branch


def nonzero_ssmlora(insertion):
    adapted = wrap(tiny_llama(), "ssmlora", insertion=insertion)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    weights = {n.replace(".base_layer", ""): p.detach().clone()
               for n, p in adapted.model.named_parameters() if "ssmlora_" in n}
    return adapted, weights


def expected_keys(insertion, layers=4):
    keys = {}
    for i in range(layers):
        leaf = "q_proj" if i % 2 == 0 else "v_proj"
        keys[f"model.layers.{i}.self_attn.{leaf}"] = f"model.layers.{i}.self_attn.{leaf}"
        if insertion == "reference-all":
            keys[f"model.layers.{i}.self_attn.o_proj"] = "o_proj"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                keys[f"model.layers.{i}.mlp.{proj}"] = proj
    return keys


@pytest.mark.parametrize("insertion", ["sparse-qv", "reference-all"])
def test_insertion_points_and_keys(insertion):
    adapted, _ = nonzero_ssmlora(insertion)
    keys = expected_keys(insertion)
    assert sorted(adapted.insertion_points) == sorted(keys)
    for name, key in keys.items():
        assert adapted.model.get_submodule(name).state_key == key


@pytest.mark.parametrize("insertion", ["sparse-qv", "reference-all"])
@pytest.mark.parametrize("chunk_size", [None, 32, 40])
def test_ssmlora_equals_the_spec_equations(insertion, chunk_size):
    adapted, weights = nonzero_ssmlora(insertion)
    reference_model = tiny_llama()
    ReferenceSSMLoRA(reference_model, weights, expected_keys(insertion), alpha=16.0)
    ids = random_ids(2, 100, seed=4)
    keep = torch.arange(100)
    ours = chunked_forward(adapted, ids, chunk_size=chunk_size, keep=keep).logits
    theirs = chunked_forward(reference_model, ids, chunk_size=chunk_size, keep=keep).logits
    assert (ours - chunked_forward(tiny_llama(), ids, keep=keep).logits).abs().max() > 1e-2  # non-trivial
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_chunk_carry_matters_and_reset_turns_it_off():
    adapted, weights = nonzero_ssmlora("sparse-qv")
    ids, keep = random_ids(1, 96, seed=9), torch.arange(64, 96)
    carried = chunked_forward(adapted, ids, chunk_size=32, keep=keep).logits
    reset = chunked_forward(adapted, ids, chunk_size=32, keep=keep, ssm_carry="reset").logits
    alone = chunked_forward(adapted, ids, chunk_size=32, keep=keep, ssm_carry="reset").logits
    assert (carried - reset).abs().max() > 1e-3
    torch.testing.assert_close(reset, alone, rtol=0, atol=0)
    # With reset, every chunk starts from zeros: equal to the reference with its carry cleared.
    reference_model = tiny_llama()
    ref = ReferenceSSMLoRA(reference_model, weights, expected_keys("sparse-qv"), alpha=16.0)
    reference_model.register_forward_pre_hook(lambda m, a: ref.carry.clear())
    theirs = chunked_forward(reference_model, ids, chunk_size=32, keep=keep).logits
    torch.testing.assert_close(reset, theirs, rtol=0, atol=1e-4)


def test_parameter_ratio_on_llama_2_7b_shapes():
    from longctx.engine.bases import meta_model

    lora = wrap(meta_model("llama-2-7b"), "lora").trainable_parameters()
    ssm = wrap(meta_model("llama-2-7b"), "ssmlora").trainable_parameters()
    assert lora == 32 * 2 * 8 * (4096 + 4096)
    assert ssm == 32 * (8 * (4096 + 4096) + 2 * 8 * 8)
    assert 0.45 <= ssm / lora <= 0.55
