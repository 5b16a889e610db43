"""The parallel scan equals the plain sequential loop, values and gradients, at any length."""
from __future__ import annotations

import pytest
import torch

from longctx.adapters.scan import linear_scan, linear_scan_ref

LENGTHS = [1, 7, 32, 33, 64, 200, 1000, 4099]


def inputs(batch, length, rank, with_s0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, rank, generator=gen, dtype=dtype)
    log_decay = torch.linspace(0.05, 0.9999, rank, dtype=dtype).log()  # λ from fast to very slow
    s0 = torch.randn(batch, rank, generator=gen, dtype=dtype) if with_s0 else None
    return u, log_decay, s0


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("rank, batch", [(1, 1), (8, 3)])
@pytest.mark.parametrize("with_s0", [False, True])
def test_fast_equals_reference(length, rank, batch, with_s0):
    u, log_decay, s0 = inputs(batch, length, rank, with_s0)
    fast, ref = linear_scan(u, log_decay, s0), linear_scan_ref(u, log_decay, s0)
    scale = ref.abs().max().clamp(min=1.0)
    assert ((fast - ref).abs().max() / scale).item() < 1e-5  # fp32, relative to the state's size
    u64, d64, s64 = (x.double() if x is not None else None for x in (u, log_decay, s0))
    torch.testing.assert_close(linear_scan(u64, d64, s64), linear_scan_ref(u64, d64, s64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("length", [5, 70, 300])
def test_gradients_equal_reference(length):
    grads = []
    for scan in (linear_scan, linear_scan_ref):
        u, log_decay, s0 = (x.double().requires_grad_() for x in inputs(2, length, 4, True))
        weights = torch.randn(2, length, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (scan(u, log_decay, s0) * weights).sum().backward()
        grads.append((u.grad, log_decay.grad, s0.grad))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("split", [1, 31, 32, 500])
def test_scanning_in_two_pieces_equals_one_scan(split):
    u, log_decay, _ = inputs(2, 1000, 8, False)
    whole = linear_scan(u, log_decay)
    first = linear_scan(u[:, :split], log_decay)
    second = linear_scan(u[:, split:], log_decay, first[:, -1])
    scale = whole.abs().max()
    assert ((torch.cat([first, second], 1) - whole).abs().max() / scale).item() < 1e-5


@pytest.mark.parametrize("decay", [1e-30, 0.5, 1 - 1e-7])
def test_extreme_decays_stay_finite(decay):
    u = torch.randn(1, 4099, 2)
    log_decay = torch.tensor([decay, decay]).log()
    out = linear_scan(u, log_decay, torch.ones(1, 2))
    assert torch.isfinite(out).all()
    # Against the float64 loop: near λ = 1 the fp32 loop itself drifts (≈2e-5), the blocked scan less.
    truth = linear_scan_ref(u.double(), log_decay.double(), torch.ones(1, 2, dtype=torch.float64))
    assert ((out.double() - truth).abs().max() / truth.abs().max().clamp(min=1)).item() < 1e-5
