"""Where a chunked 64K prefill spends its time on a GPU, next to transformers' stock unchunked one.

Companion of `bench.py` (same Llama-3.2-1B-shaped bf16 model): prints
  - attention alone over a 64K sequence (32 query / 8 KV heads of 64): one causal call vs the
    chunked merge at several chunk sizes, split into its past-keys calls, own-chunk calls and merge;
  - the whole model's prefill at several chunk sizes vs stock `sdpa` unchunked;
  - the CUDA kernels that take the most time in each, from torch.profiler;
  - `--request`: where G4's request costs more than the bare prefill, step by step: n tokens, then
    n - 1 (a ragged last chunk, as a log-likelihood request feeds), then the continuation's
    logits kept, then the allocator emptied first (as bench.py's G4 did until 2026-11-26), then
    the ssmlora model type's whole request (`base`) with the allocator kept and emptied, and with
    its last layer attending every row instead of the kept ones only, each time relative to the first.
Usage: python benchmarks/gpu/profile_prefill.py [--length 65536] [--chunks 4096,8192,16384] [--request]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LLAMA_3_2_1B, cuda_time, random_ids, save_random_checkpoint, use_attention  # noqa: E402


def attention_alone(n: int, chunks: list[int]) -> None:
    """Per layer: one causal call over n tokens vs the chunk-by-chunk merge, and its parts."""
    from longctx.engine.attention import _unmasked, merged_attention
    from longctx.engine.kernels import attention_with_lse, grouped_capable

    heads, kv_heads, d = 32, 8, 64
    q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)  # (1, H, N, d)
    k, v = (torch.randn(1, kv_heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # (1, H_kv, N, d)
    k_rep, v_rep = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    flops = 2 * n * n * d * heads
    whole = cuda_time(lambda: attention_with_lse(q, k_rep, v_rep, True, None))
    print(f"attn    one causal call {n}: {whole * 1e3:.1f} ms ({flops / whole / 1e12:.0f} TFLOP/s)", flush=True)
    grouped = {name: grouped_capable(name, q.device, q.dtype, d) for name in ("cudnn", "flash", "efficient")}
    print(f"attn    kernels that take grouped K/V as they are: {grouped}", flush=True)
    for c in chunks:
        spans = [(s, min(s + c, n)) for s in range(0, n, c)]
        merged = cuda_time(lambda: [merged_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], None) for s, e in spans])
        past = cuda_time(lambda: [_unmasked(q[:, :, s:e], k[:, :, :s], v[:, :, :s], None, None)
                                  for s, e in spans if s])
        local = cuda_time(lambda: [attention_with_lse(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], True, None)
                                   for s, e in spans])
        print(f"attn    chunk {c}: merged {merged * 1e3:.1f} ms ({merged / whole:.2f}x the one call; "
              f"{flops / merged / 1e12:.0f} TFLOP/s): past calls {past * 1e3:.1f}, own-chunk calls {local * 1e3:.1f} "
              f"(each with its fold / repeat where the kernel does not group heads), "
              f"rest (the merge) {(merged - past - local) * 1e3:.1f} ms", flush=True)


def top_kernels(fn, label: str, rows: int = 14) -> None:
    """The CUDA kernels with the most total time in one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type.name == "CUDA":
            totals[event.name[:90]][0] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            totals[event.name[:90]][1] += 1
    total = sum(t for t, _ in totals.values())
    print(f"profile {label}: GPU busy {total / 1e3:.1f} ms", flush=True)
    for name, (t, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"          {t / 1e3:8.1f} ms {count:6d}x  {name}")


