"""`longctx_sdpa`: attention for chunked prefill whose memory does not grow with the cache.

HF's `sdpa` path builds a (C × N) mask for a chunk of C queries over N cached keys, and PyTorch's
CPU kernel expands it to floats: O(C·N) bytes per layer, growing with the input. Without padding
the chunk's pattern is simple — every past key, plus causal within the chunk — so it runs as two
fused-attention calls (past keys: no mask; the chunk itself: causal) merged exactly through their
log-sum-exp in float32, O(C·d) memory, returned in the model's dtype. The kernel is the fastest
exact one present (`longctx.engine.kernels`: cuDNN, then PyTorch's flash, on a GPU in bf16/fp16; CPU:
PyTorch's flash kernel); with flash-attn installed a chunk over its cache is one call, since its
causal mask is bottom-right aligned. Grouped-query attention never materialises repeated K/V of
the cache: on a GPU a kernel observed to group query heads exactly takes the K/V as they are;
otherwise (and on CPU, where it is as fast or faster) the query heads that share a KV head are
folded into one query block for the past keys and only the chunk's own K/V are repeated.
Gradients (chunked training) go through the same two calls and a fused kernel's blockwise
backward (`kernels.backward_kernel`: probed exact, CPU and GPU), the cached keys being constants;
padded batches, or a device with no exact backward, fall back to an explicit mask.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.engine.family import model_family
from longctx.engine.hf_internals import attn_implementation, register_attention
from longctx.engine.kernels import (
    HALF,
    ROWS,
    attention_backward,
    attention_with_lse,
    backward_kernel,
    choose_kernel,
    flash_attn_available,
    fold_groups,
    groups_natively,
    one_call_attention,
    one_call_capable,
    unfold_groups,
)

NAME = "longctx_sdpa"
# Model keyword (inference): the query rows of the chunk's end whose last-layer output is read
# (kept logits); the last layer attends only those. Set by `runner.chunked_forward`.
LAST_LAYER_ROWS = "longctx_last_layer_rows"
BACKWARD_KEYS = 4096  # past keys per backward call: bounds the kernel's transient dk/dv (unused) to this many


def register() -> str:
    """Make `attn_implementation="longctx_sdpa"` known to transformers (idempotent, cheap). Like
    flash-attention it takes no mask at all without padding, else the 2D (B, N) padding mask."""
    register_attention(NAME, chunked_attention)
    return NAME


def _row_padding(query: Tensor, multiple: int | None, least: int = 1) -> int:
    """Rows to add to a chunk of queries so its length is a multiple of `multiple` (CUDA: `ROWS`);
    none for a chunk of fewer than `least` rows."""
    multiple = multiple if multiple is not None else (ROWS if query.device.type == "cuda" else 1)
    return (-query.shape[2]) % multiple if query.shape[2] >= least else 0


def _unmasked(query: Tensor, key: Tensor, value: Tensor, scale: float | None, kernel: str | None,
              multiple: int | None = None) -> tuple[Tensor, Tensor]:
    """Unmasked attention with its log-sum-exp. The query rows are zero-padded to a multiple of
    `multiple` (CUDA: `ROWS`), so that the ragged last chunk of a request keeps a shape the fastest
    kernel has seen (cuDNN plans are per shape, see `longctx.engine.kernels`); padded rows are dropped."""
    rows, pad = query.shape[2], _row_padding(query, multiple)
    if pad:
        query = F.pad(query, (0, 0, 0, pad))  # (B, H, rows + pad, d)
    out, lse = attention_with_lse(query, key, value, False, scale, kernel)
    return out[:, :, :rows], lse[:, :, :rows]  # (B, H, rows, d), (B, H, rows)


def _causal(query: Tensor, key: Tensor, value: Tensor, scale: float | None, kernel: str | None,
            multiple: int | None = None) -> tuple[Tensor, Tensor]:
    """Causal attention of a chunk over its own C keys, with its log-sum-exp. A ragged chunk of at
    least `ROWS` tokens (the last chunk of a prefill) is zero-padded at the end — queries, keys and
    values alike — to a multiple of `multiple` (CUDA: `ROWS`), so it too runs on cuDNN rather than
    the next kernel: under the causal mask query i < C sees only keys <= i, so the padding leaves
    the first C rows exactly as they were. Shorter ones (a decoding step) are not worth the copies.
    query (B, H, C, d), key/value (B, H_kv, C, d) -> (B, H, C, d), (B, H, C)."""
    rows, pad = query.shape[2], _row_padding(query, multiple, least=ROWS)
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))  # (B, H|H_kv, C + pad, d)
    out, lse = attention_with_lse(query, key, value, True, scale, kernel)
    return out[:, :, :rows], lse[:, :, :rows]  # (B, H, C, d), (B, H, C)


def _padding_reaches_faster_kernel(query: Tensor, key: Tensor) -> bool:
    """Would the two-call merge, by padding a ragged chunk (`_unmasked`, `_causal`), run on a faster
    kernel than one call on the exact shapes? The last chunk of a log-likelihood request (n - 1
    tokens: C >= ROWS, not a multiple of it, over whole chunks of cache) would otherwise go in one
    call to the next kernel that aligns causal bottom-right (PyTorch's flash on the H100) instead of
    cuDNN in two, which costs far more than the padding (profile: docs/history/2026-11-26-gpu-looks.md)."""
    if _row_padding(query, None, least=ROWS) == 0 or (key.shape[2] - query.shape[2]) % ROWS:
        return False  # nothing to pad (CPU, whole chunks, decoding), or a past cuDNN would not take
    fastest = choose_kernel(query.device, query.dtype, query.shape[-1])
    return not one_call_capable(fastest, query.device, query.dtype, query.shape[-1], query.shape[1] != key.shape[1])


def merged_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None,
                     kernel: str | None = None, with_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Bottom-right-aligned causal attention of C queries over N = P + C keys. One call where the
    fastest kernel for the shapes does bottom-right causal with grouped heads exactly (probed,
    `kernels.one_call_attention`); otherwise two fused calls merged by their log-sum-exp: the P
    past keys unmasked, the chunk's own C keys causal (grouped-query K/V as `kernels.attention_with_lse`
    takes them: never the cache repeated). The merge is one pass in the output dtype (computed in
    float32 inside the kernel; the past's weight rounded to that dtype first: error within ~2 units
    in the last place of bf16, measured by the CPU tests against float64).
    query (B, H, C, d), key/value (B, H_kv, N, d) -> (B, H, C, d) in the query's dtype."""
    if kernel is None and not with_lse and not _padding_reaches_faster_kernel(query, key):
        out = one_call_attention(query, key, value, scale)
        if out is not None:
            return out  # (B, H, C, d)
    c = query.shape[2]
    past = key.shape[2] - c
    out_local, lse_local = _causal(query, key[:, :, past:], value[:, :, past:], scale, kernel)  # (B, H, C, [d])
    if past == 0:
        return (out_local, lse_local) if with_lse else out_local  # (B, H, C, d)[, (B, H, C)]
    out_past, lse_past = _unmasked(query, key[:, :, :past], value[:, :, :past], scale, kernel)  # (B, H, C, [d])
    # Share of the past keys' softmax mass: e^lse_p / (e^lse_p + e^lse_l) = sigmoid(lse_p - lse_l).
    w_past = torch.sigmoid(lse_past - lse_local)[..., None].to(out_local.dtype)  # (B, H, C, 1)
    merged = torch.lerp(out_local, out_past, w_past, out=torch.empty_like(out_local))  # (B, H, C, d), local's layout
    if with_lse:
        return merged, torch.logaddexp(lse_past, lse_local)  # (B, H, C, d), (B, H, C) float32
    return merged


class _MergedAttention(torch.autograd.Function):
    """`merged_attention` with a backward (chunked training): the forward keeps only the merged
    output and log-sum-exp (O(C·d) per layer, nothing of size C × N), and the backward runs a fused
    kernel's blockwise backward once per block — past keys unmasked, the chunk's own keys causal —
    from those (`kernels.attention_backward`: CPU's flash kernel; on a GPU PyTorch's flash or
    efficient kernel, whichever is probed exact). The past keys and values are constants: chunked
    training detaches the cache at every chunk boundary, so only the chunk's own keys and values
    (and the queries) get gradients."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, local_k: Tensor, local_v: Tensor,
                scale: float | None, backward_name: str) -> Tensor:
        """key/value (B, H_kv, N, d): the cache, detached (views, no copy); local_k/local_v: its last
        C positions as the autograd graph knows them (what the gradient flows to)."""
        out, lse = merged_attention(query, key, value, scale, with_lse=True)
        past = key.shape[2] - query.shape[2]
        ctx.save_for_backward(query, key[:, :, :past], value[:, :, :past], local_k, local_v, out, lse)
        ctx.scale, ctx.backward_name = scale, backward_name
        return out  # (B, H, C, d)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, Tensor, Tensor, None, None]:
        query, past_k, past_v, local_k, local_v, out, lse = ctx.saved_tensors
        grad_out, name = grad_out.contiguous(), ctx.backward_name
        dq, dk, dv = attention_backward(name, grad_out, query, local_k, local_v, out, lse, True, ctx.scale)
        for start in range(0, past_k.shape[2], BACKWARD_KEYS):  # the kernels also return dk/dv of the past
            block = slice(start, start + BACKWARD_KEYS)  # keys, discarded: keep them one block's size
            dq += attention_backward(name, grad_out, query, past_k[:, :, block], past_v[:, :, block], out, lse,
                                     False, ctx.scale)[0]
        return dq, None, None, dk, dv, None, None  # (B, H, C, d), (B, H_kv, C, d) x2


def _runs_flash_attn(device: torch.device, dtype: torch.dtype) -> bool:
    """Does the fused path go to the flash-attn package (installed, CUDA, bf16/fp16)?"""
    return device.type == "cuda" and dtype in HALF and flash_attn_available()


def _flash_attn_package(query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor:
    """flash-attn's kernel: bottom-right causal and native GQA, so one call.
    (B, H, C, d), (B, H_kv, N, d) -> (B, C, H, d)."""
    from flash_attn import flash_attn_func

    return flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           softmax_scale=scale, causal=True)


def _masked_sdpa(query: Tensor, key: Tensor, value: Tensor, padding: Tensor | None,
                 scale: float | None, dropout: float) -> Tensor:
    """Reference path, differentiable (chunked training): one SDPA call with an explicit boolean
    mask, bottom-right causal plus padding, and the cache's K/V never repeated for grouped-query
    heads — neither in memory nor among the tensors autograd saves for the backward. CPU: SDPA's
    own GQA with one (C, N) mask (measured: 4 layers' backward at 4K keys +31 MiB, vs +86 MiB with
    the query heads folded onto a g-times repeated mask). CUDA, whose masked kernels have no GQA:
    the query heads sharing a KV head are folded into one block over the repeated mask.
    query (B, H, C, d), key/value (B, H_kv, N, d), padding (B, N') -> (B, H, C, d)."""
    heads, kv_heads, c, n = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
    mask = torch.ones(c, n, dtype=torch.bool, device=query.device).tril(n - c)[None, None]  # (1, 1, C, N)
    if padding is not None:
        mask = mask & padding[:, None, None, -n:].to(torch.bool)  # (B, 1, C, N)
    if query.device.type == "cpu" or heads == kv_heads:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale,
                                              enable_gqa=heads != kv_heads)
    folded_mask = mask.repeat(1, 1, heads // kv_heads, 1)  # (B|1, 1, g·C, N): row j·C + c is query c of head j
    folded = F.scaled_dot_product_attention(fold_groups(query, kv_heads), key, value, attn_mask=folded_mask,
                                            dropout_p=dropout, scale=scale)  # (B, H_kv, g·C, d)
    return unfold_groups(folded, heads)


_QKV = tuple(f"self_attn.{p}_proj" for p in "qkv")  # a layer's projections that see every row


def last_layer_rows_skippable(model: nn.Module) -> bool:
    """May the last layer's attention skip the query rows whose output nobody reads
    (`LAST_LAYER_ROWS`)? Where the model is a Llama-family one running `longctx_sdpa` and its last
    layer holds, past the q/k/v projections (which still see every row: the cache and any adapter
    state there stay exact), only the base's own modules: an adapter further on (o_proj, MLP),
    whose state would run through the unread rows, turns it off."""
    config = getattr(model, "config", None)
    if attn_implementation(config) != NAME or not hasattr(config, "num_hidden_layers"):
        return False
    last = ["layers", str(config.num_hidden_layers - 1)]
    layer = next((m for n, m in model.named_modules() if n.split(".")[-2:] == last), None)
    if layer is None:
        return False
    return all(type(m).__module__.split(".")[0] in ("torch", "transformers")
               for name, m in layer.named_modules() if not name.startswith(_QKV))


def _rows_read(module: nn.Module, query: Tensor, kwargs: dict[str, Any]) -> int | None:
    """How many of the chunk's last query rows are read after this layer, where fewer than all."""
    rows = kwargs.get(LAST_LAYER_ROWS)
    last = getattr(module, "layer_idx", None) == module.config.num_hidden_layers - 1
    return rows if rows is not None and last and rows < query.shape[2] else None


def _read_rows_only(query: Tensor, key: Tensor, value: Tensor, scale: float | None, rows: int) -> Tensor:
    """The last `rows` query rows attended exactly (bottom-right causal over all N keys), the
    others left zero: their output reaches no logit. query (B, H, C, d) -> (B, C, H, d)."""
    b, heads, c, d = query.shape
    out = query.new_zeros(b, c, heads, d)  # (B, C, H, d)
    if rows:
        out[:, c - rows:] = _fast_attention(query[:, :, c - rows:], key, value, scale)  # (B, rows, H, d)
    return out


def _fast_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor:
    """Inference over the cache on the fused path: (B, H, C, d), (B, H_kv, N, d) -> (B, C, H, d)."""
    if _runs_flash_attn(query.device, query.dtype):
        return _flash_attn_package(query, key, value, scale)
    return merged_attention(query, key, value, scale).transpose(1, 2)


def chunked_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """HF attention interface: query (B, H, C, d), key/value (B, H_kv, N, d) -> (B, C, H, d).
    kwargs[`LAST_LAYER_ROWS`] (inference only): in the model's last layer, only that many of the
    chunk's last rows are attended (`_read_rows_only`)."""
    dropout = dropout if module.training else 0.0
    needs_merge_grad = torch.is_grad_enabled() and key.shape[2] > query.shape[2]
    fast = (attention_mask is None and query.device.type in ("cpu", "cuda") and dropout == 0.0
            and query.dtype in (torch.float32, *HALF))
    rows = _rows_read(module, query, kwargs) if fast and not torch.is_grad_enabled() else None
    if rows is not None:
        return _read_rows_only(query, key, value, scaling, rows), None
    if fast and _runs_flash_attn(query.device, query.dtype):
        return _flash_attn_package(query, key, value, scaling), None
    backward = backward_kernel(query.device, query.dtype, query.shape[-1]) if fast and needs_merge_grad else None
    if backward is not None:
        past = key.shape[2] - query.shape[2]
        out = _MergedAttention.apply(query, key.detach(), value.detach(), key[:, :, past:], value[:, :, past:],
                                     scaling, backward)
    elif fast and not needs_merge_grad:
        out = merged_attention(query, key, value, scaling)
    else:
        out = _masked_sdpa(query, key, value, attention_mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, C, H, d)


def attention_record(model: nn.Module) -> dict[str, Any]:
    """What attention `model` runs on its device and in its dtype, for results records (timings
    depend on it): the implementation, and for `longctx_sdpa` the fused kernel of a chunk over its
    cache, whether that is one call, whether grouped-query K/V reach the kernel as they are, the
    kernel of chunked training's backward (None: the explicit-mask path), and whether the last
    layer attends only the rows whose logits are kept (`last_layer_rows_skippable`); a model without
    attention (Mamba) records None. Probes run once."""
    config = model.config
    if model_family(model) == "mamba":
        return {"implementation": None}
    implementation = attn_implementation(config)
    if implementation != NAME:
        return {"implementation": implementation}
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    grouped = config.num_key_value_heads != config.num_attention_heads
    if _runs_flash_attn(device, dtype):
        return {"implementation": NAME, "kernel": "flash-attn", "one_call": True, "grouped_kv_as_is": grouped,
                "backward": "flash-attn", "last_layer_kept_rows_only": last_layer_rows_skippable(model)}
    kernel = choose_kernel(device, dtype, head_dim)
    return {"implementation": NAME, "kernel": kernel,
            "one_call": one_call_capable(kernel, device, dtype, head_dim, grouped),
            "grouped_kv_as_is": grouped and groups_natively(kernel, device, dtype, head_dim),
            "backward": backward_kernel(device, dtype, head_dim),
            "last_layer_kept_rows_only": last_layer_rows_skippable(model)}
