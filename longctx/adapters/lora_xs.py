"""`lora-xs`: LoRA-XS (Bałazy et al., 2024, arXiv:2405.17604) — LoRA with frozen factors from the
truncated SVD of each adapted weight and a trainable r×r matrix R between them. For a linear layer
y = W x + b with W of shape (d_out, d_in) and W ≈ U_r Σ_r V_rᵀ (top-r singular triplets):

    y = W x + b + (alpha / r) · B R A x,   B = U_r (d_out×r, orthonormal),  A = Σ_r V_rᵀ = U_rᵀ W (r×d_in)

Only R trains: r² parameters per module, independent of the model's width.

Where we follow the reference code (github.com/MohammadrezaBanaei/LoRA-XS, `utils/initialization_utils.py`,
`utils/svd_utils.py`, `utils/latent_utils.py`): it takes the truncated SVD of Wᵀ = P S Qᵀ and sets
PEFT's `lora_A.weight = (Wᵀ Q)ᵀ = S Pᵀ` and `lora_B.weight = Q`; since W = Q S Pᵀ, that is B = U_r
(no Σ) and A = Σ_r V_rᵀ (Σ on the input side), as above. R (its `default_lora_latent_mapping`, an
r×r linear map applied between A and B) starts from a normal distribution with mean 0 and standard
deviation 1e-5 (`torch.nn.init.normal_(std=1e-5)`; the recipe's `r_init_std`), so a fresh adapter
differs from its base by a branch of that order, not by exactly zero. The scale is PEFT's alpha / r; dropout acts on x.

Where we depart: the reference's SVD is scikit-learn's randomized `TruncatedSVD` (n_iter=10,
random_state=42); ours is the exact `torch.linalg.svd` (float32, float64 on a float64 base), which
the randomized one approximates. Singular vectors get a fixed sign: each column of U_r (of B) has a
positive largest-magnitude entry, so the factors do not depend on the LAPACK build. That is current
scikit-learn's rule for `components_`; the 0.24 it pins fixes the sign by V_r's columns instead. A
sign flip of a singular pair only re-expresses R (R -> D R D) and leaves R's initial law unchanged.
R is drawn on the CPU in float32 from the global generator that `wrap(..., seed=...)` seeds, so
its start is reproducible for a seed on any device and dtype. A and B are recomputed from the base
at load time (the base fingerprint guarantees it is the same base). On a bf16/fp16 base the two
width-sized products run in the base's dtype with float32 accumulation (`adapters.precision`), R
folded into the output factor as (B R)ᵀ, which the layer keeps while B and R are unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from longctx.adapters.base import AdapterMethod, adapter_dtype
from longctx.adapters.derived import DerivedCache
from longctx.adapters.insertion import replace_modules, resolve_points
from longctx.adapters.precision import add_projection_out, project_in
from longctx.adapters.recipe import Recipe
from longctx.engine.state import StateBinding


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(B = U_r, A = Σ_r V_rᵀ) of `weight` (d_out, d_in), in the adapter's dtype (float32, or float64 on
    a float64 weight), with a fixed sign convention."""
    work = weight.detach().to(adapter_dtype(weight.dtype))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)  # (o, k), (k,), (k, i)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    flip = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))  # (1, r)
    flip[flip == 0] = 1.0
    u, vh = u * flip, vh * flip.T
    return u, s[:, None] * vh  # (o, r), (r, i)


def initial_r(rank: int, std: float) -> Tensor:
    """R's start, N(0, std²) entries, drawn in float32 on the CPU from the global generator."""
    return torch.randn(rank, rank, dtype=torch.float32) * std  # (r, r)


class LoraXSLinear(nn.Module):
    """A frozen linear layer plus (alpha/r) · B R A with frozen SVD factors and trainable R."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float, *, r_init_std: float) -> None:
        super().__init__()
        rank = min(rank, *base_layer.weight.shape)
        self.base_layer, self.rank, self.scale = base_layer, rank, alpha / rank
        b, a = svd_factors(base_layer.weight, rank)
        dtype = adapter_dtype(base_layer.weight.dtype)  # float32 on a bf16/fp16 base
        self.register_buffer("lora_xs_B", b.to(dtype), persistent=False)  # (d_out, r)
        self.register_buffer("lora_xs_A", a.to(dtype), persistent=False)  # (r, d_in)
        self.lora_xs_R = nn.Parameter(initial_r(rank, r_init_std).to(device=base_layer.weight.device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.operands = DerivedCache(2)  # A and (B R)ᵀ in the base's dtype, kept while unchanged

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, d_in)
        y = self.base_layer(x)  # (B, T, d_out)
        z = project_in(self.dropout(x), self.operands.cast("A", self.lora_xs_A, x.dtype).T)  # (B, T, r) float32
        out = self.operands.get(("BR", y.dtype), (self.lora_xs_B, self.lora_xs_R),
                                lambda: self.folded_out().to(y.dtype))  # (r, d_out) in y's dtype
        return add_projection_out(y, z, out, self.scale)  # y + scale · z (B R)ᵀ = y + scale · (z Rᵀ) Bᵀ

    def folded_out(self) -> Tensor:
        """(B R)ᵀ (r, d_out): R folded into the output factor, one product fewer per call."""
        return (self.lora_xs_B @ self.lora_xs_R).T


class LoraXS(AdapterMethod):
    name = "lora-xs"

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        points = list(resolve_points(model, recipe.insertion))
        replace_modules(model, points, lambda name, layer: LoraXSLinear(
            layer, recipe.rank, recipe.alpha, recipe.dropout, r_init_std=recipe.r_init_std))
        return model, points
