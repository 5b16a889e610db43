"""Fused attention kernels that also return the log-sum-exp of the scores, and the choice among them.

This is longctx's one reach into PyTorch's private attention ops (`torch.ops.aten._scaled_dot_
product_*`, written for torch 2.6–2.13): the public `scaled_dot_product_attention` does not return
the log-sum-exp that merging two partial attentions needs. Kernels, fastest first:

- `cudnn`: cuDNN's fused attention (CUDA, bf16/fp16; the fastest on Hopper),
- `flash`: PyTorch's FlashAttention-2 (CUDA, bf16/fp16),
- `efficient`: the memory-efficient kernel (CUDA, any float dtype),
- `cpu_flash`: PyTorch's CPU flash kernel.

Which CUDA kernel runs is decided once per (device, dtype, head size): each candidate is run on a
small random problem and kept only if its output and log-sum-exp match a float64 reference, so a
kernel that is missing, refuses the shape, or returns the log-sum-exp in another convention is
never used. Every kernel takes query (B, H, C, d) and key/value (B, H, N, d); `attention_with_lse`
also takes grouped-query K/V (B, H_kv, N, d): as they are where the kernel is observed to group
query heads exactly (`grouped_capable`), else with the query heads folded onto their KV head
(unmasked) or the K/V repeated (causal: only ever a chunk's own keys).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

Kernel = Callable[[Tensor, Tensor, Tensor, bool, "float | None"], "tuple[Tensor, Tensor]"]
CUDA_ORDER = ("cudnn", "flash", "efficient")
HALF = (torch.bfloat16, torch.float16)
ROWS = 128  # cuDNN runs query and key lengths that are multiples of this (shapes that recur)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, N, d) -> (B, H_kv·g, N, d): each KV head copied for the g query heads it serves."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)  # (B, H, N, d)


def fold_groups(query: Tensor, kv_heads: int) -> Tensor:
    """(B, H, C, d) -> (B, H_kv, g·C, d): the g query heads sharing one KV head become one longer
    query block, so unmasked attention over their shared keys needs no repeated K/V (a copy of
    the query unless it is laid out head-major)."""
    b, h, c, d = query.shape
    return query.reshape(b, kv_heads, (h // kv_heads) * c, d)


def unfold_groups(x: Tensor, heads: int) -> Tensor:
    """(B, H_kv, g·C, ...) -> (B, H, C, ...): the inverse of `fold_groups`."""
    b, kv_heads, gc = x.shape[:3]
    return x.reshape(b, heads, gc * kv_heads // heads, *x.shape[3:])


def _normalise_lse(lse: Tensor, query: Tensor) -> Tensor:
    """Kernels pad the query axis or add a trailing 1: return (B, H, C) float32."""
    b, h, c = query.shape[:3]
    if lse.dim() == 4:
        lse = lse[..., 0]
    return lse[..., :c].reshape(b, h, c).float()


def _cpu_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, _normalise_lse(lse, q)


def _cudnn(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, _normalise_lse(lse, q)


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, _normalise_lse(lse, q)


def _efficient(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                      scale=scale)[:2]
    return out, _normalise_lse(lse, q)


KERNELS: dict[str, Kernel] = {"cudnn": _cudnn, "flash": _flash, "efficient": _efficient, "cpu_flash": _cpu_flash}


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None,
                        bottom_right: bool = False) -> tuple[Tensor, Tensor]:
    """Plain float64 attention: (out, lse (B, H, C)). For checks only. Causal is top-left (as the
    kernels' documented convention) unless `bottom_right` (query i sees keys up to N - C + i);
    K/V with fewer heads (B, H_kv, N, d) serve groups of H / H_kv consecutive query heads."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)  # (B, H, N, d)
    scores = (q.double() @ k.transpose(-1, -2)) * scale  # (B, H, C, N)
    if causal:
        c, n = scores.shape[-2:]
        allowed = torch.ones(c, n, dtype=torch.bool, device=q.device).tril(n - c if bottom_right else 0)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, C)
    return (scores - lse[..., None]).exp() @ v, lse


