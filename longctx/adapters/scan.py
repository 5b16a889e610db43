"""Diagonal linear recurrence along the token axis, computed in parallel.

    s_t = λ ⊙ s_{t-1} + u_t,   s_{-1} = s0 (zeros if None),   λ = exp(log_decay) ∈ (0, 1)^r

Used by `ssmlora-scan`. The T tokens are cut into n blocks of Q. Inside a block the recurrence
is a decay matrix, λ_k^(i-j) for j ≤ i, applied to each channel k; written block-diagonally over
the channels it is one (Q·r, Q·r) matrix, so all blocks take one matmul. The states entering the
blocks obey the same recurrence with decay λ^Q over n items (s0, then each block's local end
state): a scan of n items, planned the same way. Each block then adds its entering state decayed
by λ^(i+1), one more matmul. `ScanPlan` holds these matrices: they depend on λ and T only, so a
caller that scans many chunks of one length with fixed weights builds them once (`DerivedCache`).

Why matmuls: on a GPU this scan is bound by the host issuing operations, not by arithmetic
(T = 4096, r = 8 is 0.5M multiply-adds per block level): a plan runs in about ten operations.
`default_block` picks Q per device. `linear_scan_ref` is the plain loop the tests compare against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CPU_BLOCK = 8  # Q on a CPU, where arithmetic (T·Q·r² multiply-adds) is the cost: fastest at 16K-64K, r = 8
MAX_GPU_WIDTH = 512  # Q·r at most on a GPU: (Q·r)² floats, 1 MiB in float32 (r = 8: two levels up to 4K tokens)


def linear_scan_ref(u: Tensor, log_decay: Tensor, s0: Tensor | None = None) -> Tensor:
    """Sequential reference: u (B, T, r), log_decay (r,), s0 (B, r) -> s (B, T, r)."""
    decay = log_decay.exp()  # (r,)
    s = torch.zeros_like(u[:, 0]) if s0 is None else s0.to(u.dtype)  # (B, r)
    out = []
    for t in range(u.shape[1]):
        s = decay * s + u[:, t]
        out.append(s)
    return torch.stack(out, dim=1)  # (B, T, r)


def default_block(t: int, device: torch.device, rank: int = 8) -> int:
    """Q for T tokens of `rank` channels: CPU_BLOCK on a CPU; elsewhere ⌈√T⌉ (two levels: the
    block entries fit one block) while Q·r ≤ MAX_GPU_WIDTH, a third level beyond."""
    if device.type == "cpu":
        return CPU_BLOCK
    return max(1, min(math.isqrt(max(t, 1) - 1) + 1, MAX_GPU_WIDTH // max(rank, 1)))


@dataclass(frozen=True)
class ScanPlan:
    """The matrices of a scan of up to n·Q tokens with fixed λ (planned for T: n = ⌈T/Q⌉).

    within:  (Q·r, Q·r) block-diagonal over channels: [j·r + k, i·r + k] = λ_k^(i-j) for j ≤ i.
    carried: (r, Q·r): [k, i·r + k] = λ_k^(i+1), the entering state as seen at the block's i-th token.
    inner:   plan of the scan over the n block entries (decay λ^Q); None when n == 1.
    """

    q: int
    n: int
    within: Tensor
    carried: Tensor
    inner: ScanPlan | None


def _channel_diagonal(per_channel: Tensor) -> Tensor:
    """(a, c, r) -> (a·r, c·r) with [x·r + k, y·r + k] = per_channel[x, y, k], zero across channels."""
    a, c, r = per_channel.shape
    return torch.diag_embed(per_channel).permute(0, 2, 1, 3).reshape(a * r, c * r)  # (a, r, c, r) flattened


def plan_scan(log_decay: Tensor, t: int, block: int | None = None, mix: Tensor | None = None) -> ScanPlan:
    """Plan for T tokens: log_decay (r,) (= log λ < 0); `block` is Q (values below 2 act as 2; None:
    `default_block`); `mix` (r, r): the scan's inputs are u·mix (ssmlora-scan's D), folded into the
    first matrix so that a run takes no separate product. Differentiable in log_decay and mix."""
    r = log_decay.shape[0]
    block = default_block(t, log_decay.device, r) if block is None else block
    q = max(1, min(max(block, 2), t))  # Q ≥ 2 so that each level shrinks
    n = -(-t // q)
    idx = torch.arange(q + 1, device=log_decay.device, dtype=log_decay.dtype)  # (Q+1,)
    lag = (idx[1:, None] - idx[None, 1:]).clamp(min=0)  # (Q, Q): i - j, 0 above the diagonal
    decay = torch.tril((log_decay[:, None, None] * lag).exp())  # (r, Q_i, Q_j): zero where j > i
    within = _channel_diagonal(decay.permute(2, 1, 0))  # (Q·r, Q·r)
    if mix is not None:  # rows j·r + m: Σ_k mix[m, k] · within[j·r + k]
        within = (mix.to(within.dtype) @ within.view(q, r, q * r)).reshape(q * r, q * r)
    powers = (idx[1:, None] * log_decay).exp()  # (Q, r): λ^(i+1)
    carried = _channel_diagonal(powers[None])  # (r, Q·r)
    inner = plan_scan(q * log_decay, n, block) if n > 1 else None
    return ScanPlan(q, n, within, carried, inner)


def run_scan(u: Tensor, plan: ScanPlan, s0: Tensor | None = None) -> Tensor:
    """The scan of u (B, T, r) (times the plan's mix) from s0 (B, r) or zeros, T ≤ plan.n · plan.q
    -> s (B, T, r). The plan's matrices must be in u's dtype (plan from log_decay in that dtype)."""
    b, t, r = u.shape
    q, n = plan.q, plan.n
    padded = u if n * q == t else torch.nn.functional.pad(u, (0, 0, 0, n * q - t))  # (B, nQ, r)
    local = torch.mm(padded.reshape(b * n, q * r), plan.within)  # (B·n, Q·r): each block from zero
    if n > 1 or s0 is not None:
        local = torch.addmm(local, _entering_states(local, plan, s0, b), plan.carried)  # (B·n, Q·r)
    out = local.view(b, n * q, r)
    return out if n * q == t else out[:, :t]


def _entering_states(local: Tensor, plan: ScanPlan, s0: Tensor | None, b: int) -> Tensor:
    """The state entering each block, (B·n, r): s0, then the inner scan of the blocks' end states."""
    r = plan.carried.shape[0]
    if s0 is None:
        start = local.new_zeros(b, r)  # (B, r)
    else:
        start = s0 if s0.dtype == local.dtype else s0.to(local.dtype)  # (B, r)
    if plan.n == 1:
        return start
    ends = local.view(b, plan.n, plan.q, r)[:, :-1, -1]  # (B, n-1, r): each block's own end state
    return run_scan(torch.cat([start[:, None], ends], dim=1), plan.inner).reshape(b * plan.n, r)


def linear_scan(u: Tensor, log_decay: Tensor, s0: Tensor | None = None, block: int | None = None,
                mix: Tensor | None = None) -> Tensor:
    """Parallel scan: u (B, T, r), log_decay (r,) (= log λ < 0), s0 (B, r), mix (r, r) -> s (B, T, r)
    of the inputs u (u·mix with a mix)."""
    return run_scan(u, plan_scan(log_decay.to(u.dtype), u.shape[1], block, mix), s0)
