"""Diagonal linear recurrence along the token axis, computed in parallel.

    s_t = λ ⊙ s_{t-1} + u_t,   s_{-1} = s0 (zeros if None),   λ = exp(log_decay) ∈ (0, 1)^r

Used by `ssmlora-scan`. `linear_scan` splits the T tokens into blocks of Q: inside a block the
recurrence is a masked decay matrix L[t, j] = λ^(t-j) (j ≤ t) applied by einsum; the block-end
states obey the same recurrence with decay λ^Q over T/Q items, so they come from a recursive call;
each block then adds its carried-in state decayed by λ^(i+1). No Python loop over tokens: depth
is log_Q(T). `default_block` picks Q per device: on a CPU the arithmetic (Q·r multiply-adds per
token) is the cost, so Q is small; on a GPU the number of operations is (each a few microseconds
of launch for a few microseconds of work at T = 4096, r = 8), so Q = ⌈√T⌉ keeps the depth at 2.
`linear_scan_ref` is the plain sequential loop the tests compare against.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

CPU_BLOCK = 32  # fastest at 16K tokens, r = 8 on a 2-core CPU (0.95 ms vs 2.6 ms for Q = ⌈√T⌉ = 128)
MAX_GPU_BLOCK = 256  # depth 2 up to 64K tokens; beyond, a third level rather than Q·r growing further


def linear_scan_ref(u: Tensor, log_decay: Tensor, s0: Tensor | None = None) -> Tensor:
    """Sequential reference: u (B, T, r), log_decay (r,), s0 (B, r) -> s (B, T, r)."""
    decay = log_decay.exp()  # (r,)
    s = torch.zeros_like(u[:, 0]) if s0 is None else s0.to(u.dtype)  # (B, r)
    out = []
    for t in range(u.shape[1]):
        s = decay * s + u[:, t]
        out.append(s)
    return torch.stack(out, dim=1)  # (B, T, r)


def _decay_matrix(log_decay: Tensor, q: int) -> Tensor:
    """L[k, t, j] = λ_k^(t-j) for j ≤ t, else 0: (r, Q, Q). The lag is clamped at 0 before exp
    (no inf·0 above the diagonal, whose entries tril then zeroes), five operations in all."""
    idx = torch.arange(q, device=log_decay.device, dtype=log_decay.dtype)  # (Q,)
    lag = (idx[:, None] - idx[None, :]).clamp(min=0)  # (Q, Q)
    return torch.tril((lag[None] * log_decay[:, None, None]).exp())


def _powers(log_decay: Tensor, q: int) -> Tensor:
    """λ^(i+1) for i < Q: (Q, r)."""
    steps = torch.arange(1, q + 1, device=log_decay.device, dtype=log_decay.dtype)  # (Q,)
    return (steps[:, None] * log_decay[None, :]).exp()


def default_block(t: int, device: torch.device) -> int:
    """Q for T tokens on `device`: CPU_BLOCK on a CPU, else ⌈√T⌉ up to MAX_GPU_BLOCK."""
    if device.type == "cpu":
        return CPU_BLOCK
    return min(math.isqrt(max(t, 1) - 1) + 1, MAX_GPU_BLOCK)


def linear_scan(u: Tensor, log_decay: Tensor, s0: Tensor | None = None, block: int | None = None) -> Tensor:
    """Parallel scan: u (B, T, r), log_decay (r,) (= log λ < 0), s0 (B, r) -> s (B, T, r).

    `block` is Q (values below 2 act as 2); None: `default_block` for u's length and device.
    """
    b, t, r = u.shape
    log_decay = log_decay.to(u.dtype)
    block = default_block(t, u.device) if block is None else block
    q = max(1, min(max(block, 2), t))  # Q ≥ 2 so that each recursion level shrinks
    n_blocks = -(-t // q)
    padded = u if n_blocks * q == t else torch.nn.functional.pad(u, (0, 0, 0, n_blocks * q - t))  # (B, nQ, r)
    blocks = padded.reshape(b, n_blocks, q, r)  # (B, n, Q, r)
    local = torch.einsum("kij,bnjk->bnik", _decay_matrix(log_decay, q), blocks)  # (B, n, Q, r)
    if n_blocks > 1 or s0 is not None:
        start = torch.zeros_like(local[:, 0, 0]) if s0 is None else s0.to(u.dtype)  # (B, r)
        incoming = start[:, None]  # (B, 1, r): state entering block 0
        if n_blocks > 1:
            # True state at the end of blocks 0..n-2: same recurrence, decay λ^Q, one item per block.
            ends = linear_scan(local[:, :-1, -1], q * log_decay, s0, block)  # (B, n-1, r)
            incoming = torch.cat([incoming, ends], dim=1)  # (B, n, r)
        local = torch.addcmul(local, incoming[:, :, None], _powers(log_decay, q)[None, None])  # (B, n, Q, r)
    return local.reshape(b, n_blocks * q, r)[:, :t]