def _probe_inputs(device: torch.device, dtype: torch.dtype, head_dim: int, q_len: int,
                  k_len: int, heads: int = 2, kv_heads: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Random q/k/v laid out as the model hands them over: the query a transposed view, keys and
    values a prefix of a larger cache buffer."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, q_len, heads, head_dim, device=device, generator=gen).to(dtype).transpose(1, 2)  # (1, H, C, d)
    buf = torch.randn(2, 1, kv_heads, k_len + 16, head_dim, device=device, generator=gen).to(dtype)
    return q, buf[0, :, :, :k_len], buf[1, :, :, :k_len]  # (1, H_kv, N, d) views


def _matches(name: str, dtype: torch.dtype, q: Tensor, k: Tensor, v: Tensor, causal: bool,
             bottom_right: bool = False) -> bool:
    """Kernel `name`'s output and log-sum-exp equal the float64 reference's (False if it refuses)."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        out, lse = KERNELS[name](q, k, v, causal, None)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    ref_out, ref_lse = reference_attention(q, k, v, causal, None, bottom_right)
    return (out.shape == ref_out.shape and torch.allclose(out.double(), ref_out, atol=tol, rtol=0)
            and torch.allclose(lse.double(), ref_lse, atol=tol, rtol=0))


def _agrees(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Does kernel `name` run here and match the float64 reference, causal (C = N) and unmasked
    (C != N), on strided inputs like the model's?"""
    return all(_matches(name, dtype, *_probe_inputs(device, dtype, head_dim, q_len, k_len), causal)
               for causal, q_len, k_len in ((True, 80, 80), (False, 48, 112)))


@functools.lru_cache(maxsize=None)
def one_call_capable(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, grouped: bool) -> bool:
    """Does kernel `name`, asked for causal attention of C queries over N > C keys, align the mask
    bottom-right (query i sees keys up to N - C + i, as flash-attn does) exactly — and, if
    `grouped`, take fewer KV heads than query heads without their being repeated? Then a chunk over
    its cache is one call. Probed once against the float64 reference; the CUDA kernels' documented
    convention is top-left, so only a kernel observed to do this is trusted with it."""
    heads, kv_heads = (4, 2) if grouped else (2, 2)
    return _agrees(name, device, dtype, head_dim) and _matches(
        name, dtype, *_probe_inputs(device, dtype, head_dim, 48, 112, heads, kv_heads), True, bottom_right=True)


@functools.lru_cache(maxsize=None)
def grouped_capable(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Does kernel `name` take K/V with fewer heads than the query — query head h reading KV head
    h // g, as transformers' `repeat_kv` lays them out — and match the float64 reference, causal
    (C = N) and unmasked (C != N)? Then grouped-query attention needs neither repeated K/V nor
    folded queries (PyTorch's CPU flash kernel does; the CUDA ones are probed). Checked once."""
    return all(_matches(name, dtype, *_probe_inputs(device, dtype, head_dim, q_len, k_len, 4, 2), causal)
               for causal, q_len, k_len in ((True, 80, 80), (False, 48, 112)))


def groups_natively(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Hand grouped-query K/V to kernel `name` as they are? On a GPU wherever that is exact
    (`grouped_capable`): no repeated K/V or folded queries to write. On CPU the folded layout is
    as fast or faster (measured on this project's 2-core machine, 32 query / 8 KV heads, 8K tokens
    in chunks of 256–1024: folded 0.88–1.01× the native time), so CPU folds."""
    return device.type != "cpu" and grouped_capable(name, device, dtype, head_dim)


def _run_grouped(name: str, query: Tensor, key: Tensor, value: Tensor, causal: bool,
                 scale: float | None) -> tuple[Tensor, Tensor]:
    """Kernel `name` on query (B, H, C, d) over key/value (B, H_kv, N, d), H_kv dividing H."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads == kv_heads or groups_natively(name, query.device, query.dtype, query.shape[-1]):
        return KERNELS[name](query, key, value, causal, scale)
    if causal:  # top-left causal rows cannot be folded: repeat the K/V
        groups = heads // kv_heads
        return KERNELS[name](query, repeat_kv(key, groups), repeat_kv(value, groups), True, scale)
    out, lse = KERNELS[name](fold_groups(query, kv_heads), key, value, False, scale)  # (B, H_kv, g·C, [d])
    return unfold_groups(out, heads), unfold_groups(lse, heads)  # (B, H, C, d), (B, H, C)


def _cpu_flash_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)


def _flash_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch's FlashAttention-2 backward, dense inputs (no cumulative lengths: None), no dropout
    (the random-state tensors are not read)."""
    rng = torch.zeros(2, dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, rng, rng[:0], scale=scale)


def _efficient_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """The memory-efficient kernel's backward: its log-sum-exp rows are padded to a multiple of 32."""
    lse = torch.nn.functional.pad(lse, (0, (-q.shape[2]) % 32))  # (B, H, ceil32(C))
    rng = torch.zeros((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out, q, k, v, None, out, lse, rng, rng, 0.0, [True, True, True, False], causal, scale=scale)[:3]


BACKWARDS: dict[str, Callable[..., "tuple[Tensor, Tensor, Tensor]"]] = {
    "cpu_flash": _cpu_flash_backward, "flash": _flash_backward, "efficient": _efficient_backward}


def attention_backward(name: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of kernel `name`'s backward given the output and log-sum-exp (B, H, C) of the
    whole attention this block of keys is part of: with those, each block yields its exact share
    of dq and its own dk, dv (FlashAttention's blockwise backward, Dao 2023, Alg. 2). k/v may have
    fewer heads (B, H_kv, N, d), as in `_run_grouped`: dk, dv are per KV head, summed over the
    query heads it serves. Causal is top-left (used here only with C = N)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    lse, backward = lse.float().contiguous(), BACKWARDS[name]
    if heads == kv_heads or groups_natively(name, q.device, q.dtype, q.shape[-1]):
        return backward(grad_out, q, k, v, out, lse, causal, scale)
    groups = heads // kv_heads
    if causal:
        dq, dk, dv = backward(grad_out, q, repeat_kv(k, groups), repeat_kv(v, groups), out, lse, True, scale)
        b, _, n, d = dk.shape
        return dq, dk.reshape(b, kv_heads, groups, n, d).sum(2), dv.reshape(b, kv_heads, groups, n, d).sum(2)
    fold = lambda x: fold_groups(x, kv_heads)  # noqa: E731  (B, H, C, d) -> (B, H_kv, g·C, d)
    dq, dk, dv = backward(fold(grad_out), fold(q), k, v, fold(out), fold(lse[..., None])[..., 0].contiguous(),
                          False, scale)
    return unfold_groups(dq, heads), dk, dv  # (B, H, C, d), (B, H_kv, N, d) x2


@functools.lru_cache(maxsize=None)
def backward_capable(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Does `attention_backward(name, ...)` give float64 autograd's gradients of plain attention
    (causal C = N and unmasked C != N, grouped-query K/V), from the reference's output and
    log-sum-exp? Probed once, like the forward kernels: a backward that refuses or differs is
    never used (chunked training then falls back to an explicit mask)."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for causal, q_len, k_len in ((True, 80, 80), (False, 48, 112)):
        q, k, v = _probe_inputs(device, dtype, head_dim, q_len, k_len, 4, 2)  # grouped: 4 query / 2 KV heads
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        out64, lse64 = reference_attention(q64, k64, v64, causal, None)
        gen = torch.Generator(device).manual_seed(1)
        grad = torch.randn(out64.shape, device=device, dtype=torch.float64, generator=gen)  # (1, 4, C, d)
        expected = torch.autograd.grad(out64, (q64, k64, v64), grad)
        try:
            got = attention_backward(name, grad.to(dtype), q, k, v, out64.detach().to(dtype), lse64.detach(),
                                     causal, None)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            return False
        if not all(g.shape == e.shape and torch.allclose(g.double(), e, rtol=0, atol=tol * e.abs().max().item())
                   for g, e in zip(got, expected)):
            return False
    return True


def backward_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """The kernel whose blockwise backward chunked training uses here: the first correct one of
    CPU's flash, or on a GPU PyTorch's flash (bf16/fp16) then the efficient kernel; None if none is."""
    if device.type == "cpu":
        candidates: tuple[str, ...] = ("cpu_flash",)
    else:
        candidates = ("flash", "efficient") if dtype in HALF else ("efficient",)
    return next((name for name in candidates if backward_capable(name, device, dtype, head_dim)), None)


@functools.lru_cache(maxsize=None)
def working_kernels(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, ...]:
    """The kernels that are correct on `device` for `dtype` and `head_dim`, fastest first (checked once)."""
    if device.type == "cpu":
        return ("cpu_flash",)
    candidates = CUDA_ORDER if dtype in HALF else ("efficient",)
    working = tuple(name for name in candidates if _agrees(name, device, dtype, head_dim))
    if not working:
        raise RuntimeError(f"no fused attention kernel with log-sum-exp works on {device} for {dtype}, "
                           f"head size {head_dim}")
    return working


def choose_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The fastest kernel that is correct on `device` for `dtype` and `head_dim`."""
    return working_kernels(device, dtype, head_dim)[0]


def attention_with_lse(query: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float | None,
                       kernel: str | None = None) -> tuple[Tensor, Tensor]:
    """(output (B, H, C, d) in the query's dtype, log-sum-exp (B, H, C) float32); causal is top-left.
    key/value (B, H_kv, N, d) may have fewer heads than the query (`_run_grouped`).

    cuDNN builds an execution plan per shape (43 ms first call vs 5 ms after, measured on an
    H200), so it runs only shapes that recur: query and key lengths that are multiples of 128 (whole chunks of the
    usual chunk sizes; `longctx.engine.attention` pads the ragged last chunk of a request to one, exactly).
    Other lengths go to the next kernel (PyTorch's flash), which needs no plan. A kernel that
    refuses a shape the probe did not cover hands over to the next exact one."""
    if kernel is not None:
        return _run_grouped(kernel, query, key, value, causal, scale)
    candidates = _candidates(query, key)
    for name in candidates[:-1]:
        try:
            return _run_grouped(name, query, key, value, causal, scale)
        except RuntimeError:
            continue
    return _run_grouped(candidates[-1], query, key, value, causal, scale)


def _candidates(query: Tensor, key: Tensor) -> tuple[str, ...]:
    """The correct kernels for these shapes, fastest first (cuDNN only on lengths it has plans for)."""
    candidates = working_kernels(query.device, query.dtype, query.shape[-1])
    if len(candidates) > 1 and candidates[0] == "cudnn" and (query.shape[2] % ROWS or key.shape[2] % ROWS):
        candidates = candidates[1:]
    return candidates


def one_call_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor | None:
    """Bottom-right causal attention of query (B, H, C, d) over key/value (B, H_kv, N, d) as one
    call of the fastest kernel for these shapes, if that kernel does it exactly (`one_call_capable`):
    no split, no merge, no repeated or folded heads. None where it does not."""
    name = _candidates(query, key)[0]
    grouped = query.shape[1] != key.shape[1]
    if not one_call_capable(name, query.device, query.dtype, query.shape[-1], grouped):
        return None
    return KERNELS[name](query, key, value, True, scale)[0]  # (B, H, C, d)


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """flash-attn (the package) imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True
