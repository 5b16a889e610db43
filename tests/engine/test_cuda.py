"""CUDA paths (run where a GPU is present; CI has none): chunked = unchunked on the GPU, the
mask-free attention's CUDA kernel path, and the allocator-based peak-memory probe."""
from __future__ import annotations

import pytest
import torch
from conftest import EXACT_UNDER_CHUNKING, perturb, random_ids, tiny_llama

from longctx.adapters import wrap
from longctx.engine.attention import register
from longctx.engine.measure import PeakMemory
from longctx.engine.runner import chunked_forward, greedy_generate

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


# ---- bf16 / fp16, the fused kernels with log-sum-exp, grouped-query attention on the GPU -------------

from conftest import METHODS  # noqa: E402

from longctx.engine import kernels  # noqa: E402
from longctx.engine.attention import merged_attention  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_chunked_matches_float32_unchunked_on_cuda(method, dtype):
    register()
    ids = random_ids(1, 300, seed=5).cuda()
    keep = torch.arange(299)
    reference = wrap(tiny_llama().cuda(), method)
    perturb(reference, scale=0.1)
    chunk = None if method == "ssmlora" else 64  # ssmlora's carry is its definition: compare like with like
    full = torch.log_softmax(chunked_forward(reference, ids, chunk_size=chunk, keep=keep).logits, -1)
    model = tiny_llama().cuda().to(dtype)
    model.config._attn_implementation = "longctx_sdpa"
    adapted = wrap(model, method)
    perturb(adapted, scale=0.1)  # same seed: the same adapter weights as the float32 run
    seen = []
    model.model.layers[1].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[0].dtype))
    half = torch.log_softmax(chunked_forward(adapted, ids, chunk_size=chunk, keep=keep).logits, -1)
    assert set(seen) == {dtype}
    assert (half - full).abs().max() < (0.25 if method == "dense" else 0.1)  # dense: its own weights are bf16 (H200: 0.116)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_picks_a_fused_flash_class_kernel(dtype):
    chosen = kernels.choose_kernel(torch.device("cuda"), dtype, 64)
    assert chosen in ("cudnn", "flash"), chosen  # the efficient kernel is the float32 fallback only
    assert kernels.choose_kernel(torch.device("cuda"), torch.float32, 64) == "efficient"


