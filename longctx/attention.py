"""`longctx_sdpa`: attention for chunked prefill whose memory does not grow with the cache.

HF's `sdpa` path builds a (C × N) mask for a chunk of C queries over N cached keys, and PyTorch's
CPU kernel expands it to floats: O(C·N) bytes per layer, growing with the input. Without padding
the chunk's pattern is simple — every past key, plus causal within the chunk — so it runs as two
fused-attention calls (past keys: no mask; the chunk itself: causal) merged exactly through their
log-sum-exp in float32, O(C·d) memory, returned in the model's dtype. The kernel is the fastest
exact one present (`longctx.kernels`: cuDNN, then PyTorch's flash, on a GPU in bf16/fp16; CPU:
PyTorch's flash kernel); with flash-attn installed a chunk over its cache is one call, since its
causal mask is bottom-right aligned. Grouped-query attention never materialises repeated K/V of
the cache: the query heads that share a KV head are folded into one query block for the past
keys. Padded batches and gradients through the merge fall back to an explicit mask.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.kernels import HALF, ROWS, attention_with_lse, flash_attn_available

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


def _fold_groups(query: Tensor, kv_heads: int) -> Tensor:
    """(B, H, C, d) -> (B, H_kv, g·C, d): the g query heads sharing one KV head become one longer
    query block, so unmasked attention over their shared keys needs no repeated K/V."""
    b, h, c, d = query.shape
    return query.reshape(b, kv_heads, (h // kv_heads) * c, d)


def _unfold_groups(x: Tensor, heads: int) -> Tensor:
    """(B, H_kv, g·C, ...) -> (B, H, C, ...): the inverse of `_fold_groups`."""
    b, kv_heads, gc = x.shape[:3]
    return x.reshape(b, heads, gc * kv_heads // heads, *x.shape[3:])


def _unmasked(query: Tensor, key: Tensor, value: Tensor, scale: float | None, kernel: str | None,
              multiple: int | None = None) -> tuple[Tensor, Tensor]:
    """Unmasked attention with its log-sum-exp. The query rows are zero-padded to a multiple of
    `multiple` (CUDA: `ROWS`), so that the ragged last chunk of a request keeps a shape the fastest
    kernel has seen (cuDNN plans are per shape, see `longctx.kernels`); padded rows are dropped."""
    rows = query.shape[2]
    multiple = multiple if multiple is not None else (ROWS if query.device.type == "cuda" else 1)
    pad = (-rows) % multiple
    if pad:
        query = F.pad(query, (0, 0, 0, pad))  # (B, H, rows + pad, d)
    out, lse = attention_with_lse(query, key, value, False, scale, kernel)
    return out[:, :, :rows], lse[:, :, :rows]  # (B, H, rows, d), (B, H, rows)


def merged_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None,
                     kernel: str | None = None) -> Tensor:
    """Bottom-right-aligned causal attention of C queries over N = P + C keys, as two fused calls
    merged by their log-sum-exp: the P past keys unmasked (query heads folded onto their KV head),
    the chunk's own C keys causal (the chunk's K/V repeated: O(C) memory).
    query (B, H, C, d), key/value (B, H_kv, N, d) -> (B, H, C, d) in the query's dtype."""
    heads, kv_heads, c = query.shape[1], key.shape[1], query.shape[2]
    past, groups = key.shape[2] - c, heads // kv_heads
    local_k, local_v = _repeat_kv(key[:, :, past:], groups), _repeat_kv(value[:, :, past:], groups)
    out_local, lse_local = attention_with_lse(query, local_k, local_v, True, scale, kernel)
    if past == 0:
        return out_local  # (B, H, C, d)
    folded_out, folded_lse = _unmasked(_fold_groups(query, kv_heads), key[:, :, :past], value[:, :, :past],
                                       scale, kernel)
    out_past, lse_past = _unfold_groups(folded_out, heads), _unfold_groups(folded_lse, heads)  # (B, H, C, [d])
    # Share of the past keys' softmax mass: e^lse_p / (e^lse_p + e^lse_l) = sigmoid(lse_p - lse_l).
    w_past = torch.sigmoid(lse_past - lse_local)[..., None]  # (B, H, C, 1) float32
    merged = out_local.float().lerp_(out_past.float(), w_past)  # (B, H, C, d): one fused pass
    return merged.to(query.dtype)


def _flash_attn_package(query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor:
    """flash-attn's kernel: bottom-right causal and native GQA, so one call.
    (B, H, C, d), (B, H_kv, N, d) -> (B, C, H, d)."""
    from flash_attn import flash_attn_func

    return flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           softmax_scale=scale, causal=True)


def _masked_sdpa(query: Tensor, key: Tensor, value: Tensor, padding: Tensor | None,
                 scale: float | None, dropout: float) -> Tensor:
    """Reference path, differentiable (chunked training): one SDPA call with an explicit boolean
    mask, bottom-right causal plus padding. The query heads sharing a KV head are folded into one
    block (as for the past keys in `merged_attention`), so the cache's K/V are never repeated —
    neither in memory nor among the tensors autograd saves for the backward.
    query (B, H, C, d), key/value (B, H_kv, N, d), padding (B, N') -> (B, H, C, d)."""
    heads, kv_heads, c, n = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
    causal = torch.ones(c, n, dtype=torch.bool, device=query.device).tril(n - c)  # (C, N)
    mask = causal.repeat(heads // kv_heads, 1)[None, None]  # (1, 1, g·C, N): row j·C + c is query c of head j
    if padding is not None:
        mask = mask & padding[:, None, None, -n:].to(torch.bool)  # (B, 1, g·C, N)
    folded = F.scaled_dot_product_attention(_fold_groups(query, kv_heads), key, value, attn_mask=mask,
                                            dropout_p=dropout, scale=scale)  # (B, H_kv, g·C, d)
    return _unfold_groups(folded, heads)


def chunked_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """HF attention interface: query (B, H, C, d), key/value (B, H_kv, N, d) -> (B, C, H, d)."""
    dropout = dropout if module.training else 0.0
    needs_merge_grad = torch.is_grad_enabled() and key.shape[2] > query.shape[2]
    fast = (attention_mask is None and query.device.type in ("cpu", "cuda") and dropout == 0.0
            and not needs_merge_grad and query.dtype in (torch.float32, *HALF))
    if fast and query.device.type == "cuda" and query.dtype in HALF and flash_attn_available():
        return _flash_attn_package(query, key, value, scaling), None
    if fast:
        out = merged_attention(query, key, value, scaling)
    else:
        out = _masked_sdpa(query, key, value, attention_mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, C, H, d)
