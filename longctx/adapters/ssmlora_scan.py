"""`ssmlora-scan`: SSMLoRA with its state running along the token axis (our extension).

    z   = x A                                  (T, r)
    s_t = λ ⊙ s_{t-1} + (z_t D)                λ ∈ (0,1)^r learned, input-independent
    y   = W x + (alpha / r) · (z + s C) B      B = 0 at start: the adapted model equals the base

λ = exp(-1/τ) with time scales τ initialised log-spaced from 1 to the recipe's `max_timescale`
(4096) tokens; D starts at diag(1 - λ) (each channel a unit-gain moving average of z) and C at 0.
The scan is parallel (`scan.run_scan`), D folded into its first matrix. The layer keeps the
matrices of its recent chunk lengths, and A and B in a bf16/fp16 base's dtype, while its weights
are unchanged and no gradient is recorded (`DerivedCache`): building a plan issues about four times
the operations of a scan, and on a GPU the host's operations are this method's cost. Padding tokens
feed nothing into the scan, and the final state s_T is carried into the next chunk, so a chunked
run equals an unchunked one.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from longctx.adapters.base import AdapterMethod, adapter_dtype
from longctx.adapters.derived import DerivedCache
from longctx.adapters.insertion import insert_stateful_layers
from longctx.adapters.precision import add_projection_out, project_in
from longctx.adapters.recipe import Recipe
from longctx.adapters.scan import plan_scan, run_scan
from longctx.engine.state import StateBinding


class SSMLoRAScanLinear(nn.Module):
    """A frozen linear layer plus a low-rank branch whose state scans along the tokens."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float,
                 state_key: str, binding: StateBinding, detach_state: bool = True, *,
                 max_timescale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scale, self.state_key = rank, float(alpha) / rank, state_key
        self.detach_state = detach_state
        self.binding = binding
        w = base_layer.weight
        kw = dict(device=w.device, dtype=adapter_dtype(w.dtype))  # float32 on a bf16/fp16 base
        tau = torch.logspace(0.0, math.log10(max_timescale), rank, device=w.device, dtype=torch.float32)
        self.scan_log_tau = nn.Parameter(tau.log().to(kw["dtype"]))  # (r,)
        self.scan_A = nn.Parameter(torch.randn(base_layer.in_features, rank, **kw) / math.sqrt(rank))
        self.scan_B = nn.Parameter(torch.zeros(rank, base_layer.out_features, **kw))
        self.scan_C = nn.Parameter(torch.zeros(rank, rank, **kw))
        self.scan_D = nn.Parameter(torch.diag(1.0 - torch.exp(-1.0 / tau)).to(**kw))
        self.scan_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # (no operation at 0)
        self.plans = DerivedCache(3)  # derived from the weights, not sequence state: per chunk length
        self.operands = DerivedCache(2)  # A and B in the base's dtype

    def log_decay(self) -> Tensor:
        return -torch.exp(-self.scan_log_tau)  # (r,) log λ = -1/τ

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, d_in)
        y = self.base_layer(x)  # (B, T, d_out)
        state = self.binding.current()
        z = project_in(self.scan_dropout(x), self.operands.cast("A", self.scan_A, x.dtype))  # (B, T, r) float32
        u = z if state.token_mask is None else z * state.token_mask[..., None]  # padding feeds nothing
        t = u.shape[1]
        plan = self.plans.get((t, u.device, u.dtype), (self.scan_log_tau, self.scan_D),
                              lambda: plan_scan(self.log_decay().to(u.dtype), t, mix=self.scan_D))
        s = run_scan(u, plan, state.carry.get(self.state_key))  # (B, T, r): the scan of z D
        last = s[:, -1]  # (B, r)
        state.live[self.state_key] = last.detach() if self.detach_state and last.requires_grad else last
        g = torch.addmm(z.view(-1, self.rank), s.reshape(-1, self.rank), self.scan_C)  # (B·T, r): z + s C
        b = self.operands.cast("B", self.scan_B, y.dtype)  # (r, d_out)
        return add_projection_out(y, g, b, self.scale)  # y + scale · (z + sC) B

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, state_key={self.state_key!r}"


class SSMLoRAScan(AdapterMethod):
    name = "ssmlora-scan"

    def apply(self, model: nn.Module, recipe: Recipe, binding: StateBinding) -> tuple[nn.Module, list[str]]:
        # Each point scans its own state along the tokens: keys are the module names.
        layer_cls = functools.partial(SSMLoRAScanLinear, max_timescale=recipe.max_timescale)
        return model, insert_stateful_layers(model, recipe, binding, layer_cls, own_keys=True)
