"""The parallel scan equals the plain sequential loop, values and gradients, at any length.

Also: scanning a sequence in two calls (the second starting from the first's final state) equals
one call, which is what makes chunked evaluation of `ssmlora-scan` exact.
"""
from __future__ import annotations

import pytest
import torch

from longctx.adapters.scan import CPU_BLOCK, default_block, linear_scan, linear_scan_ref

LENGTHS = [1, 7, 64, 65, 200, 1000, 4099]
RANKS = [1, 8]
BATCHES = [1, 3]


def inputs(batch: int, length: int, rank: int, with_s0: bool, dtype: torch.dtype = torch.float32,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """u (B, T, r), log_decay (r,) with λ spread over 0.05..0.9999 (one channel: 0.9999), s0 or None."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, rank, generator=gen, dtype=dtype)
    decay = torch.linspace(0.05, 0.9999, rank, dtype=torch.float64) if rank > 1 else torch.tensor([0.9999])
    s0 = torch.randn(batch, rank, generator=gen, dtype=dtype) if with_s0 else None
    return u, decay.log().to(dtype), s0


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over the larger of max |want| and 1 (errors scale with the state's size)."""
    return ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def _double(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.double()


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("with_s0", [False, True])
def test_fast_equals_reference(length: int, rank: int, batch: int, with_s0: bool) -> None:
    u, log_decay, s0 = inputs(batch, length, rank, with_s0)
    fast, ref = linear_scan(u, log_decay, s0), linear_scan_ref(u, log_decay, s0)
    assert fast.shape == ref.shape == (batch, length, rank) and fast.dtype == torch.float32
    truth = linear_scan_ref(u.double(), log_decay.double(), _double(s0))  # same inputs, exact arithmetic
    assert relative_error(fast.double(), truth) < 1e-5
    # The fp32 loop itself drifts by up to ~3e-5 at λ = 0.9999, T = 4099 (λ rounded once, raised
    # to the 4000th power): the two fp32 results may differ by 1e-5 plus that loop error, no more.
    assert relative_error(fast, ref) < 1e-5 + relative_error(ref.double(), truth)
    torch.testing.assert_close(linear_scan(u.double(), log_decay.double(), _double(s0)), truth,
                               rtol=0, atol=1e-10)


def _gradients(scan, u, log_decay, s0, weights) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in (u, log_decay) + ((s0,) if s0 is not None else ())]
    (scan(*leaves[:2], leaves[2] if s0 is not None else None) * weights).sum().backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("with_s0", [False, True])
def test_gradients_equal_reference(length: int, rank: int, batch: int, with_s0: bool) -> None:
    u, log_decay, s0 = inputs(batch, length, rank, with_s0)
    weights = torch.randn(batch, length, rank, generator=torch.Generator().manual_seed(1))
    fast = _gradients(linear_scan, u, log_decay, s0, weights)
    ref = _gradients(linear_scan_ref, u, log_decay, s0, weights)
    for name, f, r in zip(("u", "log_decay", "s0"), fast, ref):
        assert torch.isfinite(f).all(), name
        assert relative_error(f, r) < 1e-4, name  # fp32, relative to the gradient's size
    exact = _gradients(linear_scan_ref, u.double(), log_decay.double(), _double(s0), weights.double())
    for name, f, e in zip(("u", "log_decay", "s0"), fast, exact):
        assert relative_error(f.double(), e) < 1e-5, name


@pytest.mark.parametrize("length", [5, 70, 300])
def test_gradients_exact_in_float64(length: int) -> None:
    u, log_decay, s0 = inputs(2, length, 4, True, dtype=torch.float64)
    weights = torch.randn(2, length, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fast = _gradients(linear_scan, u, log_decay, s0, weights)
    ref = _gradients(linear_scan_ref, u, log_decay, s0, weights)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("split", [1, 31, 32, 64, 65, 500, 999])
@pytest.mark.parametrize("with_s0", [False, True])
def test_scanning_in_two_pieces_equals_one_scan(split: int, with_s0: bool) -> None:
    u, log_decay, s0 = inputs(3, 1000, 8, with_s0)
    whole = linear_scan(u, log_decay, s0)
    first = linear_scan(u[:, :split], log_decay, s0)
    second = linear_scan(u[:, split:], log_decay, first[:, -1])
    assert relative_error(torch.cat([first, second], 1), whole) < 1e-5


def test_block_size_does_not_change_the_result() -> None:
    u, log_decay, s0 = inputs(2, 777, 8, True)
    ref = linear_scan_ref(u, log_decay, s0)
    for block in (1, 2, 5, 16, 64, 128, 1000):
        assert relative_error(linear_scan(u, log_decay, s0, block=block), ref) < 1e-5, block


@pytest.mark.parametrize("decay", [1e-30, 1e-6, 0.05, 0.5, 0.9999, 1 - 1e-7])
def test_extreme_decays_stay_finite(decay: float) -> None:
    u = torch.randn(2, 4099, 2, generator=torch.Generator().manual_seed(2))
    log_decay = torch.full((2,), decay, dtype=torch.float64).log().float().requires_grad_()
    s0 = torch.ones(2, 2, requires_grad=True)
    out = linear_scan(u, log_decay, s0)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(log_decay.grad).all() and torch.isfinite(s0.grad).all()
    # Against the float64 loop: near λ = 1 the fp32 loop itself drifts (≈2e-5), the blocked scan less.
    truth = linear_scan_ref(u.double(), log_decay.detach().double(), s0.detach().double())
    assert relative_error(out.detach().double(), truth) < 1e-5


def test_default_block_per_device() -> None:
    """A CPU keeps the arithmetic small (Q = 8); a GPU gets depth 2: Q = ⌈√T⌉, Q·r at most 512."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [default_block(t, cpu) for t in (1, 4096, 10**6)] == [CPU_BLOCK] * 3
    assert [default_block(t, gpu) for t in (0, 1, 2, 4096, 4097, 65536, 10**6)] == [1, 1, 2, 64, 64, 64, 64]
    assert [default_block(t, gpu, rank=64) for t in (16, 4096)] == [4, 8]


@pytest.mark.parametrize("length", [1, 2, 65, 4096, 4097, 66000])
def test_gpu_block_equals_reference(length: int) -> None:
    """The block the GPU uses by default at r = 8, run here: two levels up to 4K tokens, three beyond."""
    u, log_decay, s0 = inputs(2, length, 8, True)
    block = default_block(length, torch.device("cuda"), rank=8)
    truth = linear_scan_ref(u.double(), log_decay.double(), s0.double())
    assert relative_error(linear_scan(u, log_decay, s0, block=block).double(), truth) < 1e-5


@pytest.mark.parametrize("length,block", [(1, None), (7, None), (4099, None), (4096, 64), (4097, 64)])
@pytest.mark.parametrize("with_s0", [False, True])
def test_a_folded_mix_equals_scanning_the_mixed_inputs(length: int, block: int | None, with_s0: bool) -> None:
    """plan_scan's `mix` (ssmlora-scan's D, folded into the first matrix) scans u·mix: values and
    the gradients of u, log λ and mix against the loop on u @ mix, in float64 (4097 at Q = 64: three levels)."""
    u, log_decay, s0 = inputs(2, length, 8, with_s0, dtype=torch.float64)
    mix = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = torch.randn(2, length, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves = {}

    def run(scan):
        for name, value in (("u", u), ("log_decay", log_decay), ("mix", mix)):
            leaves[name] = value.clone().requires_grad_()
        if scan is linear_scan_ref:
            out = linear_scan_ref(leaves["u"] @ leaves["mix"], leaves["log_decay"], s0)
        else:
            out = linear_scan(leaves["u"], leaves["log_decay"], s0, block=block, mix=leaves["mix"])
        (out * weights).sum().backward()
        return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}

    (fast, fast_grads), (ref, ref_grads) = run(linear_scan), run(linear_scan_ref)
    assert relative_error(fast, ref) < 1e-10
    for name in ("u", "log_decay", "mix"):
        assert relative_error(fast_grads[name], ref_grads[name]) < 1e-9, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_scan_equals_reference(dtype: torch.dtype) -> None:
    u, log_decay, s0 = inputs(2, 4099, 8, True, dtype=dtype)
    truth = linear_scan_ref(u.double(), log_decay.double(), s0.double())
    got = linear_scan(u.cuda(), log_decay.cuda(), s0.cuda())
    assert got.device.type == "cuda" and got.dtype == dtype
    assert relative_error(got.double().cpu(), truth) < (1e-5 if dtype == torch.float32 else 1e-10)
