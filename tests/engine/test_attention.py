"""`longctx_sdpa` (two flash calls merged by log-sum-exp) equals plain SDPA with a mask."""
from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_llama

from longctx.engine.attention import NAME, register
from longctx.engine.runner import chunked_forward


def with_attention(model, name):
    register()
    model.config._attn_implementation = name
    return model


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 32])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_sdpa_chunked_and_padded(chunk_size, padded):
    ids = random_ids(2, 80, seed=3)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :11] = 0
    keep = torch.arange(80)
    expected = chunked_forward(with_attention(tiny_llama(), "sdpa"), ids, mask, chunk_size, keep).logits
    ours = chunked_forward(with_attention(tiny_llama(), NAME), ids, mask, chunk_size, keep).logits
    rows = slice(None) if not padded else 1
    torch.testing.assert_close(ours[rows], expected[rows], rtol=0, atol=1e-5)
    if padded:
        torch.testing.assert_close(ours[0, 11:], expected[0, 11:], rtol=0, atol=1e-5)


def test_gradients_match_sdpa():
    ids = random_ids(1, 40)
    grads = []
    for name in ("sdpa", NAME):
        model = with_attention(tiny_llama(), name).train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


# ---- the merged two-call path against plain attention: GQA, dtypes, kernels ------------------------

from longctx.engine import attention as attn_mod  # noqa: E402
from longctx.engine import kernels  # noqa: E402


def reference_bottom_right(query, key, value):
    """Plain float64 attention of C queries over N keys, bottom-right causal, K/V repeated for GQA."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
    c, n = query.shape[2], key.shape[2]
    scores = query.double() @ key.transpose(-1, -2) / query.shape[-1] ** 0.5  # (B, H, C, N)
    mask = torch.ones(c, n, dtype=torch.bool).tril(n - c)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ value  # (B, H, C, d)


def cache_slices(heads, kv_heads, past, chunk, dtype, seed=0):
    """query (1, H, C, d) and K/V as the preallocated cache hands them over: strided views of a
    larger buffer (B, H_kv, capacity, d)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, chunk, heads, 16, generator=gen).to(dtype).transpose(1, 2)  # as HF: (B, H, C, d), strided
    buf = torch.randn(2, 1, kv_heads, past + chunk + 37, 16, generator=gen).to(dtype)
    return q, buf[0, :, :, :past + chunk], buf[1, :, :, :past + chunk]


@pytest.fixture(params=["native", "folded"])
def grouping(request, monkeypatch):
    """Run a test twice: with the CPU kernel taking grouped-query K/V as they are (where probed
    exact: the GPU's way), and folded (queries folded onto their KV head, the chunk's K/V repeated:
    CPU's choice, and any kernel's that does not group heads)."""
    native = request.param == "native"
    monkeypatch.setattr(kernels, "groups_natively", lambda name, device, dtype, head_dim:
                        native and kernels.grouped_capable(name, device, dtype, head_dim))
    return request.param


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])  # max seen: 4e-7, 8e-3, 1e-3
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("past", [0, 1, 50])
def test_merged_attention_equals_plain_attention(grouping, dtype, tol, heads, kv_heads, past):
    q, k, v = cache_slices(heads, kv_heads, past, 24, dtype)
    out = attn_mod.merged_attention(q, k, v, None)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_bottom_right(q, k, v), rtol=0, atol=tol)


def test_the_cpu_kernel_groups_query_heads_natively_but_cpu_folds():
    """The probe finds PyTorch's CPU flash kernel exact with fewer KV heads than query heads; CPU
    still folds (measured as fast or faster), only a GPU hands grouped K/V over as they are."""
    cpu = torch.device("cpu")
    assert kernels.grouped_capable("cpu_flash", cpu, torch.float32, 16)
    assert kernels.grouped_capable("cpu_flash", cpu, torch.bfloat16, 64)
    assert not kernels.groups_natively("cpu_flash", cpu, torch.float32, 16)


def test_gqa_never_repeats_the_cached_keys(grouping, monkeypatch):
    """Only the chunk's own K/V (C tokens) may be repeated across query heads, never the cache;
    with a kernel that groups heads natively nothing is repeated or folded at all."""
    repeated, folded = [], []
    repeat, fold = kernels.repeat_kv, kernels.fold_groups
    monkeypatch.setattr(kernels, "repeat_kv", lambda x, g: repeated.append(x.shape[2]) or repeat(x, g))
    monkeypatch.setattr(kernels, "fold_groups", lambda x, h: folded.append(x.shape[2]) or fold(x, h))
    q, k, v = cache_slices(8, 2, 300, 16, torch.float32)
    attn_mod.merged_attention(q, k, v, None)
    assert (repeated, folded) == (([], []) if grouping == "native" else ([16, 16], [16]))


