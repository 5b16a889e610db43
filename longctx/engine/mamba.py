"""Chunk-wise prefill for Mamba bases (design §5).

transformers' pure-PyTorch `MambaMixer` carries the convolution state into a multi-token chunk,
but its selective scan restarts from zero (`mamba_selective_scan` takes no initial state), so
every chunk after the first forgets the ones before it (checked in `tests/engine/test_mamba.py`). The
scan is linear in its state, so the missing part is exact to add back: with the chunk's step
sizes Δ and P_t = exp(A · Σ_{s≤t} Δ_s), the state is h_t = h_t⁰ + P_t ⊙ h₀, the output gains
C_t·(P_t ⊙ h₀) gated by silu(z), and the final state gains P_T ⊙ h₀ (Gu & Dao, 2023, eq. 2).
`carry_ssm_state(model)` wraps each mixer so that such a chunk runs transformers' own slow-path
pieces (convolution, zero-state selective scan) plus that term; the first chunk and
single-token decoding steps are left to transformers entirely. `longctx.adapters.wrap` applies
it to every adapted Mamba, which also keeps training off the fused kernel that bypasses adapters.

bf16/fp16: transformers' mambapy scan multiplies its float32 states by the model-dtype C and
fails ("expected m1 and m2 to have the same dtype"), so in a bf16/fp16 model every multi-token
forward takes the path above with the scan's inputs in float32; the SSM state is float32 and the
mixer's output is cast back to the model's dtype (single-token decoding is transformers' own).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.engine.hf_internals import UnfusedMambaCache, mamba_cache_keyword, mamba_mixers, mamba_slow_path


def _chunk_after_state(mixer: nn.Module, hidden_states: Tensor, cache: Any, attention_mask: Tensor | None,
                       h0: Tensor | None) -> Tensor:
    """The mixer's slow path for a multi-token chunk whose scan starts from `h0` (B, D, N; zeros if
    None). The scan runs in float32 whatever the model's dtype, and its state is kept in float32."""
    apply_mask_to_padding_states, causal_conv1d_fn, mamba_selective_scan = mamba_slow_path()
    seq_len, dtype = hidden_states.shape[1], hidden_states.dtype
    hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
    x, gate = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (B, D, T) each
    full = cache.update_conv_state(x, mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size)  # (B, D, K+T)
    x = causal_conv1d_fn(full, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                         activation=mixer.activation)[..., -seq_len:]
    x = apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)  # (B, T, D)
    dt, b, c = torch.split(mixer.x_proj(x), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size],
                           dim=-1)  # (B, T, R), (B, T, N), (B, T, N)
    dt = (mixer.dt_proj.weight @ dt.transpose(1, 2)).float()  # (B, D, T), as transformers computes it
    a = -torch.exp(mixer.A_log.float())  # (D, N)
    bias = mixer.dt_proj.bias.float()
    # (B, D, T), (B, D, N): from a zero state, through the same scan the mixer itself would use. Its
    # inputs are float32: transformers' own scan fails on bf16/fp16 ones (float32 states @ bf16 C).
    x, b, c, gate = x.transpose(1, 2).float(), b.transpose(1, 2).float(), c.transpose(1, 2).float(), gate.float()
    y, last = mamba_selective_scan(x, dt, a, b, c, D=mixer.D.float(), z=gate, delta_bias=bias,
                                   delta_softplus=True, return_last_state=True, use_mambapy=mixer.use_mambapy)
    y, last = y.float(), last.float()  # (B, D, T), (B, D, N)
    if h0 is not None:
        step = F.softplus(dt + bias[:, None])  # (B, D, T): Δ
        decay = torch.exp(step.cumsum(dim=-1)[..., None] * a[:, None])  # (B, D, T, N): P_t
        carried = decay * h0.float()[:, :, None]  # (B, D, T, N): P_t ⊙ h0
        y = y + torch.einsum("bdtn,bnt->bdt", carried, c) * F.silu(gate)
        last = last + carried[:, :, -1]
    cache.update_recurrent_state(last, mixer.layer_idx)
    return mixer.out_proj(y.transpose(1, 2).to(dtype))


def _stateful(mixer: nn.Module, original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    keyword = mamba_cache_keyword()

    def forward(hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None,
                cache_params: Any = None, **kwargs: Any) -> Tensor:
        cache = cache if cache is not None else cache_params  # either name, whichever version calls
        if cache is None and mixer.training:
            cache = UnfusedMambaCache()
        h0 = None if cache is None else cache.get_recurrent_state(mixer.layer_idx)  # (B, D, N) or None
        decoding = h0 is not None and hidden_states.shape[1] == 1
        reduced = hidden_states.dtype in (torch.bfloat16, torch.float16)
        if decoding or (h0 is None and not reduced):  # transformers' own path is right there
            return original(hidden_states, attention_mask=attention_mask, **{keyword: cache}, **kwargs)
        # A chunk after a cached state, or any bf16/fp16 forward (transformers' scan needs float32 there)
        return _chunk_after_state(mixer, hidden_states, cache if cache is not None else UnfusedMambaCache(),
                                  attention_mask, None if h0 is None else h0.clone())
    return forward


def carry_ssm_state(model: nn.Module) -> nn.Module:
    """Make every Mamba mixer of `model` start a multi-token chunk from the cached SSM state, and
    train through the unfused path that honours adapters (idempotent; the model object carries
    the change, nothing global)."""
    for module in mamba_mixers(model):
        if not hasattr(module, "_longctx_original_forward"):
            module._longctx_original_forward = module.forward
            module.forward = _stateful(module, module.forward)
    return model


def use_parallel_scan(model: nn.Module) -> nn.Module:
    """Route every Mamba mixer's full-sequence scan through transformers' `use_mambapy` path when
    mambapy is installed and the mamba-ssm kernels are not. Without it, training backpropagates
    through transformers' per-token reference loop, whose slicing makes each backward step
    materialise a full (B, D, T, N) gradient: 21x slower at 8x256 tokens on 2 cores, and
    superlinear in T (`benchmarks/p6_mamba_training.py`)."""
    if importlib.util.find_spec("mambapy") is None or importlib.util.find_spec("mamba_ssm") is not None:
        return model
    for module in mamba_mixers(model):
        module.use_mambapy = True
    return carry_ssm_state(model)  # also makes the mambapy scan work in bf16/fp16 (module docstring)
