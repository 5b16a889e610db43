"""CUDA paths (run where a GPU is present; CI has none): chunked = unchunked on the GPU, the
mask-free attention's CUDA kernel path, and the allocator-based peak-memory probe."""
from __future__ import annotations

import pytest
import torch

from conftest import EXACT_UNDER_CHUNKING, perturb, random_ids, tiny_llama
from longctx.adapters import wrap
from longctx.attention import register
from longctx.memory import PeakMemory
from longctx.runner import chunked_forward, greedy_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", EXACT_UNDER_CHUNKING)
@pytest.mark.parametrize("attn", ["sdpa", "longctx_sdpa"])
def test_chunked_equals_unchunked_on_cuda(method, attn):
    register()
    model = tiny_llama()
    model.config._attn_implementation = attn
    adapted = wrap(model.cuda(), method)
    perturb(adapted, scale=0.1)
    ids = random_ids(2, 300, seed=5).cuda()
    keep = torch.arange(299)
    full = torch.log_softmax(chunked_forward(adapted, ids, keep=keep).logits, -1)
    for chunk_size in (64, 100):
        chunked = torch.log_softmax(chunked_forward(adapted, ids, chunk_size=chunk_size, keep=keep).logits, -1)
        torch.testing.assert_close(chunked, full, rtol=0, atol=1e-4)
    assert torch.equal(greedy_generate(adapted, ids, 8, chunk_size=64), greedy_generate(adapted, ids, 8))


def test_longctx_sdpa_equals_sdpa_on_cuda():
    register()
    ids = random_ids(2, 200, seed=6).cuda()
    outputs = []
    for attn in ("sdpa", "longctx_sdpa"):
        model = tiny_llama().cuda()
        model.config._attn_implementation = attn
        outputs.append(chunked_forward(model, ids, chunk_size=48, keep=torch.arange(200)).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-4)


def test_cuda_peak_memory_is_per_region():
    with PeakMemory("cuda") as big:
        block = torch.ones(64 * 2**20, device="cuda")  # 256 MiB
        del block
    with PeakMemory("cuda") as small:
        torch.ones(16, device="cuda")
    assert big.method == "cuda_allocator" and big.delta_bytes >= 256 * 2**20
    assert small.delta_bytes < 2**20