def test_a_kernel_with_a_wrong_log_sum_exp_is_never_chosen(monkeypatch):
    """Selection checks output and log-sum-exp against float64: a kernel returning log2-based
    LSE (a plausible convention slip) is rejected, one that raises is skipped."""
    good = kernels.KERNELS["cpu_flash"]

    def log2_lse(q, k, v, causal, scale):
        out, lse = good(q, k, v, causal, scale)
        return out, lse / torch.log(torch.tensor(2.0))

    def refuses(*args):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setitem(kernels.KERNELS, "log2", log2_lse)
    monkeypatch.setitem(kernels.KERNELS, "refuses", refuses)
    cpu = torch.device("cpu")
    assert kernels._agrees("cpu_flash", cpu, torch.float32, 16)
    assert kernels._agrees("cpu_flash", cpu, torch.bfloat16, 64)
    assert not kernels._agrees("log2", cpu, torch.float32, 16)
    assert not kernels._agrees("refuses", cpu, torch.float32, 16)
    assert kernels.choose_kernel(cpu, torch.bfloat16, 64) == "cpu_flash"


def test_flash_attn_package_call_is_bottom_right_causal_with_native_gqa(monkeypatch):
    """The flash-attn branch hands (B, N, H, d) layouts and the un-repeated K/V to the package;
    a stand-in with flash-attn's documented semantics checks the plumbing (no GPU here)."""
    import sys
    import types

    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):  # (B, C, H, d), (B, N, H_kv, d)
        calls.append((tuple(q.shape), tuple(k.shape), causal))
        out = reference_bottom_right(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.to(q.dtype).transpose(1, 2)  # (B, C, H, d)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    q, k, v = cache_slices(8, 2, 40, 12, torch.float32)
    out = attn_mod._flash_attn_package(q, k, v, None)  # (B, C, H, d)
    assert calls == [((1, 12, 8, 16), (1, 52, 2, 16), True)]
    torch.testing.assert_close(out.transpose(1, 2), attn_mod.merged_attention(q, k, v, None), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gqa_model_chunked_in_half_precision_matches_float32(dtype):
    """A GQA Llama (4 query / 2 KV heads) run chunked in bf16/fp16 stays within half-precision
    error of its float32 unchunked run, and its logits come back from a model in that dtype."""
    ids = random_ids(1, 120, seed=9)
    keep = torch.arange(120)
    full = torch.log_softmax(chunked_forward(with_attention(tiny_llama(), NAME), ids, keep=keep).logits, -1)
    model = with_attention(tiny_llama(), NAME).to(dtype)
    seen = []
    model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[0].dtype))
    half = torch.log_softmax(chunked_forward(model, ids, chunk_size=32, keep=keep).logits, -1)
    assert seen and set(seen) == {dtype}
    assert (half - full).abs().max() < 0.05  # measured 0.0055 (bf16), 0.0007 (fp16)


