"""P7: peak memory of one chunked training step at N and 4N tokens: growth vs the KV cache.

Chunked training (`longctx train --chunk-size`) back-propagates one chunk at a time, with the
KV cache and adapter state carried in and detached, so going from N to 4N tokens should add no
more than the larger KV cache (the activations are one chunk's at both lengths). The same step
on whole sequences is measured for comparison: its activations grow with the sequence.
Each (mode, length) runs in its own child process (clean peak figures); one step = forward and
backward of a batch whose answer tokens are at the end, as in `longctx train`.
Usage: python benchmarks/p7_chunked_training_memory.py [--length 2048] [--chunk-size 512] [--method ssmlora]
       [--device cuda --dtype bfloat16 --layers 8 --hidden 1024 --length 16384 --chunk-size 4096]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_llama, kv_cache_bytes  # noqa: E402

TARGET = 1.0  # growth from N to 4N ≤ the KV cache at 4N
ANSWER_TOKENS = 8


def child(length: int, chunk_size: int | None, method: str, layers: int, hidden: int, device: str,
          dtype: str) -> dict:
    from longctx.adapters import wrap
    from longctx.engine.measure import PeakMemory
    from longctx.training.chunked import chunked_training_loss

    model = bench_llama(layers=layers, hidden=hidden, vocab=4096, heads=8, kv_heads=2, attn="longctx_sdpa",
                        max_positions=max(65536, length), device=device).to(getattr(torch, dtype))
    adapted = wrap(model, method)
    adapted.model.train()
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    with PeakMemory(torch.device(device)) as mem:
        if chunk_size is None:
            adapted.model(input_ids=ids, labels=labels).loss.backward()
        else:
            chunked_training_loss(adapted, ids, labels, chunk_size, lambda loss: loss.backward())
    return {"length": length, "delta_bytes": mem.delta_bytes, "kv_bytes": kv_cache_bytes(model, length),
            "method": mem.method}


def _run(length: int, chunk: int | None, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", str(length), "--chunk-size", str(chunk or 0), "--method",
           args.method, "--layers", str(args.layers), "--hidden", str(args.hidden), "--device", args.device,
           "--dtype", args.dtype]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="N (the step is also run at 4N)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--method", default="ssmlora")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the CUDA allocator's peak)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chunk_size or None, args.method, args.layers, args.hidden,
                               args.device, args.dtype)))
        return
    growth = {}
    for chunk in (args.chunk_size, None):
        short, long = _run(args.length, chunk, args), _run(4 * args.length, chunk, args)
        growth[chunk] = long["delta_bytes"] - short["delta_bytes"]
        mode = f"chunks of {chunk}" if chunk else "whole sequence"
        for r in (short, long):
            print(f"{args.method} {mode:>15} N={r['length']:>6}  peak delta {r['delta_bytes'] / 2**20:8.1f} MiB"
                  f"  KV cache {r['kv_bytes'] / 2**20:6.1f} MiB  ({r['method']})")
    kv = long["kv_bytes"]
    ratio = growth[args.chunk_size] / kv
    print(f"P7 ({args.device}, {args.dtype}) chunked growth {args.length}->{4 * args.length}: {growth[args.chunk_size] / 2**20:.1f} MiB vs KV cache "
          f"at {4 * args.length} {kv / 2**20:.1f} MiB: ratio {ratio:.2f} (target <= {TARGET}) "
          f"{'PASS' if ratio <= TARGET else 'MISS'}; whole-sequence growth {growth[None] / 2**20:.1f} MiB "
          f"({growth[None] / kv:.1f}x the KV cache)")


if __name__ == "__main__":
    main()