@pytest.mark.parametrize("name", kernels.CUDA_ORDER)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_each_working_kernel_merges_exactly_with_gqa(name, head_dim):
    """Every kernel that passes the probe, used explicitly on a realistic GQA shape (32 query / 8 KV
    heads, a 512-token chunk over a 3,000-token cache slice), equals float64 attention."""
    if not kernels._agrees(name, torch.device("cuda"), torch.bfloat16, head_dim):
        pytest.skip(f"{name} does not run here for head size {head_dim}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 512, 32, head_dim, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    buf = torch.randn(2, 1, 8, 4000, head_dim, device="cuda", generator=gen).bfloat16()
    k, v = buf[0, :, :, :3512], buf[1, :, :, :3512]
    out = merged_attention(q, k, v, None, kernel=name)
    kr, vr = k.repeat_interleave(4, 1).double(), v.repeat_interleave(4, 1).double()
    scores = q.double() @ kr.transpose(-1, -2) / head_dim ** 0.5
    mask = torch.ones(512, 3512, dtype=torch.bool, device="cuda").tril(3000)
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vr
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max() < 2e-2


def test_default_chunk_attention_is_exact_on_a_realistic_gqa_chunk(monkeypatch):
    """The path longctx takes by default (one call where the fastest kernel does bottom-right causal
    with grouped heads, else the merge) on 32 query / 8 KV heads, a 512-token chunk over 3,584 keys
    (lengths cuDNN takes), equals float64 attention; one call means one kernel call."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 512, 32, 64, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    buf = torch.randn(2, 1, 8, 4096, 64, device="cuda", generator=gen).bfloat16()
    k, v = buf[0, :, :, :3584], buf[1, :, :, :3584]
    name = kernels.choose_kernel(torch.device("cuda"), torch.bfloat16, 64)
    one_call = kernels.one_call_capable(name, torch.device("cuda"), torch.bfloat16, 64, True)
    calls = []
    kernel = kernels.KERNELS[name]
    monkeypatch.setitem(kernels.KERNELS, name, lambda *a: calls.append(a[1].shape) or kernel(*a))
    out = merged_attention(q, k, v, None)
    calls = [shape for shape in calls if shape[2] not in (80, 112)]  # the probes' key lengths
    expected, _ = kernels.reference_attention(q, k, v, True, None, bottom_right=True)
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max() < 2e-2
    assert len(calls) == (1 if one_call else 2), (name, one_call, calls)
    print(f"kernel {name}: one call per chunk {one_call}")


def test_a_ragged_last_chunk_stays_on_the_fastest_kernel(monkeypatch):
    """The last chunk of a log-likelihood request is ragged (n - 1 tokens fed): 511 queries over
    3,584 cached keys. Every call still runs the fastest kernel (cuDNN on Hopper: queries, and for
    the causal call keys too, padded to a multiple of 128) — not one call on the next kernel that
    aligns causal bottom-right (PyTorch's flash: a 64K request 171 ms slower) — and the result is
    float64 attention's."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, 511, 32, 64, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    buf = torch.randn(2, 1, 8, 4096, 64, device="cuda", generator=gen).bfloat16()
    k, v = buf[0, :, :, :3584 + 511], buf[1, :, :, :3584 + 511]
    name = kernels.choose_kernel(torch.device("cuda"), torch.bfloat16, 64)
    merged_attention(q, k, v, None)  # warm-up: the probes
    calls = []
    for other in kernels.CUDA_ORDER:
        run = kernels.KERNELS[other]
        monkeypatch.setitem(kernels.KERNELS, other, lambda *a, n=other, r=run: calls.append((n, a[0].shape[2])) or r(*a))
    out = merged_attention(q, k, v, None)
    expected, _ = kernels.reference_attention(q, k, v, True, None, bottom_right=True)
    assert out.shape == q.shape and (out.double() - expected).abs().max() < 2e-2
    assert {n for n, _ in calls} == {name} and {rows % 128 for _, rows in calls} == {0}, calls


def test_gqa_attention_allocates_no_repeated_cache():
    """The merged call's own memory stays far below one repeated copy of the cached K/V."""
    q = torch.randn(1, 32, 1024, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 65536, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    merged_attention(q, k, v, None)  # warm-up: kernel choice
    with PeakMemory("cuda") as peak:
        merged_attention(q, k, v, None)
    repeated = 2 * k.numel() * 4 * k.element_size()  # K and V repeated to 32 heads
    assert peak.delta_bytes < repeated / 8, (peak.delta_bytes, repeated)


def test_bf16_model_type_on_cuda(tmp_path):
    from conftest import save_tiny_base

    from longctx.lmeval.model import SsmloraLM

    path = str(save_tiny_base(tmp_path / "base", max_positions=2048))
    ids = random_ids(1, 600, seed=2)[0].tolist()
    request = [(("c", "x"), ids[:-4], ids[-4:])]
    results = []
    for dtype in ("float32", "bfloat16"):
        lm = SsmloraLM(pretrained=path, method="ssmlora-scan", chunk_size=128, dtype=dtype, device="cuda")
        assert lm.get_model_info()["model_dtype"] == f"torch.{dtype}"
        results.append(lm._loglikelihood_tokens(request, disable_tqdm=True)[0][0])
    assert abs(results[0] - results[1]) < 0.05 * max(1.0, abs(results[0]))


# ---- chunked training's attention backward on the GPU --------------------------------------------

def _grouped_chunk(past: int, chunk: int, seed: int):
    """A realistic GQA chunk (32 query / 8 KV heads of 64, bf16) over `past` cached keys, laid out as
    the model hands it over; q and the chunk's own K/V require gradients, the cache does not."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, chunk, 32, 64, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    buf = torch.randn(2, 1, 8, past + chunk + 64, 64, device="cuda", generator=gen).bfloat16()
    k, v = buf[0, :, :, :past + chunk].clone(), buf[1, :, :, :past + chunk].clone()
    return q.detach().requires_grad_(), k.requires_grad_(), v.requires_grad_()


@pytest.mark.parametrize("native", [True, False])
def test_chunked_training_attention_backward_on_cuda(monkeypatch, native):
    """The blockwise backward (`_MergedAttention`) is chosen on the GPU and gives float64 autograd's
    gradients of bottom-right causal attention, grouped K/V as they are or folded."""
    from longctx.engine import kernels
    from longctx.engine.attention import chunked_attention

    grouped = kernels.grouped_capable
    monkeypatch.setattr(kernels, "groups_natively", lambda n, dev, dt, hd: native and grouped(n, dev, dt, hd))
    name = kernels.backward_kernel(torch.device("cuda"), torch.bfloat16, 64)
    print(f"chunked training backward on cuda: {name}")
    assert name is not None
    q, k, v = _grouped_chunk(1536, 512, seed=3)
    grad = torch.randn(1, 32, 512, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    out, _ = chunked_attention(torch.nn.Module(), q, k, v, None)  # (B, C, H, d)
    (out.transpose(1, 2).float() * grad).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected, _ = kernels.reference_attention(q64, k64, v64, True, None, bottom_right=True)
    (expected * grad.double()).sum().backward()
    for mine, ref in ((q.grad, q64.grad), (k.grad[:, :, 1536:], k64.grad[:, :, 1536:]),
                      (v.grad[:, :, 1536:], v64.grad[:, :, 1536:])):
        assert (mine.double() - ref).abs().max() < 3e-2 * ref.abs().max()
    assert not k.grad[:, :, :1536].any()  # the cache is a constant


def test_chunked_training_attention_keeps_no_mask_on_cuda(monkeypatch):
    """Forward and backward of one chunk over a 32K cache: the blockwise backward's peak is far
    below the explicit-mask path's (which keeps a folded C × N mask for the backward)."""
    from longctx.engine import kernels
    from longctx.engine.attention import chunked_attention

    peaks = {}
    for path in ("blockwise", "masked"):
        if path == "masked":
            monkeypatch.setattr(kernels, "backward_kernel", lambda device, dtype, head_dim: None)
            monkeypatch.setattr("longctx.engine.attention.backward_kernel", lambda device, dtype, head_dim: None)
        q, k, v = _grouped_chunk(32768 - 1024, 1024, seed=5)
        with PeakMemory("cuda") as peak:
            out, _ = chunked_attention(torch.nn.Module(), q, k, v, None)
            out.float().sum().backward()
        peaks[path] = peak.delta_bytes
    print(f"chunk 1024 over 32K keys, forward + backward: blockwise {peaks['blockwise'] / 2**20:.0f} MiB, "
          f"masked {peaks['masked'] / 2**20:.0f} MiB")
    assert peaks["blockwise"] < peaks["masked"] / 2


# ---- a model split over the GPU and the CPU (lm-eval hf's parallelize=True), request timings -------

SPLIT = {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1": "cuda:0",
         "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cuda:0"}
SPLIT_TEXT = "The grass is green. The sky is blue. " * 12


def _split_lm(**kwargs):
    from longctx.lmeval.model import SsmloraLM

    return SsmloraLM(pretrained="longctx-tiny", attn_implementation="longctx_sdpa", **kwargs)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 0.05)])
