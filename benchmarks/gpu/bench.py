"""GPU benchmark G1-G4 (design §9) on a Llama-3.2-1B-shaped model: random weights, bf16, GQA.

One command, one process, one card; every figure is printed with its target and PASS/MISS as it
is measured (so a run cut short keeps what it had), and all of them go to `--out` as JSON:

  kernel  one 64K causal attention layer (32 heads x 64, bf16): TFLOP/s of cuDNN, PyTorch flash,
          efficient; the kernel longctx chose must be the fastest
  G1      64K-token prefill, longctx chunked (4096) vs transformers' stock unchunked `sdpa`    >= 0.9x
  G2      request peak memory (minus weights) / KV-cache floor, ssmlora chunk 4096, 128K   <= 1.1x
  G3      512K tokens ssmlora chunk 4096                                                    <= 60 s
          1M tokens (2^20) ssmlora chunk 4096: peak reserved memory fits an 80 GB card
  G4      one log-likelihood request, ssmlora model type vs lm-eval's `hf`, 32K and 64K:
          peak memory <= 0.25x, time <= 1.0x
  P3-GPU  adapters' throughput vs the bare base at 32K                                      >= 0.9x

Usage: python benchmarks/gpu/bench.py [--out gpu.json] [--skip g4,million] [--device cuda]
The model's position limit is raised to 2^20 + 64 so that 512K and 1M inputs are admitted.

`--base smollm2-135m [--rope-scaling yarn:4]`: G1, G4 and P3-GPU on a real checkpoint's weights (bf16)
instead, at its position limit (8K; 32K with yarn x4) since nothing longer is admitted; the kernel and
long-input figures are skipped (they do not depend on the weights).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import kv_cache_bytes  # noqa: E402

from longctx.engine.measure import TimedRegion  # noqa: E402

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                    max_position_embeddings=(1 << 20) + 64, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMOKE_SHAPE = dict(LLAMA_3_2_1B, vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)
GIB = 2 ** 30
K = 1024  # tokens per "K" in every length below; --smoke shrinks it (and the model) to check the script on a CPU
CHUNK = 4 * K
G4_LENGTHS = (32 * K, 64 * K)
G1_LENGTH = 64 * K
WARM_REQUESTS = 5  # G4: requests per length and side timed warm (and as many with the allocator emptied)
RESULTS: dict[str, Any] = {}


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(key: str, text: str, value: Any) -> None:
    RESULTS[key] = value
    print(text, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def cuda_time(fn: Callable[[], Any], repeats: int = 2) -> float:
    """Best seconds of `repeats` calls after one warm-up, each a `TimedRegion` (the GPU's queue drained)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        with TimedRegion("cuda" if torch.cuda.is_available() else "cpu") as region:
            fn()
        best = min(best, region.seconds)
    return best


def save_random_checkpoint(directory: str, device: str, shape: dict[str, Any]) -> None:
    """A bf16 checkpoint of `shape` with random weights, plus the embedded base's tokenizer (the
    benchmark feeds token ids; the tokenizer only satisfies the loaders)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from longctx.engine.settings import default_base_path

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(default_base_path()).save_pretrained(directory)
    del model
    empty_cache()


def real_base_checkpoint(directory: str, base: str, rope_scaling: str | None) -> tuple[int, int]:
    """A real base's files linked into `directory` with its config in bf16 (and rope scaling, if asked),
    so that `hf` and longctx load the same checkpoint; returns (vocabulary, position limit)."""
    from transformers import AutoConfig

    from longctx.engine.bases import scale_rope
    from longctx.engine.settings import parse_rope_scaling, resolve_base

    source = Path(resolve_base(base))
    for path in source.iterdir():
        if path.name != "config.json":
            (Path(directory) / path.name).symlink_to(path)
    config = AutoConfig.from_pretrained(source)
    scaling = parse_rope_scaling(rope_scaling)
    if scaling:
        scale_rope(config, scaling)
    config.dtype = torch.bfloat16
    config.save_pretrained(directory)
    return config.vocab_size, config.max_position_embeddings


def use_attention(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Switch every attention layer of `model` to the registered implementation `name`."""
    model.config._attn_implementation = name
    return model


def random_ids(n: int, device: str, seed: int = 0, vocab: int = 128000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (1, n), generator=gen).to(device)  # (1, N)


def bench_kernels(device: str) -> None:
    from longctx.engine.kernels import CUDA_ORDER, KERNELS, choose_kernel, grouped_capable, one_call_capable

    n, heads, d = 64 * K, 32, 64
    q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * n * n / 2 * d * heads  # causal: half the score matrix
    speeds = {}
    for name in CUDA_ORDER:
        try:
            seconds = cuda_time(lambda: KERNELS[name](q, k, v, True, None))
            speeds[name] = flops / seconds / 1e12
        except RuntimeError as err:
            speeds[name] = None
            print(f"  kernel {name}: unavailable ({str(err).splitlines()[0][:80]})")
    chosen = choose_kernel(q.device, torch.bfloat16, d)
    one_call = one_call_capable(chosen, q.device, torch.bfloat16, d, grouped=True)
    grouped = {name: grouped_capable(name, q.device, torch.bfloat16, d) for name, s in speeds.items() if s}
    fastest = max((s, name) for name, s in speeds.items() if s)[1]
    text = ", ".join(f"{name} {s:.0f}" for name, s in speeds.items() if s)
    native = ", ".join(name for name, ok in grouped.items() if ok) or "none"
    report("kernel", f"kernel  64K causal layer 32x64 bf16 TFLOP/s: {text}; longctx uses {chosen} "
                     f"(fastest: {fastest}) {verdict(chosen == fastest)}; a chunk over its cache (GQA) is "
                     f"{'one call' if one_call else 'two calls merged'}; grouped heads without copies: {native}",
           {"tflops": speeds, "chosen": chosen, "fastest": fastest, "one_call": one_call, "grouped": grouped})


def bench_prefill(model: torch.nn.Module, device: str) -> None:
    """G1: 64K prefill, chunked longctx vs stock unchunked sdpa (and stock chunked for context)."""
    from longctx.engine.runner import chunked_forward

    n = G1_LENGTH
    ids = random_ids(n, device, vocab=model.config.vocab_size)
    use_attention(model, "sdpa")
    with torch.no_grad():
        stock = cuda_time(lambda: model(input_ids=ids, logits_to_keep=1))
        stock_chunked = cuda_time(lambda: chunked_forward(model, ids, chunk_size=CHUNK), repeats=1)
    use_attention(model, "longctx_sdpa")
    ours = cuda_time(lambda: chunked_forward(model, ids, chunk_size=CHUNK))
    ratio = stock / ours
    report("G1", f"G1      {n // K}K prefill: stock sdpa unchunked {stock:.2f} s ({n / stock / 1e3:.0f}K tok/s), "
                 f"stock sdpa chunked {stock_chunked:.2f} s, longctx chunk {CHUNK} {ours:.2f} s: "
                 f"{ratio:.2f}x (target >= 0.9x) {verdict(ratio >= 0.9)}",
           {"stock_unchunked_s": stock, "stock_chunked_s": stock_chunked, "longctx_chunked_s": ours,
            "ratio": ratio})


def chunked_request(adapted: Any, n: int, device: str) -> dict[str, float]:
    """One chunked ssmlora prefill of n tokens: seconds, request peak above the weights, reserved."""
    from longctx.engine.runner import chunked_forward

    ids = random_ids(n, device, seed=n, vocab=adapted.model.config.vocab_size)
    empty_cache()
    with TimedRegion(device) as peak:
        chunked_forward(adapted, ids, chunk_size=CHUNK)
    seconds = peak.seconds
    floor = kv_cache_bytes(adapted.model, n)
    return {"tokens": n, "seconds": seconds, "request_bytes": peak.delta_bytes, "kv_floor_bytes": floor,
            "ratio": peak.delta_bytes / floor, "peak_bytes": peak.peak_bytes,
            "reserved_bytes": peak.reserved_bytes}


def bench_long(model: torch.nn.Module, device: str, million: bool) -> None:
    """G2 at 32K/128K, G3 at 512K and (optionally) 1M, with ssmlora chunk 4096."""
    from longctx.adapters import wrap

    adapted = wrap(use_attention(model, "longctx_sdpa"), "ssmlora")
    chunked_request(adapted, 8 * K, device)  # warm-up
    for n in (32 * K, 128 * K):
        r = chunked_request(adapted, n, device)
        report(f"G2_{n}", f"G2      {n // K}K ssmlora: request {r['request_bytes'] / GIB:.2f} GiB / KV floor "
                          f"{r['kv_floor_bytes'] / GIB:.2f} GiB = {r['ratio']:.3f}x "
                          f"(target <= 1.1x at 128K) {verdict(r['ratio'] <= 1.1) if n == 128 * K else ''}", r)
    r = chunked_request(adapted, 512 * K, device)
    report("G3_512K", f"G3      512K ssmlora: {r['seconds']:.1f} s ({r['tokens'] / r['seconds'] / 1e3:.1f}K tok/s), "
                      f"peak {r['peak_bytes'] / GIB:.1f} GiB, request/KV {r['ratio']:.3f}x "
                      f"(target <= 60 s) {verdict(r['seconds'] <= 60)}", r)
    if million:
        r = chunked_request(adapted, 1024 * K, device)
        held = r["reserved_bytes"] if r["reserved_bytes"] is not None else r["peak_bytes"]
        fits = held <= 78 * GIB  # an 80 GB card has 79.6 GiB; leave room for the CUDA context
        report("G3_1M", f"G3      1M (2^20) ssmlora: {r['seconds']:.1f} s, peak {r['peak_bytes'] / GIB:.1f} GiB, "
                        f"reserved {held / GIB:.1f} GiB (target: fits 80 GB) {verdict(fits)}", r)
    adapted.model.unload() if hasattr(adapted.model, "unload") else None


def bench_adapters(model: torch.nn.Module, device: str, rounds: int = 5) -> None:
    """Tokens/s of each adapter vs the bare base at 32K, chunk 4096: one copy of the base per
    method, all held at once (5 x 2.5 GB), timed in `rounds` interleaved rounds, median per method,
    so that a slow spell of the card falls on every method alike (single runs in sequence moved
    one ratio from 0.88 to 0.59 on the H100 on 2026-11-26)."""
    from longctx.adapters import wrap
    from longctx.engine.runner import chunked_forward

    ids = random_ids(min(32 * K, G1_LENGTH), device, seed=1, vocab=model.config.vocab_size)  # a real base: its limit
    methods = ("base", "lora", "ssmlora", "ssmlora-scan", "lora-xs")
    adapted = {m: wrap(copy.deepcopy(use_attention(model, "longctx_sdpa")), m) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method, one in adapted.items():
            times[method].append(cuda_time(lambda: chunked_forward(one, ids, chunk_size=CHUNK), repeats=1))
    adapted = None  # free the copies
    empty_cache()
    speeds = {m: ids.shape[1] / sorted(t)[len(t) // 2] for m, t in times.items()}
    ratios = {m: s / speeds["base"] for m, s in speeds.items() if m != "base"}
    text = ", ".join(f"{m} {r:.2f}" for m, r in ratios.items())
    report("adapters", f"P3-GPU  {ids.shape[1] // K}K throughput vs base ({speeds['base'] / 1e3:.0f}K tok/s): {text} "
                       f"(target >= 0.9x) {verdict(min(ratios.values()) >= 0.9)}",
           {"tokens_per_s": speeds, "ratios": ratios})


def one_request(lm: Any, n: int, device: str, vocab: int, seed: int = 7, emptied: bool = True) -> dict[str, float]:
    """One log-likelihood request of n tokens (8 of them the continuation): time, peaks, log-prob.
    `emptied`: the allocator's cached blocks are handed back to the driver first, so the request
    allocates afresh; otherwise it reuses what the previous request left cached."""
    ids = random_ids(n, "cpu", seed=seed, vocab=vocab)[0].tolist()
    request = (("context", "continuation"), ids[:-8], ids[-8:])
    if emptied:
        empty_cache()
    with TimedRegion(device) as peak:
        ((logprob, _),) = lm._loglikelihood_tokens([request], disable_tqdm=True)
    return {"seconds": peak.seconds, "peak_bytes": peak.peak_bytes, "request_bytes": peak.delta_bytes,
            "logprob": logprob}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def measure_lm(lm: Any, lengths: tuple[int, ...], device: str, vocab: int, warm: int = WARM_REQUESTS) -> dict[int, dict[str, Any]]:
    """Per length: the first request (cold: kernels meet new shapes), then `warm` more of the same
    length with other tokens, back to back as an evaluation runs them (the allocator keeps its
    cached blocks: lm-eval empties it between requests neither for `hf` nor for `ssmlora`), then
    `warm` more with the allocator emptied before each (how this benchmark timed G4 until
    2026-11-26). Time and memory are the back-to-back request of median time (one request varies
    by a few percent; peak allocated memory does not depend on the allocator's cache);
    `emptied_seconds` the median of the others. The log-prob is the first warm request's, the same
    tokens on either side of a comparison."""
    one_request(lm, 4 * K, device, vocab)  # process warm-up
    figures = {}
    for n in lengths:
        cold = one_request(lm, n, device, vocab, seed=7)
        runs = [one_request(lm, n, device, vocab, seed=8 + i, emptied=False) for i in range(warm)]
        emptied = [one_request(lm, n, device, vocab, seed=8 + i) for i in range(warm)]
        figures[n] = {**_median(runs), "logprob": runs[0]["logprob"], "cold_seconds": cold["seconds"],
                      "warm_seconds": [r["seconds"] for r in runs],
                      "emptied_seconds": _median(emptied)["seconds"]}
    return figures


def bench_vs_hf(directory: str, device: str, vocab: int, chunks: tuple[int, ...],
                methods: tuple[str, ...] = ("ssmlora",)) -> None:
    """G4: lm-eval's `hf` (stock sdpa, every position's logits) vs the ssmlora model type (chunked).
    Each loads the checkpoint itself; nothing else is on the card meanwhile."""
    from lm_eval.models.huggingface import HFLM

    from longctx.lmeval.model import SsmloraLM

    lengths = G4_LENGTHS
    lm = HFLM(pretrained=directory, device=device, batch_size=1, dtype="bfloat16", max_length=1 << 20)
    hf = measure_lm(lm, lengths, device, vocab)
    del lm
    empty_cache()
    for method, chunk in ((m, c) for m in methods for c in chunks):
        lm = SsmloraLM(pretrained=directory, method=method, chunk_size=chunk, device=device)
        ours = measure_lm(lm, lengths, device, vocab)
        del lm
        empty_cache()
        for n in lengths:
            h, o = hf[n], ours[n]
            memory, speed = o["peak_bytes"] / h["peak_bytes"], o["seconds"] / h["seconds"]
            emptied = o["emptied_seconds"] / h["emptied_seconds"]
            report(f"G4_{n}_{method}_chunk{chunk}",
                   f"G4      {n // K}K one request, {method} chunk {chunk}: hf {h['peak_bytes'] / GIB:.1f} GiB "
                   f"{h['seconds']:.3f} s (cold {h['cold_seconds']:.2f}), {method} {o['peak_bytes'] / GIB:.1f} GiB "
                   f"{o['seconds']:.3f} s (cold {o['cold_seconds']:.2f}): memory {memory:.3f}x (<= 0.25x) "
                   f"{verdict(memory <= 0.25)}, time {speed:.3f}x (<= 1.0x) {verdict(speed <= 1.0)} "
                   f"[allocator emptied before each: {h['emptied_seconds']:.3f} / {o['emptied_seconds']:.3f} s = "
                   f"{emptied:.3f}x]; log-probs {h['logprob']:.2f} / {o['logprob']:.2f}",
                   {"hf": h, "longctx": o, "method": method, "chunk": chunk, "memory_ratio": memory,
                    "time_ratio": speed, "emptied_time_ratio": emptied})


def bench_plan_cost(device: str) -> None:
    """First call vs repeat of each CUDA kernel on a shape it has not seen (cuDNN builds a plan)."""
    from longctx.engine.kernels import CUDA_ORDER, KERNELS

    q = torch.randn(1, 8, 4 * 4000 + 4 * K, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 50000 + 333, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    costs = {}
    for index, name in enumerate(CUDA_ORDER):
        times = []
        for _ in range(2):
            with TimedRegion(device) as region:
                KERNELS[name](q[:, :, : q.shape[2] - index], k[:, :, : k.shape[2] - index],
                              v[:, :, : k.shape[2] - index], False, None)
            times.append(region.seconds)
        costs[name] = {"first_s": times[0], "repeat_s": times[1]}
    text = ", ".join(f"{n} {c['first_s'] * 1e3:.0f} / {c['repeat_s'] * 1e3:.0f} ms" for n, c in costs.items())
    report("plan", f"plan    new shape, first call / repeat: {text}", costs)


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    card = {}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card = {"card": props.name, "memory_gib": round(props.total_memory / GIB, 1)}
    return {**card, "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            **{name: version(name) for name in ("transformers", "peft", "lm_eval", "flash_attn", "longctx")}}


def main() -> None:
    global K, CHUNK, G1_LENGTH, G4_LENGTHS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write every figure here as JSON")
    parser.add_argument("--skip", default="", help="comma-separated: g4,kernel,g1,adapters,long,million")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and lengths / 64: checks the script")
    parser.add_argument("--g4-chunks", default="4096", help="chunk sizes of the longctx side of G4, comma-separated")
    parser.add_argument("--g4-methods", default="ssmlora", help="methods of the longctx side of G4 (e.g. ssmlora,base)")
    parser.add_argument("--base", help="a real base (e.g. smollm2-135m): G1, G4, P3-GPU on its weights, at its limit")
    parser.add_argument("--rope-scaling", help="with --base: e.g. yarn:4 (the limit grows by the factor)")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: error: no CUDA device here (run on a GPU, or --smoke --device cpu to check the script)")
    shape = SMOKE_SHAPE if args.smoke else LLAMA_3_2_1B
    if args.smoke:
        K, CHUNK = 16, 64
        G1_LENGTH, G4_LENGTHS = 64 * K, (32 * K, 64 * K)
    skip = set(filter(None, args.skip.split(",")))
    if torch.device(args.device).type != "cuda":
        skip |= {"kernel"}  # CUDA kernels only
    report("environment", f"env     {json.dumps(environment(args.device))}", environment(args.device))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = shape["vocab_size"]
        if args.base:
            vocab, limit = real_base_checkpoint(tmp, args.base, args.rope_scaling)
            G1_LENGTH = limit * K // 1024
            G4_LENGTHS = (G1_LENGTH,)
            skip |= {"kernel", "long", "million"}
            report("base", f"base    {args.base} (rope scaling {args.rope_scaling or 'none'}): limit {limit}", limit)
        else:
            save_random_checkpoint(tmp, args.device, shape)
        if "g4" not in skip:
            chunks = tuple(int(c) // (1024 // K) for c in args.g4_chunks.split(","))
            bench_vs_hf(tmp, args.device, vocab, chunks, tuple(args.g4_methods.split(",")))
        run_in_process(tmp, args.device, skip, vocab)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")


def run_in_process(directory: str, device: str, skip: set[str], vocab: int) -> None:
    """The kernel, G1, adapter and long-input figures on the checkpoint loaded by `load_base`
    (straight onto the card in bf16); the 1M run last, since it is the longest."""
    from longctx.engine.bases import load_base

    if "kernel" not in skip:
        bench_kernels(device)
        bench_plan_cost(device)
    start = time.perf_counter()
    model, _ = load_base(directory, dtype="auto", attn_implementation="longctx_sdpa", device=device)
    report("load", f"load    load_base: {time.perf_counter() - start:.1f} s, "
                   f"{next(model.parameters()).dtype} on {next(model.parameters()).device}", None)
    if "g1" not in skip:
        bench_prefill(model, device)
    if "adapters" not in skip:
        bench_adapters(model, device)
    if "long" not in skip:
        bench_long(model, device, "million" not in skip)


if __name__ == "__main__":
    main()