@pytest.mark.parametrize("heads", [8, 2])
def test_padding_the_query_rows_changes_nothing(grouping, heads):
    """A ragged chunk's query rows are zero-padded for the GPU kernels; the result is the same."""
    q, k, v = cache_slices(heads, 2, 256, 37, torch.float32)
    plain_out, plain_lse = attn_mod._unmasked(q, k[:, :, :256], v[:, :, :256], None, None, multiple=1)
    padded_out, padded_lse = attn_mod._unmasked(q, k[:, :, :256], v[:, :, :256], None, None, multiple=128)
    assert padded_out.shape == plain_out.shape == (1, heads, 37, 16)
    torch.testing.assert_close(padded_out, plain_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded_lse, plain_lse, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_padding_a_ragged_chunk_for_its_causal_call_changes_nothing(grouping, monkeypatch, dtype, heads, kv_heads):
    """On a GPU a ragged chunk's own causal call is padded at the end (queries, keys, values) to a
    multiple of 128, so it keeps cuDNN: the kernel sees the padded shape, and the chunk's rows are
    exactly the unpadded call's; merged over a ragged past, still plain attention. A chunk shorter
    than 128 (a decoding step) is left as it is."""
    q, k, v = cache_slices(heads, kv_heads, 0, 150, dtype)
    lengths, run = [], kernels.attention_with_lse
    monkeypatch.setattr(attn_mod, "attention_with_lse",
                        lambda q, k, *rest: lengths.append((q.shape[2], k.shape[2])) or run(q, k, *rest))
    padded_out, padded_lse = attn_mod._causal(q, k, v, None, None, multiple=128)
    plain_out, plain_lse = attn_mod._causal(q, k, v, None, None, multiple=1)
    attn_mod._causal(q[:, :, :37], k[:, :, :37], v[:, :, :37], None, None, multiple=128)
    assert lengths == [(256, 256), (150, 150), (37, 37)]
    assert padded_out.shape == (1, heads, 150, 16) and padded_out.dtype == dtype
    ulp = 1e-6 if dtype == torch.float32 else 8e-3  # the kernel's blocks add up in another order
    torch.testing.assert_close(padded_out, plain_out, rtol=0, atol=ulp)
    torch.testing.assert_close(padded_lse, plain_lse, rtol=1e-5, atol=0)  # float32 either way
    on_cuda = lambda query, multiple, least=1: (-query.shape[2]) % 128 if query.shape[2] >= least else 0  # noqa: E731
    monkeypatch.setattr(attn_mod, "_row_padding", on_cuda)
    q, k, v = cache_slices(heads, kv_heads, 300, 150, dtype)
    out = attn_mod.merged_attention(q, k, v, None)
    assert {c for c, _ in lengths[3:]} == {256}
    torch.testing.assert_close(out.double(), reference_bottom_right(q, k, v), rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])  # max seen: 1e-6, 8e-3
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("past,chunk", [(1, 16), (50, 16), (83, 37)])
@pytest.mark.parametrize("backward_keys", [4096, 32])
def test_merged_attention_backward_equals_float64_autograd(grouping, monkeypatch, backward_keys, dtype, tol, heads,
                                                           kv_heads, past, chunk):
    """Chunked training's attention (`_MergedAttention`: two flash calls forward, the flash kernel's
    blockwise backward per block, grouped K/V native or folded) has the gradients of plain float64
    attention, with the cached keys constant: dq everywhere, dk/dv on the chunk's own keys."""
    q, k, v = cache_slices(heads, kv_heads, past, chunk, dtype, seed=past)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = attn_mod.chunked_attention(torch.nn.Module(), q, k, v, None)  # (B, C, H, d)
    (out.transpose(1, 2).float() * grad.float()).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    (reference_bottom_right(q64, k64, v64) * grad.double()).sum().backward()
    scale = lambda t: t.abs().max().item()
    assert out.dtype == dtype
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=0, atol=tol * scale(q64.grad))
    for mine, ref in ((k.grad, k64.grad), (v.grad, v64.grad)):
        assert not mine[:, :, :past].any()  # the cache is a constant
        torch.testing.assert_close(mine[:, :, past:].double(), ref[:, :, past:], rtol=0, atol=tol * scale(ref))


# ---- one call per chunk, where the kernel does bottom-right causal with grouped heads ---------------

