"""`lora-xs`: LoRA-XS (Bałazy et al., 2024, arXiv:2405.17604) — LoRA with frozen factors from the
truncated SVD of each adapted weight and a trainable r×r matrix between them:

    y = W x + (alpha / r) · B R A x,   W ≈ U_r Σ_r V_rᵀ,  B = U_r Σ_r (d_out×r),  A = V_rᵀ (r×d_in)

Only R trains: r² parameters per module, independent of the model's width. R starts at zero,
so a fresh adapter equals its base. A and B are recomputed from the base at load time (the base
fingerprint guarantees it is the same base); singular vectors get a fixed sign (each column of
U_r has a positive largest-magnitude entry), so the factors do not depend on the LAPACK build.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from longctx.adapters.base import AdapterMethod, Recipe, adapter_dtype
from longctx.adapters.insertion import replace_modules, resolve_points
from longctx.adapters.state import StateBinding


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(B = U_r Σ_r, A = V_rᵀ) of `weight` (d_out, d_in), in float32, with a fixed sign convention."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # (o, k), (k,), (k, i)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    flip = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))  # (1, r)
    flip[flip == 0] = 1.0
    u, vh = u * flip, vh * flip.T
    return u * s, vh  # (o, r), (r, i)


class LoraXSLinear(nn.Module):
    """A frozen linear layer plus (alpha/r) · B R A with frozen SVD factors and trainable R."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        rank = min(rank, *base_layer.weight.shape)
        self.base_layer, self.rank, self.scale = base_layer, rank, alpha / rank
        b, a = svd_factors(base_layer.weight, rank)
        dtype = adapter_dtype(base_layer.weight.dtype)  # float32 on a bf16/fp16 base
        self.register_buffer("lora_xs_B", b.to(dtype), persistent=False)  # (d_out, r)
        self.register_buffer("lora_xs_A", a.to(dtype), persistent=False)  # (r, d_in)
        self.lora_xs_R = nn.Parameter(torch.zeros(rank, rank, dtype=dtype, device=base_layer.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, d_in)
        y = self.base_layer(x)  # (B, T, d_out)
        z = self.dropout(x.to(self.lora_xs_A.dtype)) @ self.lora_xs_A.T  # (B, T, r), in the adapter's dtype
        branch = (z @ self.lora_xs_R.T) @ self.lora_xs_B.T  # (B, T, d_out)
        return y + (self.scale * branch).to(y.dtype)


class LoraXS(AdapterMethod):
    name = "lora-xs"

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        points = list(resolve_points(model, recipe.insertion))
        replace_modules(model, points, lambda name, layer: LoraXSLinear(layer, recipe.rank, recipe.alpha,
                                                                        recipe.dropout))
        return model, points
