"""`longctx_sdpa`: attention for chunked prefill whose memory does not grow with the cache.

HF's `sdpa` path builds a (C × N) mask for a chunk of C queries over N cached keys, and PyTorch's
CPU kernel expands it to floats: O(C·N) bytes per layer, growing with the input. Without padding
the chunk's pattern is simple — every past key, plus causal within the chunk — so it runs as two
fused-attention calls (past keys: no mask; the chunk itself: causal) merged exactly through
their log-sum-exp, O(C·d) memory (CPU: PyTorch's flash kernel; CUDA: its memory-efficient one).
Padded batches, gradients through the merge, and other devices fall back to an explicit mask
with `scaled_dot_product_attention`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAME = "longctx_sdpa"


def register() -> str:
    """Make `attn_implementation="longctx_sdpa"` known to transformers (idempotent, cheap)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(NAME, chunked_attention)
    # Like flash-attention: no mask at all without padding, else the 2D (B, N) padding mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    return NAME


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)  # (B, H, N, d)


def _attention_with_lse(query: Tensor, key: Tensor, value: Tensor, causal: bool,
                        scale: float | None) -> tuple[Tensor, Tensor]:
    """(output (B, H, C, d), log-sum-exp of the scores (B, H, C)) from PyTorch's fused kernels."""
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, scale=scale)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : query.shape[2]]  # the kernel may pad the LSE's query axis


def _merged_flash(query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor:
    """Bottom-right-aligned causal attention of C queries over N = P + C keys, via two calls."""
    past = key.shape[2] - query.shape[2]
    out_local, lse_local = _attention_with_lse(query, key[:, :, past:], value[:, :, past:], True, scale)
    if past == 0:
        return out_local  # (B, H, C, d)
    out_past, lse_past = _attention_with_lse(query, key[:, :, :past], value[:, :, :past], False, scale)
    top = torch.maximum(lse_past, lse_local)  # (B, H, C)
    w_past, w_local = (lse_past - top).exp()[..., None], (lse_local - top).exp()[..., None]
    merged = (out_past * w_past + out_local * w_local) / (w_past + w_local)  # (B, H, C, d) float32
    return merged.to(query.dtype)


def _masked_sdpa(query: Tensor, key: Tensor, value: Tensor, padding: Tensor | None,
                 scale: float | None, dropout: float) -> Tensor:
    """Reference path: explicit (B, 1, C, N) boolean mask, bottom-right causal plus padding."""
    c, n = query.shape[2], key.shape[2]
    mask = torch.ones(c, n, dtype=torch.bool, device=query.device).tril(n - c)[None, None]
    if padding is not None:
        mask = mask & padding[:, None, None, -n:].to(torch.bool)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)


def chunked_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """HF attention interface: query (B, H, C, d), key/value (B, H_kv, N, d) -> (B, C, H, d)."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    needs_merge_grad = torch.is_grad_enabled() and key.shape[2] > query.shape[2]
    fast = (attention_mask is None and query.device.type in ("cpu", "cuda") and dropout == 0.0
            and not needs_merge_grad and query.dtype in (torch.float32, torch.bfloat16, torch.float16))
    if fast:
        out = _merged_flash(query, key, value, scaling)
    else:
        out = _masked_sdpa(query, key, value, attention_mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, C, H, d)