def _reference_kernel(bottom_right: bool, kv_head_of=lambda h, groups, kv_heads: h // groups):
    """A stand-in kernel with the given causal alignment and grouped-head convention (float64 maths)."""
    def kernel(q, k, v, causal, scale):
        heads, kv_heads = q.shape[1], k.shape[1]
        index = torch.tensor([kv_head_of(h, heads // kv_heads, kv_heads) for h in range(heads)])
        out, lse = kernels.reference_attention(q, k[:, index], v[:, index], causal, scale, bottom_right)
        return out.to(q.dtype), lse.float()
    return kernel


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """Three stand-ins: bottom-right with the right grouping, top-left (the documented CUDA
    convention), and bottom-right with query heads assigned to KV heads round-robin (wrong)."""
    monkeypatch.setitem(kernels.KERNELS, "bottom_right", _reference_kernel(True))
    monkeypatch.setitem(kernels.KERNELS, "top_left", _reference_kernel(False))
    monkeypatch.setitem(kernels.KERNELS, "round_robin", _reference_kernel(True, lambda h, g, kv: h % kv))
    kernels.one_call_capable.cache_clear()
    kernels.grouped_capable.cache_clear()
    yield
    kernels.one_call_capable.cache_clear()
    kernels.grouped_capable.cache_clear()


def test_one_call_probe_accepts_only_exact_bottom_right_grouped_kernels(stand_in_kernels):
    cpu = torch.device("cpu")
    assert kernels.one_call_capable("bottom_right", cpu, torch.float32, 16, grouped=True)
    assert not kernels.one_call_capable("top_left", cpu, torch.float32, 16, grouped=False)
    assert not kernels.one_call_capable("round_robin", cpu, torch.float32, 16, grouped=True)
    assert kernels.one_call_capable("round_robin", cpu, torch.float32, 16, grouped=False)  # no groups: fine
    assert not kernels.one_call_capable("cpu_flash", cpu, torch.float32, 16, grouped=False)  # CPU's is top-left
    assert kernels.grouped_capable("top_left", cpu, torch.float32, 16)  # groups right; the alignment is not asked
    assert not kernels.grouped_capable("round_robin", cpu, torch.float32, 16)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name,one_call", [("bottom_right", True), ("top_left", False), ("round_robin", False)])
def test_merged_attention_is_one_call_only_where_exact(stand_in_kernels, monkeypatch, name, one_call, dtype, tol):
    """A capable kernel gets the chunk over its whole cache in one call with the K/V un-repeated;
    any other runs the two-call merge, with the K/V as they are where the kernel groups heads
    right, else folded and repeated. Either way the result is bottom-right causal attention."""
    calls = []
    kernel = kernels.KERNELS[name]
    monkeypatch.setitem(kernels.KERNELS, name, lambda q, k, v, c, s: calls.append((q.shape, k.shape, c)) or kernel(q, k, v, c, s))
    monkeypatch.setattr(kernels, "working_kernels", lambda device, dtype, head_dim: (name,))
    monkeypatch.setattr(kernels, "groups_natively", kernels.grouped_capable)  # as on a GPU
    q, k, v = cache_slices(8, 2, 40, 12, dtype)
    out = attn_mod.merged_attention(q, k, v, None)
    assert out.dtype == dtype
    assert (out.double() - reference_bottom_right(q, k, v)).abs().max() < tol
    work = [c for c in calls if c[1][2] not in (80, 112)]  # the probes use 80 and 112 keys
    if one_call:
        assert work == [((1, 8, 12, 16), (1, 2, 52, 16), True)]
    elif name == "top_left":  # groups heads right: the chunk's own 12 keys causal, the 40 past keys, K/V as they are
        assert sorted(work) == [((1, 8, 12, 16), (1, 2, 12, 16), True), ((1, 8, 12, 16), (1, 2, 40, 16), False)]
    else:  # the chunk's own 12 keys repeated to 8 heads, causal; the 40 past keys, 4 query heads folded per KV head
        assert sorted(work) == [((1, 2, 48, 16), (1, 2, 40, 16), False), ((1, 8, 12, 16), (1, 8, 12, 16), True)]


def test_a_wrong_backward_is_never_used(monkeypatch):
    """The blockwise backward is probed against float64 autograd like the forward kernels: one that
    is off (here dq scaled by 1.01) is rejected, and chunked training falls back to the masked
    path — with the right gradients."""
    good = kernels.BACKWARDS["cpu_flash"]
    monkeypatch.setitem(kernels.BACKWARDS, "cpu_flash", lambda *a: (good(*a)[0] * 1.01, *good(*a)[1:]))
    kernels.backward_capable.cache_clear()
    try:
        assert kernels.backward_kernel(torch.device("cpu"), torch.float32, 16) is None
        q, k, v = cache_slices(8, 2, 50, 16, torch.float32)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out, _ = attn_mod.chunked_attention(torch.nn.Module(), q, k, v, None)
        out.sum().backward()
        q64 = q.detach().double().requires_grad_()
        reference_bottom_right(q64, k.detach(), v.detach()).sum().backward()
        torch.testing.assert_close(q.grad.double(), q64.grad, rtol=0, atol=1e-5)
    finally:
        monkeypatch.undo()
        kernels.backward_capable.cache_clear()
    assert kernels.backward_kernel(torch.device("cpu"), torch.float32, 16) == "cpu_flash"


@pytest.mark.parametrize("name", ["flash", "efficient"])
@pytest.mark.parametrize("causal,q_len,k_len", [(True, 80, 80), (False, 48, 112)])
def test_cuda_backward_calls_match_the_installed_torch(monkeypatch, name, causal, q_len, k_len):
    """The GPU's blockwise backward calls PyTorch's private ops (no GPU here): on meta tensors their
    arguments must fit the installed torch's schemas and give gradients of the inputs' shapes, so a
    schema change shows up in CI rather than as a GPU that silently falls back to the masked path."""
    monkeypatch.setattr(kernels, "groups_natively", lambda *args: False)
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
    q, k, v, out = meta(1, 4, q_len, 64), meta(1, 2, k_len, 64), meta(1, 2, k_len, 64), meta(1, 4, q_len, 64)
    grads = kernels.attention_backward(name, out, q, k, v, out, meta(1, 4, q_len, dtype=torch.float32), causal, None)
    assert [tuple(g.shape) for g in grads] == [(1, 4, q_len, 64), (1, 2, k_len, 64), (1, 2, k_len, 64)]
