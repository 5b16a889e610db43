"""`ssmlora`: SSMLoRA (Yu et al., 2025, arXiv:2502.04958), as in the paper and reference code.

For an adapted linear map W (d_in -> d_out), rank r, scale alpha, and the state h (T, r) left
by the previous insertion point with the same state key (design §4):

    z  = x A                                   A ~ N(0, 1)/sqrt(r),  B = 0,  C = D = 0
    h' = h C + z D + h
    ĥ  = (h' - min_r h') / (max_r h' - min_r h' + 1e-8)
    y  = W x + alpha · (z + LeakyReLU(Dropout(ĥ))) B,        next state = ĥ (detached)

As in the reference code the scale is alpha itself (not alpha / r). The state runs along the
insertion points; between chunks of one sequence it is carried position-aligned
(`SequenceState.previous`). Every token is computed independently within a forward call, so
padding never changes a real token's output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.adapters.base import AdapterMethod, adapter_dtype
from longctx.adapters.derived import DerivedCache
from longctx.adapters.insertion import insert_stateful_layers
from longctx.adapters.precision import add_projection_out, project_in
from longctx.adapters.recipe import Recipe
from longctx.engine.state import StateBinding

# The reference's guard against dividing by a zero range (h' equal over its r entries gives ĥ = 0
# for any positive value); elsewhere it moves ĥ by a relative 1e-8 / range. A guard of the
# reference's formula, not a tuning setting: kept out of the recipe.
NORM_EPS = 1e-8


class SSMLoRALinear(nn.Module):
    """A frozen linear layer plus the SSMLoRA branch; reads/writes its key's state."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float,
                 state_key: str, binding: StateBinding, detach_state: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha, self.state_key = rank, float(alpha), state_key
        self.detach_state = detach_state
        self.binding = binding
        w = base_layer.weight
        kw = dict(device=w.device, dtype=adapter_dtype(w.dtype))  # float32 on a bf16/fp16 base
        self.ssmlora_A = nn.Parameter(torch.randn(base_layer.in_features, rank, **kw) / math.sqrt(rank))
        self.ssmlora_B = nn.Parameter(torch.zeros(rank, base_layer.out_features, **kw))
        self.ssmlora_C = nn.Parameter(torch.zeros(rank, rank, **kw))
        self.ssmlora_D = nn.Parameter(torch.zeros(rank, rank, **kw))
        self.ssmlora_dropout = nn.Dropout(dropout)
        self.operands = DerivedCache(2)  # A and B in the base's dtype, kept while unchanged

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, d_in)
        y = self.base_layer(x)  # (B, T, d_out)
        state = self.binding.current()
        z = project_in(x, self.operands.cast("A", self.ssmlora_A, x.dtype))  # (B, T, r) float32
        h = state.previous(self.state_key, z)  # (B, T, r)
        h_new = h @ self.ssmlora_C + z @ self.ssmlora_D + h  # (B, T, r)
        # amin/amax, not aminmax: torch 2.11 (a common cluster build) has no gradient for aminmax
        low, high = h_new.amin(-1, keepdim=True), h_new.amax(-1, keepdim=True)  # (B, T, 1) each
        h_hat = (h_new - low) / (high - low + NORM_EPS)  # (B, T, r)
        state.live[self.state_key] = h_hat.detach() if self.detach_state else h_hat
        g = z + F.leaky_relu(self.ssmlora_dropout(h_hat))  # (B, T, r)
        b = self.operands.cast("B", self.ssmlora_B, y.dtype)  # (r, d_out)
        return add_projection_out(y, g, b, self.alpha)  # y + alpha · g B: (B, T, d_out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, state_key={self.state_key!r}"


class SSMLoRA(AdapterMethod):
    name = "ssmlora"

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        return model, insert_stateful_layers(model, recipe, binding, SSMLoRALinear)