@pytest.mark.parametrize("chunk_size", [None, 32])
def test_gpu_cpu_split_scores_as_the_unsplit_run(dtype, tolerance, chunk_size, tmp_path):
    """Half the layers on cuda:0, half on the CPU (lm_head with its tied embedding on the GPU): the
    log-likelihoods and the generation of the unsplit GPU run, a stateful adapter included, and each
    layer's KV cache on that layer's device."""
    from lm_eval.api.instance import Instance

    from longctx.engine.bases import load_base

    adapted = wrap(load_base("longctx-tiny")[0], "ssmlora-scan")
    perturb(adapted, scale=0.2)
    adapted.save(tmp_path / "scan")
    kwargs = {"adapter": str(tmp_path / "scan"), "chunk_size": chunk_size, "dtype": dtype}
    whole, split = _split_lm(device="cuda", **kwargs), _split_lm(parallelize=True, device_map=SPLIT, **kwargs)
    requests = [Instance("loglikelihood", {}, (SPLIT_TEXT + "The pass key is", " 12345."), 0)]
    (a, _), (b, _) = whole.loglikelihood(requests)[0], split.loglikelihood(requests)[0]
    assert abs(a - b) <= tolerance * max(1.0, abs(a)), (a, b)
    generate = [Instance("generate_until", {}, (SPLIT_TEXT, {"until": ["\n"], "max_gen_toks": 6}), 0)]
    if dtype == "float32":
        assert split.generate_until(generate) == whole.generate_until(generate)
    ids = torch.tensor([split.tok_encode(SPLIT_TEXT)])  # on the CPU: the split model's input device
    cache = chunked_forward(split.adapted, ids, chunk_size=chunk_size).cache
    assert [layer.keys.device.type for layer in cache.layers] == ["cuda", "cuda", "cpu", "cpu"]


def test_a_device_map_splitting_a_tied_weight_is_refused():
    from longctx.core.errors import LongctxError

    with pytest.raises(LongctxError, match="splits one tied weight over devices"):
        _split_lm(parallelize=True, device_map={**SPLIT, "lm_head": "cpu"})


def test_request_clock_stops_after_the_gpu_has_finished(monkeypatch):
    """GPU work queued in a request is finished before its clock stops: the timed region waits for
    the device at entry and before the clock stops, and the host's interval contains the device's
    (CUDA events), whatever the speed of either."""
    from longctx.engine import measure
    from longctx.lmeval.stats import RequestLog

    calls, real = [], measure.synchronize
    monkeypatch.setattr(measure, "synchronize", lambda device: calls.append(device) or real(device))
    log = RequestLog(torch.device("cuda"))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with log.request(None, 1, 1, 0):
        start.record()
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of GPU time, queued
        end.record()
    assert end.query() and calls == [torch.device("cuda")] * 2
    assert log.records[0].seconds >= start.elapsed_time(end) / 1000


def test_model_type_on_cuda_synchronises_twice_per_request_not_per_chunk(monkeypatch):
    from lm_eval.api.instance import Instance

    from longctx.engine import measure

    lm = _split_lm(method="base", chunk_size=32, device="cuda")
    calls, real = [], measure.synchronize
    monkeypatch.setattr(measure, "synchronize", lambda device: calls.append(device) or real(device))
    requests = [Instance("loglikelihood", {}, (SPLIT_TEXT * k, " 12345."), 0) for k in (1, 2)]
    lm.loglikelihood(requests)
    assert [r.chunks > 1 for r in lm.log.records] == [True, True]
    assert calls == [lm.device] * 4 and all(r.seconds > 0 for r in lm.log.records)
