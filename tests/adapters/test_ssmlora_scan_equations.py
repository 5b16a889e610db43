"""ssmlora-scan against its equations (`longctx.adapters.ssmlora_scan`), written out here with the
plain sequential scan, independently of longctx's layers and of the folded scan plans:

    z = x A,   s_t = λ ⊙ s_{t-1} + m_t · (z_t D),   y = W x + (alpha / r) · (z + s C) B,   λ = exp(-1/τ)

with m_t = 0 on padding, each insertion point its own state, and s_T carried into the next chunk.
All weights are random (D not diagonal, C and B non-zero), so a transposed or dropped factor shows.
"""
from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_llama

from longctx.adapters import wrap
from longctx.adapters.scan import linear_scan_ref
from longctx.engine.runner import chunked_forward

ALPHA, RANK = 16.0, 8  # the recipe's (longctx/adapters/recipes/ssmlora-scan.yaml)
PADDING = 13  # left padding of the second sequence


def nonzero_scan(dtype: torch.dtype, device: str = "cpu"):
    adapted = wrap(tiny_llama().to(device=device, dtype=dtype), "ssmlora-scan")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if name.endswith("scan_log_tau"):  # τ from 1 to 100 tokens
                p.copy_(torch.empty(p.shape, dtype=torch.float64).uniform_(0, 4.6, generator=gen).to(device))
            elif p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device))
    weights = {n.replace(".base_layer", ""): p.detach().clone()
               for n, p in adapted.model.named_parameters() if "scan_" in n}
    return adapted, weights


class ReferenceScan:
    """Hooks on a plain base: the branch from the equations, one state per point, carried across."""

    def __init__(self, base, weights, points):
        self.weights, self.carry, self.live, self.mask = weights, {}, {}, None
        for name in points:
            base.get_submodule(name).register_forward_hook(self.hook(name))
        base.register_forward_pre_hook(self.begin, with_kwargs=True)
        base.register_forward_hook(lambda m, a, o: self.carry.update(self.live))

    def begin(self, module, args, kwargs):
        self.live.clear()
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        self.mask = None if mask is None else mask[:, -ids.shape[1]:]  # (B, T)

    def hook(self, name):
        def add_branch(module, inputs, output):
            (x,) = inputs  # (B, T, d_in)
            A, B, C, D, log_tau = (self.weights[f"{name}.scan_{k}"] for k in ("A", "B", "C", "D", "log_tau"))
            z = x.to(A.dtype) @ A  # (B, T, r)
            u = z @ D if self.mask is None else (z @ D) * self.mask[..., None]
            s = linear_scan_ref(u, -torch.exp(-log_tau), self.carry.get(name))  # (B, T, r)
            self.live[name] = s[:, -1]
            return output + ((ALPHA / RANK) * (z + s @ C) @ B).to(output.dtype)
        return add_branch


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CASES = [("cpu", torch.float32, 1e-4), ("cpu", torch.float64, 1e-10),
         pytest.param("cuda", torch.float32, 1e-4, marks=CUDA),  # the GPU's block: Q = ⌈√T⌉
         pytest.param("cuda", torch.float64, 1e-10, marks=CUDA)]


@pytest.mark.parametrize("device,dtype,atol", CASES)
@pytest.mark.parametrize("chunk_size", [None, 1, 32, 37])
def test_ssmlora_scan_equals_its_equations(device: str, dtype: torch.dtype, atol: float,
                                           chunk_size: int | None) -> None:
    """Chunked, with left padding, against the reference run unchunked (on CUDA: both there)."""
    adapted, weights = nonzero_scan(dtype, device)
    assert {adapted.model.get_submodule(p).scale for p in adapted.insertion_points} == {ALPHA / RANK}
    reference_model = tiny_llama().to(device=device, dtype=dtype)
    ReferenceScan(reference_model, weights, adapted.insertion_points)
    ids = random_ids(2, 100, seed=4).to(device)
    mask = torch.ones_like(ids)
    mask[1, :PADDING] = 0
    keep = torch.arange(PADDING, 100)  # rows that are real tokens in both sequences
    ours = chunked_forward(adapted, ids, attention_mask=mask, chunk_size=chunk_size, keep=keep).logits
    theirs = chunked_forward(reference_model, ids, attention_mask=mask, keep=keep).logits
    base = chunked_forward(tiny_llama().to(device=device, dtype=dtype), ids, attention_mask=mask, keep=keep).logits
    assert (ours - base).abs().max() > 1e-2  # the branch is not trivially zero
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
