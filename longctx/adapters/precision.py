"""Mixed precision of the adapter branches (the dtype policy in `longctx.adapters.base`).

Adapter weights and state are float32. The two products that touch the model's width — into
the rank-r space (x A) and back out of it (· B) — run as GEMMs in the layer's own dtype with
float32 accumulation, as autocast runs them; everything in the rank-r space is float32. For a
bf16 base this keeps the branch near the base's speed (measured on an H200 at 32K tokens:
ssmlora 0.95-0.96x of the base with float32 copies of the activations, 0.99x like this); for a
float32 base the casts are no-ops. The layers pass their weights already in the layer's dtype,
cast once and kept while unchanged (`DerivedCache.cast`), so a call casts only activations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from longctx.adapters.base import adapter_dtype


def project_in(x: Tensor, a: Tensor) -> Tensor:
    """x (B, T, d_in), a (d_in, r), both in the layer's dtype -> x a (B, T, r) in float32 (float64
    on a float64 layer: the adapter's dtype, never narrower than the layer's)."""
    flat = torch.mm(x.reshape(-1, x.shape[-1]), a)  # (B·T, r) in the layer's dtype
    return flat.view(*x.shape[:-1], a.shape[-1]).to(adapter_dtype(x.dtype))


def add_projection_out(y: Tensor, g: Tensor, b: Tensor, scale: float) -> Tensor:
    """y + scale · g b as one GEMM in y's dtype: y (B, T, d_out), g (B, T, r) or (B·T, r) in the
    adapter's dtype, b (r, d_out) in y's dtype."""
    flat = torch.addmm(y.reshape(-1, y.shape[-1]), g.reshape(-1, g.shape[-1]).to(y.dtype), b,
                       alpha=scale)  # (B·T, d_out)
    return flat.view(y.shape)
