"""Diagonal linear recurrence along the token axis, computed in parallel.

    s_t = λ ⊙ s_{t-1} + u_t,   s_{-1} = s0 (zeros if None),   λ = exp(log_decay) ∈ (0, 1)^r

Used by `ssmlora-scan`. `linear_scan` splits the T tokens into blocks of Q: inside a block the
recurrence is a masked decay matrix L[t, j] = λ^(t-j) (j ≤ t) applied by einsum; the block-end
states obey the same recurrence with decay λ^Q over T/Q items, so they come from a recursive call;
each block then adds its carried-in state decayed by λ^(i+1). No Python loop over tokens: depth
is log_Q(T). `linear_scan_ref` is the plain sequential loop the tests compare against.
"""
from __future__ import annotations

import torch
from torch import Tensor


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
    """L[k, t, j] = λ_k^(t-j) for j ≤ t, else 0: (r, Q, Q). Masked before exp (no inf·0)."""
    idx = torch.arange(q, device=log_decay.device)
    lag = (idx[:, None] - idx[None, :]).to(log_decay.dtype)  # (Q, Q)
    causal = lag >= 0
    exponent = torch.where(causal, lag, torch.zeros_like(lag))[None] * log_decay[:, None, None]  # (r, Q, Q)
    return torch.where(causal[None], exponent.exp(), torch.zeros_like(exponent))


def _powers(log_decay: Tensor, q: int) -> Tensor:
    """λ^(i+1) for i < Q: (Q, r)."""
    steps = torch.arange(1, q + 1, device=log_decay.device, dtype=log_decay.dtype)  # (Q,)
    return (steps[:, None] * log_decay[None, :]).exp()


def linear_scan(u: Tensor, log_decay: Tensor, s0: Tensor | None = None, block: int = 32) -> Tensor:
    """Parallel scan: u (B, T, r), log_decay (r,) (= log λ < 0), s0 (B, r) -> s (B, T, r).

    `block` is Q (values below 2 act as 2); 32 was fastest at 16K tokens, r = 8 on a 2-core CPU.
    """
    b, t, r = u.shape
    log_decay = log_decay.to(u.dtype)
    q = max(1, min(max(block, 2), t))  # Q ≥ 2 so that each recursion level shrinks
    n_blocks = -(-t // q)
    padded = torch.nn.functional.pad(u, (0, 0, 0, n_blocks * q - t))  # (B, nQ, r)
    blocks = padded.reshape(b, n_blocks, q, r)  # (B, n, Q, r)
    local = torch.einsum("kij,bnjk->bnik", _decay_matrix(log_decay, q), blocks)  # (B, n, Q, r)
    if n_blocks > 1 or s0 is not None:
        start = torch.zeros_like(local[:, 0, 0]) if s0 is None else s0.to(u.dtype)  # (B, r)
        incoming = start[:, None]  # (B, 1, r): state entering block 0
        if n_blocks > 1:
            # True state at the end of blocks 0..n-2: same recurrence, decay λ^Q, one item per block.
            ends = linear_scan(local[:, :-1, -1], q * log_decay, s0, block)  # (B, n-1, r)
            incoming = torch.cat([incoming, ends], dim=1)  # (B, n, r)
        local = local + incoming[:, :, None] * _powers(log_decay, q)[None, None]  # (B, n, Q, r)
    return local.reshape(b, n_blocks * q, r)[:, :t]