def whole_model(n: int, chunks: list[int]) -> None:
    from longctx.engine.bases import load_base
    from longctx.engine.runner import chunked_forward

    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, "cuda", LLAMA_3_2_1B)
        model, _ = load_base(tmp, dtype="auto", attn_implementation="longctx_sdpa", device="cuda")
    ids = random_ids(n, "cuda", vocab=model.config.vocab_size)
    use_attention(model, "sdpa")
    with torch.no_grad():
        stock = lambda: model(input_ids=ids, logits_to_keep=1)  # noqa: E731
        stock_s = cuda_time(stock)
        print(f"model   stock sdpa unchunked {n}: {stock_s:.3f} s", flush=True)
        top_kernels(stock, "stock sdpa unchunked")
    use_attention(model, "longctx_sdpa")
    for c in chunks + [n]:
        run = lambda: chunked_forward(model, ids, chunk_size=c)  # noqa: E731
        seconds = cuda_time(run)
        print(f"model   longctx chunk {c}: {seconds:.3f} s = {stock_s / seconds:.3f}x stock throughput", flush=True)
        if c == chunks[0]:
            top_kernels(run, f"longctx chunk {c}")


def every_row(run):
    """`run()` with the last layer attending every row, as before 2026-11-26 (the kept rows only since)."""
    from longctx.engine import runner

    skippable = runner.last_layer_rows_skippable
    runner.last_layer_rows_skippable = lambda model: False
    try:
        return run()
    finally:
        runner.last_layer_rows_skippable = skippable


def request_steps(lm, ids: torch.Tensor, chunk: int, device: str = "cuda") -> dict[str, float]:
    """Seconds of each step from the bare prefill of ids (1, n) to the model type's whole request."""
    from bench import empty_cache, one_request

    from longctx.engine.runner import chunked_forward

    n, model = ids.shape[1], lm.adapted
    keep = torch.arange(n - 9, n - 1)  # the 8 continuation positions of an n-token request
    steps = {
        f"{n} tokens": lambda: chunked_forward(model, ids, chunk_size=chunk),
        f"{n - 1} tokens (ragged last chunk)": lambda: chunked_forward(model, ids[:, :-1], chunk_size=chunk),
        "+ 8 continuation logits kept": lambda: chunked_forward(model, ids[:, :-1], chunk_size=chunk, keep=keep),
        "+ allocator emptied first": lambda: (empty_cache(),
                                              chunked_forward(model, ids[:, :-1], chunk_size=chunk, keep=keep)),
        "whole request (model type)": lambda: one_request(lm, n, device, lm.adapted.config.vocab_size, emptied=False),
        "whole request, allocator emptied first": lambda: one_request(lm, n, device, lm.adapted.config.vocab_size),
        "whole request, last layer attending every row": lambda: every_row(
            lambda: one_request(lm, n, device, lm.adapted.config.vocab_size, emptied=False)),
    }
    return {label: cuda_time(run, repeats=3) for label, run in steps.items()}


def request_path(n: int, chunks: list[int]) -> None:
    """G4's request vs the bare prefill: which of its differences costs the time (see --request)."""
    from longctx.engine.runner import chunked_forward
    from longctx.lmeval.model import SsmloraLM

    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, "cuda", LLAMA_3_2_1B)
        ids = random_ids(n, "cuda", vocab=LLAMA_3_2_1B["vocab_size"])  # (1, n)
        for c in chunks:
            lm = SsmloraLM(pretrained=tmp, method="base", chunk_size=c, device="cuda")
            times = request_steps(lm, ids, c)
            first = next(iter(times.values()))
            for label, seconds in times.items():
                print(f"request chunk {c}: {label}: {seconds:.3f} s ({(seconds - first) * 1e3:+.0f} ms)", flush=True)
            keep = torch.arange(n - 9, n - 1)
            top_kernels(lambda: chunked_forward(lm.adapted, ids[:, :-1], chunk_size=c, keep=keep),
                        f"ragged request chunk {c}", rows=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--chunks", default="4096,8192,16384")
    parser.add_argument("--request", action="store_true", help="only the request-path breakdown (G4)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_prefill.py: error: needs a CUDA device")
    chunks = [int(c) for c in args.chunks.split(",")]
    if args.request:
        request_path(args.length, chunks)
        return
    attention_alone(args.length, chunks)
    whole_model(args.length, chunks)


if __name__ == "__main__":
    main()
