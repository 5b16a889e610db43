"""LoRA-XS against its definition written out here: y = W x + (alpha/r) · U_r R Σ_r V_rᵀ x (up to
the sign of each singular pair), with exactly r² trainable parameters per adapted module."""
from __future__ import annotations

import torch
from conftest import perturb, tiny_llama

from longctx.adapters import wrap
from longctx.adapters.lora_xs import svd_factors


def test_trainable_parameters_are_exactly_r_squared_per_module():
    adapted = wrap(tiny_llama(), "lora-xs")
    rank = adapted.recipe.rank
    assert adapted.trainable_parameters() == rank * rank * len(adapted.insertion_points)
    assert len(adapted.insertion_points) == 8  # q_proj and v_proj in each of 4 layers
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("lora_xs_R") for n in names)


def test_each_layer_equals_the_svd_formula_on_random_weights():
    adapted = wrap(tiny_llama(), "lora-xs")
    perturb(adapted, scale=0.5)
    scale, r = adapted.recipe.alpha / adapted.recipe.rank, adapted.recipe.rank
    for name in adapted.insertion_points:
        layer = adapted.model.get_submodule(name)
        weight = layer.base_layer.weight.double()  # (o, i)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
        signs = torch.sign((layer.lora_xs_A.double() * vh).sum(1))  # (r,): +1 or -1 per singular pair
        assert torch.allclose(signs.abs(), torch.ones(r, dtype=torch.float64))
        d = torch.diag(signs)
        x = torch.randn(3, 5, weight.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        want = x @ weight.T + scale * x @ (u @ d @ layer.lora_xs_R.double() @ d @ torch.diag(s) @ vh).T
        with torch.no_grad():
            got = layer(x.float()).double()
        assert torch.allclose(got, want, atol=1e-4), name


def test_truncated_svd_factors_reconstruct_the_weight_and_have_fixed_signs():
    weight = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    b, a = svd_factors(weight, 7)
    assert torch.allclose(b @ a, weight, atol=1e-5)
    for w in (weight, -weight):
        b, _ = svd_factors(w, 3)
        assert (b.gather(0, b.abs().argmax(0, keepdim=True)) > 0).all()
